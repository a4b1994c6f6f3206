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
 * `edgediff inpaint`), to the same bytes in low_memory mode; that img2img (init_image and
 * strength, one image for all samples or one each), one prompt per sample (prompts), the
 * final latents (latents_out) and inpainting with strength and init_noise write raw results
 * to raw .f32 files in OUTDIR for the Python side to compare with the CLI's (see
 * new_fields_checks), a struct of the size before those fields reads none of them, and every
 * bad value of them fails with EDGEDIFF_ERR_ARGUMENT naming the field, leaving the output
 * buffers as they were; and that inversion, the likelihood, calibration and the ELBO refuse
 * the pipeline with EDGEDIFF_ERR_ARGUMENT. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"
#include "check.h"

/* A bad sampling call: EDGEDIFF_ERR_ARGUMENT naming `field`, and out and latents (either may
 * be NULL) as they were. */
static int refused(edgediff_model *m, edgediff_sample_params *q, float *out, size_t out_len, const char *field) {
    fill(out, out_len);
    if (q->latents_out) fill(q->latents_out, q->latents_out_len);
    int ok = argument_error(edgediff_sample_with(m, q, out, out_len), field) && untouched(out, out_len);
    return ok && (!q->latents_out || untouched(q->latents_out, q->latents_out_len));
}

/* The same for edgediff_inpaint_with of one image. */
static int inpaint_refused(edgediff_model *m, const edgediff_sample_params *q, const float *img, const float *mask,
                           float *out, size_t per, const char *field) {
    fill(out, per);
    return argument_error(edgediff_inpaint_with(m, q, img, mask, 1, 0, 0, out, per), field) && untouched(out, per);
}

/* img2img, prompts, latents_out, inpainting's strength and init_noise on the pipeline, from
 * the prompt settings `base` (n = 2). Raw files for the Python side: img2img-images (two
 * images), img2img-one and img2img-one-latents (init_image one image for both samples,
 * strength 0.6, the latents), img2img-each (one image each), prompts (three prompts, n = 3,
 * batch_size 2), inpaint-s-noise and inpaint-s-out (inpainting `image0` under `mask` at
 * strength 0.6 from that noise). */
static void new_fields_checks(edgediff_model *pipe, const edgediff_sample_params *base, const float *image0,
                              const float *mask, const char *dir, const size_t latent[3], const size_t image[3]) {
    const size_t per = image[0] * image[1] * image[2], lper = latent[0] * latent[1] * latent[2];
    edgediff_sample_params p = *base;
    EXPECT(p.init_image == NULL && p.init_image_len == 0 && isnan(p.strength) && p.prompts == NULL &&
           p.prompts_len == 0 && p.latents_out == NULL && p.latents_out_len == 0, "new fields' defaults");
    p.steps = 5;
    const size_t n = p.n, len = n * per, llen = n * lper;
    /* Smooth images, so the VAE sees structure. */
    float *imgs = malloc(len * sizeof(float));
    for (size_t i = 0; i < len; i++) {
        size_t k = i / per, ch = i % per / (image[1] * image[2]), y = i % (image[1] * image[2]) / image[2],
               x = i % image[2];
        imgs[i] = (float)sin(0.4 * (double)(x + 2 * y) + 1.3 * (double)ch + 2.0 * (double)k) * 0.9f;
    }
    save(dir, "img2img-images", imgs, len);
    float *out = malloc(len * sizeof(float)), *out2 = malloc(len * sizeof(float));
    float *z = malloc(llen * sizeof(float)), *z2 = malloc(llen * sizeof(float));

    /* img2img, one image for both samples, with the latents. */
    p.init_image = imgs;
    p.init_image_len = per;
    p.strength = 0.6;
    p.latents_out = z;
    p.latents_out_len = llen;
    EXPECT(edgediff_sample_with(pipe, &p, out, len) == EDGEDIFF_OK, "img2img");
    save(dir, "img2img-one", out, len);
    save(dir, "img2img-one-latents", z, llen);
    /* To a file, the same latents. */
    char path[4096];
    snprintf(path, sizeof path, "%s/img2img-file.npy", dir);
    p.latents_out = z2;
    EXPECT(edgediff_sample_to_file_with(pipe, &p, path, 0) == EDGEDIFF_OK && memcmp(z, z2, llen * sizeof(float)) == 0,
           "to a file, the same latents");
    /* An unset strength is the library's 0.8. */
    edgediff_sample_params d = p;
    d.latents_out = NULL;
    d.latents_out_len = 0;
    d.strength = NAN;
    EXPECT(edgediff_sample_with(pipe, &d, out, len) == EDGEDIFF_OK, "unset strength");
    d.strength = 0.8;
    EXPECT(edgediff_sample_with(pipe, &d, out2, len) == EDGEDIFF_OK && memcmp(out, out2, len * sizeof(float)) == 0,
           "unset strength is 0.8");
    /* A struct of the size before init_image reads none of the new fields (here prompts with
     * prompt, which would be refused, and a latents buffer that stays as it was). */
    const char *list[3] = {"a lighthouse at dusk", "a red dog", "the sea"};
    edgediff_sample_params v3 = p;
    v3.struct_size = offsetof(edgediff_sample_params, init_image);
    v3.prompts = list;
    v3.prompts_len = 3;
    v3.latents_out = z2;
    fill(z2, llen);
    edgediff_sample_params plain = *base;
    plain.steps = 5;
    EXPECT(edgediff_sample_with(pipe, &v3, out, len) == EDGEDIFF_OK && untouched(z2, llen), "the size before init_image");
    EXPECT(edgediff_sample_with(pipe, &plain, out2, len) == EDGEDIFF_OK && memcmp(out, out2, len * sizeof(float)) == 0,
           "the size before init_image reads none of the new fields");

    /* One image each. */
    p.init_image_len = len;
    p.latents_out = NULL;
    p.latents_out_len = 0;
    EXPECT(edgediff_sample_with(pipe, &p, out, len) == EDGEDIFF_OK, "img2img, one image each");
    save(dir, "img2img-each", out, len);

    /* Bad img2img fields: refused, naming the field, nothing written. */
    edgediff_sample_params bad = p;
    bad.latents_out = z;
    bad.latents_out_len = llen;
    bad.strength = 1.5;
    EXPECT(refused(pipe, &bad, out, len, "strength"), "strength 1.5");
    bad.strength = 0;
    EXPECT(refused(pipe, &bad, out, len, "strength"), "strength 0");
    bad.strength = 0.1; /* floor(5 * 0.1) = 0 steps */
    EXPECT(refused(pipe, &bad, out, len, "strength"), "strength leaving no step");
    bad = p;
    bad.init_image = NULL;
    EXPECT(refused(pipe, &bad, out, len, "init_image is NULL but init_image_len"), "init_image NULL with a length");
    bad.init_image_len = 0;
    EXPECT(refused(pipe, &bad, out, len, "strength") && strstr(edgediff_last_error(), "init_image"),
           "strength without init_image");
    bad = p;
    bad.init_image_len = per - 1;
    EXPECT(refused(pipe, &bad, out, len, "init_image_len"), "init_image of the wrong size");
    bad.init_image_len = 3 * per;
    EXPECT(refused(pipe, &bad, out, len, "init_image_len"), "three images for two samples");
    float *nan_img = malloc(per * sizeof(float));
    memcpy(nan_img, imgs, per * sizeof(float));
    nan_img[5] = NAN;
    bad = p;
    bad.init_image = nan_img;
    bad.init_image_len = per;
    EXPECT(refused(pipe, &bad, out, len, "init_image"), "init_image holding NaN");
    free(nan_img);
    bad = p;
    bad.latents_out = z;
    bad.latents_out_len = llen - 1;
    EXPECT(refused(pipe, &bad, out, len, "latents_out_len"), "latents_out too small");
    bad.latents_out = NULL;
    bad.latents_out_len = llen;
    EXPECT(refused(pipe, &bad, out, len, "latents_out"), "latents_out NULL with a length");
    bad = p;
    bad.latents_out = z;
    bad.latents_out_len = llen;
    fill(z, llen);
    snprintf(path, sizeof path, "%s/resume.npy", dir);
    EXPECT(argument_error(edgediff_sample_to_file_with(pipe, &bad, path, 1), "latents_out") &&
               strstr(edgediff_last_error(), "resume") && untouched(z, llen) && fopen(path, "rb") == NULL,
           "latents_out with resume");

    /* One prompt per sample: three prompts, three samples in batches of two; the request API
     * with the list as lines gives the same bytes. */
    edgediff_sample_params q = *base;
    q.prompt = NULL;
    q.prompts = list;
    q.prompts_len = 3;
    q.n = 3;
    q.batch_size = 2;
    float *three = malloc(3 * per * sizeof(float)), *three2 = malloc(3 * per * sizeof(float));
    EXPECT(edgediff_sample_with(pipe, &q, three, 3 * per) == EDGEDIFF_OK, "prompts");
    save(dir, "prompts", three, 3 * per);
    edgediff_request *req = NULL;
    edgediff_request_new(&req);
    const char *kv[][2] = {{"prompts", "a lighthouse at dusk\na red dog\nthe sea\n"},
                           {"negative_prompt", "blurry low quality"}, {"guidance", "7.5"}, {"sampler", "dpm++2m"},
                           {"steps", "4"}, {"n", "3"}, {"seed", "3"}, {"batch_size", "2"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        EXPECT(edgediff_request_set(req, kv[i][0], kv[i][1]) == EDGEDIFF_OK, "set %s", kv[i][0]);
    EXPECT(edgediff_sample(pipe, req, three2, 3 * per) == EDGEDIFF_OK && memcmp(three, three2, 3 * per * sizeof(float)) == 0,
           "request prompts agree");
    edgediff_request_set(req, "prompt", "a cat");
    fill(three2, 3 * per);
    EXPECT(argument_error(edgediff_sample(pipe, req, three2, 3 * per), "prompts") && untouched(three2, 3 * per),
           "request prompts with prompt");
    edgediff_request_free(req);
    bad = q;
    bad.prompt = "a cat";
    EXPECT(refused(pipe, &bad, three, 3 * per, "prompts"), "prompts with prompt");
    bad = q;
    bad.prompts_len = 0;
    EXPECT(refused(pipe, &bad, three, 3 * per, "prompts"), "an empty prompt list");
    bad = q;
    bad.prompts = NULL;
    EXPECT(refused(pipe, &bad, three, 3 * per, "prompts_len"), "prompts NULL with a length");
    const char *holes[2] = {"a cat", NULL};
    bad = q;
    bad.prompts = holes;
    bad.prompts_len = 2;
    EXPECT(refused(pipe, &bad, three, 3 * per, "prompts[1]"), "a NULL prompt in the list");
    const char *latin1[1] = {"caf\xe9"};
    bad.prompts = latin1;
    bad.prompts_len = 1;
    EXPECT(refused(pipe, &bad, three, 3 * per, "prompts[0]"), "a non-UTF-8 prompt in the list");
    free(three);
    free(three2);

    /* Inpainting with strength and initial latent noise. */
    float *noise = malloc(lper * sizeof(float));
    for (size_t i = 0; i < lper; i++) noise[i] = (float)sin(1.7 * (double)i + 0.3) * 1.2f;
    save(dir, "inpaint-s-noise", noise, lper);
    edgediff_sample_params ip = *base;
    ip.strength = 0.6;
    ip.init_noise = noise;
    ip.init_noise_len = lper;
    EXPECT(edgediff_inpaint_with(pipe, &ip, image0, mask, 1, 0, 0, out, per) == EDGEDIFF_OK, "inpaint with strength");
    save(dir, "inpaint-s-out", out, per);
    /* What inpainting refuses, each set alone on ip, and the field its message names. */
    const char *fields[6] = {"init_noise_len", "strength", "step_noise", "init_image", "prompts", "latents_out"};
    for (int i = 0; i < 6; i++) {
        edgediff_sample_params ib = ip;
        switch (i) {
        case 0: ib.init_noise_len = lper - 1; break;
        case 1: ib.strength = 1.5; break;
        case 2: ib.step_noise = noise; ib.step_noise_len = lper; break;
        case 3: ib.init_image = image0; ib.init_image_len = per; break;
        case 4: ib.prompt = NULL; ib.prompts = list; ib.prompts_len = 1; break;
        default: ib.latents_out = z; ib.latents_out_len = llen; break;
        }
        EXPECT(inpaint_refused(pipe, &ib, image0, mask, out, per, fields[i]), "inpainting refuses %s", fields[i]);
    }
    free(noise);
    free(imgs); free(out); free(out2); free(z); free(z2);
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
    prompt_settings(&p, "dpm++2m");
    const size_t len = p.n * per;
    float *a = calloc(len, sizeof(float)), *b = calloc(len, sizeof(float));
    EXPECT(edgediff_sample_with(pipe, &p, a, len) == EDGEDIFF_OK, "sample with a prompt");
    save(argv[2], "text", a, len);
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
    save(argv[2], "inpaint-image", a, per);
    save(argv[2], "inpaint-mask", mask, image[1] * image[2]);
    save(argv[2], "inpaint-out", b, per);
    EXPECT(edgediff_inpaint_with(pipe, &p, a, mask, 1, 0, 0, b, per - 1) == EDGEDIFF_ERR_ARGUMENT,
           "an out buffer sized for latents is too small");
    /* Low-memory mode inpaints to the same bytes (the VAE encoder held on its own, then the
     * text encoder, the U-Net, the decoder). */
    float *lo = calloc(per, sizeof(float));
    EXPECT(low && edgediff_inpaint_with(low, &p, a, mask, 1, 0, 0, lo, per) == EDGEDIFF_OK &&
               memcmp(lo, b, per * sizeof(float)) == 0,
           "low_memory inpaints the same bytes");
    free(lo);
    edgediff_model_free(low);
    new_fields_checks(pipe, &p, a, mask, argv[2], latent, image);
    free(mask);

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
    /* img2img, a prompt list and latents need a pipeline. */
    const size_t mper = shape[0] * shape[1] * shape[2];
    float *mz = malloc(mper * sizeof(float));
    const char *one[1] = {"a handwritten digit seven"};
    edgediff_sample_params_init(&q);
    q.n = 1;
    q.steps = 2;
    q.init_image = c;
    q.init_image_len = mper;
    EXPECT(refused(mnist, &q, c, mper, "init_image") && strstr(edgediff_last_error(), "text-to-image pipeline"),
           "init_image on MNIST");
    q.init_image = NULL;
    q.init_image_len = 0;
    q.prompts = one;
    q.prompts_len = 1;
    EXPECT(refused(mnist, &q, c, mper, "prompts"), "prompts on MNIST");
    q.prompts = NULL;
    q.prompts_len = 0;
    q.latents_out = mz;
    q.latents_out_len = mper;
    EXPECT(refused(mnist, &q, c, mper, "latents_out") && strstr(edgediff_last_error(), "keep_latents") == NULL,
           "latents_out on MNIST");
    printf("latents_out on MNIST: %s\n", edgediff_last_error());
    free(mz);
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
