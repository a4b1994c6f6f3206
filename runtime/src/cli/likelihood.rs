//! `edgediff likelihood`: log p(x) and bits per dimension through the probability-flow ODE.

use std::path::PathBuf;
use std::time::Instant;

use argh::FromArgs;
use ndarray::s;

use super::{model_command, Bar};
use edgediff::likelihood::{
    log_likelihood, mean_and_se, LikelihoodOptions, OdeSolver, DEFAULT_FD_STEP, DEFAULT_STEPS,
};
use edgediff::npy::{read_npy4, write_atomic};
use edgediff::{Error, Result};

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "likelihood")]
/// Log-likelihood (nats) and bits/dim of data under the model, by the probability-flow ODE with
/// a Hutchinson trace estimator (finite-difference Jacobian-vector products of the network).
pub(super) struct LikelihoodCmd {
    /// the data: float32 .npy [n, C, H, W] in the model's data range
    #[argh(option)]
    data: PathBuf,
    /// evaluate only the first N images (default: all)
    #[argh(option, short = 'n')]
    n: Option<usize>,
    /// number of Hutchinson probes per image, averaged (default 1)
    #[argh(option, default = "1")]
    probes: usize,
    /// probe distribution: rademacher (default) or gaussian
    #[argh(option, default = "String::from(\"rademacher\")")]
    probe: String,
    /// steps of RK4, uniform in log(sigma/alpha) (default 64)
    #[argh(option)]
    steps: Option<usize>,
    /// relative tolerance: use the adaptive Bogacki-Shampine solver instead of RK4
    #[argh(option)]
    rtol: Option<f64>,
    /// absolute tolerance of the adaptive solver (default: --rtol's value)
    #[argh(option)]
    atol: Option<f64>,
    /// relative finite-difference step (default 1e-3): eta = step * max(rms(x), 1)
    #[argh(option, default = "DEFAULT_FD_STEP")]
    fd_step: f64,
    /// quantisation bins across the data range for bits/dim (default 256: 8-bit images)
    #[argh(option, default = "256.0")]
    bins: f64,
    /// class label for class-conditional models (default: unconditional, the null label)
    #[argh(option)]
    class: Option<i64>,
    /// seed of the probes (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// images per solver batch (default 64); each network call holds (1 + 2 probes) rows each
    #[argh(option, default = "64")]
    batch_size: usize,
    /// also write per-image values to this CSV file
    #[argh(option)]
    per_image: Option<PathBuf>,
    /// no progress bar
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print JSON (summary and per-image values) on stdout
    #[argh(switch)]
    json: bool,
}
}

fn solver(cmd: &LikelihoodCmd) -> Result<OdeSolver> {
    match (cmd.steps, cmd.rtol, cmd.atol) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(Error::invalid(
            "give either --steps (RK4) or --rtol/--atol (adaptive), not both",
        )),
        (None, None, Some(_)) => Err(Error::invalid("--atol needs --rtol (the adaptive solver)")),
        (steps, None, None) => Ok(OdeSolver::Rk4 {
            steps: steps.unwrap_or(DEFAULT_STEPS),
        }),
        (None, Some(rtol), atol) => Ok(OdeSolver::Adaptive {
            rtol,
            atol: atol.unwrap_or(rtol),
        }),
    }
}

pub(super) fn likelihood(cmd: LikelihoodCmd) -> Result<()> {
    let opts = LikelihoodOptions {
        solver: solver(&cmd)?,
        probes: cmd.probes,
        probe: cmd.probe.parse()?,
        fd_step: cmd.fd_step,
        batch_size: cmd.batch_size,
        seed: cmd.seed,
        class_label: cmd.class,
        bins: cmd.bins,
    };
    opts.validate()?;
    let data = read_npy4(&cmd.data, "the data must be 4-D [n, C, H, W]")?;
    let available = data.shape()[0];
    let n = match cmd.n {
        Some(n) if n == 0 || n > available => {
            return Err(Error::invalid(format!(
                "-n {n} must be in 1..={available} (the images in {})",
                cmd.data.display()
            )))
        }
        Some(n) => n,
        None => available,
    };
    let data = data.slice(s![0..n, .., .., ..]).to_owned();
    if let Some(path) = &cmd.per_image {
        edgediff::output::check_file(path)?; // written at the end: checked before the work
    }
    let mut model = cmd.open_model()?;
    if model.integer_time() {
        log::warn!(
            "this model takes integer timesteps: the ODE solver's times reach it rounded, so the \
             network is piecewise constant in time and the solver's accuracy is not what it is \
             on float-time models"
        );
    }
    let [lo, hi] = model.metadata().data_range;
    let outside = data
        .iter()
        .filter(|&&v| (v as f64) < lo || (v as f64) > hi)
        .count();
    if outside > 0 {
        log::warn!("{outside} values of the data lie outside the model's data range [{lo}, {hi}]");
    }
    let start = Instant::now();
    let mut b = Bar::new(cmd.quiet, n);
    let report = log_likelihood(&mut model, &data, &opts, &mut |d, t| b.update(d, t))?;
    let secs = start.elapsed().as_secs_f64();
    let nats: Vec<f64> = report.images.iter().map(|i| i.log_density).collect();
    let bpd: Vec<f64> = report.images.iter().map(|i| i.bits_per_dim).collect();
    let (nats_mean, nats_se) = mean_and_se(&nats);
    let (bpd_mean, bpd_se) = mean_and_se(&bpd);
    if let Some(path) = &cmd.per_image {
        let mut csv = String::from(
            "index,log_density_nats,bits_per_dim,prior_nats,divergence_integral_nats\n",
        );
        for (i, img) in report.images.iter().enumerate() {
            csv.push_str(&format!(
                "{i},{},{},{},{}\n",
                img.log_density, img.bits_per_dim, img.prior, img.divergence_integral
            ));
        }
        write_atomic(path, csv.as_bytes())?;
    }
    let (solver_name, steps, rtol, atol) = match opts.solver {
        OdeSolver::Rk4 { steps } => ("rk4", Some(steps), None, None),
        OdeSolver::Adaptive { rtol, atol } => ("bs3-adaptive", None, Some(rtol), Some(atol)),
    };
    if cmd.json {
        let summary = serde_json::json!({
            "model": model.path(), "data": cmd.data, "n": n, "dim": report.dim,
            "solver": solver_name, "steps": steps, "rtol": rtol, "atol": atol,
            "steps_per_batch": report.steps.iter().map(|s| s.0).collect::<Vec<_>>(),
            "rejected_per_batch": report.steps.iter().map(|s| s.1).collect::<Vec<_>>(),
            "probes": opts.probes, "probe": cmd.probe, "fd_step": opts.fd_step, "seed": opts.seed,
            "bins": opts.bins, "bin_width": report.bin_width,
            "log_density_mean": nats_mean, "log_density_se": nats_se,
            "nll_per_dim_nats": -nats_mean / report.dim as f64,
            "bits_per_dim_mean": bpd_mean, "bits_per_dim_se": bpd_se,
            "log_density": nats, "bits_per_dim": bpd,
            "network_calls": report.network_calls, "seconds": secs,
            "per_image": cmd.per_image,
        });
        println!("{summary}");
    } else {
        println!(
            "log p(x) = {nats_mean:.4} ± {nats_se:.4} nats per image ({n} images, D = {})",
            report.dim
        );
        println!(
            "bits/dim = {bpd_mean:.4} ± {bpd_se:.4} ({} bins over [{lo}, {hi}], bin width {:.6})",
            opts.bins, report.bin_width
        );
        if !cmd.quiet {
            eprintln!(
                "{solver_name}, {} probe(s), {} network calls, {secs:.2}s",
                opts.probes, report.network_calls
            );
        }
    }
    Ok(())
}
