//! `edgediff elbo`: the full discrete ELBO of images in bits/dim, with its breakdown.

use std::path::{Path, PathBuf};
use std::time::Instant;

use argh::FromArgs;
use ndarray::{s, Array4, Ix5};

use super::{model_command, Bar};
use edgediff::elbo::{
    elbo as compute_elbo, ElboOptions, ElboReport, PixelScale, Proposal, ReverseVariance,
    TimestepSampling, DEFAULT_DECODER_DRAWS, DEFAULT_TIMESTEPS_PER_IMAGE,
};
use edgediff::npy::{read_npy, read_npy_u8_or_float, NpyArray};
use edgediff::{Error, Result};

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "elbo")]
/// The negative ELBO of 8-bit images in bits/dim (Ho et al. 2020, eq. 5): the prior term L_T,
/// the KL terms L_1..L_(T-1) (Monte Carlo over timesteps, or all of them), and the discretized
/// decoder's L_0, with standard errors. Discrete-schedule models only.
pub(super) struct ElboCmd {
    /// the images: uint8 .npy [N, H, W] or [N, C, H, W] of raw 0..255 pixels, or float32
    /// [N, C, H, W] in the model's data range on the 256-level grid
    #[argh(option)]
    data: PathBuf,
    /// use at most this many images (the first ones; default all)
    #[argh(option, short = 'n')]
    n: Option<usize>,
    /// timesteps drawn from 2..T per image (default 100)
    #[argh(option, default = "DEFAULT_TIMESTEPS_PER_IMAGE")]
    timesteps_per_image: usize,
    /// how they are drawn: importance (default; p(t) follows the terms' size through the
    /// schedule's log SNR) or uniform
    #[argh(option, default = "String::from(\"importance\")")]
    sampling: String,
    /// evaluate every timestep instead (T - 1 network calls per image plus the decoder draws)
    #[argh(switch)]
    all_timesteps: bool,
    /// seed of the timestep and noise draws (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// image-timestep evaluations per network call (default 64)
    #[argh(option, default = "64")]
    batch_size: usize,
    /// reverse variance: small (the posterior's beta-tilde, default) or large (beta)
    #[argh(option, default = "String::from(\"small\")")]
    variance: String,
    /// level k's value is lo + (hi - lo) k / S for S = 255 (the levels span the range) or 256
    /// (pixel/256, as the shipped MNIST models' training data); default 255 for uint8 data,
    /// detected for float data
    #[argh(option)]
    pixel_scale: Option<u32>,
    /// noise draws of x_1 that L_0 is averaged over (default 4)
    #[argh(option, default = "DEFAULT_DECODER_DRAWS")]
    decoder_draws: usize,
    /// bins of t for the breakdown of the KL sum (default 10)
    #[argh(option, default = "10")]
    bins: usize,
    /// for tests: float32 .npy [N, T, C, H, W] of the noise making x_t, with --all-timesteps
    /// and --decoder-draws 1
    #[argh(option, hidden_help)]
    noise: Option<PathBuf>,
    /// no progress bar
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print JSON for programs (with per-image values)
    #[argh(switch)]
    json: bool,
}
}

/// The images of `path` as `[N, C, H, W]` floats in the model's data range, and the grid.
fn load_data(
    path: &Path,
    shape: [usize; 3],
    range: [f64; 2],
    scale: Option<PixelScale>,
    limit: Option<usize>,
) -> Result<(Array4<f32>, Option<PixelScale>)> {
    let [c, h, w] = shape;
    let to4 =
        |dims: &[usize]| -> Result<[usize; 4]> {
            match *dims {
                [n, hh, ww] if c == 1 && [hh, ww] == [h, w] => Ok([n, 1, h, w]),
                [n, cc, hh, ww] if [cc, hh, ww] == shape => Ok([n, c, h, w]),
                _ => Err(Error::invalid(format!(
                "{} holds an array of shape {dims:?}; the model takes images [N, {c}, {h}, {w}]{}",
                path.display(),
                if c == 1 { format!(" or [N, {h}, {w}]") } else { String::new() }
            ))),
            }
        };
    let take = |dims: [usize; 4]| -> Result<usize> {
        match limit {
            Some(m) if m > dims[0] => Err(Error::invalid(format!(
                "-n {m} is more than the {} images in {}",
                dims[0],
                path.display()
            ))),
            Some(m) => Ok(m),
            None => Ok(dims[0]),
        }
    };
    match read_npy_u8_or_float(path)? {
        NpyArray::U8(a) => {
            let dims = to4(a.shape())?;
            let s = scale.unwrap_or(PixelScale::By255);
            let m = take(dims)?;
            let px = a.into_shape_with_order(dims).expect("same element count");
            Ok((
                s.to_model_range(px.slice(s![..m, .., .., ..]), range),
                Some(s),
            ))
        }
        NpyArray::F32(a) => {
            let dims = to4(a.shape())?;
            let m = take(dims)?;
            let x = a.into_shape_with_order(dims).expect("same element count");
            Ok((x.slice(s![..m, .., .., ..]).to_owned(), scale))
        }
    }
}

fn parse_variance(text: &str) -> Result<ReverseVariance> {
    match text {
        "small" => Ok(ReverseVariance::Small),
        "large" => Ok(ReverseVariance::Large),
        other => Err(Error::invalid(format!(
            "--variance {other}: expected small (beta-tilde) or large (beta)"
        ))),
    }
}

fn parse_scale(s: Option<u32>) -> Result<Option<PixelScale>> {
    match s {
        None => Ok(None),
        Some(255) => Ok(Some(PixelScale::By255)),
        Some(256) => Ok(Some(PixelScale::By256)),
        Some(other) => Err(Error::invalid(format!(
            "--pixel-scale {other}: expected 255 or 256"
        ))),
    }
}

pub(super) fn elbo(cmd: ElboCmd) -> Result<()> {
    let variance = parse_variance(&cmd.variance)?;
    let scale = parse_scale(cmd.pixel_scale)?;
    let proposal = match cmd.sampling.as_str() {
        "importance" => Proposal::Importance,
        "uniform" => Proposal::Uniform,
        other => {
            return Err(Error::invalid(format!(
                "--sampling {other}: expected importance or uniform"
            )))
        }
    };
    if cmd.n == Some(0) {
        return Err(Error::invalid("-n must be at least 1"));
    }
    let mut model = cmd.open_model()?;
    // Before the data is read against the model's (latent) shape, which would misdirect.
    edgediff::elbo::check_model(&model)?;
    let meta = model.metadata().clone();
    let (images, scale) = load_data(&cmd.data, meta.sample_shape, meta.data_range, scale, cmd.n)?;
    let noise = match &cmd.noise {
        Some(p) => {
            Some(
                read_npy(p)?
                    .into_dimensionality::<Ix5>()
                    .map_err(|_| Error::BadInput {
                        path: p.clone(),
                        detail: "--noise must be 5-D [N, T, C, H, W]".into(),
                    })?,
            )
        }
        None => None,
    };
    let opts = ElboOptions {
        timesteps: if cmd.all_timesteps {
            TimestepSampling::All
        } else {
            TimestepSampling::Draws(cmd.timesteps_per_image)
        },
        proposal,
        seed: cmd.seed,
        batch_size: cmd.batch_size,
        variance,
        pixel_scale: scale,
        bins: cmd.bins,
        decoder_draws: cmd.decoder_draws,
        cancel: None,
    };
    let n = images.shape()[0];
    let start = Instant::now();
    let mut bar = Bar::new(cmd.quiet, n);
    let noise = noise.map(|z| {
        z.slice(s![..n.min(z.shape()[0]), .., .., .., ..])
            .to_owned()
    });
    let report = compute_elbo(
        &mut model,
        images.view(),
        &opts,
        noise.as_ref().map(|z| z.view()),
        &mut |d, t| bar.update(d, t),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    if cmd.json {
        println!("{}", json(&report, &cmd, model.path(), seconds));
    } else {
        print_table(&report, model.path(), seconds);
    }
    Ok(())
}

fn describe(report: &ElboReport) -> (String, &'static str, &'static str) {
    let draws = match report.timesteps {
        TimestepSampling::All => "all timesteps".to_string(),
        TimestepSampling::Draws(k) => format!(
            "{k} timesteps per image (Monte Carlo, {} draws)",
            match report.proposal {
                Proposal::Importance => "importance-sampled",
                Proposal::Uniform => "uniform",
            }
        ),
    };
    let grid = match report.pixel_scale {
        PixelScale::By255 => "lo + (hi - lo) k/255",
        PixelScale::By256 => "lo + (hi - lo) k/256",
    };
    let var = match report.variance {
        ReverseVariance::Small => "small (posterior beta-tilde)",
        ReverseVariance::Large => "large (beta)",
    };
    (draws, grid, var)
}

fn print_table(report: &ElboReport, model: &Path, seconds: f64) {
    let s = report.summary();
    let (draws, grid, var) = describe(report);
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!(
        "model {}: {} images, {draws}",
        model.display(),
        report.images.len()
    );
    println!(
        "negative ELBO  {:.4} bits/dim  (standard error {}; of that, from the random draws {})",
        s.bits_per_dim,
        opt(s.standard_error),
        opt(s.mc_standard_error)
    );
    println!("  {:<30} {:>9}", "term", "bits/dim");
    println!("  {:<30} {:>9.4}", "L_T  prior KL", s.prior);
    println!(
        "  {:<30} {:>9.4}",
        format!("sum L_(t-1), t = 2..{}", report.num_train_timesteps),
        s.kl
    );
    for (&(a, b), v) in report.bins.iter().zip(&s.kl_bins) {
        println!("  {:<30} {:>9.4}", format!("  t = {a}..{b}"), v);
    }
    println!(
        "  {:<30} {:>9.4}",
        "L_0  decoder -log p(x0|x1)", s.reconstruction
    );
    println!(
        "levels on {grid}; reverse variance {var}; {} network calls, {seconds:.1}s",
        report.network_calls
    );
}

fn json(report: &ElboReport, cmd: &ElboCmd, model: &Path, seconds: f64) -> serde_json::Value {
    let s = report.summary();
    let bpd = |f: fn(&edgediff::elbo::ImageElbo) -> f64| -> Vec<f64> {
        report
            .images
            .iter()
            .map(|e| report.to_bits_per_dim(f(e)))
            .collect()
    };
    let bins: Vec<_> = report
        .bins
        .iter()
        .zip(&s.kl_bins)
        .map(|(&(a, b), v)| serde_json::json!({"t_first": a, "t_last": b, "bits_per_dim": v}))
        .collect();
    serde_json::json!({
        "model": model, "data": cmd.data, "n_images": report.images.len(),
        "all_timesteps": report.timesteps == TimestepSampling::All,
        "timesteps_per_image": match report.timesteps {
            TimestepSampling::All => report.num_train_timesteps - 1,
            TimestepSampling::Draws(k) => k,
        },
        "sampling": match (report.timesteps, report.proposal) {
            (TimestepSampling::All, _) => "all",
            (_, Proposal::Importance) => "importance",
            (_, Proposal::Uniform) => "uniform",
        },
        "seed": cmd.seed,
        "pixel_scale": match report.pixel_scale { PixelScale::By255 => 255, PixelScale::By256 => 256 },
        "variance": cmd.variance, "decoder_draws": cmd.decoder_draws,
        "bits_per_dim": s.bits_per_dim, "standard_error": s.standard_error,
        "mc_standard_error": s.mc_standard_error,
        "prior_bits_per_dim": s.prior, "kl_bits_per_dim": s.kl,
        "reconstruction_bits_per_dim": s.reconstruction, "kl_bins": bins,
        "network_calls": report.network_calls, "seconds": seconds,
        "per_image": {
            "bits_per_dim": report.per_image_bits_per_dim(),
            "prior": bpd(|e| e.prior), "kl": bpd(|e| e.kl),
            "reconstruction": bpd(|e| e.reconstruction),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_data_of_three_or_four_dimensions_is_read_and_scaled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("px.npy");
        // A hand-written uint8 .npy [2, 2, 2]: 0, 255 and 128 among the pixels.
        let header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2, 2), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16 + 1).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(&[0, 255, 128, 1, 2, 3, 4, 5]);
        std::fs::write(&path, &bytes).unwrap();
        let (x, s) = load_data(&path, [1, 2, 2], [-1.0, 1.0], None, Some(1)).unwrap();
        assert_eq!(s, Some(PixelScale::By255));
        assert_eq!(x.shape(), &[1, 1, 2, 2]);
        assert_eq!(x[[0, 0, 0, 1]], 1.0);
        assert!((x[[0, 0, 1, 0]] - (-1.0 + 256.0 / 255.0) as f32).abs() < 1e-7);
        let err = load_data(&path, [1, 3, 3], [-1.0, 1.0], None, None).unwrap_err();
        assert!(
            err.to_string().contains("[N, 1, 3, 3] or [N, 3, 3]"),
            "{err}"
        );
    }
}
