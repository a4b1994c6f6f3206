/* Generates a grid of samples with edgediff, as `edgediff sample` does.
 *   grid OUT.png [MODEL.onnx|-] [N] [STEPS] [SEED] [SAMPLER]
 * MODEL "-" (the default) is the embedded MNIST model. Build (from the repository root, after
 * `cargo build --release`):
 *   gcc examples/c/grid.c -Iruntime/include target/release/libedgediff.a -ldl -lpthread -lm -o grid
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"

static int progress(size_t done, size_t total, void *user) {
    (void)user;
    if (done == total) fprintf(stderr, "%zu/%zu steps\n", done, total);
    return 0; /* non-zero would cancel */
}

static int check(int status, const char *what) {
    if (status != EDGEDIFF_OK) fprintf(stderr, "grid: %s: %s (status %d)\n", what, edgediff_last_error(), status);
    return status;
}

/* argv[i] as a count, if given; the default stays otherwise. */
static int number(int argc, char **argv, int i, const char *what, unsigned long long *out) {
    if (argc <= i) return EDGEDIFF_OK;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(argv[i], &end, 10);
    if (errno || *end || argv[i][0] == '-' || end == argv[i]) {
        fprintf(stderr, "grid: %s: '%s' is not a non-negative integer\n", what, argv[i]);
        return EDGEDIFF_ERR_ARGUMENT;
    }
    *out = v;
    return EDGEDIFF_OK;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.png [MODEL|-] [N] [STEPS] [SEED] [SAMPLER]\n", argv[0]);
        return 2;
    }
    /* Every field starts at the library's default; set only what the command line gives. */
    edgediff_model_params mp;
    edgediff_model_params_init(&mp);
    mp.path = argc > 2 && strcmp(argv[2], "-") != 0 ? argv[2] : NULL;

    edgediff_sample_params p;
    edgediff_sample_params_init(&p);
    unsigned long long n = p.n, steps = p.steps, seed = p.seed;
    int status = number(argc, argv, 3, "N", &n);
    if (!status) status = number(argc, argv, 4, "STEPS", &steps);
    if (!status) status = number(argc, argv, 5, "SEED", &seed);
    if (status) return status;
    p.n = n;
    p.steps = steps;
    p.seed = seed;
    if (argc > 6) p.sampler = argv[6];
    p.progress = progress;

    edgediff_model *model = NULL;
    status = check(edgediff_model_open_params(&mp, &model), "opening the model");
    if (!status) status = check(edgediff_sample_to_file_with(model, &p, argv[1], 0), "sampling");
    if (!status) fprintf(stderr, "wrote %s (edgediff %s)\n", argv[1], edgediff_version());
    edgediff_model_free(model);
    return status;
}
