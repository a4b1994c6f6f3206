#!/usr/bin/env python3
"""Draws the seed's four schedule panels (beta, alpha_bar, noise level sqrt(1 - alpha_bar),
log SNR) for every noise schedule `edgediff schedule` knows, into one PNG.

    .venv/bin/python tools/plot_schedules.py [--edgediff target/release/edgediff] [-o docs/schedules.png]

The numbers come from the runtime itself (`edgediff schedule --kind K --json`), so the plot
shows what the samplers use. Time is normalised to t/T in (0, 1] for the discrete schedules.
VE has no alpha_bar < 1: its "noise level" is sigma(t) (log axis) and its beta column is
d(sigma^2)/dt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KINDS = ["linear", "cosine", "quadratic", "sigmoid", "vp", "ve"]
PANELS = [("beta", "beta (per step; VP/VE: rate)"), ("alpha_bar", "alpha_bar"),
          ("noise_level", "noise level sqrt(1 - alpha_bar) (VE: sigma)"), ("log_snr", "log SNR")]


def table(edgediff: Path, kind: str, steps: int) -> list[dict[str, float]]:
    out = subprocess.run([str(edgediff), "schedule", "--kind", kind, "--steps", str(steps), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edgediff", type=Path, default=Path("target/release/edgediff"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/schedules.png"))
    a = p.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for kind in KINDS:
        rows = table(a.edgediff, kind, a.steps)
        continuous = kind in ("vp", "ve")
        t = [r["t"] if continuous else (r["t"] + 1) / a.steps for r in rows]
        for ax, (key, _) in zip(axes, PANELS):
            style = "--" if continuous else "-"
            ax.plot(t, [r[key] for r in rows], style, label=kind)
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("t / T")
        ax.grid(alpha=0.3)
        if key in ("beta", "noise_level"):
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
