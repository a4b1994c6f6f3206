//! A loaded model: its validated metadata, its schedule and its network.

use std::path::{Path, PathBuf};

use crate::backend::{Network, NetworkOptions};
use crate::error::{Error, Result};
use crate::guidance::embedding_width;
use crate::metadata::{Conditioning, ModelMetadata};
use crate::pipeline::{Pipeline, PipelineConfig, Stage};
use crate::schedule::Schedule;

/// Which model to open and how: the options every command that loads a model takes (the CLI's
/// `--model --ort-lib --threads --provider --device-id --fallback --no-mmap`, C's
/// `edgediff_model_params`).
///
/// ```
/// use edgediff::{ModelOptions, Provider};
/// let mut opts = ModelOptions::default(); // the default model embedded at build time
/// opts.provider = "cuda".parse::<Provider>()?.on_device(0);
/// opts.fallback_cpu = true; // a build or machine without CUDA warns and runs on the CPU
/// let model = opts.open()?;
/// assert_eq!(model.metadata().sample_shape, [1, 28, 28]);
/// # Ok::<(), edgediff::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// The ONNX model file; None: the default MNIST model embedded at build time.
    pub path: Option<PathBuf>,
    /// ONNX Runtime's shared library; None: `ORT_DYLIB_PATH`, else `.ort/` of the repository.
    /// Only the first model opened in a process loads it.
    pub ort_lib: Option<PathBuf>,
    /// Session options: threads (default 0, ONNX Runtime's choice), provider (default cpu),
    /// CPU fallback (default off), reading instead of mapping (default off).
    pub network: NetworkOptions,
}

impl ModelOptions {
    /// Loads ONNX Runtime (once per process) and opens the model.
    pub fn open(&self) -> Result<Model> {
        crate::backend::init_onnxruntime(self.ort_lib.as_deref())?;
        match &self.path {
            Some(p) => Model::open_with(p, &self.network),
            None => Model::open_default(&self.network),
        }
    }
}

/// The environment variable naming the folder a prompt with no model uses, instead of the
/// shipped `models/mnist-t2i` (a deployment's own pipeline, an installed copy elsewhere).
pub const TEXT_MODEL_ENV: &str = "EDGEDIFF_TEXT_MODEL";

/// Where the shipped text-to-image model (`models/mnist-t2i`, a pipeline folder too large to
/// embed as the MNIST model is) is looked for, in order: beside the executable's ancestors
/// (`target/release/edgediff` is three levels below the repository), under their
/// `share/edgediff/`, then in the source tree this binary was built from. With
/// [`TEXT_MODEL_ENV`] set, its folder is the only candidate.
pub fn default_text_model_candidates() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(TEXT_MODEL_ENV).filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let rel = Path::new("models").join("mnist-t2i");
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            dirs.push(dir.join(&rel));
            dirs.push(dir.join("share").join("edgediff").join(&rel));
        }
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&rel));
    dirs
}

/// The first of [`default_text_model_candidates`] holding a pipeline (`model_index.json`);
/// an error naming where it looked when none does.
pub fn default_text_model() -> Result<PathBuf> {
    let candidates = default_text_model_candidates();
    if let Some(found) = candidates
        .iter()
        .find(|d| d.join("model_index.json").is_file())
    {
        return Ok(found.clone());
    }
    let from_env = std::env::var_os(TEXT_MODEL_ENV).is_some_and(|v| !v.is_empty());
    let looked = candidates
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::invalid(if from_env {
        format!("{TEXT_MODEL_ENV} names {looked}, which is not a text-to-image pipeline folder (no model_index.json): set it to a pipeline folder, or pass --model DIR")
    } else {
        format!("a prompt needs a text-to-image model and the shipped models/mnist-t2i was not found (looked in {looked}): pass --model DIR, or set {TEXT_MODEL_ENV} to a pipeline folder")
    }))
}

impl std::ops::Deref for ModelOptions {
    type Target = NetworkOptions;
    fn deref(&self) -> &NetworkOptions {
        &self.network
    }
}

impl std::ops::DerefMut for ModelOptions {
    fn deref_mut(&mut self) -> &mut NetworkOptions {
        &mut self.network
    }
}

/// The shapes of one run ([`Model::shapes_for`]), each `[C, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    /// What the sampler draws and denoises: a pipeline's latents, a pixel model's samples.
    pub sample: [usize; 3],
    /// What the run outputs: a pipeline's decoded images, a pixel model's samples.
    pub output: [usize; 3],
}

/// A self-describing diffusion model opened through ONNX Runtime.
///
/// ```
/// # edgediff::init_onnxruntime(None)?;
/// let mut model = edgediff::Model::open("../models/mnist-ddpm.onnx")?;
/// println!("{} {:?}", model.metadata().name, model.metadata().sample_shape);
/// # Ok::<(), edgediff::Error>(())
/// ```
#[derive(Debug)]
pub struct Model {
    pub(crate) network: Network,
    metadata: ModelMetadata,
    schedule: Schedule,
    path: PathBuf,
    /// The graphs around the U-Net of a text-to-image folder (text encoder, VAE decoder).
    pub(crate) pipeline: Option<Pipeline>,
}

impl Model {
    /// A fingerprint of the model file's bytes (its length and ends), 16 hex digits: what a
    /// resumed run checks to continue only the same model's output.
    pub fn fingerprint(&self) -> &str {
        &self.network.fingerprint
    }

    /// The element type the network takes and returns (float32 or float16).
    pub fn sample_type(&self) -> crate::backend::SampleType {
        self.network.sample_type()
    }

    /// Opens a model with default session options.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Model::open_with(path, &NetworkOptions::default())
    }

    /// Opens a model, validating its metadata against its graph.
    pub fn open_with(path: impl AsRef<Path>, opts: &NetworkOptions) -> Result<Model> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::ModelFile {
                path: path.into(),
                detail: "no such file".into(),
            });
        }
        if path.is_dir() {
            if crate::pipeline::is_pipeline_dir(path) {
                return Model::open_pipeline(path, opts);
            }
            return Err(Error::ModelFile {
                path: path.into(),
                detail: "it is a directory without model_index.json; give the .onnx (or .ort) file, or a pipeline folder".into(),
            });
        }
        refuse_low_memory(opts)?;
        let (network, raw) = Network::open(path, opts)?;
        Model::from_network(network, raw, path)
    }

    /// Opens the default MNIST model embedded at build time from `models/mnist-ddpm.onnx`.
    pub fn open_default(opts: &NetworkOptions) -> Result<Model> {
        #[cfg(edgediff_default_model)]
        {
            static BYTES: &[u8] = include_bytes!(env!("EDGEDIFF_DEFAULT_MODEL"));
            Model::from_bytes(BYTES, "<embedded models/mnist-ddpm.onnx>", opts)
        }
        #[cfg(not(edgediff_default_model))]
        {
            let _ = opts;
            Err(Error::invalid(
                "this build has no embedded default model (models/mnist-ddpm.onnx was absent at build time); give a model path",
            ))
        }
    }

    /// Opens a model from the bytes of an ONNX file held in memory; `label` names it in errors.
    pub fn from_bytes(
        bytes: &[u8],
        label: impl AsRef<Path>,
        opts: &NetworkOptions,
    ) -> Result<Model> {
        refuse_low_memory(opts)?;
        let (network, raw) = Network::from_bytes(bytes, label.as_ref(), opts)?;
        Model::from_network(network, raw, label.as_ref())
    }

    /// Opens a text-to-image folder (see [`crate::pipeline`]): the U-Net is the network, in
    /// latent space; the text encoder and VAE decoder come with it.
    fn open_pipeline(dir: &Path, opts: &NetworkOptions) -> Result<Model> {
        let (network, metadata, pipeline) = Pipeline::open(dir, opts)?;
        let schedule =
            Schedule::from_spec(&metadata.schedule).map_err(|detail| Error::Metadata {
                path: dir.into(),
                detail,
            })?;
        Ok(Model {
            network,
            metadata,
            schedule,
            path: dir.into(),
            pipeline: Some(pipeline),
        })
    }

    /// The record of a text-to-image folder; None for a single-file model.
    pub fn pipeline(&self) -> Option<&PipelineConfig> {
        self.pipeline.as_ref().map(|p| p.config())
    }

    /// The graphs around the U-Net of a text-to-image folder, to encode prompts and decode
    /// latents directly.
    pub fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        self.pipeline.as_mut()
    }

    /// A pipeline's run moves on to `stage`. In low-memory mode
    /// ([`NetworkOptions::low_memory`]) every graph that `stage` does not use is freed, and
    /// the freed memory handed back to the system; the graph `stage` uses is opened by its
    /// first call. Otherwise nothing changes (the stage is logged at debug level in both).
    pub(crate) fn enter(&mut self, stage: Stage) {
        let Some(p) = self.pipeline.as_mut() else {
            return;
        };
        if p.low_memory() {
            let mut freed = p.enter(stage);
            if stage != Stage::Sampling {
                freed |= self.network.release();
            }
            if freed {
                crate::backend::return_freed_memory();
            }
        }
        // In either mode, once the graphs are freed: benches/bench_pipeline_memory.py reads
        // the stages from the log.
        log::debug!("stage: {stage:?}");
    }

    /// `[C, H, W]` of what sampling outputs: the decoded images of a pipeline (at the
    /// folder's size; see [`Model::shapes_for`] for others), else the sample.
    pub fn output_shape(&self) -> [usize; 3] {
        self.pipeline()
            .map_or(self.metadata.sample_shape, |p| p.image_shape)
    }

    /// The shapes of a run making images of `image_size` `[height, width]` (None: the model's
    /// own size, [`Model::output_shape`]): a pipeline's latents are the images' size divided
    /// by the VAE's upsampling. Refused: another size for a pixel model (its network samples
    /// one size), and for a pipeline a side that is not a multiple of
    /// [`Pipeline::size_multiple`] or a U-Net or VAE decoder graph of another fixed size.
    pub fn shapes_for(&self, image_size: Option<[usize; 2]>) -> Result<Shapes> {
        let own = Shapes {
            sample: self.metadata.sample_shape,
            output: self.output_shape(),
        };
        let Some(size) = image_size else {
            return Ok(own);
        };
        let Some(p) = &self.pipeline else {
            let [c, h, w] = own.output;
            return Err(Error::options(
                format!("{{0}} applies to text-to-image pipelines, whose U-Net and VAE take other sizes; this pixel model samples its own {c}x{h}x{w}"),
                &["image_size"],
            ));
        };
        let unet = match self.network.declared_shape[..] {
            [_, h, w] => [h, w],
            _ => [-1, -1],
        };
        let [lh, lw] = p.latent_size(size, unet)?;
        Ok(Shapes {
            sample: [own.sample[0], lh, lw],
            output: [own.output[0], size[0], size[1]],
        })
    }

    fn from_network(mut network: Network, raw: Option<String>, path: &Path) -> Result<Model> {
        let raw = raw.ok_or_else(|| Error::Metadata {
            path: path.into(),
            detail: format!(
                "the ONNX file has no '{}' metadata entry",
                crate::metadata::METADATA_KEY
            ),
        })?;
        let unusable = |detail: String| Error::Metadata {
            path: path.into(),
            detail,
        };
        let metadata = ModelMetadata::from_json(&raw).map_err(unusable)?;
        // Before the graph checks: a schedule no sampler can use is bad metadata, reported as
        // such whatever else is wrong.
        let schedule = Schedule::from_spec(&metadata.schedule).map_err(unusable)?;
        let contract = |detail: String| Error::Contract {
            path: path.into(),
            detail,
        };
        for (i, (&declared, &meta)) in network
            .declared_shape
            .iter()
            .zip(&metadata.sample_shape)
            .enumerate()
        {
            if declared >= 0 && declared as usize != meta {
                return Err(contract(format!(
                    "metadata sample_shape {:?} disagrees with the graph's sample input {:?} at dimension {}",
                    metadata.sample_shape,
                    network.declared_shape,
                    i + 1
                )));
            }
        }
        let sample_bytes = 4 * metadata.sample_len();
        if sample_bytes > crate::generate::MAX_BATCH_BYTES {
            return Err(contract(format!(
                "sample_shape {:?} makes one sample {:.1} GiB, more than the {} GiB a batch array may hold",
                metadata.sample_shape,
                sample_bytes as f64 / (1u64 << 30) as f64,
                crate::generate::MAX_BATCH_BYTES >> 30
            )));
        }
        if network.context_shape.is_some() {
            return Err(contract(
                "the graph takes 'encoder_hidden_states': a text-conditioned U-Net runs from a pipeline folder (edgediff-export diffusers DIR --out OUT), not as a single file".into(),
            ));
        }
        if matches!(metadata.conditioning, Some(Conditioning::Text { .. })) {
            return Err(contract(
                "metadata conditioning is text, which only a pipeline folder (text encoder, U-Net, VAE) provides".into(),
            ));
        }
        if let Some(width) = network.timestep_cond_width {
            network.timestep_cond_dim = Some(embedding_width(width).map_err(contract)?);
        }
        let wants_labels = matches!(metadata.conditioning, Some(Conditioning::Class { .. }));
        if wants_labels != network.has_class_labels() {
            return Err(contract(format!(
                "metadata conditioning is {:?} but the graph {} a 'class_labels' input",
                metadata.conditioning,
                if network.has_class_labels() {
                    "has"
                } else {
                    "has no"
                }
            )));
        }
        Ok(Model {
            network,
            metadata,
            schedule,
            path: path.into(),
            pipeline: None,
        })
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// The width of the guidance-scale embedding when the network takes the guidance scale as
    /// an input (`timestep_cond`, LCM's): guidance is then that input, not classifier-free
    /// guidance. None for other networks.
    pub fn guidance_embedding_width(&self) -> Option<usize> {
        self.network.timestep_cond_dim
    }

    /// Whether the network takes integer timesteps: times between training indices reach it
    /// rounded, so it is piecewise constant in time.
    pub fn integer_time(&self) -> bool {
        self.network.integer_time()
    }

    /// The noise schedule the model was trained with.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// One bare network call at time `t` for the whole batch (benchmarks: the cost floor that
    /// sampling adds to).
    #[doc(hidden)]
    pub fn bench_bare_call(
        &mut self,
        x: ndarray::ArrayView4<f32>,
        t: f64,
    ) -> Result<ndarray::Array4<f32>> {
        let n = x.shape()[0];
        self.network.run(x, &vec![t; n], None, None, None)
    }

    /// The file the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Low-memory mode holds a pipeline's graphs one at a time; a single-file model is one graph.
fn refuse_low_memory(opts: &NetworkOptions) -> Result<()> {
    if opts.low_memory {
        return Err(Error::options(
            "{0} applies to text-to-image pipeline folders (it holds their graphs one at a time); a single-file model is one graph",
            &["low_memory"],
        ));
    }
    Ok(())
}
