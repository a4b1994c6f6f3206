//! Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1
//! without churn), in xbar = x / alpha against sbar = sigma / alpha. Two calls per step, one on
//! the last step (an Euler step to sbar = 0).

use ndarray::Array4;

use super::euler::euler_step;
use super::{combine, Progress, Trajectory};
use crate::error::Result;

/// Runs Heun over the trajectory's levels.
pub fn heun(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    for i in 0..n {
        let (cur, next) = (tr.levels[i], tr.levels[i + 1]);
        let h = next.sbar() - cur.sbar();
        let d = tr.den.denoise(&x, &cur)?.eps;
        let euler = euler_step(&x, &d, &cur, &next);
        x = if next.is_clean() {
            euler
        } else {
            let d2 = tr.den.denoise(&euler, &next)?.eps;
            let mean = combine(0.5, &d, 0.5, &d2, 0.0, None);
            combine(next.alpha / cur.alpha, &x, next.alpha * h, &mean, 0.0, None)
        };
        progress(i + 1, n);
    }
    Ok(x)
}
