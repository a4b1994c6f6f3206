"""DDPM and DDIM trajectories from the edgediff CLI against diffusers' schedulers.

Same exported network (run by onnxruntime on the Python side), same initial noise, same
per-step noise; diffusers is the independent reference implementation of the update rules.
Tolerance 1e-4 max abs over the final samples: both sides compute in float32, and float32
rounding through up to 1000 steps stays around 1e-6..1e-5 here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli
from edgediff_export.schedules import betas_for

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
N = 3
BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2",
                 "quadratic": "scaled_linear", "sigmoid": "sigmoid"}


def eps_fn(model: Path):
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        out = sess.run(None, {"sample": x.numpy().astype(np.float32),
                              "timestep": np.full((x.shape[0],), int(t), dtype=np.int64)})[0]
        return torch.from_numpy(out)
    return eps


def noises(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, 1, 8, 8)).astype(np.float32),
            rng.standard_normal((steps, N, 1, 8, 8)).astype(np.float32))


def run_edgediff(binary: Path, model: Path, tmp: Path, sampler: str, steps: int, spacing: str,
                 init: np.ndarray, step_noise: np.ndarray, *extra: str) -> np.ndarray:
    np.save(tmp / "init.npy", init)
    np.save(tmp / "steps.npy", step_noise)
    out = tmp / "out.npy"
    run_cli(binary, "sample", "--model", str(model), "--sampler", sampler, "--steps", str(steps),
            "--spacing", spacing, "--init-noise", str(tmp / "init.npy"),
            "--step-noise", str(tmp / "steps.npy"), "--out", str(out), "-q", *extra)
    return np.load(out)


def in_float64(sched, schedule: str):
    """Give diffusers' scheduler float64 tables of the same betas.

    diffusers keeps betas and alphas_cumprod in float32; near t = T on the cosine and sigmoid
    schedules alpha is ~1e-2..1e-4, so x0 = (x - sigma eps) / alpha turns that rounding into
    1e-4 differences that say nothing about the update rule. The betas are the exporter's
    float64 ones, which test_schedules_match_diffusers checks against diffusers' own formulas.
    """
    sched.betas = torch.from_numpy(betas_for(schedule))
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("schedule", list(BETA_SCHEDULE))
def test_schedules_match_diffusers(schedule):
    # diffusers computes in float32: agreement to float32 rounding of betas <= 1 is ~6e-8.
    ours = betas_for(schedule)
    theirs = diffusers.DDPMScheduler(**scheduler_config(schedule, False)).betas.double().numpy()
    assert np.abs(ours - theirs).max() < 1e-7


def scheduler_config(schedule: str, clip: bool) -> dict:
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                beta_schedule=BETA_SCHEDULE[schedule], clip_sample=clip, clip_sample_range=1.0)


@pytest.mark.parametrize("schedule", list(BETA_SCHEDULE))
@pytest.mark.parametrize("spacing,steps,eta,clip", [
    ("leading", 50, 0.0, False), ("trailing", 20, 0.0, False), ("trailing", 25, 0.5, False),
    ("leading", 10, 1.0, True),
])
def test_ddim_matches_diffusers(edgediff_bin, tiny_models, tmp_path, schedule, spacing, steps, eta, clip):
    init, step_noise = noises(steps, seed=steps)
    extra = ["--eta", str(eta)] + (["--clip-x0"] if clip else [])
    got = run_edgediff(edgediff_bin, tiny_models[schedule], tmp_path, "ddim", steps, spacing,
                       init, step_noise, *extra)

    # The linear config only builds the object (DDIMScheduler has no sigmoid); in_float64 sets the betas.
    sched = in_float64(diffusers.DDIMScheduler(**scheduler_config("linear", clip), set_alpha_to_one=True,
                                               steps_offset=0, timestep_spacing=spacing), schedule)
    sched.set_timesteps(steps)
    eps = eps_fn(tiny_models[schedule])
    x = torch.from_numpy(init).double()
    for i, t in enumerate(sched.timesteps):
        # use_clipped_model_output: with clipping, eps is re-derived from the clipped x0 (as the
        # runtime does, which keeps DDIM at eta = 1 equal to DDPM).
        x = sched.step(eps(x, t).double(), t, x, eta=eta, use_clipped_model_output=True,
                       variance_noise=torch.from_numpy(step_noise[i]).double()).prev_sample
    err = float(np.abs(got - x.numpy()).max())
    print(f"parity max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


@pytest.mark.parametrize("ratio,max_value", [(0.9, 1.5), (0.995, 3.0)])
def test_dynamic_thresholding_matches_diffusers(edgediff_bin, tiny_models, tmp_path, ratio, max_value):
    # Imagen's dynamic thresholding as diffusers implements it (per-sample quantile of |x0|,
    # clamped to [1, sample_max_value]); the tiny random network's x0 leaves [-1, 1] widely,
    # so the threshold is active at most steps.
    steps = 20
    init, step_noise = noises(steps, seed=7)
    got = run_edgediff(edgediff_bin, tiny_models["linear"], tmp_path, "ddim", steps, "trailing",
                       init, step_noise, "--dynamic-threshold", str(ratio),
                       "--threshold-max", str(max_value))
    eps = eps_fn(tiny_models["linear"])

    def reference(thresholding: bool) -> np.ndarray:
        sched = in_float64(diffusers.DDIMScheduler(
            **scheduler_config("linear", False), set_alpha_to_one=True, steps_offset=0,
            timestep_spacing="trailing", thresholding=thresholding,
            dynamic_thresholding_ratio=ratio, sample_max_value=max_value), "linear")
        sched.set_timesteps(steps)
        x = torch.from_numpy(init).double()
        for t in sched.timesteps:
            x = sched.step(eps(x, t).double(), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        return x.numpy()

    err = float(np.abs(got - reference(True)).max())
    effect = float(np.abs(got - reference(False)).max())
    print(f"parity max abs difference {err:.2e} (thresholding changed the result by {effect:.2e})")
    assert err <= TOL, f"max abs difference {err:.2e}"
    assert effect > 100 * TOL, "the threshold never acted; the test would prove nothing"


@pytest.mark.parametrize("schedule,steps,spacing,clip", [
    ("linear", 1000, "leading", False), ("cosine", 100, "leading", False),
    ("linear", 50, "trailing", True), ("sigmoid", 40, "leading", False),
])
def test_ddpm_matches_diffusers(edgediff_bin, tiny_models, tmp_path, monkeypatch, schedule, steps,
                                spacing, clip):
    init, step_noise = noises(steps, seed=1000 + steps)
    got = run_edgediff(edgediff_bin, tiny_models[schedule], tmp_path, "ddpm", steps, spacing,
                       init, step_noise, *(["--clip-x0"] if clip else []))

    sched = in_float64(diffusers.DDPMScheduler(**scheduler_config(schedule, clip),
                                               variance_type="fixed_small", timestep_spacing=spacing),
                       schedule)
    sched.set_timesteps(steps)
    # diffusers draws the posterior noise itself; hand it step i's noise instead.
    step = {"i": 0}
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(step_noise[step["i"]]).double())
    eps = eps_fn(tiny_models[schedule])
    x = torch.from_numpy(init).double()
    for i, t in enumerate(sched.timesteps):
        step["i"] = i
        x = sched.step(eps(x, t).double(), t, x).prev_sample
    err = float(np.abs(got - x.numpy()).max())
    print(f"parity max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


def test_classifier_free_guidance_matches_a_direct_reference(edgediff_bin, tmp_path):
    # A random class-conditional U-Net; the reference evaluates the class and the null label
    # separately, mixes eps_null + w (eps_class - eps_null) and steps diffusers' DDIM with it.
    import subprocess
    import sys
    model = tmp_path / "cond.onnx"
    subprocess.run([sys.executable, "-m", "edgediff_export.export", "random", "--out", str(model),
                    "--num-classes", "3"], check=True, capture_output=True)
    steps, w, k = 10, 2.5, 1
    init, step_noise = noises(steps, seed=3)
    got = run_edgediff(edgediff_bin, model, tmp_path, "ddim", steps, "trailing", init, step_noise,
                       "--class", str(k), "--guidance", str(w))
    plain = run_edgediff(edgediff_bin, model, tmp_path, "ddim", steps, "trailing", init, step_noise,
                         "--class", str(k))
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def eps(x, t, label):
        return torch.from_numpy(sess.run(None, {
            "sample": x.numpy().astype(np.float32), "timestep": np.full((N,), int(t), np.int64),
            "class_labels": np.full((N,), label, np.int64)})[0]).double()

    sched = in_float64(diffusers.DDIMScheduler(**scheduler_config("linear", False), set_alpha_to_one=True,
                                               steps_offset=0, timestep_spacing="trailing"), "linear")
    sched.set_timesteps(steps)
    x = torch.from_numpy(init).double()
    for t in sched.timesteps:
        e_u, e_c = eps(x, t, 3), eps(x, t, k)  # label 3 is the null label of a 3-class model
        x = sched.step(e_u + w * (e_c - e_u), t, x, eta=0.0).prev_sample
    err = float(np.abs(got - x.numpy()).max())
    scale = max(1.0, float(np.abs(x.numpy()).max()))
    effect = float(np.abs(got - plain).max())
    print(f"guidance parity max abs difference {err:.2e} on samples up to {scale:.0f} "
          f"(guidance moved them by {effect:.2e})")
    # An unanchored random network drives the samples far out of range (|x| ~ 1e2), where
    # float32 rounding is ~1e-5 absolute: the tolerance is 1e-4 relative to the largest value.
    assert err <= TOL * scale
    assert effect > 100 * TOL * scale
