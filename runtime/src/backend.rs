//! The network backend: one ONNX Runtime environment per process, and a session per model that
//! takes `sample`/`timestep`(/`class_labels` or `encoder_hidden_states`, `timestep_cond`) and returns one tensor
//! shaped like `sample`; plus plain sessions for a pipeline's other graphs (text encoder, VAE).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::f16;
use ndarray::{s, Array1, Array4, ArrayD, ArrayView1, ArrayView3, ArrayView4, Axis, Ix4};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, TensorRef, ValueType};

use crate::error::{Error, Result, ORT_VERSION};

/// The process-wide ONNX Runtime: which library was loaded. Only success is kept: a failed
/// load (a wrong path) may be retried with another.
static ORT_ENV: OnceLock<(PathBuf, ort::environment::Environment)> = OnceLock::new();

/// Serialises loading, so two threads never load two libraries.
static ORT_LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
/// of [`ort_library_candidates`] that exists. Once one is loaded, later calls return it, and a
/// call naming a different library is an error (one runtime per process); a failed load is
/// not remembered, so the next call tries again (with the path it gives).
pub fn init_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    let loaded = match ORT_ENV.get() {
        Some(v) => v,
        None => {
            let _one_at_a_time = ORT_LOADING.lock().unwrap_or_else(|p| p.into_inner());
            match ORT_ENV.get() {
                Some(v) => v, // another thread loaded it meanwhile
                None => {
                    let v = load(explicit).map_err(|detail| Error::OrtLibrary { detail })?;
                    ORT_ENV.get_or_init(|| v)
                }
            }
        }
    };
    let path = &loaded.0;
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

/// The process's ONNX Runtime environment, loading the library by the default search if needed.
pub(crate) fn environment() -> Result<&'static ort::environment::Environment> {
    init_onnxruntime(None)?;
    match ORT_ENV.get() {
        Some((_, env)) => Ok(env),
        None => unreachable!("init_onnxruntime succeeded"),
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
                        "no library path given, ORT_DYLIB_PATH unset, and none of these exist: {}",
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

/// Hands memory the allocator keeps after a graph was freed back to the system: glibc returns
/// large (mapped) blocks at once but keeps freed heap pages, where a session's many smaller
/// allocations live (and, after large frees raise its mapping threshold, tensors of several
/// MB). On the SD-1.5-like bench pipeline this leaves 270 MB resident after the last graph
/// is freed instead of 410 MB.
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Element type of a float tensor where it crosses a graph's boundary: the network's
/// `sample`, and every float input and output of a pipeline's graphs (`encoder_hidden_states`,
/// the text encoder's hidden states, the VAE's latents and images). A graph converted to
/// float16 with float16 inputs and outputs (optimum's `--dtype fp16`, onnxconverter's
/// `keep_io_types=False`) takes and gives float16; the runtime's arrays stay f32 between
/// graphs, and only the boundary rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleType {
    F32,
    F16,
}

impl SampleType {
    /// The float type `ty` is, None for any other.
    fn of(ty: TensorElementType) -> Option<SampleType> {
        match ty {
            TensorElementType::Float32 => Some(SampleType::F32),
            TensorElementType::Float16 => Some(SampleType::F16),
            _ => None,
        }
    }

    /// The float type of `session`'s input `name` (of graph `path`), or a contract error
    /// naming what the graph declares instead.
    pub(crate) fn of_input(session: &Session, name: &str, path: &Path) -> Result<SampleType> {
        let contract = |detail: String| Error::Contract {
            path: path.into(),
            detail,
        };
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == name)
            .ok_or_else(|| contract(format!("the graph has no input named '{name}'")))?;
        match tensor_info(input.dtype()).and_then(|(ty, _)| SampleType::of(ty)) {
            Some(t) => Ok(t),
            None => Err(contract(format!(
                "input '{name}' is {}; expected float32 or float16",
                describe(input.dtype())
            ))),
        }
    }

    /// `x` as an input tensor of this type: f32 as it is (a view when its layout allows),
    /// f16 rounded from it.
    pub(crate) fn tensor<'a, D: ndarray::Dimension + 'static>(
        self,
        x: ndarray::ArrayView<'a, f32, D>,
        what: &str,
    ) -> Result<ort::session::SessionInputValue<'a>> {
        let what = format!("{what} tensor");
        Ok(match self {
            SampleType::F32 if x.is_standard_layout() => TensorRef::from_array_view(x)
                .map_err(Error::ort(what))?
                .into(),
            SampleType::F32 => Tensor::from_array(x.to_owned())
                .map_err(Error::ort(what))?
                .into(),
            SampleType::F16 => Tensor::from_array(x.mapv(f16::from_f32))
                .map_err(Error::ort(what))?
                .into(),
        })
    }
}

/// A float output of a graph as f32, whichever float type the graph gives (see
/// [`SampleType`]); `what` names it in errors.
pub(crate) fn output_f32(value: &ort::value::DynValue, what: &str) -> Result<ArrayD<f32>> {
    let what = format!("reading {what}");
    match value.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float16,
            ..
        } => Ok(value
            .try_extract_array::<f16>()
            .map_err(Error::ort(what))?
            .mapv(f16::to_f32)),
        _ => Ok(value
            .try_extract_array::<f32>()
            .map_err(Error::ort(what))?
            .to_owned()),
    }
}

/// An input's or output's type as ONNX tools write it, `float16 [?, 77, 32]` (`?`: a dynamic
/// axis), for contract errors.
pub(crate) fn describe(ty: &ValueType) -> String {
    let Some((ty, shape)) = tensor_info(ty) else {
        return format!("not a tensor ({ty})");
    };
    let name = match ty {
        TensorElementType::Float32 => "float32".to_string(),
        TensorElementType::Float16 => "float16".into(),
        TensorElementType::Float64 => "float64".into(),
        TensorElementType::Bfloat16 => "bfloat16".into(),
        TensorElementType::Bool => "bool".into(),
        TensorElementType::String => "string".into(),
        TensorElementType::Int8 => "int8".into(),
        TensorElementType::Int16 => "int16".into(),
        TensorElementType::Int32 => "int32".into(),
        TensorElementType::Int64 => "int64".into(),
        TensorElementType::Uint8 => "uint8".into(),
        TensorElementType::Uint16 => "uint16".into(),
        TensorElementType::Uint32 => "uint32".into(),
        TensorElementType::Uint64 => "uint64".into(),
        other => other.to_string(),
    };
    let dims: Vec<String> = shape
        .iter()
        .map(|&d| if d < 0 { "?".into() } else { d.to_string() })
        .collect();
    format!("{name} [{}]", dims.join(", "))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeType {
    I64,
    F32,
    F16,
}

/// Most intra-op threads a session may ask for.
pub const MAX_THREADS: usize = 1024;

/// Session options for opening a network.
#[derive(Debug, Clone, Default)]
pub struct NetworkOptions {
    /// Intra-op threads, at most [`MAX_THREADS`]. Default: 0, ONNX Runtime's choice.
    pub intra_threads: usize,
    /// Where the network runs. Default: [`Provider::Cpu`].
    pub provider: Provider,
    /// Run on the CPU (with a warning) when `provider` cannot be registered, instead of failing.
    /// Default: off.
    pub fallback_cpu: bool,
    /// Read the file into memory instead of mapping it (mapping lets an ORT-format file be used
    /// in place, weights included). Default: off.
    pub read_into_memory: bool,
    /// Text-to-image pipeline folders only (a single-file model refuses it): hold each graph
    /// only while it is needed, so the peak is that of the most demanding graph with its
    /// working memory instead of all graphs together with the U-Net's working memory. A
    /// run then encodes every prompt with the text encoder, frees it, samples every batch with
    /// the U-Net, frees it, and decodes the kept latents with the VAE decoder (the VAE encoder
    /// of an img2img or inpainting run is held only while it encodes); graphs are opened again by the next run
    /// that needs them. The U-Net runs one row per call (a guided sample's two rows apart), so
    /// its working memory is one row's; samples are the same as without it to float32
    /// rounding (on ONNX Runtime's CPU kernels, the same bytes). Default: off.
    pub low_memory: bool,
}

/// An ONNX Runtime execution provider.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Provider {
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs the `cuda` cargo feature and ONNX Runtime's CUDA build).
    Cuda { device_id: i32 },
    /// NVIDIA TensorRT (needs the `tensorrt` cargo feature); engines are cached in
    /// `engine_cache` when given, and built with fp16 kernels when `fp16`.
    TensorRt {
        device_id: i32,
        engine_cache: Option<PathBuf>,
        fp16: bool,
    },
}

impl std::str::FromStr for Provider {
    type Err = Error;

    /// `cpu`, `cuda` or `tensorrt`, on device 0 (see [`Provider::on_device`]); TensorRT without
    /// an engine cache or fp16 kernels.
    fn from_str(name: &str) -> Result<Provider> {
        Ok(match name {
            "cpu" => Provider::Cpu,
            "cuda" => Provider::Cuda { device_id: 0 },
            "tensorrt" => Provider::TensorRt {
                device_id: 0,
                engine_cache: None,
                fp16: false,
            },
            other => return Err(Error::unknown("provider", other, Provider::NAMES)),
        })
    }
}

impl Provider {
    /// The names [`str::parse`] takes.
    pub const NAMES: &'static [&'static str] = &["cpu", "cuda", "tensorrt"];

    /// The same provider on GPU `id` (the CPU has no device id).
    pub fn on_device(self, id: i32) -> Provider {
        match self {
            Provider::Cpu => Provider::Cpu,
            Provider::Cuda { .. } => Provider::Cuda { device_id: id },
            Provider::TensorRt {
                engine_cache, fp16, ..
            } => Provider::TensorRt {
                device_id: id,
                engine_cache,
                fp16,
            },
        }
    }

    /// The name [`str::parse`] takes.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda { .. } => "cuda",
            Provider::TensorRt { .. } => "tensorrt",
        }
    }

    /// The provider to register, or why this build cannot.
    fn dispatch(&self) -> std::result::Result<Option<ort::ep::ExecutionProviderDispatch>, String> {
        match self {
            Provider::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Provider::Cuda { device_id } => Ok(Some(
                ort::ep::CUDA::default()
                    .with_device_id(*device_id)
                    .build()
                    .error_on_failure(),
            )),
            #[cfg(feature = "tensorrt")]
            Provider::TensorRt {
                device_id,
                engine_cache,
                fp16,
            } => {
                let mut ep = ort::ep::TensorRT::default()
                    .with_device_id(*device_id)
                    .with_fp16(*fp16);
                if let Some(dir) = engine_cache {
                    ep = ep
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display());
                }
                Ok(Some(ep.build().error_on_failure()))
            }
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "this build of edgediff has no {} support; rebuild with `cargo build --release --features {}`",
                other.name(),
                other.name()
            )),
        }
    }
}

/// The model bytes a session was built from, kept alive as long as the session when ONNX
/// Runtime uses them in place (ORT-format files, mapped).
enum ModelBytes {
    None,
    Mapped(#[allow(dead_code)] memmap2::Mmap),
}

/// The tensors an .onnx graph keeps outside its file: ONNX external data, how a graph over
/// protobuf's 2 GB limit is stored (`model.onnx` with `model.onnx_data` beside it, as optimum
/// and `edgediff-export diffusers` write it). ONNX Runtime opens those files itself and
/// memory-maps them, their tensors used in place unless a kernel repacks them; it needs their
/// folder, as a graph given to it as bytes has none (or, with `read_into_memory`, their bytes).
struct ExternalData {
    folder: PathBuf,
    /// Each file the graph names, once: its location as written in the graph, and its path.
    files: Vec<(String, PathBuf)>,
    /// The largest tensor's bytes, as the graph's `length` entries give them.
    largest: u64,
}

/// The external-data entries in the bytes of an .onnx file: each `location` once, in order of
/// first mention, and the largest `length`. Each entry is a StringStringEntryProto serialised as
/// field 1 (the key) then field 2 (the value), which this finds without parsing the protobuf.
fn external_entries(bytes: &[u8]) -> (Vec<String>, u64) {
    static KEYS: OnceLock<regex::bytes::Regex> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        regex::bytes::Regex::new(r"(?-u)\x0a(?:\x08location|\x06length)\x12")
            .expect("a valid literal")
    });
    let (mut found, mut largest): (Vec<String>, u64) = (Vec::new(), 0);
    for m in keys.find_iter(bytes) {
        // The value's length, a varint.
        let (mut len, mut at) = (0usize, m.end());
        for shift in (0..35).step_by(7) {
            let Some(&b) = bytes.get(at) else { break };
            len |= ((b & 0x7f) as usize) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let Some(Ok(v)) = bytes
            .get(at..at.saturating_add(len))
            .map(std::str::from_utf8)
        else {
            continue;
        };
        if m.as_bytes()[1] == 6 {
            largest = largest.max(v.parse().unwrap_or(0));
        } else if !v.is_empty() && !found.iter().any(|f| f == v) {
            found.push(v.to_string());
        }
    }
    (found, largest)
}

impl ExternalData {
    /// The external data an .onnx file's `bytes` name, resolved beside `path` (for bytes given
    /// without a file, beside their label: the working directory for a bare one); None when
    /// they name none. ORT-format files (`ort_format`) keep every tensor inside. A file that is
    /// missing, or named outside that folder, is an error naming it.
    fn find(bytes: &[u8], ort_format: bool, path: &Path) -> Result<Option<ExternalData>> {
        if ort_format {
            return Ok(None);
        }
        let (locations, largest) = external_entries(bytes);
        if locations.is_empty() {
            return Ok(None);
        }
        let model_file = |detail: String| Error::ModelFile {
            path: path.into(),
            detail,
        };
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let folder = match parent {
            Some(p) => p.to_path_buf(),
            None => PathBuf::from("."),
        };
        let mut files = Vec::with_capacity(locations.len());
        for loc in locations {
            let rel = Path::new(&loc);
            let file = folder.join(rel);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(model_file(format!(
                    "its external data file {loc:?} is outside its folder; ONNX Runtime reads external data only from beside the graph"
                )));
            }
            if let Err(e) = std::fs::metadata(&file) {
                return Err(model_file(format!(
                    "it keeps its weights in the external data file {}, which cannot be opened ({e}); a graph over 2 GB stores them beside its .onnx file (ONNX external data): copy the two together",
                    file.display()
                )));
            }
            files.push((loc, file));
        }
        Ok(Some(ExternalData {
            folder,
            files,
            largest,
        }))
    }

    /// `builder` told where the files are, or handed their bytes when `read_into_memory`.
    fn apply(
        &self,
        mut builder: ort::session::builder::SessionBuilder,
        opts: &NetworkOptions,
        path: &Path,
    ) -> Result<ort::session::builder::SessionBuilder> {
        if !opts.read_into_memory {
            let folder = std::fs::canonicalize(&self.folder).unwrap_or(self.folder.clone());
            return builder
                .with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    folder.to_string_lossy(),
                )
                .map_err(|e| Error::ort("locating the external data")(e.into()));
        }
        if self.largest > i32::MAX as u64 {
            return Err(Error::ModelFile {
                path: path.into(),
                detail: format!(
                    "it is to be read into memory (--no-mmap), but ONNX Runtime takes external data handed over in memory only for tensors up to 2 GiB, and one of its tensors has {} bytes; open it mapped",
                    self.largest
                ),
            });
        }
        for (loc, file) in &self.files {
            let bytes = read_shared(file).map_err(|e| Error::ModelFile {
                path: path.into(),
                detail: format!("reading its external data {}: {e}", file.display()),
            })?;
            builder = builder
                .with_external_initializer_file_in_memory(loc, bytes)
                .map_err(|e| Error::ort("passing the external data")(e.into()))?;
        }
        Ok(builder)
    }

    /// `fingerprint` (the graph file's) extended by each data file's length and ends (its first
    /// and last MiB, as `job::model_fingerprint` samples a graph file): they hold the weights.
    fn fingerprint(&self, fingerprint: String, path: &Path) -> Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        const END: u64 = 1 << 20;
        let mut h = crate::job::Fnv::default();
        h.update(fingerprint.as_bytes());
        for (_, file) in &self.files {
            let io = |e: std::io::Error| Error::ModelFile {
                path: path.into(),
                detail: format!("reading its external data {}: {e}", file.display()),
            };
            let mut f = std::fs::File::open(file).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            let mut buf = Vec::with_capacity(2 * END as usize);
            (&mut f).take(END).read_to_end(&mut buf).map_err(io)?;
            f.seek(SeekFrom::Start(len.saturating_sub(END)))
                .map_err(io)?;
            f.take(END).read_to_end(&mut buf).map_err(io)?;
            h.update(&len.to_le_bytes()).update(&buf);
        }
        Ok(h.hex())
    }
}

/// The bytes of `file` in one shared buffer, read into it (not read, then copied into it).
fn read_shared(file: &Path) -> std::io::Result<std::sync::Arc<[u8]>> {
    use std::io::Read;
    let mut f = std::fs::File::open(file)?;
    let len = usize::try_from(f.metadata()?.len())
        .map_err(|_| std::io::Error::other("larger than this machine's address space"))?;
    // SAFETY: zeroed memory is a valid [u8].
    let mut buf = unsafe { std::sync::Arc::<[u8]>::new_zeroed_slice(len).assume_init() };
    let Some(bytes) = std::sync::Arc::get_mut(&mut buf) else {
        unreachable!("a new Arc has one owner")
    };
    f.read_exact(bytes)?;
    Ok(buf)
}

/// An opened ONNX network obeying the model contract.
pub struct Network {
    // Declared before `_bytes` so the session is dropped first. None once released
    // ([`Network::release`]); the next run opens it again.
    session: Option<Session>,
    _bytes: ModelBytes,
    sample_type: SampleType,
    time_type: TimeType,
    /// `timestep` is a scalar (rank 0), one time for the whole batch, as optimum exports a
    /// U-Net; a batch whose samples are at different times then runs one sample per call.
    scalar_time: bool,
    has_class_labels: bool,
    /// `[L, D]` of the `encoder_hidden_states` input (-1 where dynamic), when the graph has it.
    pub(crate) context_shape: Option<[i64; 2]>,
    /// Element type of `encoder_hidden_states` (float32 when the graph has none).
    context_type: SampleType,
    /// The width of the optional `timestep_cond` input `[N, D]` (-1 where dynamic): LCM's
    /// guidance-scale embedding, which the U-Net adds to its time embedding.
    pub(crate) timestep_cond_width: Option<i64>,
    /// Element type of `timestep_cond` (float32 when the graph has none).
    timestep_cond_type: SampleType,
    /// The width the embedding is made for, once the model has checked the declared one
    /// (against the U-Net's config where the graph leaves it dynamic).
    pub(crate) timestep_cond_dim: Option<usize>,
    /// `[C, H, W]` as the graph declares it (-1 where dynamic).
    pub(crate) declared_shape: Vec<i64>,
    /// Input channels beyond the output's: an inpainting U-Net's mask and masked image
    /// latents, which the caller appends to the sample (0 for the model contract's networks).
    pub(crate) extra_channels: usize,
    /// Identifies the model file's bytes (see `job::model_fingerprint`).
    pub(crate) fingerprint: String,
    path: PathBuf,
    /// How it was opened, to open it again after a release; None when it came from bytes in
    /// memory (it is then never released).
    reopen: Option<NetworkOptions>,
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
    /// Whether the graph takes integer timesteps (fractional times are rounded before the call).
    pub fn integer_time(&self) -> bool {
        matches!(self.time_type, TimeType::I64)
    }

    /// Opens `path` and returns the network with its raw `edgediff` metadata string, if any.
    ///
    /// The file is memory-mapped, not read: pages come from the page cache on demand. An
    /// ORT-format file (`.ort`, written by `edgediff-export ort`) is then used in place, its
    /// weights included (zero copy, so its pages are shared by every process that maps it);
    /// an `.onnx` file is parsed from the mapping into ONNX Runtime's own buffers. The tensors
    /// of an `.onnx` file with external data (`model.onnx_data` beside it, for graphs over
    /// 2 GB) are mapped by ONNX Runtime itself and used in place where no kernel repacks them
    /// (with `read_into_memory` they are read and handed over instead).
    pub fn open(path: &Path, opts: &NetworkOptions) -> Result<(Network, Option<String>)> {
        let model_file = |detail: String| Error::ModelFile {
            path: path.into(),
            detail,
        };
        if opts.read_into_memory {
            let bytes = std::fs::read(path).map_err(|e| model_file(e.to_string()))?;
            let (mut net, raw) = Network::build(&bytes, ModelBytes::None, false, path, opts)?;
            log::debug!("graph opened: {}", path.display());
            // Read from a file, so low-memory mode may free it and read it again too.
            net.reopen = Some(opts.clone());
            return Ok((net, raw));
        }
        let file = std::fs::File::open(path).map_err(|e| model_file(e.to_string()))?;
        // SAFETY: the mapping is read-only and lives as long as the session; a file truncated
        // underneath a running process is the one hazard, as for any mapped executable.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| model_file(e.to_string()))?;
        let ort_format = map.get(4..8) == Some(b"ORTM");
        let (mut net, raw) = Network::build(&map, ModelBytes::None, ort_format, path, opts)?;
        log::debug!("graph opened: {}", path.display());
        net.reopen = Some(opts.clone());
        if ort_format {
            // Moving the Mmap does not move the mapped pages the session points into.
            net._bytes = ModelBytes::Mapped(map);
        }
        // An .onnx file's contents are parsed into ONNX Runtime's own buffers: its mapping is
        // dropped here, so its pages are not counted again for as long as the session lives.
        Ok((net, raw))
    }

    /// Frees the session (its weights and buffers) of a network opened from a file; the next
    /// [`Network::run`] opens the file again. A network opened from bytes in memory is kept.
    /// Returns whether it held one.
    pub(crate) fn release(&mut self) -> bool {
        if self.reopen.is_none() || self.session.is_none() {
            return false;
        }
        // The session before the bytes it may point into.
        self.session = None;
        self._bytes = ModelBytes::None;
        log::debug!("graph freed: {}", self.path.display());
        true
    }

    /// Opens the session again from the file after a [`Network::release`]; a file whose
    /// bytes or inputs changed since the model was opened is refused.
    fn ensure_open(&mut self) -> Result<()> {
        if self.session.is_none() {
            let Some(opts) = self.reopen.clone() else {
                unreachable!("only networks opened from a file are released")
            };
            let (net, _) = Network::open(&self.path, &opts)?;
            if net.fingerprint != self.fingerprint
                || net.sample_type != self.sample_type
                || net.time_type != self.time_type
                || net.scalar_time != self.scalar_time
                || net.context_shape != self.context_shape
                || net.context_type != self.context_type
                || net.timestep_cond_width != self.timestep_cond_width
                || net.timestep_cond_type != self.timestep_cond_type
                || net.declared_shape != self.declared_shape
            {
                return Err(Error::ModelFile {
                    path: self.path.clone(),
                    detail: "the file changed since the model was opened (low-memory mode opens it again for each run); open the model again".into(),
                });
            }
            self._bytes = net._bytes;
            self.session = net.session;
        }
        Ok(())
    }

    /// Opens a network from the bytes of an ONNX file; `path` only labels errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        opts: &NetworkOptions,
    ) -> Result<(Network, Option<String>)> {
        Network::build(bytes, ModelBytes::None, false, path, opts)
    }

    fn builder(
        opts: &NetworkOptions,
        in_place: bool,
    ) -> Result<ort::session::builder::SessionBuilder> {
        let env = environment()?;
        if opts.intra_threads > MAX_THREADS {
            // ONNX Runtime would try to start them all, and a run would crawl for minutes.
            return Err(Error::out_of_range(
                "threads",
                opts.intra_threads,
                &format!("must be in 0..={MAX_THREADS} (0: ONNX Runtime's choice)"),
            ));
        }
        let mut builder = Session::builder(env).map_err(Error::ort("creating a session"))?;
        if opts.intra_threads > 0 {
            builder = builder
                .with_intra_threads(opts.intra_threads)
                .map_err(|e| Error::ort("setting threads")(e.into()))?;
        }
        if in_place {
            for key in [
                "session.use_ort_model_bytes_directly",
                "session.use_ort_model_bytes_for_initializers",
            ] {
                builder = builder
                    .with_config_entry(key, "1")
                    .map_err(|e| Error::ort("enabling zero-copy loading")(e.into()))?;
            }
        }
        Ok(builder)
    }

    /// A CPU session for an auxiliary ONNX model outside the model contract (the classifier
    /// that judges samples), read into memory; `path` labels errors.
    pub(crate) fn plain_session(path: &Path, intra_threads: usize) -> Result<Session> {
        let bytes = std::fs::read(path).map_err(|e| Error::ModelFile {
            path: path.into(),
            detail: e.to_string(),
        })?;
        let opts = NetworkOptions {
            intra_threads,
            ..Default::default()
        };
        let mut builder = Network::builder(&opts, false)?;
        if let Some(external) = ExternalData::find(&bytes, false, path)? {
            builder = external.apply(builder, &opts, path)?;
        }
        builder
            .commit_from_memory(&bytes)
            .map_err(|e| Error::ModelFile {
                path: path.into(),
                detail: format!("ONNX Runtime cannot parse it as an ONNX model ({e})"),
            })
    }

    /// A session for one graph of a pipeline folder outside the denoiser contract (text
    /// encoder, VAE), on the same provider and threads as the U-Net. The file is mapped while
    /// ONNX Runtime parses it into its own buffers.
    pub(crate) fn graph_session(path: &Path, opts: &NetworkOptions) -> Result<Session> {
        let model_file = |detail: String| Error::ModelFile {
            path: path.into(),
            detail,
        };
        let file = std::fs::File::open(path).map_err(|e| model_file(e.to_string()))?;
        // SAFETY: read-only mapping, used only during this call (ONNX Runtime copies an .onnx
        // file's contents while parsing it).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| model_file(e.to_string()))?;
        Network::session(&map, false, path, opts)
    }

    /// A session on `opts.provider` (or the CPU when it is unavailable and `fallback_cpu`).
    fn session(
        bytes: &[u8],
        in_place: bool,
        path: &Path,
        opts: &NetworkOptions,
    ) -> Result<Session> {
        let external = ExternalData::find(bytes, in_place, path)?;
        Network::session_with(bytes, in_place, path, opts, external.as_ref())
    }

    /// [`Network::session`] for a graph whose external data was found already.
    fn session_with(
        bytes: &[u8],
        in_place: bool,
        path: &Path,
        opts: &NetworkOptions,
        external: Option<&ExternalData>,
    ) -> Result<Session> {
        let fallback = |why: String| -> Result<ort::session::builder::SessionBuilder> {
            if !opts.fallback_cpu {
                return Err(Error::Provider {
                    provider: opts.provider.name(),
                    detail: why,
                });
            }
            log::warn!(
                "{} provider unavailable ({why}); running on the CPU, as the CPU fallback allows",
                opts.provider.name()
            );
            Network::builder(opts, in_place)
        };
        let builder = Network::builder(opts, in_place)?;
        let mut builder = match opts.provider.dispatch() {
            Ok(None) => builder,
            Ok(Some(ep)) => match builder.with_execution_providers([ep]) {
                Ok(b) => b,
                Err(e) => {
                    let lib = match ORT_ENV.get() {
                        Some((path, _)) => path.display().to_string(),
                        None => "the loaded one".into(),
                    };
                    fallback(format!(
                        "{e} The ONNX Runtime library ({lib}) must be a GPU build: the onnxruntime-gpu wheel's libonnxruntime.so with libonnxruntime_providers_{}.so beside it, and CUDA 13/cuDNN 9 (and TensorRT for tensorrt) on the library path; give its path as the ONNX Runtime library (ort_lib).",
                        opts.provider.name()
                    ))?
                }
            },
            Err(why) => fallback(why)?,
        };
        if let Some(external) = external {
            builder = external.apply(builder, opts, path)?;
        }
        builder
            .commit_from_memory(bytes)
            .map_err(|e| Error::ModelFile {
                path: path.into(),
                detail: format!("ONNX Runtime cannot parse it as an ONNX model ({e})"),
            })
    }

    fn build(
        bytes: &[u8],
        keep: ModelBytes,
        in_place: bool,
        path: &Path,
        opts: &NetworkOptions,
    ) -> Result<(Network, Option<String>)> {
        let external = ExternalData::find(bytes, in_place, path)?;
        let session = Network::session_with(bytes, in_place, path, opts, external.as_ref())?;
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
        let sample_type = SampleType::of_input(&session, "sample", path)?;
        let sshape = tensor_info(sample.dtype()).map_or(Vec::new(), |(_, s)| s);
        if sshape.len() != 4 {
            return Err(contract(format!(
                "input 'sample' has rank {}; expected [N, C, H, W]",
                sshape.len()
            )));
        }
        let timestep = find("timestep")
            .ok_or_else(|| contract("the graph has no input named 'timestep'".into()))?;
        let timestep_info = tensor_info(timestep.dtype());
        let scalar_time = matches!(&timestep_info, Some((_, shape)) if shape.is_empty());
        let time_type = match timestep_info.map(|(t, _)| t) {
            Some(TensorElementType::Int64) => TimeType::I64,
            Some(TensorElementType::Float32) => TimeType::F32,
            Some(TensorElementType::Float16) => TimeType::F16,
            _ => {
                return Err(contract(format!(
                    "input 'timestep' is {}; expected int64, float32 or float16",
                    describe(timestep.dtype())
                )))
            }
        };
        let has_class_labels = find("class_labels").is_some();
        let (context_shape, context_type) = match find("encoder_hidden_states") {
            None => (None, SampleType::F32),
            Some(input) => match tensor_info(input.dtype()) {
                Some((ty, shape)) if shape.len() == 3 && SampleType::of(ty).is_some() => (
                    Some([shape[1], shape[2]]),
                    SampleType::of_input(&session, "encoder_hidden_states", path)?,
                ),
                _ => {
                    return Err(contract(format!(
                    "input 'encoder_hidden_states' is {}; expected float32 or float16 [N, L, D]",
                    describe(input.dtype())
                )))
                }
            },
        };
        let (timestep_cond_width, timestep_cond_type) = match find("timestep_cond") {
            None => (None, SampleType::F32),
            Some(input) => match tensor_info(input.dtype()) {
                Some((ty, shape)) if shape.len() == 2 && SampleType::of(ty).is_some() => (
                    Some(shape[1]),
                    SampleType::of_input(&session, "timestep_cond", path)?,
                ),
                _ => {
                    return Err(contract(format!(
                        "input 'timestep_cond' is {}; expected float32 or float16 [N, D] (the guidance-scale embedding)",
                        describe(input.dtype())
                    )))
                }
            },
        };
        if has_class_labels && context_shape.is_some() {
            return Err(contract(
                "the graph takes both 'class_labels' and 'encoder_hidden_states'; the contract allows one conditioning".into(),
            ));
        }
        let known = [
            "sample",
            "timestep",
            "class_labels",
            "encoder_hidden_states",
            "timestep_cond",
        ];
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
            session: Some(session),
            _bytes: keep,
            sample_type,
            time_type,
            scalar_time,
            has_class_labels,
            context_shape,
            context_type,
            timestep_cond_width,
            timestep_cond_type,
            timestep_cond_dim: None,
            declared_shape,
            extra_channels: 0,
            fingerprint: crate::job::model_fingerprint(bytes),
            path: path.into(),
            reopen: None,
        };
        match &external {
            None => Ok((net, raw_meta)),
            // The weights are in the data files: they are part of what the model is.
            Some(ext) => {
                let fingerprint = ext.fingerprint(net.fingerprint.clone(), path)?;
                Ok((Network { fingerprint, ..net }, raw_meta))
            }
        }
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
    /// mapped by the caller); integer inputs get it rounded. `context` is the
    /// `encoder_hidden_states` `[N, L, D]` of a text-conditioned graph, one row per sample;
    /// `timestep_cond` the one `[D]` row every sample's `timestep_cond` gets, for a
    /// graph that takes it. The output is shaped like `x`, less the extra input channels of an
    /// inpainting U-Net (which `x` then holds after the latents).
    pub fn run(
        &mut self,
        x: ArrayView4<f32>,
        time: &[f64],
        class_labels: Option<&[i64]>,
        context: Option<ArrayView3<f32>>,
        timestep_cond: Option<ArrayView1<f32>>,
    ) -> Result<Array4<f32>> {
        let n = x.shape()[0];
        debug_assert_eq!(time.len(), n);
        // One time per call (a scalar timestep), or low-memory mode's one row per call (the
        // working memory of a U-Net call grows with its rows; guidance doubles them): each
        // sample on its own, then the batch put back together.
        let one_time = self.scalar_time && time.iter().any(|&t| t != time[0]);
        let low_memory = self.reopen.as_ref().is_some_and(|o| o.low_memory);
        if n > 1 && (one_time || low_memory) {
            let outs = (0..n)
                .map(|i| {
                    self.run(
                        x.slice(s![i..i + 1, .., .., ..]),
                        &time[i..i + 1],
                        class_labels.map(|l| &l[i..i + 1]),
                        context.map(|c| c.slice_move(s![i..i + 1, .., ..])),
                        timestep_cond,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
            return ndarray::concatenate(Axis(0), &views)
                .map_err(|e| Error::invalid(format!("joining the batch: {e}")));
        }
        let mut inputs: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::with_capacity(3);
        inputs.push(("sample".into(), self.sample_type.tensor(x, "sample")?));
        let t: ArrayD<f64> = if self.scalar_time {
            ndarray::arr0(time.first().copied().unwrap_or(0.0)).into_dyn()
        } else {
            Array1::from_iter(time.iter().copied()).into_dyn()
        };
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
            let labels =
                class_labels.ok_or_else(|| Error::invalid("this model needs class labels"))?;
            inputs.push((
                "class_labels".into(),
                Tensor::from_array(Array1::from_iter(labels.iter().copied()))
                    .map_err(Error::ort("class_labels tensor"))?
                    .into(),
            ));
        }
        if self.context_shape.is_some() {
            let c =
                context.ok_or_else(|| Error::invalid("this model needs encoder_hidden_states"))?;
            if c.shape()[0] != n {
                return Err(Error::invalid(format!(
                    "encoder_hidden_states has {} rows for a batch of {n}",
                    c.shape()[0]
                )));
            }
            inputs.push((
                "encoder_hidden_states".into(),
                self.context_type.tensor(c, "encoder_hidden_states")?,
            ));
        }
        let rows;
        if self.timestep_cond_width.is_some() {
            let row = timestep_cond.ok_or_else(|| {
                Error::invalid("this model needs timestep_cond (the guidance-scale embedding)")
            })?;
            rows = row
                .broadcast((n, row.len()))
                .ok_or_else(|| Error::invalid("timestep_cond shape"))?
                .to_owned();
            inputs.push((
                "timestep_cond".into(),
                self.timestep_cond_type
                    .tensor(rows.view(), "timestep_cond")?,
            ));
        }
        self.ensure_open()?;
        let Some(session) = self.session.as_mut() else {
            unreachable!("opened by ensure_open")
        };
        let outputs = session
            .run(inputs)
            .map_err(Error::ort("running the network"))?;
        let arr = output_f32(&outputs[0], "the output")?
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::Contract {
                path: self.path.clone(),
                detail: "the output is not rank 4 [N, C, H, W]".into(),
            })?;
        let mut want = x.shape().to_vec();
        want[1] = want[1].saturating_sub(self.extra_channels);
        if arr.shape() != want.as_slice() {
            return Err(Error::Contract {
                path: self.path.clone(),
                detail: if self.extra_channels == 0 {
                    format!(
                        "output shape {:?} differs from sample shape {:?}",
                        arr.shape(),
                        x.shape()
                    )
                } else {
                    format!(
                        "output shape {:?} differs from {want:?} (the input {:?} less its {} mask and masked-image channels)",
                        arr.shape(),
                        x.shape(),
                        self.extra_channels
                    )
                },
            });
        }
        Ok(arr)
    }
}

#[cfg(test)]
mod external_data_tests {
    use super::*;

    /// One external-data entry as protobuf serialises it: key "location", then the value.
    fn entry(value: &str) -> Vec<u8> {
        let mut b = b"\x0a\x08location\x12".to_vec();
        let mut len = value.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            b.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        b.extend_from_slice(value.as_bytes());
        b.extend_from_slice(b"\x0a\x06offset\x12\x010");
        b
    }

    #[test]
    fn locations_are_found_once_each_with_long_names_too() {
        let long = "d".repeat(200) + ".bin"; // a two-byte length
        let mut bytes = b"\x08\x07junk".to_vec();
        for v in ["model.onnx_data", &long, "model.onnx_data"] {
            bytes.extend(entry(v));
            bytes.extend_from_slice(&[0u8, 1, 2, 3]);
        }
        bytes.extend_from_slice(b"\x0a\x06length\x12\x0a2150400000");
        assert_eq!(
            external_entries(&bytes),
            (vec!["model.onnx_data".to_string(), long], 2_150_400_000)
        );
        assert!(external_entries(b"no external data here").0.is_empty());
        // Cut off inside the value: not a location.
        let cut = entry("model.onnx_data");
        assert!(external_entries(&cut[..cut.len() - 20]).0.is_empty());
    }

    #[test]
    fn a_missing_or_escaping_data_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let graph = dir.path().join("model.onnx");
        let err = ExternalData::find(&entry("model.onnx_data"), false, &graph)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.onnx_data, which cannot be opened"),
            "{err}"
        );
        let err = ExternalData::find(&entry("../w.bin"), false, &graph)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is outside its folder"), "{err}");
        std::fs::write(dir.path().join("model.onnx_data"), [0u8; 8]).unwrap();
        let found = ExternalData::find(&entry("model.onnx_data"), false, &graph)
            .unwrap()
            .unwrap();
        assert_eq!(found.files.len(), 1);
        // ORT-format files keep their tensors inside: not looked at.
        assert!(ExternalData::find(&entry("x"), true, &graph)
            .unwrap()
            .is_none());
    }
}
