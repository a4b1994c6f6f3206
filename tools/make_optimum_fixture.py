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

`--lcm` instead regenerates tests/data/optimum-tiny-lcm (and -reference): the tiny pipeline
built as a LatentConsistencyModelPipeline with LCMScheduler and a U-Net taking the
guidance-scale embedding (`time_cond_proj_dim` 32; half the widths, to stay under 1 MB),
exported by the same `main_export`, and the latents and images optimum's
ORTLatentConsistencyModelPipeline and diffusers' PyTorch LatentConsistencyModelPipeline make
at their defaults (4 steps, guidance 8.5) from init.npy as `latents=` and with steps.npy as the
scheduler's per-step noise (its randn_tensor replaced), for tests/test_consistency.py.
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


def export_with_optimum(src: Path, folder: Path, tmp: Path, keep_vae_encoder: bool) -> None:
    """optimum's text-to-image export of `src` into `folder` (via `tmp`), without the
    temporary source paths it records."""
    from optimum.exporters.onnx import main_export
    main_export(str(src), output=str(tmp / "optimum"), task="text-to-image")
    if not keep_vae_encoder:
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


def versions() -> dict:
    from importlib.metadata import version
    return {k: version(k) for k in ("optimum", "optimum-onnx", "diffusers", "transformers",
                                    "torch", "onnxruntime", "onnx")}


LCM_STEPS, LCM_GUIDANCE, LCM_SEED = 4, 8.5, 6
# Half the tiny pipeline's widths: the folder stays under 1 MB.
LCM_SIZES = dict(time_cond_proj_dim=32, block_out_channels=(8, 16), norm_num_groups=4,
                 vae_channels=(8, 16))


def lcm_fixture(data: Path, keep_vae_encoder: bool) -> None:
    """tests/data/optimum-tiny-lcm and its references (see the module's docstring)."""
    import diffusers
    from diffusers.schedulers import scheduling_lcm
    from optimum.onnxruntime import ORTLatentConsistencyModelPipeline

    folder, ref = data / "optimum-tiny-lcm", data / "optimum-tiny-lcm-reference"
    tmp = Path(tempfile.mkdtemp(prefix="optimum-lcm-fixture-"))
    src = sd_tiny.build(tmp / "tiny-lcm", **LCM_SIZES)
    export_with_optimum(src, folder, tmp, keep_vae_encoder)
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    rng = np.random.default_rng(LCM_SEED)
    latents = rng.standard_normal((N, 4, 8, 8)).astype(np.float32)
    step_noise = rng.standard_normal((LCM_STEPS, N, 4, 8, 8)).astype(np.float32)
    np.save(ref / "init.npy", latents)
    np.save(ref / "steps.npy", step_noise)
    pipes = {"optimum": ORTLatentConsistencyModelPipeline.from_pretrained(
                 str(folder), provider="CPUExecutionProvider"),
             "diffusers": diffusers.LatentConsistencyModelPipeline.from_pretrained(
                 str(src), safety_checker=None, requires_safety_checker=False)}
    outputs = {}
    for who, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        for kind in ("latent", "np"):
            draws = iter(step_noise)
            scheduling_lcm.randn_tensor = lambda shape, **kw: torch.from_numpy(next(draws).copy())
            with torch.no_grad():
                # The pipeline's defaults: 4 steps, guidance 8.5 (the embedding of 7.5).
                out = pipe(PROMPT, latents=torch.from_numpy(latents), num_images_per_prompt=N,
                           output_type=kind).images
            out = np.asarray(out, np.float32)
            if kind == "np":  # NHWC in [0, 1] -> NCHW in [-1, 1]
                out = (out.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)
            name = f"{who}-{'latents' if kind == 'latent' else 'images'}"
            np.save(ref / f"{name}.npy", out)
            outputs[name] = out
    figures = {k: float(np.abs(outputs[f"optimum-{k}"] - outputs[f"diffusers-{k}"]).max())
               for k in ("latents", "images")}
    print(f"optimum vs diffusers max abs difference: {figures}")
    record = {
        "what": "final latents (output_type 'latent', NCHW float32) and images (NCHW, float32, in "
                "[-1, 1]) made by optimum's ORTLatentConsistencyModelPipeline on optimum-tiny-lcm "
                "(optimum-*.npy) and by diffusers' PyTorch LatentConsistencyModelPipeline on the "
                "PyTorch folder it was exported from (diffusers-*.npy), at the pipeline's defaults, "
                "from init.npy as `latents=` with steps.npy as LCMScheduler's per-step draws; not "
                "made by edgediff",
        "prompt": PROMPT, "guidance_scale": LCM_GUIDANCE, "num_inference_steps": LCM_STEPS,
        "noise": f"numpy default_rng({LCM_SEED}): standard_normal({N}, 4, 8, 8), then "
                 f"standard_normal({LCM_STEPS}, {N}, 4, 8, 8)",
        "pytorch_pipeline": f"tests/sd_tiny.py build(out, {', '.join(f'{k}={v}' for k, v in LCM_SIZES.items())}), seed 0",
        "exported_with": "optimum.exporters.onnx.main_export(task='text-to-image')"
                         + ("" if keep_vae_encoder else "; vae_encoder/ removed"),
        "versions": versions(),
        "optimum_vs_diffusers_max_abs": figures,
    }
    (ref / "reference.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.2f} MB) and {ref}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "data"))
    p.add_argument("--keep-vae-encoder", action="store_true")
    p.add_argument("--lcm", action="store_true", help="the LCM fixture instead (optimum-tiny-lcm)")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = Path(a.out)
    if a.lcm:
        lcm_fixture(data, a.keep_vae_encoder)
        return
    import diffusers
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    folder, ref = data / "optimum-tiny", data / "optimum-tiny-reference"
    tmp = Path(tempfile.mkdtemp(prefix="optimum-fixture-"))
    src = sd_tiny.build(tmp / "tiny")
    export_with_optimum(src, folder, tmp, a.keep_vae_encoder)

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
        "versions": versions(),
        "samplers": figures,
    }
    (ref / "reference.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.2f} MB) and {ref}")


if __name__ == "__main__":
    main()
