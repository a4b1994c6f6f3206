"""The edgediff CLI end to end on a tiny exported model, and its errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, run_cli


def test_sample_outputs_and_determinism(edgediff_bin, tiny_models, tmp_path):
    model = str(tiny_models["linear"])
    common = ["sample", "--model", model, "--steps", "10", "-n", "5", "-q"]
    run_cli(edgediff_bin, *common, "--seed", "3", "--out", str(tmp_path / "a.png"))
    run_cli(edgediff_bin, *common, "--seed", "3", "--out", str(tmp_path / "b.png"))
    run_cli(edgediff_bin, *common, "--seed", "4", "--out", str(tmp_path / "c.png"))
    a, b, c = ((tmp_path / f"{k}.png").read_bytes() for k in "abc")
    assert a.startswith(b"\x89PNG") and a == b and a != c

    run_cli(edgediff_bin, *common, "--seed", "3", "--out", str(tmp_path / "x.npy"))
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()

    run_cli(edgediff_bin, *common, "--seed", "3", "--out", str(tmp_path / "dir"))
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [f"{i:06d}.png" for i in range(5)]


def test_batching_does_not_change_samples(edgediff_bin, tiny_models, tmp_path):
    model = str(tiny_models["linear"])
    for bs in (1, 2, 7):
        run_cli(edgediff_bin, "sample", "--model", model, "--steps", "5", "-n", "7", "--sampler",
                "ddim", "--eta", "1", "--batch-size", str(bs), "-q", "--out", str(tmp_path / f"{bs}.npy"))
    ref = np.load(tmp_path / "7.npy")
    for bs in (1, 2):
        np.testing.assert_array_equal(np.load(tmp_path / f"{bs}.npy"), ref)


def test_info_json(edgediff_bin, tiny_models):
    out = run_cli(edgediff_bin, "info", "--model", str(tiny_models["cosine"]), "--json").stdout
    meta = json.loads(out)
    assert meta["schedule"]["kind"] == "cosine" and meta["sample_shape"] == [1, 8, 8]
    assert meta["prediction"] == "epsilon" and meta["time_input"] == "index"


def check_error(proc, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["--steps", "0"], 2, "--steps must be at least 1"),
    (["--steps", "1001"], 2, "exceeds the model's 1000 training timesteps"),
    (["--sampler", "magic"], 2, "unknown sampler 'magic'"),
    (["--eta", "2"], 2, "outside [0, 1]"),
    (["-n", "0"], 2, "-n 0 must be in"),
    (["--spacing", "odd"], 2, "unknown spacing"),
    (["--class", "3"], 2, "not class-conditional"),
    (["--guidance", "3"], 2, "not class-conditional"),
    (["--dynamic-threshold", "1.5"], 2, "--dynamic-threshold"),
    (["--sampler", "adaptive", "--min-steps", "0"], 2, "--min-steps"),
])
def test_bad_arguments(edgediff_bin, tiny_models, tmp_path, args, code, needle):
    out = tmp_path / "never.png"
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "--out", str(out),
                   *args, check=False)
    check_error(proc, code, needle)
    assert not out.exists()


def test_missing_onnxruntime(edgediff_bin, tiny_models, tmp_path):
    proc = run_cli(edgediff_bin, "info", "--model", str(tiny_models["linear"]), check=False,
                   env={"ORT_DYLIB_PATH": str(tmp_path / "nope.so")})
    check_error(proc, 3, "ONNX Runtime library not found", "tools/fetch-onnxruntime", "nope.so")
    fake = tmp_path / "libonnxruntime.so"
    fake.write_bytes(b"not a library")
    proc = run_cli(edgediff_bin, "info", "--model", str(tiny_models["linear"]), "--ort-lib",
                   str(fake), check=False)
    check_error(proc, 3, "ONNX Runtime library not found or not loadable")


def test_model_without_metadata_then_fixed(edgediff_bin, tiny_models, tmp_path):
    proto = onnx.load(str(tiny_models["linear"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    proc = run_cli(edgediff_bin, "sample", "--model", str(bare), "--out", str(tmp_path / "x.png"),
                   check=False)
    check_error(proc, 3, "has no usable edgediff metadata", "edgediff-export add-metadata")

    from edgediff_export.export import main as export_main
    export_main(["add-metadata", str(bare), "--sample-shape", "1,8,8"])
    run_cli(edgediff_bin, "sample", "--model", str(bare), "--steps", "3", "-n", "2", "-q",
            "--out", str(tmp_path / "x.png"))


def test_metadata_disagreeing_with_graph(edgediff_bin, tiny_models, tmp_path):
    proto = onnx.load(str(tiny_models["linear"]))
    meta = json.loads(proto.metadata_props[0].value)
    meta["sample_shape"] = [3, 8, 8]
    proto.metadata_props[0].value = json.dumps(meta)
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, str(wrong))
    proc = run_cli(edgediff_bin, "info", "--model", str(wrong), check=False)
    check_error(proc, 3, "disagrees with the graph")


def test_not_an_onnx_file(edgediff_bin, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    proc = run_cli(edgediff_bin, "info", "--model", str(junk), check=False)
    check_error(proc, 3, "cannot parse it as an ONNX model")
    proc = run_cli(edgediff_bin, "info", "--model", str(tmp_path / "absent.onnx"), check=False)
    check_error(proc, 3, "no such file")


def test_unwritable_output_leaves_nothing(edgediff_bin, tiny_models, tmp_path):
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "--steps", "2",
                   "-n", "2", "--out", "/dev/full/x.png", check=False)
    check_error(proc, 4, "writing /dev/full/x.png")


def test_samplers_listing_names_every_sampler_and_each_runs(edgediff_bin, tiny_models, tmp_path):
    rows = json.loads(run_cli(edgediff_bin, "samplers", "--json").stdout)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) >= 15
    for name in names:
        out = tmp_path / f"{name}.npy"
        # The fitted sampler runs from a calibration file: here one holding DDIM's coefficients.
        how = (["--calibration", str(ddim_calibration(tmp_path))] if name == "fitted" else
               ["--sampler", name, "--steps", "4"])
        run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), *how, "-n", "2", "-q",
                "--out", str(out))
        x = np.load(out)
        assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all(), name
    # DDIM in the fitted sampler's terms: x_(i+1) = (sigma_(i+1)/sigma_i) x_i
    # + (alpha_(i+1) - alpha_i sigma_(i+1)/sigma_i) D_i, so the two runs agree to float32 rounding
    # of two orders of operations (measured 6e-7 on samples of size ~2).
    np.testing.assert_allclose(np.load(tmp_path / "fitted.npy"), np.load(tmp_path / "ddim.npy"), atol=1e-5)


def ddim_calibration(tmp_path):
    """A calibration file of the fitted sampler for the tiny linear model whose coefficients are
    DDIM's on trailing 4-step spacing (999, 749, 499, 249, then clean)."""
    from edgediff_export.schedules import alphas_cumprod, betas_for
    ab = alphas_cumprod(betas_for("linear", 1000))
    ts = [999, 749, 499, 249]
    alpha = [float(np.sqrt(ab[t])) for t in ts] + [1.0]
    sigma = [float(np.sqrt(1 - ab[t])) for t in ts] + [0.0]
    rows = []
    for i in range(4):
        r = sigma[i + 1] / sigma[i]
        rows.append([r] + [0.0] * i + [alpha[i + 1] - alpha[i] * r])
    path = tmp_path / "ddim-calibration.json"
    path.write_text(json.dumps({
        "edgediff_calibration": 1, "model": "tiny", "sampler": "fitted",
        "schedule": {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02},
        "timesteps": [float(t) for t in ts], "coefficients": rows}))
    return path


def test_explicit_timesteps_equal_the_spacing_they_spell(edgediff_bin, tiny_models, tmp_path):
    model = str(tiny_models["linear"])
    common = ["sample", "--model", model, "-n", "3", "-q", "--seed", "5"]
    run_cli(edgediff_bin, *common, "--steps", "4", "--spacing", "trailing", "--out", str(tmp_path / "a.npy"))
    run_cli(edgediff_bin, *common, "--timesteps", "999,749,499,249", "--out", str(tmp_path / "b.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    for bad, needle in [("999,999,10", "strictly decrease"), ("1000,10", "outside"), ("9,x", "not a number")]:
        proc = run_cli(edgediff_bin, *common, "--timesteps", bad, "--out", str(tmp_path / "c.npy"), check=False)
        check_error(proc, 2, needle)


def test_resume_folder_rewrites_only_missing_samples(edgediff_bin, tiny_models, tmp_path):
    model = str(tiny_models["linear"])
    out = tmp_path / "imgs"
    args = ["sample", "--model", model, "-n", "10", "--batch-size", "3", "--steps", "5", "--seed", "2", "-q"]
    run_cli(edgediff_bin, *args, "--out", str(out))
    originals = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(originals) == 10
    for name in ("000004.png", "000007.png", "000008.png"):
        (out / name).unlink()
    # A file that is not a whole PNG of a sample is not done (issue 17; resume used to trust
    # any file that existed): a truncated one is made again.
    (out / "000001.png").write_bytes(originals["000001.png"][:40])
    proc = run_cli(edgediff_bin, *args, "--out", str(out), "--resume", "--json")
    summary = json.loads(proc.stdout)
    assert summary["resumed_samples"] == 6 and len(summary["files"]) == 10
    for name, data in originals.items():
        assert (out / name).read_bytes() == data, name


def test_resume_npy_after_a_crash_gives_the_uninterrupted_file(edgediff_bin, tiny_models, tmp_path):
    model = str(tiny_models["linear"])
    args = ["sample", "--model", model, "-n", "9", "--batch-size", "4", "--steps", "5", "-q"]
    full = tmp_path / "full.npy"
    run_cli(edgediff_bin, *args, "--out", str(full))
    data = full.read_bytes()
    # What a run killed during its second batch leaves: the header, batch one, part of batch two.
    sample_bytes = 4 * 64
    header = len(data) - 9 * sample_bytes
    out = tmp_path / "x.npy"
    (tmp_path / ".x.npy.partial").write_bytes(data[: header + 5 * sample_bytes + 100])
    # ... and the job record that run wrote first (the same options wrote full.npy's).
    (tmp_path / "x.npy.job.json").write_bytes((tmp_path / "full.npy.job.json").read_bytes())
    proc = run_cli(edgediff_bin, *args, "--out", str(out), "--resume", "--json")
    assert json.loads(proc.stdout)["resumed_samples"] == 5
    assert out.read_bytes() == data
    assert not (tmp_path / ".x.npy.partial").exists()
    # A resume with another -n is refused rather than mixing runs.
    (tmp_path / ".y.npy.partial").write_bytes(data[: header + 2 * sample_bytes])
    bad = run_cli(edgediff_bin, *args[:4], "10", *args[5:], "--out", str(tmp_path / "y.npy"), "--resume",
                  check=False)
    assert bad.returncode == 2 and "remove it" in bad.stderr


def test_bad_options_create_no_output(edgediff_bin, tiny_models, tmp_path):
    for out in (tmp_path / "d", tmp_path / "x.npy"):
        proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "--steps", "0",
                       "--out", str(out), check=False)
        assert proc.returncode == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic", "sigmoid", "vp", "ve"])
def test_schedule_table_matches_closed_forms(edgediff_bin, tmp_path, kind):
    out = tmp_path / "s.csv"
    run_cli(edgediff_bin, "schedule", "--kind", kind, "--steps", "1000", "--out", str(out))
    rows = np.loadtxt(out, delimiter=",", skiprows=1)
    t, beta, ab, level, logsnr = rows.T
    if kind in ("vp", "ve"):
        if kind == "vp":  # alpha_bar = exp(-int beta) for beta(t) = 0.1 + 19.9 t
            want = np.exp(-(0.1 * t + 0.5 * 19.9 * t * t))
            np.testing.assert_allclose(ab, want, rtol=1e-9)
            np.testing.assert_allclose(beta, 0.1 + 19.9 * t, rtol=1e-12)
        else:
            np.testing.assert_allclose(level, 0.01 * 5000.0 ** t, rtol=1e-9)
            np.testing.assert_allclose(logsnr, -2 * np.log(level), rtol=1e-9)
    else:
        from edgediff_export.schedules import alphas_cumprod, betas_for
        np.testing.assert_allclose(beta, betas_for(kind), rtol=1e-9)
        np.testing.assert_allclose(ab, alphas_cumprod(betas_for(kind)), rtol=1e-9)
        np.testing.assert_allclose(level, np.sqrt(1 - ab), rtol=1e-9)
        np.testing.assert_allclose(logsnr, np.log(ab / (1 - ab)), rtol=1e-9)


@pytest.mark.parametrize("command", [
    ["sample", "-n", "1"], ["invert", "--image", "DATA"], ["interpolate"],
    ["inpaint", "--image", "DATA", "--mask", "MASK"], ["elbo", "--data", "DATA"],
    ["likelihood", "--data", "DATA"], ["compare", "--samplers", "ddim", "--steps", "2"],
    ["calibrate", "--steps", "2"], ["info"],
])
def test_every_model_command_takes_the_model_options(edgediff_bin, tiny_models, tmp_path, command):
    """One set of model options for every command that loads a model: --provider reaches the
    model's opening (this CPU build refuses cuda, exit 3), and the rest parse."""
    data = tmp_path / "x.npy"
    np.save(data, (np.arange(128, dtype=np.float32).reshape(2, 1, 8, 8) % 256) / 127.5 - 1.0)
    mask = tmp_path / "m.png"
    from PIL import Image
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    args = [str(data) if a == "DATA" else str(mask) if a == "MASK" else a for a in command]
    args += ["--model", str(tiny_models["linear"]), "--ort-lib", str(ROOT / ".ort" / "libonnxruntime.so.1.32.0"),
             "--threads", "1", "--device-id", "0", "--no-mmap", "--provider", "cuda"]
    if command[0] == "compare":
        args += ["-o", str(tmp_path / "cmp")]
    check_error(run_cli(edgediff_bin, *args, check=False), 3,
                "the cuda execution provider is unavailable", "--fallback cpu")
