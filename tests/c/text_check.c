/* Prompts through the C interface, run by tests/test_capi.py:
 *   text_check PIPELINE OUTDIR
 * Opens the text-to-image pipeline folder PIPELINE; samples with a prompt, a negative prompt
 * and guidance into a buffer and writes it raw to OUTDIR/text.f32 (the Python side compares
 * it byte for byte with `edgediff sample --prompt ... --negative-prompt ... --guidance ...`);
 * checks that the request API with the same settings and a struct of the older, smaller size
 * (no prompt fields, so no prompt) behave as the typed struct with the same fields; and that
 * a prompt on the embedded pixel MNIST model and invalid UTF-8 fail with
 * EDGEDIFF_ERR_ARGUMENT naming the field; that low_memory (one graph at a time) gives the
 * same bytes, run after run, and that vae_tile_size covering the latents does too while a
 * smaller one tiles, an older struct size reads no tile size, and a tile size out of range,
 * low_memory and vae_tile_size on the pixel model are refused; that edgediff_inpaint_with
 * inpaints the pipeline's images with the same prompt fields (the image, the mask and the
 * result go raw to OUTDIR/inpaint-{image,mask,out}.f32, compared by the Python side with
 * `edgediff inpaint`), to the same bytes in low_memory mode; and that inversion, the
 * likelihood, calibration and the ELBO refuse the pipeline with EDGEDIFF_ERR_ARGUMENT. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, " [%s]\n", edgediff_last_error()); } } while (0)

/* The status was EDGEDIFF_ERR_ARGUMENT and the message names `field` and no CLI flag. */
static int argument_error(int status, const char *field) {
    const char *msg = edgediff_last_error();
    return status == EDGEDIFF_ERR_ARGUMENT && strstr(msg, field) != NULL && strstr(msg, "--") == NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PIPELINE OUTDIR\n", argv[0]);
        return 2;
    }
    edgediff_model_params mp;
    edgediff_model_params_init(&mp);
    mp.path = argv[1];
    edgediff_model *pipe = NULL;
    if (edgediff_model_open_params(&mp, &pipe) != EDGEDIFF_OK) {
        fprintf(stderr, "open %s: %s\n", argv[1], edgediff_last_error());
        return 1;
    }
    /* The buffer holds decoded images, not latents: the two shapes differ. */
    size_t latent[3], image[3];
    EXPECT(edgediff_model_sample_shape(pipe, latent) == EDGEDIFF_OK, "sample shape");
    EXPECT(edgediff_model_output_shape(pipe, image) == EDGEDIFF_OK, "output shape");
    EXPECT(latent[0] == 4 && image[0] == 3 && image[1] == 2 * latent[1], "latents [%zu, %zu, %zu], images [%zu, %zu, %zu]",
           latent[0], latent[1], latent[2], image[0], image[1], image[2]);
    const size_t per = image[0] * image[1] * image[2];

    edgediff_sample_params p;
    edgediff_sample_params_init(&p);
    EXPECT(p.prompt == NULL && p.negative_prompt == NULL, "no prompt by default");
    p.prompt = "a lighthouse at dusk";
    p.negative_prompt = "blurry low quality";
    p.guidance = 7.5;
    p.sampler = "dpm++2m";
    p.steps = 4;
    p.n = 2;
    p.seed = 3;
    const size_t len = p.n * per;
    float *a = calloc(len, sizeof(float)), *b = calloc(len, sizeof(float));
    EXPECT(edgediff_sample_with(pipe, &p, a, len) == EDGEDIFF_OK, "sample with a prompt");
    char path[4096];
    snprintf(path, sizeof path, "%s/text.f32", argv[2]);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(a, sizeof(float), len, f);
        fclose(f);
    }
    EXPECT(edgediff_sample_with(pipe, &p, a, len - 1) == EDGEDIFF_ERR_ARGUMENT, "a buffer sized for latents is too small");

    /* The request API with the same settings gives the same images. */
    edgediff_request *req = NULL;
    edgediff_request_new(&req);
    const char *kv[][2] = {{"prompt", "a lighthouse at dusk"}, {"negative_prompt", "blurry low quality"},
                           {"guidance", "7.5"}, {"sampler", "dpm++2m"}, {"steps", "4"}, {"n", "2"}, {"seed", "3"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        EXPECT(edgediff_request_set(req, kv[i][0], kv[i][1]) == EDGEDIFF_OK, "set %s", kv[i][0]);
    EXPECT(edgediff_sample(pipe, req, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0, "request API agrees");

    /* Another negative prompt changes the images: the field is read. */
    edgediff_request_set(req, "negative_prompt", "a red dog");
    EXPECT(edgediff_sample(pipe, req, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) != 0, "negative prompt read");
    edgediff_request_free(req);

    /* A struct of the size before the prompts were appended: they are not read (the bytes
     * there stay set, as an older program's neighbouring memory would be), so the run is the
     * one without them. */
    edgediff_sample_params old = p, none = p;
    old.struct_size = offsetof(edgediff_sample_params, prompt);
    none.prompt = NULL;
    none.negative_prompt = NULL;
    EXPECT(edgediff_sample_with(pipe, &old, a, len) == EDGEDIFF_OK, "an older struct size");
    EXPECT(edgediff_sample_with(pipe, &none, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0,
           "the older size reads no prompt");
    EXPECT(edgediff_sample_params_init_sized(&old, offsetof(edgediff_sample_params, prompt)) == EDGEDIFF_OK &&
           old.struct_size == offsetof(edgediff_sample_params, prompt), "init with the older size");

    /* Invalid UTF-8 is an argument error naming the field. */
    edgediff_sample_params bad = p;
    bad.prompt = "caf\xe9";
    EXPECT(argument_error(edgediff_sample_with(pipe, &bad, a, len), "prompt"), "non-UTF-8 prompt");
    bad = p;
    bad.negative_prompt = "caf\xe9";
    EXPECT(argument_error(edgediff_sample_with(pipe, &bad, a, len), "negative_prompt"), "non-UTF-8 negative prompt");

    /* Low-memory mode: the same bytes, on every run of the handle (each run opens its
     * graphs again); tiled decoding through the struct and the request API. */
    edgediff_model_params lm = mp;
    lm.low_memory = 1;
    edgediff_model *low = NULL;
    EXPECT(edgediff_model_open_params(&lm, &low) == EDGEDIFF_OK, "open with low_memory");
    EXPECT(edgediff_sample_with(pipe, &p, a, len) == EDGEDIFF_OK, "sample");
    for (int run = 0; run < 2 && low; run++) {
        memset(b, 0, len * sizeof(float));
        EXPECT(edgediff_sample_with(low, &p, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0,
               "low_memory gives the same bytes (run %d)", run);
    }
    edgediff_sample_params tiles = p;
    EXPECT(tiles.vae_tile_size == 0, "untiled by default");
    tiles.vae_tile_size = latent[1];
    EXPECT(edgediff_sample_with(pipe, &tiles, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0,
           "a tile covering the latents decodes the same bytes");
    tiles.vae_tile_size = 4;
    EXPECT(edgediff_sample_with(pipe, &tiles, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) != 0,
           "smaller tiles are decoded and blended");
    edgediff_request *tr = NULL;
    edgediff_request_new(&tr);
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        edgediff_request_set(tr, kv[i][0], kv[i][1]);
    EXPECT(edgediff_request_set(tr, "vae_tile_size", "4") == EDGEDIFF_OK, "set vae_tile_size");
    float *t2 = calloc(len, sizeof(float));
    EXPECT(edgediff_sample(pipe, tr, t2, len) == EDGEDIFF_OK && memcmp(t2, b, len * sizeof(float)) == 0,
           "request API tiles alike");
    free(t2);
    edgediff_request_free(tr);
    edgediff_sample_params v2 = tiles;
    v2.struct_size = offsetof(edgediff_sample_params, vae_tile_size);
    EXPECT(edgediff_sample_with(pipe, &v2, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0,
           "a struct of the size before vae_tile_size reads none");
    tiles.vae_tile_size = 2;
    EXPECT(argument_error(edgediff_sample_with(pipe, &tiles, b, len), "vae_tile_size"), "tile size 2");

    /* Latent inpainting with the prompt fields: the first sampled image, its right half
     * filled. The buffers are the images' (not the latents'), and a mask too short for the
     * image is caught by its length, not read past. */
    float *mask = calloc(image[1] * image[2], sizeof(float));
    for (size_t y = 0; y < image[1]; y++)
        for (size_t x = image[2] / 2; x < image[2]; x++) mask[y * image[2] + x] = 1.0f;
    EXPECT(edgediff_inpaint_with(pipe, &p, a, mask, 1, 0, 0, b, per) == EDGEDIFF_OK, "inpaint a pipeline");
    const char *names[3] = {"inpaint-image", "inpaint-mask", "inpaint-out"};
    const float *bufs[3] = {a, mask, b};
    const size_t lens[3] = {per, image[1] * image[2], per};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s.f32", argv[2], names[i]);
        FILE *g = fopen(path, "wb");
        if (g) {
            fwrite(bufs[i], sizeof(float), lens[i], g);
            fclose(g);
        }
    }
    EXPECT(edgediff_inpaint_with(pipe, &p, a, mask, 1, 0, 0, b, per - 1) == EDGEDIFF_ERR_ARGUMENT,
           "an out buffer sized for latents is too small");
    /* Low-memory mode inpaints to the same bytes (the VAE encoder held on its own, then the
     * text encoder, the U-Net, the decoder). */
    float *lo = calloc(per, sizeof(float));
    EXPECT(low && edgediff_inpaint_with(low, &p, a, mask, 1, 0, 0, lo, per) == EDGEDIFF_OK &&
               memcmp(lo, b, per * sizeof(float)) == 0,
           "low_memory inpaints the same bytes");
    free(lo);
    free(mask);
    edgediff_model_free(low);

    /* What runs on pixel models only so far is refused by the library, before any work,
     * naming no option: the C entry points call the same functions as the CLI. */
    const char *why = "not supported yet for text-to-image pipelines";
    edgediff_sample_params plain;
    edgediff_sample_params_init(&plain);
    plain.steps = 2;
    int s = edgediff_invert(pipe, &plain, a, 1, b, len);
    EXPECT(s == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), why), "invert refused (%d)", s);
    edgediff_likelihood_params lp;
    edgediff_likelihood_params_init(&lp);
    lp.steps = 2;
    edgediff_likelihood_result lr = {.struct_size = sizeof lr};
    s = edgediff_likelihood(pipe, &lp, a, 1, &lr, NULL, NULL);
    EXPECT(s == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), why), "likelihood refused (%d)", s);
    edgediff_calibrate_params cp;
    edgediff_calibrate_params_init(&cp);
    cp.steps = 2;
    cp.pilot = 2;
    cp.teacher_steps = 4;
    double ts[2];
    s = edgediff_calibrate(pipe, &cp, ts, 2, NULL);
    EXPECT(s == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), why), "calibrate refused (%d)", s);
    edgediff_request *er = NULL;
    edgediff_request_new(&er);
    edgediff_elbo_result eo;
    s = edgediff_elbo(pipe, er, a, 1, 2, &eo);
    EXPECT(s == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), why), "elbo refused (%d)", s);
    edgediff_request_free(er);
    edgediff_model_free(pipe);

    /* A prompt for the embedded pixel MNIST model, which has no text conditioning. */
    edgediff_model *mnist = NULL;
    EXPECT(edgediff_model_open(NULL, NULL, 0, 0, &mnist) == EDGEDIFF_OK, "open the embedded model");
    size_t shape[3];
    edgediff_model_sample_shape(mnist, shape);
    edgediff_sample_params q;
    edgediff_sample_params_init(&q);
    q.n = 1;
    q.steps = 2;
    q.prompt = "a handwritten digit seven";
    float *c = calloc(shape[0] * shape[1] * shape[2], sizeof(float));
    EXPECT(argument_error(edgediff_sample_with(mnist, &q, c, shape[0] * shape[1] * shape[2]), "prompt"), "prompt on MNIST");
    printf("prompt on MNIST: %s\n", edgediff_last_error());
    q.prompt = NULL;
    q.vae_tile_size = 16;
    EXPECT(argument_error(edgediff_sample_with(mnist, &q, c, shape[0] * shape[1] * shape[2]), "vae_tile_size"),
           "vae_tile_size on MNIST");
    edgediff_model_free(mnist);
    edgediff_model_params lmp;
    edgediff_model_params_init(&lmp);
    EXPECT(lmp.low_memory == 0, "low_memory off by default");
    lmp.low_memory = 1;
    edgediff_model *none_open = NULL;
    EXPECT(argument_error(edgediff_model_open_params(&lmp, &none_open), "low_memory") && none_open == NULL,
           "low_memory on the embedded pixel model");

    free(a); free(b); free(c);
    if (failures) fprintf(stderr, "%d failures\n", failures);
    else printf("text_check: all passed\n");
    return failures != 0;
}
