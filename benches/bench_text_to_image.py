"""Text-to-image on the CPU: diffusers' PyTorch pipeline, optimum's ONNX Runtime pipeline and
`edgediff sample`, side by side in one run, on the same weights, prompt, steps, guidance, batch
and initial latents.

For each pipeline size (`tiny`: tests/sd_tiny.py's; `small`: sd_tiny.SD_SMALL, a 35 M-parameter
U-Net of Stable Diffusion 1.x's layout at a fifth of its widths, 32x32 latents, 256x256 images,
CLIP width 256; both randomly initialised, built from configs) it builds the PyTorch folder,
exports it with optimum (`optimum.exporters.onnx --task text-to-image`) and with
`edgediff-export diffusers`, then times, each in its own process:

- diffusers: StableDiffusionPipeline on the PyTorch folder, torch.set_num_threads(N);
- optimum: ORTStableDiffusionPipeline on optimum's folder, ONNX Runtime intra-op threads N
  (and torch's N for the scheduler), run with --optimum-python (a venv of
  tools/requirements-optimum.txt: optimum cannot be installed beside the project's pins);
- edgediff on optimum's folder (the very graphs optimum runs) and on its own export,
  `--threads N`, the release build.

Each run is DDIM (the folders' scheduler) with guidance and a negative prompt, so every step is
one U-Net call on the doubled batch. A run is timed from the prompt to the decoded images, the
model already loaded (edgediff: its --json `seconds`; its process's start and model loading are
the load column; the Python runners' load column is the pipeline's from_pretrained, imports not
counted). The runners take turns, one run at --steps and one at 1 step each per round, --reps
rounds after a warm-up, so a changing load on the machine falls on all of them alike. Per image:
the median (and the minimum) of the rounds over the batch. Per U-Net step: (time at --steps
minus time at 1 step) / (steps - 1), which leaves out the text encoder and the VAE. The last
column is each runner's images against edgediff's on optimum's folder (same latents): they
compute the same thing. Figures only: nothing is asserted on time.

    .venv/bin/python benches/bench_text_to_image.py [--threads 1] [--reps 3] [--steps 20]
        [--batch 1] [--models tiny,small] [--optimum-python /work/venv-optimum/bin/python]

With --keep DIR, folders an earlier run built in DIR are used again. Internally it calls
itself: `bench_text_to_image.py build NAME OUT` and `... run KIND DIR ...` (a runner process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE = "a lighthouse at dusk", "blurry low quality"


def build(name: str, out: Path) -> None:
    """The PyTorch folder of pipeline `name` (tiny or small), saved by this interpreter's
    diffusers/transformers (the optimum venv's when there is one: transformers 4 cannot read a
    text encoder saved by transformers 5, the other way round works)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "exporter" / "src")]
    import sd_tiny
    sd_tiny.build(out, **({} if name == "tiny" else sd_tiny.SD_SMALL))


def run(kind: str, folder: str, init: str, threads: int, guidance: float, out: str) -> None:
    """A Python pipeline (diffusers or optimum) that loads, warms up, prints its load time as a
    JSON line and then, for each line `S` on stdin, runs S steps and prints the seconds (the
    images of the last run at more than one step go to `out` at the end of input)."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    # Imports before the clock: the load column is the pipeline's loading, not Python's.
    if kind == "diffusers":
        from diffusers import StableDiffusionPipeline
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline
    t0 = time.perf_counter()
    if kind == "diffusers":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                       requires_safety_checker=False)
    else:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider",
                                                          session_options=so)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    latents = torch.from_numpy(np.load(init))

    def once(s: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        with torch.no_grad():
            images = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=guidance,
                          num_inference_steps=s, latents=latents.clone(),
                          num_images_per_prompt=latents.shape[0], output_type="np").images
        return time.perf_counter() - t, images

    _, images = once(2)  # warm-up
    print(json.dumps({"load": load}), flush=True)
    for line in sys.stdin:
        secs, got = once(int(line))
        if int(line) > 1:
            images = got
        print(json.dumps({"seconds": secs}), flush=True)
    np.save(out, (np.asarray(images, np.float32).transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32))


class PythonRunner:
    """A `run` process in `python`; `time(steps)` runs once and returns the seconds."""

    def __init__(self, python: str, kind: str, folder: Path, init: Path, a, out: Path):
        self.kind = kind
        self.proc = subprocess.Popen([python, __file__, "run", kind, str(folder), str(init),
                                      str(a.threads), str(a.guidance), str(out)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.load = self._read()["load"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} runner stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class EdgediffRunner:
    """`edgediff sample` on `folder`, a process per run; `time(steps)` returns its --json
    seconds (the rest of the process's wall time, start and model loading, is `load`)."""

    def __init__(self, binary: str, folder: Path, init: Path, a, out: Path):
        self.args = [binary, "sample", "--model", str(folder), "--prompt", PROMPT,
                     "--negative-prompt", NEGATIVE, "--guidance", str(a.guidance), "--sampler",
                     "ddim", "--threads", str(a.threads), "--init-noise", str(init), "--json", "-q"]
        self.out, self.loads = out, []
        self._once(2, out.with_suffix(".warm.npy"))  # warm-up (page cache)

    def _once(self, steps: int, out: Path) -> float:
        t = time.perf_counter()
        proc = subprocess.run([*self.args, "--steps", str(steps), "--out", str(out)],
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        secs = json.loads(proc.stdout.splitlines()[-1])["seconds"]
        self.loads.append(wall - secs)
        return secs

    @property
    def load(self) -> float:
        return statistics.median(self.loads)

    def time(self, steps: int) -> float:
        # The compared images are those of a run at more than one step.
        return self._once(steps, self.out if steps > 1 else self.out.with_suffix(".one.npy"))

    def close(self) -> None:
        pass


def bench(name: str, a, tmp: Path) -> None:
    import numpy as np
    src, opt, ours = tmp / name, tmp / f"{name}-optimum", tmp / f"{name}-edgediff"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter" / "src")}
    t = time.perf_counter()
    # With --keep, what an earlier run built there is used again.
    reused = (src / "model_index.json").is_file()
    if not reused:
        subprocess.run([a.optimum_python or sys.executable, __file__, "build", name, str(src)],
                       check=True, capture_output=True)
    if a.optimum_python and not (opt / "unet" / "model.onnx").is_file():
        subprocess.run([a.optimum_python, "-m", "optimum.exporters.onnx", "--model", str(src),
                        "--task", "text-to-image", str(opt)], check=True, capture_output=True)
    if not (ours / "edgediff.json").is_file():
        subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                        "--out", str(ours)], check=True, capture_output=True, env=env)
    unet = json.loads((src / "unet" / "config.json").read_text())
    size = unet["sample_size"]
    how = ("folders of an earlier run" if reused
           else f"built and exported in {time.perf_counter() - t:.0f} s")
    print(f"\n### {name}: U-Net widths {tuple(unet['block_out_channels'])}, {size}x{size} latents; "
          f"{how}\n", flush=True)
    init = tmp / f"{name}-init.npy"
    np.save(init, np.random.default_rng(0).standard_normal((a.batch, 4, size, size)).astype(np.float32))
    images = {"diffusers (PyTorch)": tmp / f"{name}-diffusers.npy",
              "optimum (ORTStableDiffusionPipeline)": tmp / f"{name}-optimum.npy",
              "edgediff on optimum's folder": tmp / f"{name}-edgediff-opt.npy",
              "edgediff on its own export": tmp / f"{name}-edgediff-own.npy"}
    runners = {"diffusers (PyTorch)": lambda out: PythonRunner(sys.executable, "diffusers", src,
                                                               init, a, out)}
    if a.optimum_python:
        runners["optimum (ORTStableDiffusionPipeline)"] = lambda out: PythonRunner(
            a.optimum_python, "optimum", opt, init, a, out)
        runners["edgediff on optimum's folder"] = lambda out: EdgediffRunner(a.binary, opt, init, a, out)
    runners["edgediff on its own export"] = lambda out: EdgediffRunner(a.binary, ours, init, a, out)
    live = {k: make(images[k]) for k, make in runners.items()}
    # Round robin, so that the box's changing load falls on every runner alike.
    full = {k: [] for k in live}
    one = {k: [] for k in live}
    for _ in range(a.reps):
        for k, r in live.items():
            full[k].append(r.time(a.steps))
            one[k].append(r.time(1))
    for r in live.values():
        r.close()
    base_name = "edgediff on optimum's folder" if a.optimum_python else "edgediff on its own export"
    base_img = np.load(images[base_name])

    def figures(k: str, pick) -> tuple[float, float]:
        f, o = pick(full[k]), pick(one[k])
        return f / a.batch, (f - o) / (a.steps - 1)

    base = figures(base_name, statistics.median)
    print(f"| runner | load (s) | s per image, median (min) of {a.reps} | s per U-Net step, median "
          f"(min) | image / edgediff's | step / edgediff's | max abs diff to edgediff's images |")
    print("|---|---|---|---|---|---|---|")
    for k, r in live.items():
        (img, step), (img_min, step_min) = figures(k, statistics.median), figures(k, min)
        diff = float(np.abs(np.load(images[k]) - base_img).max())
        print(f"| {k} | {r.load:.2f} | {img:.3f} ({img_min:.3f}) | {step:.4f} ({step_min:.4f}) | "
              f"{img / base[0]:.2f} | {step / base[1]:.2f} | {diff:.1e} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        return build(sys.argv[2], Path(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        kind, folder, init, threads, guidance, out = sys.argv[2:8]
        return run(kind, folder, init, int(threads), float(guidance), out)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgediff"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", default="tiny,small")
    default_opt = Path("/work/venv-optimum/bin/python")
    p.add_argument("--optimum-python", default=str(default_opt) if default_opt.exists() else "",
                   help="python of a venv with optimum-onnx (tools/requirements-optimum.txt); "
                        "empty: leave optimum out")
    p.add_argument("--keep", help="work folder (default: a new temporary one)")
    a = p.parse_args()
    os.environ.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort" / "libonnxruntime.so.1.32.0"))
    if a.steps < 2:
        p.error("--steps must be at least 2 (the per-step figure differences two step counts)")
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-t2i-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"threads {a.threads}, DDIM {a.steps} steps, guidance {a.guidance} with a negative prompt, "
          f"batch {a.batch}, {a.reps} timed runs each after a warm-up; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if not a.optimum_python:
        print("optimum: no --optimum-python, left out", flush=True)
    for name in a.models.split(","):
        bench(name, a, tmp)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
