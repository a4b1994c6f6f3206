"""`edgediff elbo` against an independent PyTorch computation (edgediff_export.elbo).

- Exact: the default model (models/mnist-ddpm.onnx) and the runtime, with all timesteps and the
  same noise (`--noise`), on one MNIST test image: every one of the 999 KL terms, L_0 and L_T.
  The reference takes eps from the same ONNX file through onnxruntime's Python API (the PyTorch
  checkpoint it was exported from is not shipped; the two agree within 1e-6 relative), so what
  is compared is the ELBO arithmetic; float32 differences in the network's output move a term
  by far less than the 1e-3 relative allowed per term and 1e-5 on the total.
- Monte Carlo: on a small exported U-Net, the importance-sampled and the uniform estimates
  agree with the all-timesteps value (two runs with different noise, whose spread gives that
  value's own noise) within 4 combined standard errors, the MC part being the run's own
  stated `mc_standard_error`.
- Seeded draws do not depend on the batch size; the C entry point gives the CLI's numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli

DEFAULT_MODEL = ROOT / "models" / "mnist-ddpm.onnx"


def elbo_json(binary, *args) -> dict:
    return json.loads(run_cli(binary, "elbo", "--json", "-q", *args).stdout)


def test_all_timesteps_match_pytorch_on_the_default_model(edgediff_bin, tmp_path):
    from edgediff_export.data import load_mnist
    from edgediff_export.elbo import Schedule, all_terms, onnx_eps, prior_term
    from edgediff_export.metadata import read_metadata
    from edgediff_export.schedules import betas_for

    x = load_mnist("test")[0][:1]
    T = read_metadata(DEFAULT_MODEL)["schedule"]["num_train_timesteps"]
    noise = np.random.default_rng(5).standard_normal((1, T, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", noise)
    got = elbo_json(edgediff_bin, "--data", str(tmp_path / "x.npy"), "--all-timesteps", "--noise",
                    str(tmp_path / "z.npy"), "--bins", str(T - 1), "--batch-size", "128",
                    "--decoder-draws", "1")
    assert got["pixel_scale"] == 256  # mnist.pkl's pixel/256, detected

    s = Schedule(betas_for("linear", T))
    x0 = torch.from_numpy(x).double()
    levels = torch.round((x0 + 1.0) * 128.0).long()
    ref = all_terms(onnx_eps(DEFAULT_MODEL), x0, torch.from_numpy(noise).double(), s, 1.0 / 256.0, levels)[0].numpy()
    to_bpd = 1.0 / (784 * math.log(2.0))
    prior = float(prior_term(x0, s)[0]) * to_bpd
    per_t = np.array([b["bits_per_dim"] for b in got["kl_bins"]])
    assert [b["t_first"] for b in got["kl_bins"]] == list(range(2, T + 1))
    np.testing.assert_allclose(per_t, ref[1:] * to_bpd, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(got["reconstruction_bits_per_dim"], ref[0] * to_bpd, rtol=1e-5)
    np.testing.assert_allclose(got["prior_bits_per_dim"], prior, rtol=1e-9)
    total = (ref.sum()) * to_bpd + prior
    np.testing.assert_allclose(got["bits_per_dim"], total, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Four 8x8 uint8 images: a bright square on a dark background with a few random levels."""
    rng = np.random.default_rng(1)
    x = np.zeros((4, 8, 8), np.uint8)
    x[:, 2:6, 2:6] = 255
    x[:, 0, :] = rng.integers(0, 256, (4, 8))
    path = tmp_path_factory.mktemp("elbo") / "px.npy"
    np.save(path, x)
    return path


def test_monte_carlo_estimates_agree_with_all_timesteps(edgediff_bin, tiny_models, tiny_data):
    model = ["--model", str(tiny_models["linear"]), "--data", str(tiny_data)]
    runs = [elbo_json(edgediff_bin, *model, "--all-timesteps", "--batch-size", "500", "--seed", str(s))
            for s in (10, 11)]
    # The bins split the KL sum exactly.
    assert math.isclose(sum(b["bits_per_dim"] for b in runs[0]["kl_bins"]), runs[0]["kl_bits_per_dim"],
                        rel_tol=1e-12)
    a, b = (np.array(r["per_image"]["bits_per_dim"]) for r in runs)
    exact = (a.mean() + b.mean()) / 2
    # Var of one run's mean is sum((a - b)^2 / 2) / N^2; the average of two halves it.
    exact_var = ((a - b) ** 2 / 2).sum() / len(a) ** 2 / 2
    for sampling, k in (("importance", 200), ("uniform", 400)):
        mc = elbo_json(edgediff_bin, *model, "--sampling", sampling, "--timesteps-per-image", str(k),
                       "--seed", "3", "--batch-size", "500")
        assert mc["sampling"] == sampling and mc["network_calls"] == math.ceil(4 * (k + 4) / 500)
        gap = abs(mc["bits_per_dim"] - exact)
        assert gap < 4 * math.sqrt(mc["mc_standard_error"] ** 2 + exact_var), \
            (sampling, mc["bits_per_dim"], exact, mc["mc_standard_error"], exact_var)
        assert mc["reconstruction_bits_per_dim"] > 0 and mc["prior_bits_per_dim"] > 0


def test_draws_do_not_depend_on_the_batch_size(edgediff_bin, tiny_models, tiny_data):
    args = ["--model", str(tiny_models["linear"]), "--data", str(tiny_data), "--timesteps-per-image", "9"]
    a = elbo_json(edgediff_bin, *args, "--batch-size", "7")
    b = elbo_json(edgediff_bin, *args, "--batch-size", "64")
    assert a["per_image"] == b["per_image"]
    c = elbo_json(edgediff_bin, *args, "--seed", "1")
    assert c["per_image"] != a["per_image"]


C_ELBO = r"""
#include <stdio.h>
#include <stdlib.h>
#include "edgediff.h"
int main(int argc, char **argv) {
    edgediff_model *m = NULL; edgediff_request *r = NULL; edgediff_elbo_result res;
    size_t n = (size_t)atoi(argv[3]);
    float *x = malloc(n * 64 * sizeof(float));
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(x, sizeof(float), n * 64, f) != n * 64) return 3;
    fclose(f);
    if (edgediff_model_open(argv[1], NULL, 0, 0, &m) || edgediff_request_new(&r)) return 4;
    edgediff_request_set(r, "seed", "2");
    edgediff_request_set(r, "batch_size", "50");
    int s = edgediff_elbo(m, r, x, n, 20, &res);
    if (s) { fprintf(stderr, "%s\n", edgediff_last_error()); return 5; }
    printf("%.17g %.17g %.17g %.17g %.17g\n", res.bits_per_dim, res.standard_error, res.prior, res.kl,
           res.reconstruction);
    /* Off the grid: an argument error, not a crash. */
    x[0] = 0.5f / 256.0f;
    s = edgediff_elbo(m, r, x, n, 20, &res);
    printf("%d\n", s);
    edgediff_request_free(r); edgediff_model_free(m); free(x);
    return 0;
}
"""


def test_c_entry_point_gives_the_cli_numbers(edgediff_bin, tiny_models, tiny_data, tmp_path):
    src, exe = tmp_path / "elbo.c", tmp_path / "elbo"
    src.write_text(C_ELBO)
    lib = ROOT / "target" / "debug"
    subprocess.run(["gcc", "-Wall", "-Werror", str(src), f"-I{ROOT / 'runtime' / 'include'}",
                    str(lib / "libedgediff.a"), "-ldl", "-lpthread", "-lm", "-o", str(exe)], check=True)
    x = np.load(tiny_data).astype(np.float64) * 2.0 / 255.0 - 1.0
    (tmp_path / "x.f32").write_bytes(x.astype(np.float32).tobytes())
    env = dict(os.environ)
    env.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort" / "libonnxruntime.so.1.32.0"))
    out = subprocess.run([str(exe), str(tiny_models["linear"]), str(tmp_path / "x.f32"), "4"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    first, status = out.stdout.split("\n")[:2]
    got = [float(v) for v in first.split()]
    cli = elbo_json(edgediff_bin, "--model", str(tiny_models["linear"]), "--data", str(tiny_data),
                    "--timesteps-per-image", "20", "--seed", "2", "--batch-size", "50")
    want = [cli["bits_per_dim"], cli["standard_error"], cli["prior_bits_per_dim"], cli["kl_bits_per_dim"],
            cli["reconstruction_bits_per_dim"]]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert int(status) == 2
