//! The pilot batch through the model, with the batching, labels and guidance sampling uses:
//! the teacher run with its trajectory kept, and the predictions of one fitted step.

use ndarray::{s, Array4};

use super::teacher::Teacher;
use crate::error::Result;
use crate::generate::{prepare, run_batches, BatchPlan, SampleBatch, SampleOptions};
use crate::model::Model;
use crate::sampler::heun;
use crate::schedule::NoiseLevel;

/// Runs `sample` on every batch of the `base.n` pilot samples over `levels`, and returns the
/// batches' outputs as one `[pilot, C, H, W]` array.
#[allow(clippy::single_range_in_vec_init)] // one range of samples: all of them
fn over_pilot(
    model: &mut Model,
    base: &SampleOptions,
    label: Option<i64>,
    levels: &[NoiseLevel],
    sample: &mut SampleBatch<'_>,
) -> Result<Array4<f32>> {
    let [c, h, w] = model.metadata().sample_shape;
    let mut out = Array4::<f32>::zeros((base.n, c, h, w));
    let plan = BatchPlan {
        label,
        levels,
        steps_per_batch: levels.len() - 1,
        injected: None,
        channels: None,
    };
    let mut sink = |first: usize, x: Array4<f32>| {
        out.slice_mut(s![first..first + x.shape()[0], .., .., ..])
            .assign(&x);
        Ok(())
    };
    run_batches(
        model,
        base,
        &plan,
        &[0..base.n],
        &mut |_, _| {},
        &mut sink,
        sample,
    )?;
    Ok(out)
}

/// The teacher run (`base`: Heun on its log-SNR levels) with its state and slope kept at every
/// level, for targets between them ([`Teacher::at`]). Memory: two pilot-sized arrays per level.
pub(super) fn record_teacher(model: &mut Model, base: &SampleOptions) -> Result<Teacher> {
    let (label, lv) = prepare(model, base, None)?;
    let [c, h, w] = model.metadata().sample_shape;
    let knots = lv.len() - 1;
    let zeros = || Array4::<f32>::zeros((base.n, c, h, w));
    let (mut xs, mut eps) = (vec![zeros(); knots], vec![zeros(); knots]);
    let out = over_pilot(model, base, label, &lv, &mut |b, x, _| {
        let rows = s![b.first..b.first + b.len, .., .., ..];
        let mut tr = b.trajectory(None);
        // The walk hands each step the state and the denoiser's answer there: Heun's first call.
        let x = tr.walk(x, &mut |_, _| {}, |tr, st| {
            xs[st.i].slice_mut(rows).assign(st.x);
            eps[st.i].slice_mut(rows).assign(&st.d.eps);
            heun::step(tr, st)
        })?;
        Ok((x, None))
    })?;
    Ok(Teacher {
        levels: lv[..knots].to_vec(),
        x: xs,
        eps,
        out,
    })
}

/// The model's x0 predictions for the pilot's samples `x` at `level`: the calls of one fitted
/// step.
pub(super) fn pilot_x0(
    model: &mut Model,
    base: &SampleOptions,
    label: Option<i64>,
    x: &Array4<f32>,
    level: &NoiseLevel,
) -> Result<Array4<f32>> {
    over_pilot(
        model,
        base,
        label,
        &[*level, NoiseLevel::CLEAN],
        &mut |b, _, _| {
            let rows = x.slice(s![b.first..b.first + b.len, .., .., ..]).to_owned();
            Ok((b.den.denoise(&rows, level)?.x0, None))
        },
    )
}
