#!/usr/bin/env python3
"""Domain FID between two image sets (.npy, float32 [N, 1, 28, 28] in [-1, 1]) from the MNIST
classifier's penultimate features, computed independently of the runtime (onnxruntime +
numpy). Used for the real-vs-real floor in docs/experiments.md: two disjoint sets of real
digits of the same size show how much of a sample set's domain FID is small-N bias.

    .venv/bin/python tools/domain_fid.py A.npy B.npy [--classifier models/mnist-classifier.onnx]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_inception import frechet_distance, gaussian_stats  # noqa: E402


def features(session: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> np.ndarray:
    return np.concatenate([session.run(["features"], {"image": x[i:i + batch].astype(np.float32)})[0]
                           for i in range(0, len(x), batch)]).astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--classifier", type=Path, default=Path("models/mnist-classifier.onnx"))
    a = p.parse_args()
    s = ort.InferenceSession(str(a.classifier), providers=["CPUExecutionProvider"])
    fa, fb = features(s, np.load(a.a)), features(s, np.load(a.b))
    print(f"domain FID {frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb)):.3f} "
          f"(n = {len(fa)} vs {len(fb)})")


if __name__ == "__main__":
    main()
