"""Edge-runtime features: float16 models, ORT-format memory-mapped loading, providers.

fp16 tolerance: the same seed through a float16 network must stay within 0.05 mean absolute
difference of the float32 samples (fp16 has a 2^-11 relative rounding per operation; a DDIM
trajectory of 10 steps on the tiny model measures ~1e-3); the weights must take at most 0.6x the bytes.
Mapped and read loading, .onnx and .ort, must give the same samples to float32 rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli


def export(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgediff_export.export", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def variants(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    src = tiny_models["linear"]
    fp16 = export("fp16", str(src), "--out", str(d / "tiny16.onnx"))
    export("ort", str(src), "--out", str(d / "tiny.ort"))
    return {"onnx": src, "fp16": d / "tiny16.onnx", "ort": d / "tiny.ort", "fp16_diff": fp16["fp16_max_rel_diff"]}


def sample(binary, model, out, *extra):
    run_cli(binary, "sample", "--model", str(model), "-n", "8", "--steps", "10", "--seed", "5", "-q",
            "--out", str(out), *extra)
    return np.load(out)


def weight_bytes(path) -> int:
    import onnx
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def test_fp16_model_halves_the_weights_and_stays_close(edgediff_bin, variants, tmp_path):
    # On this 8x8 toy the graph's structure is a large part of the file; the weights are what
    # halve (the shipped MNIST model's file goes from 4.5 to 2.4 MB).
    ratio = weight_bytes(variants["fp16"]) / weight_bytes(variants["onnx"])
    a = sample(edgediff_bin, variants["onnx"], tmp_path / "a.npy")
    b = sample(edgediff_bin, variants["fp16"], tmp_path / "b.npy")
    diff = np.abs(a - b)
    print(f"fp16: size ratio {ratio:.2f}, network max rel diff {variants['fp16_diff']:.1e}, "
          f"samples mean |diff| {diff.mean():.1e}, max {diff.max():.1e}")
    assert ratio < 0.6
    assert diff.mean() < 0.05
    assert 0 < diff.max()  # it really ran in fp16
    import onnx
    g = onnx.load(str(variants["fp16"])).graph
    types = {i.name: i.type.tensor_type.elem_type for i in g.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16 and types["timestep"] != onnx.TensorProto.FLOAT16


def test_mapped_read_and_ort_format_give_the_same_samples(edgediff_bin, variants, tmp_path):
    ref = sample(edgediff_bin, variants["onnx"], tmp_path / "ref.npy", "--no-mmap")
    for name, model, extra in [("mapped onnx", variants["onnx"], []),
                               ("mapped ort", variants["ort"], []),
                               ("read ort", variants["ort"], ["--no-mmap"])]:
        got = sample(edgediff_bin, model, tmp_path / "x.npy", *extra)
        assert np.abs(got - ref).max() < 1e-5, name


@pytest.mark.parametrize("args,needle", [
    (["--provider", "cuda"], "cuda"),
    (["--provider", "tensorrt", "--trt-fp16"], "tensorrt"),
    (["--provider", "vulkan"], "unknown --provider"),
    (["--trt-fp16"], "apply to --provider tensorrt"),
    (["--provider", "cuda", "--fallback", "gpu"], "only fallback is cpu"),
])
def test_unavailable_providers_fail_clearly(edgediff_bin, tiny_models, tmp_path, args, needle):
    # This machine has no GPU build: a provider request must fail, saying why, and write nothing.
    out = tmp_path / "x.npy"
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "2", "--steps", "2",
                   "--out", str(out), *args, check=False)
    assert proc.returncode in (2, 3), proc.stderr
    assert needle in proc.stderr
    assert not out.exists()


def test_fallback_cpu_warns_and_runs(edgediff_bin, tiny_models, tmp_path):
    out = tmp_path / "x.npy"
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "2", "--steps", "2",
                   "--provider", "cuda", "--fallback", "cpu", "-q", "--out", str(out))
    assert "running on the CPU" in proc.stderr
    assert np.load(out).shape == (2, 1, 8, 8)
