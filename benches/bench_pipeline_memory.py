"""Peak memory of text-to-image sampling in each memory mode: `edgediff sample` on a pipeline
folder as it is, with `--low-memory` (one graph at a time), and with `--low-memory --vae-tiles
T` (and `--vae-tiles T` alone), each in a fresh process: its peak RSS (the kernel's high-water
mark of its resident memory, VmHWM of /proc/PID/status, read until it exits; wait4's ru_maxrss
is not used, as it also counts the pre-exec memory of the Python process that started it), and
the peak of each stage of the run (opening the model, encoding the prompts, sampling,
decoding), polled from VmRSS every 5 ms while the run's debug log says which stage it is in. The output of every mode is compared with the
first's: low-memory mode must give the same bytes, tiled decoding differs by what the VAE's
reach beyond a tile changes (max and mean abs difference printed).

    .venv/bin/python benches/bench_pipeline_memory.py                     # the tests' tiny pipeline
    .venv/bin/python benches/bench_pipeline_memory.py --build-sd-like DIR # build, then measure it
    .venv/bin/python benches/bench_pipeline_memory.py --model DIR         # any pipeline folder
    (--vae-tiles 32,16: the tile sizes to try; -n, --batch-size, --steps, --threads as for sample)
    ... --optimum-python /work/venv-optimum/bin/python   # and optimum's pipeline beside them

Every run starts from the same initial latents (`--init-noise`). With --optimum-python (a venv of
tools/requirements-optimum.txt), optimum's ORTStableDiffusionPipeline runs the same folder (the
optimum layout, which `edgediff-export diffusers` writes) in a process of its own, with the same
prompt, guidance 7.5, steps, batches, threads and latents: its peak RSS is the last row, every
row's ratio to it the last column, and its images are compared with edgediff's (the same
computation: a difference at float32 rounding). Its process's memory includes the Python
interpreter, torch (optimum's pipeline imports it) and ONNX Runtime, as a user's would.

`--build-sd-like DIR` saves a randomly initialised diffusers StableDiffusionPipeline with
Stable Diffusion 1.5's configs where memory is decided (its VAE, 512x512 images from 64x64
latents; a CLIP ViT-L/14-sized text encoder) and a narrower U-Net (block_out_channels
64,128,256,256 instead of 320,640,1280,1280), exports it with `edgediff-export diffusers` to
DIR/edgediff, and measures that. Building it takes minutes on two cores; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat"


def measure(cmd: list[str]) -> tuple[float, dict[str, float], float]:
    """Runs `cmd`; returns its peak RSS in MB (the last VmHWM read), the peak of its resident
    memory in each stage of the run (VmRSS polled every 5 ms; the stages are read from its
    debug log, `stage: Sampling` ...; `load` is opening the model), and the seconds."""
    import re
    import threading
    start = time.time()
    env = dict(os.environ, RUST_LOG="edgediff=debug")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stage, peaks, log, hwm = ["load"], {}, [], [0.0]

    def poll() -> None:
        status = f"/proc/{proc.pid}/status"
        while True:
            try:
                with open(status) as f:
                    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                          if k in ("VmRSS", "VmHWM")}
                rss, hwm[0] = kb["VmRSS"] / 1024, kb["VmHWM"] / 1024
            except (OSError, KeyError, ValueError):
                return  # exited (a zombie has no VmRSS)
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=poll)
    watcher.start()
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"stage: (\w+)", line)
        if m:
            stage[0] = m.group(1)
    watcher.join()  # returns once the process has exited (a zombie: no VmHWM)
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {''.join(log[-20:])}")
    return hwm[0], peaks, time.time() - start


def optimum_run(folder: str, init: str, steps: int, threads: int, batch: int, out: str) -> None:
    """In the optimum venv: ORTStableDiffusionPipeline on `folder`, the latents of `init` in
    batches of `batch`, images saved to `out` as [n, C, H, W] in [-1, 1]."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    torch.set_num_threads(max(threads, 1))
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider",
                                                      session_options=so)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(init))
    images = []
    for i in range(0, latents.shape[0], batch):
        z = latents[i:i + batch]
        images.append(pipe(PROMPT, guidance_scale=7.5, num_inference_steps=steps, latents=z.clone(),
                           num_images_per_prompt=z.shape[0], output_type="np").images)
    np.save(out, (np.concatenate(images).transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32))


def build_sd_like(root: Path) -> Path:
    """A random SD-1.5-like pipeline saved to root/diffusers and exported to root/edgediff."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import sd_tiny

    src, out = root / "diffusers", root / "edgediff"
    if (out / "edgediff.json").is_file():
        return out
    vocab_dir = root / "vocab"
    size, bos, eos = sd_tiny.write_tiny_vocab(vocab_dir)
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(  # Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse's config)
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sd_tiny.SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(src))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter" / "src")}
    subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                    "--out", str(out)], check=True, env=env)
    return out


def graph_sizes(model: Path) -> str:
    parts = [f"{g} {(model / g / 'model.onnx').stat().st_size / 1e6:.0f} MB"
             for g in ("text_encoder", "unet", "vae_decoder", "vae_encoder")
             if (model / g / "model.onnx").is_file()]
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgediff"))
    p.add_argument("--model", default=None, help="a pipeline folder (default: the tests' tiny one)")
    p.add_argument("--build-sd-like", default=None, metavar="DIR",
                   help="build a random SD-1.5-like pipeline under DIR (kept) and measure it")
    p.add_argument("--vae-tiles", default=None,
                   help="tile sizes in latent pixels, comma-separated (default: half the latent side)")
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--optimum-python", default="",
                   help="python of a venv with optimum-onnx: measure its pipeline too")
    if len(sys.argv) > 1 and sys.argv[1] == "optimum-run":
        folder, init, steps, threads, batch, out = sys.argv[2:8]
        return optimum_run(folder, init, int(steps), int(threads), int(batch), out)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-memory-"))
    if a.build_sd_like:
        model = build_sd_like(Path(a.build_sd_like))
    elif a.model:
        model = Path(a.model)
    else:  # built in another process, so that this one stays small
        code = "import sys, sd_tiny; from pathlib import Path; print(sd_tiny.exported(Path(sys.argv[1])))"
        model = Path(subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=ROOT / "tests", check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    import json
    latent = json.loads((model / "edgediff.json").read_text())["latent_shape"]
    tiles = [int(t) for t in a.vae_tiles.split(",")] if a.vae_tiles else [max(4, latent[1] // 2)]
    modes = [("normal", []), ("--low-memory", ["--low-memory"]),
             *((f"--low-memory --vae-tiles {t}", ["--low-memory", "--vae-tiles", str(t)]) for t in tiles),
             (f"--vae-tiles {tiles[0]}", ["--vae-tiles", str(tiles[0])])]
    print(f"{model}: {graph_sizes(model)}; latents {latent}")
    print(f"-n {a.n} --batch-size {a.batch_size} --steps {a.steps} --threads {a.threads}, {a.binary}")
    print("Peak RSS in MB: of the whole run (VmHWM), and while the model is opened and while each")
    print("graph works (polled; without --low-memory the U-Net is still held while decoding).")
    init = tmp / "init.npy"
    np.save(init, np.random.default_rng(0).standard_normal((a.n, *latent)).astype(np.float32))
    rows, first = [], None

    def compare(x: np.ndarray) -> str:
        if x.tobytes() == first.tobytes():
            return "identical bytes"
        d = np.abs(x - first)
        return f"max abs diff {d.max():.2g}, mean {d.mean():.2g}"

    for name, flags in modes:
        out = tmp / f"{len(flags)}-{name.replace(' ', '_')}.npy"
        cmd = [a.binary, "sample", "--model", str(model), "--prompt", PROMPT,
               "-n", str(a.n), "--batch-size", str(a.batch_size), "--steps", str(a.steps),
               "--threads", str(a.threads), "--init-noise", str(init), "-q", "--out", str(out), *flags]
        rss, peaks, secs = measure(cmd)
        x = np.load(out)
        same = "-" if first is None else compare(x)
        first = x if first is None else first
        stages = [f"{peaks[k]:.0f}" if k in peaks else "-" for k in ("load", "Text", "Sampling", "Decoding")]
        rows.append([name, rss, *stages, f"{secs:.1f}", same])
    if a.optimum_python:
        out = tmp / "optimum.npy"
        rss, _, secs = measure([a.optimum_python, __file__, "optimum-run", str(model), str(init),
                                str(a.steps), str(a.threads), str(a.batch_size), str(out)])
        rows.append(["optimum ORTStableDiffusionPipeline", rss, "-", "-", "-", "-", f"{secs:.1f}",
                     compare(np.load(out))])
    print("| mode | peak RSS | opening | text encoder | U-Net | VAE decoder | s | output vs normal |"
          + (" peak / optimum's |" if a.optimum_python else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if a.optimum_python else ""))
    for r in rows:
        ratio = f" {r[1] / rows[-1][1]:.2f} |" if a.optimum_python else ""
        print(f"| {r[0]} | {r[1]:.0f} | {' | '.join(r[2:])} |{ratio}", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
