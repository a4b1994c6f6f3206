"""A folder written by optimum's own ONNX exporter runs as it is (issue 18).

tests/data/optimum-tiny is the tiny random StableDiffusionPipeline of tests/sd_tiny.py exported
by optimum (`main_export(task="text-to-image")`, optimum-onnx 0.1.0), less its vae_encoder/;
tests/data/optimum-tiny-reference holds the images optimum's ORTStableDiffusionPipeline made
from it (optimum-*.npy) and diffusers' PyTorch pipeline made from the PyTorch folder
(diffusers-*.npy), both from init.npy as `latents=`, recorded with the versions in
reference.json. None of them was made by edgediff. optimum cannot be installed beside the
project's pins (it needs transformers<4.58 and huggingface-hub<1; diffusers 0.42 needs hub >=
1.32), so the folder and the references are committed; tools/make_optimum_fixture.py, run in a
venv of tools/requirements-optimum.txt, regenerates both.

What the real folder has that the project's own export does not: no edgediff.json (the record
is derived from the configs), a float32 `timestep` of rank 0 (one time for the whole batch;
edgediff's export declares int64 [N]), the U-Net output named `out_sample`.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT, run_cli

FOLDER = ROOT / "tests" / "data" / "optimum-tiny"
REF = ROOT / "tests" / "data" / "optimum-tiny-reference"
RECORD = json.loads((REF / "reference.json").read_text())
PROMPT, NEGATIVE = RECORD["prompt"], RECORD["negative_prompt"]
GUIDANCE, STEPS = RECORD["guidance_scale"], RECORD["num_inference_steps"]
# float32 on both sides through the same ONNX graphs (against optimum) or PyTorch modules that
# the graphs match to ~1e-6 (against diffusers): what is left is the schedulers' arithmetic
# (numpy/torch float32 against edgediff's f64 coefficients) compounded over 10 steps at
# guidance 7.5. Measured: 1.2e-6 to 2.2e-6 against optimum, 1.6e-6 to 2.7e-6 against diffusers
# (optimum against diffusers: 1.8e-6 to 2.3e-6, reference.json). The bound leaves ~40x for
# other CPUs' kernels and is still far below a real difference: guidance 7.4 instead of 7.5
# moves the DDIM images by 5.1e-3, trailing spacing instead of the folder's leading by 1.2e-1.
TOL = 1e-4
SAMPLERS = list(RECORD["samplers"])


def test_the_fixture_is_optimums_folder_as_written():
    assert not (FOLDER / "edgediff.json").exists()
    import onnx
    unet = onnx.load(str(FOLDER / "unet" / "model.onnx"), load_external_data=False)
    timestep = next(i for i in unet.graph.input if i.name == "timestep")
    assert timestep.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(timestep.type.tensor_type.shape.dim) == 0, "optimum's scalar timestep"
    assert [o.name for o in unet.graph.output] == ["out_sample"]


def test_info_reads_the_folder_from_its_configs(edgediff_bin):
    info = json.loads(run_cli(edgediff_bin, "info", "--model", str(FOLDER), "--json").stdout)
    assert info["conditioning"] == {"type": "text", "max_length": 77, "hidden_size": 32}
    assert info["sample_shape"] == [4, 8, 8] and info["prediction"] == "epsilon"
    assert info["schedule"] == {"kind": "quadratic", "num_train_timesteps": 1000,
                                "beta_start": 0.00085, "beta_end": 0.012}
    p = info["extra"]["pipeline"]
    assert (p["spacing"], p["steps_offset"], p["set_alpha_to_one"]) == ("leading", 1, False)
    assert p["image_shape"] == [3, 16, 16] and p["vae"]["scaling_factor"] == 0.18215


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_images_match_optimums_and_diffusers_pipelines(edgediff_bin, tmp_path, sampler):
    out = tmp_path / "img.npy"
    run_cli(edgediff_bin, "sample", "--model", str(FOLDER), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", sampler, "--steps", str(STEPS),
            "--init-noise", str(REF / "init.npy"), "--out", str(out), "-q")
    got = np.load(out)
    for source in ("optimum", "diffusers"):
        ref = np.load(REF / f"{source}-{sampler}.npy")
        assert got.shape == ref.shape == (2, 3, 16, 16)
        err = float(np.abs(got - ref).max())
        print(f"{sampler} vs {source}'s {RECORD['samplers'][sampler]['scheduler']}: max abs "
              f"difference {err:.2e}")
        assert err <= TOL, f"{source}: max abs difference {err:.2e}"
    assert RECORD["samplers"][sampler]["inside_unit_interval"] > 0.5, "saturated references"


def test_samples_at_different_times_in_one_batch_run_one_call_each(edgediff_bin, tmp_path):
    """The scalar timestep takes one time per call: the per-sample adaptive sampler puts samples
    at different times in one batch, which then runs sample by sample, and gives what batches
    of one give."""
    runs = {}
    for bs in ("1", "2"):
        proc = run_cli(edgediff_bin, "sample", "--model", str(FOLDER), "--prompt", PROMPT,
                       "--sampler", "adaptive", "--init-noise", str(REF / "init.npy"),
                       "--batch-size", bs, "--out", str(tmp_path / f"{bs}.npy"), "--json")
        runs[bs] = (np.load(tmp_path / f"{bs}.npy"), json.loads(proc.stdout.splitlines()[-1]))
    steps = runs["2"][1]["steps_per_sample"]
    assert len(set(steps)) > 1, f"the samples took the same steps {steps}: nothing tested"
    err = float(np.abs(runs["1"][0] - runs["2"][0]).max())
    print(f"adaptive, batch 2 (times differ: steps {steps}) vs batch 1: max abs difference {err:.2e}")
    assert err <= 1e-5


def test_img2img_names_the_missing_vae_encoder(edgediff_bin, tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((1, 3, 16, 16), np.float32))
    proc = subprocess.run([str(edgediff_bin), "sample", "--model", str(FOLDER), "--prompt", PROMPT,
                           "--image", str(tmp_path / "image.npy"), "--steps", "4", "-q",
                           "--out", str(tmp_path / "o.npy")], capture_output=True, text=True)
    assert proc.returncode == 3 and "vae_encoder/model.onnx" in proc.stderr, proc.stderr
