#!/usr/bin/env python3
"""Plots `edgediff compare` results: wall time vs steps, domain FID vs steps, domain FID vs
wall time (one PNG, three panels), and the samplers' grids side by side at one step count.

    .venv/bin/python tools/plot_compare.py runs/compare-a runs/compare-b -o docs/compare \
        [--grid-steps 20] [--markdown]

Several comparison folders may be given (e.g. runs split across processes); their cells are
merged. `--timing DIR` takes wall times from another comparison (a small-N run on a quiet
machine, all cells in one process) scaled to each cell's N, when the quality run's own times
are not comparable (run in parallel or under load). `--markdown` prints the merged table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(folders: list[Path]) -> list[dict]:
    rows: dict[tuple[str, int], dict] = {}
    for folder in folders:
        for r in json.loads((folder / "results.json").read_text()):
            rows[(r["sampler"], r["steps"])] = r
    return sorted(rows.values(), key=lambda r: (r["sampler"], r["steps"]))


def by_sampler(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["sampler"]].append(r)
    return out


def save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    print(path)


def curves(rows: list[dict], out: Path) -> None:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, rs in by_sampler(rows).items():
        steps = [r["steps"] for r in rs]
        secs = [r["seconds_for_n"] for r in rs]
        a.plot(steps, secs, "o-", label=name)
        if all(r.get("domain") for r in rs):
            fid = [r["domain"]["fid"] for r in rs]
            b.plot(steps, fid, "o-", label=name)
            c.plot(secs, fid, "o-", label=name)
    n = rows[0]["n"]
    a.set(xscale="log", yscale="log", xlabel="steps", ylabel=f"wall time for {n} samples (s)",
          title="time vs steps")
    b.set(xscale="log", yscale="log", xlabel="steps", ylabel="domain FID (classifier features)",
          title=f"domain FID vs steps (N = {n})")
    c.set(xscale="log", yscale="log", xlabel=f"wall time for {n} samples (s)",
          ylabel="domain FID", title="domain FID vs time")
    for ax in (a, b, c):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)


def grids(rows: list[dict], steps: int, out: Path) -> None:
    cells = [r for r in rows if r["steps"] == steps]
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.6))
    for ax, r in zip(axes if len(cells) > 1 else [axes], cells):
        ax.imshow(mpimg.imread(r["grid"]), cmap="gray")
        fid = r.get("domain", {}).get("fid")
        ax.set_title(f"{r['sampler']}, {steps} steps" + (f"\nFID {fid:.2f}" if fid is not None else ""),
                     fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save(fig, out)


def markdown(rows: list[dict]) -> str:
    lines = ["| sampler | steps | model calls | time for N (s) | domain FID | confident | balance |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["steps"], r["sampler"])):
        d = r.get("domain") or {}
        fmt = lambda v, f: f.format(v) if v is not None else ""  # noqa: E731
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['model_calls']} | {r['seconds_for_n']:.0f} | "
                     f"{fmt(d.get('fid'), '{:.2f}')} | {fmt(d.get('confident'), '{:.1%}')} | "
                     f"{fmt(d.get('balance'), '{:.2f}')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/compare"),
                   help="output prefix: PREFIX-curves.png and PREFIX-grids-STEPS.png")
    p.add_argument("--grid-steps", type=int, default=None,
                   help="step count of the grid comparison (default: the middle one)")
    p.add_argument("--timing", type=Path, default=None, help="take wall times from this comparison")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    rows = load_rows(a.folders)
    if a.timing:
        per_sample = {(r["sampler"], r["steps"]): r["seconds_for_n"] / r["n"] for r in load_rows([a.timing])}
        for r in rows:
            r["seconds_for_n"] = per_sample[(r["sampler"], r["steps"])] * r["n"]
    curves(rows, a.out.with_name(a.out.name + "-curves.png"))
    all_steps = sorted({r["steps"] for r in rows})
    steps = a.grid_steps or all_steps[len(all_steps) // 2]
    grids(rows, steps, a.out.with_name(f"{a.out.name}-grids-{steps}.png"))
    if a.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
