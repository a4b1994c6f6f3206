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

use ndarray::{Array4, Zip};

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
