//! DDPM ancestral sampling (Ho, Jain & Abbeel 2020): draw x_s from the true posterior
//! q(x_s | x_t, x0 = D(x_t)), whose mean is
//! (alpha_{t|s} sigma_s² / sigma_t²) x_t + (alpha_s sigma_{t|s}² / sigma_t²) x0
//! and whose variance is sigma_{t|s}² sigma_s² / sigma_t² ("fixed small", beta-tilde).
//! With skipped steps the same formulas hold between the visited levels.

use ndarray::Array4;

use super::ops::posterior_variance;
use super::{SamplerDef, Step, Stochastic, Trajectory};
use crate::error::Result;

/// One draw from the posterior; the last step (variance 0) is its mean, x0.
fn step(tr: &mut Trajectory<'_>, s: Step<'_>) -> Result<Array4<f32>> {
    let (cur, next) = (&s.cur, &s.next);
    let a_ts = cur.alpha / next.alpha;
    let s2_ts = cur.sigma.powi(2) - a_ts.powi(2) * next.sigma.powi(2);
    let c_xt = a_ts * next.sigma.powi(2) / cur.sigma.powi(2);
    let c_x0 = next.alpha * s2_ts / cur.sigma.powi(2);
    let var = posterior_variance(cur, next);
    let mean = [(c_xt, s.x), (c_x0, &s.d.x0)];
    tr.lincomb_with_noise(s.i, &mean, (var > 0.0).then(|| var.sqrt()))
}

pub static DDPM: SamplerDef = SamplerDef::new("ddpm", "1", "1")
    .summary("DDPM ancestral sampling from the true posterior (Ho et al. 2020)")
    .stochastic(Stochastic::Always)
    .run(|_, tr, x, progress| tr.walk(x, progress, step));
