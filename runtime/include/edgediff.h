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
 * never a crash; no Rust panic crosses this interface (it becomes EDGEDIFF_ERR_PANIC).
 *
 * Threads: a model handle may be shared by threads; runs on one handle are serialised by its
 * lock (open one handle per thread to run in parallel). A request belongs to one thread at a
 * time. Handles are checked against the live ones: a freed handle passed again is
 * EDGEDIFF_ERR_ARGUMENT and a second free does nothing (unless a newer handle of the same kind
 * got the same address). Freeing a handle while another thread is inside a call with it is
 * undefined, as for free().
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

/* Opens a model file (path NULL: the embedded default MNIST model) on provider "cpu", "cuda"
 * or "tensorrt" (NULL: "cpu"); fallback_cpu non-zero runs on the CPU, with a warning, when the
 * provider cannot be registered. */
int edgediff_model_open(const char *path, const char *provider, int device_id, int fallback_cpu,
                        edgediff_model **out);

/* Opens a model from the bytes of an ONNX file in memory (copied). */
int edgediff_model_open_memory(const uint8_t *data, size_t len, edgediff_model **out);

/* Frees a model; NULL is allowed. */
void edgediff_model_free(edgediff_model *model);

/* The sample shape [C, H, W]. */
int edgediff_model_sample_shape(const edgediff_model *model, size_t shape[3]);

/* The model's metadata as JSON into buf (cap bytes, NUL-terminated); *needed (if not NULL)
 * gets the size needed including the NUL. */
int edgediff_model_metadata_json(const edgediff_model *model, char *buf, size_t cap,
                                 size_t *needed);

/* A request with the CLI's defaults: sampler ddim, 100 steps, trailing spacing, seed 0, n 16,
 * batch size 64, unconditional. */
int edgediff_request_new(edgediff_request **out);

/* Frees a request; NULL is allowed. */
void edgediff_request_free(edgediff_request *req);

/* Sets a parameter from text: "sampler", "spacing", "steps", "n", "batch_size", "seed",
 * "order", "eta", "guidance", "class" (negative: unconditional); the names and values of the
 * CLI ("guidance" is classifier-free guidance with "class" on class-conditional models). */
int edgediff_request_set(edgediff_request *req, const char *key, const char *value);

/* Sets the progress callback (NULL: none). */
int edgediff_request_set_progress(edgediff_request *req, edgediff_progress_fn cb, void *user);

/* Generates n samples into out (out_len floats >= n * C * H * W; C order, data range). */
int edgediff_sample(const edgediff_model *model, const edgediff_request *req, float *out,
                    size_t out_len);

/* Generates n samples into a file as `edgediff sample --out path` does: a .png grid, a .npy
 * array, or a folder of PNGs. */
int edgediff_sample_to_file(const edgediff_model *model, const edgediff_request *req,
                            const char *path);

/* Inpaints n images (n * C * H * W floats, data range) where masks (n * H * W floats) is 1,
 * keeping the pixels where it is 0, into out (out_len >= n * C * H * W), with the request's
 * sampler, steps and seed; jumps/resample: RePaint resampling (0, 0: none). */
int edgediff_inpaint(const edgediff_model *model, const edgediff_request *req,
                     const float *images, const float *masks, size_t n, size_t jumps,
                     size_t resample, float *out, size_t out_len);

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

#ifdef __cplusplus
}
#endif

#endif /* EDGEDIFF_H */
