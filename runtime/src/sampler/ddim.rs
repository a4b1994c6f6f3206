//! DDIM (Song, Meng & Ermon 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s² - s²) eps + s z,
//! with s² = eta² times the DDPM posterior variance.

use ndarray::Array4;

use super::ops::posterior_variance;
use super::{SamplerDef, SamplerOption, Step, Stochastic, Trajectory};
use crate::error::Result;

/// One DDIM step with stochasticity `eta`. It is written with x0 (not as a transfer of x)
/// because a clipped or thresholded x0 is no longer (x - sigma eps) / alpha.
fn step(tr: &mut Trajectory<'_>, s: Step<'_>, eta: f64) -> Result<Array4<f32>> {
    let sd = eta * posterior_variance(&s.cur, &s.next).sqrt();
    let dir = (s.next.sigma.powi(2) - sd * sd).max(0.0).sqrt();
    let terms = [(s.next.alpha, &s.d.x0), (dir, &s.d.eps)];
    tr.lincomb_with_noise(s.i, &terms, (sd > 0.0).then_some(sd))
}

pub static DDIM: SamplerDef = SamplerDef::new("ddim", "1", "1")
    .final_alpha()
    .summary("DDIM; --eta in [0, 1] adds DDPM-like noise (Song et al. 2021)")
    .options(&[SamplerOption::Eta(0.0)])
    .stochastic(Stochastic::WithEta)
    .run(|o, tr, x, progress| tr.walk(x, progress, |tr, s| step(tr, s, o.eta)));
