//! Text-to-image latent diffusion (the Stable Diffusion family): a model folder of several
//! graphs in the layout of optimum's ONNX export, which `edgediff-export diffusers DIR` writes
//! too:
//!
//! ```text
//! DIR/model_index.json                   the pipeline class (SDXL, SD3, Flux are refused by name)
//! DIR/edgediff.json                      the manifest; absent (optimum): derived from the configs below
//! DIR/text_encoder/model.onnx            input_ids int64 [N, L] -> last_hidden_state [N, L, D]
//! DIR/unet/model.onnx                    sample, timestep, encoder_hidden_states -> out_sample
//!                                        (an inpainting U-Net's sample: latents || mask || masked
//!                                        image latents, 2C + 1 channels; see `unet_in_channels`)
//! DIR/vae_decoder/model.onnx             latent_sample [N, C, h, w] -> sample [N, 3, H, W]
//! DIR/vae_encoder/model.onnx             sample [N, 3, H, W] -> latent_parameters [N, 2C, h, w]
//!                                        (mean || logvar; optional, img2img and inpainting need it)
//! DIR/tokenizer/                         vocab.json merges.txt tokenizer_config.json special_tokens_map.json
//! DIR/scheduler/scheduler_config.json    diffusers' scheduler config
//! DIR/<graph>/config.json                the part's diffusers/transformers config
//! ```
//!
//! The U-Net is the [`crate::Model`]'s network, so every sampler runs in latent space over the
//! same [`crate::denoiser::Denoiser`] as for pixel models; the pipeline adds what surrounds the
//! sampling: the prompts' hidden states (once per run) and the VAE decoding of each finished
//! batch of latents, in one piece or in tiles ([`Pipeline::decode_tiled`]). In low-memory mode
//! ([`crate::NetworkOptions::low_memory`]) the graphs are held one at a time: each stage of a
//! run frees the others, and a freed graph is opened again when next used.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Array4, ArrayView4, Axis, Ix3, Ix4};
use ort::session::Session;
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};

use crate::backend::{output_f32, Network, NetworkOptions, SampleType};
use crate::error::{Error, Result};
use crate::metadata::{
    Conditioning, ModelMetadata, Prediction, SamplingDefaults, ScheduleSpec, TimeInput,
};
use crate::spacing::Spacing;
use crate::text::ClipTokenizer;

/// The largest image height or width a run may ask for (`SampleOptions::image_size`).
pub const MAX_IMAGE_SIDE: usize = 1 << 16;

/// The pipeline classes this runtime runs.
pub const SUPPORTED_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "ORTStableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "ORTStableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "ORTLatentConsistencyModelPipeline",
];

/// The pipeline classes of guidance-distilled LCMs: their default guidance scale is 8.5.
const LCM_PIPELINES: &[&str] = &[
    "LatentConsistencyModelPipeline",
    "ORTLatentConsistencyModelPipeline",
];

/// LatentConsistencyModelPipeline's default `guidance_scale`.
const LCM_GUIDANCE: f64 = 8.5;

/// Families whose graphs or conditioning differ from Stable Diffusion 1.x/2.x (two text
/// encoders, added time ids, transformers instead of a U-Net): named when refused.
const REFUSED: &[(&str, &str)] = &[
    (
        "StableDiffusionXL",
        "SDXL (two text encoders and added size/time conditioning)",
    ),
    (
        "StableDiffusion3",
        "Stable Diffusion 3 (an MMDiT transformer and three text encoders)",
    ),
    (
        "Flux",
        "Flux (a rectified-flow transformer with T5 and CLIP text encoders)",
    ),
];

/// The VAE's latent scaling: the sampler's latents are `scaling_factor * (z - shift_factor)`
/// of the VAE's own latents z.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeScaling {
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

/// The text encoder's shape: `max_length` token ids in, `hidden_size` per token out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub max_length: usize,
    pub hidden_size: usize,
}

/// `edgediff.json`: what the runtime needs of a text-to-image folder, as the exporter writes it
/// (format_version 1), or as [`PipelineConfig::derive`] reads it from an optimum folder's
/// configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub format_version: u32,
    /// "text-to-image".
    pub kind: String,
    #[serde(default)]
    pub pipeline: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub prediction: Prediction,
    pub schedule: ScheduleSpec,
    pub num_train_timesteps: usize,
    /// diffusers' `timestep_spacing`: leading, trailing or linspace.
    pub spacing: String,
    /// diffusers' `steps_offset`, added to leading time steps.
    #[serde(default)]
    pub steps_offset: usize,
    /// diffusers' `set_alpha_to_one`: false makes DDIM end at alpha-bar of step 0, not at 1.
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// `[C, h, w]` of the latents the U-Net denoises (its output).
    pub latent_shape: [usize; 3],
    /// Channels of the U-Net's `sample` input (None: C, those of the latents). `2C + 1` is an
    /// inpainting U-Net (StableDiffusionInpaintPipeline's, 9 for Stable Diffusion): its input is
    /// the latents, the mask downscaled to the latents (1 = fill) and the VAE latents of the
    /// masked image, concatenated on the channels; it samples only through
    /// [`crate::inpaint::inpaint`]. The exporter writes it; [`PipelineConfig::derive`] reads it
    /// from `unet/config.json` `in_channels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_in_channels: Option<usize>,
    /// `[C, H, W]` of the decoded images.
    pub image_shape: [usize; 3],
    pub data_range: [f64; 2],
    pub vae: VaeScaling,
    pub text: TextConfig,
    /// The guidance scale when none is asked for (StableDiffusionPipeline's 7.5,
    /// LatentConsistencyModelPipeline's 8.5).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// diffusers' `original_inference_steps` of LCMScheduler and TCDScheduler, the points of
    /// the consistency grid the lcm and tcd samplers run on ([`Spacing::Lcm`]). Default: None,
    /// [`crate::spacing::LCM_ORIGINAL_STEPS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_inference_steps: Option<usize>,
    /// The sampler and steps a run takes when none is asked for: lcm and 4 for a folder whose
    /// scheduler is LCMScheduler, tcd and 4 for TCDScheduler (as [`PipelineConfig::derive`]
    /// and the exporter write it). Default: None, the library's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingDefaults>,
}

fn yes() -> bool {
    true
}

fn default_guidance() -> f64 {
    7.5
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::ModelFile {
        path: path.into(),
        detail: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Metadata {
        path: path.into(),
        detail: format!("not valid JSON ({e})"),
    })
}

/// The sampling defaults of a scheduler class: a consistency scheduler names its sampler at
/// diffusers' usual 4 steps (LCM's and TCD's model cards and pipeline examples); the others
/// leave them to the library.
fn scheduler_sampling(class: &str) -> Option<SamplingDefaults> {
    let sampler = match class {
        "LCMScheduler" => "lcm",
        "TCDScheduler" => "tcd",
        _ => return None,
    };
    Some(SamplingDefaults {
        sampler: sampler.into(),
        steps: 4,
        spacing: None,
        timesteps: None,
    })
}

impl PipelineConfig {
    /// Whether the U-Net is an inpainting U-Net (`unet_in_channels` is `2C + 1`).
    pub fn inpainting(&self) -> bool {
        self.unet_in_channels == Some(2 * self.latent_shape[0] + 1)
    }

    /// The spacing as the samplers' [`Spacing`].
    pub fn spacing(&self) -> Result<Spacing> {
        match self.spacing.as_str() {
            "leading" | "trailing" | "linspace" => self.spacing.parse(),
            other => Err(Error::invalid(format!(
                "the pipeline's timestep_spacing {other:?} is not supported (leading, trailing, linspace)"
            ))),
        }
    }

    /// The record of an optimum folder (no edgediff.json), from the parts' JSON configs: the
    /// scheduler's betas, prediction type and spacing (and, for LCMScheduler and TCDScheduler,
    /// its consistency grid and sampler at 4 steps), the pipeline class's default guidance,
    /// the U-Net's latent shape (its output
    /// channels) and input channels (an inpainting U-Net's differ), the VAE's
    /// scaling and upsampling, the text encoder's width and the tokenizer's length.
    pub fn derive(dir: &Path) -> Result<PipelineConfig> {
        let bad = |file: &str, detail: String| Error::Metadata {
            path: dir.join(file),
            detail,
        };
        let sc_file = "scheduler/scheduler_config.json";
        let sc = read_json(&dir.join(sc_file))?;
        let class = |v: &serde_json::Value| {
            v.get("_class_name")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let index = read_json(&dir.join("model_index.json"))?;
        let unet = read_json(&dir.join("unet/config.json"))?;
        let vae = read_json(&dir.join("vae_decoder/config.json"))?;
        let text = read_json(&dir.join("text_encoder/config.json"))?;
        let tok = read_json(&dir.join("tokenizer/tokenizer_config.json")).unwrap_or_default();
        let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
        let int =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let n = int(&sc, "num_train_timesteps").unwrap_or(1000);
        let (b0, b1) = (
            num(&sc, "beta_start").unwrap_or(1e-4),
            num(&sc, "beta_end").unwrap_or(0.02),
        );
        let schedule = match sc
            .get("beta_schedule")
            .and_then(|v| v.as_str())
            .unwrap_or("linear")
        {
            "linear" => ScheduleSpec::Linear {
                num_train_timesteps: n,
                beta_start: b0,
                beta_end: b1,
            },
            "scaled_linear" => ScheduleSpec::Quadratic {
                num_train_timesteps: n,
                beta_start: b0,
                beta_end: b1,
            },
            "squaredcos_cap_v2" => ScheduleSpec::Cosine {
                num_train_timesteps: n,
                s: 0.008,
                max_beta: 0.999,
            },
            "sigmoid" => ScheduleSpec::Sigmoid {
                num_train_timesteps: n,
                beta_start: b0,
                beta_end: b1,
            },
            other => {
                return Err(bad(
                    sc_file,
                    format!("beta_schedule {other:?} is not supported"),
                ))
            }
        };
        let prediction = match sc
            .get("prediction_type")
            .and_then(|v| v.as_str())
            .unwrap_or("epsilon")
        {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "sample" => Prediction::Sample,
            other => {
                return Err(bad(
                    sc_file,
                    format!("prediction_type {other:?} is not supported"),
                ))
            }
        };
        let size = match unet.get("sample_size") {
            Some(serde_json::Value::Array(a)) if a.len() == 2 => [
                a[0].as_u64().unwrap_or(0) as usize,
                a[1].as_u64().unwrap_or(0) as usize,
            ],
            Some(v) => [v.as_u64().unwrap_or(0) as usize; 2],
            None => [0, 0],
        };
        let in_channels = int(&unet, "in_channels").unwrap_or(4);
        let channels = int(&unet, "out_channels").unwrap_or(in_channels);
        let factor = 1usize
            << vae
                .get("block_out_channels")
                .and_then(|v| v.as_array())
                .map_or(3, |a| a.len().saturating_sub(1));
        let hidden = int(&text, "hidden_size")
            .ok_or_else(|| bad("text_encoder/config.json", "no hidden_size".into()))?;
        let max_length = int(&tok, "model_max_length")
            .filter(|&l| l < 10_000)
            .unwrap_or(77);
        Ok(PipelineConfig {
            format_version: 1,
            kind: "text-to-image".into(),
            pipeline: None,
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            description: "optimum ONNX pipeline folder (configs read from its JSON files)".into(),
            prediction,
            schedule,
            num_train_timesteps: n,
            spacing: sc
                .get("timestep_spacing")
                .and_then(|v| v.as_str())
                .unwrap_or("leading")
                .into(),
            steps_offset: int(&sc, "steps_offset").unwrap_or(0),
            set_alpha_to_one: sc
                .get("set_alpha_to_one")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            latent_shape: [channels, size[0], size[1]],
            unet_in_channels: Some(in_channels),
            image_shape: [
                int(&vae, "out_channels").unwrap_or(3),
                size[0] * factor,
                size[1] * factor,
            ],
            data_range: [-1.0, 1.0],
            vae: VaeScaling {
                scaling_factor: num(&vae, "scaling_factor").unwrap_or(0.18215),
                shift_factor: num(&vae, "shift_factor"),
            },
            text: TextConfig {
                max_length,
                hidden_size: hidden,
            },
            guidance: if LCM_PIPELINES.contains(&class(&index).as_str()) {
                LCM_GUIDANCE
            } else {
                default_guidance()
            },
            original_inference_steps: int(&sc, "original_inference_steps"),
            sampling: scheduler_sampling(&class(&sc)),
        })
    }

    /// The model contract's metadata of the U-Net: it samples the latents.
    pub(crate) fn unet_metadata(&self) -> ModelMetadata {
        ModelMetadata {
            format_version: 1,
            name: self.name.clone(),
            description: self.description.clone(),
            prediction: self.prediction,
            time_input: TimeInput::Index,
            schedule: self.schedule.clone(),
            sample_shape: self.latent_shape,
            data_range: self.data_range,
            conditioning: Some(Conditioning::Text {
                max_length: self.text.max_length,
                hidden_size: self.text.hidden_size,
            }),
            sampling: self.sampling.clone(),
            extra: serde_json::to_value(self)
                .ok()
                .map(|p| serde_json::json!({ "pipeline": p })),
        }
    }
}

/// The graphs around the U-Net: text encoder, tokenizer, VAE decoder and, when the folder has
/// one, VAE encoder.
pub struct Pipeline {
    config: PipelineConfig,
    dir: PathBuf,
    tokenizer: ClipTokenizer,
    text_encoder: Graph,
    vae_decoder: Graph,
    /// Opened on first use: only img2img and inpainting need it, and text-to-image runs should
    /// not pay for loading a graph they never call (optimum folders may lack it altogether).
    vae_encoder: Graph,
    /// `[h, w]` of the VAE decoder's `latent_sample` input as the graph declares it (-1 where
    /// dynamic): tiled decoding and other image sizes need both dynamic.
    decoder_latent_dims: [i64; 2],
    /// The U-Net's 2x downsamplings (its levels less one, from unet/config.json): its latents'
    /// sides must divide by 2 to this power, as each level's skip connection meets the
    /// upsampled one at its own size (the ONNX graph has no diffusers' `upsample_size` branch).
    unet_downsamplings: u32,
    opts: NetworkOptions,
}

/// One graph of the folder outside the denoiser contract, opened when first used; in
/// low-memory mode freed again when the run moves on to another graph ([`Stage`]).
struct Graph {
    path: PathBuf,
    session: Option<Session>,
}

impl Graph {
    fn new(path: PathBuf) -> Graph {
        Graph {
            path,
            session: None,
        }
    }

    /// The session, opened if it is not.
    fn session(&mut self, opts: &NetworkOptions) -> Result<&mut Session> {
        if self.session.is_none() {
            self.session = Some(Network::graph_session(&self.path, opts)?);
            log::debug!("graph opened: {}", self.path.display());
        }
        match self.session.as_mut() {
            Some(s) => Ok(s),
            None => unreachable!("opened above"),
        }
    }

    /// One call of a VAE graph: `input` (name, values) in, the output `output` (None: the
    /// first) out as f32 `[N, C, H, W]`, each in the graph's own float type. `what` and
    /// `layout` name the graph and its output's layout in errors.
    fn run_vae(
        &mut self,
        opts: &NetworkOptions,
        (name, x): (&str, ArrayView4<f32>),
        output: Option<&str>,
        what: &str,
        layout: &str,
    ) -> Result<Array4<f32>> {
        let path = self.path.clone();
        let session = self.session(opts)?;
        let ty = SampleType::of_input(session, name, &path)?;
        let input = ty.tensor(x, name)?;
        let outputs = session
            .run(vec![(std::borrow::Cow::from(name), input)])
            .map_err(Error::ort(format!("running {what}")))?;
        let value = output.and_then(|o| outputs.get(o)).unwrap_or(&outputs[0]);
        output_f32(value, &format!("{what}'s output"))?
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::Contract {
                path,
                detail: format!("{what}'s output is not {layout}"),
            })
    }

    fn release(&mut self) -> bool {
        let held = self.session.take().is_some();
        if held {
            log::debug!("graph freed: {}", self.path.display());
        }
        held
    }
}

/// What a run of a pipeline does at one time, and so which one graph low-memory mode holds
/// ([`crate::Model::enter`]); the others are freed, and opened again when next used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Encoding the prompts: the text encoder.
    Text,
    /// Encoding img2img's or inpainting's images: the VAE encoder.
    ImageEncoding,
    /// Sampling: the U-Net.
    Sampling,
    /// Decoding the latents: the VAE decoder.
    Decoding,
    /// Between runs: none.
    Idle,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish()
    }
}

/// The width of a U-Net's guidance-scale embedding from the graph's `timestep_cond` input
/// (`graph`: its width, -1 if dynamic) and the U-Net config's `time_cond_proj_dim`: they must
/// agree, and a config that names one needs the input (diffusers' UNet2DConditionModel adds
/// it to the time embedding; a graph traced without it was traced with none).
fn guidance_embedding_width(
    graph: Option<i64>,
    config: Option<u64>,
) -> std::result::Result<Option<usize>, String> {
    let width = match (graph, config) {
        (None, None) => return Ok(None),
        (None, Some(c)) => {
            return Err(format!(
                "unet/config.json has time_cond_proj_dim {c} (a guidance-distilled U-Net) but unet/model.onnx has no 'timestep_cond' input; export the U-Net with it (edgediff-export diffusers does, as optimum does)"
            ))
        }
        (Some(g), Some(c)) if g >= 0 && g as u64 != c => {
            return Err(format!(
                "unet/model.onnx's 'timestep_cond' has width {g} but unet/config.json's time_cond_proj_dim is {c}: the graph and its config do not belong together"
            ))
        }
        (Some(g), _) if g >= 0 => g,
        (Some(_), Some(c)) => i64::try_from(c).unwrap_or(-1),
        (Some(_), None) => {
            return Err(
                "unet/model.onnx's 'timestep_cond' has a dynamic width and unet/config.json names no time_cond_proj_dim, so the guidance-scale embedding's width is unknown".into(),
            )
        }
    };
    crate::guidance::embedding_width(width).map(Some)
}

/// Whether `dir` is a pipeline folder (it has a model_index.json).
pub(crate) fn is_pipeline_dir(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
}

/// Refuses pipeline classes other than Stable Diffusion's text-to-image, naming the family.
fn check_class(dir: &Path) -> Result<()> {
    let index = read_json(&dir.join("model_index.json"))?;
    let class = index
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("(none)");
    if SUPPORTED_PIPELINES.contains(&class) {
        return Ok(());
    }
    let family = REFUSED
        .iter()
        .find(|(prefix, _)| class.contains(prefix))
        .map_or(String::new(), |(_, what)| format!(" is {what}"));
    Err(Error::Contract {
        path: dir.join("model_index.json"),
        detail: format!(
            "the pipeline class {class}{family}; edgediff runs {} folders (Stable Diffusion 1.x/2.x and their fine-tunes)",
            SUPPORTED_PIPELINES[0]
        ),
    })
}

impl Pipeline {
    /// Opens the folder's U-Net as a [`Network`] and the rest as a [`Pipeline`], checking that
    /// the parts fit together (the text encoder's width is the U-Net's cross-attention width).
    pub(crate) fn open(
        dir: &Path,
        opts: &NetworkOptions,
    ) -> Result<(Network, ModelMetadata, Pipeline)> {
        check_class(dir)?;
        let manifest = dir.join("edgediff.json");
        let config: PipelineConfig = if manifest.is_file() {
            serde_json::from_value(read_json(&manifest)?).map_err(|e| Error::Metadata {
                path: manifest.clone(),
                detail: format!("malformed field: {e}"),
            })?
        } else {
            PipelineConfig::derive(dir)?
        };
        let contract = |detail: String| Error::Contract {
            path: dir.into(),
            detail,
        };
        if config.kind != "text-to-image" {
            return Err(contract(format!(
                "kind {:?} is not supported (text-to-image)",
                config.kind
            )));
        }
        config.spacing()?;
        for part in ["unet", "text_encoder", "vae_decoder"] {
            if !dir.join(part).join("model.onnx").is_file() {
                return Err(Error::ModelFile {
                    path: dir.join(part).join("model.onnx"),
                    detail: format!(
                        "the pipeline folder has no {part} graph ({part}/model.onnx); export the whole pipeline"
                    ),
                });
            }
        }
        // The U-Net's config names its cross-attention width (the graph's declared input
        // too) and its levels.
        let unet_config = read_json(&dir.join("unet/config.json")).ok();
        let unet_int = |k: &str| {
            unet_config
                .as_ref()
                .and_then(|c| c.get(k).and_then(|v| v.as_u64()))
        };
        let cross = unet_int("cross_attention_dim");
        let unet_downsamplings = unet_config
            .as_ref()
            .and_then(|c| {
                c.get("block_out_channels")
                    .or_else(|| c.get("down_block_types"))
                    .and_then(|v| v.as_array())
                    .map(|a| a.len().saturating_sub(1) as u32)
            })
            .unwrap_or(0);
        let hidden = config.text.hidden_size;
        if let Some(cross) = cross.filter(|&c| c as usize != hidden) {
            return Err(contract(format!(
                "the text encoder's hidden size {hidden} differs from the U-Net's cross-attention size {cross}: the parts do not belong together"
            )));
        }
        let c = config.latent_shape[0];
        let unet_in = config.unet_in_channels.unwrap_or(c);
        if unet_in != c && unet_in != 2 * c + 1 {
            return Err(contract(format!(
                "the U-Net takes {unet_in} input channels for latents of {c}: edgediff runs U-Nets of {c} (text-to-image) or {} (inpainting: latents, mask, masked image latents)",
                2 * c + 1
            )));
        }
        let metadata = config.unet_metadata();
        // Every check of the metadata record applies to the derived one too.
        ModelMetadata::from_json(&serde_json::to_string(&metadata).unwrap_or_default()).map_err(
            |detail| Error::Metadata {
                path: manifest.clone(),
                detail,
            },
        )?;
        let (mut network, _) = Network::open(&dir.join("unet/model.onnx"), opts)?;
        match network.declared_shape.first() {
            Some(&d) if d >= 0 && d as usize != unet_in => {
                return Err(contract(format!(
                    "unet/model.onnx takes {d} input channels; the pipeline's record says {unet_in}"
                )))
            }
            _ => {}
        }
        // An inpainting U-Net's mask and masked-image channels come beside the latents.
        network.extra_channels = unet_in - c;
        network.timestep_cond_dim =
            guidance_embedding_width(network.timestep_cond_width, unet_int("time_cond_proj_dim"))
                .map_err(contract)?;
        match network.context_shape {
            None => {
                return Err(contract(
                    "unet/model.onnx has no 'encoder_hidden_states' input; a text-to-image U-Net needs one".into(),
                ))
            }
            Some([l, d]) => {
                if d >= 0 && d as usize != hidden {
                    return Err(contract(format!(
                        "the text encoder's hidden size {hidden} differs from the U-Net's cross-attention size {d} (unet/model.onnx): the parts do not belong together"
                    )));
                }
                if l >= 0 && l as usize != config.text.max_length {
                    return Err(contract(format!(
                        "the U-Net takes {l} tokens of text but the tokenizer makes {}",
                        config.text.max_length
                    )));
                }
            }
        }
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        if tokenizer.max_length() != config.text.max_length {
            return Err(contract(format!(
                "the tokenizer makes {} tokens but the manifest says {}",
                tokenizer.max_length(),
                config.text.max_length
            )));
        }
        // Every graph is opened now, in either mode, so a broken one is reported before any
        // work; low-memory mode holds one at a time: the U-Net and the decoder are freed
        // again, and the text encoder, a run's first graph, is kept.
        if opts.low_memory {
            network.release();
        }
        let mut vae_decoder = Graph::new(dir.join("vae_decoder/model.onnx"));
        let decoder = vae_decoder.session(opts)?;
        let decoder_latent_dims = decoder
            .inputs()
            .iter()
            .find(|i| i.name() == "latent_sample")
            .or_else(|| decoder.inputs().first())
            .and_then(|i| match i.dtype() {
                ort::value::ValueType::Tensor { shape, .. } if shape.len() == 4 => {
                    Some([shape[2], shape[3]])
                }
                _ => None,
            })
            .unwrap_or([-1, -1]);
        if opts.low_memory {
            vae_decoder.release();
        }
        let mut text_encoder = Graph::new(dir.join("text_encoder/model.onnx"));
        text_encoder.session(opts)?;
        Ok((
            network,
            metadata,
            Pipeline {
                config,
                dir: dir.into(),
                tokenizer,
                text_encoder,
                vae_decoder,
                vae_encoder: Graph::new(dir.join("vae_encoder/model.onnx")),
                decoder_latent_dims,
                unet_downsamplings: unet_downsamplings.min(16),
                opts: opts.clone(),
            },
        ))
    }

    /// Whether the folder was opened in low-memory mode ([`NetworkOptions::low_memory`]).
    pub fn low_memory(&self) -> bool {
        self.opts.low_memory
    }

    /// In low-memory mode, frees every graph of the folder that `stage` does not use (the
    /// U-Net is the model's, freed by [`crate::Model::enter`]); nothing otherwise. Returns
    /// whether anything was freed.
    pub(crate) fn enter(&mut self, stage: Stage) -> bool {
        if !self.opts.low_memory {
            return false;
        }
        let mut freed = false;
        for (graph, used_in) in [
            (&mut self.text_encoder, Stage::Text),
            (&mut self.vae_encoder, Stage::ImageEncoding),
            (&mut self.vae_decoder, Stage::Decoding),
        ] {
            if stage != used_in {
                freed |= graph.release();
            }
        }
        freed
    }

    /// The folder's record.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The hidden states `[1, L, D]` of `prompt` (tokenized and padded to L); a prompt longer
    /// than L tokens is truncated with a warning naming what was dropped.
    pub fn encode_prompt(&mut self, prompt: &str) -> Result<Array3<f32>> {
        let encoded = self.tokenizer.encode(prompt);
        if let Some(warning) = encoded.warning() {
            log::warn!("{warning}");
        }
        let ids = Array2::from_shape_vec((1, encoded.ids.len()), encoded.ids)
            .map_err(|e| Error::invalid(e.to_string()))?;
        self.encode_ids(ids)
    }

    /// The text encoder's `last_hidden_state` `[N, L, D]` for token ids `[N, L]`.
    pub fn encode_ids(&mut self, ids: Array2<i64>) -> Result<Array3<f32>> {
        let path = self.dir.join("text_encoder/model.onnx");
        let input =
            TensorRef::from_array_view(ids.view()).map_err(Error::ort("input_ids tensor"))?;
        let outputs = self
            .text_encoder
            .session(&self.opts)?
            .run(ort::inputs!["input_ids" => input])
            .map_err(Error::ort("running the text encoder"))?;
        let out = output_f32(
            outputs.get("last_hidden_state").unwrap_or(&outputs[0]),
            "the text encoder's output",
        )?
        .into_dimensionality::<Ix3>()
        .map_err(|_| Error::Contract {
            path: path.clone(),
            detail: "last_hidden_state is not [N, L, D]".into(),
        })?;
        if out.shape()[2] != self.config.text.hidden_size {
            return Err(Error::Contract {
                path,
                detail: format!(
                    "the text encoder's hidden size {} differs from the U-Net's cross-attention size {}",
                    out.shape()[2],
                    self.config.text.hidden_size
                ),
            });
        }
        Ok(out)
    }

    /// Images `[N, C, H, W]` in the data range from sampled latents `[N, c, h, w]`: the VAE
    /// decodes `latents / scaling_factor + shift_factor`, and its output is clamped to the data
    /// range, as diffusers' image post-processing does (VAE decoders overshoot it).
    pub fn decode(&mut self, latents: &Array4<f32>) -> Result<Array4<f32>> {
        self.decode_with(latents, None)
    }

    /// [`Pipeline::decode`] in overlapping tiles of `tile` latent pixels a side, so that the
    /// decoder's memory is one tile's ([`crate::tiles`]: overlaps of at least a quarter of the
    /// tile, blended with a raised-cosine ramp). Latents one tile covers are decoded as by
    /// [`Pipeline::decode`], to the same bytes; larger ones agree with it to within what the
    /// decoder's reach beyond a tile changes. The decoder graph must take any latent height
    /// and width (an `edgediff-export diffusers` or optimum export does).
    pub fn decode_tiled(&mut self, latents: &Array4<f32>, tile: usize) -> Result<Array4<f32>> {
        self.check_vae_tiles(tile, [latents.shape()[2], latents.shape()[3]])?;
        self.decode_with(latents, Some(tile))
    }

    /// Refuses a tile size outside [`crate::tiles::MIN_TILE`]..=[`crate::tiles::MAX_TILE`],
    /// or one smaller than latents of `[h, w]` when the decoder graph takes latents of one
    /// size only.
    pub(crate) fn check_vae_tiles(&self, tile: usize, [h, w]: [usize; 2]) -> Result<()> {
        use crate::tiles::{tile_overlap, MAX_TILE, MIN_TILE};
        if !(MIN_TILE..=MAX_TILE).contains(&tile) {
            return Err(Error::out_of_range(
                "vae_tile_size",
                tile,
                &format!("must be in {MIN_TILE}..={MAX_TILE} latent pixels (a tile overlaps its neighbours by a quarter of it, at least 1)"),
            ));
        }
        let [dh, dw] = self.decoder_latent_dims;
        if (tile < h || tile < w) && (dh >= 0 || dw >= 0) {
            return Err(Error::Contract {
                path: self.dir.join("vae_decoder/model.onnx"),
                detail: format!(
                    "the VAE decoder takes latents of {} only, so it cannot decode tiles of {tile} (overlap {}) of the {h}x{w} latents; export the pipeline again with edgediff-export diffusers, whose decoder takes any size",
                    [dh, dw].map(|d| if d < 0 { "any".to_string() } else { d.to_string() }).join("x"),
                    tile_overlap(tile)
                ),
            });
        }
        Ok(())
    }

    /// What each side of an image must be a multiple of, `[height, width]`: the VAE's
    /// upsampling times 2 for each of the U-Net's downsamplings (Stable Diffusion: 8 x 8 = 64).
    pub fn size_multiple(&self) -> Result<[usize; 2]> {
        let (fh, fw) = self.upsampling()?;
        let unet = 1usize << self.unet_downsamplings;
        Ok([fh * unet, fw * unet])
    }

    /// `[h, w]` of the latents that make images of `[height, width]`, checked: each side a
    /// multiple of [`Pipeline::size_multiple`] (the folder's own size is taken as it is), and
    /// a U-Net (`unet_dims`, its `sample` input's `[h, w]` as declared, -1 where dynamic) and
    /// VAE decoder graph that take latents of that size.
    pub(crate) fn latent_size(
        &self,
        [hh, ww]: [usize; 2],
        unet_dims: [i64; 2],
    ) -> Result<[usize; 2]> {
        let [_, nh, nw] = self.config.image_shape;
        let [_, lh, lw] = self.config.latent_shape;
        if [hh, ww] == [nh, nw] {
            return Ok([lh, lw]);
        }
        let [mh, mw] = self.size_multiple()?;
        let (fh, fw) = self.upsampling()?;
        let bad: Vec<String> = [("height", hh, mh), ("width", ww, mw)]
            .into_iter()
            .filter(|&(_, side, m)| side == 0 || side % m != 0 || side > MAX_IMAGE_SIDE)
            .map(|(name, side, m)| {
                let below = (side / m * m).clamp(m, MAX_IMAGE_SIDE / m * m);
                let above = (side.div_ceil(m) * m).clamp(m, MAX_IMAGE_SIDE / m * m);
                if below == above {
                    format!("{name} {below}")
                } else {
                    format!("{name} {below} or {above}")
                }
            })
            .collect();
        if !bad.is_empty() {
            let why = match self.unet_downsamplings {
                0 => format!("the VAE's {fh}x upsampling"),
                1 => {
                    format!("the VAE's {fh}x upsampling times 2: the U-Net halves its latents once")
                }
                d => format!(
                    "the VAE's {fh}x upsampling times {}: the U-Net halves its latents {d} times",
                    1 << d
                ),
            };
            let multiple = if mh == mw {
                format!("multiples of {mh}")
            } else {
                format!("multiples of {mh} (height) and {mw} (width)")
            };
            return Err(Error::options(
                format!(
                    "{{0}} {hh}x{ww}: the pipeline makes images whose height and width are {multiple} ({why}), up to {MAX_IMAGE_SIDE}; the nearest valid: {}",
                    bad.join(", ")
                ),
                &["image_size"],
            ));
        }
        let latents = [hh / fh, ww / fw];
        for (graph, dims) in [
            ("unet/model.onnx", unet_dims),
            ("vae_decoder/model.onnx", self.decoder_latent_dims),
        ] {
            let fits = |d: i64, side: usize| d < 0 || d as usize == side;
            if !fits(dims[0], latents[0]) || !fits(dims[1], latents[1]) {
                let show = |d: i64| {
                    if d < 0 {
                        "any".to_string()
                    } else {
                        d.to_string()
                    }
                };
                return Err(Error::Contract {
                    path: self.dir.join(graph),
                    detail: format!(
                        "the graph takes latents of {}x{} only ({}x{} images), so it cannot make {hh}x{ww} images ({}x{} latents); export the pipeline again with edgediff-export diffusers, whose graphs take any size",
                        show(dims[0]),
                        show(dims[1]),
                        show(dims[0] * fh as i64),
                        show(dims[1] * fw as i64),
                        latents[0],
                        latents[1]
                    ),
                });
            }
        }
        Ok(latents)
    }

    /// The VAE's upsampling (image height / latent height, width / width).
    fn upsampling(&self) -> Result<(usize, usize)> {
        let [_, h, w] = self.config.latent_shape;
        let [_, hh, ww] = self.config.image_shape;
        if h == 0 || w == 0 || hh % h != 0 || ww % w != 0 {
            return Err(Error::Contract {
                path: self.dir.join("edgediff.json"),
                detail: format!(
                    "the image_shape {:?} is not a whole multiple of the latent_shape {:?}",
                    self.config.image_shape, self.config.latent_shape
                ),
            });
        }
        Ok((hh / h, ww / w))
    }

    fn decode_with(&mut self, latents: &Array4<f32>, tile: Option<usize>) -> Result<Array4<f32>> {
        let VaeScaling {
            scaling_factor,
            shift_factor,
        } = self.config.vae;
        let (scale, shift) = (scaling_factor as f32, shift_factor.unwrap_or(0.0) as f32);
        // Divided, not multiplied by the reciprocal: diffusers divides, and this keeps its rounding.
        let z = latents.mapv(|v| v / scale + shift);
        let path = self.dir.join("vae_decoder/model.onnx");
        let out = match tile {
            None => self.run_decoder(z)?,
            Some(t) => {
                let factor = self.upsampling()?;
                crate::tiles::decode_tiled(
                    z.view(),
                    t,
                    crate::tiles::tile_overlap(t),
                    factor,
                    &path,
                    &mut |part| self.run_decoder(part),
                )?
            }
        };
        let (fh, fw) = self.upsampling()?;
        let want = [
            latents.len_of(Axis(0)),
            self.config.image_shape[0],
            latents.shape()[2] * fh,
            latents.shape()[3] * fw,
        ];
        if out.shape() != want {
            return Err(Error::Contract {
                path,
                detail: format!(
                    "the VAE decoder gave {:?} for latents {:?}; expected {want:?} (the manifest's image_shape {:?} for latents {:?})",
                    out.shape(),
                    latents.shape(),
                    self.config.image_shape,
                    self.config.latent_shape
                ),
            });
        }
        let [lo, hi] = self.config.data_range;
        Ok(out.mapv(|v| v.clamp(lo as f32, hi as f32)))
    }

    /// One call of the VAE decoder graph on (scaled) latents `[N, c, h, w]`.
    fn run_decoder(&mut self, z: Array4<f32>) -> Result<Array4<f32>> {
        self.vae_decoder.run_vae(
            &self.opts,
            ("latent_sample", z.view()),
            None,
            "the VAE decoder",
            "[N, C, H, W]",
        )
    }

    /// Refuses an img2img or inpainting run on a folder without a VAE encoder graph, before
    /// any work.
    pub fn check_vae_encoder(&self) -> Result<()> {
        let path = self.dir.join("vae_encoder/model.onnx");
        if path.is_file() {
            return Ok(());
        }
        Err(Error::ModelFile {
            path,
            detail: "the pipeline folder has no vae_encoder graph (vae_encoder/model.onnx), which img2img and inpainting need (they encode an image); export the whole pipeline".into(),
        })
    }

    /// Latents `[N, c, h, w]` for the sampler from images `[N, C, H, W]` in the data range:
    /// the VAE encoder's mean (the mode of its latent distribution), as
    /// `scaling_factor * (mean - shift_factor)`. diffusers' StableDiffusionImg2ImgPipeline draws
    /// `mean + std * noise` instead; the mean keeps an image's latent the same whatever the
    /// seed, spends nothing of a sample's random stream, and differs from a draw by the VAE's
    /// std, which for Stable Diffusion's VAE is small next to the noise the run then adds.
    pub fn encode_image(&mut self, images: &Array4<f32>) -> Result<Array4<f32>> {
        let path = self.dir.join("vae_encoder/model.onnx");
        self.check_vae_encoder()?;
        let params = self.vae_encoder.run_vae(
            &self.opts,
            ("sample", images.view()),
            Some("latent_parameters"),
            "the VAE encoder",
            "[N, 2C, h, w]",
        )?;
        let c = self.config.latent_shape[0];
        let (fh, fw) = self.upsampling()?;
        let (h, w) = (images.shape()[2] / fh, images.shape()[3] / fw);
        if params.shape()[1..] != [2 * c, h, w] || params.len_of(Axis(0)) != images.len_of(Axis(0))
        {
            return Err(Error::Contract {
                path,
                detail: format!(
                    "the VAE encoder gave {:?} for images {:?}; expected [{}, {}, {h}, {w}] (mean and log-variance of latents {fh}x{fw} times smaller, as the manifest's latent_shape {:?} is of its image_shape {:?})",
                    params.shape(),
                    images.shape(),
                    images.len_of(Axis(0)),
                    2 * c,
                    self.config.latent_shape,
                    self.config.image_shape
                ),
            });
        }
        let VaeScaling {
            scaling_factor,
            shift_factor,
        } = self.config.vae;
        let (scale, shift) = (scaling_factor as f32, shift_factor.unwrap_or(0.0) as f32);
        let mean = params.slice(ndarray::s![.., ..c, .., ..]);
        Ok(mean.mapv(|v| (v - shift) * scale))
    }
}
