"""Regenerates tests/data/optimum-tiny (a folder written by optimum's own ONNX exporter) and
tests/data/optimum-tiny-reference (the images optimum's and diffusers' pipelines make from it).

optimum cannot live in the project's venv: optimum-onnx 0.1.0 needs transformers<4.58 and
huggingface-hub<1, and diffusers 0.42 (tools/requirements.txt) needs hub >= 1.32. So this runs
in a venv of its own, from tools/requirements-optimum.txt:

    python3 -m venv /work/venv-optimum
    /work/venv-optimum/bin/pip install -r tools/requirements-optimum.txt
    PYTHONPATH=exporter/src:tests /work/venv-optimum/bin/python tools/make_optimum_fixture.py

What it does: builds the tiny random StableDiffusionPipeline of tests/sd_tiny.py (seed 0),
exports it with optimum's `main_export(..., task="text-to-image")` (what `optimum-cli export
onnx --task text-to-image` runs), and from the exported folder runs optimum's
ORTStableDiffusionPipeline with DDIM, Euler, DPM-Solver++ 2M and UniPC schedulers (eta 0, so
no draw but the given latents), and diffusers' PyTorch StableDiffusionPipeline on the PyTorch
folder with the same schedulers and latents. Every reference .npy is produced by those
pipelines, not by edgediff; tests/test_optimum_folder.py runs edgediff on the folder and
compares.

The folder is optimum's export as written, less `vae_encoder/` (314 kB; text-to-image does
not use it), to keep the fixture under 2 MB; `--keep-vae-encoder` keeps it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "exporter" / "src"))
import sd_tiny  # noqa: E402

PROMPT, NEGATIVE, GUIDANCE, STEPS, N, SEED = "a lighthouse at dusk", "blurry low quality", 7.5, 10, 2, 5
# edgediff's sampler name -> diffusers' scheduler class, each from the folder's scheduler config.
SCHEDULERS = {"ddim": "DDIMScheduler", "ode-euler": "EulerDiscreteScheduler",
              "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def images(pipe, config, scheduler: str, latents: np.ndarray) -> np.ndarray:
    """The pipeline's images NCHW in [-1, 1] (float32) from `latents`, with `scheduler` made
    from the folder's scheduler `config`."""
    import diffusers
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE,
                   num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                   num_images_per_prompt=latents.shape[0], output_type="np").images
    # output_type "np": NHWC in [0, 1] (the VAE's [-1, 1] output mapped by x / 2 + 0.5, clamped).
    return (np.asarray(out, np.float32).transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "data"))
    p.add_argument("--keep-vae-encoder", action="store_true")
    a = p.parse_args()
    import diffusers
    from importlib.metadata import version
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    data = Path(a.out)
    folder, ref = data / "optimum-tiny", data / "optimum-tiny-reference"
    tmp = Path(tempfile.mkdtemp(prefix="optimum-fixture-"))
    src = sd_tiny.build(tmp / "tiny")
    main_export(str(src), output=str(tmp / "optimum"), task="text-to-image")
    if not a.keep_vae_encoder:
        shutil.rmtree(tmp / "optimum" / "vae_encoder")
    # The source path optimum records is a temporary folder: named, not kept.
    index = json.loads((tmp / "optimum" / "model_index.json").read_text())
    index.pop("_name_or_path", None)
    (tmp / "optimum" / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for cfg in (tmp / "optimum").glob("*/config.json"):
        c = json.loads(cfg.read_text())
        if c.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tmp / "optimum", folder)

    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    latents = np.random.default_rng(SEED).standard_normal((N, 4, 8, 8)).astype(np.float32)
    np.save(ref / "init.npy", latents)
    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider")
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(src), safety_checker=None, requires_safety_checker=False)
    config = dict(torch_pipe.scheduler.config)
    figures = {}
    for sampler, scheduler in SCHEDULERS.items():
        o = images(ort_pipe, config, scheduler, latents)
        d = images(torch_pipe, config, scheduler, latents)
        np.save(ref / f"optimum-{sampler}.npy", o)
        np.save(ref / f"diffusers-{sampler}.npy", d)
        figures[sampler] = {"scheduler": scheduler,
                            "optimum_vs_diffusers_max_abs": float(np.abs(o - d).max()),
                            "inside_unit_interval": float(np.mean(np.abs(o) < 0.999))}
        print(f"{sampler:10s} ({scheduler}): optimum vs diffusers max abs difference "
              f"{figures[sampler]['optimum_vs_diffusers_max_abs']:.2e}")
    record = {
        "what": "images (NCHW, float32, in [-1, 1]) made by optimum's ORTStableDiffusionPipeline "
                "on optimum-tiny (optimum-*.npy) and by diffusers' PyTorch StableDiffusionPipeline "
                "on the PyTorch folder it was exported from (diffusers-*.npy), from init.npy as "
                "`latents=`; not made by edgediff",
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE,
        "num_inference_steps": STEPS, "latents": f"numpy default_rng({SEED}).standard_normal({N}, 4, 8, 8)",
        "pytorch_pipeline": "tests/sd_tiny.py build(out), seed 0",
        "exported_with": "optimum.exporters.onnx.main_export(task='text-to-image')"
                         + ("" if a.keep_vae_encoder else "; vae_encoder/ removed"),
        "versions": {k: version(k) for k in ("optimum", "optimum-onnx", "diffusers", "transformers",
                                             "torch", "onnxruntime", "onnx")},
        "samplers": figures,
    }
    (ref / "reference.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.2f} MB) and {ref}")


if __name__ == "__main__":
    main()
