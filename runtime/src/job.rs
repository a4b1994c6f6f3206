//! The identity of a sampling job, recorded beside its output so that `resume` continues only
//! the same job: the model's fingerprint and every option that changes a sample (not the batch
//! size: sample i is the same whatever the batching).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::generate::SampleOptions;
use crate::model::Model;
use crate::noise::InjectedNoise;

/// Version of the record's layout; a record of another version is not comparable.
const RECORD_VERSION: u64 = 1;

/// FNV-1a, 64 bits: a fingerprint that is the same on every platform and release (std's
/// hasher promises neither), fast enough for the bytes it sees here.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// The hash so far, as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A model file's fingerprint: its length, first and last MiB. Hashing all of a multi-GB
/// graph would cost seconds per run; retrained or other weights differ in those ends.
pub(crate) fn model_fingerprint(bytes: &[u8]) -> String {
    const END: usize = 1 << 20;
    let mut h = Fnv::default();
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(&bytes[..bytes.len().min(END)]);
    h.update(&bytes[bytes.len().saturating_sub(END)..]);
    h.hex()
}

fn array_fingerprint<'a>(values: impl IntoIterator<Item = &'a f32>) -> String {
    let mut h = Fnv::default();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.hex()
}

/// What makes the samples of a run what they are, as one JSON object whose keys are the
/// options' library names (so a mismatch names the option).
pub(crate) fn job_record(
    model: &Model,
    opts: &SampleOptions,
    injected: Option<&InjectedNoise>,
) -> Map<String, Value> {
    let meta = model.metadata();
    let (init, steps) = match injected {
        Some(inj) => (
            Some(array_fingerprint(inj.initial.iter())),
            inj.steps.as_ref().map(|s| array_fingerprint(s.iter())),
        ),
        None => (None, None),
    };
    let v = json!({
        "edgediff_job": RECORD_VERSION,
        "model": format!("{} ({})", model.fingerprint(), meta.name),
        "sample_shape": meta.sample_shape,
        "n": opts.n,
        "sampler": opts.sampler.name(),
        "sampler_options": format!("{:?}", opts.sampler.settings()),
        "steps": opts.timesteps.as_ref().map_or(Value::from(opts.steps), |_| Value::Null),
        "spacing": opts.timesteps.as_ref().map_or(Value::from(format!("{:?}", opts.spacing)), |_| Value::Null),
        "timesteps": opts.timesteps,
        "seed": if injected.is_some() { Value::Null } else { Value::from(opts.seed) },
        "class_label": opts.class_label,
        "x0_clip": format!("{:?}", opts.x0_clip),
        "guidance": opts.guidance,
        "init_noise": init,
        "step_noise": steps,
    });
    let Value::Object(mut m) = v else {
        unreachable!("json! of an object literal")
    };
    // Recorded only when set away from their defaults: a record written before they existed
    // describes a run with the defaults, and stays resumable.
    if let Some(p) = &opts.prompt {
        m.insert("prompt".into(), json!(p));
    }
    if let Some(p) = &opts.negative_prompt {
        m.insert("negative_prompt".into(), json!(p));
    }
    if let Some(p) = &opts.prompts {
        m.insert("prompts".into(), json!(p));
    }
    if let Some(img) = &opts.init_image {
        // The image by fingerprint (as injected noise), and the strength only with one: it
        // changes nothing without an image.
        m.insert("init_image".into(), json!(array_fingerprint(img.iter())));
        m.insert("strength".into(), json!(opts.strength));
    }
    if opts.first_index != 0 {
        // Another range of the same job is another output: resuming it into this one would
        // mix samples of two ranges.
        m.insert("first_index".into(), json!(opts.first_index));
    }
    if opts.steps_offset != 0 {
        m.insert("steps_offset".into(), json!(opts.steps_offset));
    }
    if !opts.set_alpha_to_one {
        m.insert("set_alpha_to_one".into(), json!(false));
    }
    if let Some(t) = opts.vae_tile_size {
        // Tiled decoding changes the images a little (not below one tile: recorded anyway).
        m.insert("vae_tile_size".into(), json!(t));
    }
    if let Ok(shapes) = opts.shapes(model) {
        // Another image size than the model's (given, or an img2img image's): recorded only
        // then, so a record from before it existed stays resumable.
        if shapes.output != model.output_shape() {
            m.insert(
                "image_size".into(),
                json!([shapes.output[1], shapes.output[2]]),
            );
        }
    }
    if let Some(c) = &opts.coefficients {
        m.insert("coefficients".into(), json!(c));
    }
    if let Some(streams) = &opts.streams {
        // By fingerprint: a list as long as n.
        let mut h = Fnv::default();
        for (seed, i) in streams {
            h.update(&seed.to_le_bytes()).update(&i.to_le_bytes());
        }
        m.insert("streams".into(), json!(h.hex()));
    }
    if opts.leading_as_diffusers {
        // It moves a multistep solver's leading steps: a record from before it (another
        // layout) must not be resumed as this run.
        m.insert("leading_as_diffusers".into(), json!(true));
    }
    m
}

/// Where the record of the output at `path` (a file or a folder) lives: `NAME.job.json`
/// beside it (a folder holds only its samples). It stays after the run, saying how the output
/// was made.
pub(crate) fn record_path(path: &Path) -> Result<std::path::PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    Ok(crate::files::parent_dir(path).join(format!("{}.job.json", name.to_string_lossy())))
}

/// Checks that the record at `at` describes `want` (the output at `out`): the first option
/// that differs is named, as is a missing or unreadable record (then nothing proves what the
/// output holds).
pub(crate) fn check_record(at: &Path, out: &Path, want: &Map<String, Value>) -> Result<()> {
    let text = match std::fs::read_to_string(at) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::options(
                format!(
                    "{{0}}: {} has no job record ({}), so nothing shows which run made it; remove it, or run without {{0}}",
                    out.display(),
                    at.display()
                ),
                &["resume"],
            ))
        }
        Err(e) => return Err(Error::io(format!("reading {}", at.display()))(e)),
    };
    let have: Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::BadInput {
        path: at.into(),
        detail: format!("not a job record ({e}); remove it with {}", out.display()),
    })?;
    if have.get("edgediff_job") != want.get("edgediff_job") {
        return Err(Error::BadInput {
            path: at.into(),
            detail: "a job record of another edgediff version; remove it and the output".into(),
        });
    }
    // The record's options this run lacks too: options recorded only when set (a prompt, a
    // tile size) must not be dropped by a resume either. (Other keys, such as the output's
    // `complete`, are not options.)
    let theirs = have
        .keys()
        .filter(|k| !want.contains_key(*k) && KEYS.contains(&k.as_str()));
    for key in want.keys().chain(theirs) {
        let value = want.get(key).unwrap_or(&Value::Null);
        let old = have.get(key).unwrap_or(&Value::Null);
        if old != value {
            // The error names options by `&'static str`: take the key's from the fixed list.
            let arg: &'static str = KEYS.iter().find(|k| *k == key).copied().unwrap_or("resume");
            return Err(Error::options(
                format!(
                    "{{0}}: {} was made with {{1}} {}, this run has {}; give the same options to continue it, or remove it",
                    out.display(),
                    show(key, old),
                    show(key, value)
                ),
                &["resume", arg],
            ));
        }
    }
    Ok(())
}

/// Every key of [`job_record`], as option names.
const KEYS: &[&str] = &[
    "edgediff_job",
    "model",
    "sample_shape",
    "n",
    "first_index",
    "sampler",
    "sampler_options",
    "steps",
    "spacing",
    "timesteps",
    "seed",
    "class_label",
    "x0_clip",
    "prompt",
    "negative_prompt",
    "prompts",
    "init_image",
    "strength",
    "steps_offset",
    "set_alpha_to_one",
    "leading_as_diffusers",
    "vae_tile_size",
    "image_size",
    "coefficients",
    "streams",
    "guidance",
    "init_noise",
    "step_noise",
];

/// An entry's value as a message shows it; an absent first index is 0 (recorded only when not).
fn show(key: &str, v: &Value) -> String {
    match v {
        Value::Null if key == "first_index" => "0".into(),
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Writes the record of a job starting at `out`.
pub(crate) fn write_record(at: &Path, record: &Map<String, Value>) -> Result<()> {
    let text = serde_json::to_string_pretty(record).expect("a JSON map serialises");
    crate::npy::write_atomic(at, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_published_vectors() {
        // FNV-1a 64 test vectors (Fowler, Noll, Vo): "" and "a".
        assert_eq!(Fnv::default().hex(), "cbf29ce484222325");
        assert_eq!(Fnv::default().update(b"a").hex(), "af63dc4c8601ec8c");
        assert_eq!(Fnv::default().update(b"foobar").hex(), "85944171f73967e8");
    }

    #[test]
    fn a_differing_option_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("x.npy.job.json");
        let mut rec = Map::new();
        rec.insert("edgediff_job".into(), json!(RECORD_VERSION));
        rec.insert("seed".into(), json!(1));
        write_record(&at, &rec).unwrap();
        check_record(&at, Path::new("x.npy"), &rec).unwrap();
        rec.insert("seed".into(), json!(2));
        let e = check_record(&at, Path::new("x.npy"), &rec).unwrap_err();
        assert_eq!(e.argument().unwrap().args, vec!["resume", "seed"]);
        assert!(
            e.to_string()
                .contains("was made with seed 1, this run has 2"),
            "{e}"
        );

        // A resume that drops an option recorded only when set is refused too.
        rec.insert("seed".into(), json!(1));
        rec.insert("prompt".into(), json!("a cat"));
        write_record(&at, &rec).unwrap();
        rec.remove("prompt");
        let e = check_record(&at, Path::new("x.npy"), &rec).unwrap_err();
        assert_eq!(e.argument().unwrap().args, vec!["resume", "prompt"]);
        assert!(
            e.to_string()
                .contains("was made with prompt a cat, this run has none"),
            "{e}"
        );
        let missing = check_record(&dir.path().join("none"), Path::new("x.npy"), &rec);
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("has no job record"));
    }
}
