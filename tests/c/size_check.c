/* Image sizes (height, width) through the C interface, run by tests/test_capi.py:
 *   size_check PIPELINE FIXED OUTDIR
 * PIPELINE is the tiny text-to-image pipeline (tests/sd_tiny.py: 16x16 images from 8x8
 * latents, graphs of dynamic height and width, sides multiples of 4), FIXED a pipeline whose
 * graphs take one size (models/mnist-t2i). At 16x32 on PIPELINE: edgediff_sample_shapes
 * gives the run's shapes; sampling from given latent noise with the final latents, img2img
 * of one 16x32 image and inpainting a 16x32 image write raw results to OUTDIR/size-*.f32 for
 * the Python side to compare byte for byte with `edgediff sample --height 16 --width 32`,
 * `sample --image` and `inpaint` on .npy files of that size. Checked here: the request API's
 * "height" and "width" give the typed struct's bytes, a struct of the size before height
 * reads neither (the folder's size), one side given keeps the other the folder's, buffers
 * sized for the folder's images or latents are refused at 16x32, and bad sizes (not a
 * multiple, a fixed-size graph, a pixel model, inversion) are refused naming height/width
 * (EDGEDIFF_ERR_MODEL naming the graph's size for FIXED), the output buffers untouched. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"
#include "check.h"

#define H 16
#define W 32

/* edgediff_sample_with(q, out, out_len) fails with EDGEDIFF_ERR_ARGUMENT naming `field`; out
 * (cap floats) and q's latents buffer are as they were. */
static int refused(edgediff_model *m, const edgediff_sample_params *q, float *out, size_t cap, size_t out_len,
                   const char *field) {
    fill(out, cap);
    if (q->latents_out) fill(q->latents_out, q->latents_out_len);
    int ok = argument_error(edgediff_sample_with(m, q, out, out_len), field) && untouched(out, cap);
    return ok && (!q->latents_out || untouched(q->latents_out, q->latents_out_len));
}

static int same3(const size_t a[3], size_t c, size_t h, size_t w) {
    return a[0] == c && a[1] == h && a[2] == w;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PIPELINE FIXED OUTDIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[3];
    edgediff_model *pipe = NULL;
    if (edgediff_model_open(argv[1], NULL, 0, 0, &pipe) != EDGEDIFF_OK) {
        fprintf(stderr, "open %s: %s\n", argv[1], edgediff_last_error());
        return 1;
    }
    size_t own[3], own_lat[3], o[3], s[3];
    edgediff_model_output_shape(pipe, own);
    edgediff_model_sample_shape(pipe, own_lat);
    EXPECT(same3(own, 3, 16, 16) && same3(own_lat, 4, 8, 8), "the tiny pipeline's own shapes");

    edgediff_sample_params p;
    edgediff_sample_params_init(&p);
    EXPECT(p.height == 0 && p.width == 0, "the folder's size by default");
    EXPECT(edgediff_sample_shapes(pipe, &p, o, s) == EDGEDIFF_OK && same3(o, own[0], own[1], own[2]) &&
               same3(s, own_lat[0], own_lat[1], own_lat[2]),
           "default shapes are the model's");
    prompt_settings(&p, "ddim");
    p.height = H;
    p.width = W;
    EXPECT(edgediff_sample_shapes(pipe, &p, o, s) == EDGEDIFF_OK && same3(o, 3, H, W) && same3(s, 4, H / 2, W / 2),
           "shapes at %dx%d: [%zu, %zu, %zu], latents [%zu, %zu, %zu]", H, W, o[0], o[1], o[2], s[0], s[1], s[2]);
    EXPECT(edgediff_sample_shapes(pipe, &p, NULL, s) == EDGEDIFF_OK, "either shape may be NULL");
    const size_t per = o[0] * o[1] * o[2], lper = s[0] * s[1] * s[2], n = p.n, len = n * per, llen = n * lper;
    const size_t own_per = own[0] * own[1] * own[2], own_lper = own_lat[0] * own_lat[1] * own_lat[2];
    float *out = malloc(len * sizeof(float)), *out2 = malloc(len * sizeof(float));
    float *noise = malloc(llen * sizeof(float)), *z = malloc(llen * sizeof(float));
    for (size_t i = 0; i < llen; i++) noise[i] = (float)sin(1.7 * (double)i + 0.3) * 1.2f;
    save(dir, "size-noise", noise, llen);

    /* From given latents of the size, with the final latents. */
    edgediff_sample_params seeded = p, q = p;
    q.init_noise = noise;
    q.init_noise_len = llen;
    q.latents_out = z;
    q.latents_out_len = llen;
    EXPECT(edgediff_sample_with(pipe, &q, out, len) == EDGEDIFF_OK, "sample at %dx%d", H, W);
    save(dir, "size", out, len);
    save(dir, "size-latents", z, llen);
    /* Buffers of the folder's size are too small, or the wrong size, at this one. */
    EXPECT(refused(pipe, &q, out, len, n * own_per, "out"), "out sized for the folder's images");
    edgediff_sample_params bad = q;
    bad.init_noise_len = n * own_lper;
    EXPECT(refused(pipe, &bad, out, len, len, "init_noise_len"), "init_noise of the folder's latents");
    bad = q;
    bad.latents_out_len = n * own_lper;
    EXPECT(refused(pipe, &bad, out, len, len, "latents_out_len"), "latents_out of the folder's latents");

    /* The request API: "height" and "width" as text give the typed struct's bytes. */
    EXPECT(edgediff_sample_with(pipe, &seeded, out, len) == EDGEDIFF_OK, "seeded at %dx%d", H, W);
    edgediff_request *req = NULL;
    edgediff_request_new(&req);
    const char *kv[][2] = {{"prompt", "a lighthouse at dusk"}, {"negative_prompt", "blurry low quality"},
                           {"guidance", "7.5"}, {"steps", "4"}, {"n", "2"}, {"seed", "3"},
                           {"height", "16"}, {"width", "32"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        EXPECT(edgediff_request_set(req, kv[i][0], kv[i][1]) == EDGEDIFF_OK, "set %s", kv[i][0]);
    fill(out2, len);
    EXPECT(edgediff_sample(pipe, req, out2, len) == EDGEDIFF_OK && memcmp(out, out2, len * sizeof(float)) == 0,
           "the request API agrees");
    EXPECT(argument_error(edgediff_request_set(req, "height", "-16"), "height"), "a negative height");
    edgediff_request_set(req, "width", "30");
    fill(out2, len);
    EXPECT(argument_error(edgediff_sample(pipe, req, out2, len), "width") && untouched(out2, len),
           "a request of a bad width");
    edgediff_request_free(req);

    /* A struct of the size before height reads neither: the folder's size, into its buffer. */
    edgediff_sample_params old = seeded, plain = seeded;
    old.struct_size = offsetof(edgediff_sample_params, height);
    plain.height = plain.width = 0;
    EXPECT(edgediff_sample_shapes(pipe, &old, o, s) == EDGEDIFF_OK && same3(o, own[0], own[1], own[2]),
           "the older size's shapes are the folder's");
    EXPECT(edgediff_sample_with(pipe, &old, out, n * own_per) == EDGEDIFF_OK, "an older struct size");
    EXPECT(edgediff_sample_with(pipe, &plain, out2, n * own_per) == EDGEDIFF_OK &&
               memcmp(out, out2, n * own_per * sizeof(float)) == 0,
           "the older size reads no height or width");
    /* One side given: the other is the folder's. */
    q = seeded;
    q.height = 0;
    EXPECT(edgediff_sample_shapes(pipe, &q, o, s) == EDGEDIFF_OK && same3(o, 3, own[1], W) &&
               same3(s, 4, own_lat[1], W / 2),
           "width alone: [%zu, %zu, %zu]", o[0], o[1], o[2]);

    /* img2img of one 16x32 image (read at height x width), for both samples. */
    float *img = malloc(per * sizeof(float)), *mask = calloc(H * W, sizeof(float));
    for (size_t i = 0; i < per; i++) {
        size_t ch = i / (H * W), y = i % (H * W) / W, x = i % W;
        img[i] = (float)sin(0.4 * (double)(x + 2 * y) + 1.3 * (double)ch) * 0.9f;
    }
    save(dir, "size-image", img, per);
    q = seeded;
    q.init_image = img;
    q.init_image_len = per;
    q.strength = 0.6;
    EXPECT(edgediff_sample_with(pipe, &q, out, len) == EDGEDIFF_OK, "img2img at %dx%d", H, W);
    save(dir, "size-img2img", out, len);
    bad = q;
    bad.init_image_len = own_per;
    EXPECT(refused(pipe, &bad, out, len, len, "init_image_len"), "an image of the folder's size at 16x32");
    bad = q;
    bad.height = bad.width = 0;
    bad.n = 1; /* (for n = 2 its floats are those of two 16x16 images: read as such) */
    EXPECT(refused(pipe, &bad, out, len, len, "init_image_len"), "a 16x32 image read at the folder's size");

    /* Inpainting a 16x32 image, its right half. */
    for (size_t y = 0; y < H; y++)
        for (size_t x = W / 2; x < W; x++) mask[y * W + x] = 1.0f;
    save(dir, "size-mask", mask, H * W);
    EXPECT(edgediff_inpaint_with(pipe, &seeded, img, mask, 1, 0, 0, out, per) == EDGEDIFF_OK, "inpaint at %dx%d", H, W);
    save(dir, "size-inpaint", out, per);
    EXPECT(edgediff_inpaint_with(pipe, &seeded, img, mask, 1, 0, 0, out, own_per) == EDGEDIFF_ERR_ARGUMENT,
           "an inpainting out buffer of the folder's size");
    bad = seeded;
    bad.height = 18;
    fill(out, per);
    EXPECT(argument_error(edgediff_inpaint_with(pipe, &bad, img, mask, 1, 0, 0, out, per), "height") &&
               untouched(out, per),
           "inpainting at a bad height");

    /* Sizes that are not multiples of 4: named, with the nearest valid ones. */
    bad = seeded;
    bad.height = 18;
    EXPECT(refused(pipe, &bad, out, len, len, "height") && strstr(edgediff_last_error(), "16 or 20"), "height 18");
    o[0] = o[1] = o[2] = 7;
    EXPECT(argument_error(edgediff_sample_shapes(pipe, &bad, o, s), "height") && same3(o, 7, 7, 7),
           "shapes of height 18 refused, untouched");
    printf("height 18: %s\n", edgediff_last_error());
    bad = seeded;
    bad.width = 30;
    EXPECT(refused(pipe, &bad, out, len, len, "width") && strstr(edgediff_last_error(), "28 or 32"), "width 30");
    edgediff_model_free(pipe);

    /* A pipeline whose graphs take one size: another is refused naming the graph's size; its
     * own, given, is taken. */
    edgediff_model *fixed = NULL;
    EXPECT(edgediff_model_open(argv[2], NULL, 0, 0, &fixed) == EDGEDIFF_OK, "open %s", argv[2]);
    edgediff_sample_params f;
    edgediff_sample_params_init(&f);
    f.prompt = "a handwritten seven";
    f.n = 1;
    f.steps = 2;
    EXPECT(edgediff_model_output_shape(fixed, own) == EDGEDIFF_OK, "the fixed pipeline's shape");
    f.height = own[1];
    f.width = own[2];
    EXPECT(edgediff_sample_shapes(fixed, &f, o, s) == EDGEDIFF_OK && same3(o, own[0], own[1], own[2]),
           "its own size given");
    f.height = f.width = 64;
    fill(out, len);
    int st = edgediff_sample_with(fixed, &f, out, len);
    EXPECT(st == EDGEDIFF_ERR_MODEL && strstr(edgediff_last_error(), "unet/model.onnx") &&
               strstr(edgediff_last_error(), "cannot make 64x64 images") && untouched(out, len),
           "a fixed-size graph at 64x64 (%d)", st);
    printf("fixed 64x64: %s\n", edgediff_last_error());
    EXPECT(edgediff_sample_shapes(fixed, &f, o, s) == EDGEDIFF_ERR_MODEL, "its shapes at 64x64");
    edgediff_model_free(fixed);

    /* A pixel model samples its own size only; inversion takes no size. */
    edgediff_model *mnist = NULL;
    EXPECT(edgediff_model_open(NULL, NULL, 0, 0, &mnist) == EDGEDIFF_OK, "open the embedded model");
    edgediff_model_output_shape(mnist, own);
    const size_t mper = own[0] * own[1] * own[2];
    edgediff_sample_params m;
    edgediff_sample_params_init(&m);
    m.n = 1;
    m.steps = 2;
    m.height = own[1];
    EXPECT(refused(mnist, &m, out, mper, mper, "height/width") && strstr(edgediff_last_error(), "pixel model"),
           "height on a pixel model");
    printf("pixel: %s\n", edgediff_last_error());
    EXPECT(argument_error(edgediff_sample_shapes(mnist, &m, o, s), "height/width"), "its shapes");
    fill(out2, mper);
    EXPECT(argument_error(edgediff_invert(mnist, &m, img, 1, out2, mper), "height") && untouched(out2, mper),
           "inversion refuses height");
    edgediff_model_free(mnist);

    free(out); free(out2); free(noise); free(z); free(img); free(mask);
    if (failures) fprintf(stderr, "%d failures\n", failures);
    else printf("size_check: all passed\n");
    return failures != 0;
}
