"""Image sizes other than the folder's (`edgediff sample --height H --width W`, the library's
`SampleOptions::image_size`), against diffusers' pipelines called with `height=` and `width=`.

The tiny pipeline of tests/sd_tiny.py is exported with the U-Net's and VAE's height and width
dynamic (as optimum exports them), so one folder makes 16x16 images (its own 8x8 latents) and
16x32 ones (8x16 latents). Its VAE upsamples 2x and its U-Net halves its latents once, so
image sides must be multiples of 4. img2img and inpainting take their images' size.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sd_tiny
from conftest import run_cli

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT, NEGATIVE, GUIDANCE, STEPS = "a lighthouse at dusk", "blurry low quality", 7.5, 10
# As tests/test_text_to_image.py: float32 on both sides through graphs that match PyTorch to
# ~1e-6, so what is left is rounding over 10 guided steps. Measured 2.5e-6 (sample, DDIM) and
# 2.5e-6 (img2img, strength 0.6) at 16x32; the bound is the other parity tests' 1e-3.
TOL = 1e-3
H, W = 16, 32  # latents 8x16: not the folder's 8x8, and not square


@pytest.fixture(scope="module")
def folders() -> tuple[Path, Path]:
    """(the diffusers folder, our export) of the tiny pipeline."""
    out = sd_tiny.exported()
    return out.with_name(out.name.removesuffix("-edgediff")), out


def pipeline(cls, src: Path):
    pipe = cls.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_exported_unet_and_vae_take_any_height_and_width(folders):
    import onnx
    _, out = folders
    for part, names in (("unet", ("sample", "out_sample")), ("vae_decoder", ("latent_sample", "sample")),
                        ("vae_encoder", ("sample", "latent_parameters"))):
        g = onnx.load(str(out / part / "model.onnx"), load_external_data=False).graph
        for v in [*g.input, *g.output]:
            if v.name in names:
                dims = v.type.tensor_type.shape.dim
                assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3])), (part, v)


def test_images_of_another_size_match_diffusers_pipeline(edgediff_bin, folders, tmp_path):
    src, out = folders
    latents = np.random.default_rng(7).standard_normal((2, 4, H // 2, W // 2)).astype(np.float32)
    with torch.no_grad():
        ref = pipeline(diffusers.StableDiffusionPipeline, src)(
            PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
            height=H, width=W, latents=torch.from_numpy(latents), num_images_per_prompt=2,
            output_type="pt").images.numpy() * 2 - 1
    np.save(tmp_path / "init.npy", latents)
    proc = run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--negative-prompt",
                   NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", "ddim", "--steps", str(STEPS),
                   "--height", str(H), "--width", str(W), "--init-noise", str(tmp_path / "init.npy"),
                   "--out", str(tmp_path / "img.npy"), "-q", "--json")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert (summary["height"], summary["width"]) == (H, W)
    got = np.load(tmp_path / "img.npy")
    assert got.shape == ref.shape == (2, 3, H, W)
    err = float(np.abs(got - ref).max())
    inside = float(np.mean(np.abs(ref) < 0.999))
    print(f"{H}x{W} images, ddim vs DDIMScheduler: max abs difference {err:.2e} ({inside:.0%} inside (-1, 1))")
    assert err <= TOL, f"max abs difference {err:.2e}"
    assert inside > 0.5, "the images saturate: the comparison would prove little"


def test_img2img_takes_the_images_size_as_diffusers(edgediff_bin, folders, tmp_path, monkeypatch):
    """StableDiffusionImg2ImgPipeline run with the VAE's mean (retrieve_latents "argmax", what
    edgediff takes; see tests/test_text_to_image.py) on 16x32 images: no --height needed."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as m
    src, out = folders
    real = m.retrieve_latents
    monkeypatch.setattr(m, "retrieve_latents",
                        lambda o, generator=None, sample_mode="sample": real(o, generator, "argmax"))
    yy, xx = np.mgrid[0:H, 0:W] / np.array([[H - 1], [W - 1]]).reshape(2, 1, 1)
    images = np.stack([np.stack([xx * 2 - 1, yy * 2 - 1, np.cos(6 * xx * yy)])]).astype(np.float32)
    noise = torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(3)).numpy()
    with torch.no_grad():
        ref = pipeline(diffusers.StableDiffusionImg2ImgPipeline, src)(
            PROMPT, image=torch.from_numpy((images + 1) / 2), strength=0.6, negative_prompt=NEGATIVE,
            guidance_scale=GUIDANCE, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
            output_type="pt").images.numpy() * 2 - 1
    np.save(tmp_path / "image.npy", images)
    np.save(tmp_path / "noise.npy", noise)
    run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--guidance", str(GUIDANCE), "--steps", str(STEPS), "--image", str(tmp_path / "image.npy"),
            "--strength", "0.6", "--init-noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "img.npy"), "-q")
    got = np.load(tmp_path / "img.npy")
    assert got.shape == ref.shape == (1, 3, H, W)
    err = float(np.abs(got - ref).max())
    print(f"img2img at {H}x{W} vs StableDiffusionImg2ImgPipeline: max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


def test_inpaint_takes_the_images_size(edgediff_bin, folders, tmp_path):
    """A PNG of another size than the folder's is the run's size (the maths at other sizes is
    the sampling's and the VAE's, checked above; tests/test_inpaint_latent.py checks
    inpainting's own against diffusers)."""
    from PIL import Image
    _, out = folders
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = 200
    Image.fromarray(rgb).save(tmp_path / "image.png")
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    proc = run_cli(edgediff_bin, "inpaint", "--model", str(out), "--prompt", PROMPT, "--image",
                   str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "4",
                   "--out", str(tmp_path / "o.npy"), "--json")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert (summary["height"], summary["width"]) == (H, W)
    assert np.load(tmp_path / "o.npy").shape == (1, 3, H, W)


def test_a_resume_continues_only_the_same_size(edgediff_bin, folders, tmp_path):
    _, out = folders
    common = ["sample", "--model", str(out), "-n", "2", "--steps", "2", "-q", "--out", str(tmp_path / "o")]
    run_cli(edgediff_bin, *common, "--height", str(H), "--width", str(W))
    for other in (["--height", "20", "--width", str(W)], []):
        proc = subprocess.run([str(edgediff_bin), *common, "--resume", *other], capture_output=True, text=True)
        assert proc.returncode == 2 and "was made with --height/--width [16,32]" in proc.stderr, proc.stderr
    run_cli(edgediff_bin, *common, "--resume", "--width", str(W))  # --height: the folder's 16
    # The folder's own size given explicitly is the run without --height/--width.
    plain = ["sample", "--model", str(out), "-n", "1", "--steps", "2", "-q", "--out", str(tmp_path / "p")]
    run_cli(edgediff_bin, *plain)
    run_cli(edgediff_bin, *plain, "--resume", "--height", "16", "--width", "16")
