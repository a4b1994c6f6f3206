"""Text-to-image (issue 18): a tiny random StableDiffusionPipeline exported by
`edgediff-export diffusers DIR --out OUT` and sampled by the runtime, against diffusers.

The pipeline is built from configs in the test (tests/sd_tiny.py, ~10 s, no download);
diffusers and transformers are test-only dependencies (tools/requirements.txt).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sd_tiny
from conftest import ROOT, run_cli

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

EXPORTER = {"PYTHONPATH": str(ROOT / "exporter" / "src")}


def export(src: Path, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, **EXPORTER}
    proc = subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"export failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, Path]:
    """(the diffusers folder, our exported folder)."""
    d = tmp_path_factory.mktemp("sd")
    src = sd_tiny.build(d / "tiny")
    out = d / "tiny-edgediff"
    proc = export(src, out)
    print(proc.stderr[-600:])
    return src, out


def test_export_writes_the_optimum_layout_and_checks_every_graph(tiny_pipeline):
    src, out = tiny_pipeline
    for f in ("model_index.json", "edgediff.json", "text_encoder/model.onnx", "unet/model.onnx",
              "vae_decoder/model.onnx", "vae_encoder/model.onnx", "scheduler/scheduler_config.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
              "tokenizer/special_tokens_map.json", "unet/config.json", "vae_decoder/config.json",
              "text_encoder/config.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "edgediff.json").read_text())
    assert m["kind"] == "text-to-image"
    assert m["schedule"] == {"kind": "quadratic", "num_train_timesteps": 1000,
                             "beta_start": 0.00085, "beta_end": 0.012}
    assert (m["spacing"], m["steps_offset"], m["set_alpha_to_one"]) == ("leading", 1, False)
    assert m["latent_shape"] == [4, 8, 8] and m["image_shape"] == [3, 16, 16]
    assert m["vae"] == {"scaling_factor": 0.18215, "shift_factor": None}
    assert m["text"] == {"max_length": 77, "hidden_size": 32}
    # The exported vocabulary is the tokenizer's own: transformers loads it to the same ids.
    from transformers import CLIPTokenizer
    ours = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"))
    theirs = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    for text in ("a photo of a cat", "", "the lighthouse at dusk, blurry!", "zebra 123"):
        assert ours(text).input_ids == theirs(text).input_ids, text


def test_text_encoder_hidden_states_match_transformers(tiny_pipeline):
    import onnxruntime as ort
    from transformers import CLIPTextModel, CLIPTokenizer
    src, out = tiny_pipeline
    tok = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    ids = tok(["a lighthouse at dusk", "", "blurry low quality"], padding="max_length",
              max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = CLIPTextModel.from_pretrained(str(src / "text_encoder"))(ids).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], {"input_ids": ids.numpy()})[0]
    err = float(np.abs(got - ref).max())
    print(f"text encoder max abs difference {err:.2e}")
    assert err < 1e-4


def test_unsupported_pipeline_classes_are_refused_by_name(tiny_pipeline, tmp_path):
    src, _ = tiny_pipeline
    import shutil
    bad = tmp_path / "xl"
    shutil.copytree(src, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    proc = export(bad, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "StableDiffusionXLPipeline is SDXL" in proc.stderr


PROMPT, NEGATIVE, GUIDANCE, STEPS = "a lighthouse at dusk", "blurry low quality", 7.5, 10
TOL = 1e-3


# Stable Diffusion 1.x ships PNDMScheduler with skip_prk_steps true (PLMS alone, edgediff's
# pndm); diffusers' default false would start with three Runge-Kutta steps edgediff does not run.
SCHEDULER_OVERRIDES = {"PNDMScheduler": {"skip_prk_steps": True}}


def diffusers_images(src: Path, scheduler: str, latents: np.ndarray) -> tuple[np.ndarray, list]:
    """StableDiffusionPipeline's images in [-1, 1] from `latents`, and the scheduler's times."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config,
                                                              **SCHEDULER_OVERRIDES.get(scheduler, {}))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE,
                      num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                      num_images_per_prompt=latents.shape[0],
                      output_type="pt").images
    pipe.scheduler.set_timesteps(STEPS)
    return images.numpy() * 2 - 1, [float(t) for t in pipe.scheduler.timesteps]


# diffusers' scheduler -> edgediff's sampler, run on the pipeline's defaults (leading spacing,
# steps_offset 1, set_alpha_to_one false) with no flag, and for DPMSolverMultistep also with
# its times passed explicitly. Its "leading" divides by steps + 1 (DDIM's and Euler's by steps),
# as UniPC's does: the pipeline's defaults follow the sampler's counterpart.
SAMPLERS = [("DDIMScheduler", "ddim", False), ("EulerDiscreteScheduler", "ode-euler", False),
            ("DPMSolverMultistepScheduler", "dpm++2m", False),
            ("DPMSolverMultistepScheduler", "dpm++2m", True),
            ("UniPCMultistepScheduler", "unipc", False), ("PNDMScheduler", "pndm", False)]


@pytest.mark.parametrize("scheduler,sampler,explicit", SAMPLERS,
                         ids=[s[1] + ("-timesteps" if s[2] else "") for s in SAMPLERS])
def test_images_match_diffusers_pipeline(edgediff_bin, tiny_pipeline, tmp_path, scheduler, sampler,
                                         explicit):
    src, out = tiny_pipeline
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref, times = diffusers_images(src, scheduler, latents)
    np.save(tmp_path / "init.npy", latents)
    extra = ["--timesteps", ",".join(f"{t:g}" for t in times)] if explicit else ["--steps", str(STEPS)]
    run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", sampler, "--init-noise",
            str(tmp_path / "init.npy"), "--out", str(tmp_path / "img.npy"), "-q", *extra)
    got = np.load(tmp_path / "img.npy")
    assert got.shape == ref.shape == (2, 3, 16, 16)
    err = float(np.abs(got - ref).max())
    inside = float(np.mean(np.abs(ref) < 0.999))
    print(f"parity {sampler}{' --timesteps' if explicit else ''} vs {scheduler}: max abs difference {err:.2e} "
          f"({inside:.0%} of pixels inside (-1, 1))")
    assert err <= TOL, f"max abs difference {err:.2e}"
    assert inside > 0.5, "the images saturate: the comparison would prove little"


def test_lcm_on_a_plain_unet_is_cfg_on_the_consistency_grid(edgediff_bin, tiny_pipeline, tmp_path,
                                                             monkeypatch):
    """lcm on a U-Net without the guidance embedding (LCM-LoRA's setting): diffusers'
    StableDiffusionPipeline with LCMScheduler.from_config runs classifier-free guidance on the
    doubled batch and puts its steps on the consistency grid whatever the config's leading
    spacing and steps_offset; so does edgediff with `--sampler lcm` alone. Per-step noise is
    injected into both (tests/test_consistency.py has the guidance-embedding U-Nets)."""
    from diffusers.schedulers import scheduling_lcm
    src, out = tiny_pipeline
    steps = 4
    rng = np.random.default_rng(9)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    step_noise = rng.standard_normal((steps, 2, 4, 8, 8)).astype(np.float32)
    draws = iter(step_noise)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws).copy()))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=steps,
                   latents=torch.from_numpy(latents), num_images_per_prompt=2, output_type="pt").images
    ref = ref.numpy() * 2 - 1
    np.save(tmp_path / "init.npy", latents)
    np.save(tmp_path / "steps.npy", step_noise)
    proc = run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--negative-prompt",
                   NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", "lcm", "--steps", str(steps),
                   "--init-noise", str(tmp_path / "init.npy"), "--step-noise", str(tmp_path / "steps.npy"),
                   "--out", str(tmp_path / "img.npy"), "-q", "--json")
    assert json.loads(proc.stdout)["network_calls"] == steps  # one call per step, on the doubled batch
    err = float(np.abs(np.load(tmp_path / "img.npy") - ref).max())
    print(f"lcm with CFG vs StableDiffusionPipeline + LCMScheduler: max abs difference {err:.2e}")
    assert err <= TOL


def test_guidance_and_the_negative_prompt_change_the_images(edgediff_bin, tiny_pipeline, tmp_path):
    _, out = tiny_pipeline
    runs = {}
    for name, args in {"guided": ["--negative-prompt", NEGATIVE], "plain": ["--guidance", "1"],
                       "other": ["--negative-prompt", "a red dog"]}.items():
        run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--steps", "5",
                "-n", "1", "--out", str(tmp_path / f"{name}.npy"), "-q", *args)
        runs[name] = np.load(tmp_path / f"{name}.npy")
    assert np.abs(runs["guided"] - runs["plain"]).max() > 1e-3
    assert np.abs(runs["guided"] - runs["other"]).max() > 1e-3


def test_an_optimum_folder_without_edgediff_json_loads_the_same(edgediff_bin, tiny_pipeline, tmp_path):
    import shutil
    _, out = tiny_pipeline
    bare = tmp_path / "optimum"
    shutil.copytree(out, bare)
    (bare / "edgediff.json").unlink()
    info = json.loads(run_cli(edgediff_bin, "info", "--model", str(bare), "--json").stdout)
    ours = json.loads(run_cli(edgediff_bin, "info", "--model", str(out), "--json").stdout)
    assert info["conditioning"] == ours["conditioning"] == {"type": "text", "max_length": 77,
                                                            "hidden_size": 32}
    assert info["schedule"] == ours["schedule"] and info["sample_shape"] == [4, 8, 8]
    for d in (bare, out):
        run_cli(edgediff_bin, "sample", "--model", str(d), "--prompt", PROMPT, "--steps", "4",
                "-n", "1", "--out", str(tmp_path / f"{d.name}.npy"), "-q")
    assert np.array_equal(np.load(tmp_path / "optimum.npy"), np.load(tmp_path / f"{out.name}.npy"))


# img2img: diffusers' StableDiffusionImg2ImgPipeline draws the image's latent from the VAE's
# distribution (mean + std * noise from the generator); edgediff takes its mean (the mode), so
# an image gives the same latent whatever the seed and nothing of the per-sample stream goes
# into it. The reference runs with retrieve_latents in its "argmax" mode (the mean), and then the
# generator's only draw is the noise added at the strength's level, which edgediff gets as
# --init-noise.
IMG2IMG = [("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "ode-euler")]


def diffusers_img2img(src: Path, scheduler: str, images: np.ndarray, strength: float, seed: int,
                      monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """(images in [-1, 1], the noise the pipeline added) from StableDiffusionImg2ImgPipeline."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as m
    pipe = sd_tiny.mode_encoding_pipeline(m, diffusers.StableDiffusionImg2ImgPipeline, src, monkeypatch)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    n = images.shape[0]
    # prepare_latents' one draw: randn_tensor(shape, generator) on the CPU, as here.
    noise = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).numpy()
    with torch.no_grad():
        # In [0, 1], the range diffusers' image processor takes tensors in (it maps them to
        # [-1, 1] by 2x - 1, exact to rounding).
        out = pipe(PROMPT, image=torch.from_numpy((images + 1) / 2), strength=strength,
                   negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
                   num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed),
                   output_type="pt").images
    return out.numpy() * 2 - 1, noise


@pytest.mark.parametrize("scheduler,sampler", IMG2IMG, ids=[s[1] for s in IMG2IMG])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(edgediff_bin, tiny_pipeline, tmp_path, monkeypatch, scheduler,
                                   sampler, strength):
    src, out = tiny_pipeline
    # Smooth images (a gradient and a blob) so the VAE sees structure, not only noise.
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    images = np.stack([np.stack([xx * 2 - 1, yy * 2 - 1, np.cos(6 * xx * yy)]),
                       np.stack([np.sin(4 * xx), 1 - 2 * yy * xx, xx - yy])]).astype(np.float32)
    ref, noise = diffusers_img2img(src, scheduler, images, strength, 11, monkeypatch)
    np.save(tmp_path / "image.npy", images)
    np.save(tmp_path / "noise.npy", noise)
    run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--guidance", str(GUIDANCE), "--sampler", sampler, "--steps", str(STEPS),
            "--image", str(tmp_path / "image.npy"), "--strength", str(strength),
            "--init-noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "img.npy"), "-q")
    got = np.load(tmp_path / "img.npy")
    assert got.shape == ref.shape == (2, 3, 16, 16)
    err = float(np.abs(got - ref).max())
    print(f"img2img parity {sampler} vs {scheduler}, strength {strength}: max abs difference "
          f"{err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


def test_img2img_from_a_png_one_image_for_every_sample(edgediff_bin, tiny_pipeline, tmp_path):
    """A PNG is read in the pipeline's image shape and serves every sample, each with its own
    noise; the strength changes the result. (The tiny VAE is random, so closeness to the image
    itself says nothing here; the parity test above is the check of the maths.)"""
    from PIL import Image
    _, out = tiny_pipeline
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    rgb = np.stack([xx, yy, (xx + yy) / 2], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(tmp_path / "image.png")
    runs = {}
    for s in ("0.2", "1"):
        run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "--steps", "10",
                "--image", str(tmp_path / "image.png"), "--strength", s, "-n", "2",
                "--out", str(tmp_path / f"{s}.npy"), "-q")
        runs[s] = np.load(tmp_path / f"{s}.npy")
    assert runs["0.2"].shape == (2, 3, 16, 16)
    # One image for both samples, but each sample its own noise.
    assert np.abs(runs["0.2"][0] - runs["0.2"][1]).max() > 0
    assert np.abs(runs["0.2"] - runs["1"]).max() > 1e-3


def test_prompts_file_gives_each_sample_its_prompt_and_stream(edgediff_bin, tiny_pipeline, tmp_path):
    """Sample i of --prompts is sample i of a run with --prompt set to line i (its own stream,
    whatever the batch); -n beyond the lines cycles them."""
    _, out = tiny_pipeline
    lines = ["a lighthouse at dusk", "a red dog", "the sea"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--model", str(out), "--steps", "4", "-q"]
    run_cli(edgediff_bin, "sample", *common, "--prompts", str(tmp_path / "p.txt"),
            "--batch-size", "2", "--out", str(tmp_path / "all.npy"))
    many = np.load(tmp_path / "all.npy")
    assert many.shape == (3, 3, 16, 16)
    for i, p in enumerate(lines):
        run_cli(edgediff_bin, "sample", *common, "--prompt", p, "-n", "3",
                "--out", str(tmp_path / f"one{i}.npy"))
        one = np.load(tmp_path / f"one{i}.npy")[i]
        err = float(np.abs(many[i] - one).max())
        print(f"prompts file sample {i} vs a single-prompt run: max abs difference {err:.2e}")
        assert err <= 1e-5
    run_cli(edgediff_bin, "sample", *common, "--prompts", str(tmp_path / "p.txt"), "-n", "5",
            "--out", str(tmp_path / "cycled.npy"))
    cycled = np.load(tmp_path / "cycled.npy")
    assert cycled.shape[0] == 5
    assert np.abs(cycled[:3] - many).max() <= 1e-5
    # Sample 3 is line 0's prompt on stream 3: not sample 0 again.
    assert np.abs(cycled[3] - cycled[0]).max() > 1e-3


def test_img2img_resume_refuses_another_image_or_strength(edgediff_bin, tiny_pipeline, tmp_path):
    """The job record holds the image (by fingerprint) and the strength: a resume continues only
    the same img2img run."""
    import subprocess
    _, out = tiny_pipeline
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 16, 16), np.float32))
    np.save(tmp_path / "b.npy", np.full((1, 3, 16, 16), 0.5, np.float32))
    common = ["sample", "--model", str(out), "-n", "2", "--steps", "4", "-q", "--out", str(tmp_path / "o")]
    run_cli(edgediff_bin, *common, "--image", str(tmp_path / "a.npy"))
    for image, strength, flag in (("b.npy", "0.8", "--image"), ("a.npy", "0.5", "--strength")):
        proc = subprocess.run([str(edgediff_bin), *common, "--resume", "--image", str(tmp_path / image),
                               "--strength", strength], capture_output=True, text=True)
        assert proc.returncode == 2 and f"was made with {flag}" in proc.stderr, proc.stderr
    run_cli(edgediff_bin, *common, "--resume", "--image", str(tmp_path / "a.npy"), "--strength", "0.8")
# What runs on single-file models only so far: refused by the library (and so by C, see
# tests/c/text_check.c) before any work. The ELBO is a row of docs/errors.md.
REFUSED = [("invert", "DDIM inversion", lambda d: ["--image", str(d / "img.npy")]),
           ("likelihood", "the likelihood", lambda d: ["--data", str(d / "img.npy"), "--steps", "2"]),
           ("calibrate", "calibration", lambda d: ["--steps", "2", "--pilot", "2", "--teacher-steps", "4"])]


@pytest.mark.parametrize("command,what,args", REFUSED, ids=[r[0] for r in REFUSED])
def test_commands_for_pixel_models_refuse_a_pipeline(edgediff_bin, tiny_pipeline, tmp_path, command,
                                                     what, args):
    _, out = tiny_pipeline
    np.save(tmp_path / "img.npy", np.zeros((1, 3, 16, 16), np.float32))
    proc = run_cli(edgediff_bin, command, "--model", str(out), *args(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{what} is not supported yet for text-to-image pipelines" in proc.stderr
    assert "panicked" not in proc.stderr and "teacher:" not in proc.stderr


def test_interpolate_decodes_the_ends_as_sample_does(edgediff_bin, tiny_pipeline, tmp_path):
    """interpolate works on a pipeline as it is: a slerp of the latent noises, decoded. Its ends
    are `sample`'s images of the same seeds (the empty prompt, the same spacing)."""
    _, out = tiny_pipeline
    common = ["--model", str(out), "--steps", "3", "-q"]
    run_cli(edgediff_bin, "interpolate", *common, "--frames", "3", "--seed-a", "4", "--seed-b", "5",
            "--out", str(tmp_path / "i.npy"))
    frames = np.load(tmp_path / "i.npy")
    assert frames.shape == (3, 3, 16, 16)
    for seed, frame in ((4, frames[0]), (5, frames[2])):
        run_cli(edgediff_bin, "sample", *common, "--spacing", "trailing", "-n", "1", "--seed", str(seed),
                "--out", str(tmp_path / f"s{seed}.npy"))
        assert np.array_equal(np.load(tmp_path / f"s{seed}.npy")[0], frame), seed
    assert np.abs(frames[1] - frames[0]).max() > 1e-3


def test_compare_runs_on_a_pipeline_and_judges_images_not_latents(edgediff_bin, tiny_pipeline, tmp_path):
    """compare times samplers on a pipeline as it is (the empty prompt); its samples are decoded
    images, so a reference of image shape is accepted and only an unfit classifier refuses."""
    _, out = tiny_pipeline
    run_cli(edgediff_bin, "compare", "--model", str(out), "--samplers", "ddim,dpm++2m", "--steps", "2",
            "-n", "2", "-q", "--out", str(tmp_path / "cmp"))
    for name in ("ddim-2", "dpm++2m-2"):
        assert np.load(tmp_path / "cmp" / "samples" / f"{name}.npy").shape == (2, 3, 16, 16)
    np.save(tmp_path / "ref.npy", np.zeros((4, 3, 16, 16), np.float32))
    proc = run_cli(edgediff_bin, "compare", "--model", str(out), "--samplers", "ddim", "--steps", "2", "-n", "2",
                   "--reference", str(tmp_path / "ref.npy"), "--classifier",
                   str(ROOT / "models" / "mnist-classifier.onnx"), "--out", str(tmp_path / "judged"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "takes images [1, 28, 28]; these are [3, 16, 16]" in proc.stderr


def test_latents_out_keeps_the_final_latents_and_a_pixel_model_refuses_it(edgediff_bin, tiny_pipeline,
                                                                          tmp_path):
    """--latents-out writes the latents the VAE decodes, [n, C, h, w] float32; decoding itself is
    what the parity tests check. A pixel model has no latents: refused before any output."""
    _, out = tiny_pipeline
    run_cli(edgediff_bin, "sample", "--model", str(out), "--prompt", PROMPT, "-n", "3", "--steps", "2",
            "--out", str(tmp_path / "img.npy"), "--latents-out", str(tmp_path / "lat.npy"), "-q")
    lat = np.load(tmp_path / "lat.npy")
    assert lat.shape == (3, 4, 8, 8) and lat.dtype == np.float32
    assert np.isfinite(lat).all() and np.load(tmp_path / "img.npy").shape == (3, 3, 16, 16)
    proc = run_cli(edgediff_bin, "sample", "--model", str(ROOT / "models" / "mnist-ddpm.onnx"), "-n", "1",
                   "--steps", "2", "--out", str(tmp_path / "px.npy"), "--latents-out",
                   str(tmp_path / "px-lat.npy"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--latents-out applies to text-to-image pipelines" in proc.stderr
    assert not (tmp_path / "px.npy").exists() and not (tmp_path / "px-lat.npy").exists()


def test_the_shipped_model_follows_its_prompts(edgediff_bin, tmp_path):
    # models/mnist-t2i's card: 99.9% of 2,000 samples (100 per prompt) are the asked digit. Here
    # 5 per digit with `the number K` through --prompts (sample i takes line i mod 10), the
    # card's sampler and steps; 0.9 leaves room for 5 misses in 50 where the card saw 1 in 2,000.
    sys.path.insert(0, str(ROOT / "exporter" / "src"))
    from edgediff_export.judge import judge

    (tmp_path / "p.txt").write_text("".join(f"the number {d}\n" for d in range(10)))
    run_cli(edgediff_bin, "sample", "--model", str(ROOT / "models" / "mnist-t2i"), "--prompts",
            str(tmp_path / "p.txt"), "-n", "50", "--sampler", "ddim", "--steps", "30", "--seed", "1",
            "--out", str(tmp_path / "s.npy"), "-q")
    images = np.load(tmp_path / "s.npy")
    assert images.shape == (50, 1, 32, 32)
    labels = np.array(judge(np.clip(images, -1, 1), ROOT / "models" / "mnist-classifier.onnx",
                            crop=True)["labels"])
    share = float(np.mean(labels == np.arange(50) % 10))
    print(f"shipped model: {share:.2f} of 50 samples are the asked digit")
    assert share >= 0.9


def test_a_prompt_without_a_model_uses_the_shipped_text_model(edgediff_bin, tmp_path):
    out = run_cli(edgediff_bin, "sample", "--prompt", "the number 3", "-n", "2", "--steps", "5",
                  "--out", str(tmp_path / "s.npy"), "-q", "--json")
    report = json.loads(out.stdout)
    assert Path(report["model"]).resolve() == (ROOT / "models" / "mnist-t2i").resolve()
    assert np.load(tmp_path / "s.npy").shape == (2, 1, 32, 32)
    # Without a prompt the default stays the pixel MNIST model.
    out = run_cli(edgediff_bin, "sample", "-n", "1", "--steps", "2", "--out", str(tmp_path / "p.npy"),
                  "-q", "--json")
    assert np.load(tmp_path / "p.npy").shape == (1, 1, 28, 28)
    # inpaint too: a prompt with no model is for the shipped model (its 32x32 images).
    np.save(tmp_path / "img.npy", np.zeros((1, 1, 32, 32), np.float32))
    mask = np.zeros((1, 1, 32, 32), np.float32)
    mask[..., 8:24, 8:24] = 1
    np.save(tmp_path / "mask.npy", mask)
    run_cli(edgediff_bin, "inpaint", "--prompt", "the number 3", "--image", str(tmp_path / "img.npy"),
            "--mask", str(tmp_path / "mask.npy"), "--steps", "5", "-o", str(tmp_path / "i.npy"), "-q")
    assert np.load(tmp_path / "i.npy").shape == (1, 1, 32, 32)
    # EDGEDIFF_TEXT_MODEL names a deployment's own default (here optimum's tiny folder).
    folder = ROOT / "tests" / "data" / "optimum-tiny"
    out = run_cli(edgediff_bin, "sample", "--prompt", "a cat", "-n", "1", "--steps", "2",
                  "--out", str(tmp_path / "e.npy"), "-q", "--json",
                  env={"EDGEDIFF_TEXT_MODEL": str(folder)})
    assert Path(json.loads(out.stdout)["model"]).resolve() == folder.resolve()
    assert np.load(tmp_path / "e.npy").shape == (1, 3, 16, 16)
