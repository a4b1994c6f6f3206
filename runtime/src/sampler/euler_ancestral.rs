//! Euler ancestral (k-diffusion `sample_euler_ancestral`): an Euler step down to sigma_down,
//! then fresh noise back up to the next level, sigma_up² + sigma_down² = sbar_next², with
//! sigma_up = eta sqrt(sbar_next² (sbar² - sbar_next²) / sbar²). Works in xbar = x / alpha.

use ndarray::Array4;

use super::ops::transfer_coefficients;
use super::{SamplerDef, SamplerOption, Step, Stochastic, Trajectory};
use crate::error::Result;
use crate::schedule::NoiseLevel;

/// One step with stochasticity `eta` (1 = full ancestral noise).
fn step(tr: &mut Trajectory<'_>, s: Step<'_>, eta: f64) -> Result<Array4<f32>> {
    let (sb, sb_next) = (s.cur.sbar(), s.next.sbar());
    let up = (eta
        * (sb_next * sb_next * (sb * sb - sb_next * sb_next) / (sb * sb))
            .max(0.0)
            .sqrt())
    .min(sb_next);
    let down = (sb_next * sb_next - up * up).max(0.0).sqrt();
    // The Euler step goes to the level with sbar = down at the next level's alpha; the noise
    // then adds alpha_next up z.
    let a = s.next.alpha;
    let to = NoiseLevel {
        sigma: a * down,
        ..s.next
    };
    let (c_x, c_eps) = transfer_coefficients(&s.cur, &to);
    let terms = [(c_x, s.x), (c_eps, &s.d.eps)];
    tr.lincomb_with_noise(s.i, &terms, (up > 0.0).then_some(a * up))
}

pub static EULER_ANCESTRAL: SamplerDef = SamplerDef::new("euler-a", "1", "1")
    .summary("Euler ancestral (k-diffusion); --eta scales the noise")
    .options(&[SamplerOption::Eta(1.0)])
    .stochastic(Stochastic::WithEta)
    .run(|o, tr, x, progress| tr.walk(x, progress, |tr, s| step(tr, s, o.eta)));
