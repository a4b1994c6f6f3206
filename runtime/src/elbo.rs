//! The full discrete ELBO of a discrete-time model, in bits per dimension (Ho et al. 2020,
//! eq. 5): for 8-bit data x_0 on 256 levels,
//!
//! -log p(x_0) ≤ L_T + Σ_{t=2..T} L_{t-1} + L_0, with
//!
//! - L_T = KL(q(x_T | x_0) || N(0, I)), in closed form (no network call);
//! - L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) between Gaussians at one
//!   x_t ~ q(x_t | x_0): the true posterior N(μ̃_t(x_t, x_0), β̃_t) against the model's
//!   N(μ̃_t(x_t, x̂_0), σ_t²), where x̂_0 is the denoiser's prediction (any prediction type),
//!   so the means differ by μ̃ - μ_θ = √ᾱ_{t-1} β_t / (1 - ᾱ_t) (x_0 - x̂_0);
//! - L_0 = -log p_θ(x_0 | x_1), the discretized Gaussian decoder (eq. 13): the mass of
//!   N(x̂_0, σ_1²) over each pixel's bin, the two edge bins open to ±∞.
//!
//! Ho's t = 1..T is the schedule index t - 1 = 0..T-1 here. The reverse variance σ_t² is the
//! posterior variance β̃_t ([`ReverseVariance::Small`], the default) or β_t
//! ([`ReverseVariance::Large`]). β̃_1 = 0, so the decoder takes σ_1² = β̃_2 in both cases, as
//! Ho et al.'s code does (its clipped log-variance). x̂_0 is used unclipped, as sampling uses
//! it by default; the decoder's probabilities have no floor (Ho's code floors them at 1e-12).
//!
//! The sum over t is estimated by Monte Carlo: each image draws K timesteps t_k from a
//! proposal p over {2..T} (with replacement) and the sum is the mean of L_{t_k-1} / p(t_k),
//! unbiased for any p > 0; L_T is always exact and L_0 a mean over `decoder_draws` draws of x_1, and
//! [`TimestepSampling::All`] evaluates every t instead. Two proposals:
//!
//! - [`Proposal::Uniform`], p = 1/(T - 1): simple, but the terms fall by orders of magnitude
//!   with t (L_1 alone is a sixth of the sum for the shipped MNIST model), so its variance is
//!   large: on the shipped model one draw's standard deviation is about 4.4 bits/dim, and a
//!   1% standard error on 64 images needs K of about T;
//! - [`Proposal::Importance`] (the default): L_{t-1} = ½ (SNR_{t-1} - SNR_t) E‖x_0 - x̂_0‖²
//!   (Kingma et al. 2021), i.e. |Δ log SNR_t| times the eps-prediction error; taking that
//!   error as the one of the best linear denoiser for data of variance v (SNR v / (1 + SNR v)
//!   per dimension, v = ((hi - lo)/2)²), p(t) ∝ |Δ log SNR_t| SNR_t v / (1 + SNR_t v) tracks
//!   the terms to within a slowly varying factor: about 0.3 bits/dim per draw on the shipped
//!   model, 200 times less variance than uniform draws. A model whose eps error does not
//!   vanish at low SNR (an untrained one) has terms ∝ |Δ log SNR| there, which that p
//!   undersamples by 1/SNR: rare draws with huge weights, and a sample variance that
//!   understates the error. So 5% of p is uniform in log SNR (∝ |Δ log SNR_t|), which bounds
//!   every weight by 20 times the eps error's (defensive importance sampling; it costs 2% in
//!   standard deviation on the shipped model).
//!
//! Timesteps and noise come from the image's own seeded stream ([`SeededNoise`]), so results
//! do not depend on the batch size. Nats become bits per dimension by dividing by D ln 2.
//!
//! ```no_run
//! use edgediff::elbo::{elbo, ElboOptions, PixelScale, TimestepSampling};
//! edgediff::init_onnxruntime(None)?;
//! let mut model = edgediff::Model::open("models/mnist-ddpm.onnx")?;
//! let pixels = ndarray::Array4::<u8>::zeros((2, 1, 28, 28));
//! let images = PixelScale::By255.to_model_range(pixels.view(), model.metadata().data_range);
//! let opts = ElboOptions { timesteps: TimestepSampling::Draws(100), ..Default::default() };
//! let report = elbo(&mut model, images.view(), &opts, None, &mut |_, _| {})?;
//! let s = report.summary();
//! println!("{:.3} ± {:.3} bits/dim", s.bits_per_dim, s.standard_error.unwrap_or(f64::NAN));
//! # Ok::<(), edgediff::Error>(())
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ndarray::{s, Array4, ArrayView4, ArrayView5, Axis};

use crate::denoiser::{Denoiser, ModelDenoiser, Rows};
use crate::error::{Error, Result};
use crate::gaussian::{discretized_gaussian_log_prob, gaussian_kl, prior_kl, Bin};
use crate::generate::{class_label_for, MAX_BATCH_BYTES};
use crate::metadata::ModelMetadata;
use crate::model::Model;
use crate::noise::SeededNoise;
use crate::schedule::{NoiseLevel, Schedule};

/// Levels of 8-bit data.
pub const LEVELS: usize = 256;

/// How the 256 pixel levels k = 0..255 sit in the model's data range [lo, hi].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelScale {
    /// lo + (hi - lo) k / 255: the levels span the range (Ho et al.: 2k/255 - 1).
    By255,
    /// lo + (hi - lo) k / 256: pixel/256 data, as `mnist.pkl` stores it and the shipped MNIST
    /// models were trained on (k/128 - 1; the top level is 1 - 1/128).
    By256,
}

impl PixelScale {
    /// 255 or 256.
    pub fn divisor(self) -> f64 {
        match self {
            PixelScale::By255 => 255.0,
            PixelScale::By256 => 256.0,
        }
    }

    /// The distance between neighbouring levels (twice a bin's half-width).
    pub fn step(self, [lo, hi]: [f64; 2]) -> f64 {
        (hi - lo) / self.divisor()
    }

    /// The value of level `k`.
    pub fn value(self, k: u8, range: [f64; 2]) -> f64 {
        range[0] + k as f64 * self.step(range)
    }

    /// Raw 0..255 pixels as float32 images in the model's data range.
    pub fn to_model_range(self, pixels: ArrayView4<u8>, range: [f64; 2]) -> Array4<f32> {
        pixels.mapv(|k| self.value(k, range) as f32)
    }

    /// The level of `x`, if it lies within a thousandth of a step of one.
    fn level_of(self, x: f32, range: [f64; 2]) -> Option<u8> {
        let pos = (x as f64 - range[0]) / self.step(range);
        let k = pos.round();
        ((0.0..LEVELS as f64).contains(&k) && (pos - k).abs() <= 1e-3).then_some(k as u8)
    }

    /// Every pixel's level, or the first (flat index, value) that is off this grid.
    fn levels(
        self,
        images: ArrayView4<f32>,
        range: [f64; 2],
    ) -> std::result::Result<Vec<u8>, (usize, f32)> {
        images
            .iter()
            .enumerate()
            .map(|(i, &x)| self.level_of(x, range).ok_or((i, x)))
            .collect()
    }

    /// The grid float images lie on: [`PixelScale::By255`] if every pixel is on it, else
    /// [`PixelScale::By256`]; an error naming the first stray pixel when neither fits. (The two
    /// grids share only the lowest level, so one non-background pixel decides.)
    pub fn detect(images: ArrayView4<f32>, range: [f64; 2]) -> Result<PixelScale> {
        let by255 = PixelScale::By255.levels(images, range);
        if by255.is_ok() {
            return Ok(PixelScale::By255);
        }
        if PixelScale::By256.levels(images, range).is_ok() {
            return Ok(PixelScale::By256);
        }
        let (i, x) = by255.expect_err("checked above");
        Err(off_grid(images.shape(), i, x, range, None))
    }
}

fn off_grid(
    shape: &[usize],
    flat: usize,
    x: f32,
    [lo, hi]: [f64; 2],
    scale: Option<PixelScale>,
) -> Error {
    let per = shape[1..].iter().product::<usize>();
    let grids = match scale {
        Some(s) => format!("lo + (hi - lo) k / {}", s.divisor()),
        None => "lo + (hi - lo) k / 255 or / 256".into(),
    };
    Error::invalid(format!(
        "image {} has the value {x} (flat pixel {}), which is not on the 256-level grid {grids} of the model's data range [{lo}, {hi}] (k = 0..255); the ELBO is for 8-bit data: give raw uint8 pixels, or floats quantised to that grid",
        flat / per,
        flat % per
    ))
}

/// The reverse process's variance σ_t² for t ≥ 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReverseVariance {
    /// The posterior variance β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t).
    #[default]
    Small,
    /// β_t.
    Large,
}

/// Which timesteps of the KL sum are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSampling {
    /// Every t = 2..T (T - 1 network calls per image besides L_0's).
    All,
    /// This many timesteps per image, drawn from the options' [`Proposal`] with replacement.
    Draws(usize),
}

/// The distribution Monte Carlo timesteps are drawn from (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proposal {
    /// Uniform on {2..T}.
    Uniform,
    /// 0.95 × (∝ |Δ log SNR_t| SNR_t v / (1 + SNR_t v)) + 0.05 × (∝ |Δ log SNR_t|):
    /// importance sampling with a defensive share.
    #[default]
    Importance,
}

impl Proposal {
    /// The probabilities of schedule indices j = 1..T-1 (Ho's t = 2..T), summing to one.
    pub fn probabilities(self, alphas_cumprod: &[f64], data_range: [f64; 2]) -> Vec<f64> {
        let m = alphas_cumprod.len() - 1;
        let normalised = |w: Vec<f64>| {
            let total: f64 = w.iter().sum();
            w.into_iter().map(|w| w / total).collect::<Vec<f64>>()
        };
        match self {
            Proposal::Uniform => vec![1.0 / m as f64; m],
            Proposal::Importance => {
                let v = (0.5 * (data_range[1] - data_range[0])).powi(2);
                let log_snr = |ab: f64| (ab / (1.0 - ab)).ln();
                let dls: Vec<f64> = (1..=m)
                    .map(|j| (log_snr(alphas_cumprod[j - 1]) - log_snr(alphas_cumprod[j])).abs())
                    .collect();
                let tracking = normalised(
                    (1..=m)
                        .map(|j| {
                            let snr_v = alphas_cumprod[j] / (1.0 - alphas_cumprod[j]) * v;
                            dls[j - 1] * snr_v / (1.0 + snr_v)
                        })
                        .collect(),
                );
                let defensive = normalised(dls);
                tracking
                    .iter()
                    .zip(&defensive)
                    .map(|(a, b)| (1.0 - DEFENSIVE_SHARE) * a + DEFENSIVE_SHARE * b)
                    .collect()
            }
        }
    }
}

/// What to compute and how.
#[derive(Debug, Clone)]
pub struct ElboOptions {
    pub timesteps: TimestepSampling,
    pub proposal: Proposal,
    /// Seed of the per-image streams of timesteps and noise.
    pub seed: u64,
    /// Network evaluations (image-timestep pairs) per call; memory grows with it, not with
    /// the number of images.
    pub batch_size: usize,
    pub variance: ReverseVariance,
    /// The data's grid; None detects it from the images.
    pub pixel_scale: Option<PixelScale>,
    /// Bins of t for the breakdown of the KL sum.
    pub bins: usize,
    /// Noise draws of x_1 that L_0 is averaged over (its variance needs two or more).
    pub decoder_draws: usize,
    /// When set, the run stops with [`Error::Cancelled`] before its next network call.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ElboOptions {
    fn default() -> Self {
        ElboOptions {
            timesteps: TimestepSampling::Draws(DEFAULT_TIMESTEPS_PER_IMAGE),
            proposal: Proposal::Importance,
            seed: 0,
            batch_size: 64,
            variance: ReverseVariance::Small,
            pixel_scale: None,
            bins: 10,
            decoder_draws: DEFAULT_DECODER_DRAWS,
            cancel: None,
        }
    }
}

/// The share of the importance proposal that is uniform in log SNR.
const DEFENSIVE_SHARE: f64 = 0.05;

/// The CLI's and C API's default number of x_1 draws for L_0.
pub const DEFAULT_DECODER_DRAWS: usize = 4;

/// Most timestep or decoder draws per image (beyond it the exact modes are cheaper anyway).
pub const MAX_DRAWS: usize = 100_000;

/// The CLI's and C API's default K.
pub const DEFAULT_TIMESTEPS_PER_IMAGE: usize = 100;

/// One image's terms, in nats.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageElbo {
    /// L_T.
    pub prior: f64,
    /// Σ_{t=2..T} L_{t-1}: exact with all timesteps, else the Monte Carlo estimate.
    pub kl: f64,
    /// The variance of `kl` from its draws (timesteps and their noise): 0 with all timesteps
    /// (whose one noise draw per t it does not count), None with one draw.
    pub kl_variance: Option<f64>,
    /// L_0, the mean over the decoder's noise draws of x_1.
    pub reconstruction: f64,
    /// The variance of `reconstruction` from those draws; None with one draw.
    pub reconstruction_variance: Option<f64>,
    /// `kl` split by the report's t bins (they sum to `kl`).
    pub kl_bins: Vec<f64>,
}

impl ImageElbo {
    /// The negative ELBO L_T + Σ L_{t-1} + L_0.
    pub fn total(&self) -> f64 {
        self.prior + self.kl + self.reconstruction
    }
}

/// The result of [`elbo`]: per-image terms and how they were computed.
#[derive(Debug, Clone)]
pub struct ElboReport {
    pub images: Vec<ImageElbo>,
    /// D = C H W.
    pub dims: usize,
    /// T.
    pub num_train_timesteps: usize,
    /// The bins of Ho's t (2..=T) the KL breakdown uses, as inclusive ranges.
    pub bins: Vec<(usize, usize)>,
    pub timesteps: TimestepSampling,
    pub proposal: Proposal,
    pub pixel_scale: PixelScale,
    pub variance: ReverseVariance,
    pub network_calls: usize,
}

/// Means over images, in bits per dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct ElboSummary {
    /// The negative ELBO.
    pub bits_per_dim: f64,
    /// Standard error of `bits_per_dim` over images and draws (the spread of the per-image
    /// estimates / √N): how well it estimates the data distribution's mean. None for one image.
    pub standard_error: Option<f64>,
    /// The part of the error due to the random draws alone (timesteps and noise of the KL
    /// terms, the decoder's x_1 noise), for these very images: what separates two runs with
    /// different seeds. With all timesteps it counts the decoder's draws only; None when a part
    /// had one draw per image.
    pub mc_standard_error: Option<f64>,
    pub prior: f64,
    pub kl: f64,
    pub reconstruction: f64,
    pub kl_bins: Vec<f64>,
}

impl ElboReport {
    /// Nats of one image to bits per dimension.
    pub fn to_bits_per_dim(&self, nats: f64) -> f64 {
        nats / (self.dims as f64 * std::f64::consts::LN_2)
    }

    /// Each image's negative ELBO in bits per dimension.
    pub fn per_image_bits_per_dim(&self) -> Vec<f64> {
        self.images
            .iter()
            .map(|e| self.to_bits_per_dim(e.total()))
            .collect()
    }

    /// Means over the images, with standard errors.
    pub fn summary(&self) -> ElboSummary {
        let n = self.images.len() as f64;
        let mean = |f: &dyn Fn(&ImageElbo) -> f64| {
            self.images
                .iter()
                .map(|e| self.to_bits_per_dim(f(e)))
                .sum::<f64>()
                / n
        };
        let totals = self.per_image_bits_per_dim();
        let (bpd, se) = crate::likelihood::mean_and_se(&totals);
        let standard_error = (self.images.len() > 1).then_some(se);
        let mc_standard_error = self
            .images
            .iter()
            .map(|e| Some(e.kl_variance? + e.reconstruction_variance?))
            .sum::<Option<f64>>()
            .map(|v| self.to_bits_per_dim(v.sqrt()) / n);
        ElboSummary {
            bits_per_dim: bpd,
            standard_error,
            mc_standard_error,
            prior: mean(&|e| e.prior),
            kl: mean(&|e| e.kl),
            reconstruction: mean(&|e| e.reconstruction),
            kl_bins: (0..self.bins.len())
                .map(|b| mean(&|e| e.kl_bins[b]))
                .collect(),
        }
    }
}

/// The Gaussians of one step t ≥ 2 (schedule index j = t - 1 ≥ 1).
#[derive(Debug, Clone, Copy)]
struct StepTerms {
    level: NoiseLevel,
    /// μ̃ - μ_θ = coef (x_0 - x̂_0).
    coef: f64,
    /// β̃_t.
    var_q: f64,
    /// σ_t².
    var_p: f64,
}

fn step_terms(betas: &[f64], alphas_cumprod: &[f64], variance: ReverseVariance) -> Vec<StepTerms> {
    let mut terms = Vec::with_capacity(betas.len());
    for j in 0..betas.len() {
        let (beta, ab) = (betas[j], alphas_cumprod[j]);
        let ab_prev = if j == 0 { 1.0 } else { alphas_cumprod[j - 1] };
        let var_q = beta * (1.0 - ab_prev) / (1.0 - ab);
        terms.push(StepTerms {
            level: NoiseLevel {
                t: j as f64,
                alpha: ab.sqrt(),
                sigma: (1.0 - ab).sqrt(),
            },
            coef: ab_prev.sqrt() * beta / (1.0 - ab),
            var_q,
            var_p: match variance {
                ReverseVariance::Small => var_q,
                ReverseVariance::Large => beta,
            },
        });
    }
    terms
}

/// Running mean and sum of squared deviations of a stream of draws (Welford), for their
/// variance without keeping them.
#[derive(Debug, Clone, Default)]
struct Welford {
    count: usize,
    mean: f64,
    m2: f64,
}

impl Welford {
    fn add(&mut self, v: f64) {
        self.count += 1;
        let d = v - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (v - self.mean);
    }

    /// The variance of the draws' mean, s² / count with their sample variance s²; None with
    /// fewer than two draws.
    fn variance_of_mean(&self) -> Option<f64> {
        (self.count > 1).then(|| self.m2 / (self.count - 1) as f64 / self.count as f64)
    }
}

/// One image's draws: the weighted KL terms L_{t-1}/p(t) (also summed per t bin) and the
/// decoder's -log p(x_0 | x_1).
#[derive(Debug, Clone)]
struct Draws {
    kl: Welford,
    bins: Vec<f64>,
    decoder: Welford,
}

impl Draws {
    fn new(bins: usize) -> Draws {
        Draws {
            kl: Welford::default(),
            bins: vec![0.0; bins],
            decoder: Welford::default(),
        }
    }

    fn add(&mut self, kl: f64, bin: usize) {
        self.kl.add(kl);
        self.bins[bin] += kl;
    }
}

/// The ELBO of `images` (`[N, C, H, W]`, float32 in the model's data range, on the 256-level
/// grid) under a discrete-schedule model; see the module documentation for the terms.
///
/// `noise`, when given, replaces the seeded noise: `[N, T, C, H, W]`, entry `[i, j]` making
/// x at schedule index j for image i (j = 0 for L_0), with [`TimestepSampling::All`] only
/// (to reproduce another implementation's computation exactly). `progress(done, total)`
/// counts image-timestep evaluations.
pub fn elbo(
    model: &mut Model,
    images: ArrayView4<f32>,
    opts: &ElboOptions,
    noise: Option<ArrayView5<f32>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ElboReport> {
    check_model(model)?;
    let plan = Plan::new(model, images, opts, noise.as_ref())?;
    let (draws, network_calls) = evaluate(model, &plan, opts, noise, progress)?;
    Ok(report(&plan, opts, &draws, network_calls))
}

/// Refuses a model [`elbo`] cannot bound: a text-to-image pipeline (a bound on the latents
/// given a prompt would not be the images' bits/dim). Public so that a front end can refuse
/// before reading data shaped for the model.
pub fn check_model(model: &Model) -> Result<()> {
    if model.pipeline().is_some() {
        return Err(Error::not_for_pipelines(
            "the ELBO",
            "the bound would be of the VAE's latents given a prompt, not of the images",
        ));
    }
    Ok(())
}

/// The betas and alpha-bars of a discrete schedule, or why the model has none.
fn discrete_tables(model: &Model) -> Result<(Vec<f64>, Vec<f64>)> {
    let (betas, alphas_cumprod) = match model.schedule() {
        Schedule::Discrete {
            betas,
            alphas_cumprod,
            ..
        } => (betas.clone(), alphas_cumprod.clone()),
        other => {
            return Err(Error::invalid(format!(
                "the ELBO needs a discrete-time model (T noise levels with betas); {} has a continuous {} schedule",
                model.path().display(),
                if matches!(other, Schedule::Vp { .. }) { "VP" } else { "VE" }
            )))
        }
    };
    if betas.len() < 2 {
        return Err(Error::invalid(format!(
            "the ELBO needs at least 2 training timesteps; the model has {}",
            betas.len()
        )));
    }
    Ok((betas, alphas_cumprod))
}

/// Checks the images, the options and the injected noise against a model with `t_count`
/// training timesteps; returns the KL terms each image evaluates.
fn validate(
    meta: &ModelMetadata,
    t_count: usize,
    images: ArrayView4<f32>,
    opts: &ElboOptions,
    noise: Option<&ArrayView5<f32>>,
) -> Result<usize> {
    let [c, h, w] = meta.sample_shape;
    let dims = c * h * w;
    let n = images.shape()[0];
    if images.shape()[1..] != meta.sample_shape {
        return Err(Error::invalid(format!(
            "the images have shape {:?}; the model takes [N, {c}, {h}, {w}]",
            images.shape()
        )));
    }
    if n == 0 {
        return Err(Error::invalid("no images given"));
    }
    if opts.batch_size == 0 || opts.batch_size.saturating_mul(4 * dims) > MAX_BATCH_BYTES {
        return Err(Error::out_of_range(
            "batch_size",
            opts.batch_size,
            &format!("must be in 1..={}", MAX_BATCH_BYTES / (4 * dims)),
        ));
    }
    if opts.bins == 0 || opts.bins > t_count - 1 {
        return Err(Error::out_of_range(
            "bins",
            opts.bins,
            &format!("must be in 1..={} (the number of KL terms)", t_count - 1),
        ));
    }
    let draws_per_image = match opts.timesteps {
        TimestepSampling::All => t_count - 1,
        TimestepSampling::Draws(0) => {
            return Err(Error::options(
                "{0} must be at least 1",
                &["timesteps_per_image"],
            ))
        }
        TimestepSampling::Draws(k) if k > MAX_DRAWS => {
            return Err(Error::options(
                format!("{{0}} {k} is more than {MAX_DRAWS}; use {{1}} for the exact sum"),
                &["timesteps_per_image", "all_timesteps"],
            ))
        }
        TimestepSampling::Draws(k) => k,
    };
    if opts.decoder_draws == 0 || opts.decoder_draws > MAX_DRAWS {
        return Err(Error::out_of_range(
            "decoder_draws",
            opts.decoder_draws,
            &format!("must be in 1..={MAX_DRAWS}"),
        ));
    }
    if let Some(z) = noise {
        if opts.timesteps != TimestepSampling::All || opts.decoder_draws != 1 {
            return Err(Error::options(
                "{0} applies to {1} with {2} 1",
                &["noise", "all_timesteps", "decoder_draws"],
            ));
        }
        if z.shape() != [n, t_count, c, h, w] {
            return Err(Error::options(
                format!(
                    "{{0}} has shape {:?}; expected [{n}, {t_count}, {c}, {h}, {w}] (one noise per image and timestep)",
                    z.shape()
                ),
                &["noise"],
            ));
        }
    }
    Ok(draws_per_image)
}

/// Everything fixed before the first network call: the images' pixel levels, the step terms,
/// the proposal and the t bins.
struct Plan {
    /// N.
    n: usize,
    /// D = C H W.
    dims: usize,
    sample_shape: [usize; 3],
    /// T.
    t_count: usize,
    range: [f64; 2],
    scale: PixelScale,
    /// Every pixel's level, image by image.
    levels: Vec<u8>,
    /// Ho's terms per schedule index j (entry 0 is only the decoder's level).
    terms: Vec<StepTerms>,
    /// The proposal's probabilities of j = 1..T-1 (entry j - 1) and their cumulative sums,
    /// for inverse-CDF draws.
    probs: Vec<f64>,
    cdf: Vec<f64>,
    /// σ_1 of the decoder N(x̂_0, σ_1²).
    decoder_std: f64,
    /// Half a pixel bin in the data range.
    half_width: f64,
    /// The report's bins of Ho's t, as inclusive ranges.
    bins: Vec<(usize, usize)>,
    /// The label each network call gets (the null label of a class-conditional model).
    label: Option<i64>,
    /// KL terms per image.
    draws_per_image: usize,
    /// ᾱ_T, for L_T.
    alpha_bar_last: f64,
}

impl Plan {
    /// Validates the request and fixes the plan.
    fn new(
        model: &Model,
        images: ArrayView4<f32>,
        opts: &ElboOptions,
        noise: Option<&ArrayView5<f32>>,
    ) -> Result<Plan> {
        let meta = model.metadata();
        let (betas, alphas_cumprod) = discrete_tables(model)?;
        let t_count = betas.len();
        let draws_per_image = validate(meta, t_count, images, opts, noise)?;
        let range = meta.data_range;
        let scale = match opts.pixel_scale {
            Some(s) => s,
            None => PixelScale::detect(images, range)?,
        };
        let levels = scale
            .levels(images, range)
            .map_err(|(i, x)| off_grid(images.shape(), i, x, range, Some(scale)))?;
        let label = class_label_for(meta, None)?;
        let terms = step_terms(&betas, &alphas_cumprod, opts.variance);
        // With all timesteps every term has weight 1.
        let probs = match opts.timesteps {
            TimestepSampling::All => vec![1.0 / (t_count - 1) as f64; t_count - 1],
            TimestepSampling::Draws(_) => opts.proposal.probabilities(&alphas_cumprod, range),
        };
        let cdf: Vec<f64> = probs
            .iter()
            .scan(0.0, |acc, p| {
                *acc += p;
                Some(*acc)
            })
            .collect();
        Ok(Plan {
            n: images.shape()[0],
            dims: meta.sample_len(),
            sample_shape: meta.sample_shape,
            t_count,
            range,
            scale,
            levels,
            // β̃_1 = 0: the decoder takes β̃_2, as Ho et al.'s code does.
            decoder_std: terms[1].var_q.sqrt(),
            terms,
            probs,
            cdf,
            half_width: 0.5 * scale.step(range),
            bins: t_bins(opts.bins, t_count),
            label,
            draws_per_image,
            alpha_bar_last: alphas_cumprod[t_count - 1],
        })
    }

    /// Pixel `d` of clean image `i`.
    fn x0(&self, i: usize, d: usize) -> f64 {
        self.scale.value(self.levels[i * self.dims + d], self.range)
    }

    /// The importance weight 1/p(j) of a drawn term (1 when every term is evaluated).
    fn weight(&self, timesteps: TimestepSampling, j: usize) -> f64 {
        match timesteps {
            TimestepSampling::All => 1.0,
            TimestepSampling::Draws(_) => 1.0 / self.probs[j - 1],
        }
    }

    /// The report bin of schedule index j ≥ 1.
    fn bin_of(&self, j: usize) -> usize {
        (j - 1) * self.bins.len() / (self.t_count - 1)
    }

    /// Image `i`'s KL terms: every j, or draws from its own stream (which come first in the
    /// stream, before the image's noise).
    fn timesteps_of(
        &self,
        i: usize,
        timesteps: TimestepSampling,
        streams: &mut SeededNoise,
    ) -> Vec<usize> {
        match timesteps {
            TimestepSampling::All => (1..self.t_count).collect(),
            TimestepSampling::Draws(k) => streams
                .unit_draws(i, k)
                .into_iter()
                .map(|u| 1 + self.cdf.partition_point(|&c| c <= u).min(self.t_count - 2))
                .collect(),
        }
    }

    /// -log p(x_0 | x_1) of image `i` given the decoder's mean x̂_0.
    fn decoder_nll(&self, i: usize, x0_hat: &[f64]) -> f64 {
        -x0_hat
            .iter()
            .enumerate()
            .map(|(d, &m)| {
                let k = self.levels[i * self.dims + d];
                let bin = Bin::of_level(k as usize, LEVELS);
                discretized_gaussian_log_prob(
                    self.x0(i, d),
                    m,
                    self.decoder_std,
                    self.half_width,
                    bin,
                )
            })
            .sum::<f64>()
    }

    /// L_{j} of image `i` (Ho's L_{t-1}, t = j + 1) given the prediction x̂_0 at index j.
    fn kl_term(&self, i: usize, j: usize, x0_hat: &[f64]) -> f64 {
        let st = self.terms[j];
        x0_hat
            .iter()
            .enumerate()
            .map(|(d, &m)| gaussian_kl(st.coef * (self.x0(i, d) - m), st.var_q, st.var_p))
            .sum::<f64>()
    }
}

/// `count` bins of Ho's t = 2..=T as inclusive ranges, j = t - 1 going to bin
/// (j - 1) count / (T - 1).
fn t_bins(count: usize, t_count: usize) -> Vec<(usize, usize)> {
    let bin_of = |j: usize| (j - 1) * count / (t_count - 1);
    (0..count)
        .map(|b| {
            let js: Vec<usize> = (1..t_count).filter(|&j| bin_of(j) == b).collect();
            (js[0] + 1, js[js.len() - 1] + 1)
        })
        .collect()
}

/// Runs every (image, schedule index) evaluation of the plan in batches of
/// `opts.batch_size`: each image's decoder draws (j = 0), then its KL terms. Returns each
/// image's draws and the network calls made.
fn evaluate(
    model: &mut Model,
    plan: &Plan,
    opts: &ElboOptions,
    noise: Option<ArrayView5<f32>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Draws>, usize)> {
    let n = plan.n;
    let mut draws = vec![Draws::new(plan.bins.len()); n];
    let mut streams = SeededNoise::new(opts.seed, 0, n, plan.sample_shape);
    let mut den = ModelDenoiser::new(model, plan.label.map(|k| vec![k; n]), 0)
        .with_cancel(opts.cancel.clone());
    // Both factors are capped above, so this cannot overflow for any n that fits in memory.
    let total_jobs = n.saturating_mul(opts.decoder_draws + plan.draws_per_image);
    let mut done = 0;
    let mut pending: Vec<(usize, usize)> = Vec::with_capacity(opts.batch_size);
    // The streams are a parameter: the loop below draws each image's timesteps from them too.
    let mut flush = |jobs: &mut Vec<(usize, usize)>, streams: &mut SeededNoise| -> Result<()> {
        let eps = batch_noise(jobs, streams, noise.as_ref(), plan.sample_shape);
        evaluate_batch(plan, opts.timesteps, &mut den, jobs, &eps, &mut draws)?;
        done += jobs.len();
        progress(done, total_jobs);
        jobs.clear();
        Ok(())
    };
    for i in 0..n {
        let js = plan.timesteps_of(i, opts.timesteps, &mut streams);
        for j in std::iter::repeat_n(0, opts.decoder_draws).chain(js) {
            pending.push((i, j));
            if pending.len() == opts.batch_size {
                flush(&mut pending, &mut streams)?;
            }
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut streams)?;
    }
    Ok((draws, den.calls()))
}

/// The noise of each job (image i, index j): the injected `[i, j]`, else the next draw from
/// image i's stream.
fn batch_noise(
    jobs: &[(usize, usize)],
    streams: &mut SeededNoise,
    noise: Option<&ArrayView5<f32>>,
    [c, h, w]: [usize; 3],
) -> Array4<f32> {
    match noise {
        Some(z) => {
            let mut e = Array4::zeros((jobs.len(), c, h, w));
            for (r, &(i, j)) in jobs.iter().enumerate() {
                e.index_axis_mut(Axis(0), r)
                    .assign(&z.slice(s![i, j, .., .., ..]));
            }
            e
        }
        None => {
            let rows: Vec<usize> = jobs.iter().map(|&(i, _)| i).collect();
            streams.draw_rows(&rows)
        }
    }
}

/// One network call for `jobs`: x_j = alpha_j x_0 + sigma_j eps per job, the denoiser's
/// x̂_0, and each job's term added to its image's draws.
fn evaluate_batch(
    plan: &Plan,
    timesteps: TimestepSampling,
    den: &mut dyn Denoiser,
    jobs: &[(usize, usize)],
    eps: &Array4<f32>,
    draws: &mut [Draws],
) -> Result<()> {
    let rows: Vec<usize> = jobs.iter().map(|&(i, _)| i).collect();
    let lv: Vec<NoiseLevel> = jobs.iter().map(|&(_, j)| plan.terms[j].level).collect();
    let mut xt = Array4::<f32>::zeros(eps.raw_dim());
    for (r, &(i, _)) in jobs.iter().enumerate() {
        let (a, s) = (lv[r].alpha, lv[r].sigma);
        let (mut x, e) = (xt.index_axis_mut(Axis(0), r), eps.index_axis(Axis(0), r));
        for (d, (x, &e)) in x.iter_mut().zip(e.iter()).enumerate() {
            *x = (a * plan.x0(i, d) + s * e as f64) as f32;
        }
    }
    let pred = den.denoise_rows(
        &xt,
        Rows {
            index: &rows,
            levels: &lv,
        },
    )?;
    for (r, &(i, j)) in jobs.iter().enumerate() {
        let (a, s) = (lv[r].alpha, lv[r].sigma);
        // x̂_0 in f64 from the network's eps and the very x_t it saw.
        let x0_hat = xt
            .index_axis(Axis(0), r)
            .iter()
            .zip(pred.eps.index_axis(Axis(0), r).iter())
            .map(|(&x, &e)| (x as f64 - s * e as f64) / a)
            .collect::<Vec<f64>>();
        if j == 0 {
            draws[i].decoder.add(plan.decoder_nll(i, &x0_hat));
        } else {
            let kl = plan.kl_term(i, j, &x0_hat);
            draws[i].add(kl * plan.weight(timesteps, j), plan.bin_of(j));
        }
    }
    Ok(())
}

/// The report from each image's draws.
fn report(plan: &Plan, opts: &ElboOptions, draws: &[Draws], network_calls: usize) -> ElboReport {
    ElboReport {
        images: draws
            .iter()
            .enumerate()
            .map(|(i, dr)| image_elbo(plan, opts.timesteps, i, dr))
            .collect(),
        dims: plan.dims,
        num_train_timesteps: plan.t_count,
        bins: plan.bins.clone(),
        timesteps: opts.timesteps,
        proposal: opts.proposal,
        pixel_scale: plan.scale,
        variance: opts.variance,
        network_calls,
    }
}

/// Image `i`'s terms: L_T exact, the KL sum as the sum (all timesteps) or the mean of the
/// weighted draws, L_0 the mean of the decoder's draws.
fn image_elbo(plan: &Plan, timesteps: TimestepSampling, i: usize, dr: &Draws) -> ImageElbo {
    let scale_kl = match timesteps {
        TimestepSampling::All => 1.0,
        TimestepSampling::Draws(k) => 1.0 / k as f64,
    };
    ImageElbo {
        prior: (0..plan.dims)
            .map(|d| prior_kl(plan.x0(i, d), plan.alpha_bar_last))
            .sum(),
        kl: dr.kl.mean * dr.kl.count as f64 * scale_kl,
        kl_variance: match timesteps {
            // Exact: the one noise draw per t is not counted.
            TimestepSampling::All => Some(0.0),
            TimestepSampling::Draws(_) => dr.kl.variance_of_mean(),
        },
        reconstruction: dr.decoder.mean,
        reconstruction_variance: dr.decoder.variance_of_mean(),
        kl_bins: dr.bins.iter().map(|b| b * scale_kl).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_scales_place_and_recognise_levels() {
        let r = [-1.0, 1.0];
        assert_eq!(PixelScale::By255.value(255, r), 1.0);
        assert_eq!(PixelScale::By256.value(255, r), 1.0 - 1.0 / 128.0);
        let px = Array4::from_shape_fn((1, 1, 2, 2), |(_, _, i, j)| (i * 200 + j * 55) as u8);
        for s in [PixelScale::By255, PixelScale::By256] {
            let x = s.to_model_range(px.view(), r);
            assert_eq!(PixelScale::detect(x.view(), r).unwrap(), s);
            assert_eq!(s.levels(x.view(), r).unwrap(), vec![0, 55, 200, 255]);
        }
        let mut off = PixelScale::By255.to_model_range(px.view(), r);
        off[[0, 0, 1, 0]] += 0.002;
        let msg = PixelScale::detect(off.view(), r).unwrap_err().to_string();
        assert!(
            msg.contains("image 0") && msg.contains("flat pixel 2"),
            "{msg}"
        );
    }

    #[test]
    fn proposals_are_distributions_with_bounded_weights() {
        let spec = crate::metadata::ScheduleSpec::Linear {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        };
        let Schedule::Discrete { alphas_cumprod, .. } = Schedule::from_spec(&spec).unwrap() else {
            panic!()
        };
        let uniform = Proposal::Uniform.probabilities(&alphas_cumprod, [-1.0, 1.0]);
        let imp = Proposal::Importance.probabilities(&alphas_cumprod, [-1.0, 1.0]);
        for p in [&uniform, &imp] {
            assert_eq!(p.len(), 999);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(p.iter().all(|&q| q > 0.0));
        }
        // Terms proportional to |Δ log SNR| (an eps error that never vanishes) get weights at
        // most 1/0.05 times their log-SNR-uniform ones.
        let ls: Vec<f64> = alphas_cumprod
            .iter()
            .map(|a| (a / (1.0 - a)).ln())
            .collect();
        let total = ls[0] - ls[999];
        for j in 1..1000 {
            let uniform_in_log_snr = (ls[j - 1] - ls[j]) / total;
            assert!(uniform_in_log_snr / imp[j - 1] <= 20.0 + 1e-9);
        }
        // Importance puts more mass on t = 2 than uniform draws (the largest term there).
        assert!(imp[0] > 20.0 * uniform[0]);
    }

    #[test]
    fn step_terms_are_ho_et_al_s_posterior() {
        let betas: Vec<f64> = (0..10).map(|i| 0.01 + 0.02 * i as f64).collect();
        let ab: Vec<f64> = betas
            .iter()
            .scan(1.0, |p, b| {
                *p *= 1.0 - b;
                Some(*p)
            })
            .collect();
        let terms = step_terms(&betas, &ab, ReverseVariance::Small);
        for j in 1..10 {
            // The posterior q(x_{t-1} | x_t, x_0) from Bayes' rule on the two Gaussians
            // q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t) and q(x_{t-1} | x_0) = N(√ᾱ_{t-1} x_0, 1 - ᾱ_{t-1}):
            // precision α_t / β_t + 1 / (1 - ᾱ_{t-1}), x_0 weight √ᾱ_{t-1} / (1 - ᾱ_{t-1}) / precision.
            let alpha = 1.0 - betas[j];
            let prec = alpha / betas[j] + 1.0 / (1.0 - ab[j - 1]);
            let coef = ab[j - 1].sqrt() / (1.0 - ab[j - 1]) / prec;
            assert!((terms[j].var_q - 1.0 / prec).abs() < 1e-14);
            assert!((terms[j].coef - coef).abs() < 1e-14);
            assert_eq!(terms[j].var_p, terms[j].var_q);
        }
        let large = step_terms(&betas, &ab, ReverseVariance::Large);
        assert_eq!(large[4].var_p, betas[4]);
    }
}
