//! Typed errors. Each variant names what is wrong and, where there is one, how to fix it.

use std::path::PathBuf;

/// Everything that can go wrong in edgediff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No ONNX Runtime shared library could be found or loaded.
    #[error("ONNX Runtime library not found or not loadable: {detail}\n  fix: run `tools/fetch-onnxruntime` (puts libonnxruntime.so.{ORT_VERSION} into .ort/), or point --ort-lib / ORT_DYLIB_PATH at a libonnxruntime.so of version 1.31 or newer (API 31)")]
    OrtLibrary { detail: String },

    /// An execution provider could not be registered.
    #[error("the {provider} execution provider is unavailable: {detail} (or pass --fallback cpu to run on the CPU instead)")]
    Provider {
        provider: &'static str,
        detail: String,
    },

    /// The caller asked to stop (a progress callback of the C API).
    #[error("cancelled by the caller")]
    Cancelled,

    /// ONNX Runtime refused a model or failed while running it.
    #[error("ONNX Runtime: {context}: {source}")]
    Ort {
        context: String,
        #[source]
        source: ort::Error,
    },

    /// The model file is missing, unreadable or not ONNX.
    #[error("cannot load model {path}: {detail}")]
    ModelFile { path: PathBuf, detail: String },

    /// The model has no, or malformed, edgediff metadata.
    #[error("model {path} has no usable edgediff metadata: {detail}\n  fix: attach it with `edgediff-export add-metadata {path} --sample-shape C,H,W --prediction epsilon --schedule linear ...` (see `edgediff-export add-metadata --help`)")]
    Metadata { path: PathBuf, detail: String },

    /// The metadata and the ONNX graph disagree, or the graph breaks the model contract.
    #[error("model {path} does not match the edgediff model contract: {detail}")]
    Contract { path: PathBuf, detail: String },

    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The network produced NaN or infinity.
    #[error("the network returned a non-finite value (NaN or Inf) at step {step} (time {time}) for sample {sample}; the model or its inputs are broken")]
    NonFinite {
        step: usize,
        time: f64,
        sample: usize,
    },

    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A data file (.npy, .png) is malformed.
    #[error("bad input file {path}: {detail}")]
    BadInput { path: PathBuf, detail: String },
}

/// The ONNX Runtime version the project fetches and tests against.
pub const ORT_VERSION: &str = "1.32.0";

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Error {
        let context = context.into();
        move |source| Error::Ort { context, source }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Process exit code for the CLI: 2 usage, 3 model/library problems, 4 I/O, 5 numerical.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) => 2,
            Error::OrtLibrary { .. }
            | Error::Provider { .. }
            | Error::Ort { .. }
            | Error::ModelFile { .. }
            | Error::Metadata { .. }
            | Error::Contract { .. } => 3,
            Error::Io { .. } | Error::BadInput { .. } => 4,
            Error::NonFinite { .. } => 5,
            Error::Cancelled => 6,
        }
    }
}
