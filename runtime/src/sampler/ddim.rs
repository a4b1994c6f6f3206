//! DDIM (Song, Meng & Ermon 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s² - s²) eps + s z,
//! with s² = eta² times the DDPM posterior variance.

use ndarray::Array4;

use super::{combine, posterior_variance, Progress, Trajectory};
use crate::error::Result;

/// Runs DDIM over `levels` (most noisy first, clean last).
pub fn ddim(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    eta: f64,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let total = tr.steps();
    for i in 0..total {
        let (cur, next) = (&tr.levels[i], &tr.levels[i + 1]);
        let d = tr.den.denoise(&x, cur)?;
        let s = eta * posterior_variance(cur, next).sqrt();
        let dir = (next.sigma.powi(2) - s * s).max(0.0).sqrt();
        x = if s > 0.0 {
            let z = tr.noise.step(i)?;
            combine(next.alpha, &d.x0, dir, &d.eps, s, Some(&z))
        } else {
            combine(next.alpha, &d.x0, dir, &d.eps, 0.0, None)
        };
        progress(i + 1, total);
    }
    Ok(x)
}
