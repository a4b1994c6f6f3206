"""Judges a text-to-image digit model as issue 18 asks: for every digit and both prompt forms
("a handwritten digit seven", "the number 7"), N samples at STEPS steps (DDIM unless --sampler;
seed 0, the pipeline's guidance and scheduler defaults), each center-cropped to 28x28 and
labelled by the project's MNIST classifier; the share labelled as the asked digit must be
>= 0.95 overall.

    tools/check-text-model [MODEL] [N] [STEPS] [--sampler NAME] [--guidance G] [--save FILE.npy] [--json]

`--sampler` (default ddim) names the runtime's sampler; `--sampler model` passes none, so the
model's own default runs (a distilled student's lcm); `--guidance` replaces the pipeline's.
`--save` writes every sample, center-cropped to 28x28, to one .npy in prompt order (for
tools/domain_fid.py). Prints one line per prompt and a summary; with --json, one JSON object
instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "exporter" / "src"))

from edgediff_export.judge import center_crop, judge  # noqa: E402
from edgediff_export.train_t2i import WORDS  # noqa: E402

import numpy as np  # noqa: E402

PROMPTS = ("a handwritten digit {w}", "the number {n}")
TARGET = 0.95


def main() -> None:
    argv = sys.argv[1:]
    opts = {"--sampler": "ddim", "--save": None, "--guidance": None}
    for flag in opts:
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1]
            del argv[i:i + 2]
    sampler, save = opts["--sampler"], opts["--save"]
    guidance = [] if opts["--guidance"] is None else ["--guidance", opts["--guidance"]]
    args = [a for a in argv if a != "--json"]
    as_json = "--json" in argv
    model = args[0] if args else str(ROOT / "models" / "mnist-t2i")
    n = int(args[1]) if len(args) > 1 else 100
    steps = int(args[2]) if len(args) > 2 else 30
    binary = ROOT / "target" / "release" / "edgediff"
    rows, hits, total, kept, seconds = [], 0, 0, [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(10):
            for template in PROMPTS:
                prompt = template.format(w=WORDS[d], n=d)
                out = Path(tmp) / "s.npy"
                chosen = [] if sampler == "model" else ["--sampler", sampler]
                began = time.perf_counter()
                subprocess.run([str(binary), "sample", "--model", model, "--prompt", prompt,
                                *chosen, *guidance, "--steps", str(steps), "-n", str(n),
                                "--seed", "0", "--batch-size", "100", "-q", "--out", str(out)],
                               check=True)
                seconds += time.perf_counter() - began
                x = center_crop(np.clip(np.load(out), -1, 1))  # once, for the judge and --save
                if save:
                    kept.append(x)
                r = judge(x, ROOT / "models" / "mnist-classifier.onnx")
                share = float(np.mean(np.array(r["labels"]) == d))
                hits += int(round(share * n))
                total += n
                rows.append({"prompt": prompt, "digit": d, "share": share,
                             "confident_share": r["confident_share"]})
                if not as_json:
                    print(f"{prompt!r:36} {share:.3f} of {n} classified as {d} "
                          f"(confident {r['confident_share']:.3f})", flush=True)
    overall = hits / total
    if save:
        np.save(save, np.concatenate(kept).astype(np.float32))
    confident = float(np.mean([r["confident_share"] for r in rows]))
    summary = {"model": model, "n_per_prompt": n, "steps": steps, "sampler": sampler, "guidance": opts["--guidance"],
               "overall": overall, "confident_share": confident, "seconds": round(seconds, 1), "worst": min(r["share"] for r in rows), "target": TARGET,
               "passed": overall >= TARGET, "prompts": rows}
    if as_json:
        print(json.dumps(summary))
    else:
        print(f"overall {overall:.4f} of {total} samples classified as the asked digit "
              f"(worst prompt {summary['worst']:.3f}; confident {confident:.3f}; {seconds:.1f} s sampling); target {TARGET}: "
              f"{'met' if summary['passed'] else 'NOT met'}")


if __name__ == "__main__":
    main()
