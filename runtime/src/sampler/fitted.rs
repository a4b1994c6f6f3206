//! A multistep solver whose coefficients are fitted to one model by `edgediff calibrate --sampler
//! fitted` ([`crate::calibrate`]). Step i sets
//! x_{i+1} = c_i0 x_i + sum_{j <= i} c_i(j+1) D_j
//! over the x0 predictions D_0..D_i made so far. Every deterministic multistep solver of the
//! data prediction (DDIM, DPM-Solver++, UniPC) is such a combination, with coefficients fixed by
//! the grid alone; fitted by least squares to a converged solution from pilot noises (as in
//! S4S, Frankel et al. 2025, and the empirical coefficients of DPM-Solver-v3, Zheng et al. 2023)
//! they also carry what this model's trajectories look like, which is what a 3-5 step run
//! lacks most.
//!
//! The coefficients reach the sampler through [`super::Trajectory::coefficients`]
//! ([`crate::SampleOptions::coefficients`], read from a calibration file by
//! [`crate::calibrate::file`]); they belong to the time steps they were fitted on.

use ndarray::Array4;

use super::ops::lincomb;
use super::SamplerDef;
use crate::error::{Error, Result};

/// What is wrong with `rows` as coefficients for `steps` steps (row i has i + 2 finite
/// entries), or None.
pub fn coefficient_problem(rows: &[Vec<f64>], steps: usize) -> Option<String> {
    if rows.len() != steps {
        return Some(format!(
            "{} rows for {steps} time steps (one row per step)",
            rows.len()
        ));
    }
    for (i, row) in rows.iter().enumerate() {
        if row.len() != i + 2 {
            return Some(format!(
                "row {i} has {} entries; step {i} takes {} (x, then the x0 predictions 0..={i})",
                row.len(),
                i + 2
            ));
        }
        if let Some(v) = row.iter().find(|v| !v.is_finite()) {
            return Some(format!("row {i} holds {v}; coefficients must be finite"));
        }
    }
    None
}

/// [`coefficient_problem`] as the options error it is.
pub(crate) fn check_coefficients(rows: &[Vec<f64>], steps: usize) -> Result<()> {
    match coefficient_problem(rows, steps) {
        Some(why) => Err(Error::options(format!("{{0}}: {why}"), &["coefficients"])),
        None => Ok(()),
    }
}

/// x_{i+1} from x_i and the predictions so far: `row` is step i's coefficients.
pub(crate) fn combine(row: &[f64], x: &Array4<f32>, x0s: &[Array4<f32>]) -> Array4<f32> {
    let terms: Vec<(f64, &Array4<f32>)> = std::iter::once((row[0], x))
        .chain(row[1..].iter().copied().zip(x0s))
        .collect();
    lincomb(&terms)
}

pub static FITTED: SamplerDef = SamplerDef::new("fitted", "fitted", "1")
    .summary("multistep solver fitted to the model (calibrate --sampler fitted; sample --calibration)")
    .run(|_, tr, x, progress| {
        let Some(rows) = tr.coefficients else {
            return Err(Error::invalid(
                "the fitted sampler runs with the coefficients of a calibration file: `edgediff calibrate --sampler fitted --save FILE`, then `edgediff sample --calibration FILE`",
            ));
        };
        check_coefficients(rows, tr.steps())?;
        // Every prediction stays in use to the last step: one batch array per step.
        let mut x0s = Vec::with_capacity(rows.len());
        tr.walk(x, progress, |_, s| {
            x0s.push(s.d.x0);
            Ok(combine(&rows[s.i], s.x, &x0s))
        })
    });
