//! Time-step spacings: which noise levels a sampler visits, independent of sampler and schedule.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::schedule::{NoiseLevel, Schedule};

/// How `steps` time points are chosen from the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// t = (steps-1-i) * (T / steps), integer ratio: starts below T-1 (DDIM paper, diffusers' default).
    Leading,
    /// t = round(T - i T / steps) - 1: always starts at T-1 (Lin et al. 2024).
    Trailing,
    /// t = round(linspace(0, T-1, steps)) reversed.
    Linspace,
}

impl FromStr for Spacing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(Error::InvalidArgument(format!(
                "unknown spacing '{other}'; expected leading, trailing or linspace"
            ))),
        }
    }
}

/// Smallest continuous time visited by VP/VE samplers (Song et al. 2021 use 1e-3 and 1e-5).
pub const CONTINUOUS_T_MIN: f64 = 1e-3;

/// The schedule times a sampler visits, from most to least noisy, for `steps` model calls.
pub fn timesteps(schedule: &Schedule, spacing: Spacing, steps: usize) -> Result<Vec<f64>> {
    if steps == 0 {
        return Err(Error::InvalidArgument("--steps must be at least 1".into()));
    }
    let Some(t_train) = schedule.num_train_timesteps() else {
        if steps > 100_000 {
            return Err(Error::InvalidArgument(format!("--steps {steps} is absurd (at most 100000)")));
        }
        // Continuous time: evenly from 1 down to CONTINUOUS_T_MIN, whatever the spacing name.
        return Ok((0..steps)
            .map(|i| 1.0 - (1.0 - CONTINUOUS_T_MIN) * i as f64 / (steps.max(2) - 1) as f64)
            .collect());
    };
    if steps > t_train {
        return Err(Error::InvalidArgument(format!(
            "--steps {steps} exceeds the model's {t_train} training timesteps"
        )));
    }
    let (n, s) = (t_train as f64, steps as f64);
    let ts: Vec<f64> = match spacing {
        Spacing::Leading => {
            let ratio = (t_train / steps) as f64;
            (0..steps).rev().map(|i| i as f64 * ratio).collect()
        }
        Spacing::Trailing => (0..steps).map(|i| (n - i as f64 * n / s).round_ties_even() - 1.0).collect(),
        Spacing::Linspace => (0..steps)
            .rev()
            .map(|i| if steps == 1 { 0.0 } else { (i as f64 * (n - 1.0) / (s - 1.0)).round_ties_even() })
            .collect(),
    };
    Ok(ts)
}

/// The noise levels of `timesteps`, followed by the clean end [`NoiseLevel::CLEAN`].
pub fn levels(schedule: &Schedule, timesteps: &[f64]) -> Vec<NoiseLevel> {
    timesteps.iter().map(|&t| schedule.level(t)).chain([NoiseLevel::CLEAN]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::ScheduleSpec;

    fn linear() -> Schedule {
        Schedule::from_spec(&ScheduleSpec::Linear { num_train_timesteps: 1000, beta_start: 1e-4, beta_end: 0.02 })
    }

    #[test]
    fn spacings_match_their_definitions() {
        let s = linear();
        assert_eq!(timesteps(&s, Spacing::Leading, 4).unwrap(), vec![750.0, 500.0, 250.0, 0.0]);
        assert_eq!(timesteps(&s, Spacing::Trailing, 4).unwrap(), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(timesteps(&s, Spacing::Linspace, 4).unwrap(), vec![999.0, 666.0, 333.0, 0.0]);
        let all = timesteps(&s, Spacing::Trailing, 1000).unwrap();
        assert_eq!(all, (0..1000).rev().map(|t| t as f64).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_zero_and_too_many_steps() {
        let s = linear();
        assert!(timesteps(&s, Spacing::Leading, 0).is_err());
        assert!(timesteps(&s, Spacing::Leading, 1001).is_err());
    }

    #[test]
    fn continuous_times_run_from_one_to_t_min() {
        let s = Schedule::Vp { beta_min: 0.1, beta_max: 20.0 };
        let ts = timesteps(&s, Spacing::Trailing, 5).unwrap();
        assert_eq!(ts[0], 1.0);
        assert!((ts[4] - CONTINUOUS_T_MIN).abs() < 1e-15);
    }
}
