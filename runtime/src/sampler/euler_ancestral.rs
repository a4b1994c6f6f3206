//! Euler ancestral (k-diffusion `sample_euler_ancestral`): an Euler step down to sigma_down,
//! then fresh noise back up to the next level, sigma_up² + sigma_down² = sbar_next², with
//! sigma_up = eta sqrt(sbar_next² (sbar² - sbar_next²) / sbar²). Works in xbar = x / alpha.

use ndarray::Array4;

use super::{combine, Progress, Trajectory};
use crate::error::Result;

/// Runs Euler ancestral with stochasticity `eta` (1 = full ancestral noise).
pub fn euler_ancestral(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    eta: f64,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    for i in 0..n {
        let (cur, next) = (tr.levels[i], tr.levels[i + 1]);
        let (s, s_next) = (cur.sbar(), next.sbar());
        let up = (eta
            * (s_next * s_next * (s * s - s_next * s_next) / (s * s))
                .max(0.0)
                .sqrt())
        .min(s_next);
        let down = (s_next * s_next - up * up).max(0.0).sqrt();
        let d = tr.den.denoise(&x, &cur)?.eps;
        // In xbar: xbar_next = xbar + (down - s) eps + up z; then x_next = alpha_next xbar_next.
        x = if up > 0.0 {
            let z = tr.noise.step(i)?;
            let a = next.alpha;
            combine(a / cur.alpha, &x, a * (down - s), &d, a * up, Some(&z))
        } else {
            combine(
                next.alpha / cur.alpha,
                &x,
                next.alpha * (down - s),
                &d,
                0.0,
                None,
            )
        };
        progress(i + 1, n);
    }
    Ok(x)
}
