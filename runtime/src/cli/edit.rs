//! `edgediff invert` and `edgediff interpolate`: the editing uses of deterministic sampling.

use std::path::{Path, PathBuf};
use std::time::Instant;

use argh::FromArgs;
use ndarray::{s, Array4, Axis};

use super::{model_command, write_all, Bar};
use edgediff::generate::{generate, SampleOptions};
use edgediff::noise::{InjectedNoise, NoiseSource, SeededNoise};
use edgediff::npy::{npy_bytes, read_npy4_finite, write_atomic};
use edgediff::sampler::{SamplerKind, SamplerParams};
use edgediff::spacing::Spacing;
use edgediff::{Error, Result};

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "invert")]
/// Invert images to the noise that DDIM decodes back to them (DDIM inversion), and report the
/// round-trip reconstruction error. `sample --init-noise OUT --sampler ddim` with the same
/// --steps and --spacing decodes the noise again.
pub(super) struct InvertCmd {
    /// input: a PNG (one sample; repeat for more) or one float32 .npy [n, C, H, W] in the
    /// model's data range
    #[argh(option)]
    image: Vec<PathBuf>,
    /// ODE steps each way (default 50)
    #[argh(option, default = "50")]
    steps: usize,
    /// time-step spacing: leading, trailing, linspace, karras or logsnr (default trailing)
    #[argh(option, default = "String::from(\"trailing\")")]
    spacing: String,
    /// class label for class-conditional models (default: unconditional)
    #[argh(option)]
    class: Option<i64>,
    /// samples per network call (default 64)
    #[argh(option, default = "64")]
    batch_size: usize,
    /// where to write the noise, float32 .npy [n, C, H, W] (default noise.npy)
    #[argh(option, short = 'o', default = "PathBuf::from(\"noise.npy\")")]
    out: PathBuf,
    /// also write the reconstruction decoded from the noise (.png grid, .npy or a folder)
    #[argh(option)]
    reconstruction: Option<PathBuf>,
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
#[argh(subcommand, name = "interpolate")]
/// Decode a spherical interpolation between two noises into a strip of frames. Noises come
/// from .npy files (e.g. written by `invert`) or from seeds, as `sample` draws them.
pub(super) struct InterpolateCmd {
    /// first noise: a float32 .npy [n, C, H, W] (sample --from-index of it)
    #[argh(option)]
    from: Option<PathBuf>,
    /// second noise, like --from
    #[argh(option)]
    to: Option<PathBuf>,
    /// which sample of --from (default 0)
    #[argh(option, default = "0")]
    from_index: usize,
    /// which sample of --to (default 0)
    #[argh(option, default = "0")]
    to_index: usize,
    /// seed of the first noise when --from is not given (default 0)
    #[argh(option, default = "0")]
    seed_a: u64,
    /// seed of the second noise when --to is not given (default 1)
    #[argh(option, default = "1")]
    seed_b: u64,
    /// frames including both ends (default 8)
    #[argh(option, default = "8")]
    frames: usize,
    /// a deterministic sampler (default ddim)
    #[argh(option, default = "String::from(\"ddim\")")]
    sampler: String,
    /// solver order for samplers that take one
    #[argh(option)]
    order: Option<usize>,
    /// sampling steps (default 50)
    #[argh(option, default = "50")]
    steps: usize,
    /// time-step spacing (default trailing)
    #[argh(option, default = "String::from(\"trailing\")")]
    spacing: String,
    /// class label for class-conditional models
    #[argh(option)]
    class: Option<i64>,
    /// output: a .png strip, a .npy array, or a directory of PNGs (default interpolation.png)
    #[argh(option, short = 'o', default = "PathBuf::from(\"interpolation.png\")")]
    out: PathBuf,
    /// no progress bar
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print a JSON summary on stdout
    #[argh(switch)]
    json: bool,
}
}

/// Most frames one strip may have.
const MAX_FRAMES: usize = 10_000;

/// One PNG file as `[C, H, W]`: of `shape`, or with `any_size` of its channels and any size;
/// errors name the file.
fn read_png_file(
    path: &Path,
    shape: [usize; 3],
    any_size: bool,
    range: [f64; 2],
) -> Result<ndarray::Array3<f32>> {
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let img = if any_size {
        edgediff::image::read_png_any_size(&bytes, shape[0], range)
    } else {
        edgediff::image::read_png(&bytes, shape, range)
    };
    img.map_err(|e| Error::BadInput {
        path: path.into(),
        detail: e.to_string(),
    })
}
/// Reads the images given to `invert`, `inpaint` or img2img into `[n, C, H, W]`: PNGs of
/// `shape`, or with `any_size` of its channels and any one size (a pipeline's, whose run
/// takes it), or one .npy (the library checks its shape against the run).
pub(super) fn load_images(
    paths: &[PathBuf],
    shape: [usize; 3],
    any_size: bool,
    range: [f64; 2],
) -> Result<Array4<f32>> {
    let is_npy = |p: &PathBuf| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    match paths {
        [] => Err(Error::invalid(
            "give --image (a PNG, repeatable, or one .npy)",
        )),
        [p] if is_npy(p) => read_npy4_finite(p, "images must be 4-D [n, C, H, W]"),
        _ if paths.iter().any(is_npy) => Err(Error::invalid(
            "give either PNG files or a single .npy to --image",
        )),
        [first, rest @ ..] => {
            let one = read_png_file(first, shape, any_size, range)?;
            // Every image at the first one's size.
            let shape = [one.shape()[0], one.shape()[1], one.shape()[2]];
            let mut out = Array4::zeros((paths.len(), shape[0], shape[1], shape[2]));
            out.index_axis_mut(Axis(0), 0).assign(&one);
            for (i, p) in rest.iter().enumerate() {
                let img = read_png_file(p, shape, false, range)?;
                out.index_axis_mut(Axis(0), i + 1).assign(&img);
            }
            Ok(out)
        }
    }
}

pub(super) fn invert(cmd: InvertCmd) -> Result<()> {
    let spacing: Spacing = cmd.spacing.parse()?;
    // The outputs are written at the end: check them before the work.
    edgediff::output::check_file(&cmd.out)?;
    if let Some(path) = &cmd.reconstruction {
        edgediff::output::check_output(path)?;
    }
    let mut model = cmd.open_model()?;
    let meta = model.metadata().clone();
    let images = load_images(&cmd.image, meta.sample_shape, false, meta.data_range)?;
    let n = images.shape()[0];
    let start = Instant::now();
    let mut b = Bar::new(cmd.quiet, n);
    let noise = edgediff::edit::invert(
        &mut model,
        &images,
        cmd.steps,
        spacing,
        cmd.batch_size,
        cmd.class,
        &mut |d, t| b.update(d, t),
    )?;
    let invert_secs = start.elapsed().as_secs_f64();
    write_atomic(&cmd.out, &npy_bytes(noise.shape(), noise.iter().copied()))?;
    let opts = SampleOptions {
        sampler: SamplerKind::DDIM,
        steps: cmd.steps,
        spacing,
        n,
        batch_size: cmd.batch_size,
        class_label: cmd.class,
        ..Default::default()
    };
    let injected = InjectedNoise {
        initial: noise,
        steps: None,
    };
    let mut b = Bar::new(cmd.quiet, n);
    let recon = generate(&mut model, &opts, Some(&injected), &mut |d, t| {
        b.update(d, t)
    })?;
    if let Some(path) = &cmd.reconstruction {
        write_all(&recon, path, meta.data_range, None, 0)?;
    }
    // Round-trip error per sample, in data units; PSNR against the range's width.
    let rmse: Vec<f64> = images
        .outer_iter()
        .zip(recon.outer_iter())
        .map(|(a, b)| {
            let se: f64 = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum();
            (se / a.len() as f64).sqrt()
        })
        .collect();
    let max_abs = images
        .iter()
        .zip(recon.iter())
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    let mean_rmse = rmse.iter().sum::<f64>() / n as f64;
    let width = meta.data_range[1] - meta.data_range[0];
    let psnr = 20.0 * (width / mean_rmse.max(1e-300)).log10();
    if cmd.json {
        let summary = serde_json::json!({
            "out": cmd.out, "n": n, "steps": cmd.steps, "spacing": cmd.spacing,
            "reconstruction_rmse": rmse, "mean_rmse": mean_rmse, "max_abs_error": max_abs,
            "psnr_db": psnr, "invert_seconds": invert_secs,
            "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{summary}");
    } else if !cmd.quiet {
        eprintln!(
            "wrote {} ({n} noises, {} steps); round trip: mean RMSE {mean_rmse:.3e}, max |error| {max_abs:.3e}, PSNR {psnr:.1} dB",
            cmd.out.display(),
            cmd.steps
        );
    }
    Ok(())
}

/// Sample `index` of a noise file, `[1, C, H, W]`.
fn noise_from(path: &Path, index: usize, shape: [usize; 3]) -> Result<Array4<f32>> {
    let bad = |detail: String| Error::BadInput {
        path: path.into(),
        detail,
    };
    let a = read_npy4_finite(path, "a noise file must be 4-D [n, C, H, W]")?;
    if a.shape()[1..] != shape {
        return Err(bad(format!(
            "noise has shape {:?}; the model takes [n, {}, {}, {}]",
            a.shape(),
            shape[0],
            shape[1],
            shape[2]
        )));
    }
    if index >= a.shape()[0] {
        return Err(bad(format!(
            "index {index} is out of range: the file holds {} samples",
            a.shape()[0]
        )));
    }
    Ok(a.slice(s![index..index + 1, .., .., ..]).to_owned())
}

pub(super) fn interpolate(cmd: InterpolateCmd) -> Result<()> {
    let sampler = SamplerKind::new(
        &cmd.sampler,
        SamplerParams {
            order: cmd.order,
            ..Default::default()
        },
    )?;
    if sampler.is_stochastic() {
        return Err(Error::invalid(format!(
            "--sampler {} is stochastic, so the noise does not fix the image; use a deterministic one (ddim, heun, dpm++2m, unipc, ...)",
            sampler.name()
        )));
    }
    let spacing: Spacing = cmd.spacing.parse()?;
    if !(2..=MAX_FRAMES).contains(&cmd.frames) {
        // Checked before the frames are allocated: 1e8 frames would be hundreds of GB.
        return Err(Error::out_of_range(
            "frames",
            cmd.frames,
            &format!("must be in 2..={MAX_FRAMES}"),
        ));
    }
    edgediff::output::check_output(&cmd.out)?; // written at the end: checked before the work
    let mut model = cmd.open_model()?;
    let meta = model.metadata().clone();
    let shape = meta.sample_shape;
    let end = |path: &Option<PathBuf>, index: usize, seed: u64| -> Result<Array4<f32>> {
        match path {
            Some(p) => noise_from(p, index, shape),
            None => SeededNoise::new(seed, 0, 1, shape).initial(),
        }
    };
    let a = end(&cmd.from, cmd.from_index, cmd.seed_a)?;
    let b = end(&cmd.to, cmd.to_index, cmd.seed_b)?;
    let frames = edgediff::edit::slerp_frames(&a, &b, cmd.frames)?;
    let opts = SampleOptions {
        sampler,
        steps: cmd.steps,
        spacing,
        n: cmd.frames,
        batch_size: cmd.frames.min(SampleOptions::default().batch_size),
        class_label: cmd.class,
        ..Default::default()
    };
    let injected = InjectedNoise {
        initial: frames,
        steps: None,
    };
    let start = Instant::now();
    let mut bar = Bar::new(cmd.quiet, cmd.frames);
    let x = generate(&mut model, &opts, Some(&injected), &mut |d, t| {
        bar.update(d, t)
    })?;
    let files = write_all(&x, &cmd.out, meta.data_range, Some(cmd.frames), 0)?;
    if cmd.json {
        let summary = serde_json::json!({
            "out": cmd.out, "files": files, "frames": cmd.frames, "sampler": sampler.name(),
            "steps": cmd.steps, "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{summary}");
    } else if !cmd.quiet {
        eprintln!("wrote {} ({} frames)", cmd.out.display(), cmd.frames);
    }
    Ok(())
}

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "inpaint")]
/// Fill the masked pixels of images (white in the mask = fill, black = keep) with any sampler
/// that steps through noise levels, optionally with RePaint resampling (--jumps, --resample).
/// A text-to-image pipeline inpaints its latents as diffusers' StableDiffusionInpaintPipeline
/// (with --prompt; an inpainting U-Net of 9 channels gets the mask and masked image).
pub(super) struct InpaintCmd {
    /// input: a PNG (one sample; repeat for more) or one float32 .npy [n, C, H, W] in the
    /// model's data range (a pipeline's: its image shape, in [-1, 1])
    #[argh(option)]
    image: Vec<PathBuf>,
    /// mask: one grayscale PNG for all images or one per image (white = fill), or a float32
    /// .npy [n, 1 or C, H, W] of 0 (keep) and 1 (fill), values binarised at 0.5 (a pipeline's:
    /// [n, 1, H, W])
    #[argh(option)]
    mask: Vec<PathBuf>,
    /// text prompt for a text-to-image pipeline (default: the empty prompt)
    #[argh(option)]
    prompt: Option<String>,
    /// prompt guidance steers away from (default: the empty prompt)
    #[argh(option)]
    negative_prompt: Option<String>,
    /// run the last floor(steps * strength) steps, from the image noised to that level
    /// (default 1: every step, from pure noise)
    #[argh(option, default = "1.0")]
    strength: f64,
    /// initial noise, float32 .npy [n, C, H, W] (a pipeline's: its latents' shape) instead of
    /// the seeded noise
    #[argh(option)]
    init_noise: Option<PathBuf>,
    /// sampler (default ddim)
    #[argh(option, default = "String::from(\"ddim\")")]
    sampler: String,
    /// sampling steps (default 50)
    #[argh(option, default = "50")]
    steps: usize,
    /// time-step spacing (default trailing; a pipeline folder's: its scheduler's spacing,
    /// steps offset and final alpha)
    #[argh(option)]
    spacing: Option<String>,
    /// stochasticity for ddim and euler-a
    #[argh(option)]
    eta: Option<f64>,
    /// solver order for samplers that take one
    #[argh(option)]
    order: Option<usize>,
    /// resampling (RePaint): go back up after every this many steps (default 0: none)
    #[argh(option, default = "0")]
    jumps: usize,
    /// resampling (RePaint): extra passes over each jump (default 0; RePaint used 9 with --jumps 10)
    #[argh(option, default = "0")]
    resample: usize,
    /// random seed (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// index in the seed's streams of the first image's noise (default 0): the images given
    /// are samples K.. of a larger job, inpainted as that job's one run would
    #[argh(option, default = "0")]
    first_index: usize,
    /// class label for class-conditional models
    #[argh(option)]
    class: Option<i64>,
    /// classifier-free guidance scale with --class, or with a pipeline's prompt (default
    /// there 7.5)
    #[argh(option)]
    guidance: Option<f64>,
    /// samples per network call (default 64)
    #[argh(option, default = "64")]
    batch_size: usize,
    /// text-to-image: hold one graph at a time (VAE encoder, text encoder, U-Net, VAE
    /// decoder), for boxes without memory for all; the same images, written once all are sampled
    #[argh(switch)]
    low_memory: bool,
    /// output: a .png grid, a .npy array, or a directory of PNGs (default inpainted.png)
    #[argh(option, short = 'o', default = "PathBuf::from(\"inpainted.png\")")]
    out: PathBuf,
    /// no progress bar
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print a JSON summary on stdout
    #[argh(switch)]
    json: bool,
}
}

/// Reads masks: PNGs (white = fill) or a .npy; one mask is used for every image.
fn load_masks(paths: &[PathBuf], n: usize, hw: [usize; 2]) -> Result<Array4<f32>> {
    let masks = match paths {
        [] => return Err(Error::invalid("give --mask (a PNG, white = fill)")),
        [p] if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) => {
            read_npy4_finite(p, "a mask .npy must be 4-D [n, 1 or C, H, W]")?
        }
        _ => load_images(paths, [1, hw[0], hw[1]], false, [0.0, 1.0]).map_err(|e| match e {
            Error::BadInput { path, detail } => Error::BadInput {
                path,
                detail: format!("mask: {detail}"),
            },
            other => other,
        })?,
    };
    if masks.shape()[0] == 1 && n > 1 {
        let one = masks.index_axis(Axis(0), 0);
        let mut all = Array4::zeros((n, masks.shape()[1], masks.shape()[2], masks.shape()[3]));
        all.outer_iter_mut().for_each(|mut r| r.assign(&one));
        return Ok(all);
    }
    Ok(masks)
}

pub(super) fn inpaint(cmd: InpaintCmd) -> Result<()> {
    let sampler = SamplerKind::new(
        &cmd.sampler,
        SamplerParams {
            eta: cmd.eta,
            order: cmd.order,
            ..Default::default()
        },
    )?;
    let spacing: Option<Spacing> = cmd.spacing.as_deref().map(str::parse).transpose()?;
    edgediff::output::check_output(&cmd.out)?; // written at the end: checked before the work
    let injected = cmd
        .init_noise
        .as_deref()
        .map(|p| super::load_injected(p, None))
        .transpose()?;
    let mut model_opts = cmd.model_options()?;
    if model_opts.path.is_none() && cmd.prompt.is_some() {
        // As `sample`: a prompt with no model is for the shipped text-to-image model.
        model_opts.path = Some(edgediff::default_text_model()?);
    }
    model_opts.low_memory = cmd.low_memory;
    let mut model = model_opts.open()?;
    let meta = model.metadata().clone();
    // The images are what the model outputs: a pipeline's decoded images (of any size, then
    // the run's), not its latents.
    let shape = model.output_shape();
    let any_size = model.pipeline().is_some();
    let images = load_images(&cmd.image, shape, any_size, meta.data_range)?;
    let n = images.shape()[0];
    let masks = load_masks(&cmd.mask, n, [images.shape()[2], images.shape()[3]])?;
    // A pipeline's scheduler settings are its defaults, as for `sample`.
    let defaults = match spacing {
        None => SampleOptions::for_model(&model),
        Some(_) => SampleOptions::default(),
    };
    let opts = SampleOptions {
        sampler,
        steps: cmd.steps,
        spacing: spacing.unwrap_or(defaults.spacing),
        n,
        batch_size: cmd.batch_size,
        seed: cmd.seed,
        first_index: cmd.first_index,
        class_label: cmd.class,
        guidance: cmd.guidance,
        prompt: cmd.prompt,
        negative_prompt: cmd.negative_prompt,
        ..defaults
    };
    let start = Instant::now();
    let mut b = Bar::new(cmd.quiet, n);
    let (x, report) = edgediff::inpaint::inpaint(
        &mut model,
        &opts,
        &images,
        &masks,
        &edgediff::inpaint::InpaintOptions {
            resampling: edgediff::inpaint::Resampling {
                jumps: cmd.jumps,
                resample: cmd.resample,
            },
            strength: cmd.strength,
        },
        injected.as_ref(),
        &mut |d, t| b.update(d, t),
    )?;
    let files = write_all(&x, &cmd.out, meta.data_range, None, cmd.first_index)?;
    // How far the known pixels came back from the image (they are not pasted in).
    let (mut se, mut count) = (0.0f64, 0usize);
    for i in 0..n {
        // A one-channel mask repeats over the channels (C-major order).
        for ((&a, &b), m) in images
            .index_axis(Axis(0), i)
            .iter()
            .zip(x.index_axis(Axis(0), i).iter())
            .zip(masks.index_axis(Axis(0), i).iter().cycle())
        {
            if *m < 0.5 {
                se += (a as f64 - b as f64).powi(2);
                count += 1;
            }
        }
    }
    let known_rmse = (se / count.max(1) as f64).sqrt();
    if cmd.json {
        let summary = serde_json::json!({
            "out": cmd.out, "files": files, "n": n, "sampler": sampler.name(), "steps": cmd.steps,
            "height": x.shape()[2], "width": x.shape()[3],
            "jumps": cmd.jumps, "resample": cmd.resample, "strength": cmd.strength,
            "known_rmse": known_rmse,
            "network_calls": report.network_calls, "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{summary}");
    } else if !cmd.quiet {
        eprintln!(
            "wrote {} ({n} images; known pixels came back with RMSE {known_rmse:.3e})",
            cmd.out.display()
        );
    }
    Ok(())
}
