/* Checks of the C interface run by tests/test_capi.py: errors as statuses, cancellation,
 * buffers, and two threads sampling from one model handle.  capi_check MODEL */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgediff.h"
#include "check.h"

#define N 4

static edgediff_model *model;
static size_t len;

static int cancel_at_3(size_t done, size_t total, void *user) {
    (void)total;
    *(size_t *)user = done;
    return done >= 3;
}

/* A callback that tries to re-enter the library: sampling on the model the run holds (which
 * would deadlock) and freeing the request in use (a use after free). Both must be refused. */
struct reentry { edgediff_request *req; float *buf; int sample_status, calls; };
static int reenter(size_t done, size_t total, void *user) {
    (void)done; (void)total;
    struct reentry *r = user;
    r->calls++;
    r->sample_status = edgediff_sample(model, r->req, r->buf, len);
    edgediff_request_free(r->req);
    return 0;
}

static edgediff_request *request(const char *seed) {
    edgediff_request *req = NULL;
    edgediff_request_new(&req);
    edgediff_request_set(req, "n", "4");
    edgediff_request_set(req, "steps", "5");
    edgediff_request_set(req, "seed", seed);
    return req;
}

static void *worker(void *out) {
    edgediff_request *req = request("11");
    int s = edgediff_sample(model, req, (float *)out, len);
    edgediff_request_free(req);
    return (void *)(intptr_t)s;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    EXPECT(strlen(edgediff_version()) > 0, "version");
    /* A failed init is not remembered: the default search still works afterwards. */
    EXPECT(edgediff_init("/nonexistent/libonnxruntime.so") == EDGEDIFF_ERR_MODEL, "init from a wrong path");
    EXPECT(strstr(edgediff_last_error(), "/nonexistent/libonnxruntime.so") != NULL, "the message names the path");
    EXPECT(edgediff_init(NULL) == EDGEDIFF_OK, "init retried by the default search");
    EXPECT(edgediff_model_open(argv[1], "vulkan", 0, 0, &model) == EDGEDIFF_ERR_ARGUMENT && model == NULL, "bad provider");
    EXPECT(edgediff_model_open("/nonexistent.onnx", NULL, 0, 0, &model) == EDGEDIFF_ERR_MODEL, "missing file");
    EXPECT(strstr(edgediff_last_error(), "nonexistent") != NULL, "message names the file");
    const char bad_utf8[] = {'m', (char)0xff, '.', 'o', 0};
    EXPECT(edgediff_model_open(bad_utf8, NULL, 0, 0, &model) == EDGEDIFF_ERR_ARGUMENT, "invalid UTF-8 path");
    EXPECT(edgediff_model_open(argv[1], NULL, 0, 0, NULL) == EDGEDIFF_ERR_ARGUMENT, "NULL out");
    EXPECT(edgediff_model_open(argv[1], NULL, 0, 0, &model) == EDGEDIFF_OK, "open");
    EXPECT(strcmp(edgediff_last_error(), "") == 0, "success clears the message");

    size_t shape[3];
    EXPECT(edgediff_model_sample_shape(model, shape) == EDGEDIFF_OK, "shape");
    len = N * shape[0] * shape[1] * shape[2];
    EXPECT(edgediff_model_sample_shape(NULL, shape) == EDGEDIFF_ERR_ARGUMENT, "NULL model");
    size_t needed = 0;
    char small[8];
    EXPECT(edgediff_model_metadata_json(model, small, sizeof small, &needed) == EDGEDIFF_ERR_ARGUMENT && needed > 8, "small buffer");
    char *json = malloc(needed);
    EXPECT(edgediff_model_metadata_json(model, json, needed, NULL) == EDGEDIFF_OK && strstr(json, "\"schedule\""), "metadata");
    free(json);

    edgediff_request *req = request("11");
    EXPECT(edgediff_request_set(req, "steps", "-3") == EDGEDIFF_ERR_ARGUMENT, "negative steps");
    EXPECT(edgediff_request_set(req, "sampler", "nope") == EDGEDIFF_ERR_ARGUMENT, "unknown sampler");
    EXPECT(edgediff_request_set(req, "colour", "red") == EDGEDIFF_ERR_ARGUMENT, "unknown key");
    EXPECT(edgediff_request_set(NULL, "n", "1") == EDGEDIFF_ERR_ARGUMENT, "NULL request");
    float *one = calloc(len, sizeof(float)), *a = calloc(len, sizeof(float)), *b = calloc(len, sizeof(float));
    EXPECT(edgediff_sample(model, req, one, len - 1) == EDGEDIFF_ERR_ARGUMENT, "buffer too small");
    EXPECT(edgediff_sample(model, req, NULL, len) == EDGEDIFF_ERR_ARGUMENT, "NULL buffer");
    EXPECT(edgediff_sample(model, req, one, len) == EDGEDIFF_OK, "sample");

    size_t seen = 0;
    edgediff_request_set_progress(req, cancel_at_3, &seen);
    EXPECT(edgediff_sample(model, req, a, len) == EDGEDIFF_ERR_CANCELLED && seen == 3, "cancel at step 3 (saw %zu)", seen);
    struct reentry re = {req, b, -1, 0};
    edgediff_request_set_progress(req, reenter, &re);
    EXPECT(edgediff_sample(model, req, a, len) == EDGEDIFF_OK && re.calls == 5, "a run whose callback re-enters completes");
    EXPECT(re.sample_status == EDGEDIFF_ERR_ARGUMENT, "sampling from inside a callback is refused (%d)", re.sample_status);
    EXPECT(memcmp(a, one, len * sizeof(float)) == 0, "the outer run is unaffected");
    EXPECT(edgediff_request_set(req, "n", "4") == EDGEDIFF_OK, "the request freed from its callback is still live");
    edgediff_request_set_progress(req, NULL, NULL);
    /* RePaint counts that would overflow (steps * (1 + resample)) are refused, not wrapped. */
    EXPECT(edgediff_inpaint(model, req, one, a, N, 1, (size_t)-1, b, len) == EDGEDIFF_ERR_ARGUMENT
           && strstr(edgediff_last_error(), "resample"), "resample overflow");
    edgediff_request_set(req, "steps", "0");
    EXPECT(edgediff_sample(model, req, a, len) == EDGEDIFF_ERR_ARGUMENT, "steps 0");
    edgediff_request_free(req);

    /* Two threads, one handle: each gets what a lone run gets. */
    pthread_t t1, t2;
    pthread_create(&t1, NULL, worker, a);
    pthread_create(&t2, NULL, worker, b);
    void *r1, *r2;
    pthread_join(t1, &r1);
    pthread_join(t2, &r2);
    EXPECT(r1 == 0 && r2 == 0, "threads ran");
    EXPECT(memcmp(a, one, len * sizeof(float)) == 0 && memcmp(b, one, len * sizeof(float)) == 0, "threads match the lone run");

    /* Freed handles: detected, and a second free does nothing. */
    edgediff_request *gone = request("1");
    edgediff_request_free(gone);
    EXPECT(edgediff_request_set(gone, "n", "2") == EDGEDIFF_ERR_ARGUMENT && strstr(edgediff_last_error(), "not a live"), "freed request");
    edgediff_request_free(gone);
    edgediff_model *dead = NULL;
    EXPECT(edgediff_model_open(argv[1], NULL, 0, 0, &dead) == EDGEDIFF_OK, "second model");
    edgediff_model_free(dead);
    EXPECT(edgediff_model_sample_shape(dead, shape) == EDGEDIFF_ERR_ARGUMENT, "freed model");
    edgediff_model_free(dead);

    free(one); free(a); free(b);
    edgediff_model_free(model);
    edgediff_model_free(NULL);
    edgediff_request_free(NULL);
    if (failures) fprintf(stderr, "%d failures\n", failures);
    else printf("capi_check: all passed\n");
    return failures != 0;
}
