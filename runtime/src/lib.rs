//! edgediff: run self-describing ONNX diffusion models with plain `ndarray` samplers.
//!
//! A model file carries its own description (schedule, prediction type, time input, shape,
//! conditioning) in its `edgediff` metadata; [`Model::open`] validates it against the graph,
//! and [`generate`] draws samples with any [`SamplerKind`] over any [`Spacing`].
//!
//! ```no_run
//! use edgediff::{generate, Model, SampleOptions, SamplerKind};
//! edgediff::init_onnxruntime(None)?; // or set ORT_DYLIB_PATH
//! let mut model = Model::open("models/mnist-ddpm.onnx")?;
//! let opts = SampleOptions { sampler: SamplerKind::Ddim { eta: 0.0 }, steps: 50, n: 16, ..Default::default() };
//! let samples = generate(&mut model, &opts, None, &mut |_, _| {})?;
//! # Ok::<(), edgediff::Error>(())
//! ```

// Every unsafe operation sits in its own `unsafe` block with a `// SAFETY:` comment, also
// inside `unsafe fn`s (the C ABI in `capi` is most of them).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod calibrate;
pub mod capi;
pub mod classifier;
pub mod cli;
pub mod denoiser;
pub mod edit;
pub mod elbo;
pub mod error;
pub mod fid;
pub mod gaussian;
pub mod generate;
pub mod image;
pub mod inpaint;
pub mod likelihood;
pub mod metadata;
pub mod model;
pub mod noise;
pub mod npy;
pub mod output;
pub mod sampler;
pub mod schedule;
pub mod spacing;

pub use backend::init_onnxruntime;
pub use denoiser::X0Clip;
pub use edit::{invert, slerp};
pub use error::{ArgumentError, ArgumentKind, Error, Result};
pub use generate::{generate, generate_with_report, Report, SampleOptions};
pub use model::{Model, ModelOptions};
pub use backend::{NetworkOptions, Provider};
pub use sampler::{SamplerKind, SamplerParams};
pub use spacing::Spacing;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
