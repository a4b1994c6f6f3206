//! The `edgediff` command line: thin wrappers over the library API.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use argh::FromArgs;
use model_args::model_command;
use ndarray::Ix5;

use edgediff::calibrate::file::CalibrationFile;
use edgediff::denoiser::X0Clip;
use edgediff::generate::SampleOptions;
use edgediff::noise::InjectedNoise;
use edgediff::npy::{first_non_finite, npy_bytes, read_npy, read_npy4_finite, write_atomic};
use edgediff::output::{generate_to_path, write_all};
use edgediff::sampler::{SamplerKind, SamplerParams, SAMPLERS};
use edgediff::spacing::Spacing;
use edgediff::{Error, Result};

mod model_args;

mod calibrate;
mod compare;
mod edit;
mod elbo;
mod likelihood;
mod schedule;
mod serve;
mod tokenize;

/// edgediff: sample from self-describing ONNX diffusion models.
///
/// Exit codes: 0 success, 1 bad command line, 2 invalid argument, 3 model or ONNX Runtime
/// problem, 4 file I/O problem, 5 the network produced NaN/Inf.
#[derive(FromArgs, Debug)]
pub struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    Sample(SampleCmd),
    Invert(edit::InvertCmd),
    Interpolate(edit::InterpolateCmd),
    Inpaint(edit::InpaintCmd),
    Elbo(elbo::ElboCmd),
    Likelihood(likelihood::LikelihoodCmd),
    Schedule(schedule::ScheduleCmd),
    Compare(compare::CompareCmd),
    Calibrate(calibrate::CalibrateCmd),
    Info(InfoCmd),
    Samplers(SamplersCmd),
    Tokenize(tokenize::TokenizeCmd),
    Serve(serve::ServeCmd),
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "samplers")]
/// List the samplers: order, stochastic or not, model calls per step.
struct SamplersCmd {
    /// print JSON for programs
    #[argh(switch)]
    json: bool,
}

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "sample")]
/// Generate samples into a PNG grid (OUT.png), a folder of PNGs (OUT/), or a float32 OUT.npy.
struct SampleCmd {
    /// sampler (default: the model's, else ddim); `edgediff samplers` lists them
    #[argh(option)]
    sampler: Option<String>,
    /// number of sampling steps (default: the model's, else 100)
    #[argh(option)]
    steps: Option<usize>,
    /// time-step spacing: leading, trailing, linspace, karras, logsnr or lcm (default
    /// trailing; a pipeline folder's: its scheduler's spacing, steps offset and final alpha,
    /// and for lcm and tcd its consistency grid)
    #[argh(option)]
    spacing: Option<String>,
    /// rho of the karras spacing (default 7)
    #[argh(option)]
    rho: Option<f64>,
    /// explicit comma-separated schedule times, most noisy first (overrides --steps/--spacing)
    #[argh(option)]
    timesteps: Option<String>,
    /// a calibration file from `edgediff calibrate --save`: its sampler, time steps and (the
    /// fitted sampler's) coefficients, in place of --sampler/--steps/--timesteps
    #[argh(option)]
    calibration: Option<PathBuf>,
    /// stochasticity in [0, 1] for ddim (default 0) and euler-a (default 1)
    #[argh(option)]
    eta: Option<f64>,
    /// stochasticity in [0, 1] of tcd (default 0.3)
    #[argh(option)]
    gamma: Option<f64>,
    /// solver order for lms (1-4), dpm++ and unipc (1-3)
    #[argh(option)]
    order: Option<usize>,
    /// signal-to-noise ratio of the pc sampler's Langevin corrector (default 0.16)
    #[argh(option)]
    snr: Option<f64>,
    /// relative tolerance of ode-adaptive (default 1e-3)
    #[argh(option)]
    rtol: Option<f64>,
    /// absolute tolerance of ode-adaptive and adaptive (default 1e-3)
    #[argh(option)]
    atol: Option<f64>,
    /// fewest steps a sample of the adaptive sampler takes (default 2)
    #[argh(option)]
    min_steps: Option<usize>,
    /// most steps a sample of the adaptive sampler takes (default 500)
    #[argh(option)]
    max_steps: Option<usize>,
    /// number of samples (default 16)
    #[argh(option, short = 'n')]
    n: Option<usize>,
    /// samples per network call (default 64)
    #[argh(option)]
    batch_size: Option<usize>,
    /// random seed (default 0); the same seed gives the same output
    #[argh(option)]
    seed: Option<u64>,
    /// index of the first sample in the seed's stream (default 0): `--first-index K -n N`
    /// makes samples K..K+N-1 of a run with `-n K+N`, byte for byte; a folder output names
    /// each file by its sample's index (000012.png for 12), so range folders merge by copying
    #[argh(option, default = "0")]
    first_index: usize,
    /// class label for class-conditional models
    #[argh(option)]
    class: Option<i64>,
    /// classifier-free guidance scale with --class (1: plain conditional; e.g. 3) or with a
    /// text-to-image pipeline (default there 7.5, 8.5 for an LCM pipeline); for a U-Net that
    /// takes it as an input (timestep_cond), the scale it gets, with no second call
    /// (default 1 for a pixel model)
    #[argh(option)]
    guidance: Option<f64>,
    /// text prompt for a text-to-image pipeline folder
    #[argh(option)]
    prompt: Option<String>,
    /// prompt guidance steers away from (default: the empty prompt)
    #[argh(option)]
    negative_prompt: Option<String>,
    /// file of prompts, one per line (UTF-8): sample i uses line i, cycling when -n exceeds
    /// the lines (default -n: the number of lines)
    #[argh(option)]
    prompts: Option<PathBuf>,
    /// img2img: start from this image (a PNG, or a float32 .npy [1 or n, C, H, W] in [-1, 1])
    /// instead of pure noise
    #[argh(option)]
    image: Option<PathBuf>,
    /// img2img: how much of the sampling to run, in (0, 1] (default 0.8): the last
    /// floor(steps * strength) steps, from the image noised to that level
    #[argh(option)]
    strength: Option<f64>,
    /// text-to-image: image height in pixels (default: the folder's, or --image's); a multiple
    /// of what `edgediff info` names (64 for Stable Diffusion)
    #[argh(option)]
    height: Option<usize>,
    /// text-to-image: image width in pixels (default: the folder's, or --image's)
    #[argh(option)]
    width: Option<usize>,
    /// clip x0 predictions to the model's data range at every step
    #[argh(switch)]
    clip_x0: bool,
    /// dynamic thresholding (Imagen) at this quantile of |x0|, e.g. 0.995
    #[argh(option)]
    dynamic_threshold: Option<f64>,
    /// upper bound of the dynamic threshold in data-range units (default: none)
    #[argh(option)]
    threshold_max: Option<f64>,
    /// initial noise as float32 .npy [n, C, H, W] instead of the seeded noise
    #[argh(option)]
    init_noise: Option<PathBuf>,
    /// per-step noise as float32 .npy [steps, n, C, H, W] for stochastic samplers (with --init-noise)
    #[argh(option)]
    step_noise: Option<PathBuf>,
    /// output: a .png grid, a .npy array, or a directory for one PNG per sample (default samples.png)
    #[argh(option, short = 'o', default = "PathBuf::from(\"samples.png\")")]
    out: PathBuf,
    /// text-to-image: also write the final latents [n, C, h, w] (before VAE decoding) as float32 .npy
    #[argh(option)]
    latents_out: Option<PathBuf>,
    /// text-to-image: hold one graph at a time (text encoder, then U-Net, then VAE decoder),
    /// for boxes without memory for all three; the same images, written once all are sampled
    #[argh(switch)]
    low_memory: bool,
    /// text-to-image: decode the latents in overlapping tiles of T latent pixels a side, T in
    /// 4..=4096 (e.g. 32: 256-pixel tiles for Stable Diffusion), blended (raised cosine) across an
    /// overlap of at least T/4; latents of at most T a side decode as without it (default:
    /// untiled)
    #[argh(option)]
    vae_tiles: Option<usize>,
    /// continue an interrupted run into the same folder or .npy: samples already written are kept
    #[argh(switch)]
    resume: bool,
    /// no progress bar
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print a JSON summary on stdout
    #[argh(switch)]
    json: bool,
}
}

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "info")]
/// Print a model's metadata.
struct InfoCmd {
    /// print JSON for programs
    #[argh(switch)]
    json: bool,
}
}

/// How the command line spells a library option: `n` is `-n`, `batch_size` is `--batch-size`.
/// Library errors name options by their library names; the CLI reports them with this.
pub fn flag(name: &str) -> String {
    match name {
        "n" => "-n".into(),
        "class_label" => "--class".into(),
        "fallback" => "--fallback".into(),
        // Names of a job record's entries (job.rs) that are not one flag each.
        "sampler_options" => {
            "the sampler's options (--eta --gamma --order --snr --rtol --atol --min-steps --max-steps)"
                .into()
        }
        "x0_clip" => "--clip-x0/--dynamic-threshold".into(),
        "sample_shape" => "--model".into(),
        "coefficients" => "--calibration's coefficients".into(),
        "init_image" => "--image".into(),
        "keep_latents" => "--latents-out".into(),
        "vae_tile_size" => "--vae-tiles".into(),
        "image_size" => "--height/--width".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(cmd) => sample(cmd),
        Command::Invert(cmd) => edit::invert(cmd),
        Command::Interpolate(cmd) => edit::interpolate(cmd),
        Command::Inpaint(cmd) => edit::inpaint(cmd),
        Command::Elbo(cmd) => elbo::elbo(cmd),
        Command::Likelihood(cmd) => likelihood::likelihood(cmd),
        Command::Schedule(cmd) => schedule::schedule(cmd),
        Command::Compare(cmd) => compare::compare(cmd),
        Command::Calibrate(cmd) => calibrate::calibrate_cmd(cmd),
        Command::Info(cmd) => info(cmd),
        Command::Tokenize(cmd) => tokenize::tokenize(cmd),
        Command::Serve(cmd) => serve::serve(cmd),
        Command::Samplers(cmd) => {
            list_samplers(cmd.json);
            Ok(())
        }
    }
}

fn parse_timesteps(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| Error::invalid(format!("--timesteps: '{s}' is not a number")))
        })
        .collect()
}

fn load_injected(init: &Path, steps: Option<&Path>) -> Result<InjectedNoise> {
    let initial = read_npy4_finite(init, "--init-noise must be 4-D [n, C, H, W]")?;
    let steps = match steps {
        Some(p) => {
            let a = read_npy(p)?;
            a.view()
                .into_dimensionality::<Ix5>()
                .map_err(|_| Error::BadInput {
                    path: p.into(),
                    detail: "--step-noise must be 5-D [steps, n, C, H, W]".into(),
                })?;
            if let Some((index, v)) = first_non_finite(a.view()) {
                return Err(Error::BadInput {
                    path: p.into(),
                    detail: format!("holds {v} at {index:?}; the values must be finite"),
                });
            }
            Some(a)
        }
        None => None,
    };
    Ok(InjectedNoise { initial, steps })
}

/// A one-line progress bar on stderr; silent unless stderr is a terminal.
struct Bar {
    start: Instant,
    active: bool,
    n: usize,
}

impl Bar {
    /// A bar for `n` samples, shown only when not `quiet` and stderr is a terminal.
    fn new(quiet: bool, n: usize) -> Bar {
        Bar {
            start: Instant::now(),
            active: !quiet && std::io::stderr().is_terminal(),
            n,
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if !self.active || total == 0 {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let frac = done as f64 / total as f64;
        let eta = if done > 0 {
            secs * (1.0 - frac) / frac
        } else {
            0.0
        };
        let filled = (frac * 30.0) as usize;
        eprint!(
            "\r[{}{}] {done}/{total} steps  {:.1} samples/s  ETA {eta:.0}s ",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            self.n as f64 * frac / secs.max(1e-9)
        );
        if done == total {
            eprintln!();
        }
    }
}

fn sample(cmd: SampleCmd) -> Result<()> {
    // The defaults are the library's (SampleOptions::default), which C's params_init also takes,
    // with the model's sampler and steps when it names them (SampleOptions::for_model).
    let defaults = SampleOptions::default();
    let params = SamplerParams {
        eta: cmd.eta,
        gamma: cmd.gamma,
        order: cmd.order,
        snr: cmd.snr,
        rtol: cmd.rtol,
        atol: cmd.atol,
        min_steps: cmd.min_steps,
        max_steps: cmd.max_steps,
    };
    // A sampler given is checked before the model is opened; the model's, once it is.
    let chosen = cmd
        .sampler
        .as_deref()
        .map(|name| SamplerKind::new(name, params))
        .transpose()?;
    let spacing = match (cmd.rho, cmd.spacing.as_deref()) {
        (Some(rho), Some("karras")) => Some(Spacing::Karras { rho }),
        (Some(_), _) => return Err(Error::invalid("--rho applies to --spacing karras")),
        (None, Some(name)) => Some(name.parse()?),
        (None, None) => None,
    };
    let timesteps = cmd.timesteps.as_deref().map(parse_timesteps).transpose()?;
    let injected = match (&cmd.init_noise, &cmd.step_noise) {
        (Some(init), steps) => Some(load_injected(init, steps.as_deref())?),
        (None, Some(_)) => return Err(Error::invalid("--step-noise needs --init-noise")),
        (None, None) => None,
    };
    let prompts = cmd.prompts.as_deref().map(read_prompts).transpose()?;
    let calibration = cmd
        .calibration
        .as_deref()
        .map(|p| calibration_file(p, &cmd))
        .transpose()?;
    // -n, else the injected noise's rows, else one sample per prompt line, else the default.
    let n = match (&injected, &prompts) {
        (Some(inj), _) => inj.initial.shape()[0],
        (None, Some(p)) => cmd.n.unwrap_or(p.len().max(1)),
        (None, None) => cmd.n.unwrap_or(defaults.n),
    };
    if cmd.strength.is_some() && cmd.image.is_none() {
        return Err(Error::options(
            "{0} applies to img2img, with {1}",
            &["strength", "init_image"],
        ));
    }
    let mut model_opts = cmd.model_options()?;
    if model_opts.path.is_none() && (cmd.prompt.is_some() || cmd.prompts.is_some()) {
        // A prompt with no model: the shipped text-to-image model, not the pixel default.
        model_opts.path = Some(edgediff::default_text_model()?);
    }
    model_opts.low_memory = cmd.low_memory;
    let mut model = model_opts.open()?;
    // A pipeline's image may be of any size (then the run's); a pixel model's is its own.
    let any_size = model.pipeline().is_some();
    let init_image = cmd
        .image
        .map(|p| {
            edit::load_images(
                &[p],
                model.output_shape(),
                any_size,
                model.metadata().data_range,
            )
        })
        .transpose()?;
    // A side not given is the image's, else the folder's (as diffusers' height/width).
    let image_size = (cmd.height.is_some() || cmd.width.is_some()).then(|| {
        let base = match &init_image {
            Some(img) if any_size => [img.shape()[2], img.shape()[3]],
            _ => {
                let [_, h, w] = model.output_shape();
                [h, w]
            }
        };
        [cmd.height.unwrap_or(base[0]), cmd.width.unwrap_or(base[1])]
    });
    // A pipeline's scheduler settings are its defaults (the library's otherwise); a --spacing
    // given replaces them all, as a scheduler of another spacing would have no offset. The
    // model's sampler and steps stay the defaults either way.
    let defaults = SampleOptions::for_choice(&model, chosen, params, spacing)?;
    let opts = SampleOptions {
        steps: cmd.steps.unwrap_or(defaults.steps),
        timesteps,
        n,
        batch_size: cmd.batch_size.unwrap_or(defaults.batch_size),
        seed: cmd.seed.unwrap_or(defaults.seed),
        first_index: cmd.first_index,
        class_label: cmd.class,
        x0_clip: x0_clip(cmd.clip_x0, cmd.dynamic_threshold, cmd.threshold_max)?,
        guidance: cmd.guidance,
        prompt: cmd.prompt,
        negative_prompt: cmd.negative_prompt,
        prompts,
        init_image,
        strength: cmd.strength.unwrap_or(defaults.strength),
        keep_latents: cmd.latents_out.is_some(),
        vae_tile_size: cmd.vae_tiles,
        image_size,
        ..defaults
    };
    let mut opts = opts;
    if let (Some(file), Some(path)) = (&calibration, &cmd.calibration) {
        file.apply(&model, path, &mut opts)?;
    }
    // A calibration's time steps stand: the model's recorded grid is for its own steps.
    let opts = opts.with_model_grid(&model, spacing.is_some());
    if let Some(path) = &cmd.latents_out {
        edgediff::generate::check_options(&model, &opts, injected.as_ref())?; // a pixel model: refused first
        edgediff::output::check_file(path)?; // written at the end: checked before the work
    }
    let start = Instant::now();
    let mut bar = Bar::new(cmd.quiet, n);
    let written = generate_to_path(
        &mut model,
        &opts,
        injected.as_ref(),
        &cmd.out,
        cmd.resume,
        &mut |d, t| bar.update(d, t),
    )?;
    let sample_secs = start.elapsed().as_secs_f64();
    let [_, height, width] = opts.shapes(&model)?.output;
    let (files, report, skipped) = (written.files, written.report, written.resumed);
    if let (Some(path), Some(z)) = (&cmd.latents_out, &report.latents) {
        write_atomic(path, &npy_bytes(z.shape(), z.iter().copied()))?;
    }
    if skipped > 0 {
        log::info!("--resume: {skipped} of {n} samples were already written");
    }
    log::info!("{} samples in {sample_secs:.2}s", n);
    if cmd.json {
        let summary = serde_json::json!({
            "out": cmd.out, "files": files, "n": n, "first_index": opts.first_index,
            "sampler": opts.sampler.name(), "height": height, "width": width,
            "steps": opts.timesteps.as_ref().map_or(opts.steps, Vec::len),
            "seconds": sample_secs, "model": model.path(), "network_calls": report.network_calls,
            "resumed_samples": skipped, "provider": model_opts.provider.name(),
            "steps_per_sample": report.step_counts.as_ref().map(|c| c.iter().map(|c| c.accepted).collect::<Vec<_>>()),
            "rejected_per_sample": report.step_counts.as_ref().map(|c| c.iter().map(|c| c.rejected).collect::<Vec<_>>()),
        });
        println!("{summary}");
    } else if !cmd.quiet {
        eprintln!(
            "wrote {} ({} samples, {:.2}s)",
            cmd.out.display(),
            n,
            sample_secs
        );
    }
    Ok(())
}

/// The calibration file at `path`, read and checked; refused beside the flags it replaces.
fn calibration_file(path: &Path, cmd: &SampleCmd) -> Result<CalibrationFile> {
    let given = [
        ("--sampler", cmd.sampler.is_some()),
        ("--steps", cmd.steps.is_some()),
        ("--spacing", cmd.spacing.is_some()),
        ("--timesteps", cmd.timesteps.is_some()),
        ("--order", cmd.order.is_some()),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        return Err(Error::invalid(format!(
            "--calibration sets the sampler and its time steps; drop {flag}"
        )));
    }
    CalibrationFile::read(path)
}

/// The lines of a prompts file, each one prompt (a non-UTF-8 line is refused, naming it).
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let file =
        std::fs::File::open(path).map_err(Error::io(format!("reading {}", path.display())))?;
    edgediff::text::prompt_lines(std::io::BufReader::new(file), path).collect()
}

fn x0_clip(clip: bool, percentile: Option<f64>, max: Option<f64>) -> Result<X0Clip> {
    match (clip, percentile, max) {
        (true, Some(_), _) => Err(Error::invalid(
            "--clip-x0 and --dynamic-threshold exclude each other",
        )),
        (_, None, Some(_)) => Err(Error::invalid(
            "--threshold-max applies to --dynamic-threshold",
        )),
        (true, None, None) => Ok(X0Clip::Range),
        (false, None, None) => Ok(X0Clip::None),
        (false, Some(p), max) => X0Clip::dynamic(p, max),
    }
}

fn list_samplers(json: bool) {
    if json {
        let rows: Vec<_> = SAMPLERS
            .iter()
            .map(|s| {
                serde_json::json!({"name": s.name, "order": s.order, "stochastic": s.stochastic,
                                         "calls_per_step": s.calls_per_step, "summary": s.summary})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    let w = |f: fn(&edgediff::sampler::SamplerInfo) -> usize, head: &str| {
        SAMPLERS.iter().map(f).max().unwrap_or(0).max(head.len())
    };
    let (wn, wo, wc) = (
        w(|s| s.name.len(), "name"),
        w(|s| s.order.len(), "order"),
        w(|s| s.calls_per_step.len(), "model calls per step"),
    );
    println!(
        "{:<wn$}  {:<wo$}  {:<10}  {:<wc$}  what",
        "name", "order", "stochastic", "model calls per step"
    );
    for s in SAMPLERS {
        let stochastic = if s.stochastic { "yes" } else { "no" };
        println!(
            "{:<wn$}  {:<wo$}  {:<10}  {:<wc$}  {}",
            s.name, s.order, stochastic, s.calls_per_step, s.summary
        );
    }
}

fn info(cmd: InfoCmd) -> Result<()> {
    let mut opts = cmd.model_options()?;
    if cmd.threads == 0 {
        opts.intra_threads = 1; // nothing runs: one thread is enough to open the session
    }
    let mut model = opts.open()?;
    let sizes = model.pipeline_mut().map(|p| p.size_multiple());
    let m = model.metadata();
    if cmd.json {
        let text = serde_json::to_string_pretty(m).map_err(|e| Error::invalid(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!("model:        {}", model.path().display());
    println!("name:         {}", m.name);
    if !m.description.is_empty() {
        println!("description:  {}", m.description);
    }
    println!("prediction:   {:?}", m.prediction);
    println!("time input:   {:?}", m.time_input);
    println!("schedule:     {:?}", m.schedule);
    println!("sample shape: {:?}", m.sample_shape);
    println!("data range:   {:?}", m.data_range);
    println!(
        "conditioning: {}",
        m.conditioning
            .as_ref()
            .map_or("none".to_string(), |c| format!("{c:?}"))
    );
    println!("network:      sample {:?}", model.sample_type());
    if let Some(p) = model.pipeline() {
        println!(
            "pipeline:     {} (text-to-image{})",
            p.pipeline.as_deref().unwrap_or("from the folder's configs"),
            if p.inpainting() {
                "; an inpainting U-Net: latents, mask and masked image in, `inpaint` only"
            } else {
                ""
            }
        );
        println!(
            "image shape:  {:?} (latents {:?})",
            p.image_shape, p.latent_shape
        );
        if let Some(Ok([mh, mw])) = sizes {
            // A size beside the folder's, to learn whether the graphs take other sizes.
            let [_, h, w] = p.image_shape;
            match model.shapes_for(Some([h + mh, w + mw])) {
                Ok(_) => println!("other sizes:  --height a multiple of {mh}, --width of {mw}"),
                Err(e) => println!("other sizes:  none ({e})"),
            }
        }
        println!(
            "scheduler:    {} spacing, steps offset {}, set_alpha_to_one {}; lcm and tcd on the consistency grid of {} steps",
            p.spacing,
            p.steps_offset,
            p.set_alpha_to_one,
            p.original_inference_steps
                .unwrap_or(edgediff::spacing::LCM_ORIGINAL_STEPS)
        );
        println!(
            "vae:          scaling factor {}, shift {:?}",
            p.vae.scaling_factor, p.vae.shift_factor
        );
        println!(
            "text:         {} tokens x {}; default guidance {}",
            p.text.max_length, p.text.hidden_size, p.guidance
        );
    }
    if let Some(dim) = model.guidance_embedding_width() {
        println!("guidance:     an input of the network (timestep_cond, width {dim}): one call per step, no classifier-free guidance");
    }
    match &m.sampling {
        Some(s) => println!(
            "defaults:     sampler {}, {} steps{} (the model's)",
            s.sampler,
            s.steps,
            s.spacing
                .as_ref()
                .map_or(String::new(), |sp| format!(", {sp} spacing"))
        ),
        None => {
            let d = SampleOptions::default();
            println!(
                "defaults:     sampler {}, {} steps (the library's)",
                d.sampler.name(),
                d.steps
            )
        }
    }
    Ok(())
}
