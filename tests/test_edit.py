"""`edgediff invert` and `edgediff interpolate` (what deterministic sampling buys).

On the exact Gaussian-mixture oracle, DDIM inversion of true data samples must give noise that
looks like the prior (the probability-flow ODE maps the data distribution onto N(0, I)), its
round-trip error must shrink with the step count, and the written noise must decode through
`sample --init-noise` to exactly the reported reconstruction. Interpolation frames at the ends
must be the samples of the two seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from edgediff_export.oracle import default_mixture, export_oracle

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "gmm-vp-64.onnx"
    export_oracle(path, "vp", shape=SHAPE)
    return path


def invert(binary, model, tmp, data, steps):
    np.save(tmp / "data.npy", data)
    proc = run_cli(binary, "invert", "--model", str(model), "--image", str(tmp / "data.npy"),
                   "--steps", str(steps), "--spacing", "logsnr", "-o", str(tmp / f"noise{steps}.npy"),
                   "--reconstruction", str(tmp / f"rec{steps}.npy"), "--json", "-q")
    return json.loads(proc.stdout), np.load(tmp / f"noise{steps}.npy"), np.load(tmp / f"rec{steps}.npy")


def test_inversion_maps_data_to_the_prior_and_round_trips(edgediff_bin, oracle, tmp_path):
    n = 1000
    data = default_mixture(int(np.prod(SHAPE))).sample(n, seed=1).reshape(n, *SHAPE).astype(np.float32)
    coarse, _, _ = invert(edgediff_bin, oracle, tmp_path, data, 10)
    fine, noise, rec = invert(edgediff_bin, oracle, tmp_path, data, 80)
    print(f"round-trip mean RMSE: {coarse['mean_rmse']:.2e} at 10 steps, {fine['mean_rmse']:.2e} at 80")
    # First-order steps both ways: 8x the steps should cut the error by well over 2x.
    assert fine["mean_rmse"] < coarse["mean_rmse"] / 2
    assert fine["mean_rmse"] < 0.05
    # The noise of 1000 x 64 values: mean 0 (standard error 0.004), variance 1, no correlation
    # with the data beyond what the ODE's map allows. Tolerances are ~5 standard errors plus the
    # 80-step discretisation bias.
    flat = noise.reshape(n, -1).astype(np.float64)
    print(f"inverted noise: mean {flat.mean():.3f}, std {flat.std():.3f}")
    assert abs(flat.mean()) < 0.03
    assert abs(flat.std() - 1.0) < 0.05
    # The noise decodes through `sample` to the reconstruction `invert` reported.
    out = tmp_path / "decoded.npy"
    run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "ddim", "--steps", "80",
            "--spacing", "logsnr", "--init-noise", str(tmp_path / "noise80.npy"), "-q", "--out", str(out))
    assert np.array_equal(np.load(out), rec)
    assert abs(np.sqrt(((rec - data) ** 2).reshape(n, -1).mean(1)).mean() - fine["mean_rmse"]) < 1e-6


def test_interpolation_ends_are_the_seeds_samples(edgediff_bin, oracle, tmp_path):
    out = tmp_path / "strip.npy"
    run_cli(edgediff_bin, "interpolate", "--model", str(oracle), "--seed-a", "4", "--seed-b", "9",
            "--frames", "5", "--sampler", "dpm++2m", "--steps", "20", "-q", "--out", str(out))
    frames = np.load(out)
    assert frames.shape == (5, *SHAPE)
    for seed, frame in ((4, frames[0]), (9, frames[-1])):
        one = tmp_path / f"seed{seed}.npy"
        run_cli(edgediff_bin, "sample", "--model", str(oracle), "--sampler", "dpm++2m", "--steps", "20",
                "-n", "1", "--seed", str(seed), "-q", "--out", str(one))
        np.testing.assert_allclose(frame, np.load(one)[0], atol=1e-6)
    # The middle frames differ from both ends.
    assert np.abs(frames[2] - frames[0]).max() > 1e-2 and np.abs(frames[2] - frames[4]).max() > 1e-2


def test_interpolation_from_inverted_noise_and_png_strip(edgediff_bin, tiny_models, tmp_path):
    # PNG in (from `sample`), noise out, strip PNG out, on a U-Net model.
    run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "2", "--steps", "10",
            "-q", "--out", str(tmp_path / "imgs"))
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    run_cli(edgediff_bin, "invert", "--model", str(tiny_models["linear"]), "--image", str(pngs[0]),
            "--image", str(pngs[1]), "--steps", "10", "-q", "-o", str(tmp_path / "noise.npy"))
    assert np.load(tmp_path / "noise.npy").shape == (2, 1, 8, 8)
    run_cli(edgediff_bin, "interpolate", "--model", str(tiny_models["linear"]), "--from",
            str(tmp_path / "noise.npy"), "--to", str(tmp_path / "noise.npy"), "--to-index", "1",
            "--frames", "4", "--steps", "10", "-q", "--out", str(tmp_path / "strip.png"))
    assert (tmp_path / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,code,needle", [
    (["interpolate", "--sampler", "ddpm"], 2, "stochastic"),
    (["interpolate", "--frames", "1"], 2, "--frames"),
    (["interpolate", "--from", "NOISE", "--from-index", "7"], 4, "out of range"),
    (["invert"], 2, "--image"),
    (["invert", "--image", "WRONG_PNG"], 4, "8x8"),
])
def test_edit_errors(edgediff_bin, tiny_models, tmp_path, args, code, needle):
    np.save(tmp_path / "noise.npy", np.zeros((2, 1, 8, 8), np.float32))
    # A 22x22 PNG: the grid of 4 samples, given where one 8x8 image is expected.
    run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "4", "--steps", "2",
            "-q", "--out", str(tmp_path / "grid.png"))
    args = [{"NOISE": str(tmp_path / "noise.npy"), "WRONG_PNG": str(tmp_path / "grid.png")}.get(a, a)
            for a in args]
    proc = run_cli(edgediff_bin, *args, "--model", str(tiny_models["linear"]), "-q",
                   "--out", str(tmp_path / "out.npy"), check=False)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out.npy").exists()
