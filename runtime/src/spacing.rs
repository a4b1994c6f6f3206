//! Time-step spacings: which noise levels a sampler visits, independent of sampler and schedule.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::schedule::{NoiseLevel, Schedule};

/// How `steps` time points are chosen from the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spacing {
    /// t = (steps-1-i) * (T / steps), integer ratio: starts below T-1 (DDIM paper, diffusers' default).
    Leading,
    /// t = round(T - i T / steps) - 1: always starts at T-1 (Lin et al. 2024).
    Trailing,
    /// t = round(linspace(0, T-1, steps)) reversed.
    Linspace,
    /// Karras et al. (2022) eq. 5: sigma/alpha evenly spaced in sigma^(1/rho) between the
    /// schedule's extremes.
    Karras { rho: f64 },
    /// Evenly spaced in log-SNR (DPM-Solver's "logSNR" time steps).
    LogSnr,
    /// The consistency-distillation grid of diffusers' LCMScheduler and TCDScheduler: of the
    /// `original_steps` training indices k - 1, 2k - 1, ..., T - 1 (k = T / original_steps) the
    /// distillation used, most noisy first, the ones at floor(i original_steps / steps) for
    /// i < steps (4 of 50 on 1000: 999, 759, 499, 259). A consistency model learnt its map
    /// only from those indices. "lcm" takes `original_steps` 50, diffusers' default.
    Lcm { original_steps: usize },
}

/// diffusers' default `original_inference_steps` of LCMScheduler and TCDScheduler: the
/// number of grid points LCM distillation used (LCM-LoRA and the released LCMs keep it).
pub const LCM_ORIGINAL_STEPS: usize = 50;

/// The names [`Spacing::from_str`] takes.
const NAMES: [&str; 6] = ["leading", "trailing", "linspace", "karras", "logsnr", "lcm"];

impl FromStr for Spacing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            "karras" => Ok(Spacing::Karras { rho: 7.0 }),
            "logsnr" => Ok(Spacing::LogSnr),
            "lcm" => Ok(Spacing::Lcm {
                original_steps: LCM_ORIGINAL_STEPS,
            }),
            other => Err(Error::unknown("spacing", other, &NAMES)),
        }
    }
}

/// The two ways diffusers' schedulers lay out `leading` time steps (their `set_timesteps`).
/// A scheduler config (Stable Diffusion's says `leading`) gives different steps in different
/// scheduler classes, so a pipeline's defaults follow the chosen sampler's counterpart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadingRatio {
    /// t = i * (T / steps) for i < steps: DDIM, DDPM, PNDM, Euler, Heun, LMS, and
    /// [`Spacing::Leading`] itself.
    Steps,
    /// t = i * (T / (steps + 1)) for 1 <= i <= steps: steps + 1 points with t = 0 dropped, as
    /// the multistep solvers (DPM-Solver++, UniPC, DEIS) do.
    StepsPlusOne,
}

/// Leading time steps under `ratio`, most noisy first, without any offset.
fn leading(t_train: usize, steps: usize, ratio: LeadingRatio) -> Result<Vec<f64>> {
    let (div, first) = match ratio {
        LeadingRatio::Steps => (steps, 0),
        LeadingRatio::StepsPlusOne => (steps + 1, 1),
    };
    let r = t_train / div;
    if r == 0 {
        // diffusers would repeat t = 0; refused rather than visiting one level many times.
        return Err(Error::out_of_range(
            "steps",
            steps,
            &format!("leaves no room between the model's {t_train} training timesteps"),
        ));
    }
    Ok((first..first + steps)
        .rev()
        .map(|i| (i * r) as f64)
        .collect())
}

/// Most steps (or explicit time steps) a run may take.
pub const MAX_STEPS: usize = 100_000;

/// The schedule times a sampler visits, from most to least noisy, for `steps` model calls.
pub fn timesteps(schedule: &Schedule, spacing: Spacing, steps: usize) -> Result<Vec<f64>> {
    if steps == 0 {
        return Err(Error::options("{0} must be at least 1", &["steps"]));
    }
    let Some(t_train) = schedule.num_train_timesteps() else {
        if steps > MAX_STEPS {
            return Err(Error::out_of_range(
                "steps",
                steps,
                "is absurd (at most 100000)",
            ));
        }
        // Continuous time: evenly over the schedule's time range, whatever the spacing name.
        let (hi, lo) = schedule.time_range();
        return Ok((0..steps)
            .map(|i| hi - (hi - lo) * i as f64 / (steps.max(2) - 1) as f64)
            .collect());
    };
    if steps > t_train {
        return Err(Error::out_of_range(
            "steps",
            steps,
            &format!("exceeds the model's {t_train} training timesteps"),
        ));
    }
    let (n, s) = (t_train as f64, steps as f64);
    let ts: Vec<f64> = match spacing {
        Spacing::Leading => leading(t_train, steps, LeadingRatio::Steps)?,
        Spacing::Trailing => (0..steps)
            .map(|i| (n - i as f64 * n / s).round_ties_even() - 1.0)
            .collect(),
        Spacing::Linspace => (0..steps)
            .rev()
            .map(|i| {
                if steps == 1 {
                    0.0
                } else {
                    (i as f64 * (n - 1.0) / (s - 1.0)).round_ties_even()
                }
            })
            .collect(),
        Spacing::Lcm { original_steps } => consistency_grid(t_train, original_steps, steps)?,
        Spacing::Karras { .. } | Spacing::LogSnr => spaced_levels(schedule, spacing, steps)?
            .iter()
            .take(steps)
            .map(|l| l.t)
            .collect(),
    };
    Ok(ts)
}

/// The noise levels of `timesteps`, followed by the clean end [`NoiseLevel::CLEAN`].
pub fn levels(schedule: &Schedule, timesteps: &[f64]) -> Vec<NoiseLevel> {
    timesteps
        .iter()
        .map(|&t| schedule.level(t))
        .chain([NoiseLevel::CLEAN])
        .collect()
}

/// [`spaced_levels`] with leading spacing laid out by `ratio` and diffusers' `steps_offset`
/// added to every leading time step (Stable Diffusion's scheduler uses 1: 10 DDIM steps visit
/// 901, 801, ..., 1; 10 DPM-Solver++ steps 901, 811, ..., 91). diffusers adds the offset to
/// leading spacing only; an offset that would pass the last training index is refused.
pub fn spaced_levels_offset(
    schedule: &Schedule,
    spacing: Spacing,
    steps: usize,
    steps_offset: usize,
    ratio: LeadingRatio,
) -> Result<Vec<NoiseLevel>> {
    if spacing != Spacing::Leading || (steps_offset == 0 && ratio == LeadingRatio::Steps) {
        return spaced_levels(schedule, spacing, steps);
    }
    let Some(t_train) = schedule.num_train_timesteps() else {
        return Err(Error::options(
            "{0} applies to discrete schedules (training indices)",
            &["steps_offset"],
        ));
    };
    // timesteps() checks steps against the schedule; the layout is then `ratio`'s.
    timesteps(schedule, spacing, steps)?;
    let ts: Vec<f64> = leading(t_train, steps, ratio)?
        .into_iter()
        .map(|t| t + steps_offset as f64)
        .collect();
    if ts[0] > (t_train - 1) as f64 {
        return Err(Error::options(
            format!(
                "{{0}} {steps_offset} moves the first of {steps} leading steps to {}, past the last training index {}",
                ts[0],
                t_train - 1
            ),
            &["steps_offset"],
        ));
    }
    Ok(levels(schedule, &ts))
}

/// The `steps` noise levels a spacing visits, followed by [`NoiseLevel::CLEAN`].
pub fn spaced_levels(
    schedule: &Schedule,
    spacing: Spacing,
    steps: usize,
) -> Result<Vec<NoiseLevel>> {
    let sbars: Vec<f64> = match spacing {
        Spacing::Leading | Spacing::Trailing | Spacing::Linspace | Spacing::Lcm { .. } => {
            return Ok(levels(schedule, &timesteps(schedule, spacing, steps)?))
        }
        Spacing::Karras { rho } => {
            if !(rho > 0.0 && rho.is_finite()) {
                return Err(Error::out_of_range("rho", rho, "must be positive"));
            }
            let (hi, lo) = schedule.sbar_range();
            let (a, b) = (hi.powf(1.0 / rho), lo.powf(1.0 / rho));
            even(steps)?.map(|u| (a + u * (b - a)).powf(rho)).collect()
        }
        Spacing::LogSnr => {
            let (hi, lo) = schedule.sbar_range();
            let (a, b) = (hi.ln(), lo.ln());
            even(steps)?.map(|u| (a + u * (b - a)).exp()).collect()
        }
    };
    Ok(sbars
        .into_iter()
        .map(|s| schedule.level_for_sbar(s))
        .chain([NoiseLevel::CLEAN])
        .collect())
}

/// [`Spacing::Lcm`]'s `steps` indices on `t_train` training steps, refused where diffusers'
/// set_timesteps raises (more original steps than training steps, more steps than original).
fn consistency_grid(t_train: usize, original_steps: usize, steps: usize) -> Result<Vec<f64>> {
    if original_steps == 0 || original_steps > t_train {
        return Err(Error::out_of_range(
            "original_steps",
            original_steps,
            &format!("must be in 1..={t_train}, the model's training timesteps"),
        ));
    }
    if steps > original_steps {
        return Err(Error::out_of_range(
            "steps",
            steps,
            &format!("exceeds the {original_steps} points of the lcm spacing's grid (its original_inference_steps)"),
        ));
    }
    let k = t_train / original_steps;
    // numpy's floor(linspace(0, original_steps, steps, endpoint=False)), whose points are
    // i * (original_steps / steps): the same product here, so that the floors agree.
    let stride = original_steps as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| {
            let j = (i as f64 * stride).floor() as usize;
            ((original_steps - j) * k - 1) as f64
        })
        .collect())
}

/// `steps` fractions evenly from 0 to 1 inclusive.
fn even(steps: usize) -> Result<impl Iterator<Item = f64>> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(Error::out_of_range("steps", steps, "must be in 1..=100000"));
    }
    Ok((0..steps).map(move |i| {
        if steps == 1 {
            0.0
        } else {
            i as f64 / (steps - 1) as f64
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::ScheduleSpec;
    use crate::schedule::CONTINUOUS_T_MIN;

    fn linear() -> Schedule {
        Schedule::from_spec(&ScheduleSpec::Linear {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        })
        .unwrap()
    }

    #[test]
    fn spacings_match_their_definitions() {
        let s = linear();
        assert_eq!(
            timesteps(&s, Spacing::Leading, 4).unwrap(),
            vec![750.0, 500.0, 250.0, 0.0]
        );
        assert_eq!(
            timesteps(&s, Spacing::Trailing, 4).unwrap(),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(
            timesteps(&s, Spacing::Linspace, 4).unwrap(),
            vec![999.0, 666.0, 333.0, 0.0]
        );
        let all = timesteps(&s, Spacing::Trailing, 1000).unwrap();
        assert_eq!(all, (0..1000).rev().map(|t| t as f64).collect::<Vec<_>>());
    }

    #[test]
    fn steps_offset_shifts_leading_steps_as_diffusers_does() {
        let s = linear();
        // diffusers' DDIMScheduler(steps_offset=1).set_timesteps(10): 901, 801, ..., 1.
        let lv = spaced_levels_offset(&s, Spacing::Leading, 10, 1, LeadingRatio::Steps).unwrap();
        let ts: Vec<f64> = lv[..10].iter().map(|l| l.t).collect();
        assert_eq!(
            ts,
            (0..10)
                .rev()
                .map(|i| (i * 100 + 1) as f64)
                .collect::<Vec<_>>()
        );
        assert!(lv[10].is_clean());
        // Trailing ignores it, as in diffusers; 1000 leading steps cannot shift.
        assert_eq!(
            spaced_levels_offset(&s, Spacing::Trailing, 4, 1, LeadingRatio::StepsPlusOne).unwrap(),
            spaced_levels(&s, Spacing::Trailing, 4).unwrap()
        );
        let e =
            spaced_levels_offset(&s, Spacing::Leading, 1000, 1, LeadingRatio::Steps).unwrap_err();
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("steps_offset"));
    }

    #[test]
    fn the_multistep_solvers_leading_ratio_is_diffusers_steps_plus_one() {
        let s = linear();
        // diffusers' DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=1)
        // .set_timesteps(10): 901, 811, ..., 91 (1000 // 11 = 90 apart).
        let lv =
            spaced_levels_offset(&s, Spacing::Leading, 10, 1, LeadingRatio::StepsPlusOne).unwrap();
        let ts: Vec<f64> = lv[..10].iter().map(|l| l.t).collect();
        let want: Vec<f64> = (1..=10).rev().map(|i| (i * 90 + 1) as f64).collect();
        assert_eq!(ts, want);
        assert!(lv[10].is_clean());
        // Without an offset too; 1000 steps leave no room between the training steps.
        let lv =
            spaced_levels_offset(&s, Spacing::Leading, 4, 0, LeadingRatio::StepsPlusOne).unwrap();
        assert_eq!(lv[0].t, 800.0);
        let e = spaced_levels_offset(&s, Spacing::Leading, 1000, 0, LeadingRatio::StepsPlusOne)
            .unwrap_err();
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("steps"));
    }

    #[test]
    fn karras_and_logsnr_hit_the_schedule_extremes() {
        let s = linear();
        let (hi, lo) = s.sbar_range();
        for spacing in [Spacing::Karras { rho: 7.0 }, Spacing::LogSnr] {
            let lv = spaced_levels(&s, spacing, 10).unwrap();
            assert_eq!(lv.len(), 11);
            assert!(
                (lv[0].sbar() / hi - 1.0).abs() < 1e-12 && (lv[9].sbar() / lo - 1.0).abs() < 1e-12
            );
            assert!((lv[0].t - 999.0).abs() < 1e-9 && lv[9].t.abs() < 1e-9);
            assert!(lv[10].is_clean());
        }
        // Karras: sigma^(1/7) is evenly spaced; log-SNR: log sigma is.
        let k = spaced_levels(&s, Spacing::Karras { rho: 7.0 }, 5).unwrap();
        let r: Vec<f64> = k[..5].iter().map(|l| l.sbar().powf(1.0 / 7.0)).collect();
        assert!(((r[0] - r[1]) - (r[3] - r[4])).abs() < 1e-12);
        let g = spaced_levels(&s, Spacing::LogSnr, 5).unwrap();
        assert!(((g[0].lambda() - g[1].lambda()) - (g[3].lambda() - g[4].lambda())).abs() < 1e-12);
    }

    #[test]
    fn rejects_zero_and_too_many_steps() {
        let s = linear();
        let flag = |a: &str| format!("--{a}");
        let zero = timesteps(&s, Spacing::Leading, 0).unwrap_err();
        assert_eq!(
            zero.to_string(),
            "invalid argument: steps must be at least 1"
        );
        assert_eq!(zero.argument().and_then(|a| a.arg()), Some("steps"));
        let many = timesteps(&s, Spacing::Leading, 1001).unwrap_err();
        assert_eq!(
            many.message_with(&flag),
            "invalid argument: --steps 1001 exceeds the model's 1000 training timesteps"
        );
    }

    #[test]
    fn the_lcm_grid_is_diffusers_lcm_schedulers() {
        let s = linear();
        // LCMScheduler(original_inference_steps=50).set_timesteps(n).timesteps, printed by
        // diffusers 0.42 for n = 4, 1, 3, 6 and 50.
        let lcm = |n| timesteps(&s, "lcm".parse().unwrap(), n).unwrap();
        assert_eq!(lcm(4), vec![999.0, 759.0, 499.0, 259.0]);
        assert_eq!(lcm(1), vec![999.0]);
        assert_eq!(lcm(3), vec![999.0, 679.0, 339.0]);
        assert_eq!(lcm(6), vec![999.0, 839.0, 679.0, 499.0, 339.0, 179.0]);
        assert_eq!(
            lcm(50),
            (1..=50)
                .rev()
                .map(|j| (j * 20 - 1) as f64)
                .collect::<Vec<_>>()
        );
        let e = timesteps(&s, "lcm".parse().unwrap(), 51).unwrap_err();
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("steps"));
        let grid = Spacing::Lcm {
            original_steps: 2000,
        };
        let e = timesteps(&s, grid, 4).unwrap_err();
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("original_steps"));
    }

    #[test]
    fn continuous_times_run_from_one_to_t_min() {
        let s = Schedule::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        };
        let ts = timesteps(&s, Spacing::Trailing, 5).unwrap();
        assert_eq!(ts[0], 1.0);
        assert!((ts[4] - CONTINUOUS_T_MIN).abs() < 1e-15);
    }
}
