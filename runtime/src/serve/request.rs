//! The server's one request schema (JSON, for both front doors) and how it maps onto the
//! library's [`SampleOptions`]. Every field is optional; an unknown field is refused, naming
//! it, so a misspelt option never silently takes its default.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::generate::SampleOptions;
use crate::model::Model;
use crate::sampler::{SamplerKind, SamplerParams};
use crate::spacing::Spacing;

/// Most samples one request may ask for: its samples are held in memory until it is
/// answered (larger jobs are for `edgediff sample`, which streams them to a file).
pub const MAX_REQUEST_SAMPLES: usize = 1024;
/// Largest `batch_size` a request may give.
pub const MAX_REQUEST_BATCH: usize = 256;
/// Most bytes of float samples one request may hold (`n` times the image's C*H*W*4).
pub const MAX_REQUEST_BYTES: usize = 256 << 20;

/// One sampling request. Defaults are the library's ([`SampleOptions::for_model`], as
/// `edgediff sample` takes them) except `n`, which is 1 here.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The client's name for the request, carried by every event about it and used to cancel
    /// it; unique among the requests queued or running. Default: `req-K`, K counting from 1.
    pub id: Option<String>,
    /// An ONNX model file or pipeline folder, loaded on first use and kept. Default: the
    /// shipped MNIST model, or with a `prompt` the shipped text-to-image model
    /// ([`crate::default_text_model`]).
    pub model: Option<PathBuf>,
    /// Text prompt (text-to-image models). Default: none.
    pub prompt: Option<String>,
    /// Prompt guidance steers away from. Default: none (the empty prompt).
    pub negative_prompt: Option<String>,
    /// Class label of a class-conditional model (`SampleOptions::class_label`). Default: none.
    pub class: Option<i64>,
    /// Sampler name (`edgediff samplers` lists them). Default: the model's, else ddim.
    pub sampler: Option<String>,
    /// Stochasticity of ddim and euler-a. Default: the sampler's.
    pub eta: Option<f64>,
    /// Stochasticity of tcd. Default: 0.3.
    pub gamma: Option<f64>,
    /// Solver order of lms, dpm++ and unipc. Default: the sampler's.
    pub order: Option<usize>,
    /// Sampling steps. Default: the model's, else 100.
    pub steps: Option<usize>,
    /// Time-step spacing (leading, trailing, linspace, karras, logsnr, lcm). Default: the
    /// model's or pipeline's, else trailing.
    pub spacing: Option<String>,
    /// Classifier-free guidance scale. Default: the model's (7.5 for a Stable Diffusion
    /// pipeline), none for a pixel model.
    pub guidance: Option<f64>,
    /// Seed of the samples' random streams. Default: 0.
    pub seed: Option<u64>,
    /// Number of samples, 1..=[`MAX_REQUEST_SAMPLES`]. Default: 1.
    pub n: Option<usize>,
    /// Index of the first sample in the seed's stream: the request makes samples
    /// `first_index .. first_index + n` of the run `edgediff sample --seed` makes. Default: 0.
    pub first_index: Option<usize>,
    /// Samples per network call, 1..=[`MAX_REQUEST_BATCH`]; queued requests that share every
    /// other setting are sampled together up to this many. Default: 64.
    pub batch_size: Option<usize>,
    /// `[height, width]` of a text-to-image pipeline's images (a pixel model takes only its
    /// own size). Default: the model's.
    pub image_size: Option<[usize; 2]>,
    /// Where the samples go, on the server's file system: a `.npy`, a `.png` grid or a folder
    /// of PNGs, as `edgediff sample --out` writes them. Default: none, the result carries one
    /// base64 PNG per sample.
    pub output: Option<PathBuf>,
}

/// Which model a request runs on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelKey {
    /// The MNIST model embedded at build time.
    Default,
    /// A model file or pipeline folder.
    Path(PathBuf),
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelKey::Default => f.write_str("default"),
            ModelKey::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ModelKey {
    /// The key of `path` (canonical when it exists, so two spellings share one model).
    pub fn of(path: &std::path::Path) -> ModelKey {
        ModelKey::Path(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }
}

impl Request {
    /// Samples asked for.
    pub fn samples(&self) -> usize {
        self.n.unwrap_or(1)
    }

    /// The model this request runs on: its own, else the text model with a prompt, else the
    /// MNIST model (as `edgediff sample` chooses).
    pub fn model_key(&self) -> Result<ModelKey> {
        match (&self.model, &self.prompt) {
            (Some(p), _) => Ok(ModelKey::of(p)),
            (None, Some(_)) => Ok(ModelKey::of(&crate::default_text_model()?)),
            (None, None) => Ok(ModelKey::Default),
        }
    }

    /// Refuses sizes beyond the server's bounds before anything is queued.
    pub fn check_bounds(&self) -> Result<()> {
        let n = self.samples();
        if n == 0 || n > MAX_REQUEST_SAMPLES {
            return Err(Error::out_of_range(
                "n",
                n,
                &format!("must be in 1..={MAX_REQUEST_SAMPLES} for one server request (more: `edgediff sample`, which writes them as it goes)"),
            ));
        }
        if let Some(b) = self.batch_size.filter(|&b| b == 0 || b > MAX_REQUEST_BATCH) {
            return Err(Error::out_of_range(
                "batch_size",
                b,
                &format!("must be in 1..={MAX_REQUEST_BATCH}"),
            ));
        }
        if self.first_index.unwrap_or(0).checked_add(n).is_none() {
            return Err(Error::out_of_range(
                "first_index",
                self.first_index.unwrap_or(0),
                "plus n overflows",
            ));
        }
        Ok(())
    }

    /// The library request for `model`, as `edgediff sample` builds it from the same settings,
    /// with each sample's stream `(seed, first_index + i)`.
    pub fn options(&self, model: &Model) -> Result<SampleOptions> {
        let params = SamplerParams {
            eta: self.eta,
            gamma: self.gamma,
            order: self.order,
            ..Default::default()
        };
        let sampler = self
            .sampler
            .as_deref()
            .map(|name| SamplerKind::new(name, params))
            .transpose()?;
        let spacing = self
            .spacing
            .as_deref()
            .map(str::parse::<Spacing>)
            .transpose()?;
        let defaults = SampleOptions::for_choice(model, sampler, params, spacing)?;
        let n = self.samples();
        let [c, h, w] = model.output_shape();
        let bytes = n.saturating_mul(4 * c * h * w);
        if bytes > MAX_REQUEST_BYTES {
            return Err(Error::out_of_range(
                "n",
                n,
                &format!(
                    "needs {} MiB of samples in memory; at most {} MiB per server request",
                    bytes >> 20,
                    MAX_REQUEST_BYTES >> 20
                ),
            ));
        }
        // OpenAI clients always send a size: the model's own is no request for another (and
        // a pixel model refuses any).
        let image_size = self.image_size.filter(|&size| size != [h, w]);
        let (seed, first) = (
            self.seed.unwrap_or(defaults.seed),
            self.first_index.unwrap_or(0),
        );
        let opts = SampleOptions {
            steps: self.steps.unwrap_or(defaults.steps),
            n,
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            seed,
            class_label: self.class,
            guidance: self.guidance,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            image_size,
            streams: Some((first..first + n).map(|i| (seed, i as u64)).collect()),
            ..defaults
        };
        Ok(opts.with_model_grid(model, spacing.is_some()))
    }
}

/// The OpenAI images API's `POST /v1/images/generations` body. `quality`, `style` and `user`
/// are taken and ignored (OpenAI's clients send them); anything else is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiRequest {
    /// A model file or pipeline folder. Default: the shipped text-to-image model.
    pub model: Option<PathBuf>,
    /// The prompt (required).
    pub prompt: String,
    /// Number of images. Default: 1.
    pub n: Option<usize>,
    /// `WIDTHxHEIGHT`. Default: the model's.
    pub size: Option<String>,
    /// `b64_json` (default) or `url`: a `file://` URL of a PNG the server wrote into its
    /// `--out-dir`.
    pub response_format: Option<String>,
    /// edgediff's own: the seed. Default: 0.
    pub seed: Option<u64>,
    pub quality: Option<serde_json::Value>,
    pub style: Option<serde_json::Value>,
    pub user: Option<serde_json::Value>,
}

impl OpenAiRequest {
    /// The native request, writing into `out_dir/ID/` for `url` answers.
    pub fn native(&self, id: String, out_dir: Option<&std::path::Path>) -> Result<Request> {
        let image_size = match self.size.as_deref() {
            None => None,
            Some(s) => {
                let parsed = s
                    .split_once('x')
                    .and_then(|(w, h)| Some([h.parse().ok()?, w.parse().ok()?]));
                Some(parsed.ok_or_else(|| {
                    Error::options(
                        format!("{{0}} '{s}' is not WIDTHxHEIGHT (e.g. 512x512)"),
                        &["size"],
                    )
                })?)
            }
        };
        let output = match self.response_format.as_deref() {
            None | Some("b64_json") => None,
            Some("url") => match out_dir {
                Some(dir) => Some(dir.join(&id)),
                None => {
                    return Err(Error::options(
                        "{0} url needs a folder to write the images into: start the server with --out-dir DIR",
                        &["response_format"],
                    ))
                }
            },
            Some(other) => return Err(Error::unknown("response_format", other, &["b64_json", "url"])),
        };
        Ok(Request {
            id: Some(id),
            model: self.model.clone(),
            prompt: Some(self.prompt.clone()),
            n: self.n,
            seed: self.seed,
            image_size,
            output,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_is_named() {
        let e = serde_json::from_str::<Request>(r#"{"n": 2, "stpes": 4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `stpes`"), "{e}");
        let r: Request = serde_json::from_str(r#"{"n": 2, "steps": 4, "id": "a"}"#).unwrap();
        assert_eq!(
            (r.samples(), r.steps, r.id.as_deref()),
            (2, Some(4), Some("a"))
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_its_field() {
        let value = serde_json::json!({"n": 2, "steps": "ten"});
        let f = super::super::Failure::decode::<Request>(value).unwrap_err();
        assert_eq!((f.code, f.field.as_deref()), ("bad_request", Some("steps")));
        assert!(
            f.message.contains("steps: invalid type: string"),
            "{}",
            f.message
        );
        let f = super::super::Failure::decode::<Request>(serde_json::json!([1])).unwrap_err();
        assert!(
            f.field.is_none() && f.message.contains("a JSON object"),
            "{}",
            f.message
        );
    }

    #[test]
    fn absurd_sizes_are_refused_naming_the_field() {
        for (req, field) in [
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": 100000}"#, "n"),
            (r#"{"batch_size": 100000}"#, "batch_size"),
        ] {
            let r: Request = serde_json::from_str(req).unwrap();
            let e = r.check_bounds().unwrap_err();
            assert_eq!(e.argument().and_then(|a| a.arg()), Some(field), "{req}");
        }
    }

    #[test]
    fn openai_sizes_are_width_by_height() {
        let o: OpenAiRequest =
            serde_json::from_str(r#"{"prompt": "a 3", "size": "32x16", "n": 2}"#).unwrap();
        let r = o.native("x".into(), None).unwrap();
        assert_eq!(
            (r.image_size, r.n, r.output),
            (Some([16, 32]), Some(2), None)
        );
        let bad: OpenAiRequest = serde_json::from_str(r#"{"prompt": "a", "size": "big"}"#).unwrap();
        assert!(bad.native("x".into(), None).is_err());
        let url: OpenAiRequest =
            serde_json::from_str(r#"{"prompt": "a", "response_format": "url"}"#).unwrap();
        let e = url.native("x".into(), None).unwrap_err();
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("response_format"));
    }
}
