"""`edgediff calibrate` on the exact Gaussian-mixture oracle: a grid fitted on pilot noises must
cut the sampler's error to the converged probability-flow ODE solution on noise it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from edgediff_export.oracle import export_oracle

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, edgediff_bin):
    t = tmp_path_factory.mktemp("calibrate")
    model = t / "oracle.onnx"
    export_oracle(model, "linear", shape=SHAPE)
    init = t / "init.npy"
    # Held-out noise: numpy's generator, not the runtime's seeded streams the pilot comes from.
    np.save(init, np.random.default_rng(0).standard_normal((256, *SHAPE)).astype(np.float32))
    ref = sample(edgediff_bin, model, init, t / "ref.npy", "heun", ["--steps", "1000", "--spacing", "logsnr"])
    return t, model, init, ref


def sample(binary: Path, model: Path, init: Path, out: Path, sampler: str, args: list[str]) -> np.ndarray:
    run_cli(binary, "sample", "--model", str(model), "--sampler", sampler, "--init-noise", str(init),
            "-n", "256", "--batch-size", "256", "-q", "-o", str(out), *args)
    return np.load(out).astype(np.float64)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()))


def test_calibrated_grid_beats_every_fixed_spacing_on_unseen_noise(setup, edgediff_bin):
    t, model, init, ref = setup
    proc = run_cli(edgediff_bin, "calibrate", "--model", str(model), "--sampler", "unipc", "--order", "3",
                   "--steps", "10", "--pilot", "256", "--seed", "1", "--max-evals", "300", "--json")
    cal = json.loads(proc.stdout)
    ts = cal["timesteps"]
    assert len(ts) == 10 and ts[0] == pytest.approx(999.0) and all(b < a for a, b in zip(ts, ts[1:]))
    assert cal["rmse"] <= cal["rmse_logsnr"] and cal["evals"] <= 300
    listed = ",".join(f"{v:.6f}" for v in ts)
    err_cal = rmse(sample(edgediff_bin, model, init, t / "cal.npy", "unipc",
                          ["--order", "3", "--timesteps", listed]), ref)
    fixed = {}
    for spacing in (["trailing"], ["logsnr"], ["karras"], ["karras", "--rho", "3"], ["linspace"]):
        x = sample(edgediff_bin, model, init, t / "fixed.npy", "unipc",
                   ["--order", "3", "--steps", "10", "--spacing", *spacing])
        fixed[" ".join(spacing)] = rmse(x, ref)
    # Measured: calibrated 1.0e-2 against 3.1e-2 for the best fixed spacing (ratio ~0.33) with a
    # 1024-noise pilot; a 256-noise pilot and 300 runs are set here to keep the test short.
    assert err_cal < 0.6 * min(fixed.values()), (err_cal, fixed)


@pytest.mark.parametrize("args,message", [
    (["--sampler", "ddpm"], "deterministic fixed-grid sampler"),
    (["--sampler", "ode-adaptive"], "chooses its own steps"),
    (["--steps", "1"], "--steps 1 must be in 2..=1000"),
    (["--steps", "10", "--teacher-steps", "15"], "--teacher-steps 15 must be at least twice"),
    (["--pilot", "0"], "--pilot 0 must be in 1..=100000"),
])
def test_bad_arguments_are_refused(setup, edgediff_bin, args, message):
    _, model, _, _ = setup
    proc = run_cli(edgediff_bin, "calibrate", "--model", str(model), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def levels(model: Path, ts: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of the oracle's own schedule at fractional times `ts`."""
    import onnx
    import torch
    from edgediff_export.oracle import MixtureEps
    meta = json.loads(next(p.value for p in onnx.load(str(model)).metadata_props if p.key == "edgediff"))
    from edgediff_export.oracle import Mixture
    mix = Mixture(*(np.array(meta["extra"]["mixture"][k]) for k in ("weights", "means", "variances")))
    net = MixtureEps(mix, SHAPE, meta["schedule"], meta["time_input"])
    a, s = net.alpha_sigma(torch.tensor(ts, dtype=torch.float64))
    return a.double().numpy(), s.double().numpy()


@pytest.fixture(scope="module")
def fitted3(setup, edgediff_bin):
    """A 3-call fitted calibration (a short search: the file, not the fit, is under test): its
    file and `calibrate --json`'s report. The pilot (64) spans two batches (32)."""
    t, model, _, _ = setup
    cal_path = t / "fitted-3.json"
    proc = run_cli(edgediff_bin, "calibrate", "--model", str(model), "--sampler", "fitted", "--steps", "3",
                   "--pilot", "64", "--batch-size", "32", "--max-evals", "12", "--starts", "2",
                   "--save", str(cal_path), "--json")
    return cal_path, json.loads(proc.stdout)


def test_fitted_sampler_round_trips_its_calibration_file(setup, fitted3, edgediff_bin):
    """`calibrate --sampler fitted --save` writes the grid and coefficients its JSON reports;
    `sample --calibration` runs x_{i+1} = c_i0 x_i + sum_j c_i(j+1) D_j with them, which numpy
    recomputes here from the oracle's eps (onnxruntime) and the schedule's own levels."""
    import onnxruntime as ort
    t, model, init, _ = setup
    cal_path, cal = fitted3
    saved = json.loads(cal_path.read_text())
    assert saved["edgediff_calibration"] == 1 and saved["sampler"] == "fitted"
    assert saved["timesteps"] == cal["timesteps"] and saved["coefficients"] == cal["coefficients"]
    assert [len(r) for r in saved["coefficients"]] == [2, 3, 4] and cal["evals"] <= 12
    assert saved["schedule"]["kind"] == "linear" and saved["fit"]["pilot"] == 64

    x_init = np.load(init)[:32]
    np.save(t / "init32.npy", x_init)
    run_cli(edgediff_bin, "sample", "--model", str(model), "--calibration", str(cal_path),
            "--init-noise", str(t / "init32.npy"), "-q", "-o", str(t / "fitted.npy"))
    got = np.load(t / "fitted.npy")

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    alpha, sigma = levels(model, saved["timesteps"])
    x, x0s = x_init.astype(np.float64), []
    for i, (ts, row) in enumerate(zip(saved["timesteps"], saved["coefficients"])):
        tt = np.full(len(x), ts, np.float32)
        eps = sess.run(None, {"sample": x.astype(np.float32), "timestep": tt})[0].astype(np.float64)
        x0s.append((x - sigma[i] * eps) / alpha[i])
        x = row[0] * x + sum(c * d for c, d in zip(row[1:], x0s))
    # float32 arithmetic on both sides (the network's inputs and outputs): about 1e-6 of ~1.
    np.testing.assert_allclose(got, x, atol=2e-5)


def test_a_grid_calibration_file_samples_as_its_timesteps_do(setup, edgediff_bin):
    t, model, init, _ = setup
    proc = run_cli(edgediff_bin, "calibrate", "--model", str(model), "--sampler", "unipc", "--order", "3",
                   "--steps", "3", "--pilot", "16", "--max-evals", "4", "--save", str(t / "unipc.json"), "--json")
    cal = json.loads(proc.stdout)
    saved = json.loads((t / "unipc.json").read_text())
    assert (saved["sampler"], saved["order"], "coefficients" in saved) == ("unipc", 3, False)
    listed = ",".join(repr(v) for v in cal["timesteps"])
    common = ["sample", "--model", str(model), "-n", "8", "--seed", "3", "-q"]
    run_cli(edgediff_bin, *common, "--calibration", str(t / "unipc.json"), "-o", str(t / "a.npy"))
    run_cli(edgediff_bin, *common, "--sampler", "unipc", "--order", "3", "--timesteps", listed, "-o", str(t / "b.npy"))
    assert np.load(t / "a.npy").tobytes() == np.load(t / "b.npy").tobytes()


def test_fitted_sampler_beats_every_fixed_spacing_at_five_calls_on_unseen_noise(setup, edgediff_bin):
    t, model, init, ref = setup
    cal_path = t / "fitted-5.json"
    run_cli(edgediff_bin, "calibrate", "--model", str(model), "--sampler", "fitted", "--steps", "5",
            "--pilot", "256", "--seed", "1", "--max-evals", "150", "--starts", "2", "--save", str(cal_path), "-q")
    run_cli(edgediff_bin, "sample", "--model", str(model), "--calibration", str(cal_path), "--init-noise",
            str(init), "-n", "256", "--batch-size", "256", "-q", "-o", str(t / "fitted5.npy"))
    err_fit = rmse(np.load(t / "fitted5.npy").astype(np.float64), ref)
    fixed = {}
    for sampler, order in (("unipc", "3"), ("dpm++2m", "2")):
        for spacing in (["trailing"], ["logsnr"], ["karras"], ["linspace"]):
            x = sample(edgediff_bin, model, init, t / "fixed.npy", sampler,
                       ["--order", order, "--steps", "5", "--spacing", *spacing])
            fixed[f"{sampler} {' '.join(spacing)}"] = rmse(x, ref)
    # Measured: fitted 4.4e-2 against 1.29e-1 for the best fixed spacing (unipc-3 trailing; ratio
    # ~0.34), with a 256-noise pilot and 150 runs set here to keep the test short.
    assert err_fit < 0.6 * min(fixed.values()), (err_fit, fixed)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(coefficients=c["coefficients"][:-1]), "coefficients: 2 rows for 3 time steps"),
    (lambda c: c.update(edgediff_calibration=7), "calibration format 7; this edgediff reads format 1"),
    (lambda c: c.update(sampler="unipc"), "coefficients are for the fitted sampler, not unipc"),
    (lambda c: c["schedule"].update(beta_end=0.03), "made for a model with schedule"),
])
def test_bad_calibration_files_are_refused(setup, fitted3, edgediff_bin, edit, message):
    t, model, _, _ = setup
    good = json.loads(fitted3[0].read_text())
    edit(good)
    bad = t / "bad.json"
    bad.write_text(json.dumps(good))
    proc = run_cli(edgediff_bin, "sample", "--model", str(model), "--calibration", str(bad), "-n", "2",
                   "-q", "-o", str(t / "bad.npy"), check=False)
    assert proc.returncode == 4 and message in proc.stderr, proc.stderr
    assert not (t / "bad.npy").exists()
