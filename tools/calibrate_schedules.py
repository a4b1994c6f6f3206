"""Calibrated grids on oracles of other schedules: unseen-noise RMSE to the converged PF-ODE
solution, `edgediff calibrate`'s grid against the best fixed spacing of the same sampler.

    .venv/bin/python tools/calibrate_schedules.py [--schedules cosine,vp] [--n 512] [--pilot 1024]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from bench_fidelity import ROOT, SHAPE, calibrated_grid, rmse, run_edgediff  # noqa: E402

sys.path.insert(0, str(ROOT / "exporter" / "src"))
from edgediff_export.oracle import export_oracle  # noqa: E402

SPACINGS = [["trailing"], ["leading"], ["linspace"], ["logsnr"], ["karras"], ["karras", "--rho", "3"]]
SAMPLERS = [("unipc-3", "unipc", ["--order", "3"]), ("dpm++3m", "dpm++3m", [])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", default="cosine,vp")
    p.add_argument("--steps", default="10,20")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--pilot", type=int, default=1024)
    p.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "edgediff")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="calibrate-"))
    init, out = tmp / "init.npy", tmp / "x.npy"
    np.save(init, np.random.default_rng(0).standard_normal((a.n, *SHAPE)).astype(np.float32))
    print("| oracle | sampler | calls | calibrated | best fixed | ratio |\n|---|---|---|---|---|---|")
    for kind in a.schedules.split(","):
        model = tmp / f"oracle-{kind}.onnx"
        export_oracle(model, kind, shape=SHAPE)
        ref = run_edgediff(a.binary, model, init, out, "heun", 4000, ["--spacing", "logsnr"])
        for label, sampler, extra in SAMPLERS:
            for steps in (int(s) for s in a.steps.split(",")):
                fixed = {}
                for sp in SPACINGS:
                    try:
                        x = run_edgediff(a.binary, model, init, out, sampler, steps, extra + ["--spacing", *sp])
                    except subprocess.CalledProcessError:
                        continue
                    fixed[" ".join(sp)] = rmse(x, ref)
                _, grid = calibrated_grid(a.binary, model, sampler, steps, a.pilot, extra)
                e = rmse(run_edgediff(a.binary, model, init, out, sampler, steps, extra + ["--timesteps", grid]), ref)
                best = min(fixed, key=fixed.get)
                print(f"| {kind} | {label} | {steps} | {e:.2e} | {fixed[best]:.2e} ({best}) | "
                      f"{e / fixed[best]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
