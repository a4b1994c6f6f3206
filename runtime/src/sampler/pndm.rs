//! PNDM's pseudo linear multistep sampler, PLMS (Liu et al. 2022), in the variant diffusers
//! runs with `skip_prk_steps` (after crowsonkb's PLMS): the transfer is the DDIM step with an
//! eps that is a linear-multistep combination of past eps values (Adams–Bashforth weights up to
//! order 4); the first step is a two-call Heun-like step. n + 1 calls for n >= 2 steps.

use std::collections::VecDeque;

use ndarray::Array4;

use super::{combine, Progress, Trajectory};
use crate::error::Result;
use crate::schedule::NoiseLevel;

/// The DDIM transfer x_t -> x_s with a given eps (PNDM's phi).
fn transfer(
    x: &Array4<f32>,
    eps: &Array4<f32>,
    cur: &NoiseLevel,
    next: &NoiseLevel,
) -> Array4<f32> {
    combine(
        next.alpha / cur.alpha,
        x,
        next.sigma - next.alpha * cur.sbar(),
        eps,
        0.0,
        None,
    )
}

/// Runs PLMS over the trajectory's levels.
pub fn pndm(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    let lv = tr.levels;
    let mut ets: VecDeque<Array4<f32>> = VecDeque::with_capacity(4);
    for i in 0..n {
        let (cur, next) = (&lv[i], &lv[i + 1]);
        let e = tr.den.denoise(&x, cur)?.eps;
        ets.push_front(e);
        ets.truncate(4);
        let eps = match ets.len() {
            1 if n > 1 => {
                // Heun-like start: average eps here and at the Euler-predicted next point.
                let guess = transfer(&x, &ets[0], cur, next);
                let e_next = tr.den.denoise(&guess, next)?.eps;
                combine(0.5, &ets[0], 0.5, &e_next, 0.0, None)
            }
            1 => ets[0].clone(),
            2 => combine(1.5, &ets[0], -0.5, &ets[1], 0.0, None),
            3 => {
                let t = combine(23.0 / 12.0, &ets[0], -16.0 / 12.0, &ets[1], 0.0, None);
                combine(1.0, &t, 5.0 / 12.0, &ets[2], 0.0, None)
            }
            _ => {
                let t = combine(55.0 / 24.0, &ets[0], -59.0 / 24.0, &ets[1], 0.0, None);
                combine(1.0, &t, 37.0 / 24.0, &ets[2], -9.0 / 24.0, Some(&ets[3]))
            }
        };
        x = transfer(&x, &eps, cur, next);
        progress(i + 1, n);
    }
    Ok(x)
}
