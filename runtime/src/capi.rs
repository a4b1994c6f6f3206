//! The C interface (`include/edgediff.h`): opaque handles, status codes, a thread-local error
//! message, and no panic ever crossing the boundary (every entry point runs under
//! `catch_unwind`). See the header for the contract of each function.

#![allow(clippy::single_range_in_vec_init)] // one range of samples: all of them

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::Array4;

use crate::backend::{NetworkOptions, Provider};
use crate::error::Error;
use crate::generate::{generate_chunks, SampleOptions};
use crate::model::Model;
use crate::output::generate_to_path;
use crate::sampler::{SamplerParams, SamplerKind};
use crate::spacing::Spacing;

/// Status codes (the CLI's exit codes, plus the C-only ones).
pub const EDGEDIFF_OK: c_int = 0;
pub const EDGEDIFF_ERR_ARGUMENT: c_int = 2;
pub const EDGEDIFF_ERR_MODEL: c_int = 3;
pub const EDGEDIFF_ERR_IO: c_int = 4;
pub const EDGEDIFF_ERR_NONFINITE: c_int = 5;
pub const EDGEDIFF_ERR_CANCELLED: c_int = 6;
pub const EDGEDIFF_ERR_PANIC: c_int = 7;

/// Addresses of the live handles. Every call checks its handles here, so a freed (or never
/// opened) handle is an argument error instead of a use after free, and a double free does
/// nothing; only an address reused by a newer handle of the same kind goes undetected.
static LIVE_MODELS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());
static LIVE_REQUESTS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

fn live(set: &Mutex<BTreeSet<usize>>) -> std::sync::MutexGuard<'_, BTreeSet<usize>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

/// Boxes `value` into a live handle of the kind `set` tracks.
fn register<T>(set: &Mutex<BTreeSet<usize>>, value: T) -> *mut T {
    let p = Box::into_raw(Box::new(value));
    live(set).insert(p as usize);
    p
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &Error) -> c_int {
    match e {
        Error::Cancelled => EDGEDIFF_ERR_CANCELLED,
        other => other.exit_code(),
    }
}

/// Runs `f`, turning errors and panics into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            EDGEDIFF_OK
        }
        Ok(Err(e)) => {
            set_error(&e.to_string());
            status_of(&e)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_error(&format!(
                "internal error (a bug in edgediff; please report it): {what}"
            ));
            EDGEDIFF_ERR_PANIC
        }
    }
}

fn arg(msg: &str) -> Error {
    Error::invalid(msg)
}

/// A C string argument as UTF-8; NULL and invalid UTF-8 are argument errors.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(arg(&format!("{what} is NULL")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| arg(&format!("{what} is not valid UTF-8")))
}

/// An opened model. Runs on one handle are serialised by its lock; open one handle per thread
/// to run in parallel.
pub struct EdgediffModel {
    model: Mutex<Model>,
}

/// Progress callback: `(steps done, total steps, user pointer)`; a non-zero return cancels.
pub type EdgediffProgress = Option<unsafe extern "C" fn(usize, usize, *mut c_void) -> c_int>;

/// A sampling request: sampler, steps, seed and the rest, with the CLI's defaults.
pub struct EdgediffRequest {
    sampler: String,
    steps: usize,
    spacing: Spacing,
    eta: Option<f64>,
    order: Option<usize>,
    seed: u64,
    n: usize,
    batch_size: usize,
    class: Option<i64>,
    guidance: Option<f64>,
    progress: EdgediffProgress,
    user: *mut c_void,
}

impl EdgediffRequest {
    fn options(&self) -> Result<SampleOptions, Error> {
        let sampler = SamplerKind::new(
            &self.sampler,
            SamplerParams {
                eta: self.eta,
                order: self.order,
                ..Default::default()
            },
        )?;
        Ok(SampleOptions {
            sampler,
            steps: self.steps,
            spacing: self.spacing,
            n: self.n,
            batch_size: self.batch_size,
            seed: self.seed,
            class_label: self.class,
            guidance: self.guidance,
            ..Default::default()
        })
    }

    /// The options of a run, with the flag its progress callback sets to cancel it.
    fn run_options(&self) -> Result<(SampleOptions, Arc<AtomicBool>), Error> {
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = SampleOptions {
            cancel: Some(cancel.clone()),
            ..self.options()?
        };
        Ok((opts, cancel))
    }

    /// A progress closure calling the C callback; a non-zero answer sets `cancel`.
    fn progress<'a>(&'a self, cancel: &'a AtomicBool) -> impl FnMut(usize, usize) + 'a {
        move |done, total| {
            if let Some(cb) = self.progress {
                // SAFETY: the caller registered `cb` with `user` for this request.
                if unsafe { cb(done, total, self.user) } != 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn edgediff_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread ("" after a success); valid until the
/// thread's next edgediff call.
#[no_mangle]
pub extern "C" fn edgediff_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Loads ONNX Runtime from `path`, or from the default search when NULL.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn edgediff_init(path: *const c_char) -> c_int {
    guard(|| {
        let p = if path.is_null() {
            None
        } else {
            Some(PathBuf::from(text(path, "path")?))
        };
        crate::backend::init_onnxruntime(p.as_deref()).map(|_| ())
    })
}

/// Opens a model file (NULL: the embedded default model) on `provider` ("cpu", "cuda",
/// "tensorrt"; NULL is "cpu"); with `fallback_cpu` non-zero an unavailable provider falls back
/// to the CPU. Calls `edgediff_init(NULL)` first if ONNX Runtime is not loaded yet.
///
/// # Safety
/// `path` and `provider` are NULL or NUL-terminated; `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_open(
    path: *const c_char,
    provider: *const c_char,
    device_id: c_int,
    fallback_cpu: c_int,
    out: *mut *mut EdgediffModel,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        *out = std::ptr::null_mut();
        let provider = match (!provider.is_null())
            .then(|| text(provider, "provider"))
            .transpose()?
        {
            None | Some("cpu") => Provider::Cpu,
            Some("cuda") => Provider::Cuda { device_id },
            Some("tensorrt") => Provider::TensorRt {
                device_id,
                engine_cache: None,
                fp16: false,
            },
            Some(other) => return Err(arg(&format!("unknown provider '{other}'"))),
        };
        let opts = NetworkOptions {
            provider,
            fallback_cpu: fallback_cpu != 0,
            ..Default::default()
        };
        crate::backend::init_onnxruntime(None)?;
        let model = if path.is_null() {
            Model::open_default(&opts)?
        } else {
            Model::open_with(text(path, "path")?, &opts)?
        };
        *out = register(
            &LIVE_MODELS,
            EdgediffModel {
                model: Mutex::new(model),
            },
        );
        Ok(())
    })
}

/// Opens a model from `len` bytes of an ONNX file in memory (copied; the buffer may be freed
/// after the call).
///
/// # Safety
/// `data` points to `len` readable bytes; `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_open_memory(
    data: *const u8,
    len: usize,
    out: *mut *mut EdgediffModel,
) -> c_int {
    guard(|| {
        if out.is_null() || data.is_null() {
            return Err(arg("data or out is NULL"));
        }
        *out = std::ptr::null_mut();
        crate::backend::init_onnxruntime(None)?;
        let bytes = std::slice::from_raw_parts(data, len);
        let model = Model::from_bytes(bytes, "<memory>", &NetworkOptions::default())?;
        *out = register(
            &LIVE_MODELS,
            EdgediffModel {
                model: Mutex::new(model),
            },
        );
        Ok(())
    })
}

/// Frees a model (NULL is allowed and does nothing).
///
/// # Safety
/// `model` is NULL or a handle from `edgediff_model_open*` not freed before.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_free(model: *mut EdgediffModel) {
    if !model.is_null() && live(&LIVE_MODELS).remove(&(model as usize)) {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

unsafe fn model_ref<'a>(m: *const EdgediffModel) -> Result<&'a EdgediffModel, Error> {
    if m.is_null() {
        return Err(arg("model is NULL"));
    }
    if !live(&LIVE_MODELS).contains(&(m as usize)) {
        return Err(arg("model is not a live handle (freed, or never opened)"));
    }
    Ok(&*m)
}

fn lock(m: &EdgediffModel) -> std::sync::MutexGuard<'_, Model> {
    // A panic inside a run poisons the lock; the model itself is still usable.
    m.model.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the sample shape [C, H, W] into `shape`.
///
/// # Safety
/// `model` is a valid handle; `shape` points to 3 writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_sample_shape(
    model: *const EdgediffModel,
    shape: *mut usize,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        if shape.is_null() {
            return Err(arg("shape is NULL"));
        }
        let s = lock(m).metadata().sample_shape;
        std::ptr::copy_nonoverlapping(s.as_ptr(), shape, 3);
        Ok(())
    })
}

/// Copies the model's metadata as JSON (NUL-terminated) into `buf` of `cap` bytes; `needed`
/// (if not NULL) receives the size including the NUL. A too small `buf` is an argument error.
///
/// # Safety
/// `model` is a valid handle; `buf` points to `cap` writable bytes (or is NULL with cap 0).
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_metadata_json(
    model: *const EdgediffModel,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        let json = serde_json::to_string(lock(m).metadata()).map_err(|e| arg(&e.to_string()))?;
        let need = json.len() + 1;
        if !needed.is_null() {
            *needed = need;
        }
        if buf.is_null() || cap < need {
            return Err(arg(&format!(
                "the buffer holds {cap} bytes; {need} are needed"
            )));
        }
        std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast(), json.len());
        *buf.add(json.len()) = 0;
        Ok(())
    })
}

/// A new request with the CLI's defaults (ddim, 100 steps, trailing, seed 0, n 16, batch 64).
///
/// # Safety
/// `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_new(out: *mut *mut EdgediffRequest) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        *out = register(
            &LIVE_REQUESTS,
            EdgediffRequest {
                sampler: "ddim".into(),
                steps: 100,
                spacing: Spacing::Trailing,
                eta: None,
                order: None,
                seed: 0,
                n: 16,
                batch_size: 64,
                class: None,
                guidance: None,
                progress: None,
                user: std::ptr::null_mut(),
            },
        );
        Ok(())
    })
}

/// Frees a request (NULL is allowed).
///
/// # Safety
/// `req` is NULL or a handle from `edgediff_request_new` not freed before.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_free(req: *mut EdgediffRequest) {
    if !req.is_null() && live(&LIVE_REQUESTS).remove(&(req as usize)) {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(req))));
    }
}

fn check_request(r: *const EdgediffRequest) -> Result<(), Error> {
    if r.is_null() {
        return Err(arg("request is NULL"));
    }
    if !live(&LIVE_REQUESTS).contains(&(r as usize)) {
        return Err(arg(
            "request is not a live handle (freed, or never created)",
        ));
    }
    Ok(())
}

unsafe fn req_mut<'a>(r: *mut EdgediffRequest) -> Result<&'a mut EdgediffRequest, Error> {
    check_request(r)?;
    Ok(&mut *r)
}

unsafe fn req_ref<'a>(r: *const EdgediffRequest) -> Result<&'a EdgediffRequest, Error> {
    check_request(r)?;
    Ok(&*r)
}

/// Sets a request parameter by name: "sampler", "spacing" (text), "steps", "n", "batch_size",
/// "seed", "order" (integers), "eta", "guidance" (numbers), "class" (integer; negative:
/// unconditional).
/// The value is given as text, e.g. `edgediff_request_set(req, "steps", "50")`.
///
/// # Safety
/// `req` is a valid handle; `key` and `value` are NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_set(
    req: *mut EdgediffRequest,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    guard(|| {
        let r = req_mut(req)?;
        let (key, value) = (text(key, "key")?, text(value, "value")?);
        // One parser for every number; the message names the key and the kind expected.
        fn num<T: std::str::FromStr>(key: &str, v: &str, kind: &str) -> Result<T, Error> {
            v.trim()
                .parse()
                .map_err(|_| arg(&format!("{key}: '{v}' is not {kind}")))
        }
        let size = |v: &str| -> Result<usize, Error> {
            usize::try_from(num::<i64>(key, v, "an integer")?)
                .map_err(|_| arg(&format!("{key}: '{v}' must not be negative")))
        };
        match key {
            "sampler" => {
                SamplerKind::new(value, SamplerParams::default())?;
                r.sampler = value.into();
            }
            "spacing" => r.spacing = value.parse()?,
            "steps" => r.steps = size(value)?,
            "n" => r.n = size(value)?,
            "batch_size" => r.batch_size = size(value)?,
            "seed" => r.seed = num(key, value, "an unsigned integer")?,
            "order" => r.order = Some(size(value)?),
            "eta" => r.eta = Some(num(key, value, "a number")?),
            "class" => r.class = Some(num::<i64>(key, value, "an integer")?).filter(|&k| k >= 0),
            "guidance" => r.guidance = Some(num(key, value, "a number")?),
            other => return Err(arg(&format!("unknown request parameter '{other}'"))),
        }
        Ok(())
    })
}

/// Sets the progress callback, called after every step with (done, total, user); returning
/// non-zero cancels the run, which then fails with EDGEDIFF_ERR_CANCELLED.
///
/// # Safety
/// `req` is a valid handle; `cb` (if any) is safe to call with `user` from the sampling thread.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_set_progress(
    req: *mut EdgediffRequest,
    cb: EdgediffProgress,
    user: *mut c_void,
) -> c_int {
    guard(|| {
        let r = req_mut(req)?;
        r.progress = cb;
        r.user = user;
        Ok(())
    })
}

/// Runs the request into `out`, `out_len` floats, which must hold n * C * H * W values
/// (samples in the model's data range, C order).
///
/// # Safety
/// `model` and `req` are valid handles; `out` points to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample(
    model: *const EdgediffModel,
    req: *const EdgediffRequest,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        let r = req_ref(req)?;
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        let mut model = lock(m);
        let [c, h, w] = model.metadata().sample_shape;
        let need = r.n * c * h * w;
        if out_len < need {
            return Err(arg(&format!(
                "out holds {out_len} floats; {} samples of [{c}, {h}, {w}] need {need}",
                r.n
            )));
        }
        let (opts, cancel) = r.run_options()?;
        let dst = std::slice::from_raw_parts_mut(out, need);
        let per = c * h * w;
        let mut progress = r.progress(&cancel);
        generate_chunks(
            &mut model,
            &opts,
            None,
            &[0..r.n],
            &mut progress,
            &mut |first, x: Array4<f32>| {
                let x = x.as_standard_layout();
                dst[first * per..first * per + x.len()]
                    .copy_from_slice(x.as_slice().expect("standard layout"));
                Ok(())
            },
        )?;
        Ok(())
    })
}

/// Runs the request into a file: a `.png` grid, a `.npy` array, or a folder of PNGs, exactly
/// as `edgediff sample --out` writes them.
///
/// # Safety
/// `model` and `req` are valid handles; `path` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample_to_file(
    model: *const EdgediffModel,
    req: *const EdgediffRequest,
    path: *const c_char,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        let r = req_ref(req)?;
        let path = PathBuf::from(text(path, "path")?);
        let mut model = lock(m);
        let (opts, cancel) = r.run_options()?;
        let mut progress = r.progress(&cancel);
        generate_to_path(&mut model, &opts, None, &path, false, &mut progress)?;
        Ok(())
    })
}

/// Inpaints `n` images (`images`, n * C * H * W floats in the data range) where `masks`
/// (n * H * W floats, 1 = fill, 0 = keep) says, into `out` (n * C * H * W floats), with the
/// request's sampler, steps and seed; `jumps`/`resample` as in `edgediff inpaint`.
///
/// # Safety
/// `model` and `req` are valid handles; the buffers hold the sizes stated.
#[no_mangle]
pub unsafe extern "C" fn edgediff_inpaint(
    model: *const EdgediffModel,
    req: *const EdgediffRequest,
    images: *const f32,
    masks: *const f32,
    n: usize,
    jumps: usize,
    resample: usize,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        let r = req_ref(req)?;
        if images.is_null() || masks.is_null() || out.is_null() {
            return Err(arg("images, masks or out is NULL"));
        }
        let mut model = lock(m);
        let [c, h, w] = model.metadata().sample_shape;
        if out_len < n * c * h * w {
            return Err(arg(&format!(
                "out holds {out_len} floats; {} are needed",
                n * c * h * w
            )));
        }
        let imgs = Array4::from_shape_vec(
            (n, c, h, w),
            std::slice::from_raw_parts(images, n * c * h * w).to_vec(),
        )
        .map_err(|e| arg(&e.to_string()))?;
        let mks = Array4::from_shape_vec(
            (n, 1, h, w),
            std::slice::from_raw_parts(masks, n * h * w).to_vec(),
        )
        .map_err(|e| arg(&e.to_string()))?;
        let (opts, cancel) = r.run_options()?;
        let mut progress = r.progress(&cancel);
        let (x, _) = crate::inpaint::inpaint(
            &mut model,
            &opts,
            &imgs,
            &mks,
            crate::inpaint::Resampling { jumps, resample },
            &mut progress,
        )?;
        let x = x.as_standard_layout();
        std::slice::from_raw_parts_mut(out, x.len())
            .copy_from_slice(x.as_slice().expect("standard layout"));
        Ok(())
    })
}

/// The result of `edgediff_elbo`, in bits per dimension (means over the images).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffElboResult {
    /// The negative ELBO.
    pub bits_per_dim: f64,
    /// Its standard error over images and draws (NaN for one image).
    pub standard_error: f64,
    /// The part due to the random draws alone (timesteps and noise; with all timesteps only
    /// the decoder's).
    pub mc_standard_error: f64,
    /// L_T.
    pub prior: f64,
    /// The sum of the KL terms L_1 .. L_{T-1}.
    pub kl: f64,
    /// L_0, the discretized decoder.
    pub reconstruction: f64,
}

/// The negative ELBO of `n` images (`images`: n * C * H * W floats in the model's data range,
/// on a 256-level grid, detected) with `timesteps_per_image` importance-sampled timesteps
/// (0: all timesteps), the request's seed, batch size and progress callback, into `out`.
///
/// # Safety
/// `model` and `req` are valid handles; `images` holds n * C * H * W floats; `out` is valid.
#[no_mangle]
pub unsafe extern "C" fn edgediff_elbo(
    model: *const EdgediffModel,
    req: *const EdgediffRequest,
    images: *const f32,
    n: usize,
    timesteps_per_image: usize,
    out: *mut EdgediffElboResult,
) -> c_int {
    guard(|| {
        let m = model_ref(model)?;
        let r = req_ref(req)?;
        if images.is_null() || out.is_null() {
            return Err(arg("images or out is NULL"));
        }
        let mut model = lock(m);
        let [c, h, w] = model.metadata().sample_shape;
        let count = n
            .checked_mul(c * h * w)
            .ok_or_else(|| arg("n * C * H * W overflows"))?;
        let imgs = ndarray::ArrayView4::from_shape(
            (n, c, h, w),
            std::slice::from_raw_parts(images, count),
        )
        .map_err(|e| arg(&e.to_string()))?;
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = crate::elbo::ElboOptions {
            timesteps: match timesteps_per_image {
                0 => crate::elbo::TimestepSampling::All,
                k => crate::elbo::TimestepSampling::Draws(k),
            },
            seed: r.seed,
            batch_size: r.batch_size,
            cancel: Some(cancel.clone()),
            ..Default::default()
        };
        let mut progress = r.progress(&cancel);
        let s = crate::elbo::elbo(&mut model, imgs, &opts, None, &mut progress)?.summary();
        *out = EdgediffElboResult {
            bits_per_dim: s.bits_per_dim,
            standard_error: s.standard_error.unwrap_or(f64::NAN),
            mc_standard_error: s.mc_standard_error.unwrap_or(f64::NAN),
            prior: s.prior,
            kl: s.kl,
            reconstruction: s.reconstruction,
        };
        Ok(())
    })
}
