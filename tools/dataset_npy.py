#!/usr/bin/env python3
"""Writes a dataset split as float32 [N, 1, 28, 28] in [-1, 1] (the models' data range) to .npy:
the reference images of `edgediff compare --reference` and `tools/fid_inception.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgediff_export.data import load_mnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "trainval"])
    p.add_argument("-n", type=int, default=None, help="first n images only")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    x, _ = load_mnist(a.split)
    x = x[: a.n] if a.n else x
    tmp = a.out.with_name(a.out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(x, dtype=np.float32))
    tmp.replace(a.out)
    print(f"{a.out}: {x.shape[0]} images")


if __name__ == "__main__":
    main()
