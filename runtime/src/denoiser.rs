//! The model adapter: turns whatever the network predicts into (x0, eps) at a noise level.
//! Samplers only ever see [`Denoiser`]; guidance ([`crate::guidance::Guided`]), x0 clipping
//! ([`crate::clip::Clipped`]) and inpainting wrap one, so [`ModelDenoiser`] is only the network
//! and the conversion of its output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::{concatenate, s, Array1, Array3, Array4, ArrayView3, ArrayView4, Axis, Zip};

use crate::error::{Error, Result};
use crate::guidance::guidance_embedding;
use crate::metadata::{Prediction, TimeInput};
use crate::model::Model;
use crate::schedule::NoiseLevel;

/// Re-exported so that `denoiser::X0Clip`, the path the sampling options and their callers
/// use, keeps naming the type that now lives with its wrapper in [`crate::clip`].
pub use crate::clip::X0Clip;

/// The denoiser's answer at one noise level: x_t = alpha x0 + sigma eps holds for the pair.
#[derive(Debug, Clone)]
pub struct Denoised {
    pub x0: Array4<f32>,
    pub eps: Array4<f32>,
}

/// One batch denoised under two conditionings (see [`Denoiser::denoise_pair`]).
#[derive(Debug, Clone)]
pub struct DenoisedPair {
    /// Under the batch's own conditioning (its class labels).
    pub cond: Denoised,
    /// Under the conditioning guidance steers away from (the null label).
    pub uncond: Denoised,
}

impl DenoisedPair {
    /// The pair of a denoiser with one conditioning only: both answers are the same.
    pub fn same(d: Denoised) -> DenoisedPair {
        DenoisedPair {
            cond: d.clone(),
            uncond: d,
        }
    }
}

/// Which rows of a batch a denoiser is asked about, each at its own noise level.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The rows' indices in the batch the denoiser was built for (empty: all rows, in order);
    /// for per-row conditioning and error messages.
    pub index: &'a [usize],
    /// Row j's noise level.
    pub levels: &'a [NoiseLevel],
}

/// D(x, t): what every sampler calls.
pub trait Denoiser {
    /// Predicts x0 and eps for the batch `x` at noise level `level` (never the clean level).
    fn denoise(&mut self, x: &Array4<f32>, level: &NoiseLevel) -> Result<Denoised> {
        self.denoise_rows(
            x,
            Rows {
                index: &[],
                levels: &vec![*level; x.shape()[0]],
            },
        )
    }

    /// Predicts x0 and eps for rows `rows` of the batch (all rows when empty), row j of `x`
    /// at its own level `levels[j]`: for solvers whose samples keep their own time.
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised>;

    /// [`Denoiser::denoise_rows`] under the batch's own conditioning and under the one guidance
    /// steers away from, for guidance to combine. [`ModelDenoiser`] answers both with one
    /// network call on a doubled batch (one call of twice the size is much cheaper than two on
    /// a GPU). The default is for denoisers with a single conditioning: they are their own
    /// unconditional model, so both answers are the same and guidance leaves them unchanged.
    /// A wrapper placed between guidance and the model must forward this method, or the
    /// default would silently drop the second conditioning.
    fn denoise_pair(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<DenoisedPair> {
        self.denoise_rows(x, at).map(DenoisedPair::same)
    }
}

/// A borrowed denoiser is one: wrappers can hold `&mut ModelDenoiser` and leave its owner free
/// to read its call count afterwards.
impl<D: Denoiser + ?Sized> Denoiser for &mut D {
    fn denoise(&mut self, x: &Array4<f32>, level: &NoiseLevel) -> Result<Denoised> {
        (**self).denoise(x, level)
    }

    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        (**self).denoise_rows(x, at)
    }

    fn denoise_pair(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<DenoisedPair> {
        (**self).denoise_pair(x, at)
    }
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

/// [`to_x0_eps`] for a batch whose row j sits at `levels[j]`; one pass when all agree.
fn to_x0_eps_rows(
    pred: Prediction,
    out: Array4<f32>,
    x: &Array4<f32>,
    levels: &[NoiseLevel],
) -> Denoised {
    if levels.windows(2).all(|w| w[0] == w[1]) {
        return to_x0_eps(pred, out, x, &levels[0]);
    }
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
}

/// The ONNX model as a denoiser: the network call and the conversion of its output, nothing
/// more (guidance and clipping wrap it).
pub struct ModelDenoiser<'m> {
    model: &'m mut Model,
    /// One label per sample of the batch, when the graph takes them.
    class_labels: Option<Vec<i64>>,
    /// The labels [`Denoiser::denoise_pair`] evaluates besides `class_labels`.
    uncond_labels: Option<Vec<i64>>,
    /// The text encoder's hidden states `[n, L, D]`, one row per sample, for text-conditioned
    /// U-Nets (the prompt's).
    context: Option<Array3<f32>>,
    /// The hidden states [`Denoiser::denoise_pair`] evaluates besides `context` (the negative
    /// prompt's).
    uncond_context: Option<Array3<f32>>,
    /// Channels `[n, k, H, W]` appended to each row's sample on the channel axis, one row per
    /// sample, under both conditionings: an inpainting U-Net's mask and masked image latents.
    channels: Option<Array4<f32>>,
    /// The `timestep_cond` row every call gets, for a network that takes one.
    timestep_cond: Option<Array1<f32>>,
    /// Global index of the batch's first sample, for error messages.
    first_sample: usize,
    calls: usize,
    cancel: Option<Arc<AtomicBool>>,
}

impl<'m> ModelDenoiser<'m> {
    /// Wraps `model`; `class_labels` (one per sample) are passed when the graph takes them.
    /// `first_sample` is the batch's first index in the whole run, for error messages. A
    /// network that takes the guidance scale (`timestep_cond`) gets scale 1, no guidance, until
    /// [`ModelDenoiser::with_guidance_embedding`] sets another.
    pub fn new(model: &'m mut Model, class_labels: Option<Vec<i64>>, first_sample: usize) -> Self {
        let timestep_cond = model
            .network
            .timestep_cond_dim
            .map(|d| guidance_embedding(1.0, d));
        ModelDenoiser {
            model,
            class_labels,
            uncond_labels: None,
            context: None,
            uncond_context: None,
            channels: None,
            timestep_cond,
            first_sample,
            calls: 0,
            cancel: None,
        }
    }

    /// The labels (one per sample) of the unconditional answer of
    /// [`Denoiser::denoise_pair`]: the model's null label, for classifier-free guidance.
    /// Without them a pair is the conditional answer twice.
    pub fn with_unconditional(mut self, labels: Option<Vec<i64>>) -> Self {
        self.uncond_labels = labels;
        self
    }

    /// The hidden states `[n, L, D]` (one row per sample) a text-conditioned U-Net gets, and
    /// those of the unconditional answer of [`Denoiser::denoise_pair`] (the negative prompt's,
    /// for classifier-free guidance); without `uncond` a pair is the conditional answer twice.
    pub fn with_text(mut self, cond: Array3<f32>, uncond: Option<Array3<f32>>) -> Self {
        self.context = Some(cond);
        self.uncond_context = uncond;
        self
    }

    /// Channels `[n, k, H, W]` (one row per sample) the network gets after the sample's on
    /// the channel axis, the same under both conditionings of [`Denoiser::denoise_pair`]: an
    /// inpainting U-Net's mask and masked image latents (diffusers'
    /// StableDiffusionInpaintPipeline's `cat([latents, mask, masked_image_latents], 1)`).
    pub fn with_channels(mut self, channels: Option<Array4<f32>>) -> Self {
        self.channels = channels;
        self
    }

    /// The guidance scale `w` a guidance-distilled network gets as its `timestep_cond`
    /// ([`guidance_embedding`]); nothing changes for a network without that input.
    pub fn with_guidance_embedding(mut self, w: f64) -> Self {
        if let Some(d) = self.model.network.timestep_cond_dim {
            self.timestep_cond = Some(guidance_embedding(w, d));
        }
        self
    }

    /// Stops with [`Error::Cancelled`] before the next network call once `flag` is set.
    pub fn with_cancel(mut self, flag: Option<Arc<AtomicBool>>) -> Self {
        self.cancel = flag;
        self
    }

    /// Network evaluations so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// What the network's `timestep` input gets for each row.
    fn network_times(&self, levels: &[NoiseLevel]) -> Vec<f64> {
        let time_input = self.model.metadata().time_input;
        levels
            .iter()
            .map(|l| match time_input {
                TimeInput::Index | TimeInput::Continuous => l.t,
                TimeInput::Sigma => l.sigma,
            })
            .collect()
    }

    /// One network call, counted; `channels` (rows matching `x`'s) are appended to `x`.
    fn run(
        &mut self,
        x: ArrayView4<f32>,
        times: &[f64],
        labels: Option<&[i64]>,
        context: Option<ArrayView3<f32>>,
        channels: Option<ArrayView4<f32>>,
    ) -> Result<Array4<f32>> {
        let cond = self.timestep_cond.as_ref().map(|c| c.view());
        let out = match channels {
            None => self.model.network.run(x, times, labels, context, cond)?,
            Some(ch) => {
                let input = concatenate(Axis(1), &[x, ch])
                    .map_err(|e| Error::invalid(format!("extra input channels: {e}")))?;
                self.model
                    .network
                    .run(input.view(), times, labels, context, cond)?
            }
        };
        self.calls += 1;
        Ok(out)
    }

    /// [`Error::NonFinite`] for the first row j where any of `outs` (answers for the same rows)
    /// is NaN or infinite: a broken network is reported, not sampled from.
    fn check_finite(&self, outs: &[&Array4<f32>], times: &[f64], rows: &[usize]) -> Result<()> {
        let n = times.len();
        let bad_row = |j: usize| {
            outs.iter()
                .any(|o| o.index_axis(Axis(0), j).iter().any(|v| !v.is_finite()))
        };
        match (0..n).find(|&j| bad_row(j)) {
            Some(bad) => Err(Error::NonFinite {
                step: self.calls,
                time: times[bad],
                sample: self.first_sample + rows.get(bad).copied().unwrap_or(bad),
            }),
            None => Ok(()),
        }
    }

    fn to_denoised(&self, out: Array4<f32>, x: &Array4<f32>, levels: &[NoiseLevel]) -> Denoised {
        to_x0_eps_rows(self.model.metadata().prediction, out, x, levels)
    }
}

/// The rows `rows` of `all` (all of them when `rows` is empty).
fn pick_rows<D: ndarray::RemoveAxis>(
    all: &Option<ndarray::Array<f32, D>>,
    rows: &[usize],
) -> Option<ndarray::Array<f32, D>> {
    all.as_ref().map(|all| {
        if rows.is_empty() {
            all.clone()
        } else {
            all.select(Axis(0), rows)
        }
    })
}

/// The entries of `all` at `rows` (all of them when `rows` is empty).
fn pick(all: &Option<Vec<i64>>, rows: &[usize]) -> Option<Vec<i64>> {
    all.as_ref().map(|all| {
        if rows.is_empty() {
            all.clone()
        } else {
            rows.iter().map(|&r| all[r]).collect()
        }
    })
}

impl Denoiser for ModelDenoiser<'_> {
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        let Rows {
            index: rows,
            levels,
        } = at;
        self.check_cancel()?;
        let times = self.network_times(levels);
        let labels = pick(&self.class_labels, rows);
        let context = pick_rows(&self.context, rows);
        let channels = pick_rows(&self.channels, rows);
        let out = self.run(
            x.view(),
            &times,
            labels.as_deref(),
            context.as_ref().map(|c| c.view()),
            channels.as_ref().map(|c| c.view()),
        )?;
        self.check_finite(&[&out], &times, rows)?;
        Ok(self.to_denoised(out, x, levels))
    }

    fn denoise_pair(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<DenoisedPair> {
        let Rows {
            index: rows,
            levels,
        } = at;
        // Labels for class-conditional graphs, hidden states for text-conditioned ones.
        let labels2: Option<Vec<i64>>;
        let context2: Option<Array3<f32>>;
        match (
            pick(&self.class_labels, rows),
            pick(&self.uncond_labels, rows),
            pick_rows(&self.context, rows),
            pick_rows(&self.uncond_context, rows),
        ) {
            (Some(cond), Some(uncond), _, _) => {
                labels2 = Some(cond.into_iter().chain(uncond).collect());
                context2 = None;
            }
            (_, _, Some(cond), Some(uncond)) => {
                labels2 = None;
                // diffusers puts the negative prompt first; the order changes nothing but
                // which half is which, so ours keeps the conditional half first, as for labels.
                context2 = Some(
                    concatenate(Axis(0), &[cond.view(), uncond.view()])
                        .map_err(|e| Error::invalid(e.to_string()))?,
                );
            }
            _ => return self.denoise_rows(x, at).map(DenoisedPair::same),
        }
        self.check_cancel()?;
        let n = x.shape()[0];
        let times = self.network_times(levels);
        // The batch twice, first under its own conditioning, then under the unconditional one.
        let both = concatenate(Axis(0), &[x.view(), x.view()])
            .map_err(|e| Error::invalid(e.to_string()))?;
        let times2: Vec<f64> = times.iter().chain(&times).copied().collect();
        let channels2 = match pick_rows(&self.channels, rows) {
            Some(ch) => Some(
                concatenate(Axis(0), &[ch.view(), ch.view()])
                    .map_err(|e| Error::invalid(e.to_string()))?,
            ),
            None => None,
        };
        let out = self.run(
            both.view(),
            &times2,
            labels2.as_deref(),
            context2.as_ref().map(|c| c.view()),
            channels2.as_ref().map(|c| c.view()),
        )?;
        let (c, u) = out.view().split_at(Axis(0), n);
        let (c, u) = (c.to_owned(), u.to_owned());
        self.check_finite(&[&c, &u], &times, rows)?;
        Ok(DenoisedPair {
            cond: self.to_denoised(c, x, levels),
            uncond: self.to_denoised(u, x, levels),
        })
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
