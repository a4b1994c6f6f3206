//! `edgediff calibrate`: time steps (and the fitted sampler's coefficients) fitted to one model
//! and sampler, for `sample --timesteps` or `sample --calibration`.

use std::path::PathBuf;
use std::time::Instant;

use argh::FromArgs;

use super::model_command;
use edgediff::calibrate::file::CalibrationFile;
use edgediff::calibrate::{calibrate, default_max_evals, default_starts, CalibrateOptions};
use edgediff::npy::write_atomic;
use edgediff::sampler::{SamplerKind, SamplerParams};
use edgediff::Result;

model_command! {
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "calibrate")]
/// Fit a deterministic sampler's time steps to the model: the grid whose output on pilot noises
/// is closest to a converged probability-flow ODE solution. Prints the list for --timesteps:
/// edgediff sample --sampler unipc --order 3 --timesteps "$(edgediff calibrate --sampler unipc --order 3 --steps 10 -q)"
/// With --sampler fitted the solver's coefficients are fitted too (the teacher's trajectory is
/// kept: 2 x teacher-steps pilot-sized arrays); save them with --save FILE and sample with
/// `edgediff sample --calibration FILE`.
pub(super) struct CalibrateCmd {
    /// a deterministic sampler, e.g. unipc, dpm++2m, dpm++3m, ddim, heun, or fitted (its
    /// coefficients fitted as well) (default unipc)
    #[argh(option, default = "String::from(\"unipc\")")]
    sampler: String,
    /// solver order for samplers that take one (unipc default here: 3)
    #[argh(option)]
    order: Option<usize>,
    /// time points to place (default 10)
    #[argh(option, default = "10")]
    steps: usize,
    /// pilot noises the error is measured on (default 256)
    #[argh(option, default = "256")]
    pilot: usize,
    /// seed of the pilot noises (default 1; sample with other seeds to judge it fairly)
    #[argh(option, default = "1")]
    seed: u64,
    /// steps of the Heun teacher, uniform in log SNR (default 250)
    #[argh(option, default = "250")]
    teacher_steps: usize,
    /// most sampler runs of the search, all starts together (default 50 x steps x starts)
    #[argh(option, default = "0")]
    max_evals: usize,
    /// points the search starts from: the uniform log-SNR grid, then seeded random ones; the
    /// best wins (default 1; 4 for the fitted sampler)
    #[argh(option, default = "0")]
    starts: usize,
    /// class label for class-conditional models (default: unconditional)
    #[argh(option)]
    class: Option<i64>,
    /// classifier-free guidance scale (with --class)
    #[argh(option)]
    guidance: Option<f64>,
    /// pilot samples per network call (default 256)
    #[argh(option, default = "256")]
    batch_size: usize,
    /// also write the list to this file
    #[argh(option, short = 'o')]
    out: Option<PathBuf>,
    /// also write the calibration file (sampler, time steps, the fitted sampler's coefficients;
    /// JSON) for `edgediff sample --calibration`
    #[argh(option)]
    save: Option<PathBuf>,
    /// print only the list
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print JSON for programs
    #[argh(switch)]
    json: bool,
}
}

pub(super) fn calibrate_cmd(cmd: CalibrateCmd) -> Result<()> {
    let order = match (cmd.sampler.as_str(), cmd.order) {
        // unipc's sampling default is order 2; with calibrated steps order 3 was the better one
        // on the oracle (docs/fidelity.md).
        ("unipc", None) => Some(3),
        (_, order) => order,
    };
    let sampler = SamplerKind::new(
        &cmd.sampler,
        SamplerParams {
            order,
            ..Default::default()
        },
    )?;
    let opts = CalibrateOptions {
        sampler,
        steps: cmd.steps,
        pilot: cmd.pilot,
        seed: cmd.seed,
        teacher_steps: cmd.teacher_steps,
        max_evals: cmd.max_evals,
        starts: cmd.starts,
        batch_size: cmd.batch_size,
        class_label: cmd.class,
        guidance: cmd.guidance,
    };
    if sampler.name() == edgediff::sampler::fitted::FITTED.name() && cmd.save.is_none() && !cmd.json
    {
        return Err(edgediff::Error::invalid(
            "--sampler fitted fits coefficients that only --save FILE (or --json) keeps; the list alone cannot sample as it",
        ));
    }
    for path in cmd.out.iter().chain(&cmd.save) {
        edgediff::output::check_file(path)?; // written at the end: checked before the work
    }
    let mut model = cmd.open_model()?;
    edgediff::calibrate::check_model(&model)?; // before the banner of a search never run
    if model.integer_time() {
        log::warn!(
            "this model takes integer timesteps: the calibrated times reach it rounded, so \
             nearby grids give the same samples and the search has less to work with"
        );
    }
    let start = Instant::now();
    let starts = match cmd.starts {
        0 => default_starts(&sampler),
        k => k,
    };
    let budget = match cmd.max_evals {
        0 => default_max_evals(cmd.steps, starts),
        k => k,
    };
    let show = !cmd.quiet && !cmd.json;
    if show {
        eprintln!(
            "teacher: heun, {} log-SNR steps on {} pilot noises (seed {}); then at most {budget} runs of {} from {starts} start(s)",
            cmd.teacher_steps, cmd.pilot, cmd.seed, sampler.name()
        );
    }
    let cal = calibrate(&mut model, &opts, &mut |evals, best| {
        if show && (evals % 20 == 0 || evals == 1) {
            eprintln!("  run {evals}: best pilot RMSE {best:.3e}");
        }
    })?;
    let list = cal
        .timesteps
        .iter()
        .map(|t| format!("{t:.4}"))
        .collect::<Vec<_>>()
        .join(",");
    if let Some(path) = &cmd.out {
        write_atomic(path, format!("{list}\n").as_bytes())?;
    }
    if let Some(path) = &cmd.save {
        CalibrationFile::new(&model, &opts, &cal).write(path)?;
    }
    let secs = start.elapsed().as_secs_f64();
    if cmd.json {
        let v = serde_json::json!({
            "model": model.path(), "sampler": sampler.name(), "order": order, "steps": cmd.steps,
            "timesteps": cal.timesteps, "pilot": cmd.pilot, "seed": cmd.seed,
            "teacher_steps": cmd.teacher_steps, "teacher_rmse": cal.teacher_rmse,
            "rmse": cal.rmse, "rmse_logsnr": cal.rmse_logsnr, "rmse_trailing": cal.rmse_trailing,
            "evals": cal.evals, "starts": starts, "coefficients": cal.coefficients,
            "seconds": secs,
        });
        println!("{v}");
        return Ok(());
    }
    if show {
        eprintln!(
            "pilot RMSE to the teacher: calibrated {:.3e}, uniform log-SNR {:.3e}, trailing {:.3e} \
             (teacher vs half its steps {:.1e}); {} runs, {secs:.1}s",
            cal.rmse, cal.rmse_logsnr, cal.rmse_trailing, cal.teacher_rmse, cal.evals
        );
    }
    println!("{list}");
    Ok(())
}
