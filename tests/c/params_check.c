/* The typed parameter structs end to end, run by tests/test_capi.py:
 *   params_check MODEL OUTDIR
 * Opens MODEL through edgediff_model_params; samples through edgediff_sample_params and checks
 * the result against a second run and against the request API with the same settings; writes
 * files and prints figures that the Python side compares with the CLI's for the same settings
 * (OUTDIR/sample.npy, OUTDIR/karras.npy, OUTDIR/noise.f32, OUTDIR/inpaint-*.f32 of inpainting
 * with strength and init_noise, OUTDIR/fitted.json and .npy, the "likelihood" and "calibrate"
 * lines); and checks that bad values fail with EDGEDIFF_ERR_ARGUMENT and a message naming the
 * field by its C name. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"
#include "check.h"

static size_t steps_seen = 0;
static int count_steps(size_t done, size_t total, void *user) {
    (void)total;
    *(size_t *)user = done;
    return 0;
}

static size_t runs_seen = 0;
static void count_runs(size_t evals, double best, void *user) {
    (void)best;
    *(size_t *)user = evals;
}

static char *path_in(const char *dir, const char *name) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL OUTDIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[2];

    /* Enum names both ways. */
    EXPECT(strcmp(edgediff_spacing_name(EDGEDIFF_SPACING_KARRAS), "karras") == 0, "spacing name");
    EXPECT(edgediff_spacing_name(99) == NULL, "no such spacing");
    int v = -1;
    EXPECT(edgediff_spacing_from_name("logsnr", &v) == EDGEDIFF_OK && v == EDGEDIFF_SPACING_LOGSNR, "spacing from name");
    EXPECT(edgediff_spacing_from_name("odd", &v) == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), "trailing"), "unknown spacing lists the known ones");
    EXPECT(strcmp(edgediff_provider_name(EDGEDIFF_PROVIDER_TENSORRT), "tensorrt") == 0, "provider name");
    EXPECT(edgediff_provider_from_name("cuda", &v) == EDGEDIFF_OK && v == EDGEDIFF_PROVIDER_CUDA, "provider from name");
    EXPECT(edgediff_provider_from_name("vulkan", &v) == EDGEDIFF_ERR_ARGUMENT, "unknown provider");

    /* Opening a model through its params. */
    edgediff_model_params mp;
    EXPECT(edgediff_model_params_init(&mp) == EDGEDIFF_OK && mp.struct_size == sizeof mp, "model params init");
    EXPECT(mp.path == NULL && mp.provider == EDGEDIFF_PROVIDER_CPU && mp.threads == 0 && !mp.fallback_cpu, "model defaults");
    edgediff_model *model = NULL;
    mp.path = argv[1];
    mp.trt_fp16 = 1;
    EXPECT(argument_error(edgediff_model_open_params(&mp, &model), "trt_fp16") && model == NULL, "trt_fp16 without tensorrt");
    mp.trt_fp16 = 0;
    mp.provider = 7;
    EXPECT(argument_error(edgediff_model_open_params(&mp, &model), "provider"), "provider out of range");
    mp.provider = EDGEDIFF_PROVIDER_CPU;
    if (edgediff_model_open_params(&mp, &model) != EDGEDIFF_OK) {
        fprintf(stderr, "open: %s\n", edgediff_last_error());
        return 1;
    }
    size_t shape[3];
    edgediff_model_sample_shape(model, shape);
    const size_t per = shape[0] * shape[1] * shape[2];

    /* Defaults, then a few fields set. */
    edgediff_sample_params p;
    EXPECT(edgediff_sample_params_init(&p) == EDGEDIFF_OK && p.struct_size == sizeof p, "sample params init");
    EXPECT(strcmp(p.sampler, "ddim") == 0 && p.steps == 100 && p.spacing == EDGEDIFF_SPACING_DEFAULT && p.n == 16 &&
           p.batch_size == 64 && p.seed == 0, "sample defaults");
    EXPECT(isnan(p.eta) && isnan(p.rho) && isnan(p.guidance) && p.order == EDGEDIFF_UNSET &&
           p.class_label == EDGEDIFF_UNCONDITIONAL && p.x0_clip == EDGEDIFF_X0_CLIP_NONE && p.timesteps == NULL &&
           p.init_noise == NULL && p.progress == NULL, "unset defaults");
    p.sampler = "dpm++2m";
    p.steps = 6;
    p.n = 3;
    p.seed = 5;
    p.batch_size = 2; /* two batches: the second of one sample */
    p.progress = count_steps;
    p.progress_user = &steps_seen;
    const size_t len = p.n * per;
    float *a = calloc(len, sizeof(float)), *b = calloc(len, sizeof(float)), *c = calloc(len, sizeof(float));
    EXPECT(edgediff_sample_with(model, &p, a, len) == EDGEDIFF_OK, "sample");
    EXPECT(steps_seen == 12, "progress saw %zu of 2 batches x 6 steps", steps_seen);
    EXPECT(edgediff_sample_with(model, &p, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0, "deterministic");
    int finite = 1;
    for (size_t i = 0; i < len; i++) finite &= isfinite(a[i]) != 0;
    EXPECT(finite, "finite samples");
    EXPECT(edgediff_sample_to_file_with(model, &p, path_in(dir, "sample.npy"), 0) == EDGEDIFF_OK, "to file");

    /* An index range: samples 2 and 3 of the same settings (OUTDIR/range.npy, for the CLI's
     * --first-index 2 -n 2 and rows 2..4 of its -n 4). A smaller struct_size reads none of it. */
    edgediff_sample_params rp = p;
    EXPECT(rp.first_index == 0, "first_index defaults to 0");
    rp.first_index = 2;
    rp.n = 2;
    rp.progress = NULL;
    EXPECT(edgediff_sample_to_file_with(model, &rp, path_in(dir, "range.npy"), 0) == EDGEDIFF_OK, "range to file");
    float *r0 = calloc(2 * per, sizeof(float)), *r1 = calloc(2 * per, sizeof(float));
    EXPECT(edgediff_sample_with(model, &rp, r0, 2 * per) == EDGEDIFF_OK && memcmp(r0, a + 2 * per, per * sizeof(float)) == 0,
           "sample 2 of a range from 2 is sample 2 of the run from 0");
    rp.struct_size = offsetof(edgediff_sample_params, first_index);
    EXPECT(edgediff_sample_with(model, &rp, r1, 2 * per) == EDGEDIFF_OK && memcmp(r1, a, 2 * per * sizeof(float)) == 0,
           "a version 6 struct reads no first_index");
    rp.struct_size = sizeof rp;
    rp.first_index = SIZE_MAX;
    EXPECT(argument_error(edgediff_sample_with(model, &rp, r1, 2 * per), "first_index"), "first_index + n overflows");
    rp.first_index = 2;
    rp.init_noise = a;
    rp.init_noise_len = 2 * per;
    EXPECT(argument_error(edgediff_sample_with(model, &rp, r1, 2 * per), "first_index"), "first_index with init_noise");
    free(r0); free(r1);

    /* The request API with the same settings gives the same samples. */
    edgediff_request *req = NULL;
    edgediff_request_new(&req);
    const char *kv[][2] = {{"sampler", "dpm++2m"}, {"steps", "6"}, {"n", "3"}, {"seed", "5"}, {"batch_size", "2"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        EXPECT(edgediff_request_set(req, kv[i][0], kv[i][1]) == EDGEDIFF_OK, "set %s", kv[i][0]);
    EXPECT(edgediff_sample(model, req, c, len) == EDGEDIFF_OK && memcmp(a, c, len * sizeof(float)) == 0, "request API agrees");
    edgediff_request_set(req, "sampler", "ddim"); /* dpm++2m takes no eta */
    edgediff_request_set(req, "eta", "3");
    EXPECT(argument_error(edgediff_sample(model, req, c, len), "eta"), "request eta");
    edgediff_request_free(req);

    /* Karras spacing with its rho and dynamic thresholding, for the CLI to match. */
    edgediff_sample_params k;
    edgediff_sample_params_init(&k);
    k.steps = 5;
    k.n = 2;
    k.seed = 9;
    k.spacing = EDGEDIFF_SPACING_KARRAS;
    k.rho = 5;
    k.x0_clip = EDGEDIFF_X0_CLIP_DYNAMIC;
    k.dynamic_threshold = 0.9;
    k.threshold_max = 2;
    EXPECT(edgediff_sample_to_file_with(model, &k, path_in(dir, "karras.npy"), 0) == EDGEDIFF_OK, "karras to file");

    /* Bad values: EDGEDIFF_ERR_ARGUMENT naming the field. */
    edgediff_sample_params bad = p;
    bad.eta = 2;
    bad.sampler = "ddim";
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "eta"), "eta 2");
    bad = p;
    bad.rho = 3;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "rho"), "rho without karras");
    bad = p;
    bad.spacing = 42;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "spacing"), "spacing 42");
    bad = p;
    bad.x0_clip = EDGEDIFF_X0_CLIP_DYNAMIC;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "dynamic_threshold"), "dynamic without quantile");
    bad = p;
    bad.dynamic_threshold = 0.9;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "x0_clip"), "quantile without dynamic");
    bad = p;
    bad.sampler = "magic";
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "magic"), "unknown sampler");
    bad = p;
    bad.sampler = NULL;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "sampler"), "NULL sampler");
    bad = p;
    bad.batch_size = 0;
    EXPECT(edgediff_sample_with(model, &bad, a, len) == EDGEDIFF_ERR_ARGUMENT, "batch_size 0");
    bad = p;
    bad.struct_size = 3;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "struct_size"), "struct_size 3");
    EXPECT(edgediff_sample_params_init_sized(&bad, sizeof bad + 8) == EDGEDIFF_ERR_ARGUMENT, "init with a newer header's size");
    /* A program built before prompt and negative_prompt were appended passes the size that
     * ends before them: accepted, and those bytes (here a prompt, which this pixel model would
     * refuse) are not read. */
    bad = p;
    bad.struct_size = offsetof(edgediff_sample_params, prompt);
    bad.prompt = "a cat";
    EXPECT(edgediff_sample_with(model, &bad, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0,
           "an older header's size");
    bad.struct_size = sizeof bad;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, b, len), "prompt"), "a prompt for a pixel model");
    bad.struct_size = offsetof(edgediff_sample_params, prompt) - 8;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, b, len), "struct_size"), "smaller than any version");
    bad = p;
    bad.n = SIZE_MAX / 2;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, a, len), "overflows"), "n * C * H * W overflows");
    EXPECT(argument_error(edgediff_inpaint_with(model, &p, a, a, SIZE_MAX / 2, 0, 0, b, len), "overflows"), "inpaint n overflows");
    bad = p;
    bad.init_noise = a;
    bad.init_noise_len = len - 1;
    EXPECT(argument_error(edgediff_sample_with(model, &bad, b, len), "init_noise_len"), "init noise of the wrong size");
    EXPECT(edgediff_sample_with(model, &p, a, len - 1) == EDGEDIFF_ERR_ARGUMENT, "out too small");

    /* Injected noise drives a stochastic sampler: the seed no longer matters. */
    edgediff_sample_params sp;
    edgediff_sample_params_init(&sp);
    sp.sampler = "ddpm";
    sp.steps = 4;
    sp.n = p.n;
    float *steps_noise = calloc(4 * len, sizeof(float));
    for (size_t i = 0; i < len; i++) c[i] = (float)((int)(i % 7) - 3) / 3.0f;
    for (size_t i = 0; i < 4 * len; i++) steps_noise[i] = (float)((int)(i % 5) - 2) / 2.0f;
    sp.init_noise = c;
    sp.init_noise_len = len;
    sp.step_noise = steps_noise;
    sp.step_noise_len = 4 * len;
    EXPECT(edgediff_sample_with(model, &sp, a, len) == EDGEDIFF_OK, "injected noise");
    sp.seed = 77;
    EXPECT(edgediff_sample_with(model, &sp, b, len) == EDGEDIFF_OK && memcmp(a, b, len * sizeof(float)) == 0, "the seed does not matter");
    sp.step_noise_len = 4 * len - 1;
    EXPECT(argument_error(edgediff_sample_with(model, &sp, b, len), "step_noise_len"), "step noise of the wrong size");
    sp.init_noise = NULL;
    EXPECT(argument_error(edgediff_sample_with(model, &sp, b, len), "init_noise"), "step noise without initial noise");
    free(steps_noise);
    EXPECT(edgediff_sample_with(model, NULL, a, len) == EDGEDIFF_ERR_ARGUMENT, "NULL params");

    /* Inpainting through the params: the kept pixels stay. */
    float *mask = calloc(p.n * shape[1] * shape[2], sizeof(float));
    for (size_t i = 0; i < p.n * shape[1] * shape[2]; i += 2) mask[i] = 1;
    EXPECT(edgediff_inpaint_with(model, &p, a, mask, p.n, 0, 0, b, len) == EDGEDIFF_OK, "inpaint");
    EXPECT(b[1] == a[1], "a kept pixel stays");
    /* With strength and initial noise, as `edgediff inpaint --strength --init-noise`: images,
     * mask, noise and result go raw to OUTDIR/inpaint-{images,mask,noise,out}.f32. */
    for (size_t i = 0; i < len; i++) a[i] = (float)sin(0.37 * (double)i) * 0.9f;
    for (size_t i = 0; i < len; i++) c[i] = (float)cos(1.3 * (double)i + 0.5) * 1.1f;
    edgediff_sample_params is = p;
    is.strength = 0.6;
    is.init_noise = c;
    is.init_noise_len = len;
    EXPECT(edgediff_inpaint_with(model, &is, a, mask, p.n, 0, 0, b, len) == EDGEDIFF_OK, "inpaint with strength");
    const char *names[4] = {"inpaint-images", "inpaint-mask", "inpaint-noise", "inpaint-out"};
    const float *bufs[4] = {a, mask, c, b};
    const size_t lens[4] = {len, p.n * shape[1] * shape[2], len, len};
    for (int i = 0; i < 4; i++) {
        char name[64];
        snprintf(name, sizeof name, "%s.f32", names[i]);
        FILE *g = fopen(path_in(dir, name), "wb");
        if (g) {
            fwrite(bufs[i], sizeof(float), lens[i], g);
            fclose(g);
        }
    }
    is.strength = 0;
    EXPECT(argument_error(edgediff_inpaint_with(model, &is, a, mask, p.n, 0, 0, b, len), "strength"), "inpaint strength 0");
    free(mask);

    /* Inversion of deterministic DDIM samples, then decoding the noise back. */
    edgediff_sample_params ip;
    edgediff_sample_params_init(&ip);
    ip.steps = 10;
    ip.n = p.n;
    EXPECT(edgediff_sample_with(model, &ip, a, len) == EDGEDIFF_OK, "ddim images");
    EXPECT(edgediff_sample_to_file_with(model, &ip, path_in(dir, "images.npy"), 0) == EDGEDIFF_OK, "images to file");
    float *z = calloc(len, sizeof(float));
    EXPECT(edgediff_invert(model, &ip, a, p.n, z, len) == EDGEDIFF_OK, "invert");
    FILE *f = fopen(path_in(dir, "noise.f32"), "wb");
    if (f) {
        fwrite(z, sizeof(float), len, f);
        fclose(f);
    }
    ip.init_noise = z;
    ip.init_noise_len = len;
    EXPECT(edgediff_sample_with(model, &ip, c, len) == EDGEDIFF_OK, "decode the noise");
    double se = 0;
    for (size_t i = 0; i < len; i++) se += (double)(c[i] - a[i]) * (c[i] - a[i]);
    printf("invert %.17g\n", sqrt(se / len)); /* the round-trip RMSE */
    ip.init_noise = NULL;
    ip.init_noise_len = 0;
    ip.sampler = "dpm++2m";
    EXPECT(argument_error(edgediff_invert(model, &ip, a, p.n, z, len), "sampler"), "inversion is of ddim");
    ip.sampler = "ddim";
    ip.guidance = 2;
    EXPECT(argument_error(edgediff_invert(model, &ip, a, p.n, z, len), "guidance"), "no guidance in inversion");
    ip.guidance = NAN;
    ip.strength = 0.5;
    EXPECT(argument_error(edgediff_invert(model, &ip, a, p.n, z, len), "strength"), "no strength in inversion");
    ip.strength = NAN;
    ip.first_index = 4;
    EXPECT(argument_error(edgediff_invert(model, &ip, a, p.n, z, len), "first_index"), "no index range in inversion");
    free(z);

    /* Likelihood of two of the images. */
    edgediff_likelihood_params lp;
    EXPECT(edgediff_likelihood_params_init(&lp) == EDGEDIFF_OK && lp.struct_size == sizeof lp, "likelihood init");
    EXPECT(lp.solver == EDGEDIFF_ODE_RK4 && lp.steps == 64 && lp.probes == 1 && lp.bins == 256 && isnan(lp.rtol), "likelihood defaults");
    lp.steps = 4;
    edgediff_likelihood_result r = {.struct_size = sizeof r};
    double nats[2], bpd[2];
    EXPECT(edgediff_likelihood(model, &lp, a, 2, &r, nats, bpd) == EDGEDIFF_OK, "likelihood");
    EXPECT(r.dim == per && isfinite(r.log_density_mean) && r.network_calls > 0 &&
           fabs((nats[0] + nats[1]) / 2 - r.log_density_mean) < 1e-9 * fabs(r.log_density_mean) + 1e-12, "likelihood result");
    printf("likelihood %.17g %.17g\n", r.log_density_mean, r.bits_per_dim_mean);
    lp.rtol = 1e-3;
    EXPECT(argument_error(edgediff_likelihood(model, &lp, a, 2, &r, NULL, NULL), "rtol"), "rtol with rk4");
    lp.rtol = NAN;
    edgediff_likelihood_result small = {.struct_size = 8};
    EXPECT(argument_error(edgediff_likelihood(model, &lp, a, 2, &small, NULL, NULL), "struct_size"), "result without its size");

    /* Calibration, then sampling on the calibrated grid. */
    edgediff_calibrate_params cp;
    EXPECT(edgediff_calibrate_params_init(&cp) == EDGEDIFF_OK && cp.struct_size == sizeof cp, "calibrate init");
    EXPECT(strcmp(cp.sampler, "unipc") == 0 && cp.order == EDGEDIFF_UNSET && cp.steps == 10, "calibrate defaults");
    cp.steps = 3;
    cp.pilot = 8;
    cp.teacher_steps = 8;
    cp.max_evals = 6;
    cp.batch_size = 8;
    cp.progress = count_runs;
    cp.progress_user = &runs_seen;
    double ts[3];
    edgediff_calibrate_result cr = {.struct_size = sizeof cr};
    EXPECT(edgediff_calibrate(model, &cp, ts, 3, &cr) == EDGEDIFF_OK, "calibrate");
    EXPECT(cr.num_timesteps == 3 && ts[0] > ts[1] && ts[1] > ts[2] && runs_seen > 0 && cr.evals <= 6, "calibrated grid");
    printf("calibrate %.17g %.17g %.17g\n", ts[0], ts[1], ts[2]);
    edgediff_sample_params tp;
    edgediff_sample_params_init(&tp);
    tp.sampler = "unipc";
    tp.order = 3;
    tp.timesteps = ts;
    tp.num_timesteps = 3;
    tp.n = 2;
    EXPECT(edgediff_sample_with(model, &tp, a, 2 * per) == EDGEDIFF_OK, "sample on the calibrated grid");
    EXPECT(edgediff_calibrate(model, &cp, ts, 2, NULL) == EDGEDIFF_ERR_ARGUMENT, "too few timesteps");
    cp.sampler = "ddpm";
    EXPECT(argument_error(edgediff_calibrate(model, &cp, ts, 3, NULL), "ddpm"), "stochastic sampler");

    /* The fitted sampler: its calibration file saved, then sampled from through the sample
     * params (OUTDIR/fitted.json and OUTDIR/fitted.npy, which the CLI must reproduce). */
    char cal_path[4096];
    snprintf(cal_path, sizeof cal_path, "%s", path_in(dir, "fitted.json"));
    cp.sampler = "fitted";
    cp.starts = 2;
    cp.save = cal_path;
    EXPECT(edgediff_calibrate(model, &cp, ts, 3, &cr) == EDGEDIFF_OK && cr.evals <= 6, "fitted calibration");
    edgediff_sample_params fp;
    edgediff_sample_params_init(&fp);
    EXPECT(fp.calibration == NULL, "no calibration by default");
    fp.calibration = cal_path;
    fp.n = 2;
    EXPECT(edgediff_sample_to_file_with(model, &fp, path_in(dir, "fitted.npy"), 0) == EDGEDIFF_OK,
           "sample with the calibration file");
    fp.calibration = path_in(dir, "sample.npy");
    EXPECT(edgediff_sample_with(model, &fp, a, 2 * per) == EDGEDIFF_ERR_IO
           && strstr(edgediff_last_error(), "not an edgediff calibration file") != NULL, "not a calibration file");

    free(a); free(b); free(c);
    edgediff_model_free(model);
    if (failures) fprintf(stderr, "%d failures\n", failures);
    else printf("params_check: all passed\n");
    return failures != 0;
}
