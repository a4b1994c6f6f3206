//! Error-controlled probability-flow ODE solvers: the Bogacki–Shampine 3(2) embedded Runge–Kutta
//! pair in u = log(sigma/alpha), where the ODE d xbar / du = sbar eps(alpha xbar, sbar) is
//! smooth, from the first level down to the last noisy one, then a final denoise.
//!
//! A step is accepted when the scaled error norm (RMS over a sample's elements of
//! err / (atol + rtol max(|x|, |x_new|))) is at most 1, and the next step is h (0.9 / norm)^(1/3),
//! kept within [0.2, 5] times the last (Hairer et al., II.4). Two controllers share this code:
//!
//! - `ode-adaptive`: one step size for the batch, driven by its worst sample;
//! - `adaptive` (the seed's idea done properly): every sample keeps its own time and step size,
//!   so easy samples finish in fewer steps; steps are kept between span/max_steps (always
//!   accepted there, so a sample never takes more than `max_steps` steps) and span/min_steps.
//!   Each network call evaluates only the samples still running, each at its own time.

use ndarray::{Array4, Axis};

use super::{lincomb, Progress, Trajectory};
use crate::error::{Error, Result};
use crate::schedule::NoiseLevel;

/// Tolerances and limits of the adaptive solvers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
    /// Fewest accepted steps (caps the step size); 1 leaves it free.
    pub min_steps: usize,
    /// Most steps: `ode-adaptive` gives up with an error after this many attempts; `adaptive`
    /// accepts any step of span/max_steps, so it never needs more accepted steps than this.
    pub max_steps: usize,
    /// Each sample its own step size (`adaptive`) or one for the batch (`ode-adaptive`).
    pub per_sample: bool,
}

/// Per-sample outcome: accepted and rejected steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCount {
    pub accepted: usize,
    pub rejected: usize,
}

/// a with row i scaled by s[i].
fn scale_rows(a: &Array4<f32>, s: &[f64]) -> Array4<f32> {
    let mut out = a.clone();
    for (mut row, &c) in out.outer_iter_mut().zip(s) {
        row.mapv_inplace(|v| (v as f64 * c) as f32);
    }
    out
}

/// Runs the solver; returns the samples and each sample's step counts.
pub fn ode_adaptive(
    tr: &mut Trajectory<'_>,
    x: Array4<f32>,
    tol: Tolerance,
    progress: &mut Progress<'_>,
) -> Result<(Array4<f32>, Vec<StepCount>)> {
    let n = tr.steps();
    let batch = x.shape()[0];
    let (first, last) = (tr.levels[0], tr.levels[n.saturating_sub(1)]);
    let (u0, u1) = (first.sbar().ln(), last.sbar().ln());
    let span = u1 - u0; // negative: towards less noise
    let level_fn = tr.level_at_sbar;
    // f(u, xbar) = sbar eps(alpha xbar), for the rows `rows` of the batch at their own u.
    let eval = |tr: &mut Trajectory<'_>,
                rows: &[usize],
                us: &[f64],
                xbar: &Array4<f32>|
     -> Result<Array4<f32>> {
        let levels: Vec<NoiseLevel> = us.iter().map(|u| level_fn(u.exp())).collect();
        let alphas: Vec<f64> = levels.iter().map(|l| l.alpha).collect();
        let sbars: Vec<f64> = levels.iter().map(|l| l.sbar()).collect();
        let eps = tr
            .den
            .denoise_rows(&scale_rows(xbar, &alphas), rows, &levels)?
            .eps;
        Ok(scale_rows(&eps, &sbars))
    };
    let mut xbar = x.mapv(|v| v / first.alpha as f32);
    let mut u = vec![u0; batch];
    let h_max = span.abs() / tol.min_steps.max(1) as f64;
    let h_min = span.abs() / tol.max_steps.max(1) as f64;
    let h0 = (span.abs() / 20.0).min(h_max);
    let h0 = if tol.per_sample { h0.max(h_min) } else { h0 };
    let mut h = vec![h0 * span.signum(); batch];
    let all: Vec<usize> = (0..batch).collect();
    let mut k1 = eval(tr, &all, &u, &xbar)?;
    let mut counts = vec![StepCount::default(); batch];
    let remaining = |u: f64| (u1 - u) / span > 1e-12;
    loop {
        let active: Vec<usize> = (0..batch).filter(|&i| remaining(u[i])).collect();
        if active.is_empty() {
            break;
        }
        if !tol.per_sample {
            let tried = counts[0].accepted + counts[0].rejected;
            if tried >= tol.max_steps {
                return Err(Error::invalid(format!(
                    "ode-adaptive did not reach the end in {} steps (rtol {}, atol {}); loosen the tolerances",
                    tol.max_steps, tol.rtol, tol.atol
                )));
            }
        }
        // The active rows: their u, step (not past the end) and state.
        let ua: Vec<f64> = active.iter().map(|&i| u[i]).collect();
        let ha: Vec<f64> = active
            .iter()
            .zip(&ua)
            .map(|(&i, &ui)| {
                if (ui + h[i] - u1) * span.signum() > 0.0 {
                    u1 - ui
                } else {
                    h[i]
                }
            })
            .collect();
        let xa = xbar.select(Axis(0), &active);
        let k1a = k1.select(Axis(0), &active);
        let at = |c: f64| -> Vec<f64> { ua.iter().zip(&ha).map(|(u, h)| u + c * h).collect() };
        let hk1 = scale_rows(&k1a, &ha);
        let k2 = eval(tr, &active, &at(0.5), &lincomb(&[(1.0, &xa), (0.5, &hk1)]))?;
        let hk2 = scale_rows(&k2, &ha);
        let k3 = eval(
            tr,
            &active,
            &at(0.75),
            &lincomb(&[(1.0, &xa), (0.75, &hk2)]),
        )?;
        let hk3 = scale_rows(&k3, &ha);
        let new = lincomb(&[
            (1.0, &xa),
            (2.0 / 9.0, &hk1),
            (1.0 / 3.0, &hk2),
            (4.0 / 9.0, &hk3),
        ]);
        let k4 = eval(tr, &active, &at(1.0), &new)?;
        let hk4 = scale_rows(&k4, &ha);
        // Embedded second-order solution's difference from the third-order one.
        let err = lincomb(&[
            (-5.0 / 72.0, &hk1),
            (1.0 / 12.0, &hk2),
            (1.0 / 9.0, &hk3),
            (-1.0 / 8.0, &hk4),
        ]);
        let mut norms: Vec<f64> = err
            .outer_iter()
            .zip(xa.outer_iter())
            .zip(new.outer_iter())
            .map(|((e, a), b)| {
                let s: f64 = e
                    .iter()
                    .zip(a.iter())
                    .zip(b.iter())
                    .map(|((e, a), b)| {
                        (*e as f64 / (tol.atol + tol.rtol * (a.abs().max(b.abs()) as f64))).powi(2)
                    })
                    .sum();
                (s / e.len() as f64).sqrt()
            })
            .collect();
        if !tol.per_sample {
            let worst = norms.iter().copied().fold(0.0, f64::max);
            norms.iter_mut().for_each(|v| *v = worst);
        }
        for (j, &i) in active.iter().enumerate() {
            let forced = tol.per_sample && ha[j].abs() <= h_min * (1.0 + 1e-9);
            if norms[j] <= 1.0 || forced {
                u[i] += ha[j];
                xbar.index_axis_mut(Axis(0), i)
                    .assign(&new.index_axis(Axis(0), j));
                k1.index_axis_mut(Axis(0), i)
                    .assign(&k4.index_axis(Axis(0), j)); // FSAL
                counts[i].accepted += 1;
            } else {
                counts[i].rejected += 1;
            }
            let grow = (0.9 * norms[j].max(1e-10).powf(-1.0 / 3.0)).clamp(0.2, 5.0);
            let mut next = (ha[j] * grow).abs().min(h_max);
            if tol.per_sample {
                next = next.max(h_min);
            }
            h[i] = next * span.signum();
        }
        let slowest = u.iter().map(|&ui| (ui - u0) / span).fold(1.0, f64::min);
        progress((slowest * n as f64).round() as usize, n);
    }
    // Final denoise from the last noisy level.
    let x = xbar.mapv(|v| v * last.alpha as f32);
    let x0 = tr.den.denoise(&x, &last)?.x0;
    progress(n, n);
    Ok((x0, counts))
}
