//! DDIM (Song, Meng & Ermon 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s² - s²) eps + s z,
//! with s² = eta² times the DDPM posterior variance.

use ndarray::Array4;

use super::{combine, posterior_variance, Progress};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::noise::NoiseSource;
use crate::schedule::NoiseLevel;

/// Runs DDIM over `levels` (most noisy first, clean last).
pub fn ddim(
    den: &mut dyn Denoiser,
    mut x: Array4<f32>,
    levels: &[NoiseLevel],
    eta: f64,
    noise: &mut dyn NoiseSource,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let total = levels.len() - 1;
    for (i, pair) in levels.windows(2).enumerate() {
        let (cur, next) = (&pair[0], &pair[1]);
        let d = den.denoise(&x, cur)?;
        let s = eta * posterior_variance(cur, next).sqrt();
        let dir = (next.sigma.powi(2) - s * s).max(0.0).sqrt();
        x = if s > 0.0 {
            let z = noise.step(i)?;
            combine(next.alpha, &d.x0, dir, &d.eps, s, Some(&z))
        } else {
            combine(next.alpha, &d.x0, dir, &d.eps, 0.0, None)
        };
        progress(i + 1, total);
    }
    Ok(x)
}
