//! Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
//! eq. 14), as diffusers' TCDScheduler: from level t the model's (x0, eps) are carried by the
//! DDIM transfer to the intermediate level s = (1 - gamma) t_next (floored to a training index
//! on discrete schedules), then noised forward from s to the next level,
//! x_next = (alpha_next / alpha_s) x_s + sqrt(1 - (alpha_next / alpha_s)²) z.
//! gamma 0 is DDIM; gamma 1 is LCM's fresh noise at every step. On a discrete schedule the last
//! step ends at training index 0, where diffusers' does (it takes 0 for the time after the
//! last), not at clean data.

use ndarray::Array4;

use super::{SamplerDef, SamplerOption, Step, Stochastic, Trajectory};
use crate::error::Result;
use crate::schedule::NoiseLevel;

/// The intermediate level s of a step to `next` with `gamma`: `next` itself at gamma 0.
fn intermediate(tr: &Trajectory<'_>, next: &NoiseLevel, gamma: f64) -> NoiseLevel {
    let discrete = tr.schedule.num_train_timesteps().is_some();
    match (next.is_clean(), discrete) {
        // diffusers takes index 0 for the time after the last step.
        (true, true) => tr.schedule.level(0.0),
        (true, false) => *next,
        (false, _) if gamma == 0.0 => *next,
        // floor((1 - gamma) t) in float32, as torch multiplies the integer time step by the
        // Python float: in f64 the floor differs for 677 of the 101 x 1000 (gamma, t) pairs
        // on a 0.01 grid (0.07 and 500: 464 in f64, 465 in torch).
        (false, true) => tr
            .schedule
            .level(((1.0 - gamma) as f32 * next.t as f32).floor() as f64),
        (false, false) => tr.schedule.level((1.0 - gamma) * next.t),
    }
}

/// One step with stochasticity `gamma`.
fn step(tr: &mut Trajectory<'_>, s: Step<'_>, gamma: f64) -> Result<Array4<f32>> {
    let mid = intermediate(tr, &s.next, gamma);
    let to_mid = [(mid.alpha, &s.d.x0), (mid.sigma, &s.d.eps)];
    if s.next.is_clean() || mid == s.next {
        return tr.lincomb_with_noise(s.i, &to_mid, None);
    }
    // Forward from s to the next level: both VP, so the added variance is 1 - ratio².
    let ratio = s.next.alpha / mid.alpha;
    let terms = to_mid.map(|(c, a)| (ratio * c, a));
    let sd = (1.0 - ratio * ratio).max(0.0).sqrt();
    tr.lincomb_with_noise(s.i, &terms, Some(sd))
}

pub static TCD: SamplerDef = SamplerDef::new("tcd", "consistency", "1")
    .summary("trajectory consistency distillation's sampler; --gamma in [0, 1] (Zheng et al. 2024)")
    .options(&[SamplerOption::Gamma(0.3)])
    .stochastic(Stochastic::WithGamma)
    .consistency_grid()
    .run(|o, tr, x, progress| tr.walk(x, progress, |tr, s| step(tr, s, o.gamma)));
