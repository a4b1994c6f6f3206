//! The model options every command that loads a model takes, written once.
//!
//! argh cannot flatten one options struct into another, so [`model_command!`] declares a
//! subcommand struct with these fields added and a `model_options()` method that turns them
//! into the library's [`ModelOptions`] (the same type C's `edgediff_model_params` fills).

use std::path::PathBuf;

use edgediff::{Error, ModelOptions, NetworkOptions, Provider, Result};

/// Declares an argh subcommand struct: `--model` first, then the command's own fields, then
/// `--ort-lib --threads --provider --device-id --trt-cache --trt-fp16 --fallback --no-mmap`.
macro_rules! model_command {
    // Plain token trees throughout: argh's derive reads field types by their tokens (a `bool`
    // is a switch), which a `ty` fragment would hide.
    (
        $(#[$($attr:tt)*])*
        $vis:vis struct $name:ident {
            $($body:tt)*
        }
    ) => {
        $crate::cli::model_args::model_command! {
            @model {
                /// the ONNX model or pipeline folder (default: the shipped MNIST model; with --prompt, models/mnist-t2i)
                #[argh(option)]
                model: Option<std::path::PathBuf>,
            }
            $(#[$($attr)*])*
            $vis struct $name { $($body)* }
        }
    };
    // A command's own `model` field (`serve` takes several), whose `ModelField` gives the path.
    (
        @model { $($model:tt)* }
        $(#[$($attr:tt)*])*
        $vis:vis struct $name:ident {
            $($body:tt)*
        }
    ) => {
        $(#[$($attr)*])*
        $vis struct $name {
            $($model)*
            $($body)*
            /// path of libonnxruntime.so (else ORT_DYLIB_PATH, else .ort/ of the repository)
            #[argh(option)]
            ort_lib: Option<std::path::PathBuf>,
            /// ONNX Runtime intra-op threads, 0..=1024 (default 0: its own choice)
            #[argh(option, default = "0")]
            threads: usize,
            /// execution provider: cpu (default), cuda or tensorrt (GPU builds: --features cuda/tensorrt)
            #[argh(option, default = "String::from(\"cpu\")")]
            provider: String,
            /// GPU device id for cuda/tensorrt (default 0)
            #[argh(option, default = "0")]
            device_id: i32,
            /// directory for cached TensorRT engines (reused across runs)
            #[argh(option)]
            trt_cache: Option<std::path::PathBuf>,
            /// let TensorRT build fp16 engines
            #[argh(switch)]
            trt_fp16: bool,
            /// cpu: run on the CPU, with a warning, when the provider cannot be registered
            #[argh(option)]
            fallback: Option<String>,
            /// read the model file into memory instead of memory-mapping it
            #[argh(switch)]
            no_mmap: bool,
        }

        impl $name {
            /// The model options as the library takes them, checked.
            #[allow(dead_code)] // a command may open its model another way
            fn model_options(&self) -> edgediff::Result<edgediff::ModelOptions> {
                $crate::cli::model_args::ModelFlags {
                    model: $crate::cli::model_args::ModelField::path(&self.model),
                    ort_lib: self.ort_lib.clone(),
                    threads: self.threads,
                    provider: &self.provider,
                    device_id: self.device_id,
                    trt_cache: self.trt_cache.clone(),
                    trt_fp16: self.trt_fp16,
                    fallback: self.fallback.as_deref(),
                    no_mmap: self.no_mmap,
                }
                .options()
            }

            /// Loads ONNX Runtime and opens the model.
            #[allow(dead_code)]
            fn open_model(&self) -> edgediff::Result<edgediff::Model> {
                self.model_options()?.open()
            }
        }
    };
}
pub(crate) use model_command;

/// The path `ModelOptions` takes from a command's `model` field: the one given, or none for a
/// command that opens several itself.
pub(crate) trait ModelField {
    fn path(&self) -> Option<PathBuf>;
}

impl ModelField for Option<PathBuf> {
    fn path(&self) -> Option<PathBuf> {
        self.clone()
    }
}

impl ModelField for Vec<PathBuf> {
    fn path(&self) -> Option<PathBuf> {
        None
    }
}

/// The model flags of one command line, as given.
pub(crate) struct ModelFlags<'a> {
    pub model: Option<PathBuf>,
    pub ort_lib: Option<PathBuf>,
    pub threads: usize,
    pub provider: &'a str,
    pub device_id: i32,
    pub trt_cache: Option<PathBuf>,
    pub trt_fp16: bool,
    pub fallback: Option<&'a str>,
    pub no_mmap: bool,
}

impl ModelFlags<'_> {
    /// Checks the flags and turns them into [`ModelOptions`].
    pub fn options(self) -> Result<ModelOptions> {
        if !Provider::NAMES.contains(&self.provider) {
            return Err(Error::invalid(format!(
                "unknown --provider '{}'; expected cpu, cuda or tensorrt",
                self.provider
            )));
        }
        let mut provider = self.provider.parse::<Provider>()?.on_device(self.device_id);
        match &mut provider {
            Provider::TensorRt {
                engine_cache, fp16, ..
            } => {
                *engine_cache = self.trt_cache;
                *fp16 = self.trt_fp16;
            }
            _ if self.trt_cache.is_some() || self.trt_fp16 => {
                return Err(Error::invalid(
                    "--trt-cache and --trt-fp16 apply to --provider tensorrt",
                ))
            }
            _ => {}
        }
        let fallback_cpu = match self.fallback {
            None => false,
            Some("cpu") => true,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "--fallback {other}: the only fallback is cpu"
                )))
            }
        };
        Ok(ModelOptions {
            path: self.model,
            ort_lib: self.ort_lib,
            network: NetworkOptions {
                intra_threads: self.threads,
                provider,
                fallback_cpu,
                read_into_memory: self.no_mmap,
                low_memory: false, // only `sample` takes --low-memory
            },
        })
    }
}
