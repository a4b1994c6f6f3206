//! Time steps calibrated to one model and one sampler.
//!
//! A fixed spacing (trailing, Karras, log-SNR) puts a few-step sampler's steps where they suit an
//! average model; where the truncation error of *this* model's trajectories is largest is a
//! property of the model. Following the learned-discretisation idea of "Align Your Steps"
//! (Sabour et al. 2024) and LD3 (Tong et al. 2025), [`calibrate`] chooses the N time points of
//! a deterministic sampler so that its output on a pilot batch of noises is as close as possible
//! to a converged probability-flow ODE solution (the teacher) from the same noises. The result is
//! an explicit list for `--timesteps` ([`crate::SampleOptions::timesteps`]): calibrate once per
//! model, sampler and step count, then sample at no extra cost.
//!
//! The N - 1 free points (the first stays at the schedule's noisiest time) are parametrised by
//! N softmax weights (the last fixed to logit 0): the gaps in log-SNR between consecutive points,
//! the N-th weight being the gap left between the last visited point and the schedule's clean
//! end. Every parameter vector is thus a valid, strictly decreasing grid, and zeros give the
//! uniform log-SNR spacing the search starts from. The search is a compass (coordinate pattern)
//! search: derivative-free, so it needs only sampler runs, and monotone in the pilot error. It
//! is local and the pilot error has many basins at few steps, so it can start from several
//! points ([`CalibrateOptions::starts`]): the uniform grid, then seeded random ones.
//!
//! With the `fitted` sampler ([`crate::sampler::fitted`]) the solver is fitted too: for every
//! grid the search tries, the solver's coefficients are fitted step by step to the teacher's
//! trajectory by least squares ([`fit`]), and the grid is judged by the fitted solver's pilot
//! error. The teacher's states are then kept at all its levels and interpolated ([`teacher`]).
//! [`file`] writes and reads the result for `edgediff sample --calibration`.

pub mod file;
mod fit;
mod pilot;
mod teacher;

use ndarray::Array4;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::generate::{generate, prepare, SampleOptions};
use crate::model::Model;
use crate::sampler::{fitted, heun, unipc, SamplerKind};
use crate::schedule::NoiseLevel;
use crate::spacing::{levels, spaced_levels, Spacing};
use pilot::{pilot_x0, record_teacher};

/// What to calibrate and how hard to search.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// A deterministic sampler (ODE solver); stochastic ones do not follow the teacher.
    pub sampler: SamplerKind,
    /// Time points to place (model calls for one-call-per-step samplers).
    pub steps: usize,
    /// Pilot noises the error is measured on.
    pub pilot: usize,
    /// Seed of the pilot noises; keep it apart from the seeds samples are drawn with, so the
    /// calibration is judged on noise it never saw.
    pub seed: u64,
    /// Heun steps (uniform in log SNR) of the teacher solution.
    pub teacher_steps: usize,
    /// Most sampler runs the search may make, all starts together (0: 50 per time point and
    /// start, [`default_max_evals`]).
    pub max_evals: usize,
    /// Points the search starts from: the uniform log-SNR grid, then seeded random grids (of
    /// `seed`), each with an equal share of `max_evals`; the best result wins (0: the default,
    /// [`default_starts`]: 4 for the fitted sampler, whose pilot error has more basins, else 1).
    pub starts: usize,
    pub batch_size: usize,
    pub class_label: Option<i64>,
    pub guidance: Option<f64>,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        CalibrateOptions {
            sampler: SamplerKind::of(&unipc::UNIPC).with_order(3),
            steps: 10,
            pilot: 256,
            seed: 1,
            teacher_steps: 250,
            max_evals: 0,
            starts: 0,
            batch_size: 256,
            class_label: None,
            guidance: None,
        }
    }
}

/// The calibrated grid and what it achieved on the pilot batch.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Schedule times for `--timesteps`, most noisy first.
    pub timesteps: Vec<f64>,
    /// RMSE to the teacher with the calibrated grid.
    pub rmse: f64,
    /// RMSE with the search's start (uniform log-SNR) and with the sampler's default spacing
    /// (trailing), for comparison.
    pub rmse_logsnr: f64,
    pub rmse_trailing: f64,
    /// RMSE between the teacher and a teacher of half its steps: the floor the figures can show.
    pub teacher_rmse: f64,
    /// Sampler runs the search made.
    pub evals: usize,
    /// The fitted sampler's coefficients on `timesteps` (one row per step); None for the
    /// other samplers.
    pub coefficients: Option<Vec<Vec<f64>>>,
}

/// Most sampler runs the search may make unless told otherwise: measured on the oracle, one
/// search settles after about 30 runs per free point.
pub fn default_max_evals(steps: usize, starts: usize) -> usize {
    50 * steps * starts
}

/// Starts of the search unless told otherwise: 4 for the fitted sampler, 1 for the others.
pub fn default_starts(sampler: &SamplerKind) -> usize {
    if is_fitted(sampler) {
        4
    } else {
        1
    }
}

/// Most time points the fitted sampler is calibrated for: each step's least squares has a
/// column per prediction so far, and beyond a few tens of steps they are nearly collinear.
pub const MAX_FITTED_STEPS: usize = 50;

fn is_fitted(sampler: &SamplerKind) -> bool {
    sampler.def().name() == fitted::FITTED.name()
}

/// Refuses a model [`calibrate`] cannot fit: a text-to-image pipeline (it would run with the
/// empty prompt and the library's scheduler settings, not the pipeline's, so its grid would
/// be fitted to runs nobody makes). Public so that a front end can refuse before it reports
/// the search it is about to start.
pub fn check_model(model: &Model) -> Result<()> {
    if model.pipeline().is_some() {
        return Err(Error::not_for_pipelines(
            "calibration",
            "it would fit the time steps to the empty prompt, without the pipeline's scheduler settings",
        ));
    }
    Ok(())
}

/// Calibrates `opts.steps` time points for `opts.sampler` on `model`; `progress(evals, rmse)`
/// is told after every sampler run with the best pilot RMSE so far.
///
/// ```no_run
/// use edgediff::calibrate::{calibrate, CalibrateOptions};
/// use edgediff::{Model, SamplerKind, SampleOptions, generate};
/// use edgediff::sampler::unipc::UNIPC;
/// let mut model = Model::open("models/mnist-ddpm.onnx")?;
/// let opts = CalibrateOptions { sampler: SamplerKind::of(&UNIPC).with_order(3), steps: 10, pilot: 64, ..Default::default() };
/// let cal = calibrate(&mut model, &opts, &mut |_, _| {})?;
/// let sample = SampleOptions { sampler: opts.sampler, timesteps: Some(cal.timesteps), seed: 0, ..Default::default() };
/// let x = generate(&mut model, &sample, None, &mut |_, _| {})?;
/// # Ok::<(), edgediff::Error>(())
/// ```
pub fn calibrate(
    model: &mut Model,
    opts: &CalibrateOptions,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Calibration> {
    check_model(model)?;
    check(opts)?;
    let base = SampleOptions {
        sampler: SamplerKind::of(&heun::HEUN),
        steps: opts.teacher_steps,
        spacing: Spacing::LogSnr,
        n: opts.pilot,
        batch_size: opts.batch_size,
        seed: opts.seed,
        class_label: opts.class_label,
        guidance: opts.guidance,
        ..Default::default()
    };
    let fitting = is_fitted(&opts.sampler);
    let dense = fitting.then(|| record_teacher(model, &base)).transpose()?;
    let teacher = match &dense {
        Some(t) => t.out.clone(),
        None => generate(model, &base, None, &mut |_, _| {})?,
    };
    let half = SampleOptions {
        steps: opts.teacher_steps.div_ceil(2),
        ..base.clone()
    };
    let teacher_rmse = rmse(&generate(model, &half, None, &mut |_, _| {})?, &teacher);

    let schedule = model.schedule().clone();
    let grid = Grid::new(&schedule);
    let student = SampleOptions {
        sampler: opts.sampler,
        steps: opts.steps,
        spacing: Spacing::Trailing,
        ..base.clone()
    };
    let (label, _) = prepare(model, &base, None)?;
    // The pilot error of the grid `ts`, and the fitted sampler's coefficients there.
    let mut run = |ts: Vec<f64>| -> Result<(f64, Option<Vec<Vec<f64>>>)> {
        let Some(t) = &dense else {
            let opts_t = SampleOptions {
                timesteps: Some(ts),
                ..student.clone()
            };
            let x = generate(model, &opts_t, None, &mut |_, _| {})?;
            return Ok((rmse(&x, &teacher), None));
        };
        let lv = levels(&schedule, &ts);
        let mut x0_at = |x: &Array4<f32>, l: &NoiseLevel| pilot_x0(model, &base, label, x, l);
        let (rows, out) = fit::fit_coefficients(t.x[0].clone(), &lv, t, &mut x0_at)?;
        let e = rmse(&out, &t.out);
        let finite = e.is_finite() && rows.iter().flatten().all(|c| c.is_finite());
        Ok((if finite { e } else { f64::INFINITY }, Some(rows)))
    };
    let trailing: Vec<f64> = spaced_levels(&schedule, Spacing::Trailing, opts.steps)?
        .iter()
        .filter(|l| !l.is_clean())
        .map(|l| l.t)
        .collect();
    let rmse_trailing = run(trailing)?.0;
    let starts = match opts.starts {
        0 => default_starts(&opts.sampler),
        k => k,
    };
    let max_evals = match opts.max_evals {
        0 => default_max_evals(opts.steps, starts),
        k => k,
    };
    let (mut evals, mut best_so_far) = (0, f64::INFINITY);
    let mut objective = |z: &[f64]| -> Result<f64> {
        evals += 1;
        let e = match grid.times(z) {
            Some(ts) => run(ts)?.0,
            None => f64::INFINITY,
        };
        let e = if e.is_finite() { e } else { f64::INFINITY };
        best_so_far = best_so_far.min(e);
        progress(evals, best_so_far);
        Ok(e)
    };
    // The uniform log-SNR grid, then random logits (standard normal: gaps within a factor of
    // e or so of each other) from a stream of the pilot's seed that no sample uses.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(u64::MAX);
    let mut best: Option<(Vec<f64>, f64)> = None;
    let mut rmse_logsnr = f64::INFINITY;
    for k in 0..starts {
        let z: Vec<f64> = (0..opts.steps - 1)
            .map(|_| {
                if k == 0 {
                    0.0
                } else {
                    StandardNormal.sample(&mut rng)
                }
            })
            .collect();
        let share = max_evals / starts + usize::from(k < max_evals % starts);
        if share == 0 {
            break;
        }
        let fz = objective(&z)?;
        if k == 0 {
            rmse_logsnr = fz;
        }
        let (z, fz) = compass_search(z, fz, share - 1, &mut objective)?;
        if best.as_ref().is_none_or(|(_, b)| fz < *b) {
            best = Some((z, fz));
        }
    }
    let (z, best) = best.expect("the first start has at least two runs (max_evals >= 2)");
    let timesteps = grid.times(&z).expect("the search keeps only valid grids");
    // The fit is deterministic: refitting the winning grid gives the coefficients it scored.
    let coefficients = if fitting {
        run(timesteps.clone())?.1
    } else {
        None
    };
    Ok(Calibration {
        timesteps,
        rmse: best,
        rmse_logsnr,
        rmse_trailing,
        teacher_rmse,
        evals,
        coefficients,
    })
}

fn check(opts: &CalibrateOptions) -> Result<()> {
    if opts.sampler.is_stochastic() || opts.sampler.is_adaptive() {
        return Err(Error::invalid(format!(
            "calibrate needs a deterministic fixed-grid sampler (an ODE solver such as unipc, dpm++2m, ddim); {} {}",
            opts.sampler.name(),
            if opts.sampler.is_adaptive() { "chooses its own steps" } else { "is stochastic" }
        )));
    }
    if !(2..=1000).contains(&opts.steps) {
        let allowed = "must be in 2..=1000 (one point has nothing to place)";
        return Err(Error::out_of_range("steps", opts.steps, allowed));
    }
    if !(1..=100_000).contains(&opts.pilot) {
        return Err(Error::out_of_range(
            "pilot",
            opts.pilot,
            "must be in 1..=100000",
        ));
    }
    if opts.teacher_steps < 2 * opts.steps {
        return Err(Error::options(
            format!(
                "{{0}} {} must be at least twice {{1}} {} (the teacher must be far more exact than the sampler)",
                opts.teacher_steps, opts.steps
            ),
            &["teacher_steps", "steps"],
        ));
    }
    if is_fitted(&opts.sampler) && opts.steps > MAX_FITTED_STEPS {
        let allowed = format!("must be at most {MAX_FITTED_STEPS} for the fitted sampler (its late predictions are nearly collinear)");
        return Err(Error::out_of_range("steps", opts.steps, &allowed));
    }
    if opts.starts > 1000 {
        let allowed = "must be in 1..=1000 (0: the default)";
        return Err(Error::out_of_range("starts", opts.starts, allowed));
    }
    if opts.max_evals == 1 || opts.max_evals > 1_000_000 {
        let allowed = "must be in 2..=1000000 (0: the default)";
        return Err(Error::out_of_range("max_evals", opts.max_evals, allowed));
    }
    Ok(())
}

/// Maps parameter vectors to strictly decreasing schedule times (see the module docs).
struct Grid {
    t_max: f64,
    lambda_hi: f64,
    lambda_lo: f64,
    schedule: crate::schedule::Schedule,
}

impl Grid {
    fn new(schedule: &crate::schedule::Schedule) -> Grid {
        let (sbar_max, sbar_min) = schedule.sbar_range();
        // lambda = log(alpha/sigma) = -log(sigma/alpha), as NoiseLevel::lambda.
        Grid {
            t_max: schedule.t_for_sbar(sbar_max),
            lambda_hi: -sbar_max.ln(),
            lambda_lo: -sbar_min.ln(),
            schedule: schedule.clone(),
        }
    }

    /// The grid of `z.len() + 1` times, or None if rounding made it not strictly decreasing.
    fn times(&self, z: &[f64]) -> Option<Vec<f64>> {
        let logits: Vec<f64> = z.iter().copied().chain([0.0]).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut ts = vec![self.t_max];
        let mut acc = 0.0;
        for wi in &w[..z.len()] {
            acc += wi / total;
            let lambda = self.lambda_hi + acc * (self.lambda_lo - self.lambda_hi);
            ts.push(self.schedule.t_for_sbar((-lambda).exp()));
        }
        ts.windows(2).all(|p| p[1] < p[0]).then_some(ts)
    }
}

/// Compass search from `z` (objective `fz`): tries each coordinate at +-delta, keeps the first
/// improvement, halves delta after a sweep without one, stops below delta 0.02 or at `budget`
/// runs. Returns the best point and value.
fn compass_search(
    mut z: Vec<f64>,
    mut fz: f64,
    budget: usize,
    f: &mut dyn FnMut(&[f64]) -> Result<f64>,
) -> Result<(Vec<f64>, f64)> {
    let (mut delta, mut used) = (1.0, 0);
    while delta >= 0.02 && used < budget {
        let mut improved = false;
        'sweep: for i in 0..z.len() {
            for s in [1.0, -1.0] {
                if used >= budget {
                    break 'sweep;
                }
                let mut y = z.clone();
                y[i] += s * delta;
                let fy = f(&y)?;
                used += 1;
                if fy < fz {
                    (z, fz, improved) = (y, fy, true);
                    break;
                }
            }
        }
        if !improved {
            delta /= 2.0;
        }
    }
    Ok((z, fz))
}

fn rmse(a: &Array4<f32>, b: &Array4<f32>) -> f64 {
    let sq: f64 = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    (sq / a.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compass_search_finds_a_quadratic_minimum() {
        let target = [0.7, -1.3, 0.25];
        let mut f = |z: &[f64]| -> Result<f64> {
            Ok(z.iter().zip(target).map(|(a, b)| (a - b).powi(2)).sum())
        };
        let (z, fz) = compass_search(vec![0.0; 3], f(&[0.0; 3]).unwrap(), 10_000, &mut f).unwrap();
        // The search stops once delta < 0.02, so each coordinate is within 0.02 of the minimum.
        for (a, b) in z.iter().zip(target) {
            assert!((a - b).abs() <= 0.02, "{z:?}");
        }
        assert!(fz <= 3.0 * 0.02f64.powi(2));
    }

    #[test]
    fn compass_search_respects_its_budget() {
        let mut calls = 0;
        let mut f = |z: &[f64]| -> Result<f64> {
            calls += 1;
            Ok(z.iter().map(|v| (v - 5.0).powi(2)).sum())
        };
        compass_search(vec![0.0; 4], 100.0, 7, &mut f).unwrap();
        assert_eq!(calls, 7);
    }

    #[test]
    fn zero_parameters_give_uniform_log_snr_and_any_parameters_a_valid_grid() {
        use crate::metadata::ScheduleSpec;
        use crate::schedule::Schedule;
        let schedule = Schedule::from_spec(&ScheduleSpec::Linear {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        })
        .unwrap();
        let grid = Grid::new(&schedule);
        let ts = grid.times(&[0.0; 4]).unwrap();
        assert_eq!(ts.len(), 5);
        assert!((ts[0] - 999.0).abs() < 1e-9);
        let lambdas: Vec<f64> = ts.iter().map(|&t| schedule.level(t).lambda()).collect();
        let gap = (grid.lambda_lo - grid.lambda_hi) / 5.0;
        for (k, l) in lambdas.iter().enumerate() {
            assert!(
                (l - (grid.lambda_hi + k as f64 * gap)).abs() < 1e-9,
                "{lambdas:?}"
            );
        }
        let ts = grid.times(&[3.0, -2.0, 0.5, -4.0]).unwrap();
        assert!(ts.windows(2).all(|p| p[1] < p[0]) && ts[4] > 0.0);
    }
}
