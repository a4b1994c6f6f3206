"""The consistency samplers `lcm` and `tcd` (issue 19) against diffusers' LCMScheduler and
TCDScheduler, from the same initial latents and the same per-step noise (`--step-noise`,
injected into diffusers by replacing the schedulers' randn_tensor).

Three levels:
- single-file models: a tiny random UNet2DModel saved with an LCMScheduler or TCDScheduler
  config and imported by `edgediff-export diffusers`, for each prediction type (epsilon, v,
  sample), against the scheduler's own step loop on the PyTorch U-Net; the runtime runs with
  no sampler flag, on the defaults the import writes (lcm or tcd, 4 steps, the lcm grid); and
  a model taking `timestep_cond`, against diffusers' guidance-scale embedding;
- a text-to-image folder: the tiny pipeline of tests/sd_tiny.py with a U-Net that takes the
  guidance-scale embedding (time_cond_proj_dim), exported by `edgediff-export diffusers`,
  against diffusers' LatentConsistencyModelPipeline (lcm) and StableDiffusionPipeline with
  TCDScheduler at gamma 0.3 (tcd), 4 steps, one U-Net call per step, no classifier-free guidance;
- optimum's own export of such a folder (tests/data/optimum-tiny-lcm, committed with the
  latents and images optimum's and diffusers' pipelines made), run with no flag but the prompt.
lcm on a U-Net without the embedding (classifier-free guidance) is in tests/test_text_to_image.py.

Tolerance 1e-4 max abs, relative to the largest value where the values pass 1 (the random
U-Nets' x0 reach ~50 at the first step, where float32 rounding is relative): the ONNX graphs
differ from PyTorch by ~1e-6 per call, and diffusers keeps alpha-bar in float32 where the
runtime uses float64. A wrong grid, boundary condition, intermediate level, prediction type or
guidance embedding moves the results by 1e-2 or more (the last test shows the embedding's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sd_tiny
from conftest import ROOT, run_cli
from test_diffusers_import import export_cli, tiny_unet

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_lcm, scheduling_tcd  # noqa: E402

TOL = 1e-4
STEPS, N = 4, 2
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
MODULES = {"lcm": scheduling_lcm, "tcd": scheduling_tcd}
SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}


def noises(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, *shape)).astype(np.float32),
            rng.standard_normal((STEPS, N, *shape)).astype(np.float32))


def inject_step_noise(monkeypatch, sampler: str, step_noise: np.ndarray) -> list[int]:
    """The scheduler's k-th draw is step_noise[k]; returns the list the draws are counted in."""
    drawn: list[int] = []

    def draw(shape, **kw):
        drawn.append(len(drawn))
        return torch.from_numpy(step_noise[drawn[-1]].copy())
    monkeypatch.setattr(MODULES[sampler], "randn_tensor", draw)
    return drawn


def run_edgediff(binary: Path, model: Path, tmp: Path, init: np.ndarray, step_noise: np.ndarray,
                 *extra: str, latents: bool = False) -> tuple[np.ndarray, dict]:
    """The runtime's samples (with `latents`, a pipeline's final latents) and its --json
    summary."""
    np.save(tmp / "init.npy", init)
    np.save(tmp / "steps.npy", step_noise)
    keep = ["--latents-out", str(tmp / "latents.npy")] if latents else []
    proc = run_cli(binary, "sample", "--model", str(model), "--init-noise", str(tmp / "init.npy"),
                   "--step-noise", str(tmp / "steps.npy"), "-o", str(tmp / "out.npy"), "-q", "--json",
                   *keep, *extra)
    return np.load(tmp / ("latents.npy" if latents else "out.npy")), json.loads(proc.stdout)


def max_error(got: np.ndarray, ref: np.ndarray, what: str) -> float:
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    print(f"{what}: max abs difference {err:.2e} on values up to {scale:.1f}")
    return err / scale


# ---- single-file models ----------------------------------------------------------------------

PIXEL = [(s, p) for s in ("lcm", "tcd") for p in ("epsilon", "v_prediction", "sample")]


@pytest.mark.parametrize("sampler,prediction", PIXEL, ids=[f"{s}-{p}" for s, p in PIXEL])
def test_pixel_model_matches_the_scheduler_on_its_own_defaults(edgediff_bin, tmp_path, monkeypatch,
                                                               sampler, prediction):
    torch.set_num_threads(1)
    unet = tiny_unet(7)
    scheduler = getattr(diffusers, SCHEDULERS[sampler])(**BETAS, prediction_type=prediction)
    unet.save_pretrained(tmp_path / "src" / "unet")
    scheduler.save_pretrained(tmp_path / "src" / "scheduler")
    result = export_cli("--unet", tmp_path / "src" / "unet", "--out", tmp_path / "m.onnx")
    assert result["hints"][0].startswith(f"{SCHEDULERS[sampler]}: its steps are on the grid of 50")

    init, step_noise = noises(3, (1, 8, 8))
    # No --sampler, --steps or --spacing: the metadata's (sampler, 4, lcm), tcd's gamma 0.3.
    got, summary = run_edgediff(edgediff_bin, tmp_path / "m.onnx", tmp_path, init, step_noise)
    assert (summary["sampler"], summary["steps"], summary["network_calls"]) == (sampler, STEPS, STEPS)

    drawn = inject_step_noise(monkeypatch, sampler, step_noise)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    x = torch.from_numpy(init)
    step_kw = {"eta": 0.3} if sampler == "tcd" else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    assert drawn == [0, 1, 2], "noise between the steps, none after the last"
    assert max_error(got, x.numpy(), f"{sampler} {prediction} vs {SCHEDULERS[sampler]}") <= TOL


def test_tcd_gamma_0_is_deterministic_and_matches_eta_0(edgediff_bin, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    unet = tiny_unet(8)
    scheduler = diffusers.TCDScheduler(**BETAS)
    unet.save_pretrained(tmp_path / "src" / "unet")
    scheduler.save_pretrained(tmp_path / "src" / "scheduler")
    export_cli("--unet", tmp_path / "src" / "unet", "--out", tmp_path / "m.onnx")
    init, step_noise = noises(4, (1, 8, 8))
    got, _ = run_edgediff(edgediff_bin, tmp_path / "m.onnx", tmp_path, init, step_noise,
                          "--gamma", "0")
    # Other step noise changes nothing at gamma 0.
    again, _ = run_edgediff(edgediff_bin, tmp_path / "m.onnx", tmp_path, init, step_noise * -1,
                            "--gamma", "0")
    assert np.array_equal(got, again)
    drawn = inject_step_noise(monkeypatch, "tcd", step_noise)
    scheduler.set_timesteps(STEPS)
    x = torch.from_numpy(init)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert drawn == []
    assert max_error(got, x.numpy(), "tcd gamma 0 vs TCDScheduler eta 0") <= TOL


def test_a_pixel_model_gets_the_guidance_embedding_of_its_scale(edgediff_bin, tmp_path):
    """A single-file model taking `timestep_cond` [N, 64] gets diffusers'
    get_guidance_scale_embedding(w - 1): the network here returns it as its x0 (8 x 8), which
    lcm's last step returns to within c_skip |x| < 1e-7. --guidance feeds it (1, no guidance,
    without), on an unconditional model, in one call per step."""
    import onnx
    from edgediff_export.metadata import make_metadata, write_metadata
    from edgediff_export.schedules import schedule_metadata

    class EchoCond(torch.nn.Module):
        def forward(self, sample, timestep, timestep_cond):
            return timestep_cond.reshape(-1, 1, 8, 8) + 0 * sample + 0 * timestep.float()[:, None, None, None]
    path = tmp_path / "m.onnx"
    torch.onnx.export(EchoCond(), (torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.randn(2, 64)), str(path),
                      input_names=["sample", "timestep", "timestep_cond"], output_names=["out"],
                      dynamic_axes={k: {0: "N"} for k in ("sample", "timestep", "timestep_cond", "out")},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    write_metadata(proto, make_metadata(name="echo", description="", prediction="sample", time_input="index",
                                        schedule=schedule_metadata("linear"), sample_shape=[1, 8, 8],
                                        sampling={"sampler": "lcm", "steps": 2}))
    onnx.save(proto, str(path))
    embed = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    for w in (None, 1.5, 3.0):
        flags = [] if w is None else ["--guidance", str(w)]
        proc = run_cli(edgediff_bin, "sample", "--model", str(path), "-n", "2", "-o", str(tmp_path / "x.npy"),
                       "-q", "--json", *flags)
        assert json.loads(proc.stdout)["network_calls"] == 2
        ref = embed(None, torch.tensor([(w or 1.0) - 1.0] * 2), embedding_dim=64).numpy().reshape(2, 1, 8, 8)
        # Both sides compute the arguments (up to 1000 (w - 1) radians) in float32 in the same
        # order; measured 1.5e-7 at w 3. Computed otherwise they would part by float32 ulps
        # there (1.2e-4 at 2000 radians).
        assert max_error(np.load(tmp_path / "x.npy"), ref, f"embedding of guidance {w}") <= TOL


# ---- a text-to-image folder with the guidance-scale embedding ----------------------------------

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def lcm_pipeline(tmp_path_factory) -> tuple[Path, Path]:
    """(the diffusers LatentConsistencyModelPipeline folder, our export of it)."""
    d = tmp_path_factory.mktemp("lcm")
    src = sd_tiny.build(d / "tiny-lcm", time_cond_proj_dim=32)
    out = d / "tiny-lcm-edgediff"
    from test_text_to_image import export
    export(src, out)
    return src, out


def diffusers_latents(src: Path, sampler: str, latents: np.ndarray, guidance: float) -> np.ndarray:
    """The pipeline's final latents (output_type "latent": what its VAE would decode)."""
    kw = {}
    if sampler == "lcm":
        pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
            str(src), safety_checker=None, requires_safety_checker=False)
    else:
        # TCD runs in StableDiffusionPipeline, which for a U-Net with time_cond_proj_dim feeds
        # the embedding and skips classifier-free guidance as LCM's pipeline does.
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(src), safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = diffusers.TCDScheduler.from_config(pipe.scheduler.config)
        kw["eta"] = 0.3
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, guidance_scale=guidance, num_inference_steps=STEPS,
                    latents=torch.from_numpy(latents), num_images_per_prompt=N,
                    output_type="latent", **kw).images.numpy()


def test_the_export_carries_the_embedding_and_the_defaults(edgediff_bin, lcm_pipeline):
    import onnx
    _, out = lcm_pipeline
    graph = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph
    cond = [i for i in graph.input if i.name == "timestep_cond"]
    assert len(cond) == 1 and cond[0].type.tensor_type.shape.dim[1].dim_value == 32
    m = json.loads((out / "edgediff.json").read_text())
    assert m["sampling"] == {"sampler": "lcm", "steps": 4} and m["guidance"] == 8.5
    assert m["original_inference_steps"] == 50
    info = run_cli(edgediff_bin, "info", "--model", str(out)).stdout
    assert "timestep_cond, width 32" in info and "sampler lcm, 4 steps (the model's)" in info


@pytest.mark.parametrize("sampler,guidance", [("lcm", 8.5), ("tcd", 3.0)])
def test_pipeline_matches_diffusers(edgediff_bin, lcm_pipeline, tmp_path, monkeypatch, sampler,
                                    guidance):
    torch.set_num_threads(1)
    src, out = lcm_pipeline
    init, step_noise = noises(5, (4, 8, 8))
    # lcm on the folder's defaults: its sampler and 4 steps, LCM's default guidance 8.5.
    extra = [] if sampler == "lcm" else ["--sampler", "tcd", "--guidance", str(guidance)]
    got, summary = run_edgediff(edgediff_bin, out, tmp_path, init, step_noise, "--prompt", PROMPT,
                                *extra, latents=True)
    # One U-Net call per step: the guidance is the embedding, not a doubled batch.
    assert (summary["sampler"], summary["steps"], summary["network_calls"]) == (sampler, STEPS, STEPS)
    drawn = inject_step_noise(monkeypatch, sampler, step_noise)
    ref = diffusers_latents(src, sampler, init, guidance)
    assert drawn == [0, 1, 2]
    assert max_error(got, ref, f"{sampler} pipeline vs diffusers, guidance {guidance}") <= TOL
    # The embedding is what carries the scale: another scale moves the latents far past TOL.
    other, _ = run_edgediff(edgediff_bin, out, tmp_path, init, step_noise, "--prompt", PROMPT,
                            "--sampler", sampler, "--guidance", "2", latents=True)
    assert max_error(other, ref, "the same at guidance 2") > 10 * TOL


# ---- an LCM folder as optimum writes it ------------------------------------------------------

OPTIMUM = ROOT / "tests" / "data" / "optimum-tiny-lcm"
OPTIMUM_REF = ROOT / "tests" / "data" / "optimum-tiny-lcm-reference"


def test_an_optimum_lcm_folder_runs_on_its_derived_defaults(edgediff_bin, tmp_path):
    """tests/data/optimum-tiny-lcm is optimum's own export (tools/make_optimum_fixture.py
    --lcm): no edgediff.json, a scalar float timestep, `timestep_cond` [batch, 32]. With no
    sampler, steps or guidance flag the runtime takes what the configs say (LCMScheduler: lcm
    at 4 steps; LatentConsistencyModelPipeline: guidance 8.5) and gives the latents and images
    of optimum's ORTLatentConsistencyModelPipeline and diffusers' PyTorch pipeline."""
    record = json.loads((OPTIMUM_REF / "reference.json").read_text())
    assert not (OPTIMUM / "edgediff.json").exists()
    init, step_noise = np.load(OPTIMUM_REF / "init.npy"), np.load(OPTIMUM_REF / "steps.npy")
    latents, summary = run_edgediff(edgediff_bin, OPTIMUM, tmp_path, init, step_noise,
                                    "--prompt", record["prompt"], latents=True)
    assert (summary["sampler"], summary["steps"], summary["network_calls"]) == ("lcm", 4, 4)
    images = np.load(tmp_path / "out.npy")
    for who in ("optimum", "diffusers"):
        ref = np.load(OPTIMUM_REF / f"{who}-latents.npy")
        assert max_error(latents, ref, f"optimum LCM folder latents vs {who}") <= TOL
        ref = np.load(OPTIMUM_REF / f"{who}-images.npy")
        assert max_error(images, ref, f"optimum LCM folder images vs {who}") <= TOL
    assert float(np.mean(np.abs(ref) < 0.999)) > 0.5, "the images saturate: the comparison would prove little"
