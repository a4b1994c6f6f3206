//! The model adapter: turns whatever the network predicts into (x0, eps) at a noise level.
//! Samplers only ever see [`Denoiser`].

use ndarray::{s, Array4, Axis, Zip};

use crate::error::{Error, Result};
use crate::metadata::{Prediction, TimeInput};
use crate::model::Model;
use crate::schedule::NoiseLevel;

/// The denoiser's answer at one noise level: x_t = alpha x0 + sigma eps holds for the pair.
#[derive(Debug, Clone)]
pub struct Denoised {
    pub x0: Array4<f32>,
    pub eps: Array4<f32>,
}

/// D(x, t): what every sampler calls.
pub trait Denoiser {
    /// Predicts x0 and eps for the batch `x` at noise level `level` (never the clean level).
    fn denoise(&mut self, x: &Array4<f32>, level: &NoiseLevel) -> Result<Denoised> {
        self.denoise_rows(x, &[], &vec![*level; x.shape()[0]])
    }

    /// Predicts x0 and eps for rows `rows` of the batch (all rows when empty), row j of `x`
    /// at its own level `levels[j]`: for solvers whose samples keep their own time.
    fn denoise_rows(
        &mut self,
        x: &Array4<f32>,
        rows: &[usize],
        levels: &[NoiseLevel],
    ) -> Result<Denoised>;
}

/// Converts a raw network output into (x0, eps).
pub fn to_x0_eps(
    pred: Prediction,
    out: Array4<f32>,
    x: &Array4<f32>,
    level: &NoiseLevel,
) -> Denoised {
    let (a, s) = (level.alpha as f32, level.sigma as f32);
    match pred {
        Prediction::Epsilon => {
            let x0 = Zip::from(x).and(&out).map_collect(|&x, &e| (x - s * e) / a);
            Denoised { x0, eps: out }
        }
        Prediction::V => {
            let x0 = Zip::from(x).and(&out).map_collect(|&x, &v| a * x - s * v);
            let eps = Zip::from(x).and(&out).map_collect(|&x, &v| s * x + a * v);
            Denoised { x0, eps }
        }
        Prediction::Sample => {
            let eps = Zip::from(x)
                .and(&out)
                .map_collect(|&x, &x0| (x - a * x0) / s);
            Denoised { x0: out, eps }
        }
        Prediction::Score => {
            let eps = out.mapv(|g| -s * g);
            let x0 = Zip::from(x).and(&eps).map_collect(|&x, &e| (x - s * e) / a);
            Denoised { x0, eps }
        }
    }
}

/// What to do with x0 predictions outside the model's data range.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum X0Clip {
    /// Leave them.
    #[default]
    None,
    /// Clamp to the data range (static thresholding).
    Range,
    /// Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = the `percentile`
    /// quantile of |x0| in range units, clamped to [1, `max`]; x0 is clamped to [-s, s] and
    /// divided by s. Saturated pixels are pulled inwards instead of piling up at the edge.
    Dynamic { percentile: f64, max: f64 },
}

impl X0Clip {
    /// Applies the clipping to a batch of x0 predictions with data range [lo, hi].
    pub fn apply(&self, x0: &mut Array4<f32>, [lo, hi]: [f64; 2]) {
        match *self {
            X0Clip::None => {}
            X0Clip::Range => {
                let (lo, hi) = (lo as f32, hi as f32);
                x0.mapv_inplace(|v| v.clamp(lo, hi));
            }
            X0Clip::Dynamic { percentile, max } => {
                // In range units: z = (x0 - centre) / half-width, so the range is [-1, 1].
                let (c, r) = ((hi + lo) / 2.0, (hi - lo) / 2.0);
                for mut sample in x0.outer_iter_mut() {
                    let mut mags: Vec<f64> =
                        sample.iter().map(|&v| ((v as f64 - c) / r).abs()).collect();
                    let s = quantile(&mut mags, percentile).clamp(1.0, max.max(1.0));
                    sample.mapv_inplace(|v| {
                        let z = ((v as f64 - c) / r).clamp(-s, s) / s;
                        (c + r * z) as f32
                    });
                }
            }
        }
    }
}

/// The q-quantile with linear interpolation between order statistics (numpy's and torch's
/// default), so thresholds match the Python implementations.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let pos = q * (values.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    match values.get(i + 1) {
        Some(&next) => values[i] + frac * (next - values[i]),
        None => values[i],
    }
}

/// The ONNX model as a denoiser, with optional x0 clipping to the data range.
pub struct ModelDenoiser<'m> {
    model: &'m mut Model,
    class_labels: Option<Vec<i64>>,
    clip: X0Clip,
    /// Global index of the batch's first sample, for error messages.
    first_sample: usize,
    calls: usize,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Classifier-free guidance: (scale w, the null label).
    guidance: Option<(f64, i64)>,
}

impl<'m> ModelDenoiser<'m> {
    /// Wraps `model`; `class_labels` (one per sample) are passed when the graph takes them.
    pub fn new(
        model: &'m mut Model,
        class_labels: Option<Vec<i64>>,
        clip: X0Clip,
        first_sample: usize,
    ) -> Self {
        ModelDenoiser {
            model,
            class_labels,
            clip,
            first_sample,
            calls: 0,
            cancel: None,
            guidance: None,
        }
    }

    /// Classifier-free guidance (Ho & Salimans 2022): each call evaluates the batch with its
    /// class labels and with `null_label` (one network call on a doubled batch) and returns
    /// out_null + w (out_class - out_null); w = 1 is plain conditional sampling. The combination
    /// is taken on the raw output, which is affine in eps for every prediction type.
    pub fn with_guidance(mut self, guidance: Option<(f64, i64)>) -> Self {
        self.guidance = guidance;
        self
    }

    /// Stops with [`Error::Cancelled`] before the next network call once `flag` is set.
    pub fn with_cancel(
        mut self,
        flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Self {
        self.cancel = flag;
        self
    }

    /// Network evaluations so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

impl Denoiser for ModelDenoiser<'_> {
    fn denoise_rows(
        &mut self,
        x: &Array4<f32>,
        rows: &[usize],
        levels: &[NoiseLevel],
    ) -> Result<Denoised> {
        if let Some(flag) = &self.cancel {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
        }
        let meta = self.model.metadata();
        let (pred, range) = (meta.prediction, meta.data_range);
        let times: Vec<f64> = levels
            .iter()
            .map(|l| match meta.time_input {
                TimeInput::Index | TimeInput::Continuous => l.t,
                TimeInput::Sigma => l.sigma,
            })
            .collect();
        let labels: Option<Vec<i64>> = self.class_labels.as_ref().map(|all| {
            if rows.is_empty() {
                all.clone()
            } else {
                rows.iter().map(|&r| all[r]).collect()
            }
        });
        let out = match (self.guidance, &labels) {
            (Some((w, null)), Some(labels)) => {
                let n = x.shape()[0];
                let both = ndarray::concatenate(Axis(0), &[x.view(), x.view()])
                    .map_err(|e| Error::invalid(e.to_string()))?;
                let times2: Vec<f64> = times.iter().chain(&times).copied().collect();
                let labels2: Vec<i64> = labels
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(null, n))
                    .collect();
                let out = self
                    .model
                    .network
                    .run(both.view(), &times2, Some(&labels2))?;
                let (cond, uncond) = out.view().split_at(Axis(0), n);
                let w = w as f32;
                Zip::from(&uncond)
                    .and(&cond)
                    .map_collect(|&u, &c| u + w * (c - u))
            }
            _ => self
                .model
                .network
                .run(x.view(), &times, labels.as_deref())?,
        };
        self.calls += 1;
        if let Some(bad) = out
            .outer_iter()
            .position(|s| s.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::NonFinite {
                step: self.calls,
                time: times[bad],
                sample: self.first_sample + rows.get(bad).copied().unwrap_or(bad),
            });
        }
        let uniform = levels.windows(2).all(|w| w[0] == w[1]);
        let mut d = if uniform {
            to_x0_eps(pred, out, x, &levels[0])
        } else {
            let mut d = Denoised {
                x0: Array4::zeros(x.raw_dim()),
                eps: Array4::zeros(x.raw_dim()),
            };
            for (j, level) in levels.iter().enumerate() {
                let one = |a: &Array4<f32>| a.slice(s![j..j + 1, .., .., ..]).to_owned();
                let dj = to_x0_eps(pred, one(&out), &one(x), level);
                d.x0.slice_mut(s![j..j + 1, .., .., ..]).assign(&dj.x0);
                d.eps.slice_mut(s![j..j + 1, .., .., ..]).assign(&dj.eps);
            }
            d
        };
        if self.clip != X0Clip::None {
            self.clip.apply(&mut d.x0, range);
            for (j, level) in levels.iter().enumerate() {
                let (a, s) = (level.alpha as f32, level.sigma as f32);
                let mut e = d.eps.index_axis_mut(Axis(0), j);
                Zip::from(&mut e)
                    .and(x.index_axis(Axis(0), j))
                    .and(d.x0.index_axis(Axis(0), j))
                    .for_each(|e, &x, &x0| *e = (x - a * x0) / s);
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_threshold_rescales_by_the_quantile() {
        // Range [0, 2] (centre 1, half-width 1); one sample of 0..=100 scaled so |z| = k/50.
        let mut x0 = Array4::from_shape_fn((1, 1, 1, 101), |(_, _, _, k)| 1.0 + k as f32 / 50.0);
        // The 0.9 quantile of |z| = 0, 0.02, ..., 2 is 1.8 exactly.
        X0Clip::Dynamic {
            percentile: 0.9,
            max: f64::INFINITY,
        }
        .apply(&mut x0, [0.0, 2.0]);
        assert!((x0[[0, 0, 0, 100]] - 2.0).abs() < 1e-6); // clamped to 1.8, divided by 1.8
        assert!((x0[[0, 0, 0, 45]] - (1.0 + 0.9 / 1.8)).abs() < 1e-6);
        // With max = 1 it is plain clipping.
        let mut y = Array4::from_shape_fn((1, 1, 1, 3), |(_, _, _, k)| k as f32 * 1.5 - 1.0);
        X0Clip::Dynamic {
            percentile: 0.5,
            max: 1.0,
        }
        .apply(&mut y, [-1.0, 1.0]);
        assert_eq!(y.as_slice().unwrap(), &[-1.0, 0.5, 1.0]);
    }

    #[test]
    fn every_prediction_type_recovers_x0_and_eps() {
        // Build x from known x0, eps at a VP level; feed each parameterisation's exact output.
        let level = NoiseLevel {
            t: 0.0,
            alpha: 0.6,
            sigma: 0.8,
        };
        let x0 = Array4::from_shape_fn((2, 1, 2, 2), |(i, _, j, k)| {
            (i + j) as f32 * 0.3 - k as f32 * 0.2
        });
        let eps = Array4::from_shape_fn((2, 1, 2, 2), |(i, _, j, k)| {
            (i * 2 + j) as f32 * 0.5 - k as f32
        });
        let x = &x0 * 0.6 + &eps * 0.8;
        let outs = [
            (Prediction::Epsilon, eps.clone()),
            (Prediction::V, &eps * 0.6 - &x0 * 0.8),
            (Prediction::Sample, x0.clone()),
            (Prediction::Score, &eps * (-1.0 / 0.8)),
        ];
        for (pred, out) in outs {
            let d = to_x0_eps(pred, out, &x, &level);
            let err = (&d.x0 - &x0).mapv(f32::abs).fold(0f32, |m, &v| m.max(v))
                + (&d.eps - &eps).mapv(f32::abs).fold(0f32, |m, &v| m.max(v));
            assert!(err < 1e-5, "{pred:?}: {err}");
        }
    }
}
