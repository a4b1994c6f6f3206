/* What the C test programs in tests/c/ (run by tests/test_capi.py) share: a failure count,
 * EXPECT, the argument-error test, raw float files, sentinel-filled buffers that show a
 * refused call wrote nothing, and the prompt settings of the pipeline checks. */
#ifndef EDGEDIFF_TEST_CHECK_H
#define EDGEDIFF_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

#include "edgediff.h"

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, " [%s]\n", edgediff_last_error()); } } while (0)

/* The status was EDGEDIFF_ERR_ARGUMENT and the message names `field` and no CLI flag. */
static inline int argument_error(int status, const char *field) {
    const char *msg = edgediff_last_error();
    return status == EDGEDIFF_ERR_ARGUMENT && strstr(msg, field) != NULL && strstr(msg, "--") == NULL;
}

/* Writes len floats raw to DIR/NAME.f32. */
static inline void save(const char *dir, const char *name, const float *buf, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.f32", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(buf, sizeof(float), len, f);
        fclose(f);
    }
}

/* Output buffers are filled with this before a call that must fail, and checked after. */
#define SENTINEL 12345.0f
static inline void fill(float *buf, size_t len) {
    for (size_t i = 0; i < len; i++) buf[i] = SENTINEL;
}
static inline int untouched(const float *buf, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (buf[i] != SENTINEL) return 0;
    return 1;
}

/* The pipeline checks' prompt settings (tests/test_capi.py gives the CLI the same flags):
 * params initialised, prompt, negative prompt, guidance 7.5, `sampler`, 4 steps, 2 samples,
 * seed 3. */
static inline void prompt_settings(edgediff_sample_params *p, const char *sampler) {
    edgediff_sample_params_init(p);
    p->prompt = "a lighthouse at dusk";
    p->negative_prompt = "blurry low quality";
    p->guidance = 7.5;
    p->sampler = sampler;
    p->steps = 4;
    p->n = 2;
    p->seed = 3;
}

#endif
