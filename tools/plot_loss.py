#!/usr/bin/env python3
"""Plot edgediff-train loss logs: loss (raw and a running mean) against step, one line per run.

    .venv/bin/python tools/plot_loss.py runs/a/loss.csv runs/b/loss.csv --out loss.png
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np


def read_log(path: Path) -> dict[str, np.ndarray]:
    """The columns of a loss.csv (step, loss, lr, samples_per_s, seconds) as float arrays."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows or "loss" not in rows[0]:
        raise SystemExit(f"{path} is not an edgediff-train loss log (no rows or no loss column)")
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]}


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot(paths: list[Path], out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path in paths:
        log = read_log(path)
        label = path.parent.name or str(path)
        ax.plot(log["step"], log["loss"], alpha=0.25, linewidth=0.6)
        smooth = running_mean(log["loss"], window)
        ax.plot(log["step"][len(log["step"]) - len(smooth):], smooth, label=label,
                color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (running mean over {window} steps)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("loss.png"))
    p.add_argument("--window", type=int, default=100)
    a = p.parse_args()
    plot(a.logs, a.out, a.window)
    print(a.out)


if __name__ == "__main__":
    main()
