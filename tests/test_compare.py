"""`edgediff compare` and the quality metrics behind it (domain FID, Inception FID).

The metrics are checked on tiny inputs: identical sets give ~0, a shifted set gives more, and
the runtime's Fréchet distance (Jacobi eigensolver in Rust) agrees with an independent numpy
computation (LAPACK eigh) on the same classifier features.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "tools"))
import fid_inception  # noqa: E402

CLASSIFIER = ROOT / "models" / "mnist-classifier.onnx"


def compare(binary: Path, out: Path, *extra: str) -> list[dict]:
    run_cli(binary, "compare", "--samplers", "ddim,ddpm", "--steps", "3,2", "-n", "6",
            "--batch-size", "4", "-o", str(out), "-q", *extra)
    return json.loads((out / "results.json").read_text())


def classifier_features(x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(CLASSIFIER), providers=["CPUExecutionProvider"])
    return s.run(["features"], {"image": x.astype(np.float32)})[0].astype(np.float64)


def self_distance_tolerance(features: np.ndarray) -> float:
    """A set's distance to itself is 0 up to rounding, but with fewer samples than features the
    covariance is singular, and the square roots of its rounding-level eigenvalues (~sqrt(eps) of
    the largest) add up over the null space: allow 1e-5 of 2 tr(S)."""
    return 1e-5 * 2 * float(np.trace(np.cov(features, rowvar=False)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgediff_export.data import load_mnist

    path = tmp_path_factory.mktemp("ref") / "ref.npy"
    np.save(path, load_mnist("test")[0][:64])
    return path


@pytest.fixture(scope="module")
def first(edgediff_bin, reference, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("compare") / "c"
    return out, compare(edgediff_bin, out, "--classifier", str(CLASSIFIER), "--reference", str(reference))


def test_cells_share_noise_and_record_calls(edgediff_bin, tmp_path, first):
    out, rows = first
    cells = {(r["sampler"], r["steps"]): r for r in rows}
    assert set(cells) == {("ddim", 3), ("ddpm", 3), ("ddim", 2), ("ddpm", 2)}
    assert all(r["model_calls"] == r["steps"] for r in rows)
    # Same starting noise as `sample` with the same seed: the ddim cell is that run, byte for byte.
    run_cli(edgediff_bin, "sample", "--sampler", "ddim", "--steps", "2", "-n", "6", "-q",
            "-o", str(tmp_path / "s.npy"))
    assert np.array_equal(np.load(cells[("ddim", 2)]["samples"]), np.load(tmp_path / "s.npy"))
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(float(r["domain_fid"]) > 0 for r in table)
    assert all(Path(r["grid"]).stat().st_size > 0 for r in table)
    assert all(0 <= r["domain"]["confident"] <= 1 and len(r["domain"]["class_shares"]) == 10 for r in rows)


def test_runtime_fid_matches_numpy(first, reference):
    ref = classifier_features(np.load(reference))
    for r in first[1]:
        f = classifier_features(np.load(r["samples"]))
        want = fid_inception.frechet_distance(*fid_inception.gaussian_stats(f), *fid_inception.gaussian_stats(ref))
        # float32 features, float64 statistics, two different eigensolvers: 1e-6 relative.
        assert r["domain"]["fid"] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_rerun_reuses_cells_and_domain_fid_is_zero_for_identical_sets(edgediff_bin, first, tmp_path):
    out, rows = first
    cell = next(r for r in rows if (r["sampler"], r["steps"]) == ("ddim", 3))
    samples = np.load(cell["samples"])
    # The same command with the cell's own samples as reference: its cells are reused (same
    # timing record), and that cell's FID against itself is ~0.
    again = compare(edgediff_bin, out, "--classifier", str(CLASSIFIER), "--reference", cell["samples"])
    same = next(r for r in again if (r["sampler"], r["steps"]) == ("ddim", 3))
    assert same["seconds"] == cell["seconds"]
    assert abs(same["domain"]["fid"]) < self_distance_tolerance(classifier_features(samples))
    # A shifted reference set is far.
    np.save(tmp_path / "shifted.npy", np.clip(samples + 0.5, -1, 1).astype(np.float32))
    shifted = compare(edgediff_bin, out, "--classifier", str(CLASSIFIER), "--reference", str(tmp_path / "shifted.npy"))
    far = next(r for r in shifted if (r["sampler"], r["steps"]) == ("ddim", 3))
    assert far["domain"]["fid"] > 1.0


def test_numpy_frechet_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    da, db = np.array([4.0, 1.0, 0.0, 2.0]), np.array([1.0, 9.0, 1.0, 0.5])
    a, b = q @ np.diag(da) @ q.T, q @ np.diag(db) @ q.T
    mu_a, mu_b = np.zeros(4), np.array([1.0, 0, 0, 2.0])
    want = 5.0 + ((np.sqrt(da) - np.sqrt(db)) ** 2).sum()
    assert fid_inception.frechet_distance(mu_a, a, mu_b, b) == pytest.approx(want, rel=1e-10)


def test_legacy_bilinear_resize():
    import torch

    # TF1 resize_bilinear (align_corners=False): output i samples input i * in/out, edge held.
    x = torch.tensor([[[[0.0, 10.0, 20.0]]]])
    y = fid_inception._legacy_bilinear_axis(x, 6, 3)
    assert y.flatten().tolist() == pytest.approx([0, 5, 10, 15, 20, 20])
    imgs = np.stack([np.full((1, 28, 28), -1.0), np.full((1, 28, 28), 1.0)]).astype(np.float32)
    z = fid_inception.to_inception_input(imgs)
    assert z.shape == (2, 3, 299, 299)
    assert float(z[0].max()) == -1.0 and float(z[1].min()) == pytest.approx(255 / 128 - 1, abs=1e-6)


def test_inception_fid_zero_for_identical_and_larger_for_shifted(reference):
    model = fid_inception.load_inception()
    x = np.load(reference)[:6]
    f = fid_inception.features(model, x)
    assert f.shape == (6, 2048)
    stats = fid_inception.gaussian_stats(f)
    assert abs(fid_inception.frechet_distance(*stats, *stats)) < self_distance_tolerance(f)
    g = fid_inception.features(model, np.clip(x + 0.5, -1, 1))
    assert fid_inception.frechet_distance(*fid_inception.gaussian_stats(g), *stats) > 1.0


def test_cells_of_another_setup_are_not_continued(edgediff_bin, tmp_path):
    out = tmp_path / "c"
    args = ["compare", "--samplers", "ddim", "--steps", "2", "-n", "6", "-o", str(out), "-q"]
    run_cli(edgediff_bin, *args, "--seed", "1")
    # As if killed after the samples were complete but before the timing record was written:
    (out / "cells" / "ddim-2.json").unlink()
    run_cli(edgediff_bin, *args, "--seed", "0")
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["seed"] == 0 and rows[0]["generated"] == 6 and rows[0]["model_calls"] == 2
    run_cli(edgediff_bin, "sample", "--sampler", "ddim", "--steps", "2", "-n", "6", "-q", "-o", str(tmp_path / "s.npy"))
    assert np.array_equal(np.load(out / "samples" / "ddim-2.npy"), np.load(tmp_path / "s.npy"))
