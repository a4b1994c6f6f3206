/* Generates a grid of samples with edgediff, as `edgediff sample` does.
 *   grid OUT.png [MODEL.onnx|-] [N] [STEPS] [SEED] [SAMPLER]
 * MODEL "-" (the default) is the embedded MNIST model. Build (from the repository root, after
 * `cargo build --release`):
 *   gcc examples/c/grid.c -Iruntime/include target/release/libedgediff.a -ldl -lpthread -lm -o grid
 */
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

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.png [MODEL|-] [N] [STEPS] [SEED] [SAMPLER]\n", argv[0]);
        return 2;
    }
    const char *model_path = argc > 2 && strcmp(argv[2], "-") != 0 ? argv[2] : NULL;
    edgediff_model *model = NULL;
    edgediff_request *req = NULL;
    int status = check(edgediff_model_open(model_path, "cpu", 0, 0, &model), "opening the model");
    if (!status) status = check(edgediff_request_new(&req), "creating a request");
    const char *keys[] = {"n", "steps", "seed", "sampler"};
    for (int i = 0; i < 4 && !status; i++)
        if (argc > 3 + i) status = check(edgediff_request_set(req, keys[i], argv[3 + i]), keys[i]);
    if (!status) status = check(edgediff_request_set_progress(req, progress, NULL), "progress");
    if (!status) status = check(edgediff_sample_to_file(model, req, argv[1]), "sampling");
    if (!status) fprintf(stderr, "wrote %s (edgediff %s)\n", argv[1], edgediff_version());
    edgediff_request_free(req);
    edgediff_model_free(model);
    return status;
}
