//! The network backend: one ONNX Runtime environment per process, and a session per model that
//! takes `sample`/`timestep`(/`class_labels`) and returns one tensor shaped like `sample`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::f16;
use ndarray::{Array1, Array4, ArrayView4, Ix4};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, TensorRef, ValueType};

use crate::error::{Error, Result, ORT_VERSION};

/// The process-wide ONNX Runtime: which library was loaded (or why none could be).
static ORT_ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// Where the ONNX Runtime library is looked for, in order, when no path is given.
pub fn ort_library_candidates() -> Vec<PathBuf> {
    let name = format!("libonnxruntime.so.{ORT_VERSION}");
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/release/edgediff -> repo root is three levels up; installed copies look beside themselves.
        for dir in exe.ancestors().skip(1).take(4) {
            dirs.push(dir.join(".ort"));
            dirs.push(dir.join("lib"));
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join(".ort"));
    }
    dirs.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".ort"),
    );
    dirs.into_iter().map(|d| d.join(&name)).collect()
}

/// Loads ONNX Runtime once per process, from `explicit`, else `ORT_DYLIB_PATH`, else the first
/// of [`ort_library_candidates`] that exists. Later calls return the first outcome; a later call
/// naming a different library than the one loaded is an error (one runtime per process).
pub fn init_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    let outcome = ORT_ENV.get_or_init(|| load(explicit));
    match outcome {
        Ok((path, _)) => {
            if let Some(p) = explicit {
                if p != path {
                    return Err(Error::OrtLibrary {
                        detail: format!(
                            "{} was asked for, but {} is already loaded in this process (only one ONNX Runtime per process)",
                            p.display(),
                            path.display()
                        ),
                    });
                }
            }
            Ok(path.clone())
        }
        Err(detail) => Err(Error::OrtLibrary {
            detail: detail.clone(),
        }),
    }
}

/// The process's ONNX Runtime environment, loading the library by the default search if needed.
pub(crate) fn environment() -> Result<&'static ort::environment::Environment> {
    init_onnxruntime(None)?;
    match ORT_ENV.get() {
        Some(Ok((_, env))) => Ok(env),
        _ => unreachable!("init_onnxruntime succeeded"),
    }
}

fn load(
    explicit: Option<&Path>,
) -> std::result::Result<(PathBuf, ort::environment::Environment), String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => ort_library_candidates()
                .into_iter()
                .find(|p| p.exists())
                .ok_or_else(|| {
                    format!(
                        "no --ort-lib given, ORT_DYLIB_PATH unset, and none of these exist: {}",
                        ort_library_candidates()
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
        },
    };
    if !path.is_file() {
        return Err(format!(
            "{} does not exist or is not a file",
            path.display()
        ));
    }
    // ort's loader can panic on a library that is not ONNX Runtime; keep that inside.
    let builder = std::panic::catch_unwind(|| ort::init_from(&path))
        .map_err(|_| format!("{} could not be loaded as ONNX Runtime", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let env = builder
        .with_name("edgediff")
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    log::info!("loaded ONNX Runtime from {}", path.display());
    Ok((path, env))
}

/// Element type of the network's `sample` input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleType {
    F32,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeType {
    I64,
    F32,
    F16,
}

/// Session options for opening a network.
#[derive(Debug, Clone, Default)]
pub struct NetworkOptions {
    /// Intra-op threads; 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
}

/// An opened ONNX network obeying the model contract.
pub struct Network {
    session: Session,
    sample_type: SampleType,
    time_type: TimeType,
    has_class_labels: bool,
    /// `[C, H, W]` as the graph declares it (-1 where dynamic).
    pub(crate) declared_shape: Vec<i64>,
    path: PathBuf,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("path", &self.path)
            .field("sample_type", &self.sample_type)
            .finish()
    }
}

fn tensor_info(ty: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

impl Network {
    /// Opens `path` and returns the network with its raw `edgediff` metadata string, if any.
    pub fn open(path: &Path, opts: &NetworkOptions) -> Result<(Network, Option<String>)> {
        let bytes = std::fs::read(path).map_err(|e| Error::ModelFile {
            path: path.into(),
            detail: e.to_string(),
        })?;
        Network::from_bytes(&bytes, path, opts)
    }

    /// Opens a network from the bytes of an ONNX file; `path` only labels errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        opts: &NetworkOptions,
    ) -> Result<(Network, Option<String>)> {
        let env = environment()?;
        let mut builder = Session::builder(env).map_err(Error::ort("creating a session"))?;
        if opts.intra_threads > 0 {
            builder = builder
                .with_intra_threads(opts.intra_threads)
                .map_err(|e| Error::ort("setting threads")(e.into()))?;
        }
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| Error::ModelFile {
                path: path.into(),
                detail: format!("ONNX Runtime cannot parse it as an ONNX model ({e})"),
            })?;
        let raw_meta = session
            .metadata()
            .map_err(Error::ort("reading model metadata"))?
            .custom(crate::metadata::METADATA_KEY);
        let contract = |detail: String| Error::Contract {
            path: path.into(),
            detail,
        };

        let find = |name: &str| session.inputs().iter().find(|o| o.name() == name);
        let sample = find("sample")
            .ok_or_else(|| contract("the graph has no input named 'sample'".into()))?;
        let (sty, sshape) = tensor_info(sample.dtype())
            .ok_or_else(|| contract("input 'sample' is not a tensor".into()))?;
        let sample_type = match sty {
            TensorElementType::Float32 => SampleType::F32,
            TensorElementType::Float16 => SampleType::F16,
            other => {
                return Err(contract(format!(
                    "input 'sample' is {other:?}; expected float32 or float16"
                )))
            }
        };
        if sshape.len() != 4 {
            return Err(contract(format!(
                "input 'sample' has rank {}; expected [N, C, H, W]",
                sshape.len()
            )));
        }
        let timestep = find("timestep")
            .ok_or_else(|| contract("the graph has no input named 'timestep'".into()))?;
        let time_type = match tensor_info(timestep.dtype()).map(|(t, _)| t) {
            Some(TensorElementType::Int64) => TimeType::I64,
            Some(TensorElementType::Float32) => TimeType::F32,
            Some(TensorElementType::Float16) => TimeType::F16,
            other => {
                return Err(contract(format!(
                    "input 'timestep' is {other:?}; expected int64 or float"
                )))
            }
        };
        let has_class_labels = find("class_labels").is_some();
        let known = ["sample", "timestep", "class_labels"];
        if let Some(extra) = session.inputs().iter().find(|o| !known.contains(&o.name())) {
            return Err(contract(format!(
                "unexpected input '{}' (the contract allows {known:?})",
                extra.name()
            )));
        }
        if session.outputs().len() != 1 {
            return Err(contract(format!(
                "the graph has {} outputs; expected exactly one",
                session.outputs().len()
            )));
        }
        let declared_shape = sshape[1..].to_vec();
        let net = Network {
            session,
            sample_type,
            time_type,
            has_class_labels,
            declared_shape,
            path: path.into(),
        };
        Ok((net, raw_meta))
    }

    /// Whether the graph takes `class_labels`.
    pub fn has_class_labels(&self) -> bool {
        self.has_class_labels
    }

    /// Element type of `sample`.
    pub fn sample_type(&self) -> SampleType {
        self.sample_type
    }

    /// Runs the network on a batch. `time` is the network's own time input per sample (already
    /// mapped by the caller); integer inputs get it rounded.
    pub fn run(
        &mut self,
        x: ArrayView4<f32>,
        time: &[f64],
        class_labels: Option<&[i64]>,
    ) -> Result<Array4<f32>> {
        let n = x.shape()[0];
        debug_assert_eq!(time.len(), n);
        let mut inputs: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::with_capacity(3);
        let x_std = x.as_standard_layout();
        match self.sample_type {
            SampleType::F32 => inputs.push((
                "sample".into(),
                TensorRef::from_array_view(x_std.view())
                    .map_err(Error::ort("sample tensor"))?
                    .into(),
            )),
            SampleType::F16 => inputs.push((
                "sample".into(),
                Tensor::from_array(x_std.mapv(f16::from_f32))
                    .map_err(Error::ort("sample tensor"))?
                    .into(),
            )),
        }
        let t = Array1::from_iter(time.iter().copied());
        match self.time_type {
            TimeType::I64 => inputs.push((
                "timestep".into(),
                Tensor::from_array(t.mapv(|v| v.round() as i64))
                    .map_err(Error::ort("timestep tensor"))?
                    .into(),
            )),
            TimeType::F32 => inputs.push((
                "timestep".into(),
                Tensor::from_array(t.mapv(|v| v as f32))
                    .map_err(Error::ort("timestep tensor"))?
                    .into(),
            )),
            TimeType::F16 => inputs.push((
                "timestep".into(),
                Tensor::from_array(t.mapv(f16::from_f64))
                    .map_err(Error::ort("timestep tensor"))?
                    .into(),
            )),
        }
        if self.has_class_labels {
            let labels = class_labels
                .ok_or_else(|| Error::InvalidArgument("this model needs class labels".into()))?;
            inputs.push((
                "class_labels".into(),
                Tensor::from_array(Array1::from_iter(labels.iter().copied()))
                    .map_err(Error::ort("class_labels tensor"))?
                    .into(),
            ));
        }
        let outputs = self
            .session
            .run(inputs)
            .map_err(Error::ort("running the network"))?;
        let out = &outputs[0];
        let arr = match self.sample_type {
            SampleType::F32 => out
                .try_extract_array::<f32>()
                .map_err(Error::ort("reading the output"))?
                .to_owned(),
            SampleType::F16 => out
                .try_extract_array::<f16>()
                .map_err(Error::ort("reading the output"))?
                .mapv(f16::to_f32),
        };
        let arr = arr
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::Contract {
                path: self.path.clone(),
                detail: "the output is not rank 4 [N, C, H, W]".into(),
            })?;
        if arr.shape() != x.shape() {
            return Err(Error::Contract {
                path: self.path.clone(),
                detail: format!(
                    "output shape {:?} differs from sample shape {:?}",
                    arr.shape(),
                    x.shape()
                ),
            });
        }
        Ok(arr)
    }
}
