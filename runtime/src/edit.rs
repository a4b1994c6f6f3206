//! What deterministic sampling buys (the DDIM paper's §5.4 and §5.3): inversion of an image to
//! the noise that decodes back to it, and interpolation between noises that stays on the prior.

use ndarray::{s, Array4, Zip};

use crate::denoiser::{Denoiser, ModelDenoiser};
use crate::error::{Error, Result};
use crate::generate::{class_label_for, prior_std};
use crate::model::Model;
use crate::sampler::ops::transfer;
use crate::spacing::{spaced_levels, Spacing};

/// Runs the probability-flow ODE forwards (DDIM inversion) from `images` `[n, C, H, W]` (in the
/// model's data range) to their noise at the top of the `steps`-level grid, scaled like the
/// initial noise of `sample` (unit variance), so `sample --init-noise` with the same `steps`,
/// `spacing` and the ddim sampler decodes it back.
///
/// Each step moves x along the current level's eps, as the DDIM update does in reverse; the
/// first step leaves the clean level and takes eps at the level it goes to (no eps exists at
/// sigma = 0). The mismatch between these explicit steps and the decoder's is the round-trip
/// error, which shrinks with more steps.
pub fn invert(
    model: &mut Model,
    images: &Array4<f32>,
    steps: usize,
    spacing: Spacing,
    batch_size: usize,
    class_label: Option<i64>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Array4<f32>> {
    if model.pipeline().is_some() {
        // Inverting images means encoding them with the VAE and running the U-Net with a
        // prompt; neither is wired in here yet.
        return Err(Error::not_for_pipelines(
            "DDIM inversion",
            "inverting images needs their latents (the VAE encoder) and a prompt, still to come",
        ));
    }
    let shape = model.metadata().sample_shape;
    if images.shape()[1..] != shape {
        return Err(Error::invalid(format!(
            "images have shape {:?}; the model takes [n, {}, {}, {}]",
            images.shape(),
            shape[0],
            shape[1],
            shape[2]
        )));
    }
    if batch_size == 0 {
        return Err(Error::options("{0} must be at least 1", &["batch_size"]));
    }
    let label = class_label_for(model.metadata(), class_label)?;
    let mut up = spaced_levels(model.schedule(), spacing, steps)?;
    let std = prior_std(model.schedule(), &up) as f32;
    up.reverse();
    let n = images.shape()[0];
    let total = steps * n.div_ceil(batch_size);
    let mut out = Array4::zeros(images.raw_dim());
    for (b, first) in (0..n).step_by(batch_size).enumerate() {
        let m = batch_size.min(n - first);
        let mut x = images.slice(s![first..first + m, .., .., ..]).to_owned();
        let mut den = ModelDenoiser::new(model, label.map(|k| vec![k; m]), first);
        for i in 0..steps {
            let (cur, next) = (up[i], up[i + 1]);
            let at = if cur.is_clean() { next } else { cur };
            let eps = den.denoise(&x, &at)?.eps;
            x = transfer(&x, &eps, &cur, &next);
            progress(b * steps + i + 1, total);
        }
        out.slice_mut(s![first..first + m, .., .., ..])
            .assign(&x.mapv(|v| v / std));
    }
    Ok(out)
}

/// Spherical interpolation between two noises at fraction `t` (Shoemake's slerp; the DDIM
/// paper's choice, since Gaussian noise concentrates on a sphere and a straight line between
/// two points on it passes through low-norm noise the model never saw).
pub fn slerp(a: &Array4<f32>, b: &Array4<f32>, t: f64) -> Array4<f32> {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let theta = (dot / (na * nb)).clamp(-1.0, 1.0).acos();
    let (ca, cb) = if theta.sin().abs() < 1e-8 {
        (1.0 - t, t) // (anti)parallel: the arc is degenerate, use the chord
    } else {
        (
            ((1.0 - t) * theta).sin() / theta.sin(),
            (t * theta).sin() / theta.sin(),
        )
    };
    Zip::from(a)
        .and(b)
        .map_collect(|&x, &y| (ca * x as f64 + cb * y as f64) as f32)
}

/// `frames` noises from `a` to `b` (both `[1, C, H, W]`) inclusive, stacked `[frames, C, H, W]`.
pub fn slerp_frames(a: &Array4<f32>, b: &Array4<f32>, frames: usize) -> Result<Array4<f32>> {
    if frames < 2 {
        return Err(Error::out_of_range("frames", frames, "must be at least 2"));
    }
    let mut out = Array4::zeros((frames, a.shape()[1], a.shape()[2], a.shape()[3]));
    for f in 0..frames {
        let t = f as f64 / (frames - 1) as f64;
        out.slice_mut(s![f..f + 1, .., .., ..])
            .assign(&slerp(a, b, t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_keeps_the_ends_and_the_norm_of_orthogonal_unit_vectors() {
        let a = Array4::from_shape_vec((1, 1, 1, 2), vec![1.0f32, 0.0]).unwrap();
        let b = Array4::from_shape_vec((1, 1, 1, 2), vec![0.0f32, 1.0]).unwrap();
        let f = slerp_frames(&a, &b, 5).unwrap();
        assert_eq!(f.slice(s![0, 0, 0, ..]).to_vec(), vec![1.0, 0.0]);
        assert!((f[[4, 0, 0, 1]] - 1.0).abs() < 1e-7 && f[[4, 0, 0, 0]].abs() < 1e-7);
        for row in f.outer_iter() {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "{norm}");
        }
        // The midpoint is at 45 degrees: cos(pi/4) on both axes.
        let c = std::f32::consts::FRAC_1_SQRT_2;
        assert!((f[[2, 0, 0, 0]] - c).abs() < 1e-6 && (f[[2, 0, 0, 1]] - c).abs() < 1e-6);
        assert!(slerp_frames(&a, &b, 1).is_err());
    }
}
