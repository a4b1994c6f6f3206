//! Classifier-free guidance (Ho & Salimans 2022) as a wrapper over any denoiser that answers
//! under two conditionings ([`Denoiser::denoise_pair`]): the class labels and the null label
//! today, a prompt and a negative prompt for text models. The guided noise prediction is
//!
//! eps = eps_uncond + w (eps_cond - eps_uncond),
//!
//! and w = 1 is plain conditional sampling. Every prediction type's (x0, eps) is affine in the
//! raw network output at a fixed x and level, so this equals mixing the raw outputs (what
//! diffusers does) up to float rounding, for epsilon, v, sample and score networks alike.
//!
//! A sampling stack is network → guidance → x0 clipping:
//!
//! A network distilled with guidance (LCM, Luo et al. 2023) takes the scale as an input instead,
//! `timestep_cond`, the sinusoidal [`guidance_embedding`], and runs once per step: no doubled
//! batch, no negative prompt.
//!
//! ```no_run
//! use edgediff::clip::{Clipped, X0Clip};
//! use edgediff::denoiser::ModelDenoiser;
//! use edgediff::guidance::Guided;
//! # let mut model = edgediff::Model::open("m.onnx")?;
//! let range = model.metadata().data_range;
//! let mut net = ModelDenoiser::new(&mut model, Some(vec![3; 8]), 0)
//!     .with_unconditional(Some(vec![10; 8])); // the null label
//! let den = Clipped::new(Guided::new(&mut net, Some(2.5)), X0Clip::Range, range);
//! // ... hand `den` to a sampler, then read net.calls()
//! # Ok::<(), edgediff::Error>(())
//! ```

use ndarray::{Array1, Array4, Zip};

use crate::denoiser::{Denoised, DenoisedPair, Denoiser, Rows};
use crate::error::Result;

/// `inner` guided with scale `w`: each call evaluates the batch under both conditionings (one
/// network call on a doubled batch for a [`crate::denoiser::ModelDenoiser`]) and combines them.
/// With no scale it passes every call through, on the plain batch.
pub struct Guided<D> {
    inner: D,
    scale: Option<f64>,
}

impl<D> Guided<D> {
    /// Guides `inner` with scale `scale` (None: no guidance, `inner` answers alone).
    pub fn new(inner: D, scale: Option<f64>) -> Self {
        Guided { inner, scale }
    }
}

impl<D: Denoiser> Denoiser for Guided<D> {
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        match self.scale {
            None => self.inner.denoise_rows(x, at),
            Some(w) => Ok(combine(self.inner.denoise_pair(x, at)?, w)),
        }
    }
}

/// eps_u + w (eps_c - eps_u), and x0 with the same weights: the x0 that goes with that eps
/// (x0 is affine in eps at fixed x, and the weights sum to one), taken without dividing by a
/// small alpha, so networks that predict x0 or v keep their x0's precision at high noise.
pub fn combine(pair: DenoisedPair, w: f64) -> Denoised {
    let w = w as f32;
    let mix = |c: Array4<f32>, mut u: Array4<f32>| {
        Zip::from(&mut u)
            .and(&c)
            .for_each(|u, &c| *u += w * (c - *u));
        u
    };
    let DenoisedPair { cond, uncond } = pair;
    Denoised {
        x0: mix(cond.x0, uncond.x0),
        eps: mix(cond.eps, uncond.eps),
    }
}

/// The smallest `timestep_cond` width [`guidance_embedding`] fills: its frequencies are
/// 10000^(-i / (half - 1)), so it needs two of them, sin and cos of each.
pub const MIN_EMBEDDING_WIDTH: usize = 4;

/// Checks the width of a `timestep_cond` input (-1: dynamic) as the embedding's width.
pub(crate) fn embedding_width(width: i64) -> std::result::Result<usize, String> {
    match usize::try_from(width) {
        Ok(w) if w >= MIN_EMBEDDING_WIDTH => Ok(w),
        _ => Err(format!(
            "the guidance-scale embedding (timestep_cond) has {}; it needs a fixed width of at least {MIN_EMBEDDING_WIDTH} (the U-Net's time_cond_proj_dim)",
            if width < 0 { "a dynamic width".to_string() } else { format!("width {width}") }
        )),
    }
}

/// The guidance-scale embedding a guidance-distilled U-Net takes as `timestep_cond`, of width
/// `dim` (>= [`MIN_EMBEDDING_WIDTH`]) for guidance scale `w`: diffusers'
/// `get_guidance_scale_embedding(w - 1, dim)` (VDM's sinusoidal embedding of 1000 (w - 1)),
/// sin of each frequency, then cos, a zero last for odd `dim`. The shift by one is the LCM
/// pipelines': they take w in the Imagen form, where 1 is no guidance, while LCM distilled
/// with w - 1. Computed in float32 in diffusers' order: the arguments reach 1000 (w - 1)
/// radians, where a float32 ulp is 5e-4, so rounding them otherwise would move the
/// embedding by more than the sampler parity allows.
pub fn guidance_embedding(w: f64, dim: usize) -> Array1<f32> {
    let half = dim / 2;
    let scaled = (w - 1.0) as f32 * 1000.0;
    let decay = 10000f32.ln() / (half as f32 - 1.0);
    let mut out = Array1::zeros(dim);
    for i in 0..half {
        let arg = scaled * (i as f32 * -decay).exp();
        out[i] = arg.sin();
        out[half + i] = arg.cos();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{to_x0_eps, DenoisedPair};
    use crate::metadata::Prediction;
    use crate::schedule::NoiseLevel;

    /// A two-conditioning denoiser from fixed raw outputs: what a network would answer.
    struct Fixed {
        pred: Prediction,
        cond: Array4<f32>,
        uncond: Array4<f32>,
    }

    impl Denoiser for Fixed {
        fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
            let Rows { levels, .. } = at;
            Ok(to_x0_eps(self.pred, self.cond.clone(), x, &levels[0]))
        }

        fn denoise_pair(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<DenoisedPair> {
            let Rows { levels, .. } = at;
            Ok(DenoisedPair {
                cond: to_x0_eps(self.pred, self.cond.clone(), x, &levels[0]),
                uncond: to_x0_eps(self.pred, self.uncond.clone(), x, &levels[0]),
            })
        }
    }

    #[test]
    fn guiding_in_eps_equals_mixing_the_raw_outputs_for_every_prediction() {
        let level = NoiseLevel {
            t: 0.0,
            alpha: 0.6,
            sigma: 0.8,
        };
        let x = Array4::from_shape_fn((2, 1, 2, 2), |(i, _, j, k)| (i + j) as f32 * 0.4 - k as f32);
        let cond = Array4::from_shape_fn((2, 1, 2, 2), |(i, _, j, k)| {
            (i * 2 + j) as f32 * 0.3 - k as f32
        });
        let uncond = cond.mapv(|v| 0.5 - v * 0.7);
        let w = 2.5f32;
        for pred in [
            Prediction::Epsilon,
            Prediction::V,
            Prediction::Sample,
            Prediction::Score,
        ] {
            let mixed = Zip::from(&uncond)
                .and(&cond)
                .map_collect(|&u, &c| u + w * (c - u));
            let want = to_x0_eps(pred, mixed, &x, &level);
            let mut guided = Guided::new(
                Fixed {
                    pred,
                    cond: cond.clone(),
                    uncond: uncond.clone(),
                },
                Some(w as f64),
            );
            let got = guided.denoise(&x, &level).unwrap();
            let err = (&got.x0 - &want.x0)
                .mapv(f32::abs)
                .fold(0f32, |m, &v| m.max(v))
                + (&got.eps - &want.eps)
                    .mapv(f32::abs)
                    .fold(0f32, |m, &v| m.max(v));
            assert!(err < 1e-5, "{pred:?}: {err}");
            // Without a scale the conditional answer passes through.
            let mut plain = Guided::new(guided.inner, None);
            let d = plain.denoise(&x, &level).unwrap();
            assert_eq!(d.eps, to_x0_eps(pred, cond.clone(), &x, &level).eps);
        }
    }

    #[test]
    fn the_guidance_embedding_is_vdms_sinusoid_of_1000_w_minus_1() {
        // Closed form in f64: frequency i of 4 is 10000^(-i/3); w 1.5 gives arguments 500 f_i.
        let e = guidance_embedding(1.5, 9);
        assert_eq!(e.len(), 9);
        for i in 0..4 {
            let arg = 500.0 * 10000f64.powf(-(i as f64) / 3.0);
            // float32 arguments near 500 are exact to 3e-5 (ulp 6e-5), the sines to as much.
            assert!((e[i] as f64 - arg.sin()).abs() < 1e-4, "{i}");
            assert!((e[4 + i] as f64 - arg.cos()).abs() < 1e-4, "{i}");
        }
        assert_eq!(e[8], 0.0);
        // w = 1 is no guidance: every argument 0.
        let none = guidance_embedding(1.0, 4);
        assert_eq!(none.to_vec(), vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn a_denoiser_with_one_conditioning_is_left_unchanged() {
        // The default pair answers the same twice: any scale gives back that answer.
        struct One;
        impl Denoiser for One {
            fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
                let _ = at;
                Ok(Denoised {
                    x0: x.mapv(|v| v * 0.5),
                    eps: x.mapv(|v| v - 1.0),
                })
            }
        }
        let x = Array4::from_elem((1, 1, 1, 2), 3.0f32);
        let level = NoiseLevel {
            t: 0.0,
            alpha: 1.0,
            sigma: 1.0,
        };
        let d = Guided::new(One, Some(7.5)).denoise(&x, &level).unwrap();
        assert_eq!(d.x0, x.mapv(|v| v * 0.5));
        assert_eq!(d.eps, x.mapv(|v| v - 1.0));
    }
}
