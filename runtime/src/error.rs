//! Typed errors. Each variant names what is wrong and, where there is one, how to fix it.

use std::path::PathBuf;

/// Everything that can go wrong in edgediff.
///
/// Messages name options by their library name (the field of [`crate::SampleOptions`] or of
/// the C parameter structs: `batch_size`); [`Error::message_with`] renders them another way
/// (the CLI says `--batch-size`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No ONNX Runtime shared library could be found or loaded.
    #[error("{}", self.message_with(&plain))]
    OrtLibrary { detail: String },

    /// An execution provider could not be registered.
    #[error("{}", self.message_with(&plain))]
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

    /// An option is out of range, malformed, unknown, or does not fit the model or another
    /// option: which one and why is in the [`ArgumentError`].
    #[error("{}", self.message_with(&plain))]
    InvalidArgument(Box<ArgumentError>),

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

    /// Writing a batch to a partial `.npy` failed; the batches before it are kept there.
    #[error("{}", self.message_with(&plain))]
    PartialWrite {
        partial: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another process is writing the same output (it holds the lock on `lock`).
    #[error("another process is writing {path} (it holds the lock on {lock}); wait for it to finish, or write elsewhere")]
    OutputBusy { path: PathBuf, lock: PathBuf },

    /// A data file (.npy, .png) is malformed.
    #[error("bad input file {path}: {detail}")]
    BadInput { path: PathBuf, detail: String },
}

/// What kind of argument error (for callers that act on it).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ArgumentKind {
    /// A value outside what the option may take; `allowed` says what it may (as the message
    /// words it: "must be in 1..=256", "is outside [0, 1]").
    OutOfRange { value: String, allowed: String },
    /// A name (sampler, spacing, provider...) that is not one of `expected`.
    Unknown { name: String, expected: Vec<String> },
    /// Anything else: a malformed value, options that conflict, a value that does not fit the
    /// model.
    Invalid,
}

/// An invalid option: the options it is about, what kind of problem, and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgumentError {
    /// What kind of problem.
    pub kind: ArgumentKind,
    /// The options the message names, by library name (`batch_size`), first the one at fault.
    pub args: Vec<&'static str>,
    /// The message with `{0}`, `{1}`... in place of the names in `args`.
    template: String,
}

impl ArgumentError {
    fn new(kind: ArgumentKind, template: impl Into<String>, args: &[&'static str]) -> Self {
        ArgumentError {
            kind,
            args: args.to_vec(),
            template: template.into(),
        }
    }

    /// The option at fault, if the message names one.
    pub fn arg(&self) -> Option<&'static str> {
        self.args.first().copied()
    }

    /// The message with each option's name rendered by `name`.
    pub fn message_with(&self, name: &dyn Fn(&str) -> String) -> String {
        let mut out = self.template.clone();
        for (i, a) in self.args.iter().enumerate() {
            out = out.replace(&format!("{{{i}}}"), &name(a));
        }
        out
    }
}

impl std::fmt::Display for ArgumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message_with(&|a| a.to_string()))
    }
}

impl From<ArgumentError> for Error {
    fn from(a: ArgumentError) -> Error {
        Error::InvalidArgument(Box::new(a))
    }
}

/// Option names as the library spells them (Display's naming).
fn plain(name: &str) -> String {
    name.to_string()
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

    /// For `map_err`: an I/O error with what was being done (`"writing out.npy"`).
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// An invalid-argument error whose message names no option.
    pub fn invalid(message: impl Into<String>) -> Error {
        ArgumentError::new(ArgumentKind::Invalid, message, &[]).into()
    }

    /// A text-to-image pipeline given to `what` (an operation that runs on single-file models
    /// only, so far), with `why` it cannot yet: names no option, since the model itself is
    /// what does not fit. Refused before any work, instead of a shape mismatch between the
    /// decoded images and the latents, or a network call without the prompt's hidden states.
    pub fn not_for_pipelines(what: &str, why: &str) -> Error {
        Error::invalid(format!(
            "{what} is not supported yet for text-to-image pipelines: {why}"
        ))
    }

    /// `arg` has the value `value`, which `allowed` rules out: "{arg} {value} {allowed}", e.g.
    /// `Error::out_of_range("eta", 2, "is outside [0, 1]")`.
    pub fn out_of_range(arg: &'static str, value: impl std::fmt::Display, allowed: &str) -> Error {
        let value = value.to_string();
        ArgumentError::new(
            ArgumentKind::OutOfRange {
                value: value.clone(),
                allowed: allowed.to_string(),
            },
            format!("{{0}} {value} {allowed}"),
            &[arg],
        )
        .into()
    }

    /// A message about the options `args`, written with `{0}`, `{1}`... where their names go:
    /// `Error::options("{0} and {1} exclude each other", &["clip_x0", "dynamic_threshold"])`.
    pub fn options(template: impl Into<String>, args: &[&'static str]) -> Error {
        ArgumentError::new(ArgumentKind::Invalid, template, args).into()
    }

    /// A name that is none of the known ones: "unknown {what} '{name}'; expected {expected}",
    /// about the option called `what` (the one [`ArgumentError::arg`] gives).
    pub fn unknown(what: &'static str, name: &str, expected: &[&str]) -> Error {
        let list = match expected {
            [] => String::new(),
            [one] => one.to_string(),
            [rest @ .., last] if rest.len() < 5 => format!("{} or {last}", rest.join(", ")),
            all => format!("one of {}", all.join(", ")),
        };
        ArgumentError::new(
            ArgumentKind::Unknown {
                name: name.to_string(),
                expected: expected.iter().map(|s| s.to_string()).collect(),
            },
            format!("unknown {what} '{name}'; expected {list}"),
            // `what` is the option's name: a server's answer and a caller name the field.
            &[what],
        )
        .into()
    }

    /// The argument error inside, if this is one.
    pub fn argument(&self) -> Option<&ArgumentError> {
        match self {
            Error::InvalidArgument(a) => Some(a),
            _ => None,
        }
    }

    /// The message with option names rendered by `name` (the CLI passes one that turns
    /// `batch_size` into `--batch-size`); [`Display`](std::fmt::Display) uses the names as
    /// they are.
    ///
    /// ```
    /// let e = edgediff::Error::out_of_range("batch_size", 0, "must be at least 1");
    /// assert_eq!(e.to_string(), "invalid argument: batch_size 0 must be at least 1");
    /// let flag = |name: &str| format!("--{}", name.replace('_', "-"));
    /// assert_eq!(e.message_with(&flag), "invalid argument: --batch-size 0 must be at least 1");
    /// assert_eq!(e.argument().and_then(|a| a.arg()), Some("batch_size"));
    /// ```
    pub fn message_with(&self, name: &dyn Fn(&str) -> String) -> String {
        match self {
            Error::InvalidArgument(a) => format!("invalid argument: {}", a.message_with(name)),
            Error::Provider { provider, detail } => format!(
                "the {provider} execution provider is unavailable: {detail} (or pass {} cpu to run on the CPU instead)",
                name("fallback")
            ),
            Error::OrtLibrary { detail } => format!(
                "ONNX Runtime library not found or not loadable: {detail}\n  fix: run `tools/fetch-onnxruntime` (puts libonnxruntime.so.{ORT_VERSION} into .ort/), or point {} / ORT_DYLIB_PATH at a libonnxruntime.so of version 1.31 or newer (API 31)",
                name("ort_lib")
            ),
            Error::PartialWrite { partial, source } => format!(
                "writing {} (the samples before this batch are kept there; fix the cause and rerun with {}): {source}",
                partial.display(),
                name("resume")
            ),
            // Variants whose Display is this function must not reach here (it would recurse).
            other => other.to_string(),
        }
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
            Error::Io { .. }
            | Error::BadInput { .. }
            | Error::OutputBusy { .. }
            | Error::PartialWrite { .. } => 4,
            Error::NonFinite { .. } => 5,
            Error::Cancelled => 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_render_per_caller() {
        let e = Error::options(
            "{0} and {1} exclude each other",
            &["clip_x0", "dynamic_threshold"],
        );
        assert_eq!(
            e.to_string(),
            "invalid argument: clip_x0 and dynamic_threshold exclude each other"
        );
        let flag = |a: &str| format!("--{}", a.replace('_', "-"));
        assert_eq!(
            e.message_with(&flag),
            "invalid argument: --clip-x0 and --dynamic-threshold exclude each other"
        );
        let r = Error::out_of_range("eta", 2, "is outside [0, 1]");
        assert_eq!(
            r.message_with(&flag),
            "invalid argument: --eta 2 is outside [0, 1]"
        );
        let a = r.argument().unwrap();
        assert_eq!(a.arg(), Some("eta"));
        assert_eq!(
            a.kind,
            ArgumentKind::OutOfRange {
                value: "2".into(),
                allowed: "is outside [0, 1]".into()
            }
        );
    }

    #[test]
    fn unknown_lists_what_is_expected() {
        let e = Error::unknown(
            "spacing",
            "odd",
            &["leading", "trailing", "linspace", "karras", "logsnr"],
        );
        assert_eq!(
            e.to_string(),
            "invalid argument: unknown spacing 'odd'; expected leading, trailing, linspace, karras or logsnr"
        );
        assert_eq!(e.argument().and_then(|a| a.arg()), Some("spacing"));
    }
}
