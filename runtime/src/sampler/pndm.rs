//! PNDM's pseudo linear multistep sampler, PLMS (Liu et al. 2022), in the variant diffusers
//! runs with `skip_prk_steps` (after crowsonkb's PLMS): the transfer is the DDIM step with an
//! eps that is a linear-multistep combination of past eps values (Adams–Bashforth weights up to
//! order 4); the first step is a two-call Heun-like step. n + 1 calls for n >= 2 steps.

use std::collections::VecDeque;

use ndarray::Array4;

use super::ops::{lincomb, transfer};
use super::{SamplerDef, Step, Trajectory};
use crate::error::Result;

/// One PLMS step; `ets` holds the last four eps values, most recent first.
fn step(
    tr: &mut Trajectory<'_>,
    s: Step<'_>,
    ets: &mut VecDeque<Array4<f32>>,
) -> Result<Array4<f32>> {
    ets.push_front(s.d.eps);
    ets.truncate(4);
    // The weighted sums are rounded to f32 in two stages, as PLMS has always been computed
    // here; one lincomb would move results by an ulp.
    let eps = match ets.len() {
        1 if s.n > 1 => {
            // Heun-like start: average eps here and at the Euler-predicted next point.
            let guess = transfer(s.x, &ets[0], &s.cur, &s.next);
            let e_next = tr.den.denoise(&guess, &s.next)?.eps;
            lincomb(&[(0.5, &ets[0]), (0.5, &e_next)])
        }
        1 => ets[0].clone(),
        2 => lincomb(&[(1.5, &ets[0]), (-0.5, &ets[1])]),
        3 => {
            let t = lincomb(&[(23.0 / 12.0, &ets[0]), (-16.0 / 12.0, &ets[1])]);
            lincomb(&[(1.0, &t), (5.0 / 12.0, &ets[2])])
        }
        _ => {
            let t = lincomb(&[(55.0 / 24.0, &ets[0]), (-59.0 / 24.0, &ets[1])]);
            lincomb(&[(1.0, &t), (37.0 / 24.0, &ets[2]), (-9.0 / 24.0, &ets[3])])
        }
    };
    Ok(transfer(s.x, &eps, &s.cur, &s.next))
}

pub static PNDM: SamplerDef = SamplerDef::new("pndm", "4 (pseudo)", "1 (2 on the first step)")
    .final_alpha()
    .summary("PNDM's PLMS: Adams-Bashforth on eps through the DDIM transfer (Liu et al. 2022)")
    .run(|_, tr, x, progress| {
        let mut ets = VecDeque::with_capacity(4);
        tr.walk(x, progress, |tr, s| step(tr, s, &mut ets))
    });
