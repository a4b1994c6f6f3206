//! `edgediff schedule`: a noise schedule's table (the seed's §5.1 panels: beta, alpha-bar, the
//! noise level sqrt(1 - alpha-bar), log SNR) as CSV or JSON.

use std::path::PathBuf;

use argh::FromArgs;

use edgediff::metadata::ScheduleSpec;
use edgediff::npy::write_atomic;
use edgediff::schedule::Schedule;
use edgediff::{Error, Result};

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "schedule")]
/// Print a noise schedule per step: t, beta, alpha_bar, noise level sqrt(1 - alpha_bar) (sigma
/// for VE), log SNR. Discrete kinds use the exporter's definitions (linear and quadratic betas
/// 1e-4..0.02, sigmoid, cosine s = 0.008); vp is beta 0.1..20 and ve sigma 0.01..50 over t in (0, 1].
pub(super) struct ScheduleCmd {
    /// linear, cosine, quadratic, sigmoid, vp or ve
    #[argh(option)]
    kind: String,
    /// training steps of a discrete schedule, or rows for vp/ve (default 1000)
    #[argh(option, default = "1000")]
    steps: usize,
    /// write CSV here (default: CSV on stdout)
    #[argh(option, short = 'o')]
    out: Option<PathBuf>,
    /// print JSON rows instead of CSV
    #[argh(switch)]
    json: bool,
}

/// One row: (t, beta, alpha_bar, noise level, log SNR).
type Row = (f64, f64, f64, f64, f64);

fn rows(kind: &str, steps: usize) -> Result<Vec<Row>> {
    if !(2..=100_000).contains(&steps) {
        return Err(Error::invalid(format!(
            "--steps {steps} is outside 2..=100000"
        )));
    }
    let t = steps;
    let spec = match kind {
        "linear" => ScheduleSpec::Linear {
            num_train_timesteps: t,
            beta_start: 1e-4,
            beta_end: 0.02,
        },
        "quadratic" => ScheduleSpec::Quadratic {
            num_train_timesteps: t,
            beta_start: 1e-4,
            beta_end: 0.02,
        },
        "sigmoid" => ScheduleSpec::Sigmoid {
            num_train_timesteps: t,
            beta_start: 1e-4,
            beta_end: 0.02,
        },
        "cosine" => ScheduleSpec::Cosine {
            num_train_timesteps: t,
            s: 0.008,
            max_beta: 0.999,
        },
        "vp" => ScheduleSpec::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        },
        "ve" => ScheduleSpec::Ve {
            sigma_min: 0.01,
            sigma_max: 50.0,
        },
        other => {
            return Err(Error::invalid(format!(
                "unknown --kind '{other}'; expected linear, cosine, quadratic, sigmoid, vp or ve"
            )))
        }
    };
    let schedule = Schedule::from_spec_unchecked(&spec);
    Ok(match &schedule {
        Schedule::Discrete {
            betas,
            alphas_cumprod,
            ..
        } => betas
            .iter()
            .zip(alphas_cumprod)
            .enumerate()
            .map(|(i, (&b, &ab))| (i as f64, b, ab, (1.0 - ab).sqrt(), (ab / (1.0 - ab)).ln()))
            .collect(),
        Schedule::Vp { beta_min, beta_max } => (1..=steps)
            .map(|i| {
                let t = i as f64 / steps as f64;
                let l = schedule.level(t);
                let ab = l.alpha * l.alpha;
                (
                    t,
                    beta_min + t * (beta_max - beta_min),
                    ab,
                    l.sigma,
                    (ab / (1.0 - ab)).ln(),
                )
            })
            .collect(),
        Schedule::Ve {
            sigma_min,
            sigma_max,
        } => (1..=steps)
            .map(|i| {
                let t = i as f64 / steps as f64;
                let sigma = schedule.level(t).sigma;
                // d sigma² / dt, the VE SDE's g(t)², in the beta column.
                let g2 = 2.0 * sigma * sigma * (sigma_max / sigma_min).ln();
                (t, g2, 1.0, sigma, -2.0 * sigma.ln())
            })
            .collect(),
    })
}

pub(super) fn schedule(cmd: ScheduleCmd) -> Result<()> {
    let rows = rows(&cmd.kind, cmd.steps)?;
    if cmd.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"t": r.0, "beta": r.1, "alpha_bar": r.2, "noise_level": r.3, "log_snr": r.4}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    let mut csv = String::from("t,beta,alpha_bar,noise_level,log_snr\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{:e},{:e},{:e},{:e}\n",
            r.0, r.1, r.2, r.3, r.4
        ));
    }
    match &cmd.out {
        Some(path) => write_atomic(path, csv.as_bytes()),
        None => {
            use std::io::Write;
            match std::io::stdout().write_all(csv.as_bytes()) {
                // A reader that stops early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(Error::io("writing to stdout")(e))
                }
                _ => Ok(()),
            }
        }
    }
}
