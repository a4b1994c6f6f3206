//! Euler on the probability-flow ODE in k-diffusion's variables (Karras et al. 2022):
//! with xbar = x / alpha and sbar = sigma / alpha, d xbar / d sbar = eps. One call per step.
//! At the same levels this equals DDIM with eta = 0 (Song et al. 2021, eq. 14).

use ndarray::Array4;

use super::{Progress, Trajectory};
use crate::error::Result;
use crate::schedule::NoiseLevel;

/// x_next = alpha_next (x / alpha + (sbar_next - sbar) eps): one Euler step in xbar.
pub(crate) fn euler_step(
    x: &Array4<f32>,
    eps: &Array4<f32>,
    cur: &NoiseLevel,
    next: &NoiseLevel,
) -> Array4<f32> {
    super::combine(
        next.alpha / cur.alpha,
        x,
        next.alpha * (next.sbar() - cur.sbar()),
        eps,
        0.0,
        None,
    )
}

/// Runs Euler over the trajectory's levels.
pub fn euler(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    for i in 0..n {
        let (cur, next) = (tr.levels[i], tr.levels[i + 1]);
        let d = tr.den.denoise(&x, &cur)?;
        // x_next = alpha_next (x / alpha + (sbar_next - sbar) eps)
        x = super::combine(
            next.alpha / cur.alpha,
            &x,
            next.alpha * (next.sbar() - cur.sbar()),
            &d.eps,
            0.0,
            None,
        );
        progress(i + 1, n);
    }
    Ok(x)
}
