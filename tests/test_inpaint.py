"""`edgediff inpaint` on real MNIST test digits with the shipped model, judged by the shipped
classifier: a band of rows is masked out, and the filled digits must be recognised far more
often than the blanked ones (measured with 20 DDIM steps, RePaint jumps 5 x 5 passes: 0.92 of
64 digits for a 5-row band, against 0.58 blanked and 0.77 without resampling). Known pixels
must come back to float rounding (1e-5): the sampler's x0 there is the image and its eps is
measured from its own x, so DDIM and Euler updates alike land on the image at sigma = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, run_cli
from edgediff_export.data import load_mnist

N = 32
ROWS = slice(12, 17)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    x, y = load_mnist("test")
    np.save(d / "imgs.npy", x[:N].astype(np.float32))
    mask = np.zeros((1, 1, 28, 28), np.float32)
    mask[..., ROWS, :] = 1
    np.save(d / "mask.npy", mask)
    return d, x[:N], y[:N]


def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    clf = ort.InferenceSession(str(ROOT / "models" / "mnist-classifier.onnx"),
                               providers=["CPUExecutionProvider"])
    return float((clf.run(None, {"image": images.astype(np.float32)})[0].argmax(1) == labels).mean())


def inpaint(binary, d: Path, *extra) -> tuple[np.ndarray, dict]:
    proc = run_cli(binary, "inpaint", "--model", str(ROOT / "models" / "mnist-ddpm.onnx"), "--image",
                   str(d / "imgs.npy"), "--mask", str(d / "mask.npy"), "-q", "--json",
                   "--out", str(d / "out.npy"), *extra)
    return np.load(d / "out.npy"), json.loads(proc.stdout)


def test_filled_digits_are_recognised(edgediff_bin, digits):
    d, x, y = digits
    blank = x.copy()
    blank[..., ROWS, :] = -1.0
    out, summary = inpaint(edgediff_bin, d, "--steps", "20", "--jumps", "5", "--resample", "4")
    acc, base = accuracy(out, y), accuracy(blank, y)
    print(f"inpainting accuracy {acc:.3f} (blanked {base:.3f}); known RMSE {summary['known_rmse']:.1e}")
    assert acc >= 0.8 and acc >= base + 0.15
    assert summary["known_rmse"] < 1e-5
    keep = np.ones(28, bool)
    keep[ROWS] = False
    assert np.abs(out[..., keep, :] - x[..., keep, :]).max() < 1e-5


@pytest.mark.parametrize("sampler", ["ode-euler", "dpm++2m", "euler-a"])
def test_known_pixels_come_back_with_other_samplers(edgediff_bin, digits, sampler):
    d, x, _ = digits
    _, summary = inpaint(edgediff_bin, d, "--sampler", sampler, "--steps", "10", "--spacing", "logsnr")
    print(f"{sampler} known RMSE {summary['known_rmse']:.1e}")
    assert summary["known_rmse"] < 1e-5


def test_inpaint_errors(edgediff_bin, digits, tiny_models, tmp_path):
    d, _, _ = digits
    np.save(tmp_path / "wrong.npy", np.zeros((1, 1, 20, 20), np.float32))
    cases = [
        (["--mask", str(tmp_path / "wrong.npy")], 2, "mask has shape"),
        ([], 2, "--mask"),
        (["--mask", str(d / "mask.npy"), "--sampler", "adaptive", "--jumps", "5"], 2, "--jumps"),
    ]
    for extra, code, needle in cases:
        proc = run_cli(edgediff_bin, "inpaint", "--model", str(ROOT / "models" / "mnist-ddpm.onnx"),
                       "--image", str(d / "imgs.npy"), "--out", str(tmp_path / "o.npy"), *extra, check=False)
        assert proc.returncode == code and needle in proc.stderr, (extra, proc.stderr)
        assert not (tmp_path / "o.npy").exists()
