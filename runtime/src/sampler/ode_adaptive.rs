//! Error-controlled probability-flow ODE solver: the Bogacki–Shampine 3(2) embedded Runge–Kutta
//! pair in u = log(sigma/alpha), where the ODE d xbar / du = sbar eps(alpha xbar, sbar) is
//! smooth, from the first level down to the last noisy one, then a final denoise.
//! The step is accepted when the scaled error norm (RMS over each sample's elements of
//! err / (atol + rtol max(|x|, |x_new|)), worst sample of the batch) is at most 1, and the next
//! step is h (0.9 / norm)^(1/3), kept within [0.2, 5] times the last (Hairer et al., II.4).

use ndarray::Array4;

use super::{lincomb, Progress, Trajectory};
use crate::error::{Error, Result};
use crate::schedule::NoiseLevel;

/// Tolerances and limits of the adaptive solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
    /// Give up (with an error) after this many attempted steps.
    pub max_steps: usize,
}

/// Runs the adaptive solver; returns the sample and the numbers of accepted and rejected steps.
pub fn ode_adaptive(
    tr: &mut Trajectory<'_>,
    x: Array4<f32>,
    tol: Tolerance,
    progress: &mut Progress<'_>,
) -> Result<(Array4<f32>, usize, usize)> {
    let n = tr.steps();
    let (first, last) = (tr.levels[0], tr.levels[n.saturating_sub(1)]);
    let (u0, u1) = (first.sbar().ln(), last.sbar().ln());
    let level_fn = tr.level_at_sbar;
    // f(u, xbar) = sbar eps(alpha xbar)
    let eval = |tr: &mut Trajectory<'_>, u: f64, xbar: &Array4<f32>| -> Result<Array4<f32>> {
        let l: NoiseLevel = level_fn(u.exp());
        let x = xbar.mapv(|v| v * l.alpha as f32);
        Ok(tr.den.denoise(&x, &l)?.eps.mapv(|e| e * l.sbar() as f32))
    };
    let mut xbar = x.mapv(|v| v / first.alpha as f32);
    let mut u = u0;
    let mut h = (u1 - u0) / 20.0; // negative: towards less noise
    let mut k1 = eval(tr, u, &xbar)?;
    let (mut accepted, mut rejected) = (0usize, 0usize);
    while (u1 - u) / (u1 - u0) > 1e-12 {
        if accepted + rejected >= tol.max_steps {
            return Err(Error::InvalidArgument(format!(
                "ode-adaptive did not reach the end in {} steps (rtol {}, atol {}); loosen the tolerances or raise --steps",
                tol.max_steps, tol.rtol, tol.atol
            )));
        }
        if (u + h - u1) * (u1 - u0).signum() > 0.0 {
            h = u1 - u;
        }
        let k2 = eval(tr, u + 0.5 * h, &lincomb(&[(1.0, &xbar), (0.5 * h, &k1)]))?;
        let k3 = eval(tr, u + 0.75 * h, &lincomb(&[(1.0, &xbar), (0.75 * h, &k2)]))?;
        let new = lincomb(&[
            (1.0, &xbar),
            (2.0 / 9.0 * h, &k1),
            (h / 3.0, &k2),
            (4.0 / 9.0 * h, &k3),
        ]);
        let k4 = eval(tr, u + h, &new)?;
        // Embedded second-order solution's difference from the third-order one.
        let err = lincomb(&[
            (-5.0 / 72.0 * h, &k1),
            (1.0 / 12.0 * h, &k2),
            (1.0 / 9.0 * h, &k3),
            (-1.0 / 8.0 * h, &k4),
        ]);
        let mut norm = 0.0f64;
        for ((e, a), b) in err
            .outer_iter()
            .zip(xbar.outer_iter())
            .zip(new.outer_iter())
        {
            let s: f64 = e
                .iter()
                .zip(a.iter())
                .zip(b.iter())
                .map(|((e, a), b)| {
                    (*e as f64 / (tol.atol + tol.rtol * (a.abs().max(b.abs()) as f64))).powi(2)
                })
                .sum();
            norm = norm.max((s / e.len() as f64).sqrt());
        }
        if norm <= 1.0 {
            u += h;
            xbar = new;
            k1 = k4; // first same as last
            accepted += 1;
            progress(((u - u0) / (u1 - u0) * n as f64).round() as usize, n);
        } else {
            rejected += 1;
        }
        h *= (0.9 * norm.max(1e-10).powf(-1.0 / 3.0)).clamp(0.2, 5.0);
    }
    // Final denoise from the last noisy level.
    let x = xbar.mapv(|v| v * last.alpha as f32);
    let x0 = tr.den.denoise(&x, &last)?.x0;
    progress(n, n);
    Ok((x0, accepted, rejected))
}
