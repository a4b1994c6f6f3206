//! The model adapter: turns whatever the network predicts into (x0, eps) at a noise level.
//! Samplers only ever see [`Denoiser`].

use ndarray::{Array4, Zip};

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
    fn denoise(&mut self, x: &Array4<f32>, level: &NoiseLevel) -> Result<Denoised>;
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

/// The ONNX model as a denoiser, with optional x0 clipping to the data range.
pub struct ModelDenoiser<'m> {
    model: &'m mut Model,
    class_labels: Option<Vec<i64>>,
    clip_x0: bool,
    /// Global index of the batch's first sample, for error messages.
    first_sample: usize,
    calls: usize,
}

impl<'m> ModelDenoiser<'m> {
    /// Wraps `model`; `class_labels` (one per sample) are passed when the graph takes them.
    pub fn new(
        model: &'m mut Model,
        class_labels: Option<Vec<i64>>,
        clip_x0: bool,
        first_sample: usize,
    ) -> Self {
        ModelDenoiser {
            model,
            class_labels,
            clip_x0,
            first_sample,
            calls: 0,
        }
    }

    /// Network evaluations so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

impl Denoiser for ModelDenoiser<'_> {
    fn denoise(&mut self, x: &Array4<f32>, level: &NoiseLevel) -> Result<Denoised> {
        let meta = self.model.metadata();
        let (pred, [lo, hi]) = (meta.prediction, meta.data_range);
        let time = match meta.time_input {
            TimeInput::Index | TimeInput::Continuous => level.t,
            TimeInput::Sigma => level.sigma,
        };
        let n = x.shape()[0];
        let out = self
            .model
            .network
            .run(x.view(), &vec![time; n], self.class_labels.as_deref())?;
        self.calls += 1;
        if let Some(bad) = out
            .outer_iter()
            .position(|s| s.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::NonFinite {
                step: self.calls,
                time,
                sample: self.first_sample + bad,
            });
        }
        let mut d = to_x0_eps(pred, out, x, level);
        if self.clip_x0 {
            let (lo, hi) = (lo as f32, hi as f32);
            d.x0.mapv_inplace(|v| v.clamp(lo, hi));
            let (a, s) = (level.alpha as f32, level.sigma as f32);
            d.eps = Zip::from(x)
                .and(&d.x0)
                .map_collect(|&x, &x0| (x - a * x0) / s);
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
