//! The sampling entry point shared by the CLI and the C ABI: options in, samples out.

use std::collections::HashMap;

use ndarray::{concatenate, s, Array3, Array4, Axis};

use crate::clip::Clipped;
use crate::denoiser::{Denoiser, ModelDenoiser, X0Clip};
use crate::error::{Error, Result};
use crate::guidance::Guided;
use crate::metadata::{Conditioning, ModelMetadata};
use crate::model::Model;
use crate::noise::{InjectedNoise, NoiseSource, SeededNoise};
use crate::pipeline::{Pipeline, Stage};
use crate::sampler::ode_adaptive::StepCount;
use crate::sampler::{SamplerKind, Trajectory};
use crate::schedule::{NoiseLevel, Schedule};
use crate::spacing::{levels, spaced_levels_offset, LeadingRatio, Spacing, LCM_ORIGINAL_STEPS};

/// A sampling request: what to generate and how. The CLI's `sample` and C's
/// `edgediff_sample_params_init` both start from [`SampleOptions::default`], so the defaults
/// below are the only ones.
///
/// ```
/// use edgediff::{SampleOptions, SamplerKind, SamplerParams, Spacing};
/// let opts = SampleOptions {
///     sampler: SamplerKind::new("unipc", SamplerParams { order: Some(3), ..Default::default() })?,
///     steps: 10,
///     spacing: "logsnr".parse::<Spacing>()?,
///     ..Default::default()
/// };
/// assert_eq!((opts.n, opts.batch_size, opts.seed), (16, 64, 0));
/// # Ok::<(), edgediff::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The sampler with its own options. Default: `ddim` with eta 0
    /// ([`SampleOptions::for_model`]: the model's `sampling.sampler` when it names one).
    pub sampler: SamplerKind,
    /// Steps: network evaluations per sample for one-call-per-step samplers. Default: 100
    /// ([`SampleOptions::for_model`]: the model's `sampling.steps` when it names them).
    pub steps: usize,
    /// How the steps are placed on the schedule. Default: [`Spacing::Trailing`].
    pub spacing: Spacing,
    /// An explicit list of schedule times (most noisy first), overriding `steps` and `spacing`.
    /// Default: None.
    pub timesteps: Option<Vec<f64>>,
    /// Number of samples. Default: 16.
    pub n: usize,
    /// Index of the run's first sample in the seed's stream of samples: sample i of this run
    /// is sample `first_index + i` of the seed (its random stream, its prompt of `prompts`,
    /// its number in error messages), so runs of `n` samples from first indices 0, n, 2n, ...
    /// make, together, exactly the samples of one run from 0 (index ranges, for sharding a
    /// job over processes or machines). Arrays given per sample (`init_image`, inpainting's
    /// images) are the range's own, row 0 its first sample; injected noise is refused with a
    /// first index (it replaces the streams the index selects). `first_index + n` must fit
    /// in a usize. Default: 0.
    pub first_index: usize,
    /// Samples per network call; memory grows with it, not with `n`. Default: 64.
    pub batch_size: usize,
    /// Seed of every random stream; the same seed gives the same samples. Default: 0.
    pub seed: u64,
    /// Class for class-conditional models; None samples unconditionally (the null label).
    /// Default: None.
    pub class_label: Option<i64>,
    /// Clipping or dynamic thresholding of x0 predictions at every step. Default: none.
    pub x0_clip: X0Clip,
    /// Classifier-free guidance scale for class-conditional models with `class_label` (1 is
    /// plain conditional sampling; each step then evaluates the network on a doubled batch),
    /// and for text-to-image pipelines (None: the pipeline's default, 7.5 for Stable Diffusion;
    /// as in diffusers, a scale of 1 or less samples from the prompt alone). For a network
    /// distilled with guidance (it takes `timestep_cond`, [`Model::guidance_embedding_width`])
    /// the scale is that input and each step is one plain call, as in diffusers'
    /// LatentConsistencyModelPipeline (None: the pipeline's default, 8.5 for an LCM pipeline,
    /// else 1). Default: None.
    pub guidance: Option<f64>,
    /// The text prompt of a text-to-image pipeline (None: the empty prompt). Default: None.
    pub prompt: Option<String>,
    /// The prompt guidance steers away from (None: the empty prompt, the unconditional
    /// embedding). Default: None.
    pub negative_prompt: Option<String>,
    /// One prompt per sample, instead of `prompt`: sample i uses `prompts[(first_index + i) %
    /// len]` (a list shorter than the samples is cycled; `first_index` counts in it as for the
    /// random streams). Sample i keeps its own random stream, so it is the sample
    /// i of a run with `prompt` set to its prompt. Default: None.
    pub prompts: Option<Vec<String>>,
    /// img2img (SDEdit) for a text-to-image pipeline: images `[1, C, H, W]` (one for every
    /// sample) or `[n, C, H, W]` (one each) in the data range, the pipeline's image shape. They
    /// are encoded by the VAE encoder, noised to the level `strength` selects, and denoised
    /// from there. Default: None.
    pub init_image: Option<Array4<f32>>,
    /// How much of the sampling img2img runs, in (0, 1]: as diffusers'
    /// StableDiffusionImg2ImgPipeline, the last `floor(steps * strength)` of the `steps` steps
    /// (1 runs every step, still from the image noised to the first level, which keeps a trace
    /// of it where that level's alpha is not 0, as in diffusers). Default: 0.8.
    pub strength: f64,
    /// diffusers' `steps_offset`, added to every time step of leading spacing. Default: 0
    /// ([`SampleOptions::for_model`]: the pipeline's scheduler's, 1 for Stable Diffusion).
    pub steps_offset: usize,
    /// diffusers' `set_alpha_to_one` for DDIM and PNDM (PLMS): true ends at alpha-bar 1 (clean data), false at
    /// alpha-bar of training step 0, as Stable Diffusion's scheduler does. Default: true
    /// ([`SampleOptions::for_model`]: the pipeline's scheduler's).
    pub set_alpha_to_one: bool,
    /// Whether leading spacing takes the layout of the sampler's diffusers counterpart
    /// ([`SamplerKind::leading_ratio`]: the multistep solvers divide by steps + 1), as one
    /// scheduler config gives in each diffusers scheduler class, and whether lcm and tcd run on
    /// their counterparts' consistency grid ([`Spacing::Lcm`], of the pipeline's
    /// `original_inference_steps`) whatever the spacing. Default: false, edgediff's
    /// [`Spacing::Leading`] for every sampler ([`SampleOptions::for_model`]: true for a
    /// pipeline, whose scheduler config is reproduced).
    pub leading_as_diffusers: bool,
    /// Keep a text-to-image pipeline's final latents `[n, C, h, w]` (those the VAE decodes into
    /// the samples) in [`Report::latents`]; refused for a pixel model, whose samples are
    /// already the sampler's output. Default: false.
    pub keep_latents: bool,
    /// Decode a text-to-image pipeline's latents in overlapping tiles of this many latent
    /// pixels a side, in [`crate::tiles::MIN_TILE`]..=[`crate::tiles::MAX_TILE`] (8 image
    /// pixels each for Stable Diffusion's VAE), for images larger than the box can decode at
    /// once (the decoder then works on one tile of the batch at a time): neighbouring tiles
    /// overlap by at least a quarter of the tile ([`crate::tiles::tile_overlap`]) and are
    /// blended with a raised-cosine ramp across it. Latents one tile covers decode to the same
    /// bytes as without it; larger ones agree with untiled decoding to within what the VAE's
    /// reach beyond a tile changes. Refused for a pixel model. Default: None, untiled.
    pub vae_tile_size: Option<usize>,
    /// `[height, width]` of a text-to-image pipeline's images, as diffusers' `height=` and
    /// `width=`: the latents are that divided by the VAE's upsampling. Each side must be a
    /// multiple of [`crate::Pipeline::size_multiple`] (the VAE's factor times 2 for each of
    /// the U-Net's downsamplings; 64 for Stable Diffusion, 4 for the tests' tiny pipeline), and
    /// the U-Net and VAE decoder graphs must take that size (dynamic height and width, as
    /// optimum's and `edgediff-export diffusers`' graphs have). With `init_image` (img2img) or
    /// inpainting's images the run takes the images' size (they are not resized), which this
    /// must then equal if given. Refused for a pixel model. Default: None, the folder's size.
    pub image_size: Option<[usize; 2]>,
    /// When set, the run stops with [`Error::Cancelled`] before its next network call.
    /// Default: None.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The `fitted` sampler's coefficients, one row per time step of `timesteps` (row i: the
    /// coefficient of x_i, then those of the x0 predictions 0..=i), as
    /// [`crate::calibrate::file::CalibrationFile::apply`] sets them from a calibration file.
    /// Default: None.
    pub coefficients: Option<Vec<Vec<f64>>>,
    /// The random stream of each sample as a `(seed, index)` pair, one per sample: sample i
    /// draws from `streams[i]` in place of (`seed`, `first_index` + i), so that samples of several
    /// requests sampled in one batch (`edgediff serve`) are each what their own request gives
    /// alone; `first_index` must then be 0 (the streams say the indices). Default: None.
    pub streams: Option<Vec<(u64, u64)>>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            sampler: SamplerKind::DDIM,
            steps: 100,
            spacing: Spacing::Trailing,
            timesteps: None,
            n: 16,
            first_index: 0,
            batch_size: 64,
            seed: 0,
            class_label: None,
            x0_clip: X0Clip::None,
            guidance: None,
            prompt: None,
            negative_prompt: None,
            prompts: None,
            init_image: None,
            strength: 0.8,
            steps_offset: 0,
            set_alpha_to_one: true,
            leading_as_diffusers: false,
            keep_latents: false,
            vae_tile_size: None,
            image_size: None,
            cancel: None,
            coefficients: None,
            streams: None,
        }
    }
}

impl SampleOptions {
    /// The `(seed, index)` stream sample `i` of the run draws from.
    pub(crate) fn stream(&self, i: usize) -> (u64, u64) {
        match &self.streams {
            Some(s) => s[i],
            None => (self.seed, (self.first_index + i) as u64),
        }
    }

    /// The defaults for `model` ([`SampleOptions::for_model`]) with the caller's sampler
    /// (None: the model's, at `params`) and spacing (None: the model's or pipeline's
    /// scheduler settings; given, it replaces them all, as a scheduler of another spacing
    /// would have no offset, while the model's steps stay the default), as `edgediff sample`
    /// and the server take them.
    pub fn for_choice(
        model: &Model,
        sampler: Option<SamplerKind>,
        params: crate::sampler::SamplerParams,
        spacing: Option<Spacing>,
    ) -> Result<SampleOptions> {
        let model_defaults = SampleOptions::for_model(model);
        let sampler = match sampler {
            Some(s) => s,
            None => SamplerKind::new(model_defaults.sampler.name(), params)?,
        };
        let defaults = match spacing {
            None => model_defaults,
            Some(spacing) => SampleOptions {
                steps: model_defaults.steps,
                spacing,
                ..SampleOptions::default()
            },
        };
        Ok(SampleOptions {
            sampler,
            ..defaults
        })
    }

    /// These options with the times the model records for their step count
    /// ([`crate::metadata::SamplingDefaults::timesteps`], a distilled student's grid) when the
    /// caller gave neither `timesteps` nor a spacing (`spacing_given`); else unchanged.
    pub fn with_model_grid(self, model: &Model, spacing_given: bool) -> SampleOptions {
        if spacing_given || self.timesteps.is_some() {
            return self;
        }
        let timesteps = model
            .metadata()
            .sampling
            .as_ref()
            .and_then(|s| s.timesteps_for(self.steps));
        SampleOptions { timesteps, ..self }
    }

    /// The shapes of this run on `model` ([`crate::Model::shapes_for`]): of `image_size`, or
    /// for a pipeline given an `init_image`, of the image's size; checked as there.
    pub fn shapes(&self, model: &Model) -> Result<crate::Shapes> {
        let from_image = match (&self.init_image, model.pipeline()) {
            (Some(img), Some(_)) => Some([img.shape()[2], img.shape()[3]]),
            _ => None,
        };
        model.shapes_for(self.image_size.or(from_image))
    }

    /// The defaults for `model`: [`SampleOptions::default`], with the sampler (at its default
    /// options), steps and spacing the model's metadata names (`sampling`, e.g. a distilled
    /// model's lcm at 4 steps) and a text-to-image pipeline's scheduler settings (spacing,
    /// steps_offset, set_alpha_to_one, leading_as_diffusers) in place of the library's, so a
    /// run with only a sampler and steps gives what diffusers' scheduler of the same config
    /// gives.
    pub fn for_model(model: &Model) -> SampleOptions {
        let mut opts = SampleOptions::default();
        if let Some(s) = &model.metadata().sampling {
            // Sampler and spacing names were checked when the metadata was read.
            if let Ok(sampler) = s.sampler.parse() {
                opts.sampler = sampler;
                opts.steps = s.steps;
            }
            if let Some(Ok(spacing)) = s.spacing.as_deref().map(str::parse) {
                opts.spacing = spacing;
            }
        }
        if let Some(p) = model.pipeline() {
            if let Ok(spacing) = p.spacing() {
                opts.spacing = spacing;
            }
            opts.steps_offset = p.steps_offset;
            opts.set_alpha_to_one = p.set_alpha_to_one;
            opts.leading_as_diffusers = true;
        }
        opts
    }
}

/// Largest batch array (`batch_size x C x H x W` floats) a run may ask for.
pub const MAX_BATCH_BYTES: usize = 2 << 30;

/// Upper bound on `n` in one call; larger jobs go through the chunked file writers.
pub const MAX_SAMPLES: usize = 10_000_000;

/// Generates `opts.n` samples `[n, C, H, W]` in the model's data range.
///
/// `injected` replaces the seeded noise (initial `[n, C, H, W]`, per-step `[steps, n, C, H, W]`);
/// `progress(done_steps, total_steps)` is told after each step of each batch.
///
/// ```
/// use edgediff::{generate, Model, SampleOptions};
/// # edgediff::init_onnxruntime(None)?;
/// let mut model = Model::open("../models/mnist-ddpm.onnx")?;
/// let samples = generate(&mut model, &SampleOptions { n: 4, steps: 5, ..Default::default() }, None, &mut |_, _| {})?;
/// assert_eq!(samples.shape(), &[4, 1, 28, 28]);
/// # Ok::<(), edgediff::Error>(())
/// ```
pub fn generate(
    model: &mut Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Array4<f32>> {
    generate_with_report(model, opts, injected, progress).map(|(x, _)| x)
}

/// What a generation run did besides its samples.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Network calls, counting one per batch evaluated.
    pub network_calls: usize,
    /// Steps each sample took, for the samplers that choose their own steps.
    pub step_counts: Option<Vec<StepCount>>,
    /// With [`SampleOptions::keep_latents`], the generated samples' final latents before VAE
    /// decoding, in the order the samples were made.
    pub latents: Option<Array4<f32>>,
}

/// [`generate`], also returning the [`Report`].
#[allow(clippy::single_range_in_vec_init)] // one range of samples: all of them
pub fn generate_with_report(
    model: &mut Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Array4<f32>, Report)> {
    let mut chunks = Vec::with_capacity(opts.n.div_ceil(opts.batch_size.max(1)));
    let report = generate_chunks(
        model,
        opts,
        injected,
        &[0..opts.n],
        progress,
        &mut |_, x| {
            chunks.push(x);
            Ok(())
        },
    )?;
    let views: Vec<_> = chunks.iter().map(|a| a.view()).collect();
    let x = concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))?;
    Ok((x, report))
}

/// Generates the samples whose indices lie in `ranges` (each within 0..n), in batches of at
/// most `opts.batch_size`, handing each batch to `sink(first index, samples)` as soon as it is
/// done: memory stays bounded by one batch, and a failure loses at most the batch in flight.
/// Sample i is the same whatever the batch size or the ranges (its noise is its own stream).
/// A pipeline opened in low-memory mode ([`crate::NetworkOptions::low_memory`]) samples
/// every batch first and keeps their latents, so that the U-Net is freed before the VAE
/// decoder is opened; the sink then gets the same batches, decoded, once all are sampled.
pub fn generate_chunks(
    model: &mut Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
    ranges: &[std::ops::Range<usize>],
    progress: &mut dyn FnMut(usize, usize),
    sink: &mut dyn FnMut(usize, Array4<f32>) -> Result<()>,
) -> Result<Report> {
    if let Some(r) = ranges.iter().find(|r| r.end > opts.n) {
        return Err(Error::invalid(format!(
            "sample range {r:?} is outside 0..{}",
            opts.n
        )));
    }
    refuse_inpainting_unet(model)?;
    let (label, lv) = prepare(model, opts, injected)?;
    if opts.init_image.is_some() {
        model.enter(Stage::ImageEncoding);
    }
    let init = init_latents(model, opts)?;
    let prior = prior_std(model.schedule(), &lv);
    let plan = BatchPlan {
        label,
        levels: &lv,
        steps_per_batch: lv.len() - 1,
        injected,
        channels: None,
    };
    run_batches(
        model,
        opts,
        &plan,
        ranges,
        progress,
        sink,
        &mut |b, x, progress| {
            // img2img: the sampler starts from the encoded image noised to the first level,
            // x = alpha z + sigma eps with the batch's own initial noise eps (diffusers'
            // scheduler.add_noise); the levels are already the truncated ones (prepare).
            let x = match &init {
                Some(z) => {
                    let rows = if z.len_of(Axis(0)) == 1 {
                        z.broadcast(x.raw_dim())
                            .ok_or_else(|| Error::invalid("init latent shape"))?
                    } else {
                        z.slice(s![b.first..b.first + b.len, .., .., ..])
                    };
                    noised_start(rows, &x, &b.levels[0], prior)
                }
                None => x,
            };
            let mut tr = b.trajectory(opts.coefficients.as_deref());
            let out = opts.sampler.run(&mut tr, x, &mut |i, _| progress(i))?;
            Ok((out, tr.step_counts.take()))
        },
    )
}

/// A run's start from data `z` (img2img, inpainting with a strength below 1): `alpha z +
/// sigma eps` at `level`, eps being the batch's initial noise `x / prior` (diffusers'
/// scheduler.add_noise).
pub(crate) fn noised_start(
    z: ndarray::ArrayView4<f32>,
    x: &Array4<f32>,
    level: &NoiseLevel,
    prior: f64,
) -> Array4<f32> {
    let (a, sg) = (level.alpha as f32, (level.sigma / prior) as f32);
    ndarray::Zip::from(&z)
        .and(x)
        .map_collect(|&z, &e| a * z + sg * e)
}

/// What every batch of a run shares: the label each network call gets, the levels, the
/// progress units one batch reports (its steps), injected noise if any, and the channels an
/// inpainting U-Net gets beside the latents (`[n, k, h, w]`, one row per sample).
pub(crate) struct BatchPlan<'a> {
    pub label: Option<i64>,
    pub levels: &'a [NoiseLevel],
    pub steps_per_batch: usize,
    pub injected: Option<&'a InjectedNoise>,
    pub channels: Option<&'a Array4<f32>>,
}

/// One batch as the code that samples it sees it.
pub(crate) struct Batch<'a> {
    /// Index of the batch's first sample in the run (rows of the run's per-sample arrays;
    /// [`SampleOptions::first_index`] + `first` in the seed's stream of samples).
    pub first: usize,
    /// Samples in the batch.
    pub len: usize,
    /// The model as a denoiser: labels, x0 clipping, guidance and cancellation applied.
    pub den: &'a mut dyn Denoiser,
    /// The batch's own random streams (or its rows of the injected noise).
    pub noise: &'a mut dyn NoiseSource,
    pub levels: &'a [NoiseLevel],
    pub schedule: &'a Schedule,
}

impl Batch<'_> {
    /// The trajectory a sampler drives over the batch's levels; `coefficients` are the fitted
    /// sampler's.
    pub(crate) fn trajectory<'t>(
        &'t mut self,
        coefficients: Option<&'t [Vec<f64>]>,
    ) -> Trajectory<'t> {
        Trajectory {
            den: &mut *self.den,
            noise: &mut *self.noise,
            levels: self.levels,
            schedule: self.schedule,
            step_counts: None,
            coefficients,
        }
    }
}

/// The sampling of one batch: from its noise `x` (already scaled to the prior) to samples,
/// reporting progress in steps done within the batch; returns the steps each sample took if
/// the sampler chooses its own.
pub(crate) type SampleBatch<'s> = dyn FnMut(
        &mut Batch<'_>,
        Array4<f32>,
        &mut dyn FnMut(usize),
    ) -> Result<(Array4<f32>, Option<Vec<StepCount>>)>
    + 's;

/// The batching every run shares (sampling, inpainting): splits `ranges` into batches of at
/// most `opts.batch_size`, gives each its noise and denoiser, has `sample` run it, adds up the
/// report, and hands the samples to `sink`.
pub(crate) fn run_batches(
    model: &mut Model,
    opts: &SampleOptions,
    plan: &BatchPlan<'_>,
    ranges: &[std::ops::Range<usize>],
    progress: &mut dyn FnMut(usize, usize),
    sink: &mut dyn FnMut(usize, Array4<f32>) -> Result<()>,
    sample: &mut SampleBatch<'_>,
) -> Result<Report> {
    let meta = model.metadata().clone();
    let prior_std = prior_std(model.schedule(), plan.levels);
    let schedule = model.schedule().clone();
    let guidance = guidance_for(model, opts)?;
    let embedded = embedded_guidance(model, opts);
    let shapes = opts.shapes(model)?;
    // Low-memory mode holds one graph at a time: every prompt of the run is encoded before
    // the U-Net is opened, and the latents of every batch are kept until it is freed again
    // (1/48 of the images' size for Stable Diffusion's VAE), then decoded.
    let low_memory = model.pipeline.as_ref().is_some_and(Pipeline::low_memory);
    model.enter(Stage::Text);
    let mut text = text_conditioning(model, opts)?;
    if let (true, Some(t)) = (low_memory, text.as_mut()) {
        t.encoded = encode_prompts(model, opts, ranges)?;
    }
    let batches: Vec<(usize, usize)> = ranges
        .iter()
        .flat_map(|r| {
            r.clone()
                .step_by(opts.batch_size)
                .map(move |first| (first, opts.batch_size.min(r.end - first)))
        })
        .collect();
    let total_steps = plan.steps_per_batch * batches.len();
    let mut report = Report::default();
    let mut latents = Vec::new();
    let mut undecoded = Vec::new();
    for (b, &(first, m)) in batches.iter().enumerate() {
        model.enter(Stage::Sampling);
        let index = opts.first_index + first;
        let mut seeded;
        let mut rows;
        let noise: &mut dyn NoiseSource = match plan.injected {
            Some(inj) => {
                rows = inj.rows(first, m);
                &mut rows
            }
            None => {
                seeded = SeededNoise::from_streams(
                    (first..first + m).map(|i| opts.stream(i)),
                    shapes.sample,
                );
                &mut seeded
            }
        };
        let x = noise.initial()?.mapv(|v| v * prior_std as f32);
        // Encoded before the denoiser borrows the model for the batch.
        let cond = match &text {
            Some(t) => Some(prompt_rows(model, opts, t, index, m)?),
            None => None,
        };
        let channels = plan
            .channels
            .map(|c| c.slice(s![first..first + m, .., .., ..]).to_owned());
        let mut net = ModelDenoiser::new(model, plan.label.map(|k| vec![k; m]), index)
            .with_channels(channels)
            .with_cancel(opts.cancel.clone())
            .with_unconditional(guidance.map(|(_, null)| vec![null; m]));
        if let Some(w) = embedded {
            net = net.with_guidance_embedding(w);
        }
        let mut scale = guidance.map(|(w, _)| w);
        if let (Some(t), Some(cond)) = (&text, cond) {
            // One row per sample: the run's prompt, or each sample's own (prompts).
            let rows = |e: &Array3<f32>| {
                e.broadcast((m, e.shape()[1], e.shape()[2]))
                    .map(|v| v.to_owned())
            };
            let uncond = match &t.uncond {
                Some(u) => Some(rows(u).ok_or_else(|| Error::invalid("prompt embedding shape"))?),
                None => None,
            };
            net = net.with_text(cond, uncond);
            scale = t.guidance;
        }
        let mut den = Clipped::new(Guided::new(&mut net, scale), opts.x0_clip, meta.data_range);
        let mut batch = Batch {
            first,
            len: m,
            den: &mut den,
            noise,
            levels: plan.levels,
            schedule: &schedule,
        };
        let base = b * plan.steps_per_batch;
        let (out, counts) = sample(&mut batch, x, &mut |i| progress(base + i, total_steps))?;
        if let Some(counts) = counts {
            report
                .step_counts
                .get_or_insert_with(Vec::new)
                .extend(counts);
        }
        report.network_calls += net.calls();
        // A pipeline's latents become images batch by batch, so memory stays one batch (plus
        // the kept latents, 1/48 of the images' size for Stable Diffusion's VAE); in
        // low-memory mode, once every batch is sampled.
        let out = match model.pipeline.as_mut() {
            Some(_) if low_memory => {
                undecoded.push((first, out));
                continue;
            }
            Some(_) => {
                if opts.keep_latents {
                    latents.push(out.clone());
                }
                model.enter(Stage::Decoding);
                let Some(p) = model.pipeline.as_mut() else {
                    unreachable!("matched above")
                };
                decode_batch(p, opts, &out)?
            }
            None => out,
        };
        sink(first, out)?;
    }
    if !undecoded.is_empty() {
        model.enter(Stage::Decoding);
        for (first, z) in undecoded {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(Error::Cancelled);
            }
            let Some(p) = model.pipeline.as_mut() else {
                unreachable!("only a pipeline's latents wait to be decoded")
            };
            let x = decode_batch(p, opts, &z)?;
            if opts.keep_latents {
                latents.push(z);
            }
            sink(first, x)?;
        }
    }
    model.enter(Stage::Idle);
    if opts.keep_latents && !latents.is_empty() {
        let views: Vec<_> = latents.iter().map(|a| a.view()).collect();
        report.latents =
            Some(concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))?);
    }
    Ok(report)
}

/// A batch's images from its latents, tiled as `opts.vae_tile_size` says.
fn decode_batch(p: &mut Pipeline, opts: &SampleOptions, z: &Array4<f32>) -> Result<Array4<f32>> {
    match opts.vae_tile_size {
        Some(t) => p.decode_tiled(z, t),
        None => p.decode(z),
    }
}

/// The sampler's latents `[k, c, h, w]` of an img2img run's images (k = 1 or n), encoded in
/// batches of at most `batch_size` so the VAE encoder's memory stays one batch's; None without
/// an init image.
fn init_latents(model: &mut Model, opts: &SampleOptions) -> Result<Option<Array4<f32>>> {
    match (&opts.init_image, model.pipeline.as_mut()) {
        (Some(images), Some(p)) => encode_images(p, images, opts.batch_size).map(Some),
        _ => Ok(None),
    }
}

/// The sampler's latents of `images` (`[k, C, H, W]`, the data range) by a pipeline's VAE
/// encoder, in batches of at most `batch_size`.
pub(crate) fn encode_images(
    p: &mut crate::pipeline::Pipeline,
    images: &Array4<f32>,
    batch_size: usize,
) -> Result<Array4<f32>> {
    let mut parts = Vec::new();
    for first in (0..images.len_of(Axis(0))).step_by(batch_size.max(1)) {
        let end = (first + batch_size).min(images.len_of(Axis(0)));
        parts.push(p.encode_image(&images.slice(s![first..end, .., .., ..]).to_owned())?);
    }
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))
}

/// A text-to-image run's conditioning: the hidden states of the prompt and (with guidance) of
/// the negative prompt, each `[1, L, D]`, encoded once per run.
struct TextConditioning {
    /// The prompt's, or None with one prompt per sample (`prompts`: encoded batch by batch,
    /// so a long prompt file costs one batch's hidden states, not the file's).
    cond: Option<Array3<f32>>,
    uncond: Option<Array3<f32>>,
    guidance: Option<f64>,
    /// Low-memory mode: the hidden states of every distinct prompt of `prompts` the run
    /// samples, encoded before the U-Net is opened (each `[1, L, D]`); empty otherwise.
    encoded: HashMap<String, Array3<f32>>,
}

/// The hidden states `[m, L, D]` of samples `first .. first + m` (indices in the seed's
/// stream): the run's prompt for each, or each sample's own prompt of `opts.prompts`, every
/// distinct one encoded once.
fn prompt_rows(
    model: &mut Model,
    opts: &SampleOptions,
    t: &TextConditioning,
    first: usize,
    m: usize,
) -> Result<Array3<f32>> {
    let shape_err = || Error::invalid("prompt embedding shape");
    if let Some(e) = &t.cond {
        return e
            .broadcast((m, e.shape()[1], e.shape()[2]))
            .map(|v| v.to_owned())
            .ok_or_else(shape_err);
    }
    let Some(prompts) = &opts.prompts else {
        return Err(shape_err());
    };
    // The batch's prompts that low-memory mode did not encode before, each once.
    let mut fresh: Vec<(&str, Array3<f32>)> = Vec::new();
    for i in first..first + m {
        let prompt = prompts[i % prompts.len()].as_str();
        if !t.encoded.contains_key(prompt) && !fresh.iter().any(|(q, _)| *q == prompt) {
            let Some(p) = model.pipeline.as_mut() else {
                return Err(shape_err());
            };
            fresh.push((prompt, p.encode_prompt(prompt)?));
        }
    }
    let views: Vec<_> = (first..first + m)
        .map(|i| {
            let prompt = prompts[i % prompts.len()].as_str();
            match t.encoded.get(prompt) {
                Some(e) => e.view(),
                None => match fresh.iter().find(|(q, _)| *q == prompt) {
                    Some((_, e)) => e.view(),
                    None => unreachable!("encoded above"),
                },
            }
        })
        .collect();
    concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))
}

/// The hidden states of every distinct prompt of `opts.prompts` that the samples in `ranges`
/// (of the run, from `opts.first_index` in the seed's stream) use (none without a prompt
/// list), each `[1, L, D]`.
fn encode_prompts(
    model: &mut Model,
    opts: &SampleOptions,
    ranges: &[std::ops::Range<usize>],
) -> Result<HashMap<String, Array3<f32>>> {
    let (Some(prompts), Some(p)) = (&opts.prompts, model.pipeline.as_mut()) else {
        return Ok(HashMap::new());
    };
    let k = prompts.len();
    let mut used = vec![false; k];
    for r in ranges {
        if r.len() >= k {
            used.fill(true);
            break;
        }
        for i in r.clone() {
            used[(opts.first_index + i) % k] = true;
        }
    }
    let mut encoded = HashMap::new();
    for (prompt, _) in prompts.iter().zip(&used).filter(|(_, &u)| u) {
        if !encoded.contains_key(prompt) {
            encoded.insert(prompt.clone(), p.encode_prompt(prompt)?);
        }
    }
    Ok(encoded)
}

/// The prompts' hidden states for a pipeline (None for single-file models). As diffusers'
/// StableDiffusionPipeline: an absent negative prompt is the empty string's embedding, and
/// guidance applies when its scale exceeds 1 (otherwise the negative prompt is not encoded).
fn text_conditioning(model: &mut Model, opts: &SampleOptions) -> Result<Option<TextConditioning>> {
    // A U-Net that takes the scale as an input is guided by it alone (embedded_guidance).
    let embedded = model.guidance_embedding_width().is_some();
    let Some(p) = model.pipeline.as_mut() else {
        return Ok(None);
    };
    let w = opts.guidance.unwrap_or(p.config().guidance);
    let cond = match opts.prompts {
        Some(_) => None,
        None => Some(p.encode_prompt(opts.prompt.as_deref().unwrap_or(""))?),
    };
    let (uncond, guidance) = if w > 1.0 && !embedded {
        let negative = opts.negative_prompt.as_deref().unwrap_or("");
        (Some(p.encode_prompt(negative)?), Some(w))
    } else {
        (None, None)
    };
    Ok(Some(TextConditioning {
        cond,
        uncond,
        guidance,
        encoded: HashMap::new(),
    }))
}

/// Checks `opts` (and injected noise) against the model without running it: what
/// [`generate_chunks`] would refuse, refused before any output is created.
pub fn check_options(
    model: &Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
) -> Result<()> {
    refuse_inpainting_unet(model)?;
    prepare(model, opts, injected).map(|_| ())
}

/// Refuses to sample from a pipeline's inpainting U-Net without its mask and masked image
/// (which only [`crate::inpaint::inpaint`] gives it).
fn refuse_inpainting_unet(model: &Model) -> Result<()> {
    match model.pipeline() {
        Some(p) if p.inpainting() => Err(Error::invalid(format!(
            "the pipeline's U-Net is an inpainting U-Net ({} input channels: the latents, the mask and the masked image's latents); it samples only by inpainting, with an image and a mask (`edgediff inpaint`, C's edgediff_inpaint_with)",
            p.unet_in_channels.unwrap_or(0)
        ))),
        _ => Ok(()),
    }
}

/// Validates `opts` against the model; returns the class label each call gets and the levels
/// to visit.
pub(crate) fn prepare(
    model: &Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
) -> Result<(Option<i64>, Vec<NoiseLevel>)> {
    if opts.n == 0 || opts.n > MAX_SAMPLES {
        return Err(Error::out_of_range(
            "n",
            opts.n,
            &format!("must be in 1..={MAX_SAMPLES}"),
        ));
    }
    if opts.batch_size == 0 {
        return Err(Error::options("{0} must be at least 1", &["batch_size"]));
    }
    check_indices(opts, injected)?;
    let meta = model.metadata().clone();
    if let (Some(img), Some([h, w])) = (&opts.init_image, opts.image_size) {
        let k = img.shape();
        if model.pipeline.is_some() && k[2..] != [h, w] {
            return Err(Error::options(
                format!(
                    "{{1}} is {}x{} but {{0}} asks for {h}x{w}; the image is not resized: give an image of that size, or leave {{0}} out (the image's size is then the run's)",
                    k[2], k[3]
                ),
                &["image_size", "init_image"],
            ));
        }
    }
    let shapes = opts.shapes(model)?;
    // Samplers keep a few batch-sized arrays (multistep histories up to ~6); refuse batches
    // whose single array would already pass 2 GiB rather than die in the allocator.
    let sample_bytes = 4 * shapes.sample.iter().product::<usize>();
    check_batch_bytes(
        opts,
        sample_bytes,
        "per batch array (several are live at once)",
    )?;
    let text = matches!(meta.conditioning, Some(Conditioning::Text { .. }));
    let [c, h, w] = shapes.output;
    check_batch_bytes(opts, 4 * c * h * w, "per batch of decoded images")?;
    for (arg, given) in [
        ("prompt", opts.prompt.is_some()),
        ("negative_prompt", opts.negative_prompt.is_some()),
        ("prompts", opts.prompts.is_some()),
    ] {
        if given && !text {
            return Err(Error::options(
                "{0} given but the model has no text conditioning",
                &[arg],
            ));
        }
    }
    match &opts.prompts {
        Some(_) if opts.prompt.is_some() => {
            return Err(Error::options(
                "{0} and {1} exclude each other (one prompt for all, or one per sample)",
                &["prompt", "prompts"],
            ))
        }
        Some(p) if p.is_empty() => {
            return Err(Error::options("{0} holds no prompt", &["prompts"]));
        }
        _ => {}
    }
    if opts.keep_latents && model.pipeline.is_none() {
        return Err(Error::options(
            "{0} applies to text-to-image pipelines: a pixel model's samples are not latents",
            &["keep_latents"],
        ));
    }
    if let Some(tile) = opts.vae_tile_size {
        let Some(p) = &model.pipeline else {
            return Err(Error::options(
                "{0} applies to text-to-image pipelines: it tiles the VAE decoding of their latents",
                &["vae_tile_size"],
            ));
        };
        p.check_vae_tiles(tile, [shapes.sample[1], shapes.sample[2]])?;
    }
    if let Some(img) = &opts.init_image {
        check_init_image(img, opts.n, [c, h, w], text)?;
        if let Some(p) = &model.pipeline {
            p.check_vae_encoder()?;
        }
    }
    let labels = class_label_for(&meta, opts.class_label)?;
    let def = opts.sampler.def();
    if def.needs_discrete_schedule() && model.schedule().num_train_timesteps().is_none() {
        return Err(Error::options(
            format!(
                "{{0}} {} needs a discrete schedule (its maths is written on training indices); this model's schedule is continuous",
                def.name()
            ),
            &["sampler"],
        ));
    }
    if model.guidance_embedding_width().is_some() && opts.negative_prompt.is_some() {
        return Err(Error::options(
            "{0} given but the U-Net takes the guidance scale as an input (timestep_cond) and runs without classifier-free guidance, so nothing steers away from a prompt (diffusers' LatentConsistencyModelPipeline takes none either)",
            &["negative_prompt"],
        ));
    }
    // A pipeline reproduces diffusers' scheduler classes, and LCMScheduler and TCDScheduler
    // place their steps on the consistency grid whatever the config's spacing.
    let spacing = if opts.leading_as_diffusers && def.on_consistency_grid() {
        Spacing::Lcm {
            original_steps: model
                .pipeline()
                .and_then(|p| p.original_inference_steps)
                .unwrap_or(LCM_ORIGINAL_STEPS),
        }
    } else {
        opts.spacing
    };
    let mut lv = match &opts.timesteps {
        Some(ts) => levels(model.schedule(), &validate_timesteps(model, ts)?),
        None => spaced_levels_offset(
            model.schedule(),
            spacing,
            opts.steps,
            opts.steps_offset,
            if opts.leading_as_diffusers {
                opts.sampler.leading_ratio()
            } else {
                LeadingRatio::Steps
            },
        )?,
    };
    if !opts.set_alpha_to_one && opts.sampler.def().ends_at_final_alpha() {
        // diffusers' DDIM and PNDM with set_alpha_to_one false: the last step goes to
        // alpha-bar of training step 0 (their final_alpha_cumprod), not to clean data.
        // diffusers' other schedulers (Euler, DPM-Solver, ...) end at sigma 0 whatever this
        // setting.
        let Some(_) = model.schedule().num_train_timesteps() else {
            return Err(Error::options(
                "{0} false applies to discrete schedules",
                &["set_alpha_to_one"],
            ));
        };
        if let Some(last) = lv.last_mut() {
            *last = model.schedule().level(0.0);
        }
    }
    if opts.init_image.is_some() {
        lv = img2img_levels(lv, opts.strength)?;
    }
    check_fitted(opts, lv.len() - 1)?;
    if let Some(inj) = injected {
        check_injected(inj, opts.n, shapes.sample)?;
    }
    guidance_for(model, opts)?;
    Ok((labels, lv))
}

/// Refuses a range whose last index would not fit in a usize; a first index with injected
/// noise (the noise replaces the seed's streams, so the index would select nothing in it, and
/// a caller who meant rows of a whole run's noise file would silently get other samples) or
/// beside explicit streams; and streams that are not one per sample.
fn check_indices(opts: &SampleOptions, injected: Option<&InjectedNoise>) -> Result<()> {
    if opts.streams.is_some() && opts.first_index != 0 {
        return Err(Error::options(
            "{0} name each sample's stream: give {1} in them, not beside them",
            &["streams", "first_index"],
        ));
    }
    if let Some(s) = opts.streams.as_ref().filter(|s| s.len() != opts.n) {
        return Err(Error::options(
            format!(
                "{{0}} holds {} streams for {} samples ({{1}})",
                s.len(),
                opts.n
            ),
            &["streams", "n"],
        ));
    }
    if opts.first_index.checked_add(opts.n).is_none() {
        return Err(Error::out_of_range(
            "first_index",
            opts.first_index,
            &format!(
                "plus n {} passes the largest index {}; give a smaller first index",
                opts.n,
                usize::MAX
            ),
        ));
    }
    if opts.first_index != 0 && injected.is_some() {
        return Err(Error::options(
            "{0} selects samples of the seed's random streams, which {1} replaces; give the noise of the range's own samples (rows K..K+n of a whole run's noise) with {0} 0",
            &["first_index", "init_noise"],
        ));
    }
    Ok(())
}

/// Refuses coefficients without the `fitted` sampler and the `fitted` sampler without its
/// coefficients, its time steps (they were fitted on one grid), or with img2img (which would
/// run only the last of its steps).
fn check_fitted(opts: &SampleOptions, steps: usize) -> Result<()> {
    let fitted = opts.sampler.def().name() == crate::sampler::fitted::FITTED.name();
    match &opts.coefficients {
        Some(_) if !fitted => Err(Error::options(
            format!(
                "{{0}} apply to the fitted sampler, not {}",
                opts.sampler.name()
            ),
            &["coefficients"],
        )),
        None if fitted => Err(Error::options(
            "{0}: the fitted sampler needs them, from a calibration file (`edgediff calibrate --sampler fitted --save FILE`, then `edgediff sample --calibration FILE`)",
            &["coefficients"],
        )),
        Some(_) if opts.timesteps.is_none() => Err(Error::options(
            "{0} need the time steps they were fitted on ({1})",
            &["coefficients", "timesteps"],
        )),
        Some(_) if opts.init_image.is_some() => Err(Error::options(
            "{0} apply to the whole grid they were fitted on; img2img ({1}) runs only its last steps",
            &["coefficients", "init_image"],
        )),
        Some(rows) => crate::sampler::fitted::check_coefficients(rows, steps),
        None => Ok(()),
    }
}

/// An img2img run's levels: as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, the
/// last `floor(steps * strength)` steps of the full list (the clean end kept), where steps is
/// the number of steps the full list takes.
pub(crate) fn img2img_levels(lv: Vec<NoiseLevel>, strength: f64) -> Result<Vec<NoiseLevel>> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::out_of_range(
            "strength",
            strength,
            "is outside (0, 1]",
        ));
    }
    let steps = lv.len() - 1;
    // The product in f64 as Python's int(steps * strength) takes it (0.6 * 10 -> 6).
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    if run == 0 {
        return Err(Error::out_of_range(
            "strength",
            strength,
            &format!("leaves no step of {steps} to run (floor(steps * strength) is 0); raise it or the steps"),
        ));
    }
    Ok(lv[steps - run..].to_vec())
}

/// Checks an init image against the run: a pipeline (the image is encoded to latents), one
/// image or one per sample, the pipeline's image shape, finite values.
fn check_init_image(img: &Array4<f32>, n: usize, [c, h, w]: [usize; 3], text: bool) -> Result<()> {
    if !text {
        return Err(Error::options(
            "{0} given but the model is not a text-to-image pipeline (img2img encodes the image with a pipeline's VAE encoder)",
            &["init_image"],
        ));
    }
    let k = img.len_of(Axis(0));
    if (k != 1 && k != n) || img.shape()[1..] != [c, h, w] {
        return Err(Error::options(
            format!(
                "{{0}} has shape {:?}; expected [1, {c}, {h}, {w}] (one image for all) or [{n}, {c}, {h}, {w}] (one per sample)",
                img.shape()
            ),
            &["init_image"],
        ));
    }
    if let Some((index, v)) = crate::npy::first_non_finite(img.view().into_dyn()) {
        return Err(Error::options(
            format!("{{0}} holds {v} at {index:?}; images must be finite"),
            &["init_image"],
        ));
    }
    Ok(())
}

/// Checks injected noise against the run before anything uses it: shapes (a wrong one would
/// index out of range, or read noise from the wrong offsets) and finiteness.
fn check_injected(inj: &InjectedNoise, n: usize, [c, h, w]: [usize; 3]) -> Result<()> {
    if inj.initial.shape() != [n, c, h, w] {
        return Err(Error::options(
            format!(
                "{{0}} has shape {:?}; expected [{n}, {c}, {h}, {w}]",
                inj.initial.shape(),
            ),
            &["init_noise"],
        ));
    }
    if let Some(steps) = &inj.steps {
        if steps.ndim() != 5 || steps.shape()[1..] != [n, c, h, w] {
            return Err(Error::options(
                format!(
                    "{{0}} has shape {:?}; expected [steps, {n}, {c}, {h}, {w}] (the initial noise's [n, C, H, W] after the steps)",
                    steps.shape(),
                ),
                &["step_noise"],
            ));
        }
    }
    let arrays = [
        ("init_noise", Some(inj.initial.view().into_dyn())),
        ("step_noise", inj.steps.as_ref().map(|s| s.view())),
    ];
    for (arg, a) in arrays {
        if let Some((index, v)) = a.and_then(crate::npy::first_non_finite) {
            return Err(Error::options(
                format!("{{0}} holds {v} at {index:?}; noise must be finite"),
                &[arg],
            ));
        }
    }
    Ok(())
}

/// Refuses a batch whose one array of `item_bytes` per sample would pass [`MAX_BATCH_BYTES`]
/// (`what` says which array), rather than die in the allocator.
fn check_batch_bytes(opts: &SampleOptions, item_bytes: usize, what: &str) -> Result<()> {
    let batch = opts.batch_size.min(opts.n);
    let bytes = batch.saturating_mul(item_bytes);
    if bytes <= MAX_BATCH_BYTES {
        return Ok(());
    }
    Err(Error::out_of_range(
        "batch_size",
        batch,
        &format!(
            "needs {:.1} GiB {what}; use at most {}",
            bytes as f64 / (1u64 << 30) as f64,
            MAX_BATCH_BYTES / item_bytes
        ),
    ))
}

/// The label each network call gets: `class` checked against the model, the null label when
/// a class-conditional model samples unconditionally, None for unconditional models.
pub(crate) fn class_label_for(meta: &ModelMetadata, class: Option<i64>) -> Result<Option<i64>> {
    match (&meta.conditioning, class) {
        (Some(Conditioning::Class { num_classes, .. }), Some(k))
            if k < 0 || k as usize >= *num_classes =>
        {
            Err(Error::out_of_range(
                "class_label",
                k,
                &format!("is outside 0..{num_classes}"),
            ))
        }
        (Some(Conditioning::Class { .. }), Some(k)) => Ok(Some(k)),
        (Some(Conditioning::Class { null_label, .. }), None) => Ok(Some(*null_label)),
        (_, Some(_)) => Err(Error::options(
            "{0} given but the model is not class-conditional",
            &["class_label"],
        )),
        (_, None) => Ok(None),
    }
}

/// The (scale, null label) of classifier-free guidance, checked against the model; None also
/// for a network that takes the scale as an input ([`embedded_guidance`]).
pub(crate) fn guidance_for(model: &Model, opts: &SampleOptions) -> Result<Option<(f64, i64)>> {
    let Some(w) = opts.guidance else {
        return Ok(None);
    };
    if !w.is_finite() || w < 0.0 {
        return Err(Error::out_of_range(
            "guidance",
            w,
            "must be a finite number >= 0",
        ));
    }
    if model.guidance_embedding_width().is_some() {
        return Ok(None);
    }
    match (&model.metadata().conditioning, opts.class_label) {
        // Text guidance takes the negative prompt's embedding, not a label (run_batches).
        (Some(Conditioning::Text { .. }), _) => Ok(None),
        (Some(Conditioning::Class { null_label, .. }), Some(_)) => Ok(Some((w, *null_label))),
        (Some(Conditioning::Class { .. }), None) => Err(Error::options(
            "{0} needs {1} K (guidance steers towards a class)",
            &["guidance", "class_label"],
        )),
        _ => Err(Error::options(
            "{0} given but the model is not class-conditional (it has no null label to guide from)",
            &["guidance"],
        )),
    }
}

/// The guidance scale a network that takes it as an input (`timestep_cond`) gets: the one
/// asked for, else the pipeline's default, else 1 (no guidance); None for other networks.
fn embedded_guidance(model: &Model, opts: &SampleOptions) -> Option<f64> {
    model.guidance_embedding_width()?;
    Some(
        opts.guidance
            .or(model.pipeline().map(|p| p.guidance))
            .unwrap_or(1.0),
    )
}

/// Standard deviation of x_T: 1 on variance-preserving schedules, sigma_max on VE, so noise
/// files hold unit-variance noise for every schedule.
pub(crate) fn prior_std(schedule: &Schedule, levels: &[NoiseLevel]) -> f64 {
    if matches!(schedule, Schedule::Ve { .. }) {
        levels[0].sigma
    } else {
        1.0
    }
}

fn validate_timesteps(model: &Model, ts: &[f64]) -> Result<Vec<f64>> {
    let bad = |why: String| Err(Error::options(format!("{{0}}: {why}"), &["timesteps"]));
    if ts.is_empty() {
        return bad("the list is empty".into());
    }
    if ts.len() > crate::spacing::MAX_STEPS {
        return bad(format!(
            "{} times; at most {} (as for steps)",
            ts.len(),
            crate::spacing::MAX_STEPS
        ));
    }
    let hi = model
        .schedule()
        .num_train_timesteps()
        .map_or(1.0, |t| (t - 1) as f64);
    let lo = if model.schedule().num_train_timesteps().is_some() {
        0.0
    } else {
        f64::MIN_POSITIVE
    };
    if let Some(t) = ts.iter().find(|t| !(lo..=hi).contains(*t)) {
        return bad(format!("{t} is outside [{lo}, {hi}]"));
    }
    if ts.windows(2).any(|w| w[1] >= w[0]) {
        return bad("times must strictly decrease (most noisy first)".into());
    }
    Ok(ts.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(n: usize) -> Vec<NoiseLevel> {
        (0..=n)
            .map(|i| NoiseLevel {
                t: (n - i) as f64,
                alpha: i as f64,
                sigma: 1.0,
            })
            .collect()
    }

    #[test]
    fn img2img_runs_the_last_floor_steps_times_strength_steps() {
        // As diffusers' get_timesteps: int(10 * 0.6) = 6 steps, the first 4 skipped.
        let out = img2img_levels(lv(10), 0.6).unwrap();
        assert_eq!(out.len(), 7);
        assert_eq!(out[0].t, 6.0);
        assert_eq!(out.last().unwrap().t, 0.0);
        assert_eq!(img2img_levels(lv(10), 1.0).unwrap().len(), 11);
        // 0.15 * 10 rounds down to 1 step.
        assert_eq!(img2img_levels(lv(10), 0.15).unwrap().len(), 2);
    }

    #[test]
    fn img2img_refuses_strengths_outside_the_unit_interval_or_without_a_step() {
        for s in [0.0, -0.5, 1.5, f64::NAN] {
            let e = img2img_levels(lv(10), s).unwrap_err();
            assert_eq!(e.argument().and_then(|a| a.arg()), Some("strength"), "{s}");
        }
        let e = img2img_levels(lv(10), 0.05).unwrap_err().to_string();
        assert!(e.contains("leaves no step of 10"), "{e}");
    }
}
