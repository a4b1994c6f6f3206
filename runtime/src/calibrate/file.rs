//! The calibration file: what `edgediff calibrate --save FILE` writes and `edgediff sample
//! --calibration FILE` reads. One small JSON object: the sampler, its time steps, the fitted
//! sampler's coefficients, the schedule they belong to, and how the fit went.
//!
//! ```json
//! {"edgediff_calibration": 1, "model": "gmm-oracle-linear",
//!  "schedule": {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02},
//!  "sampler": "fitted", "order": null, "timesteps": [999.0, 512.3, 130.8],
//!  "coefficients": [[0.99, 0.08], [0.84, -1.27, 1.73], [0.24, -0.43, 0.56, 0.19]],
//!  "fit": {"pilot": 1024, "seed": 1, "rmse": 0.07}}
//! ```
//!
//! The times are the schedule's, so a file is refused for a model of another schedule; the
//! coefficients are fitted to one network, which the file names but cannot check (a model of
//! the same schedule takes the file, and is then only as well served as its trajectories
//! resemble the calibrated model's).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CalibrateOptions, Calibration};
use crate::error::{Error, Result};
use crate::generate::SampleOptions;
use crate::metadata::ScheduleSpec;
use crate::model::Model;
use crate::sampler::fitted::coefficient_problem;
use crate::sampler::{SamplerKind, SamplerParams};

/// The format version this edgediff writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A calibration as its file holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationFile {
    /// The format version, [`FORMAT_VERSION`].
    pub edgediff_calibration: u32,
    /// The calibrated model's metadata name (for people: it is not checked).
    #[serde(default)]
    pub model: String,
    /// The schedule the times are points of.
    pub schedule: ScheduleSpec,
    /// The sampler, as `edgediff samplers` names it.
    pub sampler: String,
    /// Its order, for samplers that take one.
    #[serde(default)]
    pub order: Option<usize>,
    /// The schedule times, most noisy first.
    pub timesteps: Vec<f64>,
    /// The fitted sampler's coefficients, one row per time step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coefficients: Option<Vec<Vec<f64>>>,
    /// How it was made (pilot, seed, teacher, errors): for people, not read back.
    #[serde(default)]
    pub fit: serde_json::Value,
}

impl CalibrationFile {
    /// The file of calibration `cal`, made on `model` with `opts`.
    pub fn new(model: &Model, opts: &CalibrateOptions, cal: &Calibration) -> CalibrationFile {
        let order = opts.sampler.settings().order;
        CalibrationFile {
            edgediff_calibration: FORMAT_VERSION,
            model: model.metadata().name.clone(),
            schedule: model.metadata().schedule.clone(),
            sampler: opts.sampler.name().into(),
            order: (order > 0).then_some(order),
            timesteps: cal.timesteps.clone(),
            coefficients: cal.coefficients.clone(),
            fit: serde_json::json!({
                "pilot": opts.pilot, "seed": opts.seed, "teacher_steps": opts.teacher_steps,
                "class_label": opts.class_label, "guidance": opts.guidance,
                "rmse": cal.rmse, "rmse_logsnr": cal.rmse_logsnr,
                "rmse_trailing": cal.rmse_trailing, "teacher_rmse": cal.teacher_rmse,
                "evals": cal.evals,
            }),
        }
    }

    /// Writes the file (atomically: a reader never sees half of it).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data serialises");
        crate::npy::write_atomic(path, format!("{text}\n").as_bytes())
    }

    /// Reads and checks a calibration file: its format version, its sampler, and its
    /// coefficients' shape against its time steps.
    pub fn read(path: &Path) -> Result<CalibrationFile> {
        let bad = |detail: String| Error::BadInput {
            path: path.into(),
            detail,
        };
        let bytes =
            std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            bad("not an edgediff calibration file (not UTF-8 text); make one with `edgediff calibrate ... --save FILE`".into())
        })?;
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("edgediff_calibration").and_then(|v| v.as_u64()));
        match version {
            None => {
                return Err(bad(format!(
                    "not an edgediff calibration file (no \"edgediff_calibration\" version{}); make one with `edgediff calibrate ... --save FILE`",
                    match serde_json::from_str::<serde_json::Value>(&text) {
                        Err(e) => format!("; not JSON: {e}"),
                        Ok(_) => String::new(),
                    }
                )))
            }
            Some(v) if v != FORMAT_VERSION as u64 => {
                return Err(bad(format!(
                    "calibration format {v}; this edgediff reads format {FORMAT_VERSION}: calibrate again with it"
                )))
            }
            Some(_) => {}
        }
        let file: CalibrationFile = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a valid calibration file: {e}")))?;
        file.sampler_kind().map_err(|e| bad(e.to_string()))?;
        let fitted = file.sampler == crate::sampler::fitted::FITTED.name();
        match (&file.coefficients, fitted) {
            (Some(rows), true) => {
                if let Some(why) = coefficient_problem(rows, file.timesteps.len()) {
                    return Err(bad(format!("coefficients: {why}")));
                }
            }
            (None, true) => {
                return Err(bad(
                    "the fitted sampler's file holds no coefficients; calibrate again".into(),
                ))
            }
            (Some(_), false) => {
                return Err(bad(format!(
                    "coefficients are for the fitted sampler, not {}",
                    file.sampler
                )))
            }
            (None, false) => {}
        }
        Ok(file)
    }

    /// The sampler the file names, with its order.
    pub fn sampler_kind(&self) -> Result<SamplerKind> {
        SamplerKind::new(
            &self.sampler,
            SamplerParams {
                order: self.order,
                ..Default::default()
            },
        )
    }

    /// Sets `opts`' sampler, time steps and coefficients to the file's; refuses a file made
    /// for another schedule than `model`'s (its times would be other noise levels there).
    /// The file at `path` is named in the error.
    pub fn apply(&self, model: &Model, path: &Path, opts: &mut SampleOptions) -> Result<()> {
        let schedule = &model.metadata().schedule;
        if *schedule != self.schedule {
            return Err(Error::BadInput {
                path: path.into(),
                detail: format!(
                    "made for a model with schedule {} ({}), but {} has {}; calibrate this model",
                    schedule_text(&self.schedule),
                    if self.model.is_empty() {
                        "unnamed"
                    } else {
                        &self.model
                    },
                    model.path().display(),
                    schedule_text(schedule)
                ),
            });
        }
        opts.sampler = self.sampler_kind()?;
        opts.timesteps = Some(self.timesteps.clone());
        opts.coefficients = self.coefficients.clone();
        Ok(())
    }
}

fn schedule_text(s: &ScheduleSpec) -> String {
    serde_json::to_string(s).expect("plain data serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fitted_file() -> CalibrationFile {
        CalibrationFile {
            edgediff_calibration: FORMAT_VERSION,
            model: "m".into(),
            schedule: ScheduleSpec::Linear {
                num_train_timesteps: 1000,
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            sampler: "fitted".into(),
            order: None,
            timesteps: vec![999.0, 431.25, 57.5],
            coefficients: Some(vec![
                vec![0.99, 0.08],
                vec![0.84, -1.27, 1.73],
                vec![0.24, -0.43, 0.56, 1.0 / 3.0],
            ]),
            fit: serde_json::json!({"pilot": 8}),
        }
    }

    #[test]
    fn a_written_file_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cal.json");
        let file = fitted_file();
        file.write(&path).unwrap();
        // serde_json writes the shortest representation that reads back to the same f64.
        assert_eq!(CalibrationFile::read(&path).unwrap(), file);
        let kind = file.sampler_kind().unwrap();
        assert_eq!(kind.name(), "fitted");
    }

    #[test]
    fn malformed_files_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cal.json");
        let mut v = serde_json::to_value(fitted_file()).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["edgediff_calibration"] = 2.into()),
                "calibration format 2",
            ),
            (
                Box::new(|v| v["coefficients"] = serde_json::Value::Null),
                "holds no coefficients",
            ),
            (
                Box::new(|v| v["coefficients"][2] = serde_json::json!([1.0, 2.0])),
                "row 2 has 2 entries",
            ),
            (
                Box::new(|v| v["sampler"] = "magic".into()),
                "unknown sampler 'magic'",
            ),
            (
                Box::new(|v| v["sampler"] = "ddim".into()),
                "for the fitted sampler, not ddim",
            ),
            (Box::new(|v| v["stepz"] = 3.into()), "unknown field `stepz`"),
        ];
        for (edit, message) in cases {
            let mut bad = v.clone();
            edit(&mut bad);
            std::fs::write(&path, bad.to_string()).unwrap();
            let e = CalibrationFile::read(&path).unwrap_err().to_string();
            assert!(e.contains(message) && e.contains("cal.json"), "{e}");
        }
        std::fs::write(&path, "999,500").unwrap();
        let e = CalibrationFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("not an edgediff calibration file"), "{e}");
        v["coefficients"] = serde_json::Value::Null;
        v["sampler"] = "unipc".into();
        v["order"] = 3.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let grid_only = CalibrationFile::read(&path).unwrap();
        assert_eq!(grid_only.sampler_kind().unwrap().settings().order, 3);
    }
}
