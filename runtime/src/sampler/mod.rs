//! Samplers: each one short function over a [`Denoiser`] and a list of [`NoiseLevel`]s ending at
//! the clean level. A sampler never knows which network, schedule or spacing it drives.
//!
//! # Adding a sampler
//!
//! A sampler is one file that ends with its registry entry, a `pub static` [`SamplerDef`]: the
//! row `edgediff samplers` prints, the options it takes with their defaults ([`SamplerOption`]),
//! when it is stochastic, and its `run` function. Most `run`s are a `Trajectory::walk` over
//! one step built from the shared maths in `ops` (the DDIM/Euler transfer, the f64 `lincomb`):
//!
//! ```ignore
//! use ndarray::Array4;
//!
//! use super::ops::transfer;
//! use super::{SamplerDef, Step, Trajectory};
//! use crate::error::Result;
//!
//! /// An Euler half step to the middle sbar, then the whole step along the slope there.
//! fn step(tr: &mut Trajectory<'_>, s: Step<'_>) -> Result<Array4<f32>> {
//!     let mid = tr.schedule.level_for_sbar(0.5 * (s.cur.sbar() + s.next.sbar()));
//!     let half = transfer(s.x, &s.d.eps, &s.cur, &mid);
//!     let eps = tr.den.denoise(&half, &mid)?.eps;
//!     Ok(transfer(s.x, &eps, &s.cur, &s.next))
//! }
//!
//! pub static MIDPOINT: SamplerDef = SamplerDef::new("midpoint", "2", "2")
//!     .summary("explicit midpoint on the probability-flow ODE")
//!     .run(|_, tr, x, progress| tr.walk(x, progress, step));
//! ```
//!
//! It is registered with one line, `&midpoint::MIDPOINT,` in [`REGISTRY`] (whose order is the
//! listing's), next to the `pub mod midpoint;` every Rust file needs. [`SamplerKind::new`] then
//! finds it by name, resolves and checks its options, and runs it; nothing else changes.

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod dpmpp;
pub mod euler;
pub mod euler_ancestral;
pub mod fitted;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod ode_adaptive;
pub(crate) mod ops;
pub mod pndm;
pub mod sde;
pub mod tcd;
pub mod unipc;

use ndarray::Array4;

use crate::denoiser::{Denoised, Denoiser};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::{NoiseLevel, Schedule};
use crate::spacing::LeadingRatio;

use ops::lincomb;

/// Every sampler the runtime has, in the order `edgediff samplers` lists them.
pub static REGISTRY: &[&SamplerDef] = &[
    &ddpm::DDPM,
    &ddim::DDIM,
    &euler::EULER,
    &heun::HEUN,
    &euler_ancestral::EULER_ANCESTRAL,
    &lms::LMS,
    &dpm_solver::DPM_SOLVER,
    &dpmpp::DPMPP_2M,
    &dpmpp::DPMPP_3M,
    &ode_adaptive::ODE_ADAPTIVE,
    &ode_adaptive::ADAPTIVE,
    &sde::EULER_MARUYAMA,
    &sde::SDE_HEUN,
    &sde::PREDICTOR_CORRECTOR,
    &pndm::PNDM,
    &unipc::UNIPC,
    &dpmpp::DPMPP_2M_SDE,
    &lcm::LCM,
    &tcd::TCD,
    &fitted::FITTED,
];

/// Called after each step with (steps done, total steps).
pub type Progress<'a> = dyn FnMut(usize, usize) + 'a;

/// What a sampler drives: the denoiser, its noise, and the levels to visit (clean last).
pub struct Trajectory<'a> {
    pub den: &'a mut dyn Denoiser,
    pub noise: &'a mut dyn NoiseSource,
    pub levels: &'a [NoiseLevel],
    /// The model's schedule, for samplers that visit levels of their own between the grid's
    /// (solvers that choose their own steps, TCD's intermediate level) or need the training
    /// index of one (LCM's boundary condition).
    pub schedule: &'a Schedule,
    /// Steps each sample took, set by the solvers that choose their own steps.
    pub step_counts: Option<Vec<ode_adaptive::StepCount>>,
    /// The `fitted` sampler's coefficients, one row per step ([`fitted`]); None elsewhere.
    pub coefficients: Option<&'a [Vec<f64>]>,
}

/// One step of a [`Trajectory::walk`]: from `cur` to `next`, the `i`-th (0-based) of `n`, with
/// the sample `x` at `cur` and the denoiser's answer `d` there.
pub(crate) struct Step<'x> {
    pub i: usize,
    pub n: usize,
    pub cur: NoiseLevel,
    pub next: NoiseLevel,
    pub x: &'x Array4<f32>,
    pub d: Denoised,
}

impl<'a> Trajectory<'a> {
    /// Number of steps (levels minus one).
    pub fn steps(&self) -> usize {
        self.levels.len() - 1
    }

    /// Runs `step` from the first level to the last: each call gets x and the denoiser's answer
    /// at the current level and returns x at the next; `progress` hears of every step. The
    /// closure gets the trajectory back for its own extra calls and noise.
    pub(crate) fn walk(
        &mut self,
        mut x: Array4<f32>,
        progress: &mut Progress<'_>,
        mut step: impl FnMut(&mut Trajectory<'a>, Step<'_>) -> Result<Array4<f32>>,
    ) -> Result<Array4<f32>> {
        let n = self.steps();
        for i in 0..n {
            let (cur, next) = (self.levels[i], self.levels[i + 1]);
            let d = self.den.denoise(&x, &cur)?;
            x = step(
                self,
                Step {
                    i,
                    n,
                    cur,
                    next,
                    x: &x,
                    d,
                },
            )?;
            progress(i + 1, n);
        }
        Ok(x)
    }

    /// The f64 linear combination of `terms`, plus `noise` times step `i`'s fresh noise when
    /// `noise` is given. The noise is drawn only then: seeded streams are sequential, so a draw
    /// a sampler does not use would shift every later one.
    pub(crate) fn lincomb_with_noise(
        &mut self,
        i: usize,
        terms: &[(f64, &Array4<f32>)],
        noise: Option<f64>,
    ) -> Result<Array4<f32>> {
        match noise {
            Some(scale) => {
                let z = self.noise.step(i)?;
                let mut all = terms.to_vec();
                all.push((scale, &z));
                Ok(lincomb(&all))
            }
            None => Ok(lincomb(terms)),
        }
    }
}

/// How a sampler runs: from `x` (noise at the trajectory's first level) to its last level.
pub(crate) type RunFn =
    fn(&Settings, &mut Trajectory<'_>, Array4<f32>, &mut Progress<'_>) -> Result<Array4<f32>>;

/// A sampler as its file declares it: the description `edgediff samplers` prints, the options
/// it takes, and how it runs. [`REGISTRY`] lists them all.
///
/// A file builds its entry with `SamplerDef::new` and the setters after it; what it does not
/// set keeps the common case: deterministic, no options, on the given level grid.
#[derive(Debug)]
pub struct SamplerDef {
    name: &'static str,
    order: &'static str,
    calls_per_step: &'static str,
    summary: &'static str,
    options: &'static [SamplerOption],
    stochastic: Stochastic,
    adaptive: bool,
    check: Option<fn(&SamplerParams) -> Result<()>>,
    run: Option<RunFn>,
    leading: LeadingRatio,
    final_alpha: bool,
    consistency_grid: bool,
    discrete: bool,
}

/// An option a sampler takes, with its default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerOption {
    /// `eta` in [0, 1].
    Eta(f64),
    /// `gamma` in [0, 1]: TCD's stochasticity (diffusers' `eta` of TCDScheduler.step).
    Gamma(f64),
    /// `order` in 1..=`max`.
    Order { default: usize, max: usize },
    /// `snr`, positive.
    Snr(f64),
    /// `rtol` and `atol`, both positive and finite.
    Tolerance { rtol: f64, atol: f64 },
    /// `min_steps` and `max_steps` with 1 <= min <= max.
    StepRange { min: usize, max: usize },
}

/// When a sampler draws fresh noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stochastic {
    /// An ODE solver: the initial noise fixes the output.
    Never,
    /// Fresh noise at every step.
    Always,
    /// Fresh noise when its `eta` is above 0.
    WithEta,
    /// Fresh noise when its `gamma` is above 0.
    WithGamma,
}

/// A sampler's options resolved: the caller's values or the sampler's defaults, checked. The
/// fields of options the sampler does not take are 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub eta: f64,
    pub gamma: f64,
    pub order: usize,
    pub snr: f64,
    pub rtol: f64,
    pub atol: f64,
    pub min_steps: usize,
    pub max_steps: usize,
}

impl Settings {
    const NONE: Settings = Settings {
        eta: 0.0,
        gamma: 0.0,
        order: 0,
        snr: 0.0,
        rtol: 0.0,
        atol: 0.0,
        min_steps: 0,
        max_steps: 0,
    };
}

/// A sampler's own options as a caller gives them; each sampler reads the ones it uses (None:
/// the sampler's default, listed in `edgediff samplers`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplerParams {
    pub eta: Option<f64>,
    pub gamma: Option<f64>,
    pub order: Option<usize>,
    pub snr: Option<f64>,
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    pub min_steps: Option<usize>,
    pub max_steps: Option<usize>,
}

impl SamplerDef {
    /// The sampler users choose by `name`, listed with its `order` of accuracy and its network
    /// `calls_per_step` (both in the listing's words).
    const fn new(
        name: &'static str,
        order: &'static str,
        calls_per_step: &'static str,
    ) -> SamplerDef {
        SamplerDef {
            name,
            order,
            calls_per_step,
            summary: "",
            options: &[],
            stochastic: Stochastic::Never,
            adaptive: false,
            check: None,
            run: None,
            leading: LeadingRatio::Steps,
            final_alpha: false,
            consistency_grid: false,
            discrete: false,
        }
    }

    /// What it is, in one line of the listing.
    const fn summary(self, summary: &'static str) -> SamplerDef {
        SamplerDef { summary, ..self }
    }

    /// The options it reads, with their defaults, checked in this order; it ignores the others.
    const fn options(self, options: &'static [SamplerOption]) -> SamplerDef {
        SamplerDef { options, ..self }
    }

    /// When it draws fresh noise during sampling.
    const fn stochastic(self, stochastic: Stochastic) -> SamplerDef {
        SamplerDef { stochastic, ..self }
    }

    /// It chooses its own steps, ignoring the level grid between its ends.
    const fn adaptive(self) -> SamplerDef {
        SamplerDef {
            adaptive: true,
            ..self
        }
    }

    /// A check of the caller's parameters beyond each option's own range, run after those.
    const fn check(self, check: fn(&SamplerParams) -> Result<()>) -> SamplerDef {
        SamplerDef {
            check: Some(check),
            ..self
        }
    }

    /// The leading spacing of its diffusers counterpart, which a text-to-image pipeline's
    /// defaults follow ([`crate::SampleOptions::leading_as_diffusers`]).
    const fn leading(self, leading: LeadingRatio) -> SamplerDef {
        SamplerDef { leading, ..self }
    }

    /// Its diffusers counterpart honours `set_alpha_to_one` (DDIM's and PNDM's
    /// `final_alpha_cumprod`): with it false, the last step ends at alpha-bar of training step
    /// 0, not at clean data. The other schedulers end at sigma 0 whatever the setting.
    const fn final_alpha(self) -> SamplerDef {
        SamplerDef {
            final_alpha: true,
            ..self
        }
    }

    /// Its diffusers counterpart (LCMScheduler, TCDScheduler) places its steps on the
    /// distillation's grid whatever the config's `timestep_spacing` says: with
    /// [`crate::SampleOptions::leading_as_diffusers`] (a pipeline's defaults) it runs on
    /// [`crate::spacing::Spacing::Lcm`] too.
    const fn consistency_grid(self) -> SamplerDef {
        SamplerDef {
            consistency_grid: true,
            ..self
        }
    }

    /// It needs training indices (a discrete schedule): its maths is written on them.
    const fn discrete(self) -> SamplerDef {
        SamplerDef {
            discrete: true,
            ..self
        }
    }

    /// How it runs.
    const fn run(self, run: RunFn) -> SamplerDef {
        SamplerDef {
            run: Some(run),
            ..self
        }
    }

    /// The name users choose it by.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The options it takes, with their defaults.
    pub const fn takes(&self) -> &'static [SamplerOption] {
        self.options
    }

    /// How its diffusers counterpart lays out leading time steps.
    pub const fn leading_ratio(&self) -> LeadingRatio {
        self.leading
    }

    /// Whether `set_alpha_to_one = false` moves its last step (see the setter).
    pub const fn ends_at_final_alpha(&self) -> bool {
        self.final_alpha
    }

    /// Whether it chooses its own steps (ignoring the level grid between its ends).
    pub const fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    /// Whether a pipeline's defaults put its steps on the consistency grid (see the setter).
    pub const fn on_consistency_grid(&self) -> bool {
        self.consistency_grid
    }

    /// Whether it runs on discrete schedules only.
    pub const fn needs_discrete_schedule(&self) -> bool {
        self.discrete
    }

    /// Its options at their defaults (evaluated at compile time for the listing and the
    /// `const` constructors).
    pub const fn defaults(&self) -> Settings {
        let mut s = Settings::NONE;
        let mut k = 0;
        while k < self.options.len() {
            match self.options[k] {
                SamplerOption::Eta(eta) => s.eta = eta,
                SamplerOption::Gamma(gamma) => s.gamma = gamma,
                SamplerOption::Order { default, .. } => s.order = default,
                SamplerOption::Snr(snr) => s.snr = snr,
                SamplerOption::Tolerance { rtol, atol } => (s.rtol, s.atol) = (rtol, atol),
                SamplerOption::StepRange { min, max } => (s.min_steps, s.max_steps) = (min, max),
            }
            k += 1;
        }
        s
    }

    /// The highest order it takes, if it takes one.
    const fn max_order(&self) -> Option<usize> {
        let mut k = 0;
        while k < self.options.len() {
            if let SamplerOption::Order { max, .. } = self.options[k] {
                return Some(max);
            }
            k += 1;
        }
        None
    }

    /// Whether it draws fresh noise with `settings`.
    pub const fn is_stochastic(&self, settings: &Settings) -> bool {
        match self.stochastic {
            Stochastic::Never => false,
            Stochastic::Always => true,
            Stochastic::WithEta => settings.eta > 0.0,
            Stochastic::WithGamma => settings.gamma > 0.0,
        }
    }

    /// Its row of `edgediff samplers` (stochastic as it is with its defaults).
    pub const fn info(&self) -> SamplerInfo {
        SamplerInfo {
            name: self.name,
            order: self.order,
            stochastic: self.is_stochastic(&self.defaults()),
            calls_per_step: self.calls_per_step,
            summary: self.summary,
        }
    }

    /// The caller's `params` over its defaults, each checked against the option's range.
    fn resolve(&self, params: &SamplerParams) -> Result<Settings> {
        let mut s = Settings::NONE;
        for option in self.options {
            match *option {
                SamplerOption::Eta(default) => {
                    s.eta = params.eta.unwrap_or(default);
                    if !(0.0..=1.0).contains(&s.eta) {
                        return Err(Error::out_of_range("eta", s.eta, "is outside [0, 1]"));
                    }
                }
                SamplerOption::Gamma(default) => {
                    s.gamma = params.gamma.unwrap_or(default);
                    if !(0.0..=1.0).contains(&s.gamma) {
                        return Err(Error::out_of_range("gamma", s.gamma, "is outside [0, 1]"));
                    }
                }
                SamplerOption::Order { default, max } => {
                    s.order = params.order.unwrap_or(default);
                    if !(1..=max).contains(&s.order) {
                        let allowed = format!("is outside 1..={max} for {}", self.name);
                        return Err(Error::out_of_range("order", s.order, &allowed));
                    }
                }
                SamplerOption::Snr(default) => {
                    s.snr = params.snr.unwrap_or(default);
                    if !(s.snr > 0.0 && s.snr.is_finite()) {
                        return Err(Error::out_of_range("snr", s.snr, "must be positive"));
                    }
                }
                SamplerOption::Tolerance { rtol, atol } => {
                    let (rtol, atol) = (params.rtol.unwrap_or(rtol), params.atol.unwrap_or(atol));
                    check_tolerances(rtol, atol)?;
                    (s.rtol, s.atol) = (rtol, atol);
                }
                SamplerOption::StepRange { min, max } => {
                    let min = params.min_steps.unwrap_or(min);
                    let max = params.max_steps.unwrap_or(max);
                    if min == 0 || max < min {
                        return Err(Error::options(
                            format!("{{0}} {min} and {{1}} {max} need 1 <= min <= max"),
                            &["min_steps", "max_steps"],
                        ));
                    }
                    (s.min_steps, s.max_steps) = (min, max);
                }
            }
        }
        if let Some(check) = self.check {
            check(params)?;
        }
        Ok(s)
    }
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

/// Every sampler's row of `edgediff samplers`, in [`REGISTRY`] order.
pub const SAMPLERS: &[SamplerInfo] = &{
    let empty = SamplerInfo {
        name: "",
        order: "",
        stochastic: false,
        calls_per_step: "",
        summary: "",
    };
    let mut rows = [empty; REGISTRY.len()];
    let mut k = 0;
    while k < rows.len() {
        rows[k] = REGISTRY[k].info();
        k += 1;
    }
    rows
};

/// Which sampler, with its options resolved: a registry entry and its [`Settings`].
#[derive(Clone, Copy)]
pub struct SamplerKind {
    def: &'static SamplerDef,
    settings: Settings,
}

impl SamplerKind {
    /// Deterministic DDIM (eta 0), the default sampler.
    pub const DDIM: SamplerKind = SamplerKind::of(&ddim::DDIM);

    /// The sampler called `name` (as `edgediff samplers` lists it) with `params`, checked.
    pub fn new(name: &str, params: SamplerParams) -> Result<SamplerKind> {
        let Some(def) = REGISTRY.iter().find(|d| d.name == name) else {
            let names: Vec<&str> = REGISTRY.iter().map(|d| d.name).collect();
            return Err(Error::unknown("sampler", name, &names));
        };
        Ok(SamplerKind {
            def,
            settings: def.resolve(&params)?,
        })
    }

    /// The sampler `def` with its default options: `SamplerKind::of(&sampler::heun::HEUN)`.
    pub const fn of(def: &'static SamplerDef) -> SamplerKind {
        SamplerKind {
            def,
            settings: def.defaults(),
        }
    }

    /// The same sampler with order `order`: `SamplerKind::of(&unipc::UNIPC).with_order(3)`.
    ///
    /// # Panics
    ///
    /// If the sampler takes no order or `order` is outside its range (at compile time when
    /// used in a `const`); [`SamplerKind::new`] is the checked way for orders from input.
    pub const fn with_order(self, order: usize) -> SamplerKind {
        match self.def.max_order() {
            Some(max) if order >= 1 && order <= max => SamplerKind {
                settings: Settings {
                    order,
                    ..self.settings
                },
                ..self
            },
            _ => panic!("the sampler takes no such order"),
        }
    }

    /// The name `edgediff samplers` lists.
    pub fn name(&self) -> &'static str {
        self.def.name
    }

    /// How its diffusers counterpart lays out leading time steps.
    pub fn leading_ratio(&self) -> LeadingRatio {
        self.def.leading
    }

    /// Its registry entry (description and options).
    pub fn def(&self) -> &'static SamplerDef {
        self.def
    }

    /// Its resolved options.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether the sampler draws fresh noise during sampling (so one initial noise does not
    /// fix its output).
    pub fn is_stochastic(&self) -> bool {
        self.def.is_stochastic(&self.settings)
    }

    /// Whether the sampler chooses its own steps (ignoring the level grid between its ends).
    pub fn is_adaptive(&self) -> bool {
        self.def.adaptive
    }

    /// Runs the sampler from `x` (noise at `tr.levels[0]`) to the last level.
    pub fn run(
        &self,
        tr: &mut Trajectory<'_>,
        x: Array4<f32>,
        progress: &mut Progress<'_>,
    ) -> Result<Array4<f32>> {
        let run = self
            .def
            .run
            .expect("every registered sampler sets run (tested)");
        run(&self.settings, tr, x, progress)
    }
}

impl PartialEq for SamplerKind {
    fn eq(&self, other: &SamplerKind) -> bool {
        self.def.name == other.def.name && self.settings == other.settings
    }
}

impl std::fmt::Debug for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerKind")
            .field("name", &self.def.name)
            .field("settings", &self.settings)
            .finish()
    }
}

/// The tightest error tolerance an ODE solver accepts. float32 samples (resolution 1.2e-7)
/// cannot be solved much more exactly; tolerances a little below that still serve to force the
/// step bounds (the tests use 1e-9), while 1e-300 only made a run crawl to its step cap.
pub const MIN_TOLERANCE: f64 = 1e-12;

/// Checks `rtol` and `atol` of an error-controlled solver: each in [[`MIN_TOLERANCE`], 1].
pub(crate) fn check_tolerances(rtol: f64, atol: f64) -> Result<()> {
    let ok = |t: f64| (MIN_TOLERANCE..=1.0).contains(&t); // false for NaN
    if ok(rtol) && ok(atol) {
        return Ok(());
    }
    Err(Error::options(
        format!("{{0}} {rtol:e} and {{1}} {atol:e} must be in [{MIN_TOLERANCE:e}, 1]"),
        &["rtol", "atol"],
    ))
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;

    /// The sampler called `name` with its default options: `"dpm++2m".parse()`.
    fn from_str(name: &str) -> Result<SamplerKind> {
        SamplerKind::new(name, SamplerParams::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_default_passes_its_own_checks() {
        for (k, def) in REGISTRY.iter().enumerate() {
            assert!(
                REGISTRY[..k].iter().all(|d| d.name != def.name),
                "{}",
                def.name
            );
            let kind = SamplerKind::new(def.name, SamplerParams::default()).unwrap();
            assert_eq!(kind, SamplerKind::of(def));
            assert_eq!(SAMPLERS[k].name, def.name);
            assert!(def.run.is_some() && !def.summary.is_empty(), "{}", def.name);
        }
    }

    #[test]
    fn stochastic_follows_eta() {
        let ddim = |eta| SamplerKind::new("ddim", with(|p| p.eta = eta));
        assert!(!ddim(None).unwrap().is_stochastic());
        assert!(ddim(Some(0.5)).unwrap().is_stochastic());
        assert!(SAMPLERS.iter().any(|s| s.name == "euler-a" && s.stochastic));
        assert!(SamplerKind::new("pc", SamplerParams::default())
            .unwrap()
            .is_stochastic());
    }

    /// Default parameters with `set` applied.
    fn with(set: impl FnOnce(&mut SamplerParams)) -> SamplerParams {
        let mut p = SamplerParams::default();
        set(&mut p);
        p
    }

    #[test]
    #[rustfmt::skip] // a table reads better one case a line
    fn options_are_checked_by_their_library_names() {
        let cases = [
            ("lms", with(|p| p.order = Some(5)), "order 5 is outside 1..=4 for lms"),
            ("ddim", with(|p| p.eta = Some(2.0)), "eta 2 is outside [0, 1]"),
            ("tcd", with(|p| p.gamma = Some(1.5)), "gamma 1.5 is outside [0, 1]"),
            ("pc", with(|p| p.snr = Some(0.0)), "snr 0 must be positive"),
            ("ode-adaptive", with(|p| p.min_steps = Some(3)), "min_steps/max_steps apply to the adaptive sampler"),
            ("adaptive", with(|p| p.min_steps = Some(0)), "min_steps 0 and max_steps 500 need 1 <= min <= max"),
        ];
        for (name, params, message) in cases {
            let e = SamplerKind::new(name, params).unwrap_err();
            let a = e.argument().unwrap();
            assert_eq!(a.to_string(), message);
            assert!(message.starts_with(a.arg().unwrap()), "{message}");
        }
        assert!("nope".parse::<SamplerKind>().is_err());
    }

    #[test]
    fn const_constructors_match_the_checked_ones() {
        const UNIPC3: SamplerKind = SamplerKind::of(&unipc::UNIPC).with_order(3);
        let checked = SamplerKind::new("unipc", with(|p| p.order = Some(3)));
        assert_eq!(UNIPC3, checked.unwrap());
        assert_eq!(SamplerKind::DDIM, "ddim".parse().unwrap());
        assert_eq!(SamplerKind::DDIM.settings().eta, 0.0);
    }
}
