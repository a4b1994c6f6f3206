"""Model loading, memory-mapped against read into memory, on a U-Net made for the purpose.

Exports a randomly initialised U-Net of at least 50 MB (and its ORT-format copy), then runs
`edgediff info` (which opens the model: ONNX Runtime session and all) on each file with and
without --no-mmap, each in a fresh process, best of --reps, side by side in one run: wall time
and the peak RSS the kernel reports (wait4).

    .venv/bin/python benches/bench_load.py [--reps 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import peak_rss_mb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgediff"))
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    big = tmp / "big.onnx"
    exporter = [sys.executable, "-m", "edgediff_export.export"]
    subprocess.run([*exporter, "random", "--out", str(big), "--channels", "3", "--image-size", "32",
                    "--base-channels", "96", "--channel-mult", "1,2,2,2", "--num-res-blocks", "2",
                    "--attention-resolutions", "16,8", "--num-groups", "32"], check=True,
                   capture_output=True)
    subprocess.run([*exporter, "ort", str(big), "--out", str(tmp / "big.ort")], check=True,
                   capture_output=True)
    print("| file | size (MB) | loading | best wall (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name in ("big.onnx", "big.ort"):
        path = tmp / name
        for mode, extra in (("mapped", []), ("read", ["--no-mmap"])):
            runs = [peak_rss_mb([a.binary, "info", "--model", str(path), *extra]) for _ in range(a.reps)]
            print(f"| {name} | {path.stat().st_size / 1e6:.1f} | {mode} | {min(r[1] for r in runs):.3f} | "
                  f"{min(r[0] for r in runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
