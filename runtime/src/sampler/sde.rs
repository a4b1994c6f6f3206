//! Reverse-time SDE samplers (Song et al. 2021) on any VP or VE schedule, written with the
//! levels' alpha and sigma only. Over a step from level a to level b (dt < 0):
//!   f dt   = log alpha_b - log alpha_a                  (drift coefficient, integrated)
//!   g² dt  = sigma_b² - sigma_a² - 2 f dt sigma_a²       (diffusion, integrated; negative)
//! and the reverse SDE dx = [f x - g² score] dt + g dW with score = -eps / sigma.
//! On VE this is exactly the paper's reverse-diffusion predictor. The step to sigma = 0
//! is a final denoise, x = D(x) (Tweedie), since the score is undefined there.

use ndarray::Array4;

use super::ops::lincomb;
use super::{SamplerDef, SamplerOption, Step, Stochastic, Trajectory};
use crate::denoiser::Denoised;
use crate::error::Result;
use crate::schedule::NoiseLevel;

/// (f dt, g² dt) for the step a -> b.
fn coefficients(a: &NoiseLevel, b: &NoiseLevel) -> (f64, f64) {
    let f_dt = (b.alpha / a.alpha).ln();
    (
        f_dt,
        b.sigma.powi(2) - a.sigma.powi(2) - 2.0 * f_dt * a.sigma.powi(2),
    )
}

/// Drift times dt of the reverse SDE at (x, eps) evaluated at `at` over the step a -> b.
fn drift(
    x: &Array4<f32>,
    eps: &Array4<f32>,
    at: &NoiseLevel,
    f_dt: f64,
    g2_dt: f64,
) -> Array4<f32> {
    lincomb(&[(f_dt, x), (g2_dt / at.sigma, eps)])
}

/// One Euler–Maruyama step from `cur` (where the denoiser answered `d` for `x`) with noise
/// stream index `noise_index`, or the final denoise when `next` is clean.
fn em_step(
    tr: &mut Trajectory<'_>,
    x: &Array4<f32>,
    d: Denoised,
    cur: &NoiseLevel,
    next: &NoiseLevel,
    noise_index: usize,
) -> Result<Array4<f32>> {
    if next.is_clean() {
        return Ok(d.x0);
    }
    let (f_dt, g2_dt) = coefficients(cur, next);
    let dr = drift(x, &d.eps, cur, f_dt, g2_dt);
    let g = (-g2_dt).max(0.0).sqrt();
    tr.lincomb_with_noise(noise_index, &[(1.0, x), (1.0, &dr)], Some(g))
}

/// Stochastic Heun (improved Euler) on the reverse SDE: an Euler–Maruyama predictor, then the
/// drift averaged over both ends with the same noise increment (the noise is additive, so this
/// keeps strong order 1 and gains accuracy in the drift). Two calls per step, one on the last.
fn sde_heun_step(tr: &mut Trajectory<'_>, s: Step<'_>) -> Result<Array4<f32>> {
    if s.next.is_clean() {
        return Ok(s.d.x0);
    }
    let (f_dt, g2_dt) = coefficients(&s.cur, &s.next);
    let z = tr.noise.step(s.i)?;
    let g = (-g2_dt).max(0.0).sqrt();
    let d1 = drift(s.x, &s.d.eps, &s.cur, f_dt, g2_dt);
    let pred = lincomb(&[(1.0, s.x), (1.0, &d1), (g, &z)]);
    let e2 = tr.den.denoise(&pred, &s.next)?.eps;
    let d2 = drift(&pred, &e2, &s.next, f_dt, g2_dt);
    Ok(lincomb(&[(1.0, s.x), (0.5, &d1), (0.5, &d2), (g, &z)]))
}

/// Predictor–corrector (Song et al. 2021, Algorithms 2 and 3): at each level one Langevin
/// corrector step with signal-to-noise ratio `snr`, then the Euler–Maruyama predictor.
/// Step size 2 r (snr |z| / |score|)² per sample, with r = (alpha_a / alpha_b)² (1 - beta on
/// a VP grid, 1 on VE). Two calls per step, one on the last (corrector, then denoise).
fn pc_step(tr: &mut Trajectory<'_>, s: Step<'_>, snr: f64) -> Result<Array4<f32>> {
    let (cur, next) = (s.cur, s.next);
    // Corrector: Langevin dynamics at the current level.
    let z = tr.noise.step(2 * s.i)?;
    let r = if next.is_clean() {
        1.0
    } else {
        (cur.alpha / next.alpha).powi(2).min(1.0)
    };
    let mut out = s.x.clone();
    for ((mut o, e), zz) in out
        .outer_iter_mut()
        .zip(s.d.eps.outer_iter())
        .zip(z.outer_iter())
    {
        // score = -eps / sigma
        let score_norm = e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() / cur.sigma;
        let z_norm = zz.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let step = 2.0 * r * (snr * z_norm / score_norm.max(1e-12)).powi(2);
        let (a, b) = ((-step / cur.sigma) as f32, ((2.0 * step).sqrt()) as f32);
        o.iter_mut()
            .zip(e.iter())
            .zip(zz.iter())
            .for_each(|((o, e), z)| *o += a * e + b * z);
    }
    // Predictor: reverse-diffusion (Euler–Maruyama) step, or the final denoise.
    let d = tr.den.denoise(&out, &cur)?;
    em_step(tr, &out, d, &cur, &next, 2 * s.i + 1)
}

pub static EULER_MARUYAMA: SamplerDef =
    SamplerDef::new("euler-maruyama", "1 (weak), 0.5 (strong)", "1")
        .summary("Euler-Maruyama on the reverse SDE, VP or VE, final denoise (Song et al. 2021)")
        .stochastic(Stochastic::Always)
        .run(|_, tr, x, progress| {
            tr.walk(x, progress, |tr, s| {
                em_step(tr, s.x, s.d, &s.cur, &s.next, s.i)
            })
        });

pub static SDE_HEUN: SamplerDef = SamplerDef::new(
    "sde-heun",
    "1 (strong, additive noise)",
    "2 (1 on the last step)",
)
.summary("stochastic Heun on the reverse SDE, same noise for both stages")
.stochastic(Stochastic::Always)
.run(|_, tr, x, progress| tr.walk(x, progress, sde_heun_step));

pub static PREDICTOR_CORRECTOR: SamplerDef = SamplerDef::new("pc", "1", "2")
    .summary("predictor-corrector: Langevin corrector (--snr, default 0.16) + reverse-diffusion predictor")
    .options(&[SamplerOption::Snr(0.16)])
    .stochastic(Stochastic::Always)
    .run(|o, tr, x, progress| tr.walk(x, progress, |tr, s| pc_step(tr, s, o.snr)));
