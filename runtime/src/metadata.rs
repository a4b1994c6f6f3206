//! The model contract's metadata: the `edgediff` JSON record in an ONNX file's metadata_props.
//! Plain data: parsing and checks of each field alone, nothing computed from them.

use serde::{Deserialize, Serialize};

/// The metadata key holding the JSON record.
pub const METADATA_KEY: &str = "edgediff";
/// The newest metadata format this runtime reads.
pub const FORMAT_VERSION: u32 = 1;

const REQUIRED: [&str; 6] = [
    "format_version",
    "prediction",
    "time_input",
    "schedule",
    "sample_shape",
    "data_range",
];

/// What the network's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The noise eps in x_t = alpha x0 + sigma eps.
    Epsilon,
    /// v = alpha eps - sigma x0 (Salimans & Ho 2022).
    V,
    /// The clean sample x0.
    Sample,
    /// The score grad log p_t(x) = -eps / sigma.
    Score,
}

/// What the network's `timestep` input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeInput {
    /// The discrete training index 0..T-1 (fractional values allowed for float inputs).
    Index,
    /// Continuous time in [0, 1].
    Continuous,
    /// The noise level sigma(t) itself.
    Sigma,
}

/// The noise schedule the model was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ScheduleSpec {
    /// Betas evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020).
    Linear {
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    },
    /// Square roots of the betas evenly spaced (DDPM code's "quad", diffusers' "scaled_linear").
    Quadratic {
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    },
    /// Betas along a logistic curve over [-6, 6] (DDPM code's "sigmoid").
    Sigmoid {
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    },
    /// Nichol & Dhariwal's cosine alpha-bar schedule with offset `s`, betas capped at `max_beta`.
    Cosine {
        num_train_timesteps: usize,
        #[serde(default = "default_s")]
        s: f64,
        #[serde(default = "default_max_beta")]
        max_beta: f64,
    },
    /// Continuous variance-preserving SDE with linear beta(t) (Song et al. 2021).
    Vp { beta_min: f64, beta_max: f64 },
    /// Continuous variance-exploding SDE, sigma(t) = sigma_min (sigma_max/sigma_min)^t.
    Ve { sigma_min: f64, sigma_max: f64 },
}

fn default_s() -> f64 {
    0.008
}
fn default_max_beta() -> f64 {
    0.999
}

/// Conditioning the network accepts besides `sample` and `timestep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Conditioning {
    /// Integer class labels; `null_label` is the "no class" label for classifier-free guidance.
    Class { num_classes: usize, null_label: i64 },
    /// Embedding sequences `[N, L, D]`.
    Embedding { dim: usize },
    /// A text prompt: a pipeline folder's text encoder turns `max_length` token ids into
    /// `[max_length, hidden_size]` hidden states, the U-Net's `encoder_hidden_states`.
    Text {
        max_length: usize,
        hidden_size: usize,
    },
}

/// The sampler and steps a model runs with when the caller names none, e.g. a distilled
/// model's `"sampling": {"sampler": "lcm", "steps": 4}`; the sampler's own options keep their
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    /// A sampler of `edgediff samplers`.
    pub sampler: String,
    /// Steps, at least 1.
    pub steps: usize,
    /// A spacing name (`edgediff sample --spacing`), e.g. "lcm" for a model imported from a
    /// diffusers LCMScheduler folder; None: the library's default. A pipeline folder's comes
    /// from its scheduler instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spacing: Option<String>,
    /// Schedule times (most noisy first) by step count, e.g. `{"1": [749], "2": [749, 374]}`:
    /// a distilled student is accurate only at the times of its training grid, so a run of
    /// one of these step counts with no spacing or timesteps given takes these (any sampler).
    /// None: the spacing's times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timesteps: Option<std::collections::BTreeMap<String, Vec<f64>>>,
}

/// The parsed metadata record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub format_version: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub prediction: Prediction,
    pub time_input: TimeInput,
    pub schedule: ScheduleSpec,
    /// `[C, H, W]` of one sample.
    pub sample_shape: [usize; 3],
    /// The range of clean data, e.g. `[-1, 1]`.
    pub data_range: [f64; 2],
    #[serde(default)]
    pub conditioning: Option<Conditioning>,
    /// The sampler and steps to use when none is asked for (None: the library's, ddim and 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingDefaults>,
    /// Free-form extras (the exporter stores the network config here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

impl ModelMetadata {
    /// Parses the JSON record and checks each field on its own; the error string names the
    /// first problem found. Whether the schedule they describe is usable (its alpha-bar may
    /// underflow) is checked where the schedule is built, by `Schedule::from_spec`: metadata
    /// stays plain data that knows no schedule arithmetic.
    ///
    /// ```
    /// let m = edgediff::metadata::ModelMetadata::from_json(r#"{"format_version":1,
    ///   "prediction":"epsilon","time_input":"index","sample_shape":[1,28,28],
    ///   "data_range":[-1,1],"schedule":{"kind":"linear","num_train_timesteps":1000,
    ///   "beta_start":0.0001,"beta_end":0.02}}"#).unwrap();
    /// assert_eq!(m.sample_shape, [1, 28, 28]);
    /// ```
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
        let obj = value.as_object().ok_or("the record is not a JSON object")?;
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|k| !obj.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing fields: {}", missing.join(", ")));
        }
        let meta: ModelMetadata =
            serde_json::from_value(value).map_err(|e| format!("malformed field: {e}"))?;
        meta.validate()?;
        Ok(meta)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this runtime reads 1..={FORMAT_VERSION}); upgrade edgediff",
                self.format_version
            ));
        }
        if self.sample_shape.iter().any(|&d| d == 0 || d > 1 << 16) {
            return Err(format!(
                "sample_shape {:?} has a zero or absurd dimension",
                self.sample_shape
            ));
        }
        let [lo, hi] = self.data_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(format!(
                "data_range [{lo}, {hi}] must be finite with min < max"
            ));
        }
        self.schedule.validate()?;
        if let Some(c) = &self.conditioning {
            c.validate()?;
        }
        if let Some(s) = &self.sampling {
            s.validate()?;
        }
        self.check_time_input()
    }

    /// The time input must be one the schedule has: indices only on discrete schedules, sigma
    /// only on VE.
    fn check_time_input(&self) -> Result<(), String> {
        let discrete = self.schedule.is_discrete();
        if discrete && self.time_input == TimeInput::Sigma {
            return Err("time_input 'sigma' needs a ve schedule".into());
        }
        if !discrete && self.time_input == TimeInput::Index {
            return Err(
                "time_input 'index' needs a discrete schedule (linear, cosine, quadratic, sigmoid)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Elements in one sample, C * H * W.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }
}

impl ScheduleSpec {
    /// Whether this is a table of T training steps (linear, quadratic, sigmoid, cosine) rather
    /// than a continuous SDE (vp, ve).
    pub fn is_discrete(&self) -> bool {
        !matches!(self, ScheduleSpec::Vp { .. } | ScheduleSpec::Ve { .. })
    }

    /// Checks each parameter's range.
    fn validate(&self) -> Result<(), String> {
        match self {
            ScheduleSpec::Linear {
                num_train_timesteps: t,
                beta_start: a,
                beta_end: b,
            }
            | ScheduleSpec::Quadratic {
                num_train_timesteps: t,
                beta_start: a,
                beta_end: b,
            }
            | ScheduleSpec::Sigmoid {
                num_train_timesteps: t,
                beta_start: a,
                beta_end: b,
            } => {
                check_steps(*t)?;
                if !(*a > 0.0 && a <= b && *b < 1.0) {
                    return Err(format!(
                        "betas must satisfy 0 < beta_start <= beta_end < 1, got {a}..{b}"
                    ));
                }
            }
            ScheduleSpec::Cosine {
                num_train_timesteps: t,
                s,
                max_beta,
            } => {
                check_steps(*t)?;
                if !(*s >= 0.0 && *max_beta > 0.0 && *max_beta < 1.0) {
                    return Err(format!(
                        "cosine needs s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}"
                    ));
                }
            }
            ScheduleSpec::Vp { beta_min, beta_max } => {
                if !(*beta_min >= 0.0 && beta_max > beta_min) {
                    return Err(format!(
                        "vp needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}"
                    ));
                }
            }
            ScheduleSpec::Ve {
                sigma_min,
                sigma_max,
            } => {
                if !(*sigma_min > 0.0 && sigma_max > sigma_min) {
                    return Err(format!(
                        "ve needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl SamplingDefaults {
    /// A sampler this runtime has and 1..=[`crate::spacing::MAX_STEPS`] steps.
    fn validate(&self) -> Result<(), String> {
        let names: Vec<&str> = crate::sampler::REGISTRY.iter().map(|d| d.name()).collect();
        if !names.contains(&self.sampler.as_str()) {
            return Err(format!(
                "sampling.sampler {:?} is not a sampler of this runtime (expected one of: {}); upgrade edgediff or fix the metadata",
                self.sampler,
                names.join(", ")
            ));
        }
        if let Some(spacing) = &self.spacing {
            spacing
                .parse::<crate::spacing::Spacing>()
                .map_err(|e| format!("sampling.spacing: {e}"))?;
        }
        if !(1..=crate::spacing::MAX_STEPS).contains(&self.steps) {
            return Err(format!(
                "sampling.steps {} is outside 1..={}",
                self.steps,
                crate::spacing::MAX_STEPS
            ));
        }
        for (k, times) in self.timesteps.iter().flatten() {
            let fits = k.parse::<usize>().is_ok_and(|n| n == times.len());
            let decreasing = times.windows(2).all(|w| w[0] > w[1]);
            if !fits || !decreasing || times.iter().any(|t| !t.is_finite() || *t < 0.0) {
                return Err(format!(
                    "sampling.timesteps[{k:?}] = {times:?}: each entry must be a step count and that many finite, non-negative, strictly decreasing times"
                ));
            }
        }
        Ok(())
    }

    /// The recorded times for a run of `steps` steps, if the record has them.
    pub fn timesteps_for(&self, steps: usize) -> Option<Vec<f64>> {
        self.timesteps.as_ref()?.get(&steps.to_string()).cloned()
    }
}

impl Conditioning {
    fn validate(&self) -> Result<(), String> {
        match self {
            Conditioning::Class {
                num_classes,
                null_label,
            } if *num_classes == 0 || *null_label < 0 => {
                Err("conditioning.class needs num_classes > 0 and null_label >= 0".into())
            }
            _ => Ok(()),
        }
    }
}

fn check_steps(t: usize) -> Result<(), String> {
    if (2..=100_000).contains(&t) {
        Ok(())
    } else {
        Err(format!("num_train_timesteps {t} is outside 2..=100000"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"format_version":1,"prediction":"epsilon","time_input":"index",
        "sample_shape":[1,8,8],"data_range":[-1,1],"conditioning":null,
        "schedule":{"kind":"cosine","num_train_timesteps":1000}}"#;

    #[test]
    fn parses_and_fills_defaults() {
        let m = ModelMetadata::from_json(GOOD).unwrap();
        assert_eq!(
            m.schedule,
            ScheduleSpec::Cosine {
                num_train_timesteps: 1000,
                s: 0.008,
                max_beta: 0.999
            }
        );
    }

    #[test]
    fn sampling_defaults_name_a_sampler_and_steps() {
        let with = GOOD.replace(
            r#""conditioning":null"#,
            r#""conditioning":null,"sampling":{"sampler":"lcm","steps":4}"#,
        );
        let m = ModelMetadata::from_json(&with).unwrap();
        let want = SamplingDefaults {
            sampler: "lcm".into(),
            steps: 4,
            spacing: None,
            timesteps: None,
        };
        assert_eq!(m.sampling, Some(want));
        assert_eq!(ModelMetadata::from_json(GOOD).unwrap().sampling, None);
    }

    #[test]
    fn sampling_timesteps_are_checked_and_found_by_step_count() {
        let with = |t: &str| {
            GOOD.replace(
                r#""conditioning":null"#,
                &format!(
                    r#""conditioning":null,"sampling":{{"sampler":"lcm","steps":2,"timesteps":{t}}}"#
                ),
            )
        };
        let m = ModelMetadata::from_json(&with(r#"{"1":[749],"2":[749,374]}"#)).unwrap();
        let s = m.sampling.unwrap();
        assert_eq!(s.timesteps_for(2), Some(vec![749.0, 374.0]));
        assert_eq!(s.timesteps_for(4), None);
        for bad in [
            r#"{"2":[749]}"#,
            r#"{"2":[374,749]}"#,
            r#"{"x":[1]}"#,
            r#"{"1":[-1]}"#,
        ] {
            let err = ModelMetadata::from_json(&with(bad)).unwrap_err();
            assert!(err.contains("sampling.timesteps"), "{bad}: {err}");
        }
    }

    #[test]
    fn names_missing_fields() {
        let err =
            ModelMetadata::from_json(r#"{"format_version":1,"prediction":"epsilon"}"#).unwrap_err();
        assert_eq!(
            err,
            "missing fields: time_input, schedule, sample_shape, data_range"
        );
    }

    #[test]
    fn rejects_bad_values() {
        for (from, to) in [
            (r#""prediction":"epsilon""#, r#""prediction":"noise""#),
            (r#""format_version":1"#, r#""format_version":9"#),
            (r#""sample_shape":[1,8,8]"#, r#""sample_shape":[0,8,8]"#),
            (r#""data_range":[-1,1]"#, r#""data_range":[1,-1]"#),
            (
                r#""num_train_timesteps":1000"#,
                r#""num_train_timesteps":1"#,
            ),
            (r#""time_input":"index""#, r#""time_input":"sigma""#),
            (
                r#""conditioning":null"#,
                r#""conditioning":null,"sampling":{"sampler":"magic","steps":4}"#,
            ),
            (
                r#""conditioning":null"#,
                r#""conditioning":null,"sampling":{"sampler":"lcm","steps":0}"#,
            ),
            (
                r#""conditioning":null"#,
                r#""conditioning":null,"sampling":{"sampler":"lcm","steps":4,"spacing":"odd"}"#,
            ),
        ] {
            let bad = GOOD.replace(from, to);
            assert_ne!(bad, GOOD);
            assert!(ModelMetadata::from_json(&bad).is_err(), "accepted {bad}");
        }
        assert!(ModelMetadata::from_json("not json")
            .unwrap_err()
            .starts_with("not valid JSON"));
    }
}
