//! Inpainting with any sampler that steps through noise levels: before every network call the
//! known pixels are replaced by the known image noised to that call's level (fresh noise), and
//! the x0 prediction there is the known image, so the sampler fills the rest consistently
//! with it (the replacement method of Song et al. 2021; the fresh noise as in RePaint). RePaint's resampling (Lugmayr et al. 2022)
//! harmonises the two regions: after every `jumps` steps the sample is noised back up those
//! steps and they are run again, `resample` extra times.

use ndarray::{s, Array4, Axis, Zip};

use crate::denoiser::{Denoised, Denoiser, Rows};
use crate::error::{Error, Result};
use crate::generate::{prepare, run_batches, BatchPlan, Report, SampleOptions};
use crate::model::Model;
use crate::noise::SeededNoise;
use crate::sampler::Trajectory;
use crate::schedule::NoiseLevel;

/// Most extra passes RePaint resampling may make over each jump (RePaint itself used 9); the
/// bound keeps `steps * (1 + resample)` far from overflow and a run finite.
pub const MAX_RESAMPLE: usize = 1000;

/// RePaint resampling: every `jumps` steps, go back up and redo them `resample` more times
/// (`jumps` 0: no resampling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resampling {
    pub jumps: usize,
    pub resample: usize,
}

/// The model with the known region pinned to the known image.
struct Pinned<'a> {
    inner: &'a mut dyn Denoiser,
    known: &'a Array4<f32>,
    /// 1 where the pixel is known (kept), 0 where it is filled.
    keep: &'a Array4<f32>,
    noise: SeededNoise,
}

impl Denoiser for Pinned<'_> {
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        let Rows {
            index: rows,
            levels,
        } = at;
        let pick = |a: &Array4<f32>| {
            if rows.is_empty() {
                a.clone()
            } else {
                a.select(Axis(0), rows)
            }
        };
        let (known, keep) = (pick(self.known), pick(self.keep));
        let z = self.noise.draw_rows(rows);
        let mut xp = x.clone();
        for (j, l) in levels.iter().enumerate() {
            let (a, sg) = (l.alpha as f32, l.sigma as f32);
            Zip::from(xp.index_axis_mut(Axis(0), j))
                .and(known.index_axis(Axis(0), j))
                .and(keep.index_axis(Axis(0), j))
                .and(z.index_axis(Axis(0), j))
                .for_each(|x, &k, &m, &z| *x = m * (a * k + sg * z) + (1.0 - m) * *x);
        }
        let mut d = self.inner.denoise_rows(&xp, at)?;
        // The sampler gets x0 = the image on the known pixels and eps measured from its own x
        // (not the re-noised input): every update of the form x' = A x + B eps then keeps the
        // known pixels a noised copy of the image, reaching it exactly at sigma = 0.
        for (j, l) in levels.iter().enumerate() {
            let (a, sg) = (l.alpha as f32, l.sigma as f32);
            Zip::from(d.x0.index_axis_mut(Axis(0), j))
                .and(d.eps.index_axis_mut(Axis(0), j))
                .and(x.index_axis(Axis(0), j))
                .and(known.index_axis(Axis(0), j))
                .and(keep.index_axis(Axis(0), j))
                .for_each(|x0, e, &x, &k, &m| {
                    *x0 = m * k + (1.0 - m) * *x0;
                    *e = (x - a * *x0) / sg;
                });
        }
        Ok(d)
    }
}

/// Noises `x` from level `from` up to the noisier level `to` (the forward process).
fn renoise(x: &Array4<f32>, from: &NoiseLevel, to: &NoiseLevel, z: &Array4<f32>) -> Array4<f32> {
    let ratio = to.alpha / from.alpha;
    let std = (to.sigma.powi(2) - (ratio * from.sigma).powi(2))
        .max(0.0)
        .sqrt();
    Zip::from(x)
        .and(z)
        .map_collect(|&x, &z| (ratio * x as f64 + std * z as f64) as f32)
}

/// Fills the pixels of `images` (`[n, C, H, W]`, data range) where `masks` (`[n, C or 1, H, W]`)
/// is 1, keeping those where it is 0, with `opts.sampler` over its levels.
#[allow(clippy::single_range_in_vec_init)] // one range of samples: all of them
pub fn inpaint(
    model: &mut Model,
    opts: &SampleOptions,
    images: &Array4<f32>,
    masks: &Array4<f32>,
    resampling: Resampling,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Array4<f32>, Report)> {
    if model.pipeline().is_some() {
        // The images and masks would be pixels, the pinned sample latents: they cannot mix.
        return Err(Error::not_for_pipelines(
            "inpainting",
            "latent inpainting (the image encoded by the VAE, the mask downscaled to the latents) is still to come",
        ));
    }
    let meta = model.metadata().clone();
    let [c, h, w] = meta.sample_shape;
    let n = images.shape()[0];
    if images.shape() != [n, c, h, w] {
        return Err(Error::invalid(format!(
            "images have shape {:?}; the model takes [n, {c}, {h}, {w}]",
            images.shape()
        )));
    }
    if masks.shape()[0] != n
        || masks.shape()[2..] != [h, w]
        || (masks.shape()[1] != 1 && masks.shape()[1] != c)
    {
        return Err(Error::invalid(format!(
            "the mask has shape {:?}; it must match the images: [{n}, 1{}, {h}, {w}]",
            masks.shape(),
            if c > 1 {
                format!(" or {c}")
            } else {
                String::new()
            }
        )));
    }
    let opts = SampleOptions { n, ..opts.clone() };
    let (label, lv) = prepare(model, &opts, None)?;
    if resampling.jumps > 0 && opts.sampler.is_adaptive() {
        return Err(Error::options(
            "{0} needs a sampler with a level grid; the adaptive samplers choose their own",
            &["jumps"],
        ));
    }
    let keep = Array4::from_shape_fn((n, c, h, w), |(i, k, y, x)| {
        let m = masks[[i, k.min(masks.shape()[1] - 1), y, x]];
        if m >= 0.5 {
            0.0
        } else {
            1.0
        }
    });
    let steps = lv.len() - 1;
    if resampling.jumps > steps {
        return Err(Error::out_of_range(
            "jumps",
            resampling.jumps,
            &format!("must be in 0..={steps} (the run's steps)"),
        ));
    }
    if resampling.resample > MAX_RESAMPLE {
        return Err(Error::out_of_range(
            "resample",
            resampling.resample,
            &format!("must be in 0..={MAX_RESAMPLE}"),
        ));
    }
    let rounds = if resampling.jumps > 0 {
        1 + resampling.resample
    } else {
        1
    };
    let jumps = if resampling.jumps == 0 {
        steps
    } else {
        resampling.jumps
    };
    let plan = BatchPlan {
        label,
        levels: &lv,
        steps_per_batch: steps * rounds,
        injected: None,
    };
    let mut out = Array4::zeros((n, c, h, w));
    let report = run_batches(
        model,
        &opts,
        &plan,
        &[0..n],
        progress,
        &mut |first, x| {
            out.slice_mut(s![first..first + x.shape()[0], .., .., ..])
                .assign(&x);
            Ok(())
        },
        &mut |b, mut x, progress| {
            let rows = s![b.first..b.first + b.len, .., .., ..];
            let (known, keep) = (images.slice(rows).to_owned(), keep.slice(rows).to_owned());
            let mut den = Pinned {
                inner: &mut *b.den,
                known: &known,
                keep: &keep,
                noise: SeededNoise::new(
                    opts.seed ^ 0x1a9a_1a7e_5eed_0001,
                    b.first,
                    b.len,
                    [c, h, w],
                ),
            };
            let mut done = 0;
            let mut start = 0;
            while start < steps {
                let end = (start + jumps).min(steps);
                for round in 0..rounds {
                    if round > 0 {
                        let z = b.noise.step(0)?;
                        x = renoise(&x, &lv[end], &lv[start], &z);
                    }
                    let mut tr = Trajectory {
                        den: &mut den,
                        noise: &mut *b.noise,
                        levels: &lv[start..=end],
                        level_at_sbar: b.level_at_sbar,
                        step_counts: None,
                    };
                    let base = done;
                    x = opts
                        .sampler
                        .run(&mut tr, x, &mut |i, _| progress(base + i))?;
                    done += end - start;
                    if end == steps {
                        break; // the last segment ends clean: nothing to go back up from
                    }
                }
                start = end;
            }
            Ok((x, None))
        },
    )?;
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renoise_reaches_the_noisier_level_marginal() {
        // x at level a has variance alpha_a² v + sigma_a²; renoised to b it must have
        // alpha_b² v + sigma_b² (here with v = 0 and many draws of z at one pixel each).
        let (a, b) = (
            NoiseLevel {
                t: 0.0,
                alpha: 0.9,
                sigma: (1.0f64 - 0.81).sqrt(),
            },
            NoiseLevel {
                t: 0.0,
                alpha: 0.5,
                sigma: (1.0f64 - 0.25).sqrt(),
            },
        );
        let x = Array4::from_elem((1, 1, 1, 1), 0.0f32);
        let z = Array4::from_elem((1, 1, 1, 1), 1.0f32);
        // With x = 0 the result is the added noise's std times z.
        let y = renoise(&x, &a, &b, &z);
        let want = (b.sigma.powi(2) - (b.alpha / a.alpha * a.sigma).powi(2)).sqrt();
        assert!((y[[0, 0, 0, 0]] as f64 - want).abs() < 1e-6);
        // And alpha scales by alpha_b / alpha_a.
        let y = renoise(&Array4::from_elem((1, 1, 1, 1), 1.0), &a, &b, &(z * 0.0));
        assert!((y[[0, 0, 0, 0]] as f64 - 0.5 / 0.9).abs() < 1e-6);
        // Total variance: (0.5/0.9)² 0.19 + added = 0.75 = sigma_b².
        assert!(((0.5f64 / 0.9).powi(2) * 0.19 + want * want - 0.75).abs() < 1e-12);
    }
}
