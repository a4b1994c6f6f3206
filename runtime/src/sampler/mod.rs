//! Samplers: each one short function over a [`Denoiser`] and a list of [`NoiseLevel`]s ending at
//! the clean level. A sampler never knows which network, schedule or spacing it drives.

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod dpmpp;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lms;
pub mod ode_adaptive;
pub mod pndm;
pub mod sde;
pub mod unipc;

use ndarray::Array4;

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::NoiseLevel;

/// Called after each step with (steps done, total steps).
pub type Progress<'a> = dyn FnMut(usize, usize) + 'a;

/// What a sampler drives: the denoiser, its noise, and the levels to visit (clean last).
pub struct Trajectory<'a> {
    pub den: &'a mut dyn Denoiser,
    pub noise: &'a mut dyn NoiseSource,
    pub levels: &'a [NoiseLevel],
    /// The schedule's level at any sigma/alpha, for solvers that choose their own steps.
    pub level_at_sbar: &'a dyn Fn(f64) -> NoiseLevel,
    /// Steps each sample took, set by the solvers that choose their own steps.
    pub step_counts: Option<Vec<ode_adaptive::StepCount>>,
}

impl Trajectory<'_> {
    /// Number of steps (levels minus one).
    pub fn steps(&self) -> usize {
        self.levels.len() - 1
    }
}

/// Which sampler, with its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// DDPM ancestral sampling from the true posterior q(x_s | x_t, x0) (Ho et al. 2020).
    Ddpm,
    /// DDIM (Song et al. 2021) with stochasticity eta in [0, 1]; eta = 0 is deterministic.
    Ddim { eta: f64 },
    /// Euler on the probability-flow ODE in sigma/alpha (Karras et al. 2022).
    Euler,
    /// Heun's second-order method on the probability-flow ODE (Karras et al. 2022).
    Heun,
    /// Euler ancestral (k-diffusion), stochasticity eta.
    EulerAncestral { eta: f64 },
    /// Linear multistep in sigma/alpha, order 1..=4.
    Lms { order: usize },
    /// DPM-Solver singlestep (noise prediction), order 1..=3.
    DpmSolver { order: usize },
    /// DPM-Solver++ multistep, ODE (order 1..=3) or SDE (order 1..=2).
    DpmPlusPlus {
        order: usize,
        variant: dpmpp::DpmVariant,
    },
    /// Euler–Maruyama on the reverse SDE, final denoise.
    EulerMaruyama,
    /// Stochastic Heun (improved Euler) on the reverse SDE.
    SdeHeun,
    /// Langevin corrector + Euler–Maruyama predictor with signal-to-noise ratio `snr`.
    PredictorCorrector { snr: f64 },
    /// Bogacki–Shampine 3(2) with error control on the probability-flow ODE: one step size
    /// for the batch (`ode-adaptive`) or one per sample (`adaptive`).
    OdeAdaptive { tol: ode_adaptive::Tolerance },
    /// PNDM's PLMS (pseudo linear multistep with a Heun-like first step).
    Pndm,
    /// UniPC predictor-corrector (bh2, data prediction), predictor order 1..=3.
    UniPc { order: usize },
}

/// One line of `edgediff samplers`.
#[derive(Debug, Clone, Copy)]
pub struct SamplerInfo {
    pub name: &'static str,
    pub order: &'static str,
    pub stochastic: bool,
    pub calls_per_step: &'static str,
    pub summary: &'static str,
}

/// Every sampler the runtime has, for `edgediff samplers`.
pub const SAMPLERS: &[SamplerInfo] = &[
    SamplerInfo {
        name: "ddpm",
        order: "1",
        stochastic: true,
        calls_per_step: "1",
        summary: "DDPM ancestral sampling from the true posterior (Ho et al. 2020)",
    },
    SamplerInfo {
        name: "ddim",
        order: "1",
        stochastic: false,
        calls_per_step: "1",
        summary: "DDIM; --eta in [0, 1] adds DDPM-like noise (Song et al. 2021)",
    },
    SamplerInfo {
        name: "ode-euler",
        order: "1",
        stochastic: false,
        calls_per_step: "1",
        summary:
            "Euler on the probability-flow ODE in sigma/alpha (equals DDIM at the same levels)",
    },
    SamplerInfo {
        name: "heun",
        order: "2",
        stochastic: false,
        calls_per_step: "2 (1 on the last step)",
        summary: "Heun on the probability-flow ODE (Karras et al. 2022, Alg. 1)",
    },
    SamplerInfo {
        name: "euler-a",
        order: "1",
        stochastic: true,
        calls_per_step: "1",
        summary: "Euler ancestral (k-diffusion); --eta scales the noise",
    },
    SamplerInfo {
        name: "lms",
        order: "--order (default 4)",
        stochastic: false,
        calls_per_step: "1",
        summary: "linear multistep in sigma/alpha with exact Lagrange integrals",
    },
    SamplerInfo {
        name: "dpm-solver",
        order: "--order (default 3)",
        stochastic: false,
        calls_per_step: "1 per level (a step of order k spans k levels)",
        summary: "DPM-Solver singlestep, noise prediction (Lu et al. 2022a)",
    },
    SamplerInfo {
        name: "dpm++2m",
        order: "2",
        stochastic: false,
        calls_per_step: "1",
        summary: "DPM-Solver++ 2M multistep (Lu et al. 2022)",
    },
    SamplerInfo {
        name: "dpm++3m",
        order: "3",
        stochastic: false,
        calls_per_step: "1",
        summary: "DPM-Solver++ 3M multistep (Lu et al. 2022)",
    },
    SamplerInfo { name: "ode-adaptive", order: "3 (embedded 2)", stochastic: false, calls_per_step: "3 per accepted step (FSAL); --rtol/--atol choose the steps", summary: "Bogacki-Shampine 3(2) with error control in log sigma; --spacing is ignored" },
    SamplerInfo { name: "adaptive", order: "3 (embedded 2)", stochastic: false, calls_per_step: "3 per accepted step, per sample; --min-steps/--max-steps bound them", summary: "per-sample step-size control on the probability-flow ODE; reports each sample's steps" },
    SamplerInfo { name: "euler-maruyama", order: "1 (weak), 0.5 (strong)", stochastic: true, calls_per_step: "1", summary: "Euler-Maruyama on the reverse SDE, VP or VE, final denoise (Song et al. 2021)" },
    SamplerInfo { name: "sde-heun", order: "1 (strong, additive noise)", stochastic: true, calls_per_step: "2 (1 on the last step)", summary: "stochastic Heun on the reverse SDE, same noise for both stages" },
    SamplerInfo { name: "pc", order: "1", stochastic: true, calls_per_step: "2", summary: "predictor-corrector: Langevin corrector (--snr, default 0.16) + reverse-diffusion predictor" },
    SamplerInfo {
        name: "pndm",
        order: "4 (pseudo)",
        stochastic: false,
        calls_per_step: "1 (2 on the first step)",
        summary: "PNDM's PLMS: Adams-Bashforth on eps through the DDIM transfer (Liu et al. 2022)",
    },
    SamplerInfo {
        name: "unipc",
        order: "--order (default 2), +1 by UniC",
        stochastic: false,
        calls_per_step: "1",
        summary: "UniPC: UniP predictor with the UniC corrector, bh2 (Zhao et al. 2023)",
    },
    SamplerInfo {
        name: "dpm++2m-sde",
        order: "2 (weak)",
        stochastic: true,
        calls_per_step: "1",
        summary: "SDE DPM-Solver++ 2M, midpoint (Lu et al. 2022)",
    },
];

/// A sampler's own options as a caller gives them; each sampler reads the ones it uses (None:
/// the sampler's default, listed in `edgediff samplers`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplerParams {
    pub eta: Option<f64>,
    pub order: Option<usize>,
    pub snr: Option<f64>,
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    pub min_steps: Option<usize>,
    pub max_steps: Option<usize>,
}

impl SamplerKind {
    /// The sampler called `name` (as `edgediff samplers` lists it) with `params`, checked.
    pub fn new(name: &str, args: SamplerParams) -> Result<SamplerKind> {
        let eta = |default: f64| -> Result<f64> {
            let eta = args.eta.unwrap_or(default);
            if (0.0..=1.0).contains(&eta) {
                Ok(eta)
            } else {
                Err(Error::out_of_range("eta", eta, "is outside [0, 1]"))
            }
        };
        let order = |default: usize, max: usize| -> Result<usize> {
            let order = args.order.unwrap_or(default);
            if (1..=max).contains(&order) {
                Ok(order)
            } else {
                Err(Error::out_of_range(
                    "order",
                    order,
                    &format!("is outside 1..={max} for {name}"),
                ))
            }
        };
        use dpmpp::DpmVariant::{Ode, Sde};
        Ok(match name {
            "ddpm" => SamplerKind::Ddpm,
            "ddim" => SamplerKind::Ddim { eta: eta(0.0)? },
            "ode-euler" => SamplerKind::Euler,
            "heun" => SamplerKind::Heun,
            "euler-a" => SamplerKind::EulerAncestral { eta: eta(1.0)? },
            "lms" => SamplerKind::Lms {
                order: order(4, 4)?,
            },
            "dpm-solver" => SamplerKind::DpmSolver {
                order: order(3, 3)?,
            },
            "dpm++2m" => SamplerKind::DpmPlusPlus {
                order: order(2, 3)?,
                variant: Ode,
            },
            "dpm++3m" => SamplerKind::DpmPlusPlus {
                order: order(3, 3)?,
                variant: Ode,
            },
            "dpm++2m-sde" => SamplerKind::DpmPlusPlus {
                order: order(2, 2)?,
                variant: Sde,
            },
            "pndm" => SamplerKind::Pndm,
            "ode-adaptive" | "adaptive" => {
                let per_sample = name == "adaptive";
                let (rtol, atol) = (args.rtol.unwrap_or(1e-3), args.atol.unwrap_or(1e-3));
                if !(rtol > 0.0 && atol > 0.0 && rtol.is_finite() && atol.is_finite()) {
                    return Err(Error::options(
                        format!("{{0}} {rtol} and {{1}} {atol} must be positive"),
                        &["rtol", "atol"],
                    ));
                }
                let (min_steps, max_steps) = if per_sample {
                    (args.min_steps.unwrap_or(2), args.max_steps.unwrap_or(500))
                } else if args.min_steps.is_some() || args.max_steps.is_some() {
                    return Err(Error::options(
                        "{0}/{1} apply to the adaptive sampler",
                        &["min_steps", "max_steps"],
                    ));
                } else {
                    (1, 10_000)
                };
                if min_steps == 0 || max_steps < min_steps {
                    return Err(Error::options(
                        format!("{{0}} {min_steps} and {{1}} {max_steps} need 1 <= min <= max"),
                        &["min_steps", "max_steps"],
                    ));
                }
                SamplerKind::OdeAdaptive {
                    tol: ode_adaptive::Tolerance {
                        rtol,
                        atol,
                        min_steps,
                        max_steps,
                        per_sample,
                    },
                }
            }
            "euler-maruyama" => SamplerKind::EulerMaruyama,
            "sde-heun" => SamplerKind::SdeHeun,
            "pc" => {
                let snr = args.snr.unwrap_or(0.16);
                if !(snr > 0.0 && snr.is_finite()) {
                    return Err(Error::out_of_range("snr", snr, "must be positive"));
                }
                SamplerKind::PredictorCorrector { snr }
            }
            "unipc" => SamplerKind::UniPc {
                order: order(2, 3)?,
            },
            other => {
                let names: Vec<&str> = SAMPLERS.iter().map(|s| s.name).collect();
                return Err(Error::unknown("sampler", other, &names));
            }
        })
    }

    /// The name `edgediff samplers` lists.
    pub fn name(&self) -> &'static str {
        use dpmpp::DpmVariant::{Ode, Sde};
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim { .. } => "ddim",
            SamplerKind::Euler => "ode-euler",
            SamplerKind::Heun => "heun",
            SamplerKind::EulerAncestral { .. } => "euler-a",
            SamplerKind::Lms { .. } => "lms",
            SamplerKind::DpmSolver { .. } => "dpm-solver",
            SamplerKind::DpmPlusPlus { variant: Sde, .. } => "dpm++2m-sde",
            SamplerKind::DpmPlusPlus {
                order: 3,
                variant: Ode,
            } => "dpm++3m",
            SamplerKind::DpmPlusPlus { .. } => "dpm++2m",
            SamplerKind::UniPc { .. } => "unipc",
            SamplerKind::Pndm => "pndm",
            SamplerKind::OdeAdaptive { tol } if tol.per_sample => "adaptive",
            SamplerKind::OdeAdaptive { .. } => "ode-adaptive",
            SamplerKind::EulerMaruyama => "euler-maruyama",
            SamplerKind::SdeHeun => "sde-heun",
            SamplerKind::PredictorCorrector { .. } => "pc",
        }
    }

    /// Whether the sampler draws fresh noise during sampling (so one initial noise does not
    /// fix its output).
    pub fn is_stochastic(&self) -> bool {
        match *self {
            SamplerKind::Ddim { eta } | SamplerKind::EulerAncestral { eta } => eta > 0.0,
            SamplerKind::DpmPlusPlus { variant, .. } => variant == dpmpp::DpmVariant::Sde,
            SamplerKind::Ddpm
            | SamplerKind::EulerMaruyama
            | SamplerKind::SdeHeun
            | SamplerKind::PredictorCorrector { .. } => true,
            _ => false,
        }
    }

    /// Whether the sampler chooses its own steps (ignoring the level grid between its ends).
    pub fn is_adaptive(&self) -> bool {
        matches!(self, SamplerKind::OdeAdaptive { .. })
    }

    /// Network evaluations per sample for a trajectory of `steps` steps.
    pub fn model_calls(&self, steps: usize) -> usize {
        match self {
            SamplerKind::Heun | SamplerKind::SdeHeun => 2 * steps - 1,
            SamplerKind::PredictorCorrector { .. } => 2 * steps,
            SamplerKind::Pndm if steps > 1 => steps + 1,
            _ => steps,
        }
    }

    /// Runs the sampler from `x` (noise at `tr.levels[0]`) to the last level.
    pub fn run(
        &self,
        tr: &mut Trajectory<'_>,
        x: Array4<f32>,
        progress: &mut Progress<'_>,
    ) -> Result<Array4<f32>> {
        match *self {
            SamplerKind::Ddpm => ddpm::ddpm(tr, x, progress),
            SamplerKind::Ddim { eta } => ddim::ddim(tr, x, eta, progress),
            SamplerKind::Euler => euler::euler(tr, x, progress),
            SamplerKind::Heun => heun::heun(tr, x, progress),
            SamplerKind::EulerAncestral { eta } => {
                euler_ancestral::euler_ancestral(tr, x, eta, progress)
            }
            SamplerKind::Lms { order } => lms::lms(tr, x, order, progress),
            SamplerKind::DpmSolver { order } => dpm_solver::dpm_solver(tr, x, order, progress),
            SamplerKind::DpmPlusPlus { order, variant } => {
                dpmpp::dpmpp(tr, x, order, variant, progress)
            }
            SamplerKind::UniPc { order } => unipc::unipc(tr, x, order, progress),
            SamplerKind::Pndm => pndm::pndm(tr, x, progress),
            SamplerKind::OdeAdaptive { tol } => {
                let (x, counts) = ode_adaptive::ode_adaptive(tr, x, tol, progress)?;
                let acc: Vec<usize> = counts.iter().map(|c| c.accepted).collect();
                log::info!(
                    "{}: {}..{} accepted steps per sample, {} rejected in all",
                    self.name(),
                    acc.iter().min().unwrap_or(&0),
                    acc.iter().max().unwrap_or(&0),
                    counts.iter().map(|c| c.rejected).sum::<usize>()
                );
                tr.step_counts = Some(counts);
                Ok(x)
            }
            SamplerKind::EulerMaruyama => sde::euler_maruyama(tr, x, progress),
            SamplerKind::SdeHeun => sde::sde_heun(tr, x, progress),
            SamplerKind::PredictorCorrector { snr } => {
                sde::predictor_corrector(tr, x, snr, progress)
            }
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;

    /// The sampler called `name` with its default options: `"dpm++2m".parse()`.
    fn from_str(name: &str) -> Result<SamplerKind> {
        SamplerKind::new(name, SamplerParams::default())
    }
}

/// sum_k c_k a_k elementwise, accumulated in f64: the one update every sampler is made of.
///
/// Steps from the top of steep schedules (cosine at t = T-1, alpha ~ 1e-2) multiply O(1)
/// samples by coefficients in the hundreds that then cancel; f32 products would lose ~1e-5.
pub(crate) fn lincomb(terms: &[(f64, &Array4<f32>)]) -> Array4<f32> {
    let shape = terms[0].1.raw_dim();
    let slices: Vec<(f64, std::borrow::Cow<'_, [f32]>)> = terms
        .iter()
        .map(|(c, a)| {
            debug_assert_eq!(a.raw_dim(), shape);
            let data = match a.as_slice() {
                Some(s) => std::borrow::Cow::Borrowed(s),
                None => std::borrow::Cow::Owned(a.iter().copied().collect()),
            };
            (*c, data)
        })
        .collect();
    let len = slices[0].1.len();
    let out: Vec<f32> = (0..len)
        .map(|i| slices.iter().map(|(c, s)| c * s[i] as f64).sum::<f64>() as f32)
        .collect();
    Array4::from_shape_vec(shape, out).expect("same shape as the inputs")
}

/// a x + b y (+ c z), accumulated in f64 (see [`lincomb`]).
pub(crate) fn combine(
    a: f64,
    x: &Array4<f32>,
    b: f64,
    y: &Array4<f32>,
    c: f64,
    z: Option<&Array4<f32>>,
) -> Array4<f32> {
    match z {
        Some(z) => lincomb(&[(a, x), (b, y), (c, z)]),
        None => lincomb(&[(a, x), (b, y)]),
    }
}

/// Variance of the true posterior q(x_s | x_t, x0) for s < t on any VP or VE schedule:
/// sigma_{t|s}² sigma_s² / sigma_t² with sigma_{t|s}² = sigma_t² - (alpha_t/alpha_s)² sigma_s².
pub(crate) fn posterior_variance(cur: &NoiseLevel, next: &NoiseLevel) -> f64 {
    let a_ts = cur.alpha / next.alpha;
    let s2_ts = cur.sigma.powi(2) - a_ts.powi(2) * next.sigma.powi(2);
    (s2_ts * next.sigma.powi(2) / cur.sigma.powi(2)).max(0.0)
}
