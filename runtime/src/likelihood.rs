//! Exact-in-expectation log-likelihood through the probability-flow ODE (Song et al. 2021,
//! "instantaneous change of variables"; Chen et al. 2018, Grathwohl et al. 2019 FFJORD).
//!
//! # What is integrated
//!
//! The runtime's noise axis is u = log(sigma/alpha) (minus DPM-Solver's lambda). In
//! xbar = x / alpha the probability-flow ODE is d xbar / du = g(xbar, u) = sbar eps(alpha xbar, u)
//! with sbar = e^u (the same ODE `ode-adaptive` solves towards the data). Along a solution the
//! log-density of xbar obeys d log p_u(xbar_u) / du = -div g, so, integrating from the data end
//! u_0 (the schedule's least noisy level: index 0, or t = [`CONTINUOUS_T_MIN`]) to the noise end
//! u_1 (index T-1 or t = 1),
//!
//! ```text
//! log p_{t0}(x0) = log N(x_T; 0, s_T² I) + D log(alpha_T / alpha_0) + ∫_{u0}^{u1} div g du,
//! ```
//!
//! where x_T = alpha_T xbar(u_1), the prior is N(0, I) on variance-preserving schedules and
//! N(0, sigma_max² I) on VE, and the middle term converts the xbar densities at both ends into x
//! densities (x = alpha xbar). The data x0 is taken as the state at t0 (the usual convention: what
//! is measured is the density of data blurred by the smallest noise level, sigma/alpha ~ 0.01).
//!
//! # The divergence, without gradients
//!
//! div g = sbar alpha tr(J) with J = d eps / dx. Hutchinson: tr J = E[vᵀ J v] for probes v with
//! E[v vᵀ] = I (Rademacher by default: its variance 2 Σ_{i≠j} J_ij² lacks the diagonal, so a
//! diagonal J is exact with one probe; Gaussian probes add 2 Σ J_ii²). Each sample keeps its K
//! probes over the whole trajectory, so the integrand is a smooth function the solver can
//! integrate; the estimate of the integral is then unbiased over the probes. J v comes from a
//! central difference of the network, (eps(x + η v) - eps(x - η v)) / (2η), whose error is
//! O(η²) (third derivatives) plus the network's float32 rounding divided by η. The step is
//! η = δ max(rms(x), 1) per sample, δ = [`DEFAULT_FD_STEP`] = 1e-3: relative to the size of x so
//! that x ± η v differ from x by ~1e4 float32 ulps (input rounding is negligible) while staying
//! far inside the scale on which eps bends (the noise level, >= 0.01 in data units); the floor
//! 1 keeps it there when x is near 0. Measured on the shipped MNIST model (two test digits, the
//! same probe, RK4 16 steps): δ = 1e-4 and 1e-3 give log p within 1.6 nats of ~2750 (0.06%),
//! δ = 1e-2 is 80 nats (3%) lower: truncation error, growing as δ². The state, the K plus-probes and the K minus-probes go
//! through the network as one batch of (1 + 2K) rows per sample, one call per solver stage.
//!
//! # Solvers
//!
//! Classic RK4 on a uniform grid in u (`steps` steps, 4 calls each; the default, 64 steps), or
//! Bogacki–Shampine 3(2) with error control on xbar and the integral together (one step size per
//! batch, FSAL: 3 calls per accepted step). On the Gaussian-mixture oracle (4 dimensions, the
//! same probes) RK4's mean difference from a 512-step solution is 3e-2 nats at 16 steps, 2e-3
//! at 32, 1e-4 at 64 (cosine schedule, whose log-SNR span is wider: 0.17, 0.016, 0.0013); BS3
//! needs rtol 1e-4 and more calls (262) for 3e-3, so the default is RK4 with 64 steps.
//!
//! # Bits per dimension
//!
//! For data quantised into bins of width Δ (in data units), the probability of a bin is about
//! p(x) Δ^D, so bpd = -(log p(x) + D log Δ) / (D ln 2). Δ = (hi - lo) / bins for the model's data
//! range [lo, hi]; the default 256 bins is Ho et al.'s and Song et al.'s convention for 8-bit
//! images scaled to [-1, 1] (Δ = 1/128, +7 bits); images stored as k/127.5 - 1 have Δ = 2/255
//! (bins = 255). The density is evaluated at the given pixel values (no dequantisation noise).
//!
//! ```no_run
//! use edgediff::likelihood::{log_likelihood, LikelihoodOptions};
//! edgediff::init_onnxruntime(None)?;
//! let mut model = edgediff::Model::open("models/mnist-ddpm.onnx")?;
//! let x = ndarray::Array4::<f32>::from_elem((2, 1, 28, 28), -1.0); // two blank digits
//! let report = log_likelihood(&mut model, &x, &LikelihoodOptions::default(), &mut |_, _| {})?;
//! for img in &report.images {
//!     println!("{:.1} nats, {:.3} bits/dim", img.log_density, img.bits_per_dim);
//! }
//! # Ok::<(), edgediff::Error>(())
//! ```
//!
//! [`CONTINUOUS_T_MIN`]: crate::schedule::CONTINUOUS_T_MIN

use ndarray::{s, Array4, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::denoiser::{Denoiser, ModelDenoiser, Rows};
use crate::error::{Error, Result};
use crate::generate::{class_label_for, prior_std, MAX_BATCH_BYTES};
use crate::model::Model;
use crate::sampler::ops::{bs3_step, lincomb, scaled_error, scaled_error_sq, step_factor};
use crate::schedule::{NoiseLevel, Schedule};

/// Relative finite-difference step δ: η = δ max(rms(x), 1) (see the module docs).
pub const DEFAULT_FD_STEP: f64 = 1e-3;
/// RK4 steps of the default solver.
pub const DEFAULT_STEPS: usize = 64;
/// Most probes per sample.
pub const MAX_PROBES: usize = 256;
/// Most solver steps (fixed) or step attempts (adaptive).
pub const MAX_STEPS: usize = 100_000;

/// The distribution of Hutchinson probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probe {
    /// ±1 with equal odds: the lower-variance choice.
    #[default]
    Rademacher,
    /// Standard normal.
    Gaussian,
}

impl std::str::FromStr for Probe {
    type Err = Error;
    fn from_str(s: &str) -> Result<Probe> {
        match s {
            "rademacher" => Ok(Probe::Rademacher),
            "gaussian" => Ok(Probe::Gaussian),
            // Not Error::unknown: its message names "probe" as a word, where the CLI's
            // message has always named the option.
            other => Err(Error::options(
                format!("unknown {{0}} '{other}'; expected rademacher or gaussian"),
                &["probe"],
            )),
        }
    }
}

/// How the ODE is integrated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OdeSolver {
    /// Classic fourth-order Runge–Kutta, `steps` uniform steps in log(sigma/alpha).
    Rk4 { steps: usize },
    /// Bogacki–Shampine 3(2) with error control (one step size per batch).
    Adaptive { rtol: f64, atol: f64 },
}

/// What [`log_likelihood`] computes and how.
#[derive(Debug, Clone)]
pub struct LikelihoodOptions {
    pub solver: OdeSolver,
    /// Hutchinson probes per sample, averaged (fixed along the trajectory).
    pub probes: usize,
    pub probe: Probe,
    /// Relative finite-difference step δ.
    pub fd_step: f64,
    /// Samples per solver batch (each network call holds (1 + 2 probes) rows per sample).
    pub batch_size: usize,
    /// Seed of the probes; sample i's probes depend only on (seed, i).
    pub seed: u64,
    /// Class for class-conditional models; None: the unconditional model (the null label).
    pub class_label: Option<i64>,
    /// Quantisation bins across the data range, for bits per dimension.
    pub bins: f64,
}

impl Default for LikelihoodOptions {
    fn default() -> Self {
        LikelihoodOptions {
            solver: OdeSolver::Rk4 {
                steps: DEFAULT_STEPS,
            },
            probes: 1,
            probe: Probe::Rademacher,
            fd_step: DEFAULT_FD_STEP,
            batch_size: 64,
            seed: 0,
            class_label: None,
            bins: 256.0,
        }
    }
}

impl LikelihoodOptions {
    /// Refuses values that cannot work, naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PROBES).contains(&self.probes) {
            let allowed = format!("must be in 1..={MAX_PROBES}");
            return Err(Error::out_of_range("probes", self.probes, &allowed));
        }
        match self.solver {
            OdeSolver::Rk4 { steps } if !(1..=MAX_STEPS).contains(&steps) => {
                let allowed = format!("must be in 1..={MAX_STEPS}");
                return Err(Error::out_of_range("steps", steps, &allowed));
            }
            OdeSolver::Adaptive { rtol, atol } => crate::sampler::check_tolerances(rtol, atol)?,
            _ => {}
        }
        if !(self.fd_step > 0.0 && self.fd_step <= 0.1) {
            let allowed = format!("must be in (0, 0.1] (default {DEFAULT_FD_STEP})");
            return Err(Error::out_of_range("fd_step", self.fd_step, &allowed));
        }
        if self.batch_size == 0 {
            return Err(Error::options("{0} must be at least 1", &["batch_size"]));
        }
        if !(self.bins >= 2.0 && self.bins.is_finite()) {
            return Err(Error::out_of_range("bins", self.bins, "must be at least 2"));
        }
        Ok(())
    }
}

/// One image's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageLikelihood {
    /// log p(x) in nats (a density over the data space, at the least noisy level).
    pub log_density: f64,
    /// -(log p(x) + D log Δ) / (D ln 2).
    pub bits_per_dim: f64,
    /// log N(x_T; 0, s_T² I): the prior's share.
    pub prior: f64,
    /// ∫ div g du: the ODE's share (with D log(alpha_T/alpha_0), the rest of `log_density`).
    pub divergence_integral: f64,
}

/// What [`log_likelihood`] found.
#[derive(Debug, Clone, Default)]
pub struct LikelihoodReport {
    pub images: Vec<ImageLikelihood>,
    /// Dimensions per image (C H W).
    pub dim: usize,
    /// Bin width Δ in data units used for bits per dimension.
    pub bin_width: f64,
    /// Network calls (one per solver stage per batch).
    pub network_calls: usize,
    /// Accepted and rejected steps per batch (fixed solvers: steps, 0).
    pub steps: Vec<(usize, usize)>,
}

/// Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n = 1).
pub fn mean_and_se(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// log p(x) of each image `x` (`[n, C, H, W]`, model data range) under `model`.
///
/// `progress(done, total)` counts solver steps over all batches (for the adaptive solver, an
/// estimate from the fraction of the noise axis covered).
pub fn log_likelihood(
    model: &mut Model,
    x: &Array4<f32>,
    opts: &LikelihoodOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LikelihoodReport> {
    if model.pipeline().is_some() {
        // As for the ELBO: a density of latents given a prompt, not of the images.
        return Err(Error::not_for_pipelines(
            "the likelihood",
            "the density would be of the VAE's latents given a prompt, not of the images",
        ));
    }
    opts.validate()?;
    let meta = model.metadata().clone();
    let [c, h, w] = meta.sample_shape;
    let n = x.shape()[0];
    if x.shape()[1..] != [c, h, w] || n == 0 {
        return Err(Error::invalid(format!(
            "the data has shape {:?}; the model takes [n >= 1, {c}, {h}, {w}]",
            x.shape()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "the data holds a non-finite value (image {})",
            i / (c * h * w)
        )));
    }
    let rows = opts.batch_size.min(n).saturating_mul(1 + 2 * opts.probes);
    let row_bytes = 4 * c * h * w;
    if rows.saturating_mul(row_bytes) > MAX_BATCH_BYTES {
        return Err(Error::options(
            format!(
                "{{0}} {} with {{1}} {} puts {rows} images in each network call ({:.1} GiB); use a smaller {{0}}",
                opts.batch_size.min(n),
                opts.probes,
                rows as f64 * row_bytes as f64 / (1u64 << 30) as f64
            ),
            &["batch_size", "probes"],
        ));
    }
    let label = class_label_for(&meta, opts.class_label)?;
    let schedule = model.schedule().clone();
    let [lo, hi] = meta.data_range;
    let bin_width = (hi - lo) / opts.bins;
    let batches: Vec<usize> = (0..n).step_by(opts.batch_size).collect();
    let total = match opts.solver {
        OdeSolver::Rk4 { steps } => steps,
        OdeSolver::Adaptive { .. } => 100,
    } * batches.len();
    let mut report = LikelihoodReport {
        dim: c * h * w,
        bin_width,
        ..Default::default()
    };
    for (b, &first) in batches.iter().enumerate() {
        let m = opts.batch_size.min(n - first);
        let xb = x.slice(s![first..first + m, .., .., ..]).to_owned();
        let probes = draw_probes(opts, first, m, [c, h, w]);
        let mut den = ModelDenoiser::new(model, label.map(|k| vec![k; m]), first);
        let done = b * total / batches.len();
        let (images, steps) = log_density_batch(
            &mut den,
            &schedule,
            &xb,
            &probes,
            opts,
            bin_width,
            &mut |d, t| progress(done + d * (total / batches.len()) / t.max(1), total),
        )?;
        report.network_calls += den.calls();
        report.images.extend(images);
        report.steps.push(steps);
    }
    progress(total, total);
    Ok(report)
}

/// The K probes of samples `first .. first + m`, `[K][m, C, H, W]`; sample i's come from its own
/// ChaCha8 stream (seed, i), so they do not depend on batching.
pub fn draw_probes(
    opts: &LikelihoodOptions,
    first: usize,
    m: usize,
    [c, h, w]: [usize; 3],
) -> Vec<Array4<f32>> {
    let mut probes = vec![Array4::<f32>::zeros((m, c, h, w)); opts.probes];
    for j in 0..m {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream((first + j) as u64);
        for p in probes.iter_mut() {
            for v in p.index_axis_mut(Axis(0), j).iter_mut() {
                *v = match opts.probe {
                    Probe::Rademacher => {
                        if rng.random::<bool>() {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                    Probe::Gaussian => rng.sample(StandardNormal),
                };
            }
        }
    }
    probes
}

/// The ODE right-hand side for the batch: g = sbar eps(alpha xbar) and the Hutchinson estimate
/// of div g per sample.
struct Rhs<'a> {
    den: &'a mut dyn Denoiser,
    schedule: &'a Schedule,
    probes: &'a [Array4<f32>],
    fd_step: f64,
}

impl Rhs<'_> {
    fn eval(&mut self, u: f64, xbar: &Array4<f32>) -> Result<(Array4<f32>, Vec<f64>)> {
        let level = self.schedule.level_for_sbar(u.exp());
        let (a, sb) = (level.alpha, level.sbar());
        let m = xbar.shape()[0];
        let k = self.probes.len();
        let x = xbar.mapv(|v| (v as f64 * a) as f32);
        let eta: Vec<f64> = x
            .outer_iter()
            .map(|r| {
                let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / r.len() as f64;
                self.fd_step * ms.sqrt().max(1.0)
            })
            .collect();
        let mut shape = x.raw_dim();
        shape[0] = m * (1 + 2 * k);
        let mut big = Array4::<f32>::zeros(shape);
        big.slice_mut(s![0..m, .., .., ..]).assign(&x);
        for (p, v) in self.probes.iter().enumerate() {
            for (sign, block) in [(1.0, 1 + 2 * p), (-1.0, 2 + 2 * p)] {
                for (j, &e) in eta.iter().enumerate() {
                    let step = sign * e;
                    let mut row = big.index_axis_mut(Axis(0), block * m + j);
                    ndarray::Zip::from(&mut row)
                        .and(x.index_axis(Axis(0), j))
                        .and(v.index_axis(Axis(0), j))
                        .for_each(|o, &xv, &vv| *o = (xv as f64 + step * vv as f64) as f32);
                }
            }
        }
        let rows: Vec<usize> = (0..1 + 2 * k).flat_map(|_| 0..m).collect();
        let eps = self
            .den
            .denoise_rows(
                &big,
                Rows {
                    index: &rows,
                    levels: &vec![level; rows.len()],
                },
            )?
            .eps;
        let g = eps
            .slice(s![0..m, .., .., ..])
            .mapv(|e| (e as f64 * sb) as f32);
        let div = (0..m)
            .map(|j| {
                let sum: f64 = self
                    .probes
                    .iter()
                    .enumerate()
                    .map(|(p, v)| {
                        let plus = eps.index_axis(Axis(0), (1 + 2 * p) * m + j);
                        let minus = eps.index_axis(Axis(0), (2 + 2 * p) * m + j);
                        let vjv: f64 = ndarray::Zip::from(&plus)
                            .and(&minus)
                            .and(v.index_axis(Axis(0), j))
                            .fold(0.0, |acc, &e1, &e0, &vv| {
                                acc + vv as f64 * (e1 as f64 - e0 as f64)
                            });
                        vjv / (2.0 * eta[j])
                    })
                    .sum();
                sb * a * sum / k as f64
            })
            .collect();
        Ok((g, div))
    }
}

/// An ODE state: xbar and the accumulated divergence integral per sample.
type State = (Array4<f32>, Vec<f64>);

/// Solves the augmented ODE for one batch `x0` (`probes[k]` shaped like it) and returns each
/// image's result and (accepted, rejected) steps. Works on any [`Denoiser`].
pub fn log_density_batch(
    den: &mut dyn Denoiser,
    schedule: &Schedule,
    x0: &Array4<f32>,
    probes: &[Array4<f32>],
    opts: &LikelihoodOptions,
    bin_width: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<ImageLikelihood>, (usize, usize))> {
    let (sbar_hi, sbar_lo) = schedule.sbar_range();
    let (first, last) = (
        schedule.level_for_sbar(sbar_lo),
        schedule.level_for_sbar(sbar_hi),
    );
    let (u0, u1) = (sbar_lo.ln(), sbar_hi.ln());
    let m = x0.shape()[0];
    let mut rhs = Rhs {
        den,
        schedule,
        probes,
        fd_step: opts.fd_step,
    };
    let start: State = (x0.mapv(|v| (v as f64 / first.alpha) as f32), vec![0.0; m]);
    let ((xbar, integral), steps) = match opts.solver {
        OdeSolver::Rk4 { steps } => {
            let h = (u1 - u0) / steps as f64;
            let mut y = start;
            for i in 0..steps {
                y = rk4_step(&mut rhs, u0 + i as f64 * h, h, &y)?;
                progress(i + 1, steps);
            }
            (y, (steps, 0))
        }
        OdeSolver::Adaptive { rtol, atol } => bs3(&mut rhs, u0, u1, start, rtol, atol, &mut |f| {
            progress((f * 100.0) as usize, 100)
        })?,
    };
    let dim = x0.len() / m.max(1);
    let s_t = prior_std(schedule, &[last]);
    let images = (0..m)
        .map(|j| {
            let x_t = xbar.index_axis(Axis(0), j);
            let sq: f64 = x_t
                .iter()
                .map(|&v| (v as f64 * last.alpha / s_t).powi(2))
                .sum();
            let d = dim as f64;
            let prior = -0.5 * sq - 0.5 * d * (2.0 * std::f64::consts::PI * s_t * s_t).ln();
            let log_density = prior + d * (last.alpha / first.alpha).ln() + integral[j];
            ImageLikelihood {
                log_density,
                bits_per_dim: -(log_density + d * bin_width.ln()) / (d * std::f64::consts::LN_2),
                prior,
                divergence_integral: integral[j],
            }
        })
        .collect();
    Ok((images, steps))
}

/// y + sum_i c_i k_i for states.
fn axpy(y: &State, terms: &[(f64, &State)]) -> State {
    let mut parts: Vec<(f64, &Array4<f32>)> = vec![(1.0, &y.0)];
    parts.extend(terms.iter().map(|(c, k)| (*c, &k.0)));
    let x = lincomb(&parts);
    let d = (0..y.1.len())
        .map(|j| y.1[j] + terms.iter().map(|(c, k)| c * k.1[j]).sum::<f64>())
        .collect();
    (x, d)
}

fn rk4_step(rhs: &mut Rhs<'_>, u: f64, h: f64, y: &State) -> Result<State> {
    let k1 = rhs.eval(u, &y.0)?;
    let k2 = rhs.eval(u + h / 2.0, &axpy(y, &[(h / 2.0, &k1)]).0)?;
    let k3 = rhs.eval(u + h / 2.0, &axpy(y, &[(h / 2.0, &k2)]).0)?;
    let k4 = rhs.eval(u + h, &axpy(y, &[(h, &k3)]).0)?;
    Ok(axpy(
        y,
        &[
            (h / 6.0, &k1),
            (h / 3.0, &k2),
            (h / 3.0, &k3),
            (h / 6.0, &k4),
        ],
    ))
}

/// Sample `j`'s xbar.
fn row(s: &State, j: usize) -> ndarray::ArrayView3<'_, f32> {
    s.0.index_axis(Axis(0), j)
}

/// Bogacki–Shampine 3(2) from u0 to u1 with one step size for the batch: a step is accepted
/// when the worst sample's RMS of err / (atol + rtol max|y|) over xbar's elements and the
/// integral is at most 1 (Hairer et al., II.4). Returns the state and (accepted, rejected).
fn bs3(
    rhs: &mut Rhs<'_>,
    u0: f64,
    u1: f64,
    y0: State,
    rtol: f64,
    atol: f64,
    progress: &mut dyn FnMut(f64),
) -> Result<(State, (usize, usize))> {
    let span = u1 - u0;
    let mut u = u0;
    let mut y = y0;
    let mut h = span / 20.0;
    let mut k1 = rhs.eval(u, &y.0)?;
    let (mut accepted, mut rejected) = (0, 0);
    while (u1 - u) / span > 1e-12 {
        if accepted + rejected >= MAX_STEPS {
            return Err(Error::invalid(format!(
                "the likelihood ODE did not reach the end in {MAX_STEPS} steps (rtol {rtol}, atol {atol}); loosen the tolerances"
            )));
        }
        h = h.min(u1 - u);
        let step = bs3_step(
            &y,
            &k1,
            |c, y| rhs.eval(u + c * h, &y.0),
            |y, terms| {
                let scaled: Vec<(f64, &State)> = terms.iter().map(|(a, k)| (a * h, *k)).collect();
                match y {
                    Some(y) => axpy(y, &scaled),
                    None => {
                        let k = &terms[0].1;
                        axpy(
                            &(Array4::zeros(k.0.raw_dim()), vec![0.0; k.1.len()]),
                            &scaled,
                        )
                    }
                }
            },
        )?;
        let (new, err) = (&step.y, &step.err);
        let norm = (0..y.1.len())
            .map(|j| {
                let (e, a, b) = (row(err, j), row(&y, j), row(new, j));
                let count = e.len() + 1; // xbar's elements and the integral
                let elements = scaled_error_sq(e, a, b, rtol, atol);
                let integral = scaled_error(err.1[j], y.1[j], new.1[j], rtol, atol);
                ((elements + integral.powi(2)) / count as f64).sqrt()
            })
            .fold(0.0, f64::max);
        if norm <= 1.0 {
            u += h;
            (y, k1) = (step.y, step.k4); // FSAL: the last stage is f at the new point
            accepted += 1;
            progress((u - u0) / span);
        } else {
            rejected += 1;
        }
        h *= step_factor(norm);
    }
    Ok((y, (accepted, rejected)))
}

/// The level at the data end of the likelihood integral (where x0 is placed).
pub fn data_level(schedule: &Schedule) -> NoiseLevel {
    schedule.level_for_sbar(schedule.sbar_range().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{Denoised, Denoiser};

    /// The exact eps of a diagonal Gaussian mixture (weights w, means mu[k], variances v[k]).
    struct Mixture {
        w: Vec<f64>,
        mu: Vec<Vec<f64>>,
        v: Vec<Vec<f64>>,
    }

    impl Mixture {
        /// One Gaussian component.
        fn gaussian(mu: Vec<f64>, v: Vec<f64>) -> Mixture {
            Mixture {
                w: vec![1.0],
                mu: vec![mu],
                v: vec![v],
            }
        }

        /// log of sum_k w_k N(x; a mu_k, a² v_k + s²) and its gradient.
        fn log_p(&self, x: &[f64], a: f64, s: f64) -> (f64, Vec<f64>) {
            let logs: Vec<f64> = (0..self.w.len())
                .map(|k| {
                    self.w[k].ln()
                        + x.iter()
                            .enumerate()
                            .map(|(i, &xi)| {
                                let var = a * a * self.v[k][i] + s * s;
                                -0.5 * ((xi - a * self.mu[k][i]).powi(2) / var
                                    + (2.0 * std::f64::consts::PI * var).ln())
                            })
                            .sum::<f64>()
                })
                .collect();
            let top = logs.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = logs.iter().map(|l| (l - top).exp()).sum();
            let grad = (0..x.len())
                .map(|i| {
                    (0..self.w.len())
                        .map(|k| {
                            let var = a * a * self.v[k][i] + s * s;
                            -(logs[k] - top).exp() / z * (x[i] - a * self.mu[k][i]) / var
                        })
                        .sum()
                })
                .collect();
            (top + z.ln(), grad)
        }
    }

    impl Denoiser for Mixture {
        fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
            let Rows { levels, .. } = at;
            let mut eps = Array4::zeros(x.raw_dim());
            for (j, l) in levels.iter().enumerate() {
                let row: Vec<f64> = x.index_axis(Axis(0), j).iter().map(|&v| v as f64).collect();
                let (_, grad) = self.log_p(&row, l.alpha, l.sigma);
                for (e, g) in eps.index_axis_mut(Axis(0), j).iter_mut().zip(grad) {
                    *e = (-l.sigma * g) as f32;
                }
            }
            let x0 = x.clone(); // unused by the likelihood
            Ok(Denoised { x0, eps })
        }
    }

    fn vp() -> Schedule {
        Schedule::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }

    /// The estimate for the images `x` under `den` with `opts` (probes of seed 0, bin width 1).
    fn estimate(
        den: &mut Mixture,
        sched: &Schedule,
        x: &Array4<f32>,
        opts: LikelihoodOptions,
    ) -> (Vec<ImageLikelihood>, (usize, usize)) {
        let [n, c, h, w] = x.shape().try_into().expect("a 4-d array");
        let probes = draw_probes(&opts, 0, n, [c, h, w]);
        log_density_batch(den, sched, x, &probes, &opts, 1.0, &mut |_, _| {}).unwrap()
    }

    /// The exact log-density of image `j` of `x` at the data level of `sched`.
    fn exact(den: &Mixture, sched: &Schedule, x: &Array4<f32>, j: usize) -> f64 {
        let l0 = data_level(sched);
        let row: Vec<f64> = x.index_axis(Axis(0), j).iter().map(|&v| v as f64).collect();
        den.log_p(&row, l0.alpha, l0.sigma).0
    }

    /// n draws from the mixture (a fixed stream), shaped [n, 1, 1, d].
    fn draws(mix: &Mixture, n: usize) -> Array4<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d = mix.mu[0].len();
        let mut x = Array4::zeros((n, 1, 1, d));
        for mut row in x.outer_iter_mut() {
            let u: f64 = rng.random();
            let mut k = 0;
            let mut acc = mix.w[0];
            while u > acc && k + 1 < mix.w.len() {
                k += 1;
                acc += mix.w[k];
            }
            for (i, v) in row.iter_mut().enumerate() {
                let z: f64 = rng.sample(StandardNormal);
                *v = (mix.mu[k][i] + mix.v[k][i].sqrt() * z) as f32;
            }
        }
        x
    }

    #[test]
    fn single_gaussian_is_exact_with_one_rademacher_probe() {
        // A diagonal Gaussian: J is diagonal, so one Rademacher probe gives tr J exactly, and
        // eps is linear in x, so the central difference is exact up to float32 rounding
        // (~1e-4 nats here). Mean 0 makes the N(0, I) prior exact up to alpha_T² ~ 4e-5. RK4's
        // error at 128 steps is ~1e-5 (measured: 2e-3 at 32 steps, 1e-4 at 128, fourth order).
        let d = 6;
        let variances = (0..d).map(|i| 0.01 + 0.02 * i as f64).collect();
        let mut den = Mixture::gaussian(vec![0.0; d], variances);
        let sched = vp();
        let x = draws(&den, 8);
        let opts = LikelihoodOptions {
            solver: OdeSolver::Rk4 { steps: 128 },
            ..Default::default()
        };
        let (imgs, _) = estimate(&mut den, &sched, &x, opts);
        for (j, img) in imgs.iter().enumerate() {
            let exact = exact(&den, &sched, &x, j);
            assert!(
                (img.log_density - exact).abs() < 1e-3,
                "{j}: {} vs {exact}",
                img.log_density
            );
        }
    }

    #[test]
    fn mixture_estimate_is_unbiased() {
        // Two overlapping components: where responsibilities mix, J has large off-diagonal
        // entries, so single estimates scatter (by ~1 nat here with 8 probes), but the estimate
        // is unbiased over the probes: the mean error over 48 points must lie within 4 of its
        // standard errors (plus 0.01 nats for the solver and the finite differences).
        let d = 4;
        let mut den = Mixture {
            w: vec![0.6, 0.4],
            mu: vec![vec![0.3; d], vec![-0.2; d]],
            v: vec![vec![0.04; d], vec![0.02; d]],
        };
        for sched in [
            vp(),
            Schedule::Ve {
                sigma_min: 0.01,
                sigma_max: 50.0,
            },
        ] {
            let x = draws(&den, 48);
            let opts = LikelihoodOptions {
                probes: 8,
                ..Default::default()
            };
            let (imgs, _) = estimate(&mut den, &sched, &x, opts);
            let errors: Vec<f64> = imgs
                .iter()
                .enumerate()
                .map(|(j, img)| img.log_density - exact(&den, &sched, &x, j))
                .collect();
            let (bias, se) = mean_and_se(&errors);
            assert!(
                bias.abs() < 4.0 * se + 0.01 && se < 0.5,
                "{sched:?}: mean error {bias} ± {se}"
            );
        }
    }

    #[test]
    fn adaptive_solver_agrees_with_rk4() {
        let d = 3;
        let mut den = Mixture::gaussian(vec![0.5; d], vec![0.03; d]);
        let x = draws(&den, 4);
        let run = |den: &mut Mixture, solver| {
            let opts = LikelihoodOptions {
                solver,
                ..Default::default()
            };
            estimate(den, &vp(), &x, opts)
        };
        let (a, _) = run(&mut den, OdeSolver::Rk4 { steps: 64 });
        let (b, (acc, _)) = run(
            &mut den,
            OdeSolver::Adaptive {
                rtol: 1e-5,
                atol: 1e-5,
            },
        );
        assert!(acc > 3);
        for (p, q) in a.iter().zip(&b) {
            assert!((p.log_density - q.log_density).abs() < 1e-3, "{p:?} {q:?}");
        }
    }

    #[test]
    fn probes_do_not_depend_on_batching_and_are_rademacher() {
        let opts = LikelihoodOptions {
            probes: 2,
            ..Default::default()
        };
        let all = draw_probes(&opts, 0, 5, [1, 2, 2]);
        let tail = draw_probes(&opts, 3, 2, [1, 2, 2]);
        assert_eq!(all[1].slice(s![3..5, .., .., ..]), tail[1]);
        assert!(all[0].iter().all(|&v| v == 1.0 || v == -1.0));
        assert_ne!(all[0], all[1]);
    }

    #[test]
    fn validate_names_the_bad_option() {
        // By its library name: the CLI renders it as its flag (--probes), a C caller's message
        // says `probes`.
        let bad = |o: LikelihoodOptions| o.validate().unwrap_err().argument().unwrap().clone();
        let e = bad(LikelihoodOptions {
            probes: 0,
            ..Default::default()
        });
        assert_eq!(
            (e.arg(), e.to_string().as_str()),
            (Some("probes"), "probes 0 must be in 1..=256")
        );
        let e = bad(LikelihoodOptions {
            solver: OdeSolver::Rk4 { steps: 0 },
            ..Default::default()
        });
        assert_eq!(e.arg(), Some("steps"));
        let e = bad(LikelihoodOptions {
            batch_size: 0,
            ..Default::default()
        });
        assert_eq!(
            e.message_with(&|a| format!("--{a}")),
            "--batch_size must be at least 1"
        );
    }

    #[test]
    fn mean_and_standard_error() {
        let (m, se) = mean_and_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        // sample variance 5/3, / 4, sqrt
        assert!((se - (5.0f64 / 12.0).sqrt()).abs() < 1e-15);
    }
}
