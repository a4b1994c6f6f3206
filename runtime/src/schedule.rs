//! Noise schedules: x_t = alpha(t) x0 + sigma(t) eps, discrete (alpha-bar tables) or continuous.

use crate::metadata::ScheduleSpec;

/// One point on the noise axis: the schedule's own time `t` and the signal and noise scales there.
///
/// For discrete schedules `t` is the training index (0..T-1); for VP/VE it is continuous in
/// (0, 1]. The clean end of a trajectory is [`NoiseLevel::CLEAN`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseLevel {
    pub t: f64,
    pub alpha: f64,
    pub sigma: f64,
}

impl NoiseLevel {
    /// alpha = 1, sigma = 0: the data itself.
    pub const CLEAN: NoiseLevel = NoiseLevel {
        t: -1.0,
        alpha: 1.0,
        sigma: 0.0,
    };

    /// alpha-bar = alpha² for variance-preserving schedules.
    pub fn alpha_bar(&self) -> f64 {
        self.alpha * self.alpha
    }

    /// log(alpha / sigma), half the log signal-to-noise ratio (DPM-Solver's lambda).
    pub fn lambda(&self) -> f64 {
        (self.alpha / self.sigma).ln()
    }

    /// A variance-preserving level from sigma/alpha: alpha = 1/sqrt(1 + sbar²).
    pub fn from_sbar(t: f64, sbar: f64) -> NoiseLevel {
        let alpha = 1.0 / (1.0 + sbar * sbar).sqrt();
        NoiseLevel {
            t,
            alpha,
            sigma: sbar * alpha,
        }
    }

    /// sigma / alpha: the noise level of x / alpha, k-diffusion's and EDM's sigma.
    pub fn sbar(&self) -> f64 {
        self.sigma / self.alpha
    }

    /// Whether this is the clean end (sigma = 0).
    pub fn is_clean(&self) -> bool {
        self.sigma == 0.0
    }
}

/// A noise schedule built from a model's [`ScheduleSpec`].
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A table of betas and cumulative products alpha-bar over T training steps.
    Discrete {
        betas: Vec<f64>,
        alphas_cumprod: Vec<f64>,
        /// log(sigma/alpha) per index, increasing: the table every time lookup searches.
        log_sbar: Vec<f64>,
    },
    /// Continuous VP SDE with beta(t) = beta_min + t (beta_max - beta_min).
    Vp { beta_min: f64, beta_max: f64 },
    /// Continuous VE SDE with sigma(t) = sigma_min (sigma_max / sigma_min)^t.
    Ve { sigma_min: f64, sigma_max: f64 },
}

fn log_sbar(alpha_bar: f64) -> f64 {
    0.5 * ((1.0 - alpha_bar) / alpha_bar).ln()
}

/// The betas of a discrete schedule, exactly as the exporter defines them.
pub fn discrete_betas(spec: &ScheduleSpec) -> Option<Vec<f64>> {
    let lin = |a: f64, b: f64, n: usize| -> Vec<f64> {
        if n == 1 {
            return vec![a];
        }
        (0..n)
            .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
            .collect()
    };
    Some(match *spec {
        ScheduleSpec::Linear {
            num_train_timesteps: n,
            beta_start,
            beta_end,
        } => lin(beta_start, beta_end, n),
        ScheduleSpec::Quadratic {
            num_train_timesteps: n,
            beta_start,
            beta_end,
        } => lin(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        ScheduleSpec::Sigmoid {
            num_train_timesteps: n,
            beta_start,
            beta_end,
        } => lin(-6.0, 6.0, n)
            .into_iter()
            .map(|x| beta_start + (beta_end - beta_start) / (1.0 + (-x).exp()))
            .collect(),
        ScheduleSpec::Cosine {
            num_train_timesteps: n,
            s,
            max_beta,
        } => {
            let f = |u: f64| {
                ((u + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(max_beta)
                })
                .collect()
        }
        ScheduleSpec::Vp { .. } | ScheduleSpec::Ve { .. } => return None,
    })
}

/// Smallest continuous time a VP/VE trajectory visits (Song et al. 2021 use 1e-3 and 1e-5): at
/// t = 0 sigma is 0 (VP) and the network was never trained there.
pub const CONTINUOUS_T_MIN: f64 = 1e-3;

/// Smallest alpha-bar at the end of a discrete table that a sampler can start from.
const MIN_ALPHA_BAR: f64 = 1e-300;

impl Schedule {
    /// Builds the schedule a model's metadata describes and checks that samplers can use it;
    /// the error says why not. The spec's fields are assumed to be in range (as
    /// `ModelMetadata::from_json` checks them).
    pub fn from_spec(spec: &ScheduleSpec) -> Result<Schedule, String> {
        let schedule = Schedule::from_spec_unchecked(spec);
        schedule.check_alpha_bar()?;
        Ok(schedule)
    }

    /// Builds the schedule without [`Schedule::from_spec`]'s checks: for printing a table that
    /// may run to alpha-bar = 0, where no sampler could start.
    pub fn from_spec_unchecked(spec: &ScheduleSpec) -> Schedule {
        match (discrete_betas(spec), spec) {
            (Some(betas), _) => {
                let alphas_cumprod: Vec<f64> = betas
                    .iter()
                    .scan(1.0, |acc, b| {
                        *acc *= 1.0 - b;
                        Some(*acc)
                    })
                    .collect();
                let log_sbar = alphas_cumprod.iter().map(|&ab| log_sbar(ab)).collect();
                Schedule::Discrete {
                    betas,
                    alphas_cumprod,
                    log_sbar,
                }
            }
            (None, ScheduleSpec::Vp { beta_min, beta_max }) => Schedule::Vp {
                beta_min: *beta_min,
                beta_max: *beta_max,
            },
            (
                None,
                ScheduleSpec::Ve {
                    sigma_min,
                    sigma_max,
                },
            ) => Schedule::Ve {
                sigma_min: *sigma_min,
                sigma_max: *sigma_max,
            },
            (None, _) => unreachable!("discrete_betas covers every discrete kind"),
        }
    }

    /// A discrete table whose alpha-bar underflows to 0 has infinite noise at its end: no
    /// sampler can start there (found by the fuzzer as a crash in the time lookup).
    fn check_alpha_bar(&self) -> Result<(), String> {
        let Schedule::Discrete { alphas_cumprod, .. } = self else {
            return Ok(());
        };
        let last = alphas_cumprod.last().copied().unwrap_or(f64::NAN);
        if last.is_nan() || last <= MIN_ALPHA_BAR {
            return Err(format!(
                "the schedule's alpha_bar reaches {last:e} (its betas are too large for {} steps)",
                alphas_cumprod.len()
            ));
        }
        Ok(())
    }

    /// The schedule time at which sigma/alpha equals `sbar` (the inverse of [`Schedule::level`]),
    /// clamped to the schedule's range. Discrete schedules give fractional indices.
    pub fn t_for_sbar(&self, sbar: f64) -> f64 {
        match self {
            Schedule::Discrete {
                log_sbar: table, ..
            } => {
                let ls = sbar.ln();
                if ls.is_nan() || ls <= table[0] {
                    return 0.0;
                }
                let hi = table.partition_point(|&v| v < ls);
                if hi == 0 {
                    return 0.0;
                }
                if hi >= table.len() {
                    return (table.len() - 1) as f64;
                }
                let (a, b) = (table[hi - 1], table[hi]);
                (hi - 1) as f64 + (ls - a) / (b - a)
            }
            Schedule::Vp { beta_min, beta_max } => {
                // log alpha = -(beta_max - beta_min) t²/4 - beta_min t/2 and alpha² = 1/(1 + sbar²).
                let c = 0.5 * (sbar * sbar).ln_1p();
                let a = 0.25 * (beta_max - beta_min);
                let b = 0.5 * beta_min;
                if a == 0.0 {
                    c / b
                } else {
                    (-b + (b * b + 4.0 * a * c).sqrt()) / (2.0 * a)
                }
            }
            Schedule::Ve {
                sigma_min,
                sigma_max,
            } => (sbar / sigma_min).ln() / (sigma_max / sigma_min).ln(),
        }
    }

    /// The noise level whose sigma/alpha is `sbar`, with alpha and sigma exact for that `sbar`
    /// (the time is what the network is told).
    pub fn level_for_sbar(&self, sbar: f64) -> NoiseLevel {
        let t = self.t_for_sbar(sbar);
        match self {
            Schedule::Ve { .. } => NoiseLevel {
                t,
                alpha: 1.0,
                sigma: sbar,
            },
            _ => NoiseLevel::from_sbar(t, sbar),
        }
    }

    /// The noisiest and the cleanest time a trajectory visits: T-1 and 0, or 1 and
    /// [`CONTINUOUS_T_MIN`].
    pub fn time_range(&self) -> (f64, f64) {
        match self.num_train_timesteps() {
            Some(n) => ((n - 1) as f64, 0.0),
            None => (1.0, CONTINUOUS_T_MIN),
        }
    }

    /// The largest and smallest sigma/alpha the schedule reaches, at the ends of
    /// [`Schedule::time_range`].
    pub fn sbar_range(&self) -> (f64, f64) {
        let (hi, lo) = self.time_range();
        (self.level(hi).sbar(), self.level(lo).sbar())
    }

    /// T for discrete schedules, None for continuous ones.
    pub fn num_train_timesteps(&self) -> Option<usize> {
        match self {
            Schedule::Discrete { betas, .. } => Some(betas.len()),
            _ => None,
        }
    }

    /// The noise level at time `t` (a training index for discrete schedules; fractional indices
    /// interpolate log alpha-bar linearly).
    pub fn level(&self, t: f64) -> NoiseLevel {
        match self {
            Schedule::Discrete {
                alphas_cumprod,
                log_sbar: table,
                ..
            } => {
                let last = (alphas_cumprod.len() - 1) as f64;
                let tc = t.clamp(0.0, last);
                let (i, frac) = (tc.floor() as usize, tc - tc.floor());
                if frac == 0.0 {
                    let ab = alphas_cumprod[i];
                    return NoiseLevel {
                        t,
                        alpha: ab.sqrt(),
                        sigma: (1.0 - ab).sqrt(),
                    };
                }
                // Between table entries interpolate log(sigma/alpha) linearly, as k-diffusion and
                // diffusers do, so that `t_for_sbar` is its exact inverse.
                let ls = (1.0 - frac) * table[i] + frac * table[i + 1];
                NoiseLevel::from_sbar(t, ls.exp())
            }
            Schedule::Vp { beta_min, beta_max } => {
                let log_alpha = -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min;
                NoiseLevel {
                    t,
                    alpha: log_alpha.exp(),
                    sigma: (-(2.0 * log_alpha).exp_m1()).sqrt(),
                }
            }
            Schedule::Ve {
                sigma_min,
                sigma_max,
            } => NoiseLevel {
                t,
                alpha: 1.0,
                sigma: sigma_min * (sigma_max / sigma_min).powf(t),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str) -> ScheduleSpec {
        let (a, b, n) = (1e-4, 0.02, 1000);
        match kind {
            "linear" => ScheduleSpec::Linear {
                num_train_timesteps: n,
                beta_start: a,
                beta_end: b,
            },
            "quadratic" => ScheduleSpec::Quadratic {
                num_train_timesteps: n,
                beta_start: a,
                beta_end: b,
            },
            "sigmoid" => ScheduleSpec::Sigmoid {
                num_train_timesteps: n,
                beta_start: a,
                beta_end: b,
            },
            _ => ScheduleSpec::Cosine {
                num_train_timesteps: n,
                s: 0.008,
                max_beta: 0.999,
            },
        }
    }

    #[test]
    fn linear_alpha_bar_matches_closed_form_product() {
        // alpha_bar_t = prod_{i<=t} (1 - beta_i) with beta_i = a + (b - a) i / (T - 1).
        let Schedule::Discrete { alphas_cumprod, .. } =
            Schedule::from_spec(&spec("linear")).unwrap()
        else {
            panic!()
        };
        for t in [0usize, 1, 499, 999] {
            let closed: f64 = (0..=t)
                .map(|i| 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0))
                .product();
            assert!((alphas_cumprod[t] - closed).abs() < 1e-12);
        }
        // Known figure: alpha_bar at T-1 for the DDPM schedule is about 4.04e-5.
        assert!(
            (alphas_cumprod[999] - 4.0358e-5).abs() < 1e-8,
            "{}",
            alphas_cumprod[999]
        );
    }

    #[test]
    fn refuses_a_table_whose_alpha_bar_underflows() {
        // Betas 0.055..0.61 over 1721 steps: alpha_bar ends far below 1e-300 (the fuzzer's case).
        let bad = ScheduleSpec::Linear {
            num_train_timesteps: 1721,
            beta_start: 0.055,
            beta_end: 0.61,
        };
        let err = Schedule::from_spec(&bad).unwrap_err();
        assert!(
            err.starts_with("the schedule's alpha_bar reaches 0e0"),
            "{err}"
        );
        assert!(err.ends_with("for 1721 steps)"), "{err}");
        assert_eq!(
            Schedule::from_spec_unchecked(&bad).num_train_timesteps(),
            Some(1721)
        );
    }

    #[test]
    fn cosine_alpha_bar_is_the_cosine_curve() {
        // Without the beta cap, alpha_bar_t = f(t+1)/f(0) with f(u) = cos²((u/T + s)/(1+s) π/2).
        let s = Schedule::from_spec(&spec("cosine")).unwrap();
        let f = |u: f64| {
            ((u / 1000.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        for t in [0usize, 100, 500, 900] {
            let want = f(t as f64 + 1.0) / f(0.0);
            assert!((s.level(t as f64).alpha_bar() - want).abs() < 1e-12);
        }
    }

    #[test]
    fn quadratic_and_sigmoid_end_points() {
        let q = discrete_betas(&spec("quadratic")).unwrap();
        assert!((q[0] - 1e-4).abs() < 1e-15 && (q[999] - 0.02).abs() < 1e-15);
        let sg = discrete_betas(&spec("sigmoid")).unwrap();
        let mid = 1e-4 + (0.02 - 1e-4) / (1.0 + (6.0f64 * 1.0 / 999.0).exp());
        assert!((sg[499] - mid).abs() < 1e-12, "{} vs {mid}", sg[499]);
        assert!((sg[0] + sg[999] - (1e-4 + 0.02)).abs() < 1e-12);
    }

    #[test]
    fn vp_matches_integral_of_beta_and_ve_is_geometric() {
        let vp = Schedule::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        };
        for t in [0.001, 0.3, 1.0] {
            let l = vp.level(t);
            // alpha(t) = exp(-1/2 ∫0^t beta(s) ds) and alpha² + sigma² = 1.
            let integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t * t;
            assert!((l.alpha - (-0.5 * integral).exp()).abs() < 1e-14);
            assert!((l.alpha.powi(2) + l.sigma.powi(2) - 1.0).abs() < 1e-14);
        }
        let ve = Schedule::Ve {
            sigma_min: 0.01,
            sigma_max: 50.0,
        };
        assert!((ve.level(0.5).sigma - (0.01f64 * 50.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn fractional_index_interpolates_log_sbar_and_inverts() {
        let s = Schedule::from_spec(&spec("linear")).unwrap();
        let (a, b, m) = (s.level(10.0), s.level(11.0), s.level(10.5));
        assert!((m.sbar() - (a.sbar() * b.sbar()).sqrt()).abs() < 1e-14);
        assert!((m.alpha.powi(2) + m.sigma.powi(2) - 1.0).abs() < 1e-14);
        for t in [0.0, 3.25, 10.5, 500.0, 998.75] {
            assert!((s.t_for_sbar(s.level(t).sbar()) - t).abs() < 1e-9, "{t}");
        }
        for sched in [
            Schedule::Vp {
                beta_min: 0.1,
                beta_max: 20.0,
            },
            Schedule::Ve {
                sigma_min: 0.01,
                sigma_max: 50.0,
            },
        ] {
            for t in [0.001, 0.2, 0.7, 1.0] {
                assert!(
                    (sched.t_for_sbar(sched.level(t).sbar()) - t).abs() < 1e-12,
                    "{sched:?} {t}"
                );
            }
        }
    }
}
