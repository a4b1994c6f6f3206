//! The C interface (`include/edgediff.h`): opaque handles, typed parameter structs, status
//! codes, a thread-local error message, and no panic ever crossing the boundary (every entry
//! point runs under [`guard`]). See the header for the contract of each function.
//!
//! Every parameter struct begins with its own size (`struct_size`), which the header's inline
//! `*_init` functions set from the caller's `sizeof`. The library reads only the bytes that size
//! covers and takes its defaults for the rest, so a field added at the end in a later version
//! leaves programs built against the older header working. Each struct converts to its library
//! options in exactly one function ([`sample_options`], [`model_options`],
//! [`likelihood_options`], [`calibrate_options`]), and its defaults come from the library's own
//! `Default` impls: nothing here restates a default value.

#![allow(clippy::single_range_in_vec_init)] // one range of samples: all of them

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::{Array4, ArrayD};

use crate::backend::{NetworkOptions, Provider};
use crate::calibrate::file::CalibrationFile;
use crate::calibrate::CalibrateOptions;
use crate::denoiser::X0Clip;
use crate::error::Error;
use crate::generate::{generate_chunks, Report, SampleOptions};
use crate::likelihood::{LikelihoodOptions, OdeSolver, Probe};
use crate::model::{Model, ModelOptions, Shapes};
use crate::noise::InjectedNoise;
use crate::output::generate_to_path;
use crate::sampler::{SamplerKind, SamplerParams};
use crate::spacing::Spacing;

/// Status codes (the CLI's exit codes, plus the C-only ones).
pub const EDGEDIFF_OK: c_int = 0;
pub const EDGEDIFF_ERR_ARGUMENT: c_int = 2;
pub const EDGEDIFF_ERR_MODEL: c_int = 3;
pub const EDGEDIFF_ERR_IO: c_int = 4;
pub const EDGEDIFF_ERR_NONFINITE: c_int = 5;
pub const EDGEDIFF_ERR_CANCELLED: c_int = 6;
pub const EDGEDIFF_ERR_PANIC: c_int = 7;

/// The value of an integer sampler option (order, min_steps, max_steps) that means "the
/// sampler's default", and of `class_label` that means unconditional. Any negative value
/// does; init writes this one. Floating-point options use NaN for the same.
pub const EDGEDIFF_UNSET: i64 = -1;

// ---------------------------------------------------------------------------------------------
// Handles, errors and the panic guard
// ---------------------------------------------------------------------------------------------

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
    // Spelled out rather than passing exit_code() through, so a new exit code cannot become
    // a status the header does not define.
    match e.exit_code() {
        2 => EDGEDIFF_ERR_ARGUMENT,
        3 => EDGEDIFF_ERR_MODEL,
        4 => EDGEDIFF_ERR_IO,
        5 => EDGEDIFF_ERR_NONFINITE,
        6 => EDGEDIFF_ERR_CANCELLED,
        _ => EDGEDIFF_ERR_PANIC,
    }
}

/// How the C interface names a library option in messages: by the struct field (or function
/// argument) that sets it, which is the library's name but where one differs.
fn c_field(name: &str) -> String {
    match name {
        // SampleOptions::keep_latents is set by giving the buffer.
        "keep_latents" => "latents_out".into(),
        // SampleOptions::image_size is the pair of fields.
        "image_size" => "height/width".into(),
        other => other.into(),
    }
}

/// Runs `f`, turning errors and panics into a status and the thread's last error. Library
/// errors name options by their library names; [`c_field`] renders them as the C fields.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> c_int {
    if IN_CALLBACK.get() {
        set_error(REENTRY);
        return EDGEDIFF_ERR_ARGUMENT;
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            EDGEDIFF_OK
        }
        Ok(Err(e)) => {
            set_error(&e.message_with(&c_field));
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

thread_local! {
    /// Set while this thread runs a caller's progress callback.
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Why a call from inside a progress callback is refused: the run holds its model's lock
/// (a run on it would deadlock) and is using its request and buffers (freeing them would be
/// a use after free).
const REENTRY: &str = "called from inside a progress callback: edgediff functions (but edgediff_version and edgediff_last_error) cannot be called there; return from the callback first (a non-zero return cancels the run)";

/// Runs a caller's callback with re-entry into the library refused.
fn in_callback<R>(f: impl FnOnce() -> R) -> R {
    IN_CALLBACK.set(true);
    let out = f();
    IN_CALLBACK.set(false);
    out
}

fn arg(msg: &str) -> Error {
    Error::invalid(msg)
}

// ---------------------------------------------------------------------------------------------
// Reading caller memory
// ---------------------------------------------------------------------------------------------

/// A C string argument as UTF-8; NULL and invalid UTF-8 are argument errors.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(arg(&format!("{what} is NULL")));
    }
    // SAFETY: `p` is non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| arg(&format!("{what} is not valid UTF-8")))
}

/// An optional C string (NULL: None).
///
/// # Safety
/// As [`text`].
unsafe fn opt_text<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    unsafe { text(p, what) }.map(Some)
}

/// The product of sizes from caller input, or an argument error naming `what` on overflow.
fn count(dims: &[usize], what: &str) -> Result<usize, Error> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            arg(&format!("{what} = {} overflows", dims.join(" * ")))
        })
}

/// Refuses a slice of `len` values of `T` that no allocation can hold (slices may span at most
/// isize::MAX bytes), so a caller's absurd length is an error instead of undefined behaviour.
fn check_len<T>(len: usize, what: &str) -> Result<(), Error> {
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(arg(&format!("{what}: {len} values cannot fit in memory")));
    }
    Ok(())
}

/// `len` readable values at `p`.
///
/// # Safety
/// `p` is NULL or points to `len` initialised values of `T` that stay unchanged during `'a`.
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Error> {
    if p.is_null() {
        return Err(arg(&format!("{what} is NULL")));
    }
    check_len::<T>(len, what)?;
    // SAFETY: non-NULL, `len` values by the caller's contract, at most isize::MAX bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `len` writable values at `p`.
///
/// # Safety
/// `p` is NULL or points to `len` writable values of `T` nothing else accesses during `'a`.
unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Error> {
    if p.is_null() {
        return Err(arg(&format!("{what} is NULL")));
    }
    check_len::<T>(len, what)?;
    // SAFETY: non-NULL, `len` writable values by the caller's contract, at most isize::MAX
    // bytes, and not aliased during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// Writes `value` through `out` after checking it is not NULL.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T, what: &str) -> Result<(), Error> {
    if out.is_null() {
        return Err(arg(&format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and writable by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Structs that carry their own size
// ---------------------------------------------------------------------------------------------

/// A `#[repr(C)]` struct of the header that begins with `size_t struct_size`.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have `struct_size: usize` as their first field, and every
/// field is valid for any bit pattern (integers, floats, raw pointers, `Option` of function
/// pointers; enums are stored as `c_int`): the library copies callers' bytes into them.
unsafe trait SizedStruct: Copy {
    /// Its name in the header, for messages.
    const NAME: &'static str;
    /// The size of the first published version: the smallest `struct_size` accepted. Later
    /// versions append fields and keep this, so older programs' structs stay readable.
    const MIN_SIZE: usize;
}

/// Checks a caller's `struct_size` for `T`.
fn check_size<T: SizedStruct>(size: usize) -> Result<(), Error> {
    let max = std::mem::size_of::<T>();
    if size < T::MIN_SIZE || size > max {
        let allowed = format!(
            "is not a size of {} that edgediff {} knows ({}..={max} bytes): call {}_init first; a program built against a newer edgediff.h needs a newer library",
            T::NAME,
            crate::VERSION,
            T::MIN_SIZE,
            T::NAME
        );
        return Err(Error::out_of_range("struct_size", size, &allowed));
    }
    Ok(())
}

/// Writes the first `size` bytes of `value` (with `struct_size` = `size`) to `dst`: the part of
/// the struct a caller of that size knows.
///
/// # Safety
/// `dst` is NULL or points to `size` writable bytes.
unsafe fn write_prefix<T: SizedStruct>(
    dst: *mut T,
    mut value: T,
    size: usize,
) -> Result<(), Error> {
    if dst.is_null() {
        return Err(arg(&format!("the {} pointer is NULL", T::NAME)));
    }
    check_size::<T>(size)?;
    // SAFETY: the first field of every SizedStruct is `struct_size: usize`.
    unsafe { (&raw mut value).cast::<usize>().write(size) };
    // SAFETY: `dst` holds `size` writable bytes (caller), `value` at least `size` readable
    // ones (size <= size_of::<T>() was checked), and the two cannot overlap (`value` is ours).
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const value).cast::<u8>(), dst.cast::<u8>(), size)
    };
    Ok(())
}

/// The caller's `struct_size` at `src`, checked.
///
/// # Safety
/// `src` is NULL or points to a struct of the header's kind `T`, of any version.
unsafe fn size_of_struct<T: SizedStruct>(src: *const T) -> Result<usize, Error> {
    if src.is_null() {
        return Err(arg(&format!("the {} pointer is NULL", T::NAME)));
    }
    // SAFETY: every version of `T` begins with an aligned `size_t struct_size`.
    let size = unsafe { src.cast::<usize>().read() };
    check_size::<T>(size)?;
    Ok(size)
}

/// Reads a caller's struct: the bytes its `struct_size` covers, over `defaults` for the fields
/// an older caller does not have.
///
/// # Safety
/// `src` is NULL or points to `struct_size` readable bytes of a `T`.
unsafe fn read_prefix<T: SizedStruct>(src: *const T, defaults: T) -> Result<T, Error> {
    // SAFETY: forwarded from the caller.
    let size = unsafe { size_of_struct(src) }?;
    let mut out = defaults;
    // SAFETY: `src` holds `size` readable bytes (caller), `out` has room for them (size <=
    // size_of::<T>()), they do not overlap, and any bytes are valid for T's fields (the
    // SizedStruct contract).
    unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), (&raw mut out).cast::<u8>(), size) };
    Ok(out)
}

/// Fills `dst` (a caller's struct of `size` bytes) with `T`'s defaults.
///
/// # Safety
/// `dst` is NULL or points to `size` writable bytes.
unsafe fn init_sized<T: SizedStruct>(dst: *mut T, defaults: T, size: usize) -> c_int {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { write_prefix(dst, defaults, size) })
}

/// A NUL-terminated copy of a library name (a sampler's), kept for the life of the process so
/// the defaults of a struct can point at it.
fn static_name(name: &'static str) -> *const c_char {
    static NAMES: Mutex<BTreeMap<&'static str, CString>> = Mutex::new(BTreeMap::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    // A CString's buffer does not move when the map rebalances; entries are never removed.
    names
        .entry(name)
        .or_insert_with(|| CString::new(name).unwrap_or_default())
        .as_ptr()
}

/// NaN (the C convention for "unset") as None.
fn opt_f64(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

/// None as NaN.
fn f64_or_unset(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

/// A negative integer (the C convention for "unset") as None.
fn opt_usize(v: i64) -> Option<usize> {
    usize::try_from(v).ok()
}

/// None as [`EDGEDIFF_UNSET`].
fn usize_or_unset(v: Option<usize>) -> i64 {
    v.and_then(|v| i64::try_from(v).ok())
        .unwrap_or(EDGEDIFF_UNSET)
}

/// A C class label (negative: unconditional) as the library's.
fn class_of(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

// ---------------------------------------------------------------------------------------------
// C enums and their names
// ---------------------------------------------------------------------------------------------

/// The C names of an enum's values, index = value, as the library parses them.
/// `spacing` left to the model: a text-to-image pipeline's scheduler settings (spacing,
/// steps_offset, set_alpha_to_one), as `edgediff sample` without `--spacing`; the library's
/// default spacing for other models. The default of the struct.
pub const EDGEDIFF_SPACING_DEFAULT: c_int = -1;

const SPACINGS: [&CStr; 6] = [
    c"leading",
    c"trailing",
    c"linspace",
    c"karras",
    c"logsnr",
    c"lcm",
];
const PROVIDERS: [&CStr; 3] = [c"cpu", c"cuda", c"tensorrt"];
const X0_CLIPS: [&CStr; 3] = [c"none", c"range", c"dynamic"];
const X0_CLIP_NONE: c_int = 0;
const X0_CLIP_RANGE: c_int = 1;
const X0_CLIP_DYNAMIC: c_int = 2;
const ODE_SOLVERS: [&CStr; 2] = [c"rk4", c"adaptive"];
const PROBES: [&CStr; 2] = [c"rademacher", c"gaussian"];

/// The name of value `v` of the enum `names` lists, as a static C string (NULL if none).
fn enum_name(names: &[&'static CStr], v: c_int) -> *const c_char {
    usize::try_from(v)
        .ok()
        .and_then(|i| names.get(i))
        .map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The library name of value `v` of the C enum `field` takes, or an out-of-range error.
fn enum_value(
    names: &[&'static CStr],
    v: c_int,
    field: &'static str,
) -> Result<&'static str, Error> {
    usize::try_from(v)
        .ok()
        .and_then(|i| names.get(i).copied())
        .and_then(|s| s.to_str().ok())
        .ok_or_else(|| {
            Error::out_of_range(field, v, &format!("is outside 0..={}", names.len() - 1))
        })
}

/// The C value of a library name.
fn enum_index(names: &[&'static CStr], name: &str) -> Option<c_int> {
    names
        .iter()
        .position(|s| s.to_bytes() == name.as_bytes())
        .and_then(|i| c_int::try_from(i).ok())
}

/// The C spacing and Karras rho (NaN unless Karras) of a library spacing.
fn spacing_to_c(s: Spacing) -> (c_int, f64) {
    let name = match s {
        Spacing::Leading => "leading",
        Spacing::Trailing => "trailing",
        Spacing::Linspace => "linspace",
        Spacing::Karras { .. } => "karras",
        Spacing::LogSnr => "logsnr",
        Spacing::Lcm { .. } => "lcm",
    };
    let rho = match s {
        Spacing::Karras { rho } => rho,
        _ => f64::NAN,
    };
    (enum_index(&SPACINGS, name).unwrap_or(0), rho)
}

/// The library spacing of a C spacing and rho (NaN: the spacing's default rho).
fn spacing_from_c(spacing: c_int, rho: f64) -> Result<Spacing, Error> {
    let parsed: Spacing = enum_value(&SPACINGS, spacing, "spacing")?.parse()?;
    match (parsed, opt_f64(rho)) {
        (Spacing::Karras { .. }, Some(rho)) => Ok(Spacing::Karras { rho }),
        (_, Some(_)) => Err(Error::options(
            "{0} applies to {1} EDGEDIFF_SPACING_KARRAS",
            &["rho", "spacing"],
        )),
        (s, None) => Ok(s),
    }
}

/// The C x0 clipping (mode, dynamic_threshold, threshold_max) of the library's.
fn x0_clip_to_c(c: X0Clip) -> (c_int, f64, f64) {
    match c {
        X0Clip::None => (X0_CLIP_NONE, f64::NAN, f64::NAN),
        X0Clip::Range => (X0_CLIP_RANGE, f64::NAN, f64::NAN),
        X0Clip::Dynamic { percentile, max } => (X0_CLIP_DYNAMIC, percentile, max),
    }
}

/// The library x0 clipping of the C fields, checked as `edgediff sample` checks its flags.
fn x0_clip_from_c(mode: c_int, percentile: f64, max: f64) -> Result<X0Clip, Error> {
    let (percentile, max) = (opt_f64(percentile), opt_f64(max));
    match mode {
        X0_CLIP_NONE | X0_CLIP_RANGE if percentile.is_some() || max.is_some() => {
            Err(Error::options(
                "{0} and {1} apply to {2} EDGEDIFF_X0_CLIP_DYNAMIC",
                &["dynamic_threshold", "threshold_max", "x0_clip"],
            ))
        }
        X0_CLIP_NONE => Ok(X0Clip::None),
        X0_CLIP_RANGE => Ok(X0Clip::Range),
        X0_CLIP_DYNAMIC => {
            let Some(p) = percentile else {
                return Err(Error::options(
                    "{0} EDGEDIFF_X0_CLIP_DYNAMIC needs {1} (the quantile, e.g. 0.995)",
                    &["x0_clip", "dynamic_threshold"],
                ));
            };
            X0Clip::dynamic(p, max) // no bound (NaN, so None) is an infinite one
        }
        other => Err(Error::out_of_range("x0_clip", other, "is outside 0..=2")),
    }
}

/// The sampler called `name` with `params`; the library's default sampler named with no
/// parameter set is `default` itself, so what only the default carries survives the trip
/// through its name (calibration's unipc is of order 3, not unipc's own default 2).
fn sampler_kind(
    name: &str,
    params: SamplerParams,
    default: SamplerKind,
) -> Result<SamplerKind, Error> {
    if name == default.name() && params == SamplerParams::default() {
        return Ok(default);
    }
    SamplerKind::new(name, params)
}

/// Calls a C progress callback with (done, total); a non-zero answer sets `cancel`.
fn progress_fn(
    cb: EdgediffProgress,
    user: *mut c_void,
    cancel: &AtomicBool,
) -> impl FnMut(usize, usize) + '_ {
    move |done, total| {
        if let Some(cb) = cb {
            // SAFETY: the caller registered `cb` to be called with `user` from the thread
            // that runs the call (the header's contract for progress callbacks).
            if in_callback(|| unsafe { cb(done, total, user) }) != 0 {
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Enum name helpers
// ---------------------------------------------------------------------------------------------

/// The name of an `edgediff_spacing` ("trailing"), a static string; NULL for no such value.
#[no_mangle]
pub extern "C" fn edgediff_spacing_name(spacing: c_int) -> *const c_char {
    enum_name(&SPACINGS, spacing)
}

/// The `edgediff_spacing` called `name` into `out`.
///
/// # Safety
/// `name` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn edgediff_spacing_from_name(name: *const c_char, out: *mut c_int) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a NUL-terminated string.
        let name = unsafe { text(name, "name") }?;
        // The library parses (and words the error); the table maps its names to C values.
        let (v, _) = spacing_to_c(name.parse()?);
        // SAFETY: the caller passes a writable `out`.
        unsafe { put(out, v, "out") }
    })
}

/// The name of an `edgediff_provider` ("cuda"), a static string; NULL for no such value.
#[no_mangle]
pub extern "C" fn edgediff_provider_name(provider: c_int) -> *const c_char {
    enum_name(&PROVIDERS, provider)
}

/// The `edgediff_provider` called `name` into `out`.
///
/// # Safety
/// `name` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn edgediff_provider_from_name(
    name: *const c_char,
    out: *mut c_int,
) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a NUL-terminated string.
        let name = unsafe { text(name, "name") }?;
        let provider: Provider = name.parse()?;
        let v = enum_index(&PROVIDERS, provider.name())
            .ok_or_else(|| arg(&format!("provider '{name}' has no C value")))?;
        // SAFETY: the caller passes a writable `out`.
        unsafe { put(out, v, "out") }
    })
}

// ---------------------------------------------------------------------------------------------
// Library version and errors, loading ONNX Runtime
// ---------------------------------------------------------------------------------------------

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
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let p = unsafe { opt_text(path, "path") }?.map(PathBuf::from);
        crate::backend::init_onnxruntime(p.as_deref()).map(|_| ())
    })
}

// ---------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------

/// An opened model. Runs on one handle are serialised by its lock; open one handle per thread
/// to run in parallel.
pub struct EdgediffModel {
    model: Mutex<Model>,
}

/// How to open a model (`edgediff_model_params`): the model options of every CLI command.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffModelParams {
    pub struct_size: usize,
    /// The ONNX file; NULL: the embedded default model.
    pub path: *const c_char,
    /// libonnxruntime.so; NULL: ORT_DYLIB_PATH, else .ort/ of the repository.
    pub ort_lib: *const c_char,
    /// TensorRT engine cache directory (tensorrt only); NULL: none.
    pub trt_cache: *const c_char,
    /// ONNX Runtime intra-op threads; 0: its own choice.
    pub threads: usize,
    /// An `edgediff_provider`.
    pub provider: c_int,
    /// GPU device for cuda and tensorrt.
    pub device_id: c_int,
    /// Non-zero: run on the CPU, with a warning, when the provider cannot be registered.
    pub fallback_cpu: c_int,
    /// Non-zero: read the file into memory instead of mapping it.
    pub no_mmap: c_int,
    /// Non-zero: let TensorRT build fp16 engines (tensorrt only).
    pub trt_fp16: c_int,
    /// Non-zero: a text-to-image pipeline folder holds its graphs one at a time
    /// (`NetworkOptions::low_memory`); refused by a single-file model. It took the place of a
    /// reserved zero field, so the struct's size and older programs' zero are unchanged.
    pub low_memory: c_int,
}

// SAFETY: repr(C), struct_size first, only integers and raw pointers.
unsafe impl SizedStruct for EdgediffModelParams {
    const NAME: &'static str = "edgediff_model_params";
    const MIN_SIZE: usize = std::mem::size_of::<EdgediffModelParams>();
}

impl EdgediffModelParams {
    /// `ModelOptions::default()` as C fields.
    fn defaults() -> Self {
        let d = ModelOptions::default();
        let net = &d.network;
        let device_id = match net.provider {
            Provider::Cuda { device_id } | Provider::TensorRt { device_id, .. } => device_id,
            Provider::Cpu => 0,
        };
        let trt_fp16 = matches!(net.provider, Provider::TensorRt { fp16: true, .. });
        // The library's defaults have no path, library or engine cache (a default one would
        // need a static C string): NULL. tests::defaults_round_trip checks this stays true.
        EdgediffModelParams {
            struct_size: std::mem::size_of::<Self>(),
            path: std::ptr::null(),
            ort_lib: std::ptr::null(),
            trt_cache: std::ptr::null(),
            threads: net.intra_threads,
            provider: enum_index(&PROVIDERS, net.provider.name()).unwrap_or(0),
            device_id,
            fallback_cpu: net.fallback_cpu.into(),
            no_mmap: net.read_into_memory.into(),
            trt_fp16: trt_fp16.into(),
            low_memory: net.low_memory.into(),
        }
    }
}

/// The library's model options of the C struct: the one conversion.
///
/// # Safety
/// The strings in `p` are NULL or NUL-terminated.
unsafe fn model_options(p: &EdgediffModelParams) -> Result<ModelOptions, Error> {
    // SAFETY: the caller's struct holds NULL or NUL-terminated strings (this and the next two).
    let path = unsafe { opt_text(p.path, "path") }?;
    // SAFETY: as above.
    let ort_lib = unsafe { opt_text(p.ort_lib, "ort_lib") }?;
    // SAFETY: as above.
    let trt_cache = unsafe { opt_text(p.trt_cache, "trt_cache") }?;
    let provider = enum_value(&PROVIDERS, p.provider, "provider")?
        .parse::<Provider>()?
        .on_device(p.device_id);
    let provider = match provider {
        Provider::TensorRt { device_id, .. } => Provider::TensorRt {
            device_id,
            engine_cache: trt_cache.map(PathBuf::from),
            fp16: p.trt_fp16 != 0,
        },
        _ if trt_cache.is_some() || p.trt_fp16 != 0 => {
            return Err(Error::options(
                "{0} and {1} apply to {2} EDGEDIFF_PROVIDER_TENSORRT",
                &["trt_cache", "trt_fp16", "provider"],
            ))
        }
        other => other,
    };
    Ok(ModelOptions {
        path: path.map(PathBuf::from),
        ort_lib: ort_lib.map(PathBuf::from),
        network: NetworkOptions {
            intra_threads: p.threads,
            provider,
            fallback_cpu: p.fallback_cpu != 0,
            read_into_memory: p.no_mmap != 0,
            low_memory: p.low_memory != 0,
        },
    })
}

/// Opens the model `opts` describes into a new live handle at `out` (NULL on failure).
///
/// # Safety
/// `out` is valid for a write.
unsafe fn open_into(opts: &ModelOptions, out: *mut *mut EdgediffModel) -> Result<(), Error> {
    // SAFETY: the caller passes a writable `out`; it reads NULL until a model is open.
    unsafe { put(out, std::ptr::null_mut(), "out") }?;
    let model = opts.open()?;
    let handle = register(
        &LIVE_MODELS,
        EdgediffModel {
            model: Mutex::new(model),
        },
    );
    // SAFETY: as above.
    unsafe { out.write(handle) };
    Ok(())
}

/// Fills `params` (`size` bytes, the caller's sizeof) with the defaults; the header's
/// `edgediff_model_params_init` calls it.
///
/// # Safety
/// `params` points to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_params_init_sized(
    params: *mut EdgediffModelParams,
    size: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { init_sized(params, EdgediffModelParams::defaults(), size) }
}

/// Opens a model as `params` says. Calls `edgediff_init(params->ort_lib)` first.
///
/// # Safety
/// `params` points to an initialised `edgediff_model_params`; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_open_params(
    params: *const EdgediffModelParams,
    out: *mut *mut EdgediffModel,
) -> c_int {
    guard(|| {
        if !out.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { out.write(std::ptr::null_mut()) };
        }
        // SAFETY: the caller passes an initialised struct with valid strings.
        let p = unsafe { read_prefix(params, EdgediffModelParams::defaults()) }?;
        // SAFETY: its strings are NULL or NUL-terminated (caller).
        let opts = unsafe { model_options(&p) }?;
        // SAFETY: as above.
        unsafe { open_into(&opts, out) }
    })
}

/// Opens a model file (NULL: the embedded default model) on `provider` ("cpu", "cuda",
/// "tensorrt"; NULL is the default provider); with `fallback_cpu` non-zero an unavailable
/// provider falls back to the CPU. The same as `edgediff_model_open_params` with those fields.
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
        if !out.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { out.write(std::ptr::null_mut()) };
        }
        let mut p = EdgediffModelParams::defaults();
        p.path = path;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        if let Some(name) = unsafe { opt_text(provider, "provider") }? {
            let provider: Provider = name.parse()?;
            p.provider = enum_index(&PROVIDERS, provider.name()).unwrap_or(p.provider);
        }
        p.device_id = device_id;
        p.fallback_cpu = fallback_cpu;
        // SAFETY: `path` is NULL or NUL-terminated (caller), the other strings are NULL.
        let opts = unsafe { model_options(&p) }?;
        // SAFETY: as above.
        unsafe { open_into(&opts, out) }
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
        // SAFETY: the caller passes a writable `out`.
        unsafe { put(out, std::ptr::null_mut(), "out") }?;
        // SAFETY: the caller passes `len` readable bytes at `data`.
        let bytes = unsafe { slice(data, len, "data") }?;
        let opts = ModelOptions::default();
        crate::backend::init_onnxruntime(opts.ort_lib.as_deref())?;
        let model = Model::from_bytes(bytes, "<memory>", &opts.network)?;
        let handle = register(
            &LIVE_MODELS,
            EdgediffModel {
                model: Mutex::new(model),
            },
        );
        // SAFETY: as above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a model (NULL is allowed and does nothing).
///
/// # Safety
/// `model` is NULL or a handle from `edgediff_model_open*` not freed before.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_free(model: *mut EdgediffModel) {
    if IN_CALLBACK.get() {
        set_error(REENTRY);
        return;
    }
    if !model.is_null() && live(&LIVE_MODELS).remove(&(model as usize)) {
        // SAFETY: the handle was live, so it came from Box::into_raw in `register` and is
        // freed once: it has just left the live set.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// A live model handle, or an argument error.
///
/// # Safety
/// `m` is NULL or a pointer the caller got from this library (live handles are checked).
unsafe fn model_ref<'a>(m: *const EdgediffModel) -> Result<&'a EdgediffModel, Error> {
    if m.is_null() {
        return Err(arg("model is NULL"));
    }
    if !live(&LIVE_MODELS).contains(&(m as usize)) {
        return Err(arg("model is not a live handle (freed, or never opened)"));
    }
    // SAFETY: a live handle points to a boxed EdgediffModel that no one frees during the call
    // (freeing a handle in use is undefined, as the header says).
    Ok(unsafe { &*m })
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
        // SAFETY: live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: the caller passes 3 writable size_t.
        let dst = unsafe { slice_mut(shape, 3, "shape") }?;
        dst.copy_from_slice(&lock(m).metadata().sample_shape);
        Ok(())
    })
}

/// Writes the output shape `[C, H, W]` of one sample to `shape`: the decoded image of a
/// text-to-image pipeline (its sample shape is the latents'), else the sample shape.
///
/// # Safety
/// `model` is a valid handle; `shape` points to 3 writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn edgediff_model_output_shape(
    model: *const EdgediffModel,
    shape: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: the caller passes 3 writable size_t.
        let dst = unsafe { slice_mut(shape, 3, "shape") }?;
        dst.copy_from_slice(&lock(m).output_shape());
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
        // SAFETY: live handles are checked.
        let m = unsafe { model_ref(model) }?;
        let json = serde_json::to_string(lock(m).metadata()).map_err(|e| arg(&e.to_string()))?;
        let need = json.len() + 1;
        if !needed.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { needed.write(need) };
        }
        if buf.is_null() || cap < need {
            return Err(arg(&format!(
                "the buffer holds {cap} bytes; {need} are needed"
            )));
        }
        // SAFETY: `buf` holds `cap` >= `need` writable bytes (caller's contract, checked).
        let dst = unsafe { slice_mut(buf.cast::<u8>(), need, "buf") }?;
        dst[..json.len()].copy_from_slice(json.as_bytes());
        dst[json.len()] = 0;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Sampling parameters
// ---------------------------------------------------------------------------------------------

/// Progress callback: `(steps done, total steps, user pointer)`; a non-zero return cancels.
pub type EdgediffProgress = Option<unsafe extern "C" fn(usize, usize, *mut c_void) -> c_int>;

/// What `edgediff sample` can set (`edgediff_sample_params`). Field names are the library's
/// option names, so library error messages name the fields; the header documents each.
/// The field order keeps 64-bit targets free of padding.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffSampleParams {
    pub struct_size: usize,
    pub sampler: *const c_char,
    pub steps: usize,
    /// An `edgediff_spacing`.
    pub spacing: c_int,
    /// An `edgediff_x0_clip`.
    pub x0_clip: c_int,
    pub rho: f64,
    pub timesteps: *const f64,
    pub num_timesteps: usize,
    pub eta: f64,
    pub order: i64,
    pub snr: f64,
    pub rtol: f64,
    pub atol: f64,
    pub min_steps: i64,
    pub max_steps: i64,
    pub n: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub class_label: i64,
    pub guidance: f64,
    pub dynamic_threshold: f64,
    pub threshold_max: f64,
    pub init_noise: *const f32,
    pub init_noise_len: usize,
    pub step_noise: *const f32,
    pub step_noise_len: usize,
    pub progress: EdgediffProgress,
    pub progress_user: *mut c_void,
    // Version 2 (text-to-image pipelines): appended, so version 1 structs stay readable.
    pub prompt: *const c_char,
    pub negative_prompt: *const c_char,
    // Version 3 (tiled VAE decoding): appended, so version 1 and 2 structs stay readable.
    /// `SampleOptions::vae_tile_size`; 0: None, untiled.
    pub vae_tile_size: usize,
    // Version 4 (img2img, one prompt per sample, the final latents, the consistency samplers'
    // gamma): appended likewise.
    /// `SampleOptions::init_image`, `[1 or n, C, H, W]` of the output shape; NULL: None.
    pub init_image: *const f32,
    pub init_image_len: usize,
    /// img2img's `SampleOptions::strength` or inpainting's `InpaintOptions::strength`; NaN:
    /// the operation's default.
    pub strength: f64,
    /// `SampleOptions::prompts`; NULL: None.
    pub prompts: *const *const c_char,
    pub prompts_len: usize,
    /// Where `Report::latents` goes (`SampleOptions::keep_latents` when not NULL).
    pub latents_out: *mut f32,
    pub latents_out_len: usize,
    /// `SamplerParams::gamma` (tcd); unset: the sampler's default.
    pub gamma: f64,
    // Version 5 (image sizes of pipelines): appended likewise.
    /// `SampleOptions::image_size` `[height, width]` (0: that side the folder's; both 0:
    /// None), resolved against the model in [`for_model`].
    pub height: usize,
    pub width: usize,
    // Version 6 (calibration files): appended likewise.
    /// A calibration file (`edgediff calibrate --save`) whose sampler, time steps and
    /// coefficients replace `sampler`, `steps`, `spacing` and `timesteps`; NULL: none.
    pub calibration: *const c_char,
    // Version 7 (index ranges): appended likewise.
    /// `SampleOptions::first_index`: sample i is sample `first_index + i` of the seed.
    pub first_index: usize,
}

// SAFETY: repr(C), struct_size first, only integers, floats, raw and Option<fn> pointers.
unsafe impl SizedStruct for EdgediffSampleParams {
    const NAME: &'static str = "edgediff_sample_params";
    /// Version 1 ended at `progress_user`: programs built before prompts were added pass that
    /// size, and get the default (no prompt) for the fields after it.
    const MIN_SIZE: usize = std::mem::offset_of!(EdgediffSampleParams, prompt);
}

impl EdgediffSampleParams {
    /// `SampleOptions::default()` and `SamplerParams::default()` as C fields.
    fn defaults() -> Self {
        let d = SampleOptions::default();
        let s = SamplerParams::default();
        // The spacing is the model's (SampleOptions::for_model), known once a model is open.
        let (_, rho) = spacing_to_c(d.spacing);
        let spacing = EDGEDIFF_SPACING_DEFAULT;
        let (x0_clip, dynamic_threshold, threshold_max) = x0_clip_to_c(d.x0_clip);
        // The library's default has no list of times (a default one would need static
        // storage): NULL. tests::defaults_round_trip checks this stays true.
        EdgediffSampleParams {
            struct_size: std::mem::size_of::<Self>(),
            sampler: static_name(d.sampler.name()),
            steps: d.steps,
            spacing,
            x0_clip,
            rho,
            timesteps: std::ptr::null(),
            num_timesteps: 0,
            eta: f64_or_unset(s.eta),
            order: usize_or_unset(s.order),
            snr: f64_or_unset(s.snr),
            rtol: f64_or_unset(s.rtol),
            atol: f64_or_unset(s.atol),
            min_steps: usize_or_unset(s.min_steps),
            max_steps: usize_or_unset(s.max_steps),
            n: d.n,
            batch_size: d.batch_size,
            seed: d.seed,
            class_label: d.class_label.unwrap_or(EDGEDIFF_UNSET),
            guidance: f64_or_unset(d.guidance),
            dynamic_threshold,
            threshold_max,
            init_noise: std::ptr::null(),
            init_noise_len: 0,
            step_noise: std::ptr::null(),
            step_noise_len: 0,
            progress: None,
            progress_user: std::ptr::null_mut(),
            // SampleOptions' default prompts are None; NULL says the same.
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            vae_tile_size: d.vae_tile_size.unwrap_or(0),
            // No image, prompt list or latents buffer by default (SampleOptions' None and
            // false); the strength is unset, each operation's own default.
            init_image: std::ptr::null(),
            init_image_len: 0,
            strength: f64::NAN,
            prompts: std::ptr::null(),
            prompts_len: 0,
            latents_out: std::ptr::null_mut(),
            latents_out_len: 0,
            gamma: f64_or_unset(s.gamma),
            // SampleOptions' None, the folder's size (a 0 side is the folder's).
            height: d.image_size.map_or(0, |[h, _]| h),
            width: d.image_size.map_or(0, |[_, w]| w),
            calibration: std::ptr::null(),
            first_index: d.first_index,
        }
    }

    /// The sampler's own options.
    fn sampler_params(&self) -> SamplerParams {
        SamplerParams {
            eta: opt_f64(self.eta),
            gamma: opt_f64(self.gamma),
            order: opt_usize(self.order),
            snr: opt_f64(self.snr),
            rtol: opt_f64(self.rtol),
            atol: opt_f64(self.atol),
            min_steps: opt_usize(self.min_steps),
            max_steps: opt_usize(self.max_steps),
        }
    }
}

/// The library's sampling options of the C struct: the one conversion, shared by the typed
/// entry points and the request handles. Noise injection, which needs the model's shape, is
/// [`injected_noise`].
///
/// # Safety
/// `p.sampler` is NUL-terminated; `p.timesteps` is NULL or holds `p.num_timesteps` values;
/// `p.prompt` and `p.negative_prompt` are NULL or NUL-terminated.
unsafe fn sample_options(p: &EdgediffSampleParams) -> Result<SampleOptions, Error> {
    let defaults = SampleOptions::default();
    // SAFETY: the caller's struct holds a NUL-terminated sampler name.
    let name = unsafe { text(p.sampler, "sampler") }?;
    let sampler = sampler_kind(name, p.sampler_params(), defaults.sampler)?;
    let timesteps = if p.timesteps.is_null() {
        if p.num_timesteps != 0 {
            return Err(Error::options(
                format!("{{0}} is NULL but {{1}} is {}", p.num_timesteps),
                &["timesteps", "num_timesteps"],
            ));
        }
        None
    } else {
        // SAFETY: the caller's struct holds `num_timesteps` values at `timesteps`.
        Some(unsafe { slice(p.timesteps, p.num_timesteps, "timesteps") }?.to_vec())
    };
    // Copied: SampleOptions owns its prompts, and nothing keeps the caller's pointers.
    // SAFETY: the caller's struct holds NULL or NUL-terminated prompts.
    let prompt = unsafe { opt_text(p.prompt, "prompt") }?.map(str::to_owned);
    // SAFETY: as for `prompt`.
    let negative_prompt =
        unsafe { opt_text(p.negative_prompt, "negative_prompt") }?.map(str::to_owned);
    // SAFETY: the caller's struct holds NULL or `prompts_len` NUL-terminated strings.
    let prompts = unsafe { prompt_list(p.prompts, p.prompts_len) }?;
    if p.latents_out.is_null() && p.latents_out_len != 0 {
        return Err(Error::options(
            format!("{{0}} is NULL but {{1}} is {}", p.latents_out_len),
            &["latents_out", "latents_out_len"],
        ));
    }
    let spacing = if p.spacing == EDGEDIFF_SPACING_DEFAULT {
        if opt_f64(p.rho).is_some() {
            return Err(Error::options(
                "{0} applies to {1} EDGEDIFF_SPACING_KARRAS",
                &["rho", "spacing"],
            ));
        }
        // Replaced by the model's in `for_model` once the model is known.
        defaults.spacing
    } else {
        spacing_from_c(p.spacing, p.rho)?
    };
    Ok(SampleOptions {
        sampler,
        steps: p.steps,
        spacing,
        timesteps,
        n: p.n,
        first_index: p.first_index,
        batch_size: p.batch_size,
        seed: p.seed,
        class_label: class_of(p.class_label),
        x0_clip: x0_clip_from_c(p.x0_clip, p.dynamic_threshold, p.threshold_max)?,
        guidance: opt_f64(p.guidance),
        prompt,
        negative_prompt,
        vae_tile_size: (p.vae_tile_size != 0).then_some(p.vae_tile_size),
        prompts,
        strength: opt_f64(p.strength).unwrap_or(defaults.strength),
        keep_latents: !p.latents_out.is_null(),
        ..defaults
    })
}

/// The caller's list of `len` prompts at `list` (NULL with 0: none), copied; an empty list is
/// kept for the library to refuse by name.
///
/// # Safety
/// `list` is NULL or holds `len` pointers, each NULL or NUL-terminated.
unsafe fn prompt_list(
    list: *const *const c_char,
    len: usize,
) -> Result<Option<Vec<String>>, Error> {
    if list.is_null() {
        if len != 0 {
            return Err(Error::options(
                format!("{{0}} is NULL but {{1}} is {len}"),
                &["prompts", "prompts_len"],
            ));
        }
        return Ok(None);
    }
    // SAFETY: `list` holds `len` pointers (caller).
    let ptrs = unsafe { slice(list, len, "prompts") }?;
    ptrs.iter()
        .enumerate()
        // SAFETY: each pointer is NULL or NUL-terminated (caller); NULL is refused by `text`.
        .map(|(i, &t)| unsafe { text(t, &format!("prompts[{i}]")) }.map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// img2img's images of `p` for `n` samples of the output shape `[c, h, w]`: `init_image`
/// holds one image (for every sample) or n, the library checks the rest.
///
/// # Safety
/// `p.init_image` is NULL or holds `p.init_image_len` floats.
unsafe fn init_image(
    p: &EdgediffSampleParams,
    n: usize,
    [c, h, w]: [usize; 3],
) -> Result<Option<Array4<f32>>, Error> {
    if p.init_image.is_null() {
        if p.init_image_len != 0 {
            return Err(Error::options(
                format!("{{0}} is NULL but {{1}} is {}", p.init_image_len),
                &["init_image", "init_image_len"],
            ));
        }
        return Ok(None);
    }
    let one = count(&[c, h, w], "C * H * W")?;
    let all = count(&[n, c, h, w], "n * C * H * W")?;
    if p.init_image_len != one && p.init_image_len != all {
        return Err(Error::out_of_range(
            "init_image_len",
            p.init_image_len,
            &format!("must be C * H * W = {c} * {h} * {w} = {one} (one image for every sample) or n * C * H * W = {all} (one per sample)"),
        ));
    }
    // SAFETY: the caller's struct holds `init_image_len` floats at `init_image`.
    let img = unsafe { slice(p.init_image, p.init_image_len, "init_image") }?;
    let k = p.init_image_len / one.max(1);
    Array4::from_shape_vec((k, c, h, w), img.to_vec())
        .map(Some)
        .map_err(|e| arg(&e.to_string()))
}

/// The caller's buffer for the final latents of `n` samples of the latent shape `[c, h, w]`,
/// checked to hold them (None: not wanted).
///
/// # Safety
/// `p.latents_out` is NULL or holds `p.latents_out_len` writable floats.
unsafe fn latents_buffer<'a>(
    p: &EdgediffSampleParams,
    n: usize,
    [c, h, w]: [usize; 3],
) -> Result<Option<&'a mut [f32]>, Error> {
    if p.latents_out.is_null() {
        return Ok(None);
    }
    let need = count(&[n, c, h, w], "n * C * H * W")?;
    if p.latents_out_len < need {
        return Err(Error::out_of_range(
            "latents_out_len",
            p.latents_out_len,
            &format!("is too small: the latents of n = {n} samples of [{c}, {h}, {w}] (edgediff_sample_shapes) need {need} floats"),
        ));
    }
    // SAFETY: `latents_out` holds `latents_out_len` >= `need` writable floats (caller).
    unsafe { slice_mut(p.latents_out, need, "latents_out") }.map(Some)
}

/// Copies a run's final latents into the caller's buffer (when one was given).
fn put_latents(dst: Option<&mut [f32]>, report: &Report) -> Result<(), Error> {
    let Some(dst) = dst else {
        return Ok(());
    };
    let z = report
        .latents
        .as_ref()
        .ok_or_else(|| arg("the run kept no latents"))?
        .as_standard_layout();
    let z = z.as_slice().expect("standard layout");
    if z.len() != dst.len() {
        return Err(arg(&format!(
            "the run kept {} latent values; {} were expected",
            z.len(),
            dst.len()
        )));
    }
    dst.copy_from_slice(z);
    Ok(())
}

/// `opts` (of `p`) completed with what `p` leaves to the model: the image size of a side
/// `p.height` or `p.width` leaves 0 (the folder's, as a side `edgediff sample --height
/// --width` does not give), and the scheduler settings when `p.spacing` leaves them, as the
/// CLI's `sample` takes them when `--spacing` is not given; an explicit spacing replaces them
/// all, as there.
fn for_model(opts: SampleOptions, p: &EdgediffSampleParams, model: &Model) -> SampleOptions {
    let image_size = (p.height != 0 || p.width != 0).then(|| {
        let [_, h, w] = model.output_shape();
        let side = |given: usize, own: usize| if given == 0 { own } else { given };
        [side(p.height, h), side(p.width, w)]
    });
    let opts = SampleOptions { image_size, ..opts }
        .with_model_grid(model, p.spacing != EDGEDIFF_SPACING_DEFAULT);
    if p.spacing != EDGEDIFF_SPACING_DEFAULT {
        return opts;
    }
    let d = SampleOptions::for_model(model);
    SampleOptions {
        spacing: d.spacing,
        steps_offset: d.steps_offset,
        set_alpha_to_one: d.set_alpha_to_one,
        leading_as_diffusers: d.leading_as_diffusers,
        ..opts
    }
}

/// The injected noise of `p` for `n` samples of `shape`: `init_noise` holds n * C * H * W
/// floats, `step_noise` (with it) a whole number of steps of as many.
///
/// # Safety
/// `p.init_noise` and `p.step_noise` are NULL or hold their `_len` floats.
unsafe fn injected_noise(
    p: &EdgediffSampleParams,
    n: usize,
    [c, h, w]: [usize; 3],
) -> Result<Option<InjectedNoise>, Error> {
    if p.init_noise.is_null() {
        if !p.step_noise.is_null() || p.init_noise_len != 0 || p.step_noise_len != 0 {
            return Err(Error::options(
                "{0} and {1} need {2}",
                &["step_noise", "init_noise_len", "init_noise"],
            ));
        }
        return Ok(None);
    }
    let per_step = count(&[n, c, h, w], "n * C * H * W")?;
    if p.init_noise_len != per_step {
        return Err(Error::out_of_range(
            "init_noise_len",
            p.init_noise_len,
            &format!("must be n * C * H * W = {n} * {c} * {h} * {w} = {per_step}"),
        ));
    }
    // SAFETY: the caller's struct holds `init_noise_len` floats at `init_noise`.
    let init = unsafe { slice(p.init_noise, p.init_noise_len, "init_noise") }?;
    let initial =
        Array4::from_shape_vec((n, c, h, w), init.to_vec()).map_err(|e| arg(&e.to_string()))?;
    let steps = if p.step_noise.is_null() {
        if p.step_noise_len != 0 {
            return Err(Error::options(
                format!("{{0}} is NULL but {{1}} is {}", p.step_noise_len),
                &["step_noise", "step_noise_len"],
            ));
        }
        None
    } else {
        if per_step == 0 || p.step_noise_len == 0 || !p.step_noise_len.is_multiple_of(per_step) {
            return Err(Error::out_of_range(
                "step_noise_len",
                p.step_noise_len,
                &format!("must be a positive multiple of n * C * H * W = {per_step} (one batch per step)"),
            ));
        }
        // SAFETY: the caller's struct holds `step_noise_len` floats at `step_noise`.
        let noise = unsafe { slice(p.step_noise, p.step_noise_len, "step_noise") }?;
        let shape = [p.step_noise_len / per_step, n, c, h, w];
        Some(
            ArrayD::from_shape_vec(ndarray::IxDyn(&shape), noise.to_vec())
                .map_err(|e| arg(&e.to_string()))?,
        )
    };
    Ok(Some(InjectedNoise { initial, steps }))
}

/// What a run of the struct does: each reads some of its fields and refuses the others set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `edgediff_sample_with`, `edgediff_sample_to_file_with`.
    Sample,
    /// `edgediff_inpaint_with`: what `edgediff inpaint` takes.
    Inpaint,
    /// `edgediff_invert`: deterministic DDIM, nothing that changes the images.
    Invert,
}

impl Op {
    /// Refuses a field of `p` set that this operation does not read, naming the first.
    fn refuse_unused(self, p: &EdgediffSampleParams) -> Result<(), Error> {
        let (what, unused): (&str, &[(&'static str, bool)]) = match self {
            // Sampling reads strength for img2img only, as `edgediff sample --strength`.
            // (A NULL image with a length is reported as that, by init_image.)
            Op::Sample
                if opt_f64(p.strength).is_some()
                    && p.init_image.is_null()
                    && p.init_image_len == 0 =>
            {
                return Err(Error::options(
                    "{0} applies to img2img, with {1}",
                    &["strength", "init_image"],
                ))
            }
            Op::Sample => return Ok(()),
            Op::Inpaint => (
                "inpainting",
                &[
                    ("step_noise", !p.step_noise.is_null()),
                    ("init_image", !p.init_image.is_null()),
                    ("prompts", !p.prompts.is_null()),
                    ("latents_out", !p.latents_out.is_null()),
                ],
            ),
            Op::Invert => (
                "inversion",
                &[
                    ("timesteps", !p.timesteps.is_null()),
                    ("guidance", opt_f64(p.guidance).is_some()),
                    ("x0_clip", p.x0_clip != X0_CLIP_NONE),
                    ("init_noise", !p.init_noise.is_null()),
                    ("step_noise", !p.step_noise.is_null()),
                    ("prompt", !p.prompt.is_null()),
                    ("negative_prompt", !p.negative_prompt.is_null()),
                    ("vae_tile_size", p.vae_tile_size != 0),
                    ("init_image", !p.init_image.is_null()),
                    ("strength", opt_f64(p.strength).is_some()),
                    ("prompts", !p.prompts.is_null()),
                    ("latents_out", !p.latents_out.is_null()),
                    ("height", p.height != 0),
                    ("width", p.width != 0),
                    ("first_index", p.first_index != 0),
                ],
            ),
        };
        match unused.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(Error::options(
                format!("{{0}} does not apply to {what}"),
                &[*field],
            )),
            None => Ok(()),
        }
    }
}

/// One run: the options with the flag its progress callback sets to cancel it.
struct Run {
    opts: SampleOptions,
    /// Its shapes: `output` sizes the images (out, init_image, inpainting's images and
    /// masks), `sample` the latents (init_noise, step_noise, latents_out).
    shapes: Shapes,
    cancel: Arc<AtomicBool>,
    progress: EdgediffProgress,
    user: *mut c_void,
}

impl Run {
    /// The run `op` of `p` on `model` (whose scheduler settings may be the defaults), with
    /// the fields `op` does not read refused.
    ///
    /// # Safety
    /// As [`sample_options`]; `p.init_image` is NULL or holds `p.init_image_len` floats.
    unsafe fn new(p: &EdgediffSampleParams, model: &Model, op: Op) -> Result<Run, Error> {
        op.refuse_unused(p)?;
        let cancel = Arc::new(AtomicBool::new(false));
        // SAFETY: forwarded from the caller.
        let mut opts = for_model(unsafe { sample_options(p) }?, p, model);
        // SAFETY: `p.calibration` is NULL or NUL-terminated (caller).
        if let Some(path) = unsafe { opt_text(p.calibration, "calibration") }? {
            let path = std::path::Path::new(path);
            CalibrationFile::read(path)?.apply(model, path, &mut opts)?;
        }
        // Of height and width (or the folder's size), before any image: a flat buffer has no
        // size of its own, so these say what init_image holds (the CLI takes an image file's).
        let shapes = opts.shapes(model)?;
        // The images are what the model outputs (a pipeline's, not its latents).
        // SAFETY: forwarded from the caller.
        let init_image = unsafe { init_image(p, p.n, shapes.output) }?;
        Ok(Run {
            opts: SampleOptions {
                cancel: Some(cancel.clone()),
                init_image,
                ..opts
            },
            shapes,
            cancel,
            progress: p.progress,
            user: p.progress_user,
        })
    }

    fn progress(&self) -> impl FnMut(usize, usize) + '_ {
        progress_fn(self.progress, self.user, &self.cancel)
    }
}

/// Fills `params` (`size` bytes, the caller's sizeof) with the defaults; the header's
/// `edgediff_sample_params_init` calls it.
///
/// # Safety
/// `params` points to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample_params_init_sized(
    params: *mut EdgediffSampleParams,
    size: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { init_sized(params, EdgediffSampleParams::defaults(), size) }
}

/// Reads the caller's sampling parameters.
///
/// # Safety
/// `params` is NULL or points to an initialised `edgediff_sample_params`.
unsafe fn read_sample_params(
    params: *const EdgediffSampleParams,
) -> Result<EdgediffSampleParams, Error> {
    // SAFETY: forwarded from the caller.
    unsafe { read_prefix(params, EdgediffSampleParams::defaults()) }
}

/// The shapes `[C, H, W]` of one sample of a run of `params` (`SampleOptions::shapes`): into
/// `output_shape` what it outputs (the images of its height and width), into `sample_shape`
/// what it denoises (a pipeline's latents); either may be NULL. Checks `params` as a run
/// does up to its shapes, so a size the model cannot make is refused here as there.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct whose pointers are valid as the
/// header says; `output_shape` and `sample_shape` are NULL or point to 3 writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample_shapes(
    model: *const EdgediffModel,
    params: *const EdgediffSampleParams,
    output_shape: *mut usize,
    sample_shape: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_sample_params(params) }?;
        let model = lock(m);
        // SAFETY: the pointers in `p` are valid as the header says (caller).
        let shapes = for_model(unsafe { sample_options(&p) }?, &p, &model).shapes(&model)?;
        for (dst, shape, what) in [
            (output_shape, shapes.output, "output_shape"),
            (sample_shape, shapes.sample, "sample_shape"),
        ] {
            if !dst.is_null() {
                // SAFETY: non-NULL, so 3 writable size_t (caller).
                unsafe { slice_mut(dst, 3, what) }?.copy_from_slice(&shape);
            }
        }
        Ok(())
    })
}

/// Samples as `p` says into `out` (`out_len` floats, at least n * C * H * W).
///
/// # Safety
/// The pointers in `p` are valid as the header says; `out` holds `out_len` writable floats.
unsafe fn sample_into(
    m: &EdgediffModel,
    p: &EdgediffSampleParams,
    out: *mut f32,
    out_len: usize,
) -> Result<(), Error> {
    let mut model = lock(m);
    // SAFETY: forwarded from the caller.
    let run = unsafe { Run::new(p, &model, Op::Sample) }?;
    // The buffer takes what sampling outputs (a pipeline's decoded images, of the run's
    // size); injected noise and the latents are in the sample (latent) shape.
    let shape = run.shapes.sample;
    let [c, h, w] = run.shapes.output;
    let per = count(&[c, h, w], "C * H * W")?;
    let need = count(&[p.n, c, h, w], "n * C * H * W")?;
    if out.is_null() {
        return Err(arg("out is NULL"));
    }
    if out_len < need {
        return Err(arg(&format!(
            "out holds {out_len} floats; {} samples of [{c}, {h}, {w}] need {need}",
            p.n
        )));
    }
    // SAFETY: forwarded from the caller.
    let injected = unsafe { injected_noise(p, p.n, shape) }?;
    // SAFETY: forwarded from the caller.
    let latents = unsafe { checked_latents(p, &model, &run, injected.as_ref()) }?;
    // SAFETY: `out` holds `out_len` >= `need` writable floats (caller, checked).
    let dst = unsafe { slice_mut(out, need, "out") }?;
    let mut progress = run.progress();
    let report = generate_chunks(
        &mut model,
        &run.opts,
        injected.as_ref(),
        &[0..p.n],
        &mut progress,
        &mut |first, x: Array4<f32>| {
            let x = x.as_standard_layout();
            dst[first * per..first * per + x.len()]
                .copy_from_slice(x.as_slice().expect("standard layout"));
            Ok(())
        },
    )?;
    put_latents(latents, &report)
}

/// The caller's latents buffer of `p` for `run`, after the options are checked against the
/// model (a pixel model refuses latents before their buffer is looked at, as the CLI refuses
/// `--latents-out` first).
///
/// # Safety
/// As [`latents_buffer`].
unsafe fn checked_latents<'a>(
    p: &EdgediffSampleParams,
    model: &Model,
    run: &Run,
    injected: Option<&InjectedNoise>,
) -> Result<Option<&'a mut [f32]>, Error> {
    if p.latents_out.is_null() {
        return Ok(None);
    }
    crate::generate::check_options(model, &run.opts, injected)?;
    // SAFETY: forwarded from the caller.
    unsafe { latents_buffer(p, p.n, run.shapes.sample) }
}

/// Samples as `p` says into a file, as `edgediff sample --out path [--resume]` does.
///
/// # Safety
/// The pointers in `p` are valid as the header says; `path` is NUL-terminated.
unsafe fn sample_to_file(
    m: &EdgediffModel,
    p: &EdgediffSampleParams,
    path: *const c_char,
    resume: bool,
) -> Result<(), Error> {
    // SAFETY: the caller passes a NUL-terminated path.
    let path = PathBuf::from(unsafe { text(path, "path") }?);
    let mut model = lock(m);
    // SAFETY: forwarded from the caller.
    let run = unsafe { Run::new(p, &model, Op::Sample) }?;
    // SAFETY: forwarded from the caller.
    let injected = unsafe { injected_noise(p, p.n, run.shapes.sample) }?;
    // SAFETY: forwarded from the caller.
    let latents = unsafe { checked_latents(p, &model, &run, injected.as_ref()) }?;
    let mut progress = run.progress();
    let written = generate_to_path(
        &mut model,
        &run.opts,
        injected.as_ref(),
        &path,
        resume,
        &mut progress,
    )?;
    put_latents(latents, &written.report)
}

/// Inpaints `n` images with masks (one channel) as `p` says into `out`.
///
/// # Safety
/// The pointers in `p` are valid as the header says; `images` holds n * C * H * W floats,
/// `masks` n * H * W, `out` `out_len` writable floats.
#[allow(clippy::too_many_arguments)] // the C signature
unsafe fn inpaint_into(
    m: &EdgediffModel,
    p: &EdgediffSampleParams,
    images: *const f32,
    masks: *const f32,
    n: usize,
    resampling: crate::inpaint::Resampling,
    out: *mut f32,
    out_len: usize,
) -> Result<(), Error> {
    let mut model = lock(m);
    // SAFETY: forwarded from the caller.
    let run = unsafe { Run::new(p, &model, Op::Inpaint) }?;
    // Images, masks and out are what the model outputs: a pipeline's images, not its
    // latents, of height and width (the folder's size where they are 0).
    let [c, h, w] = run.shapes.output;
    let need = count(&[n, c, h, w], "n * C * H * W")?;
    let mask_len = count(&[n, h, w], "n * H * W")?;
    if out.is_null() {
        return Err(arg("out is NULL"));
    }
    if out_len < need {
        return Err(arg(&format!(
            "out holds {out_len} floats; {need} are needed"
        )));
    }
    // SAFETY: the caller passes n * C * H * W floats at `images` and n * H * W at `masks`.
    let imgs = unsafe { slice(images, need, "images") }?;
    // SAFETY: as above.
    let mks = unsafe { slice(masks, mask_len, "masks") }?;
    let imgs =
        Array4::from_shape_vec((n, c, h, w), imgs.to_vec()).map_err(|e| arg(&e.to_string()))?;
    let mks =
        Array4::from_shape_vec((n, 1, h, w), mks.to_vec()).map_err(|e| arg(&e.to_string()))?;
    // Initial noise in the sample shape (a pipeline's latents), one row per image.
    // SAFETY: forwarded from the caller.
    let injected = unsafe { injected_noise(p, n, run.shapes.sample) }?;
    let mut progress = run.progress();
    let defaults = crate::inpaint::InpaintOptions::default();
    let how = crate::inpaint::InpaintOptions {
        resampling,
        // Inpainting's own default (every step), not img2img's.
        strength: opt_f64(p.strength).unwrap_or(defaults.strength),
    };
    let (x, _) = crate::inpaint::inpaint(
        &mut model,
        &run.opts,
        &imgs,
        &mks,
        &how,
        injected.as_ref(),
        &mut progress,
    )?;
    let x = x.as_standard_layout();
    // SAFETY: `out` holds `out_len` >= `need` = x.len() writable floats (caller, checked).
    unsafe { slice_mut(out, x.len(), "out") }?
        .copy_from_slice(x.as_slice().expect("standard layout"));
    Ok(())
}

/// Samples `params->n` samples into `out`.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct whose pointers are valid as the
/// header says; `out` holds `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample_with(
    model: *const EdgediffModel,
    params: *const EdgediffSampleParams,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_sample_params(params) }?;
        // SAFETY: the pointers in `p` and the buffers are valid as the header says (caller).
        unsafe { sample_into(m, &p, out, out_len) }
    })
}

/// Samples `params->n` samples into a file, as `edgediff sample --out path` does; with
/// `resume` non-zero, continues an interrupted run into the same folder or .npy.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct whose pointers are valid as the
/// header says; `path` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn edgediff_sample_to_file_with(
    model: *const EdgediffModel,
    params: *const EdgediffSampleParams,
    path: *const c_char,
    resume: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_sample_params(params) }?;
        // SAFETY: the pointers in `p` and the buffers are valid as the header says (caller).
        unsafe { sample_to_file(m, &p, path, resume != 0) }
    })
}

/// Inpaints `n` images where `masks` is 1 with the sampler, steps, seed, strength and initial
/// noise of `params`.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct; the buffers hold the sizes
/// the header states.
#[no_mangle]
pub unsafe extern "C" fn edgediff_inpaint_with(
    model: *const EdgediffModel,
    params: *const EdgediffSampleParams,
    images: *const f32,
    masks: *const f32,
    n: usize,
    jumps: usize,
    resample: usize,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_sample_params(params) }?;
        let resampling = crate::inpaint::Resampling { jumps, resample };
        // SAFETY: the pointers in `p` and the buffers are valid as the header says (caller).
        unsafe { inpaint_into(m, &p, images, masks, n, resampling, out, out_len) }
    })
}

/// Inverts `n` images to the noise DDIM decodes back to them, as `edgediff invert` does.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct; `images` holds n * C * H * W
/// floats and `noise` `noise_len` writable ones.
#[no_mangle]
pub unsafe extern "C" fn edgediff_invert(
    model: *const EdgediffModel,
    params: *const EdgediffSampleParams,
    images: *const f32,
    n: usize,
    noise: *mut f32,
    noise_len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_sample_params(params) }?;
        // SAFETY: the struct's sampler name is NUL-terminated.
        let sampler = unsafe { text(p.sampler, "sampler") }?;
        // Inversion is of deterministic DDIM: refuse what it would silently ignore, so the
        // same params decode the noise again (with init_noise set to it).
        if sampler != "ddim" || opt_f64(p.eta).is_some_and(|e| e != 0.0) {
            return Err(Error::options(
                "inversion is of deterministic DDIM: {0} must be ddim with {1} unset or 0",
                &["sampler", "eta"],
            ));
        }
        let mut model = lock(m);
        // SAFETY: the caller's struct is valid as the header says.
        let run = unsafe { Run::new(&p, &model, Op::Invert) }?;
        let [c, h, w] = model.metadata().sample_shape;
        let need = count(&[n, c, h, w], "n * C * H * W")?;
        if noise.is_null() {
            return Err(arg("noise is NULL"));
        }
        if noise_len < need {
            return Err(arg(&format!(
                "noise holds {noise_len} floats; {need} are needed"
            )));
        }
        // SAFETY: the caller passes n * C * H * W floats at `images`.
        let imgs = unsafe { slice(images, need, "images") }?;
        let imgs =
            Array4::from_shape_vec((n, c, h, w), imgs.to_vec()).map_err(|e| arg(&e.to_string()))?;
        // edit::invert takes no cancel flag: the callback's answer is not heeded.
        let mut progress = run.progress();
        let o = &run.opts;
        let z = crate::edit::invert(
            &mut model,
            &imgs,
            o.steps,
            o.spacing,
            o.batch_size,
            o.class_label,
            &mut progress,
        )?;
        let z = z.as_standard_layout();
        // SAFETY: `noise` holds `noise_len` >= `need` = z.len() writable floats (checked).
        unsafe { slice_mut(noise, z.len(), "noise") }?
            .copy_from_slice(z.as_slice().expect("standard layout"));
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Request handles: text-keyed setters over the same struct
// ---------------------------------------------------------------------------------------------

/// A sampling request: an `edgediff_sample_params` with the defaults, set by key and text, and
/// the storage its pointers point into.
pub struct EdgediffRequest {
    params: EdgediffSampleParams,
    sampler: CString,
    timesteps: Option<Vec<f64>>,
    prompt: Option<CString>,
    negative_prompt: Option<CString>,
    /// The prompts of "prompts" and the pointer array `params.prompts` points at (each
    /// CString's buffer stays where it is when the Vec moves).
    prompts: Option<(Vec<CString>, Vec<*const c_char>)>,
}

impl EdgediffRequest {
    fn new() -> Self {
        let params = EdgediffSampleParams::defaults();
        // SAFETY: the defaults' sampler is a static NUL-terminated name.
        let sampler = unsafe { CStr::from_ptr(params.sampler) }.to_owned();
        EdgediffRequest {
            params,
            sampler,
            timesteps: None,
            prompt: None,
            negative_prompt: None,
            prompts: None,
        }
    }

    /// The request as sampling parameters, pointing into `self`.
    fn params(&self) -> EdgediffSampleParams {
        let (timesteps, num_timesteps) = match &self.timesteps {
            Some(ts) => (ts.as_ptr(), ts.len()),
            None => (std::ptr::null(), 0),
        };
        let text = |t: &Option<CString>| t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
        let (prompts, prompts_len) = match &self.prompts {
            Some((_, ptrs)) => (ptrs.as_ptr(), ptrs.len()),
            None => (std::ptr::null(), 0),
        };
        EdgediffSampleParams {
            sampler: self.sampler.as_ptr(),
            timesteps,
            num_timesteps,
            prompt: text(&self.prompt),
            negative_prompt: text(&self.negative_prompt),
            prompts,
            prompts_len,
            ..self.params
        }
    }

    /// Sets the field `key` from text.
    fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
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
        let int = |v: &str| -> Result<i64, Error> {
            i64::try_from(size(v)?).map_err(|_| arg(&format!("{key}: '{v}' is too large")))
        };
        let p = &mut self.params;
        match key {
            "sampler" => {
                SamplerKind::new(value, SamplerParams::default())?;
                self.sampler = CString::new(value).map_err(|_| arg("sampler holds a NUL"))?;
            }
            // Kept as given (an empty prompt is a prompt: the empty string's embedding).
            "prompt" => {
                self.prompt = Some(CString::new(value).map_err(|_| arg("prompt holds a NUL"))?)
            }
            "negative_prompt" => {
                self.negative_prompt =
                    Some(CString::new(value).map_err(|_| arg("negative_prompt holds a NUL"))?)
            }
            // One prompt per line, as in `edgediff sample --prompts FILE` (a final newline ends
            // the last line; "\r\n" ends a line too).
            "prompts" => {
                let list = value
                    .lines()
                    .map(|l| CString::new(l).map_err(|_| arg("prompts holds a NUL")))
                    .collect::<Result<Vec<_>, _>>()?;
                let ptrs = list.iter().map(|c| c.as_ptr()).collect();
                self.prompts = Some((list, ptrs));
            }
            "strength" => p.strength = num(key, value, "a number")?,
            "spacing" => p.spacing = spacing_to_c(value.parse()?).0,
            "rho" => p.rho = num(key, value, "a number")?,
            "timesteps" => {
                let ts = value
                    .split(',')
                    .map(|t| num::<f64>(key, t, "a comma-separated list of numbers"))
                    .collect::<Result<Vec<_>, _>>()?;
                self.timesteps = Some(ts);
            }
            "steps" => p.steps = size(value)?,
            "vae_tile_size" => p.vae_tile_size = size(value)?,
            "height" => p.height = size(value)?,
            "width" => p.width = size(value)?,
            "n" => p.n = size(value)?,
            "first_index" => p.first_index = size(value)?,
            "batch_size" => p.batch_size = size(value)?,
            "seed" => p.seed = num(key, value, "an unsigned integer")?,
            "order" => p.order = int(value)?,
            "min_steps" => p.min_steps = int(value)?,
            "max_steps" => p.max_steps = int(value)?,
            "eta" => p.eta = num(key, value, "a number")?,
            "gamma" => p.gamma = num(key, value, "a number")?,
            "snr" => p.snr = num(key, value, "a number")?,
            "rtol" => p.rtol = num(key, value, "a number")?,
            "atol" => p.atol = num(key, value, "a number")?,
            "class" | "class_label" => p.class_label = num(key, value, "an integer")?,
            "guidance" => p.guidance = num(key, value, "a number")?,
            "x0_clip" => {
                p.x0_clip = enum_index(&X0_CLIPS, value.trim()).ok_or_else(|| {
                    Error::unknown("x0_clip", value, &["none", "range", "dynamic"])
                })?
            }
            "dynamic_threshold" => p.dynamic_threshold = num(key, value, "a number")?,
            "threshold_max" => p.threshold_max = num(key, value, "a number")?,
            other => return Err(arg(&format!("unknown request parameter '{other}'"))),
        }
        Ok(())
    }
}

/// A new request with the defaults of `edgediff_sample_params_init`.
///
/// # Safety
/// `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_new(out: *mut *mut EdgediffRequest) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        let req = register(&LIVE_REQUESTS, EdgediffRequest::new());
        // SAFETY: `out` is non-NULL (checked) and writable (caller).
        unsafe { out.write(req) };
        Ok(())
    })
}

/// Frees a request (NULL is allowed).
///
/// # Safety
/// `req` is NULL or a handle from `edgediff_request_new` not freed before.
#[no_mangle]
pub unsafe extern "C" fn edgediff_request_free(req: *mut EdgediffRequest) {
    if IN_CALLBACK.get() {
        set_error(REENTRY);
        return;
    }
    if !req.is_null() && live(&LIVE_REQUESTS).remove(&(req as usize)) {
        // SAFETY: the handle was live, so it came from Box::into_raw in `register` and is
        // freed once: it has just left the live set.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(req) })));
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

/// # Safety
/// `r` is NULL or a pointer from this library; the request is used by one thread at a time.
unsafe fn req_mut<'a>(r: *mut EdgediffRequest) -> Result<&'a mut EdgediffRequest, Error> {
    check_request(r)?;
    // SAFETY: a live request is a boxed EdgediffRequest that one thread uses at a time (the
    // header's rule), so this is the only reference.
    Ok(unsafe { &mut *r })
}

/// # Safety
/// As [`req_mut`].
unsafe fn req_ref<'a>(r: *const EdgediffRequest) -> Result<&'a EdgediffRequest, Error> {
    check_request(r)?;
    // SAFETY: a live request is a boxed EdgediffRequest not freed during the call.
    Ok(unsafe { &*r })
}

/// Sets a request parameter by name and text: any field of `edgediff_sample_params` that
/// holds a name or a number ("sampler", "spacing", "steps", "eta", "x0_clip"...; "class" for
/// "class_label"), "timesteps" as a comma-separated list, "prompts" one per line, e.g.
/// `edgediff_request_set(req, "steps", "50")`.
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
        // SAFETY: `req` is NULL or from this library; live handles are checked.
        let r = unsafe { req_mut(req) }?;
        // SAFETY: the caller passes NUL-terminated strings.
        let (key, value) = unsafe { (text(key, "key")?, text(value, "value")?) };
        r.set(key, value)
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
        // SAFETY: the caller's contract above; live handles are checked.
        let r = unsafe { req_mut(req) }?;
        r.params.progress = cb;
        r.params.progress_user = user;
        Ok(())
    })
}

/// Runs `typed` on the params a request handle holds: the request API is the typed one over
/// a stored struct. A bad handle is reported as any call's error.
///
/// # Safety
/// `req` is NULL or a pointer from this library (live handles are checked).
unsafe fn with_request(
    req: *const EdgediffRequest,
    typed: impl FnOnce(&EdgediffSampleParams) -> c_int,
) -> c_int {
    let mut params = None;
    let status = guard(|| {
        // SAFETY: `req` is NULL or from this library; live handles are checked.
        params = Some(unsafe { req_ref(req) }?.params());
        Ok(())
    });
    match params {
        Some(p) => typed(&p),
        None => status,
    }
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
    // SAFETY: the request's params point into the request, alive for the call; the rest is
    // the caller's, valid as the header says.
    unsafe { with_request(req, |p| edgediff_sample_with(model, p, out, out_len)) }
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
    // SAFETY: as in edgediff_sample.
    unsafe { with_request(req, |p| edgediff_sample_to_file_with(model, p, path, 0)) }
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
    // SAFETY: as in edgediff_sample.
    unsafe {
        with_request(req, |p| {
            edgediff_inpaint_with(model, p, images, masks, n, jumps, resample, out, out_len)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ELBO
// ---------------------------------------------------------------------------------------------

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
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: as for `model`.
        let p = unsafe { req_ref(req) }?.params();
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        let mut model = lock(m);
        let [c, h, w] = model.metadata().sample_shape;
        let len = count(&[n, c, h, w], "n * C * H * W")?;
        // SAFETY: the caller passes n * C * H * W floats at `images`.
        let imgs = unsafe { slice(images, len, "images") }?;
        let imgs =
            ndarray::ArrayView4::from_shape((n, c, h, w), imgs).map_err(|e| arg(&e.to_string()))?;
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = crate::elbo::ElboOptions {
            timesteps: match timesteps_per_image {
                0 => crate::elbo::TimestepSampling::All,
                k => crate::elbo::TimestepSampling::Draws(k),
            },
            seed: p.seed,
            batch_size: p.batch_size,
            cancel: Some(cancel.clone()),
            ..Default::default()
        };
        let mut progress = progress_fn(p.progress, p.progress_user, &cancel);
        let s = crate::elbo::elbo(&mut model, imgs, &opts, None, &mut progress)?.summary();
        let result = EdgediffElboResult {
            bits_per_dim: s.bits_per_dim,
            standard_error: s.standard_error.unwrap_or(f64::NAN),
            mc_standard_error: s.mc_standard_error.unwrap_or(f64::NAN),
            prior: s.prior,
            kl: s.kl,
            reconstruction: s.reconstruction,
        };
        // SAFETY: `out` is non-NULL (checked) and writable (caller).
        unsafe { put(out, result, "out") }
    })
}

// ---------------------------------------------------------------------------------------------
// Likelihood
// ---------------------------------------------------------------------------------------------

/// What `edgediff likelihood` can set (`edgediff_likelihood_params`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffLikelihoodParams {
    pub struct_size: usize,
    /// An `edgediff_ode_solver`.
    pub solver: c_int,
    /// An `edgediff_probe`.
    pub probe: c_int,
    pub steps: usize,
    pub rtol: f64,
    pub atol: f64,
    pub probes: usize,
    pub fd_step: f64,
    pub bins: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub class_label: i64,
    pub progress: EdgediffProgress,
    pub progress_user: *mut c_void,
}

// SAFETY: repr(C), struct_size first, only integers, floats, raw and Option<fn> pointers.
unsafe impl SizedStruct for EdgediffLikelihoodParams {
    const NAME: &'static str = "edgediff_likelihood_params";
    const MIN_SIZE: usize = std::mem::size_of::<EdgediffLikelihoodParams>();
}

impl EdgediffLikelihoodParams {
    /// `LikelihoodOptions::default()` as C fields.
    fn defaults() -> Self {
        let d = LikelihoodOptions::default();
        let (solver, steps, rtol, atol) = match d.solver {
            OdeSolver::Rk4 { steps } => ("rk4", steps, f64::NAN, f64::NAN),
            OdeSolver::Adaptive { rtol, atol } => {
                ("adaptive", crate::likelihood::DEFAULT_STEPS, rtol, atol)
            }
        };
        let probe = match d.probe {
            Probe::Rademacher => "rademacher",
            Probe::Gaussian => "gaussian",
        };
        EdgediffLikelihoodParams {
            struct_size: std::mem::size_of::<Self>(),
            solver: enum_index(&ODE_SOLVERS, solver).unwrap_or(0),
            probe: enum_index(&PROBES, probe).unwrap_or(0),
            steps,
            rtol,
            atol,
            probes: d.probes,
            fd_step: d.fd_step,
            bins: d.bins,
            batch_size: d.batch_size,
            seed: d.seed,
            class_label: d.class_label.unwrap_or(EDGEDIFF_UNSET),
            progress: None,
            progress_user: std::ptr::null_mut(),
        }
    }
}

/// The library's likelihood options of the C struct: the one conversion.
fn likelihood_options(p: &EdgediffLikelihoodParams) -> Result<LikelihoodOptions, Error> {
    let (rtol, atol) = (opt_f64(p.rtol), opt_f64(p.atol));
    let solver = match enum_value(&ODE_SOLVERS, p.solver, "solver")? {
        "rk4" if rtol.is_some() || atol.is_some() => {
            return Err(Error::options(
                "{0} and {1} apply to {2} EDGEDIFF_ODE_ADAPTIVE",
                &["rtol", "atol", "solver"],
            ))
        }
        "rk4" => OdeSolver::Rk4 { steps: p.steps },
        _ => {
            let Some(rtol) = rtol else {
                return Err(Error::options(
                    "{0} EDGEDIFF_ODE_ADAPTIVE needs {1}",
                    &["solver", "rtol"],
                ));
            };
            // As `edgediff likelihood`: the absolute tolerance defaults to the relative one.
            OdeSolver::Adaptive {
                rtol,
                atol: atol.unwrap_or(rtol),
            }
        }
    };
    let opts = LikelihoodOptions {
        solver,
        probes: p.probes,
        probe: enum_value(&PROBES, p.probe, "probe")?.parse()?,
        fd_step: p.fd_step,
        batch_size: p.batch_size,
        seed: p.seed,
        class_label: class_of(p.class_label),
        bins: p.bins,
    };
    opts.validate()?;
    Ok(opts)
}

/// What `edgediff_likelihood` found (`edgediff_likelihood_result`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffLikelihoodResult {
    pub struct_size: usize,
    pub log_density_mean: f64,
    pub log_density_se: f64,
    pub bits_per_dim_mean: f64,
    pub bits_per_dim_se: f64,
    pub dim: usize,
    pub bin_width: f64,
    pub network_calls: usize,
}

// SAFETY: repr(C), struct_size first, only integers and floats.
unsafe impl SizedStruct for EdgediffLikelihoodResult {
    const NAME: &'static str = "edgediff_likelihood_result";
    const MIN_SIZE: usize = std::mem::size_of::<EdgediffLikelihoodResult>();
}

/// Fills `params` (`size` bytes, the caller's sizeof) with the defaults; the header's
/// `edgediff_likelihood_params_init` calls it.
///
/// # Safety
/// `params` points to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn edgediff_likelihood_params_init_sized(
    params: *mut EdgediffLikelihoodParams,
    size: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { init_sized(params, EdgediffLikelihoodParams::defaults(), size) }
}

/// log p(x) of `n` images by the probability-flow ODE, as `edgediff likelihood` computes it.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct; `images` holds n * C * H * W
/// floats; `result` a struct with its `struct_size` set; `log_density` and `bits_per_dim` are
/// NULL or hold `n` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn edgediff_likelihood(
    model: *const EdgediffModel,
    params: *const EdgediffLikelihoodParams,
    images: *const f32,
    n: usize,
    result: *mut EdgediffLikelihoodResult,
    log_density: *mut f64,
    bits_per_dim: *mut f64,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_prefix(params, EdgediffLikelihoodParams::defaults()) }?;
        // SAFETY: `result` is NULL or a struct with its struct_size set (caller).
        let result_size = unsafe { size_of_struct(result) }?;
        let opts = likelihood_options(&p)?;
        let mut model = lock(m);
        let [c, h, w] = model.metadata().sample_shape;
        let len = count(&[n, c, h, w], "n * C * H * W")?;
        // SAFETY: the caller passes n * C * H * W floats at `images`.
        let imgs = unsafe { slice(images, len, "images") }?;
        let imgs =
            Array4::from_shape_vec((n, c, h, w), imgs.to_vec()).map_err(|e| arg(&e.to_string()))?;
        // The per-image outputs, checked before the (long) run; one buffer for both would
        // be two mutable slices of the same memory.
        if !log_density.is_null() && log_density == bits_per_dim {
            return Err(Error::options(
                "{0} and {1} are the same buffer",
                &["log_density", "bits_per_dim"],
            ));
        }
        let outs = [(log_density, "log_density"), (bits_per_dim, "bits_per_dim")];
        let mut dsts = Vec::new();
        for (ptr, what) in outs {
            // SAFETY: NULL or `n` writable doubles (caller).
            dsts.push(
                (!ptr.is_null())
                    .then(|| unsafe { slice_mut(ptr, n, what) })
                    .transpose()?,
            );
        }
        // log_likelihood takes no cancel flag: the callback's answer is not heeded.
        let cancel = AtomicBool::new(false);
        let mut progress = progress_fn(p.progress, p.progress_user, &cancel);
        let report = crate::likelihood::log_likelihood(&mut model, &imgs, &opts, &mut progress)?;
        let nats: Vec<f64> = report.images.iter().map(|i| i.log_density).collect();
        let bpd: Vec<f64> = report.images.iter().map(|i| i.bits_per_dim).collect();
        let (log_density_mean, log_density_se) = crate::likelihood::mean_and_se(&nats);
        let (bits_per_dim_mean, bits_per_dim_se) = crate::likelihood::mean_and_se(&bpd);
        for (dst, values) in dsts.into_iter().zip([&nats, &bpd]) {
            if let Some(dst) = dst {
                dst.copy_from_slice(values);
            }
        }
        let r = EdgediffLikelihoodResult {
            struct_size: result_size,
            log_density_mean,
            log_density_se,
            bits_per_dim_mean,
            bits_per_dim_se,
            dim: report.dim,
            bin_width: report.bin_width,
            network_calls: report.network_calls,
        };
        // SAFETY: `result` holds `result_size` writable bytes (its struct_size, checked).
        unsafe { write_prefix(result, r, result_size) }
    })
}

// ---------------------------------------------------------------------------------------------
// Calibration
// ---------------------------------------------------------------------------------------------

/// Calibration progress: `(sampler runs so far, best pilot RMSE so far, user pointer)`.
pub type EdgediffCalibrateProgress = Option<unsafe extern "C" fn(usize, f64, *mut c_void)>;

/// What `edgediff calibrate` can set (`edgediff_calibrate_params`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffCalibrateParams {
    pub struct_size: usize,
    pub sampler: *const c_char,
    pub order: i64,
    pub steps: usize,
    pub pilot: usize,
    pub seed: u64,
    pub teacher_steps: usize,
    pub max_evals: usize,
    pub batch_size: usize,
    pub class_label: i64,
    pub guidance: f64,
    pub progress: EdgediffCalibrateProgress,
    pub progress_user: *mut c_void,
    // Version 2 (the fitted sampler): appended, so version 1 structs stay readable.
    /// `CalibrateOptions::starts` (0: the default).
    pub starts: usize,
    /// Where to write the calibration file (`edgediff calibrate --save`); NULL: nowhere.
    pub save: *const c_char,
}

// SAFETY: repr(C), struct_size first, only integers, floats, raw and Option<fn> pointers.
unsafe impl SizedStruct for EdgediffCalibrateParams {
    const NAME: &'static str = "edgediff_calibrate_params";
    /// Version 1 ended at `progress_user`.
    const MIN_SIZE: usize = std::mem::offset_of!(EdgediffCalibrateParams, starts);
}

impl EdgediffCalibrateParams {
    /// `CalibrateOptions::default()` as C fields; the default sampler's order stays unset and
    /// comes back through [`sampler_kind`].
    fn defaults() -> Self {
        let d = CalibrateOptions::default();
        EdgediffCalibrateParams {
            struct_size: std::mem::size_of::<Self>(),
            sampler: static_name(d.sampler.name()),
            order: EDGEDIFF_UNSET,
            steps: d.steps,
            pilot: d.pilot,
            seed: d.seed,
            teacher_steps: d.teacher_steps,
            max_evals: d.max_evals,
            batch_size: d.batch_size,
            class_label: d.class_label.unwrap_or(EDGEDIFF_UNSET),
            guidance: f64_or_unset(d.guidance),
            progress: None,
            progress_user: std::ptr::null_mut(),
            starts: d.starts,
            save: std::ptr::null(),
        }
    }
}

/// The library's calibration options of the C struct: the one conversion.
///
/// # Safety
/// `p.sampler` is NUL-terminated.
unsafe fn calibrate_options(p: &EdgediffCalibrateParams) -> Result<CalibrateOptions, Error> {
    let defaults = CalibrateOptions::default();
    // SAFETY: the caller's struct holds a NUL-terminated sampler name.
    let name = unsafe { text(p.sampler, "sampler") }?;
    let params = SamplerParams {
        order: opt_usize(p.order),
        ..Default::default()
    };
    Ok(CalibrateOptions {
        sampler: sampler_kind(name, params, defaults.sampler)?,
        steps: p.steps,
        pilot: p.pilot,
        seed: p.seed,
        teacher_steps: p.teacher_steps,
        max_evals: p.max_evals,
        starts: p.starts,
        batch_size: p.batch_size,
        class_label: class_of(p.class_label),
        guidance: opt_f64(p.guidance),
    })
}

/// What `edgediff_calibrate` achieved on the pilot batch (`edgediff_calibrate_result`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgediffCalibrateResult {
    pub struct_size: usize,
    pub num_timesteps: usize,
    pub rmse: f64,
    pub rmse_logsnr: f64,
    pub rmse_trailing: f64,
    pub teacher_rmse: f64,
    pub evals: usize,
}

// SAFETY: repr(C), struct_size first, only integers and floats.
unsafe impl SizedStruct for EdgediffCalibrateResult {
    const NAME: &'static str = "edgediff_calibrate_result";
    const MIN_SIZE: usize = std::mem::size_of::<EdgediffCalibrateResult>();
}

/// Fills `params` (`size` bytes, the caller's sizeof) with the defaults; the header's
/// `edgediff_calibrate_params_init` calls it.
///
/// # Safety
/// `params` points to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn edgediff_calibrate_params_init_sized(
    params: *mut EdgediffCalibrateParams,
    size: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { init_sized(params, EdgediffCalibrateParams::defaults(), size) }
}

/// Calibrates `params->steps` time points into `timesteps`, as `edgediff calibrate` does.
///
/// # Safety
/// `model` is a valid handle; `params` an initialised struct; `timesteps` holds
/// `timesteps_len` writable doubles; `result` is NULL or a struct with its `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn edgediff_calibrate(
    model: *const EdgediffModel,
    params: *const EdgediffCalibrateParams,
    timesteps: *mut f64,
    timesteps_len: usize,
    result: *mut EdgediffCalibrateResult,
) -> c_int {
    guard(|| {
        // SAFETY: `model` is NULL or from this library; live handles are checked.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: `params` is NULL or an initialised struct (caller).
        let p = unsafe { read_prefix(params, EdgediffCalibrateParams::defaults()) }?;
        // SAFETY: its sampler name is NUL-terminated (caller).
        let opts = unsafe { calibrate_options(&p) }?;
        let result_size = (!result.is_null())
            // SAFETY: a non-NULL `result` has its struct_size set (caller).
            .then(|| unsafe { size_of_struct(result) })
            .transpose()?;
        if timesteps_len < opts.steps {
            return Err(arg(&format!(
                "timesteps holds {timesteps_len} values; steps {} needs as many",
                opts.steps
            )));
        }
        // SAFETY: the caller passes `timesteps_len` writable doubles.
        let dst = unsafe { slice_mut(timesteps, timesteps_len, "timesteps") }?;
        // SAFETY: `p.save` is NULL or NUL-terminated (caller).
        let save = unsafe { opt_text(p.save, "save") }?.map(std::path::Path::new);
        if let Some(path) = save {
            crate::output::check_file(path)?; // written at the end: checked before the work
        }
        let mut model = lock(m);
        let (cb, user) = (p.progress, p.progress_user);
        let cal = crate::calibrate::calibrate(&mut model, &opts, &mut |evals, best| {
            if let Some(cb) = cb {
                // SAFETY: the caller registered `cb` to be called with `user` from this thread.
                in_callback(|| unsafe { cb(evals, best, user) })
            }
        })?;
        let k = cal.timesteps.len();
        if k > dst.len() {
            return Err(arg(&format!(
                "timesteps holds {timesteps_len} values; {k} are needed"
            )));
        }
        dst[..k].copy_from_slice(&cal.timesteps);
        if let Some(path) = save {
            CalibrationFile::new(&model, &opts, &cal).write(path)?;
        }
        if let Some(size) = result_size {
            let r = EdgediffCalibrateResult {
                struct_size: size,
                num_timesteps: k,
                rmse: cal.rmse,
                rmse_logsnr: cal.rmse_logsnr,
                rmse_trailing: cal.rmse_trailing,
                teacher_rmse: cal.teacher_rmse,
                evals: cal.evals,
            };
            // SAFETY: `result` holds `size` writable bytes (its struct_size, checked).
            unsafe { write_prefix(result, r, size) }?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const SPACING_KARRAS: c_int = 3;

    /// The C defaults convert back to the library's own (one source of defaults).
    #[test]
    fn defaults_round_trip() {
        // SAFETY: the defaults hold a static sampler name and no other pointer.
        let s = unsafe { sample_options(&EdgediffSampleParams::defaults()) }.unwrap();
        assert_eq!(format!("{s:?}"), format!("{:?}", SampleOptions::default()));
        // SAFETY: the test's structs hold static strings and no other pointer.
        let m = unsafe { model_options(&EdgediffModelParams::defaults()) }.unwrap();
        assert_eq!(format!("{m:?}"), format!("{:?}", ModelOptions::default()));
        let l = likelihood_options(&EdgediffLikelihoodParams::defaults()).unwrap();
        assert_eq!(
            format!("{l:?}"),
            format!("{:?}", LikelihoodOptions::default())
        );
        // SAFETY: as above.
        let c = unsafe { calibrate_options(&EdgediffCalibrateParams::defaults()) }.unwrap();
        assert_eq!(
            format!("{c:?}"),
            format!("{:?}", CalibrateOptions::default())
        );
    }

    #[test]
    fn messages_name_the_c_fields() {
        let mut p = EdgediffSampleParams::defaults();
        p.eta = 2.0;
        // SAFETY: as in defaults_round_trip.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(e.to_string(), "invalid argument: eta 2 is outside [0, 1]");
        let mut p = EdgediffSampleParams::defaults();
        p.sampler = c"tcd".as_ptr();
        p.gamma = -0.5;
        // SAFETY: as in defaults_round_trip.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: gamma -0.5 is outside [0, 1]"
        );
        let mut p = EdgediffSampleParams::defaults();
        p.rho = 3.0;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: rho applies to spacing EDGEDIFF_SPACING_KARRAS"
        );
        p.spacing = SPACING_KARRAS;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let s = unsafe { sample_options(&p) }.unwrap();
        assert_eq!(s.spacing, Spacing::Karras { rho: 3.0 });
        p.x0_clip = X0_CLIP_DYNAMIC;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert!(e
            .to_string()
            .contains("x0_clip EDGEDIFF_X0_CLIP_DYNAMIC needs dynamic_threshold"));
        p.dynamic_threshold = 1.5;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: dynamic_threshold 1.5 must be in (0, 1] and threshold_max inf at least 1"
        );
        p.spacing = 9;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: spacing 9 is outside 0..=5"
        );
    }

    #[test]
    fn struct_size_is_checked_and_prefixes_read() {
        let d = EdgediffSampleParams::defaults();
        let mut p = d;
        p.struct_size = 8;
        // SAFETY: `p` is a whole struct, so any accepted size is readable.
        let e = unsafe { read_prefix(&p, d) }.unwrap_err();
        assert!(e
            .to_string()
            .contains("struct_size 8 is not a size of edgediff_sample_params"));
        p.struct_size = std::mem::size_of::<EdgediffSampleParams>() + 8;
        // SAFETY: as above (sizes beyond the struct are refused before any read).
        assert!(unsafe { read_prefix(&p, d) }.is_err());
        p.struct_size = std::mem::size_of::<EdgediffSampleParams>();
        p.steps = 7;
        // SAFETY: as above (sizes beyond the struct are refused before any read).
        assert_eq!(unsafe { read_prefix(&p, d) }.unwrap().steps, 7);
        // SAFETY: NULL is refused before any read.
        assert!(unsafe { read_prefix(std::ptr::null::<EdgediffSampleParams>(), d) }.is_err());
    }

    #[test]
    fn a_version_1_struct_reads_without_prompts() {
        // A program built before the prompts were appended: its struct ends at progress_user,
        // and the bytes after it (here garbage) must not be read.
        let mut p = EdgediffSampleParams::defaults();
        p.struct_size = EdgediffSampleParams::MIN_SIZE;
        p.prompt = 0x10 as *const c_char;
        p.negative_prompt = 0x10 as *const c_char;
        // SAFETY: `p` is a whole struct; read_prefix reads only its first MIN_SIZE bytes.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        assert!(read.prompt.is_null() && read.negative_prompt.is_null());
        // The full size reads them: a prompt, and invalid UTF-8 named by its field.
        let bad = b"caf\xe9\0";
        p.struct_size = std::mem::size_of::<EdgediffSampleParams>();
        p.prompt = c"a cat".as_ptr();
        p.negative_prompt = bad.as_ptr().cast();
        // SAFETY: `p` is a whole struct.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        // SAFETY: its prompt pointers are static NUL-terminated strings; the sampler static.
        let e = unsafe { sample_options(&read) }.unwrap_err();
        assert!(
            e.to_string().contains("negative_prompt is not valid UTF-8"),
            "{e}"
        );
        p.negative_prompt = std::ptr::null();
        // SAFETY: as above.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        // SAFETY: as above.
        let o = unsafe { sample_options(&read) }.unwrap();
        assert_eq!(
            (o.prompt.as_deref(), o.negative_prompt),
            (Some("a cat"), None)
        );
    }

    #[test]
    fn prompt_lists_and_latents_name_their_fields() {
        let mut p = EdgediffSampleParams::defaults();
        p.prompts_len = 2;
        // SAFETY: the test's structs hold static strings and no other pointer.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert_eq!(
            e.message_with(&c_field),
            "invalid argument: prompts is NULL but prompts_len is 2"
        );
        let list = [c"a cat".as_ptr(), std::ptr::null()];
        p.prompts = list.as_ptr();
        // SAFETY: `list` holds prompts_len pointers, NULL or static strings.
        let e = unsafe { sample_options(&p) }.unwrap_err();
        assert!(e.to_string().contains("prompts[1] is NULL"), "{e}");
        p.prompts_len = 1;
        // SAFETY: as above.
        let o = unsafe { sample_options(&p) }.unwrap();
        assert_eq!(o.prompts, Some(vec!["a cat".to_string()]));
        // The library's keep_latents is the C field latents_out.
        let e = Error::options("{0} applies to pipelines", &["keep_latents"]);
        assert_eq!(
            e.message_with(&c_field),
            "invalid argument: latents_out applies to pipelines"
        );
        // Unset strength is the library's img2img default; a set one is taken as it is.
        assert_eq!(o.strength, SampleOptions::default().strength);
        p.strength = 0.6;
        // SAFETY: as above.
        assert_eq!(unsafe { sample_options(&p) }.unwrap().strength, 0.6);
    }

    #[test]
    fn a_version_4_struct_reads_no_image_size() {
        // A program built before height and width: its struct ends at gamma, and what lies
        // after it (here a size) is not read.
        let mut p = EdgediffSampleParams::defaults();
        p.height = 32;
        p.width = 48;
        p.struct_size = std::mem::offset_of!(EdgediffSampleParams, height);
        // SAFETY: `p` is a whole struct; read_prefix reads only its first struct_size bytes.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        assert_eq!((read.height, read.width), (0, 0));
        p.struct_size = std::mem::size_of::<EdgediffSampleParams>();
        // SAFETY: as above.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        assert_eq!((read.height, read.width), (32, 48));
        // The library's image_size is the pair of fields in C messages; the request sets them.
        let e = Error::options("{0} applies to pipelines", &["image_size"]);
        assert_eq!(
            e.message_with(&c_field),
            "invalid argument: height/width applies to pipelines"
        );
        let mut r = EdgediffRequest::new();
        r.set("height", "16").unwrap();
        r.set("width", "32").unwrap();
        assert_eq!((r.params().height, r.params().width), (16, 32));
        assert!(r.set("width", "-4").is_err());
    }

    #[test]
    fn a_version_6_struct_reads_no_first_index() {
        // A program built before index ranges: its struct ends at calibration, and what lies
        // after it (here an index) is not read.
        let mut p = EdgediffSampleParams::defaults();
        p.first_index = 12;
        p.struct_size = std::mem::offset_of!(EdgediffSampleParams, first_index);
        // SAFETY: `p` is a whole struct; read_prefix reads only its first struct_size bytes.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        assert_eq!(read.first_index, 0);
        p.struct_size = std::mem::size_of::<EdgediffSampleParams>();
        // SAFETY: as above.
        let read = unsafe { read_prefix(&p, EdgediffSampleParams::defaults()) }.unwrap();
        // SAFETY: the test's structs hold static strings and no other pointer.
        assert_eq!(unsafe { sample_options(&read) }.unwrap().first_index, 12);
        let mut r = EdgediffRequest::new();
        r.set("first_index", "8").unwrap();
        assert_eq!(r.params().first_index, 8);
        assert!(r.set("first_index", "-1").is_err());
    }

    #[test]
    fn request_prompts_are_lines() {
        let mut r = EdgediffRequest::new();
        r.set("prompts", "a cat\r\nthe sea\n").unwrap();
        let p = r.params();
        // SAFETY: the request's params point into `r`, alive here.
        let o = unsafe { sample_options(&p) }.unwrap();
        assert_eq!(o.prompts, Some(vec!["a cat".into(), "the sea".into()]));
        r.set("strength", "0.6").unwrap();
        assert_eq!(r.params().strength, 0.6);
        assert!(r.set("strength", "much").is_err());
    }

    #[test]
    fn sizes_multiplied_from_caller_input_do_not_overflow() {
        let e = count(&[usize::MAX / 2, 3, 1, 1], "n * C * H * W").unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        assert_eq!(count(&[4, 1, 8, 8], "n * C * H * W").unwrap(), 256);
        assert!(check_len::<f32>(usize::MAX / 4, "out").is_err());
    }

    #[test]
    fn enum_names_match_the_library() {
        for (i, s) in SPACINGS.iter().enumerate() {
            let spacing: Spacing = s.to_str().unwrap().parse().unwrap();
            assert_eq!(spacing_to_c(spacing).0, i as c_int);
        }
        for s in PROVIDERS {
            let p: Provider = s.to_str().unwrap().parse().unwrap();
            assert_eq!(p.name(), s.to_str().unwrap());
        }
        for s in PROBES {
            s.to_str().unwrap().parse::<Probe>().unwrap();
        }
        assert!(edgediff_spacing_name(6).is_null() && edgediff_provider_name(-1).is_null());
    }

    #[test]
    fn layouts_have_no_padding() {
        // 64-bit targets: every field 8 bytes but the pairs of ints, so adding a field later
        // cannot land in padding an older caller left uninitialised.
        if std::mem::size_of::<usize>() == 8 {
            assert_eq!(std::mem::size_of::<EdgediffSampleParams>(), 42 * 8);
            // Version 1 (before the prompts) was 27 fields of 8 bytes, version 2 (before
            // vae_tile_size) 29, version 3 (before init_image) 30, version 4 (before height)
            // 38 ending with gamma, version 5 (before calibration) 40 ending with width,
            // version 6 (before first_index) 41 ending with calibration; version 7 ends with
            // first_index.
            assert_eq!(EdgediffSampleParams::MIN_SIZE, 27 * 8);
            // Where the versions put these fields, counted in 8-byte fields from the start.
            let firsts = [
                (
                    std::mem::offset_of!(EdgediffSampleParams, vae_tile_size),
                    29,
                ),
                (std::mem::offset_of!(EdgediffSampleParams, init_image), 30),
                (std::mem::offset_of!(EdgediffSampleParams, gamma), 37),
                (std::mem::offset_of!(EdgediffSampleParams, height), 38),
                (std::mem::offset_of!(EdgediffSampleParams, width), 39),
                (std::mem::offset_of!(EdgediffSampleParams, calibration), 40),
                (std::mem::offset_of!(EdgediffSampleParams, first_index), 41),
            ];
            for (offset, fields) in firsts {
                assert_eq!(offset, fields * 8);
            }
            assert_eq!(std::mem::size_of::<EdgediffModelParams>(), 5 * 8 + 6 * 4);
            assert_eq!(std::mem::size_of::<EdgediffLikelihoodParams>(), 13 * 8);
            // Version 1 (before starts and save) was 13 fields.
            assert_eq!(std::mem::size_of::<EdgediffCalibrateParams>(), 15 * 8);
            assert_eq!(EdgediffCalibrateParams::MIN_SIZE, 13 * 8);
        }
    }
}
