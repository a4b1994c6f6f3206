//! x0 clipping and thresholding as a wrapper over a denoiser: the network's x0 prediction is
//! pulled into the data range after guidance has combined the conditional and unconditional
//! answers (clipping each before combining would let the guided x0 leave the range again).

use ndarray::{Array4, Axis, Zip};

use crate::denoiser::{Denoised, Denoiser, Rows};
use crate::error::{Error, Result};
use crate::schedule::NoiseLevel;

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
    /// Dynamic thresholding at quantile `percentile` in (0, 1] of |x0|, the threshold at most
    /// `max` (at least 1; None: unbounded), checked.
    ///
    /// ```
    /// use edgediff::X0Clip;
    /// assert!(X0Clip::dynamic(0.995, None).is_ok());
    /// let e = X0Clip::dynamic(1.5, Some(2.0)).unwrap_err();
    /// assert_eq!(e.argument().unwrap().args, ["dynamic_threshold", "threshold_max"]);
    /// ```
    pub fn dynamic(percentile: f64, max: Option<f64>) -> Result<X0Clip> {
        let max = max.unwrap_or(f64::INFINITY);
        if !(percentile > 0.0 && percentile <= 1.0 && max >= 1.0) {
            // Both named: either may be the one at fault (false for NaN too).
            return Err(Error::options(
                format!("{{0}} {percentile} must be in (0, 1] and {{1}} {max} at least 1"),
                &["dynamic_threshold", "threshold_max"],
            ));
        }
        Ok(X0Clip::Dynamic { percentile, max })
    }

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

/// `inner` with its x0 predictions clipped by `clip` to the data range `range`, and eps made
/// consistent with the clipped x0 (x = alpha x0 + sigma eps still holds, so samplers that step
/// with eps see the clipping too). [`X0Clip::None`] passes the answer through untouched.
pub struct Clipped<D> {
    inner: D,
    clip: X0Clip,
    range: [f64; 2],
}

impl<D> Clipped<D> {
    /// Clips `inner`'s x0 predictions to `range` (the model's data range) by `clip`.
    pub fn new(inner: D, clip: X0Clip, range: [f64; 2]) -> Self {
        Clipped { inner, clip, range }
    }
}

impl<D: Denoiser> Denoiser for Clipped<D> {
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        let mut d = self.inner.denoise_rows(x, at)?;
        if self.clip != X0Clip::None {
            self.clip.apply(&mut d.x0, self.range);
            eps_from_x0(&mut d, x, at.levels);
        }
        Ok(d)
    }
}

/// Sets eps = (x - alpha x0) / sigma row by row, each row at its own level.
fn eps_from_x0(d: &mut Denoised, x: &Array4<f32>, levels: &[NoiseLevel]) {
    for (j, level) in levels.iter().enumerate() {
        let (a, s) = (level.alpha as f32, level.sigma as f32);
        Zip::from(d.eps.index_axis_mut(Axis(0), j))
            .and(x.index_axis(Axis(0), j))
            .and(d.x0.index_axis(Axis(0), j))
            .for_each(|e, &x, &x0| *e = (x - a * x0) / s);
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

    /// A denoiser that answers x0 = x and eps = 0 wherever it is asked.
    struct Identity;

    impl Denoiser for Identity {
        fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
            let _ = at;
            Ok(Denoised {
                x0: x.clone(),
                eps: Array4::zeros(x.raw_dim()),
            })
        }
    }

    #[test]
    fn clipping_keeps_x_consistent_with_x0_and_eps() {
        let x = Array4::from_shape_fn((2, 1, 1, 3), |(i, _, _, k)| (i + k) as f32 - 1.5);
        let levels = [
            NoiseLevel {
                t: 1.0,
                alpha: 0.6,
                sigma: 0.8,
            },
            NoiseLevel {
                t: 2.0,
                alpha: 0.8,
                sigma: 0.6,
            },
        ];
        let d = Clipped::new(Identity, X0Clip::Range, [-1.0, 1.0])
            .denoise_rows(
                &x,
                Rows {
                    index: &[],
                    levels: &levels,
                },
            )
            .unwrap();
        assert!(d.x0.iter().all(|v| (-1.0..=1.0).contains(v)));
        for (j, l) in levels.iter().enumerate() {
            for k in 0..3 {
                let back =
                    l.alpha as f32 * d.x0[[j, 0, 0, k]] + l.sigma as f32 * d.eps[[j, 0, 0, k]];
                assert!((back - x[[j, 0, 0, k]]).abs() < 1e-6);
            }
        }
        // Without clipping the answer passes through untouched.
        let d = Clipped::new(Identity, X0Clip::None, [-1.0, 1.0])
            .denoise_rows(
                &x,
                Rows {
                    index: &[],
                    levels: &levels,
                },
            )
            .unwrap();
        assert_eq!(d.x0, x);
        assert!(d.eps.iter().all(|&e| e == 0.0));
    }
}
