//! DDPM ancestral sampling (Ho, Jain & Abbeel 2020): draw x_s from the true posterior
//! q(x_s | x_t, x0 = D(x_t)), whose mean is
//! (alpha_{t|s} sigma_s² / sigma_t²) x_t + (alpha_s sigma_{t|s}² / sigma_t²) x0
//! and whose variance is sigma_{t|s}² sigma_s² / sigma_t² ("fixed small", beta-tilde).
//! With skipped steps the same formulas hold between the visited levels.

use ndarray::Array4;

use super::{combine, posterior_variance, Progress, Trajectory};
use crate::error::Result;

/// Runs DDPM over `levels` (most noisy first, clean last).
pub fn ddpm(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let total = tr.steps();
    for i in 0..total {
        let (cur, next) = (&tr.levels[i], &tr.levels[i + 1]);
        let d = tr.den.denoise(&x, cur)?;
        let a_ts = cur.alpha / next.alpha;
        let s2_ts = cur.sigma.powi(2) - a_ts.powi(2) * next.sigma.powi(2);
        let c_xt = a_ts * next.sigma.powi(2) / cur.sigma.powi(2);
        let c_x0 = next.alpha * s2_ts / cur.sigma.powi(2);
        let var = posterior_variance(cur, next);
        x = if var > 0.0 {
            let z = tr.noise.step(i)?;
            combine(c_xt, &x, c_x0, &d.x0, var.sqrt(), Some(&z))
        } else {
            combine(c_xt, &x, c_x0, &d.x0, 0.0, None)
        };
        progress(i + 1, total);
    }
    Ok(x)
}
