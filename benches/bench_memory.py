"""Peak memory of chunked sampling: `edgediff sample -n N --batch-size 64` into a .npy and into
a folder of PNGs for N = 64, 1024, 4096 (flat is the goal), each in a fresh process whose peak
RSS the kernel reports (wait4). Few steps (--steps 2) since memory, not quality, is measured.

    .venv/bin/python benches/bench_memory.py [--model M] [--ns 64,1024,4096] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, time.time() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgediff"))
    p.add_argument("--model", default=None, help="default: the embedded MNIST model")
    p.add_argument("--ns", default="64,1024,4096")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = ["--model", a.model] if a.model else []
    print(f"batch 64, {a.steps} DDIM steps, {a.binary}")
    print("| n | .npy peak RSS (MB) | s | PNG folder peak RSS (MB) | s |")
    print("|---|---|---|---|---|")
    for n in (int(v) for v in a.ns.split(",")):
        row = [str(n)]
        for out in (tmp / f"x{n}.npy", tmp / f"png{n}"):
            cmd = [a.binary, "sample", *model, "-n", str(n), "--batch-size", "64", "--steps",
                   str(a.steps), "-q", "--out", str(out)]
            rss, secs = peak_rss_mb(cmd)
            row += [f"{rss:.0f}", f"{secs:.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
