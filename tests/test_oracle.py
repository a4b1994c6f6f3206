"""Samplers against an exact oracle: the true eps of a Gaussian mixture (edgediff_export.oracle).

Deterministic solvers: the error against a converged reference (Heun, 2000 log-SNR steps) must
shrink at the solver's order; the fitted slope of log error against log steps over 10..80
steps is checked against the theoretical order with a margin (pre-asymptotic step counts and
the shared final denoise pull measured slopes a little off the theory; the margins say how much).
Stochastic samplers: 4000 samples must reproduce the mixture's weights, means and variances.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from edgediff_export.oracle import default_mixture, export_oracle

STEPS = [10, 20, 40, 80]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("oracle") / "gmm-vp.onnx"
    export_oracle(path, "vp")
    return path


def sample(binary, model, tmp, sampler, steps, n, seed=0, *extra) -> np.ndarray:
    out = tmp / f"{sampler}-{steps}-{seed}.npy"
    run_cli(binary, "sample", "--model", str(model), "--sampler", sampler, "--steps", str(steps),
            "--spacing", "logsnr", "-n", str(n), "--batch-size", str(n), "--seed", str(seed),
            "-q", "--out", str(out), *extra)
    return np.load(out).reshape(n, -1).astype(np.float64)


@pytest.fixture(scope="module")
def oracle64(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("oracle") / "gmm-vp-64.onnx"
    export_oracle(path, "vp", shape=(1, 8, 8))
    return path


@pytest.fixture(scope="module")
def reference(edgediff_bin, oracle, tmp_path_factory) -> np.ndarray:
    return sample(edgediff_bin, oracle, tmp_path_factory.mktemp("ref"), "heun", 2000, 256)


def fitted_order(errors: list[float]) -> float:
    slope = np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    return -float(slope)


@pytest.mark.parametrize("sampler,extra,order,margin", [
    ("ddim", [], 1, 0.25),
    ("ode-euler", [], 1, 0.25),
    ("heun", [], 2, 0.3),
    ("dpm++2m", [], 2, 0.3),
    # 3M and UniPC-2 with its corrector are third order per step, but like diffusers they start
    # from one first-order step (no history yet), whose O(h²) local error caps the global order
    # at 2; their errors are still well below 2M's (see the printed RMSE).
    ("dpm++3m", [], 2, 0.3),
    ("unipc", ["--order", "2"], 2, 0.3),
    ("lms", ["--order", "2"], 2, 0.4),
    # Singlestep DPM-Solver has no warm-up: every step but the final denoise is full order.
    ("dpm-solver", ["--order", "2"], 2, 0.3),
    ("dpm-solver", ["--order", "3"], 3, 0.4),
])
def test_deterministic_solvers_converge_at_their_order(edgediff_bin, oracle, reference, tmp_path,
                                                      sampler, extra, order, margin):
    errors = []
    for steps in STEPS:
        x = sample(edgediff_bin, oracle, tmp_path, sampler, steps, 256, 0, *extra)
        errors.append(float(np.sqrt(((x - reference) ** 2).mean())))
    p = fitted_order(errors)
    print(f"order {sampler}: fitted {p:.2f} (theory {order}); RMSE {['%.2e' % e for e in errors]}")
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert p >= order - margin, f"fitted order {p:.2f} < {order} - {margin}"


@pytest.mark.parametrize("sampler,extra", [
    ("ddpm", []), ("ddim", ["--eta", "1"]), ("euler-a", []), ("euler-maruyama", []),
    ("sde-heun", []), ("pc", []), ("dpm++2m-sde", []),
])
def test_stochastic_samplers_reproduce_the_mixture(edgediff_bin, oracle, oracle64, tmp_path, sampler, extra):
    # The Langevin corrector sizes its step by per-sample norms |z| / |score|, which only
    # concentrate in many dimensions (Song et al. tuned snr on images): pc runs on 64 dims.
    dim = 64 if sampler == "pc" else 4
    n = 4000
    mix = default_mixture(dim)
    x = sample(edgediff_bin, oracle64 if dim == 64 else oracle, tmp_path, sampler, 200, n, 1, *extra)
    k = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1).argmin(1)
    weights = np.bincount(k, minlength=3) / n
    # Weights: binomial standard error <= 0.008 at n = 4000; 0.035 allows ~4 SE plus step bias.
    assert np.abs(weights - mix.weights).max() < 0.035, weights
    for j in range(3):
        xj = x[k == j]
        # Means: standard error <= 0.006 per coordinate. Variances: each coordinate's ratio to
        # the truth has relative SE ~5% (n_j >= 700), their mean over coordinates far less; the
        # mean ratio may be off by 15% (step bias at 200 steps, pc's corrector), any one by 30%.
        assert np.abs(xj.mean(0) - mix.means[j]).max() < 0.03, (j, xj.mean(0))
        rel = xj.var(0) / mix.variances[j]
        assert abs(rel.mean() - 1) < 0.15 and np.all(np.abs(rel - 1) < 0.3), (j, rel)
        print(f"moments {sampler} component {j}: weight {weights[j]:.3f} (true {mix.weights[j]}), "
              f"variance ratio {rel.mean():.3f}")


def test_adaptive_ode_error_follows_its_tolerance(edgediff_bin, oracle, reference, tmp_path):
    errors = []
    for tol in ("1e-3", "1e-4", "1e-5"):
        x = sample(edgediff_bin, oracle, tmp_path, "ode-adaptive", 50, 256, 0, "--rtol", tol, "--atol", tol)
        errors.append(float(np.sqrt(((x - reference) ** 2).mean())))
    print(f"ode-adaptive RMSE at tolerances 1e-3, 1e-4, 1e-5: {['%.2e' % e for e in errors]}")
    # Local error control keeps the global error within a small multiple of the tolerance
    # (measured ~2-4x here); each tenfold tightening must cut it by at least 4x.
    assert errors[0] < 1e-2 and errors[1] < 1e-3 and errors[2] < 1e-4, errors
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4, errors


def test_per_sample_adaptive_controller(edgediff_bin, oracle, reference, tmp_path):
    # Error follows the tolerance, as for ode-adaptive, with each sample on its own steps.
    errors, steps = [], []
    for tol in ("1e-3", "1e-4"):
        out = tmp_path / f"adaptive-{tol}.npy"
        proc = run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "adaptive",
                       "--spacing", "logsnr", "-n", "256", "--batch-size", "256", "--rtol", tol,
                       "--atol", tol, "-q", "--json", "--out", str(out))
        x = np.load(out).reshape(256, -1).astype(np.float64)
        errors.append(float(np.sqrt(((x - reference) ** 2).mean())))
        steps.append(np.array(json.loads(proc.stdout)["steps_per_sample"]))
    print(f"adaptive RMSE at 1e-3, 1e-4: {['%.2e' % e for e in errors]}; steps per sample "
          f"{steps[0].min()}..{steps[0].max()} and {steps[1].min()}..{steps[1].max()}")
    assert errors[0] < 1e-2 and errors[1] < 1e-3 and errors[1] < errors[0] / 4, errors
    assert len(steps[0]) == 256 and steps[1].mean() > steps[0].mean()
    # Samples differ in difficulty, so a per-sample controller gives them different step counts.
    assert steps[0].max() > steps[0].min()
    # Each sample is on its own: its result does not depend on the batch it ran in.
    one = tmp_path / "adaptive-b1.npy"
    run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "adaptive", "--spacing", "logsnr",
            "-n", "8", "--batch-size", "1", "--rtol", "1e-3", "--atol", "1e-3", "-q", "--out", str(one))
    batched = np.load(tmp_path / "adaptive-1e-3.npy")[:8]
    np.testing.assert_allclose(np.load(one), batched, atol=1e-5)


def test_adaptive_step_bounds(edgediff_bin, oracle, tmp_path):
    # min = max = 6 pins every sample to exactly 6 steps of span/6, whatever the tolerance.
    proc = run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "adaptive", "-n", "16",
                   "--rtol", "1e-9", "--atol", "1e-9", "--min-steps", "6", "--max-steps", "6", "-q",
                   "--json", "--out", str(tmp_path / "x.npy"))
    assert json.loads(proc.stdout)["steps_per_sample"] == [6] * 16
    # A loose tolerance with min-steps 12 still takes at least 12.
    proc = run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "adaptive", "-n", "16",
                   "--rtol", "1", "--atol", "1", "--min-steps", "12", "-q", "--json",
                   "--out", str(tmp_path / "y.npy"))
    assert min(json.loads(proc.stdout)["steps_per_sample"]) >= 12
    bad = run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "adaptive",
                  "--min-steps", "9", "--max-steps", "3", "--out", str(tmp_path / "z.npy"), check=False)
    assert bad.returncode == 2 and "--min-steps" in bad.stderr
