/* edgediff: run self-describing ONNX diffusion models from C.
 *
 * Link: -ledgediff (libedgediff.a or libedgediff.so from `cargo build --release`, in
 * target/release/) plus -ldl -lpthread -lm for the static library; or `pkg-config edgediff`.
 * ONNX Runtime is loaded at run time (edgediff_init, else ORT_DYLIB_PATH, else .ort/ of the
 * repository the library was built in).
 *
 * Every function returning int returns a status: EDGEDIFF_OK, or an error whose message
 * edgediff_last_error() gives (per thread, valid until that thread's next edgediff call).
 * NULL handles, NULL buffers, too small buffers and invalid UTF-8 are EDGEDIFF_ERR_ARGUMENT,
 * never a crash; no Rust panic crosses this interface (it becomes EDGEDIFF_ERR_PANIC). Sizes
 * computed from arguments (n * C * H * W) that overflow are EDGEDIFF_ERR_ARGUMENT too.
 * Messages about an option name it by its field name in the structs below ("eta",
 * "batch_size"), the library's own name for it.
 *
 * Parameter structs (edgediff_model_params, edgediff_sample_params, edgediff_likelihood_params,
 * edgediff_calibrate_params) are filled with the defaults by their *_init function, then the
 * caller sets the fields it wants and passes the struct by pointer:
 *
 *     edgediff_sample_params p;
 *     edgediff_sample_params_init(&p);
 *     p.sampler = "dpm++2m"; p.steps = 20; p.n = 4;
 *     edgediff_sample_with(model, &p, out, out_len);
 *
 * ABI: each struct begins with struct_size, which *_init sets to the sizeof the caller was
 * compiled with (the *_init functions are inline: they pass sizeof to the exported
 * *_init_sized). The library reads only the bytes struct_size covers and uses its defaults
 * for fields past them; later versions only append fields, so a program built against this
 * header keeps working with newer libraries. A struct_size the library does not know (a
 * program built against a newer header, or a struct never initialised) is
 * EDGEDIFF_ERR_ARGUMENT. Result structs (edgediff_likelihood_result, edgediff_calibrate_result)
 * work the same way: set struct_size = sizeof before the call (`r = {.struct_size = sizeof r}`); the
 * library writes that many bytes. Pointers in a struct are used during the call only (read,
 * or written for an output buffer such as latents_out); nothing keeps them afterwards.
 *
 * Unset values: integer sampler options and class labels take EDGEDIFF_UNSET (any negative
 * value): "the sampler's default" (listed in `edgediff samplers`) or unconditional. Floating-
 * point options take NaN (NAN from <math.h>) for "unset" / "none".
 *
 * Threads: a model handle may be shared by threads; runs on one handle are serialised by its
 * lock (open one handle per thread to run in parallel). A request belongs to one thread at a
 * time. Handles are checked against the live ones: a freed handle passed again is
 * EDGEDIFF_ERR_ARGUMENT and a second free does nothing (unless a newer handle of the same kind
 * got the same address). Freeing a handle while another thread is inside a call with it is
 * undefined, as for free(). Progress callbacks are called on the thread that made the call.
 *
 * Re-entry: a progress callback must not call back into edgediff (the run holds its model's
 * lock and uses its request and buffers). Any such call, except edgediff_version and
 * edgediff_last_error, does nothing and returns EDGEDIFF_ERR_ARGUMENT (the free functions just
 * return), with edgediff_last_error() saying why; to stop a run, return non-zero instead.
 *
 * ONNX Runtime: a failed edgediff_init (a wrong path) is not remembered; a later call may try
 * another path. Once one library is loaded it stays: a different path is then an error.
 */
#ifndef EDGEDIFF_H
#define EDGEDIFF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEDIFF_OK 0
#define EDGEDIFF_ERR_ARGUMENT 2  /* a bad argument or option */
#define EDGEDIFF_ERR_MODEL 3     /* model file, metadata, provider or ONNX Runtime problem */
#define EDGEDIFF_ERR_IO 4        /* reading or writing a file failed, or a bad input file */
#define EDGEDIFF_ERR_NONFINITE 5 /* the network returned NaN or Inf */
#define EDGEDIFF_ERR_CANCELLED 6 /* the progress callback asked to stop */
#define EDGEDIFF_ERR_PANIC 7     /* an internal error (a bug): please report it */

/* An integer option left to its default; a class label meaning unconditional. */
#define EDGEDIFF_UNSET (-1)
#define EDGEDIFF_UNCONDITIONAL (-1)

typedef struct EdgediffModel edgediff_model;
typedef struct EdgediffRequest edgediff_request;

/* Called after every step with (steps done, total steps, user); return non-zero to cancel. */
typedef int (*edgediff_progress_fn)(size_t done, size_t total, void *user);

/* The library version ("0.1.0"), a static string. */
const char *edgediff_version(void);

/* The last error message of this thread ("" after a success). */
const char *edgediff_last_error(void);

/* Loads ONNX Runtime from path (NULL: the default search). Optional: opening a model loads it
 * by the default search. One ONNX Runtime per process. */
int edgediff_init(const char *onnxruntime_path);

/* ---------------------------------------------------------------------------------------
 * Enums. Struct fields holding them are int (a fixed size whatever the compiler's enums).
 * Each has name helpers: *_name gives the static name of a value (NULL for none), *_from_name
 * the value of a name (EDGEDIFF_ERR_ARGUMENT for an unknown one, listing the known ones).
 */

/* Time-step spacing, as `edgediff sample --spacing`. */
typedef enum edgediff_spacing {
    EDGEDIFF_SPACING_DEFAULT = -1, /* the model's, as `sample` without --spacing: a text-to-image
                                    * pipeline's scheduler settings (its spacing, steps_offset,
                                    * set_alpha_to_one), "trailing" for other models; no name */
    EDGEDIFF_SPACING_LEADING = 0,  /* "leading": t = (steps-1-i) T/steps (DDIM, diffusers) */
    EDGEDIFF_SPACING_TRAILING = 1, /* "trailing": always starts at T-1 (Lin et al. 2024) */
    EDGEDIFF_SPACING_LINSPACE = 2, /* "linspace": round(linspace(0, T-1, steps)) */
    EDGEDIFF_SPACING_KARRAS = 3,   /* "karras": even in sigma^(1/rho) (Karras et al. 2022) */
    EDGEDIFF_SPACING_LOGSNR = 4,   /* "logsnr": even in log-SNR (DPM-Solver) */
    EDGEDIFF_SPACING_LCM = 5       /* "lcm": LCMScheduler's grid, 50 original steps (lcm, tcd) */
} edgediff_spacing;

const char *edgediff_spacing_name(int spacing);
int edgediff_spacing_from_name(const char *name, int *out);

/* Execution provider, as `--provider`. GPU providers need a GPU build (cargo features cuda /
 * tensorrt) and ONNX Runtime's GPU library. */
typedef enum edgediff_provider {
    EDGEDIFF_PROVIDER_CPU = 0,     /* "cpu" */
    EDGEDIFF_PROVIDER_CUDA = 1,    /* "cuda" */
    EDGEDIFF_PROVIDER_TENSORRT = 2 /* "tensorrt" */
} edgediff_provider;

const char *edgediff_provider_name(int provider);
int edgediff_provider_from_name(const char *name, int *out);

/* What to do with x0 predictions outside the model's data range at every step. */
typedef enum edgediff_x0_clip {
    EDGEDIFF_X0_CLIP_NONE = 0,   /* leave them (`sample` without clipping flags) */
    EDGEDIFF_X0_CLIP_RANGE = 1,  /* clamp to the data range (`--clip-x0`) */
    EDGEDIFF_X0_CLIP_DYNAMIC = 2 /* Imagen's dynamic thresholding (`--dynamic-threshold`) */
} edgediff_x0_clip;

/* How edgediff_likelihood integrates the probability-flow ODE. */
typedef enum edgediff_ode_solver {
    EDGEDIFF_ODE_RK4 = 0,     /* classic Runge-Kutta, `steps` steps uniform in log(sigma/alpha) */
    EDGEDIFF_ODE_ADAPTIVE = 1 /* Bogacki-Shampine 3(2) with error control (rtol, atol) */
} edgediff_ode_solver;

/* Hutchinson probe distribution of edgediff_likelihood. */
typedef enum edgediff_probe {
    EDGEDIFF_PROBE_RADEMACHER = 0, /* +-1 with equal odds: the lower-variance choice */
    EDGEDIFF_PROBE_GAUSSIAN = 1    /* standard normal */
} edgediff_probe;

/* ---------------------------------------------------------------------------------------
 * Models
 */

/* How to open a model: the model options every CLI command takes. Defaults in brackets. */
typedef struct edgediff_model_params {
    size_t struct_size;    /* set by edgediff_model_params_init */
    const char *path;      /* the ONNX file [NULL: the embedded default MNIST model] */
    const char *ort_lib;   /* libonnxruntime.so to load [NULL: ORT_DYLIB_PATH, else .ort/ of the
                            * repository]; only the first model opened in a process loads it */
    const char *trt_cache; /* directory for cached TensorRT engines, tensorrt only [NULL] */
    size_t threads;        /* ONNX Runtime intra-op threads [0: its own choice] */
    int provider;          /* an edgediff_provider [EDGEDIFF_PROVIDER_CPU] */
    int device_id;         /* GPU device for cuda and tensorrt [0] */
    int fallback_cpu;      /* non-zero: run on the CPU, with a warning, when the provider
                            * cannot be registered, instead of failing [0] */
    int no_mmap;           /* non-zero: read the file into memory instead of mapping it [0] */
    int trt_fp16;          /* non-zero: let TensorRT build fp16 engines, tensorrt only [0] */
    int low_memory;        /* non-zero: a text-to-image pipeline folder holds one graph at a
                            * time (text encoder, U-Net, VAE decoder), freeing each when a run
                            * moves on; the same samples in less memory. Refused by a
                            * single-file model [0] */
} edgediff_model_params;

/* Fills *params with the defaults; size is sizeof *params (use edgediff_model_params_init). */
int edgediff_model_params_init_sized(edgediff_model_params *params, size_t size);

/* Fills *params with the defaults above. */
static inline int edgediff_model_params_init(edgediff_model_params *params) {
    return edgediff_model_params_init_sized(params, sizeof *params);
}

/* Opens a model as params says (loading ONNX Runtime from params->ort_lib first if none is
 * loaded yet); *out is NULL on failure. */
int edgediff_model_open_params(const edgediff_model_params *params, edgediff_model **out);

/* Opens a model file (path NULL: the embedded default MNIST model) on provider "cpu", "cuda"
 * or "tensorrt" (NULL: "cpu"); fallback_cpu non-zero runs on the CPU, with a warning, when the
 * provider cannot be registered. edgediff_model_open_params with those fields set. */
int edgediff_model_open(const char *path, const char *provider, int device_id, int fallback_cpu,
                        edgediff_model **out);

/* Opens a model from the bytes of an ONNX file in memory (copied), with the default options. */
int edgediff_model_open_memory(const uint8_t *data, size_t len, edgediff_model **out);

/* Frees a model; NULL is allowed. */
void edgediff_model_free(edgediff_model *model);

/* The sample shape [C, H, W]: what the network denoises (a pipeline's latents). */
int edgediff_model_sample_shape(const edgediff_model *model, size_t shape[3]);

/* The shape [C, H, W] of one output sample, which sizes the out buffers of sampling at the
 * model's own size: a text-to-image pipeline's decoded image (its sample shape, and
 * init_noise's, is the latents'), else the sample shape. For a run of another height and
 * width, edgediff_sample_shapes. */
int edgediff_model_output_shape(const edgediff_model *model, size_t shape[3]);

/* The model's metadata as JSON into buf (cap bytes, NUL-terminated); *needed (if not NULL)
 * gets the size needed including the NUL. */
int edgediff_model_metadata_json(const edgediff_model *model, char *buf, size_t cap,
                                 size_t *needed);

/* ---------------------------------------------------------------------------------------
 * Sampling with typed parameters
 */

/* Everything `edgediff sample` can set. Defaults in brackets (those of the library's
 * SampleOptions; `edgediff sample` has the same). Fields a sampler does not use are ignored by
 * it; "unset" is EDGEDIFF_UNSET for integers and NAN for doubles. */
typedef struct edgediff_sample_params {
    size_t struct_size;         /* set by edgediff_sample_params_init */
    const char *sampler;        /* a name `edgediff samplers` lists ["ddim"; a model's own
                                 * default, if it names one, is the "sampling" entry of
                                 * edgediff_model_metadata_json] */
    size_t steps;               /* sampling steps [100] */
    int spacing;                /* an edgediff_spacing [EDGEDIFF_SPACING_DEFAULT] */
    int x0_clip;                /* an edgediff_x0_clip [EDGEDIFF_X0_CLIP_NONE] */
    double rho;                 /* rho of EDGEDIFF_SPACING_KARRAS; only with it [unset: 7] */
    const double *timesteps;    /* explicit schedule times, most noisy first, overriding steps
                                 * and spacing (e.g. from edgediff_calibrate) [NULL] */
    size_t num_timesteps;       /* values at timesteps [0] */
    double eta;                 /* stochasticity in [0, 1] of ddim and euler-a [unset: 0 for
                                 * ddim, 1 for euler-a] */
    int64_t order;              /* solver order of lms (1-4), dpm-solver, dpm++2m, dpm++3m,
                                 * unipc (1-3), dpm++2m-sde (1-2) [unset: the sampler's] */
    double snr;                 /* signal-to-noise ratio of pc's Langevin corrector [unset: 0.16] */
    double rtol;                /* relative tolerance of ode-adaptive and adaptive [unset: 1e-3] */
    double atol;                /* absolute tolerance of ode-adaptive and adaptive [unset: 1e-3] */
    int64_t min_steps;          /* fewest steps of a sample, adaptive only [unset: 2] */
    int64_t max_steps;          /* most steps of a sample, adaptive only [unset: 500] */
    size_t n;                   /* number of samples [16] */
    size_t batch_size;          /* samples per network call; memory grows with it [64] */
    uint64_t seed;              /* random seed; the same seed gives the same samples [0] */
    int64_t class_label;        /* class of a class-conditional model
                                 * [EDGEDIFF_UNCONDITIONAL: the null label] */
    double guidance;            /* classifier-free guidance scale >= 0, with class_label
                                 * [unset: none] */
    double dynamic_threshold;   /* quantile of |x0| in (0, 1] of EDGEDIFF_X0_CLIP_DYNAMIC,
                                 * e.g. 0.995; needed by it, refused otherwise [unset] */
    double threshold_max;       /* upper bound >= 1 of the dynamic threshold in data-range
                                 * units, EDGEDIFF_X0_CLIP_DYNAMIC only [unset: no bound] */
    const float *init_noise;    /* initial noise [n, C, H, W] (the sample shape of
                                 * edgediff_sample_shapes: a pipeline's latents) instead of the
                                 * seeded noise [NULL] */
    size_t init_noise_len;      /* floats at init_noise: n * C * H * W [0] */
    const float *step_noise;    /* per-step noise [steps, n, C, H, W] for stochastic samplers,
                                 * with init_noise [NULL] */
    size_t step_noise_len;      /* floats at step_noise: a multiple of n * C * H * W [0] */
    edgediff_progress_fn progress; /* called after every step; non-zero cancels [NULL] */
    void *progress_user;        /* passed to progress [NULL] */
    /* Appended for text-to-image pipelines: a program built against an older header passes
     * the smaller struct_size and gets the defaults for these. */
    const char *prompt;         /* UTF-8 text prompt of a text-to-image pipeline folder;
                                 * refused by other models [NULL: none, the empty prompt] */
    const char *negative_prompt; /* UTF-8 prompt that guidance > 1 steers away from, pipelines
                                 * only [NULL: none, the empty prompt] */
    /* Appended for tiled VAE decoding (same rule as above). */
    size_t vae_tile_size;       /* pipelines only: decode the latents in overlapping tiles of
                                 * this many latent pixels a side, 4..=4096, blended smoothly
                                 * across overlaps of at least a quarter tile; latents of at most one
                                 * tile decode as untiled (`edgediff sample --vae-tiles`)
                                 * [0: untiled] */
    /* Appended for img2img, one prompt per sample, the final latents and the consistency
     * samplers (same rule). */
    const float *init_image;    /* img2img, pipelines only (`edgediff sample --image`): images
                                 * [1 or n, C, H, W] in [-1, 1], [C, H, W] the output shape of
                                 * edgediff_sample_shapes (height and width, else the folder's:
                                 * an image of another size needs them set to its size), one for
                                 * every sample or one each;
                                 * encoded by the VAE encoder, noised to the level strength
                                 * selects, and sampled from there [NULL: none] */
    size_t init_image_len;      /* floats at init_image: C * H * W or n * C * H * W [0] */
    double strength;            /* how much of the sampling runs, in (0, 1]: the last
                                 * floor(steps * strength) steps; read with init_image and by
                                 * edgediff_inpaint_with, refused otherwise (`--strength`)
                                 * [unset: 0.8 with init_image, 1 for inpainting] */
    const char *const *prompts; /* one UTF-8 prompt per sample, pipelines only: sample i uses
                                 * prompts[i % prompts_len] (n is not taken from the list);
                                 * refused with prompt (`--prompts FILE`) [NULL: none] */
    size_t prompts_len;         /* strings at prompts, at least 1 with prompts [0] */
    float *latents_out;         /* pipelines only: receives the final latents [n, C, h, w]
                                 * (edgediff_sample_shapes), those the VAE decodes into the
                                 * samples, by edgediff_sample_with and
                                 * edgediff_sample_to_file_with (not with resume), as
                                 * `--latents-out`; written only when the run succeeds
                                 * [NULL: not wanted] */
    size_t latents_out_len;     /* floats at latents_out: at least n * C * h * w [0] */
    double gamma;               /* stochasticity in [0, 1] of tcd (Zheng et al.'s gamma,
                                 * diffusers' eta of TCDScheduler) [unset: 0.3] */
    /* Appended for image sizes (same rule). */
    size_t height;              /* pipelines only: the images' height, as `edgediff sample
                                 * --height` (the latents': it over the VAE's upsampling); a
                                 * multiple of the pipeline's (`edgediff info`, "other sizes":
                                 * 64 for Stable Diffusion) that its U-Net and VAE decoder
                                 * graphs take (dynamic axes). init_image and
                                 * edgediff_inpaint_with's images are read at this size (a flat
                                 * buffer has none of its own). Refused by pixel models and
                                 * edgediff_invert; edgediff_sample_shapes gives a run's shapes
                                 * [0: the folder's, edgediff_model_output_shape] */
    size_t width;               /* the images' width, as `--width`; as height [0: the folder's] */
    /* Appended for calibration files (same rule). */
    const char *calibration;    /* a calibration file (`edgediff calibrate --save`, or
                                 * edgediff_calibrate_params.save): its sampler, time steps and
                                 * the fitted sampler's coefficients replace sampler, steps,
                                 * spacing and timesteps; refused for a model of another
                                 * schedule (`edgediff sample --calibration`) [NULL: none] */
    /* Appended for index ranges (same rule). */
    size_t first_index;         /* index of the first sample in the seed's stream: sample i is
                                 * sample first_index + i of the seed (its noise, its prompt of
                                 * prompts, its number in messages), so runs of n from 0, n, 2n, ...
                                 * make one run's samples (`edgediff sample --first-index`);
                                 * init_image and inpainting's images are the range's own;
                                 * refused with init_noise, by edgediff_invert, and where
                                 * first_index + n overflows; a folder output names files by
                                 * it [0] */
} edgediff_sample_params;

/* Fills *params with the defaults; size is sizeof *params (use edgediff_sample_params_init). */
int edgediff_sample_params_init_sized(edgediff_sample_params *params, size_t size);

/* Fills *params with the defaults above. */
static inline int edgediff_sample_params_init(edgediff_sample_params *params) {
    return edgediff_sample_params_init_sized(params, sizeof *params);
}

/* The shapes [C, H, W] of one sample of a run of params: into output_shape what it outputs
 * (sizing out, init_image and edgediff_inpaint_with's images; [H, W] of the masks), of
 * params' height and width (else the folder's: edgediff_model_output_shape), into
 * sample_shape what it denoises (sizing init_noise and latents_out: a pipeline's latents,
 * the size divided by the VAE's upsampling). Either may be NULL. A size the model cannot
 * make is refused as edgediff_sample_with refuses it: EDGEDIFF_ERR_ARGUMENT naming
 * height/width (not a multiple of the pipeline's, or a pixel model), EDGEDIFF_ERR_MODEL for
 * a U-Net or VAE decoder graph of one fixed size (naming the graph). */
int edgediff_sample_shapes(const edgediff_model *model, const edgediff_sample_params *params,
                           size_t output_shape[3], size_t sample_shape[3]);

/* Generates params->n samples into out (out_len floats >= n * C * H * W, [C, H, W] the output
 * shape of edgediff_sample_shapes, edgediff_model_output_shape's unless height or width is
 * set; C order, the model's data range, a pipeline's images in [-1, 1]), and their latents
 * into params->latents_out if given. Every field is checked before anything is written. A
 * cancelling progress callback gives EDGEDIFF_ERR_CANCELLED. */
int edgediff_sample_with(const edgediff_model *model, const edgediff_sample_params *params,
                         float *out, size_t out_len);

/* Generates params->n samples into a file as `edgediff sample --out path` does: a .png grid,
 * a .npy array, or a folder of PNGs; resume non-zero continues an interrupted run into the
 * same folder or .npy (`--resume`), keeping the samples already written; the final latents
 * go to params->latents_out if given (refused with resume, whose run makes only the missing
 * samples), as `--latents-out` beside `--out`. */
int edgediff_sample_to_file_with(const edgediff_model *model, const edgediff_sample_params *params,
                                 const char *path, int resume);

/* Inpaints n images (n * C * H * W floats, data range) where masks (n * H * W floats) is 1,
 * keeping the pixels where it is 0, into out (out_len >= n * C * H * W), with the sampler,
 * steps, seed... of params (params->n is not read: n is); jumps/resample: RePaint
 * resampling (0, 0: none), as `edgediff inpaint`. params' strength (unset: 1, every step
 * from pure noise) runs the last floor(steps * strength) steps from the images noised to
 * that level, and init_noise (n * C * H * W floats of the sample shape, a pipeline's
 * latents) replaces the seeded noise, as `inpaint --strength --init-noise`; step_noise,
 * init_image, prompts and latents_out are refused (inpainting has no use for them).
 * [C, H, W] is the output shape of edgediff_sample_shapes: a pipeline's images of params'
 * height and width (the folder's where 0; `edgediff inpaint` takes an image file's size),
 * inpainted (in [-1, 1]) through their latents, with params' prompt and negative_prompt, as
 * `edgediff inpaint --model PIPELINE` does. */
int edgediff_inpaint_with(const edgediff_model *model, const edgediff_sample_params *params,
                          const float *images, const float *masks, size_t n, size_t jumps,
                          size_t resample, float *out, size_t out_len);

/* DDIM inversion, as `edgediff invert`: the noise (n * C * H * W floats into noise, noise_len
 * >= that) that deterministic DDIM decodes back to the n images (n * C * H * W floats, data
 * range). Reads steps, spacing, rho, batch_size, class_label and progress of params; sampler
 * must be "ddim" with eta unset or 0, and timesteps, guidance, x0_clip, init_noise,
 * step_noise, prompt, negative_prompt, vae_tile_size, init_image, strength, prompts,
 * latents_out, height, width and first_index must be unset (inversion has no use for
 * them). The same params with init_noise set to the noise decode it again through
 * edgediff_sample_with.
 * progress's return value is not heeded (inversion cannot be cancelled). */
int edgediff_invert(const edgediff_model *model, const edgediff_sample_params *params,
                    const float *images, size_t n, float *noise, size_t noise_len);

/* ---------------------------------------------------------------------------------------
 * Requests: the same parameters set by name and text (the older interface; a request holds an
 * edgediff_sample_params with the defaults of edgediff_sample_params_init).
 */

/* A request with the defaults of edgediff_sample_params_init. */
int edgediff_request_new(edgediff_request **out);

/* Frees a request; NULL is allowed. */
void edgediff_request_free(edgediff_request *req);

/* Sets a parameter from text: any field of edgediff_sample_params holding a name or a number,
 * by its field name ("sampler", "steps", "spacing" as a name, "rho", "eta", "gamma", "order",
 * "snr", "rtol", "atol", "min_steps", "max_steps", "n", "first_index", "batch_size", "seed",
 * "class_label" or "class" (negative: unconditional), "guidance", "x0_clip" ("none", "range",
 * "dynamic"), "dynamic_threshold", "threshold_max", "vae_tile_size", "height", "width",
 * "strength" (for edgediff_inpaint: img2img needs init_image, which is no text)), "prompt" and
 * "negative_prompt" (the request keeps its own copy of the text), "prompts" as one prompt
 * per line (as a `--prompts` file: "\n" or "\r\n" ends a line, a final one is optional) and
 * "timesteps" as a comma-separated list. The buffers (init_image, init_noise, step_noise,
 * latents_out) have no text form: use edgediff_sample_params for them. Names (of the
 * sampler, spacing, x0_clip) and the syntax of numbers are checked here, ranges when the
 * request runs. */
int edgediff_request_set(edgediff_request *req, const char *key, const char *value);

/* Sets the progress callback (NULL: none). */
int edgediff_request_set_progress(edgediff_request *req, edgediff_progress_fn cb, void *user);

/* edgediff_sample_with with the request's parameters. */
int edgediff_sample(const edgediff_model *model, const edgediff_request *req, float *out,
                    size_t out_len);

/* edgediff_sample_to_file_with with the request's parameters, without resuming. */
int edgediff_sample_to_file(const edgediff_model *model, const edgediff_request *req,
                            const char *path);

/* edgediff_inpaint_with with the request's parameters. */
int edgediff_inpaint(const edgediff_model *model, const edgediff_request *req,
                     const float *images, const float *masks, size_t n, size_t jumps,
                     size_t resample, float *out, size_t out_len);

/* ---------------------------------------------------------------------------------------
 * Evaluation: ELBO and likelihood
 */

/* The result of edgediff_elbo, in bits per dimension (means over the images). */
typedef struct edgediff_elbo_result {
    double bits_per_dim;      /* the negative ELBO L_T + sum L_{t-1} + L_0 */
    double standard_error;    /* over images and draws (NaN for one image) */
    double mc_standard_error; /* the random draws' part (timesteps, noise; with timesteps_per_image
                               * 0 only the decoder's 4 draws of x_1) */
    double prior;             /* L_T */
    double kl;                /* sum of the KL terms L_1 .. L_{T-1} */
    double reconstruction;    /* L_0, the discretized decoder */
} edgediff_elbo_result;

/* The negative ELBO of n images (n * C * H * W floats in the data range, on a 256-level grid:
 * lo + (hi - lo) k / 255 or / 256, detected) as `edgediff elbo` computes it: discrete-schedule
 * models only, timesteps_per_image importance-sampled timesteps per image (0: all of them),
 * with the request's seed, batch_size and progress callback. */
int edgediff_elbo(const edgediff_model *model, const edgediff_request *req, const float *images,
                  size_t n, size_t timesteps_per_image, edgediff_elbo_result *out);

/* Everything `edgediff likelihood` can set. Defaults in brackets (the library's
 * LikelihoodOptions; the CLI has the same). */
typedef struct edgediff_likelihood_params {
    size_t struct_size;   /* set by edgediff_likelihood_params_init */
    int solver;           /* an edgediff_ode_solver [EDGEDIFF_ODE_RK4] */
    int probe;            /* an edgediff_probe [EDGEDIFF_PROBE_RADEMACHER] */
    size_t steps;         /* RK4 steps, EDGEDIFF_ODE_RK4 only (ignored otherwise) [64] */
    double rtol;          /* relative tolerance, needed by EDGEDIFF_ODE_ADAPTIVE and refused
                           * by RK4 [unset] */
    double atol;          /* absolute tolerance, EDGEDIFF_ODE_ADAPTIVE only [unset: rtol] */
    size_t probes;        /* Hutchinson probes per image, averaged, 1..=256 [1] */
    double fd_step;       /* relative finite-difference step in (0, 0.1] [1e-3] */
    double bins;          /* quantisation bins across the data range for bits/dim, >= 2
                           * [256: 8-bit images] */
    size_t batch_size;    /* images per solver batch; each network call holds (1 + 2 probes)
                           * rows per image [64] */
    uint64_t seed;        /* seed of the probes [0] */
    int64_t class_label;  /* class of a class-conditional model [EDGEDIFF_UNCONDITIONAL] */
    edgediff_progress_fn progress; /* solver steps over all batches; its return value is not
                                    * heeded (likelihoods cannot be cancelled) [NULL] */
    void *progress_user;  /* passed to progress [NULL] */
} edgediff_likelihood_params;

/* What edgediff_likelihood found. */
typedef struct edgediff_likelihood_result {
    size_t struct_size;       /* set by the caller: sizeof(edgediff_likelihood_result) */
    double log_density_mean;  /* mean log p(x) over the images, nats per image */
    double log_density_se;    /* its standard error (0 for one image) */
    double bits_per_dim_mean; /* mean bits per dimension, -(log p(x) + D log bin_width) / (D ln 2) */
    double bits_per_dim_se;   /* its standard error (0 for one image) */
    size_t dim;               /* D = C * H * W */
    double bin_width;         /* the bin width in data units */
    size_t network_calls;     /* network calls, one per solver stage per batch */
} edgediff_likelihood_result;

/* Fills *params with the defaults; size is sizeof *params (use
 * edgediff_likelihood_params_init). */
int edgediff_likelihood_params_init_sized(edgediff_likelihood_params *params, size_t size);

/* Fills *params with the defaults above. */
static inline int edgediff_likelihood_params_init(edgediff_likelihood_params *params) {
    return edgediff_likelihood_params_init_sized(params, sizeof *params);
}

/* log p(x) of n images (n * C * H * W floats in the data range) through the probability-flow
 * ODE with a Hutchinson trace estimator, as `edgediff likelihood` computes it: the summary
 * into *result (its struct_size set), and per image into log_density and bits_per_dim (n
 * doubles each; either may be NULL, and they must be different buffers). */
int edgediff_likelihood(const edgediff_model *model, const edgediff_likelihood_params *params,
                        const float *images, size_t n, edgediff_likelihood_result *result,
                        double *log_density, double *bits_per_dim);

/* ---------------------------------------------------------------------------------------
 * Calibration: time steps fitted to one model and sampler, for edgediff_sample_params.timesteps
 */

/* Called after every sampler run of the search with (runs so far, best pilot RMSE, user). */
typedef void (*edgediff_calibrate_progress_fn)(size_t evals, double best_rmse, void *user);

/* Everything `edgediff calibrate` can set. Defaults in brackets (the library's
 * CalibrateOptions; the CLI has the same). */
typedef struct edgediff_calibrate_params {
    size_t struct_size;    /* set by edgediff_calibrate_params_init */
    const char *sampler;   /* a deterministic fixed-grid sampler (unipc, dpm++2m, dpm++3m,
                            * ddim, heun...), or "fitted" to fit its coefficients too
                            * (write them with save) ["unipc"] */
    int64_t order;         /* its solver order [unset: 3 for unipc, else the sampler's default] */
    size_t steps;          /* time points to place, 2..=1000 [10] */
    size_t pilot;          /* pilot noises the error is measured on [256] */
    uint64_t seed;         /* seed of the pilot noises; sample with others to judge it [1] */
    size_t teacher_steps;  /* Heun steps of the teacher, >= 2 * steps [250] */
    size_t max_evals;      /* most sampler runs of the search, all starts together
                            * [0: 50 * steps * starts] */
    size_t batch_size;     /* pilot samples per network call [256] */
    int64_t class_label;   /* class of a class-conditional model [EDGEDIFF_UNCONDITIONAL] */
    double guidance;       /* classifier-free guidance scale, with class_label [unset: none] */
    edgediff_calibrate_progress_fn progress; /* [NULL]; calibration cannot be cancelled */
    void *progress_user;   /* passed to progress [NULL] */
    /* Appended for the fitted sampler: a program built against an older header passes the
     * smaller struct_size and gets the defaults for these. */
    size_t starts;         /* points the search starts from, 0..=1000 [0: 4 for fitted, else 1] */
    const char *save;      /* write the calibration file here, for
                            * edgediff_sample_params.calibration [NULL: nowhere] */
} edgediff_calibrate_params;

/* What edgediff_calibrate achieved on the pilot batch. */
typedef struct edgediff_calibrate_result {
    size_t struct_size;   /* set by the caller: sizeof(edgediff_calibrate_result) */
    size_t num_timesteps; /* time points written (params->steps) */
    double rmse;          /* RMSE to the teacher with the calibrated grid */
    double rmse_logsnr;   /* with the search's start, uniform log-SNR */
    double rmse_trailing; /* with the trailing spacing */
    double teacher_rmse;  /* teacher vs a teacher of half its steps: the floor */
    size_t evals;         /* sampler runs the search made */
} edgediff_calibrate_result;

/* Fills *params with the defaults; size is sizeof *params (use edgediff_calibrate_params_init). */
int edgediff_calibrate_params_init_sized(edgediff_calibrate_params *params, size_t size);

/* Fills *params with the defaults above. */
static inline int edgediff_calibrate_params_init(edgediff_calibrate_params *params) {
    return edgediff_calibrate_params_init_sized(params, sizeof *params);
}

/* Calibrates params->steps time points of params->sampler to the model, as `edgediff
 * calibrate` does, into timesteps (timesteps_len >= steps doubles; schedule times, most noisy
 * first): set edgediff_sample_params.timesteps to them, with the same sampler and order.
 * result (NULL: not wanted; else its struct_size set) gets the figures. */
int edgediff_calibrate(const edgediff_model *model, const edgediff_calibrate_params *params,
                       double *timesteps, size_t timesteps_len, edgediff_calibrate_result *result);

#ifdef __cplusplus
}
#endif

#endif /* EDGEDIFF_H */
