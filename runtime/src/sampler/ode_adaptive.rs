//! Error-controlled probability-flow ODE solvers: the Bogacki–Shampine 3(2) embedded Runge–Kutta
//! pair in u = log(sigma/alpha), where the ODE d xbar / du = sbar eps(alpha xbar, sbar) is
//! smooth, from the first level down to the last noisy one, then a final denoise.
//!
//! A step is accepted when the scaled error norm (RMS over a sample's elements of
//! err / (atol + rtol max(|x|, |x_new|))) is at most 1, and the next step is h (0.9 / norm)^(1/3),
//! kept within [0.2, 5] times the last (Hairer et al., II.4). Two controllers share the step and
//! its error norm:
//!
//! - `ode-adaptive` ([`batch_controlled`]): one step size for the batch, driven by its worst
//!   sample;
//! - `adaptive` ([`per_sample_controlled`], the seed's idea done properly): every sample keeps
//!   its own time and step size, so easy samples finish in fewer steps; steps are kept between
//!   span/max_steps (always accepted there, so a sample never takes more than `max_steps` steps)
//!   and span/min_steps. Each network call evaluates only the samples still running, each at its
//!   own time.

use ndarray::{Array4, Axis};

use super::ops::{bs3_step, lincomb, scaled_error_sq, step_factor};
use super::{Progress, SamplerDef, SamplerOption, Settings, Trajectory};
use crate::denoiser::Rows;
use crate::error::{Error, Result};
use crate::schedule::NoiseLevel;

/// Most step attempts of `ode-adaptive` before it gives up.
pub const MAX_ATTEMPTS: usize = 10_000;

/// The error tolerances of both controllers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    fn of(settings: &Settings) -> Tolerance {
        Tolerance {
            rtol: settings.rtol,
            atol: settings.atol,
        }
    }
}

/// Per-sample outcome: accepted and rejected steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCount {
    pub accepted: usize,
    pub rejected: usize,
}

/// Logs the step counts and leaves them on the trajectory for the caller's report.
fn record(tr: &mut Trajectory<'_>, name: &str, counts: Vec<StepCount>) {
    let acc: Vec<usize> = counts.iter().map(|c| c.accepted).collect();
    log::info!(
        "{name}: {}..{} accepted steps per sample, {} rejected in all",
        acc.iter().min().unwrap_or(&0),
        acc.iter().max().unwrap_or(&0),
        counts.iter().map(|c| c.rejected).sum::<usize>()
    );
    tr.step_counts = Some(counts);
}

/// a with row i scaled by s[i].
fn scale_rows(a: &Array4<f32>, s: &[f64]) -> Array4<f32> {
    let mut out = a.clone();
    for (mut row, &c) in out.outer_iter_mut().zip(s) {
        row.mapv_inplace(|v| (v as f64 * c) as f32);
    }
    out
}

/// The probability-flow ODE in u over the trajectory, from its first level to its last noisy
/// one: what both controllers step through.
struct Ode<'t, 'a> {
    tr: &'t mut Trajectory<'a>,
    /// Steps of the level grid (for progress).
    n: usize,
    u0: f64,
    u1: f64,
    /// u1 - u0: negative, towards less noise.
    span: f64,
    last: NoiseLevel,
}

/// One attempted step for some rows: the new state, the slope there and each row's error norm.
struct Attempt {
    y: Array4<f32>,
    k4: Array4<f32>,
    norms: Vec<f64>,
}

impl<'t, 'a> Ode<'t, 'a> {
    /// The ODE over `tr` and the starting state xbar for the noise `x`.
    fn new(tr: &'t mut Trajectory<'a>, x: &Array4<f32>) -> (Self, Array4<f32>) {
        let n = tr.steps();
        let (first, last) = (tr.levels[0], tr.levels[n.saturating_sub(1)]);
        let (u0, u1) = (first.sbar().ln(), last.sbar().ln());
        let xbar = x.mapv(|v| v / first.alpha as f32);
        let ode = Ode {
            tr,
            n,
            u0,
            u1,
            span: u1 - u0,
            last,
        };
        (ode, xbar)
    }

    /// Whether a sample at `u` has still some way to go.
    fn remaining(&self, u: f64) -> bool {
        (self.u1 - u) / self.span > 1e-12
    }

    /// The step `h` from `u`, shortened so as not to pass the end.
    fn clamp(&self, u: f64, h: f64) -> f64 {
        if (u + h - self.u1) * self.span.signum() > 0.0 {
            self.u1 - u
        } else {
            h
        }
    }

    /// f(u, xbar) = sbar eps(alpha xbar), for the rows `rows` of the batch at their own u.
    fn eval(&mut self, rows: &[usize], us: &[f64], xbar: &Array4<f32>) -> Result<Array4<f32>> {
        let levels: Vec<NoiseLevel> = us
            .iter()
            .map(|u| self.tr.schedule.level_for_sbar(u.exp()))
            .collect();
        let alphas: Vec<f64> = levels.iter().map(|l| l.alpha).collect();
        let sbars: Vec<f64> = levels.iter().map(|l| l.sbar()).collect();
        let eps = self
            .tr
            .den
            .denoise_rows(
                &scale_rows(xbar, &alphas),
                Rows {
                    index: rows,
                    levels: &levels,
                },
            )?
            .eps;
        Ok(scale_rows(&eps, &sbars))
    }

    /// One Bogacki–Shampine step for the rows `rows` of the batch state `xbar` (slopes `k1`),
    /// each from its own `u` by its own `h`.
    fn attempt(
        &mut self,
        rows: &[usize],
        u: &[f64],
        h: &[f64],
        xbar: &Array4<f32>,
        k1: &Array4<f32>,
        tol: Tolerance,
    ) -> Result<Attempt> {
        let xa = xbar.select(Axis(0), rows);
        let k1a = k1.select(Axis(0), rows);
        // The slopes travel with their h-scaled rows, which is what the tableau combines.
        let start = (scale_rows(&k1a, h), k1a);
        let step = bs3_step(
            &xa,
            &start,
            |c, y| {
                let at: Vec<f64> = u.iter().zip(h).map(|(u, h)| u + c * h).collect();
                let k = self.eval(rows, &at, y)?;
                Ok((scale_rows(&k, h), k))
            },
            |y, terms| {
                let mut all: Vec<(f64, &Array4<f32>)> = y.map(|y| (1.0, y)).into_iter().collect();
                all.extend(terms.iter().map(|(a, k)| (*a, &k.0)));
                lincomb(&all)
            },
        )?;
        let norms = step
            .err
            .outer_iter()
            .zip(xa.outer_iter())
            .zip(step.y.outer_iter())
            .map(|((e, a), b)| {
                (scaled_error_sq(e, a, b, tol.rtol, tol.atol) / e.len() as f64).sqrt()
            })
            .collect();
        Ok(Attempt {
            y: step.y,
            k4: step.k4.1,
            norms,
        })
    }

    /// Tells `progress` how far the slowest sample has come.
    fn progress(&self, u: &[f64], progress: &mut Progress<'_>) {
        let slowest = u
            .iter()
            .map(|&ui| (ui - self.u0) / self.span)
            .fold(1.0, f64::min);
        progress((slowest * self.n as f64).round() as usize, self.n);
    }

    /// The final denoise from the last noisy level.
    fn finish(self, xbar: &Array4<f32>, progress: &mut Progress<'_>) -> Result<Array4<f32>> {
        let x = xbar.mapv(|v| v * self.last.alpha as f32);
        let x0 = self.tr.den.denoise(&x, &self.last)?.x0;
        progress(self.n, self.n);
        Ok(x0)
    }
}

/// `ode-adaptive`: one step size for the whole batch, accepted when its worst sample's error
/// norm is at most 1; gives up after [`MAX_ATTEMPTS`] attempts. Returns the samples and the
/// batch's step count.
pub fn batch_controlled(
    tr: &mut Trajectory<'_>,
    x: Array4<f32>,
    tol: Tolerance,
    progress: &mut Progress<'_>,
) -> Result<(Array4<f32>, StepCount)> {
    let batch = x.shape()[0];
    let (mut ode, mut xbar) = Ode::new(tr, &x);
    let rows: Vec<usize> = (0..batch).collect();
    let h_max = ode.span.abs();
    let mut u = ode.u0;
    let mut h = (ode.span.abs() / 20.0).min(h_max) * ode.span.signum();
    let mut k1 = ode.eval(&rows, &vec![u; batch], &xbar)?;
    let mut count = StepCount::default();
    while ode.remaining(u) {
        if count.accepted + count.rejected >= MAX_ATTEMPTS {
            return Err(Error::invalid(format!(
                "ode-adaptive did not reach the end in {MAX_ATTEMPTS} steps (rtol {}, atol {}); loosen the tolerances",
                tol.rtol, tol.atol
            )));
        }
        let step = ode.clamp(u, h);
        let a = ode.attempt(&rows, &vec![u; batch], &vec![step; batch], &xbar, &k1, tol)?;
        let worst = a.norms.iter().copied().fold(0.0, f64::max);
        if worst <= 1.0 {
            u += step;
            (xbar, k1) = (a.y, a.k4); // FSAL: the last stage is the slope at the new point
            count.accepted += 1;
        } else {
            count.rejected += 1;
        }
        h = (step * step_factor(worst)).abs().min(h_max) * ode.span.signum();
        ode.progress(&[u], progress);
    }
    Ok((ode.finish(&xbar, progress)?, count))
}

/// `adaptive`: each sample its own time and step size, between span/`max_steps` (always
/// accepted) and span/`min_steps`. Returns the samples and each one's step count.
pub fn per_sample_controlled(
    tr: &mut Trajectory<'_>,
    x: Array4<f32>,
    tol: Tolerance,
    min_steps: usize,
    max_steps: usize,
    progress: &mut Progress<'_>,
) -> Result<(Array4<f32>, Vec<StepCount>)> {
    let batch = x.shape()[0];
    let (mut ode, mut xbar) = Ode::new(tr, &x);
    let (span, sign) = (ode.span.abs(), ode.span.signum());
    let h_max = span / min_steps.max(1) as f64;
    let h_min = span / max_steps.max(1) as f64;
    let mut u = vec![ode.u0; batch];
    let mut h = vec![(span / 20.0).min(h_max).max(h_min) * sign; batch];
    let all: Vec<usize> = (0..batch).collect();
    let mut k1 = ode.eval(&all, &u, &xbar)?;
    let mut counts = vec![StepCount::default(); batch];
    loop {
        let active: Vec<usize> = (0..batch).filter(|&i| ode.remaining(u[i])).collect();
        if active.is_empty() {
            break;
        }
        let ua: Vec<f64> = active.iter().map(|&i| u[i]).collect();
        let ha: Vec<f64> = active.iter().map(|&i| ode.clamp(u[i], h[i])).collect();
        let a = ode.attempt(&active, &ua, &ha, &xbar, &k1, tol)?;
        for (j, &i) in active.iter().enumerate() {
            let forced = ha[j].abs() <= h_min * (1.0 + 1e-9);
            if a.norms[j] <= 1.0 || forced {
                u[i] += ha[j];
                xbar.index_axis_mut(Axis(0), i)
                    .assign(&a.y.index_axis(Axis(0), j));
                k1.index_axis_mut(Axis(0), i)
                    .assign(&a.k4.index_axis(Axis(0), j)); // FSAL
                counts[i].accepted += 1;
            } else {
                counts[i].rejected += 1;
            }
            let next = (ha[j] * step_factor(a.norms[j])).abs().min(h_max);
            h[i] = next.max(h_min) * sign;
        }
        ode.progress(&u, progress);
    }
    Ok((ode.finish(&xbar, progress)?, counts))
}

/// Both controllers' tolerances, with their defaults.
const TOLERANCE: SamplerOption = SamplerOption::Tolerance {
    rtol: 1e-3,
    atol: 1e-3,
};

pub static ODE_ADAPTIVE: SamplerDef = SamplerDef::new(
    "ode-adaptive",
    "3 (embedded 2)",
    "3 per accepted step (FSAL); --rtol/--atol choose the steps",
)
.summary("Bogacki-Shampine 3(2) with error control in log sigma; --spacing is ignored")
.options(&[TOLERANCE])
.adaptive()
// Step bounds are the per-sample controller's; refusing them here tells a caller who meant
// `adaptive`.
.check(|p| match (p.min_steps, p.max_steps) {
    (None, None) => Ok(()),
    _ => Err(Error::options(
        "{0}/{1} apply to the adaptive sampler",
        &["min_steps", "max_steps"],
    )),
})
.run(|o, tr, x, progress| {
    let (x, count) = batch_controlled(tr, x, Tolerance::of(o), progress)?;
    record(tr, "ode-adaptive", vec![count; x.shape()[0]]);
    Ok(x)
});

pub static ADAPTIVE: SamplerDef = SamplerDef::new(
    "adaptive",
    "3 (embedded 2)",
    "3 per accepted step, per sample; --min-steps/--max-steps bound them",
)
.summary("per-sample step-size control on the probability-flow ODE; reports each sample's steps")
.options(&[TOLERANCE, SamplerOption::StepRange { min: 2, max: 500 }])
.adaptive()
.run(|o, tr, x, progress| {
    let tol = Tolerance::of(o);
    let (x, counts) = per_sample_controlled(tr, x, tol, o.min_steps, o.max_steps, progress)?;
    record(tr, "adaptive", counts);
    Ok(x)
});
