"""Pipeline folders whose graphs take and give float16 (optimum's `--dtype fp16`, common on GPU
and Jetson deployments; onnxconverter's `keep_io_types=False`): each graph's float inputs and
outputs are fed and read in the type the graph declares, the latents and hidden states stay
float32 between graphs, and a folder mixing fp16-IO and fp32-IO graphs works too.

The fp16 folders are made here from the fixtures by the project's converter
(`precision.to_fp16(keep_io_types=False)`: float16 weights and activations, the norms and the
time embedding kept float32, the timestep input float32): tests/data/optimum-tiny (optimum's
own export) for text-to-image, the tiny pipeline of tests/sd_tiny.py as `edgediff-export`
writes it for img2img (optimum-tiny has no vae_encoder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, run_cli

FOLDER = ROOT / "tests" / "data" / "optimum-tiny"
REF = ROOT / "tests" / "data" / "optimum-tiny-reference"
RECORD = json.loads((REF / "reference.json").read_text())
PROMPT, NEGATIVE = RECORD["prompt"], RECORD["negative_prompt"]
GUIDANCE, STEPS = RECORD["guidance_scale"], RECORD["num_inference_steps"]
GRAPHS = ("text_encoder", "unet", "vae_decoder")
# Against the fp32 graphs' images from the same latents, 10 guided DDIM steps, images in
# [-1, 1]. Measured on this machine's CPU: 2.5e-3 max abs with every graph converted, 1.9e-3
# with the U-Net alone, 9.7e-4 with the text encoder and VAE decoder alone; img2img (strength
# 0.6, the VAE encoder converted too) 2.1e-3. That is fp16's rounding (4.9e-4 relative per value) through tens of layers,
# amplified by guidance 7.5: the bound leaves 8x for other kernels (a GPU's fp16 ones round at
# every operation) and is still far below a broken boundary (float16 bits read as float32, or
# the wrong graph's type, give garbage or an error, not a 2e-2 difference).
TOL = 2e-2


def fp16_io(src: Path, dst: Path, parts) -> Path:
    """A copy of the folder `src` with the graphs `parts` converted to float16, inputs and
    outputs included (the timestep stays float32, as the converter keeps it)."""
    from edgediff_export.precision import to_fp16
    shutil.copytree(src, dst)
    for part in parts:
        path = dst / part / "model.onnx"
        proto = to_fp16(onnx.load(str(path)), keep_io_types=False)
        onnx.save(proto, str(path))
        floats = [v for v in [*proto.graph.input, *proto.graph.output]
                  if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                  and v.name != "timestep"]
        assert floats and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in floats), part
    return dst


MIXES = {"all": GRAPHS, "unet": ("unet",), "text-and-vae": ("text_encoder", "vae_decoder")}


@pytest.mark.parametrize("mix", list(MIXES))
def test_an_fp16_io_folder_samples_what_the_fp32_one_does(edgediff_bin, tmp_path, mix):
    folder = fp16_io(FOLDER, tmp_path / "fp16", MIXES[mix])
    out = tmp_path / "img.npy"
    run_cli(edgediff_bin, "sample", "--model", str(folder), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", "ddim", "--steps", str(STEPS),
            "--init-noise", str(REF / "init.npy"), "--out", str(out), "-q")
    got = np.load(out)
    # optimum's ORTStableDiffusionPipeline on the fp32 graphs, from the same latents.
    ref = np.load(REF / "optimum-ddim.npy")
    assert got.shape == ref.shape == (2, 3, 16, 16)
    assert np.isfinite(got).all()
    err = float(np.abs(got - ref).max())
    print(f"fp16 IO ({mix}) vs optimum's fp32 images: max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"
    assert err > 1e-5, "no fp16 rounding at all: the converted graphs were not run"


def test_an_fp16_io_folder_runs_img2img_and_low_memory(edgediff_bin, tmp_path):
    pytest.importorskip("diffusers")
    import sd_tiny
    ours = sd_tiny.exported()
    folder = fp16_io(ours, tmp_path / "fp16", (*GRAPHS, "vae_encoder"))
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    np.save(tmp_path / "image.npy", np.stack([np.stack([xx * 2 - 1, yy * 2 - 1, np.cos(6 * xx * yy)])]).astype(np.float32))
    np.save(tmp_path / "noise.npy", np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32))
    runs = {}
    for name, model, extra in (("fp32", ours, []), ("fp16", folder, []), ("fp16-low", folder, ["--low-memory"])):
        run_cli(edgediff_bin, "sample", "--model", str(model), "--prompt", PROMPT, "--negative-prompt",
                NEGATIVE, "--guidance", str(GUIDANCE), "--steps", str(STEPS), "--image",
                str(tmp_path / "image.npy"), "--strength", "0.6", "--init-noise", str(tmp_path / "noise.npy"),
                "--out", str(tmp_path / f"{name}.npy"), "-q", *extra)
        runs[name] = np.load(tmp_path / f"{name}.npy")
    assert np.isfinite(runs["fp16"]).all()
    err = float(np.abs(runs["fp16"] - runs["fp32"]).max())
    print(f"fp16 IO img2img vs the fp32 folder's: max abs difference {err:.2e}")
    assert 1e-5 < err <= TOL, f"max abs difference {err:.2e}"
    assert np.array_equal(runs["fp16-low"], runs["fp16"])

