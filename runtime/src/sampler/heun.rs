//! Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1
//! without churn), in xbar = x / alpha against sbar = sigma / alpha. Two calls per step, one on
//! the last step (an Euler step to sbar = 0).

use ndarray::Array4;

use super::ops::{lincomb, transfer};
use super::{SamplerDef, Step, Trajectory};
use crate::error::Result;

/// An Euler predictor, then the transfer along the mean of both ends' slopes.
pub(crate) fn step(tr: &mut Trajectory<'_>, s: Step<'_>) -> Result<Array4<f32>> {
    let euler = transfer(s.x, &s.d.eps, &s.cur, &s.next);
    if s.next.is_clean() {
        return Ok(euler);
    }
    let d2 = tr.den.denoise(&euler, &s.next)?.eps;
    let mean = lincomb(&[(0.5, &s.d.eps), (0.5, &d2)]);
    Ok(transfer(s.x, &mean, &s.cur, &s.next))
}

pub static HEUN: SamplerDef = SamplerDef::new("heun", "2", "2 (1 on the last step)")
    .summary("Heun on the probability-flow ODE (Karras et al. 2022, Alg. 1)")
    .run(|_, tr, x, progress| tr.walk(x, progress, step));
