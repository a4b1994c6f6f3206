//! edgediff: run self-describing ONNX diffusion models with plain `ndarray` samplers.
//!
//! A model file carries its own description (schedule, prediction type, time input, shape,
//! conditioning) in its `edgediff` metadata; [`ModelOptions::open`] (or [`Model::open`])
//! validates it against the graph, and [`generate()`] draws samples as a [`SampleOptions`]
//! request says: any [`SamplerKind`] over any [`Spacing`]. The CLI and the C library fill the
//! same two types, so whatever one can do the other can. Errors are [`Error`]s; an invalid
//! option is an [`ArgumentError`] that names the option by its field name here (`batch_size`).
//!
//! ```
//! use edgediff::{generate, ModelOptions, SampleOptions};
//! // The default model embedded at build time; ONNX Runtime from ORT_DYLIB_PATH or .ort/.
//! let mut model = ModelOptions::default().open()?;
//! let opts = SampleOptions { sampler: "dpm++2m".parse()?, steps: 5, n: 2, ..Default::default() };
//! let samples = generate(&mut model, &opts, None, &mut |_, _| {})?;
//! assert_eq!(samples.shape(), &[2, 1, 28, 28]);
//! # Ok::<(), edgediff::Error>(())
//! ```
//!
//! Beyond sampling: [`inpaint`], [`edit`] (inversion, interpolation), [`elbo`] and
//! [`likelihood`] (model evaluation), [`calibrate`] (time steps fitted to a model), [`fid`]
//! and [`classifier`] (sample quality); [`npy`], [`image`] and [`output`] read and write the
//! files the CLI uses.

// Every unsafe operation sits in its own `unsafe` block with a `// SAFETY:` comment, also
// inside `unsafe fn`s (the C ABI in `capi` is most of them).
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod calibrate;
mod capi;
pub mod classifier;
pub mod clip;
pub mod denoiser;
pub mod edit;
pub mod elbo;
mod error;
pub mod fid;
mod files;
pub mod gaussian;
pub mod generate;
pub mod guidance;
pub mod image;
pub mod inpaint;
mod job;
pub mod likelihood;
pub mod metadata;
mod model;
pub mod noise;
pub mod npy;
pub mod output;
pub mod pipeline;
pub mod sampler;
pub mod schedule;
pub mod serve;
pub mod spacing;
pub mod text;
pub mod tiles;

pub use backend::{
    init_onnxruntime, ort_library_candidates, NetworkOptions, Provider, SampleType, MAX_THREADS,
};
pub use denoiser::X0Clip;
pub use edit::{invert, slerp};
pub use error::{ArgumentError, ArgumentKind, Error, Result, ORT_VERSION};
pub use generate::{generate, generate_with_report, Report, SampleOptions};
pub use model::{
    default_text_model, default_text_model_candidates, Model, ModelOptions, Shapes, TEXT_MODEL_ENV,
};
pub use pipeline::{Pipeline, PipelineConfig};
pub use sampler::{SamplerKind, SamplerParams};
pub use spacing::Spacing;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
