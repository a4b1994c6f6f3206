"""k-diffusion-style and DPM-Solver++ samplers from the edgediff CLI against diffusers.

Same exported network, same initial noise (x_T in variance-preserving space; diffusers'
sigma-space schedulers start from x_T / alpha_T, which is `init_noise_sigma` times the same
noise with trailing spacing), same per-step noise. diffusers keeps its sigma tables in float32;
each test swaps in the exact float64 sigma of the same timestep (see exact_sigmas) so that the
comparison is of update rules. Tolerance 1e-4 max abs, as for DDPM/DDIM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from edgediff_export.schedules import alphas_cumprod, betas_for
from test_parity_diffusers import eps_fn, noises, run_edgediff, scheduler_config

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def exact_sigmas(sched, schedule: str) -> None:
    """Replace each float32 sigma = sqrt((1-abar)/abar) by its float64 value."""
    ab = alphas_cumprod(betas_for(schedule))
    table64 = np.sqrt((1 - ab) / ab)
    table32 = table64.astype(np.float32)
    s = sched.sigmas.numpy()
    exact = [0.0 if v == 0 else table64[int(np.argmin(np.abs(table32 - v)))] for v in s]
    sched.sigmas = torch.tensor(exact, dtype=torch.float64)
    if hasattr(sched, "alpha_t"):  # DPM-Solver keeps alpha/sigma tables derived from sigmas
        sched.alpha_t = 1.0 / torch.sqrt(1.0 + sched.sigmas**2)


def unclipped_config(schedule: str) -> dict:
    """scheduler_config without the clip keys, which the sigma-space and multistep schedulers lack."""
    return {k: v for k, v in scheduler_config(schedule, False).items() if not k.startswith("clip")}


def drive_vp(sched, eps, init: np.ndarray, **step_kwargs) -> np.ndarray:
    """Run a variance-preserving diffusers scheduler; step_kwargs(i) gives extra step arguments."""
    x = torch.from_numpy(init).double()
    for i, t in enumerate(sched.timesteps):
        extra = step_kwargs["extra"](i) if "extra" in step_kwargs else {}
        x = sched.step(eps(x, t).double(), t, x, **extra).prev_sample
    return x.numpy()


def run_ours(binary, model, tmp, sampler, steps, init, step_noise, *extra, spacing="trailing"):
    return run_edgediff(binary, model, tmp, sampler, steps, spacing, init, step_noise, *extra)


def sigma_space_reference(sched, eps, init, step_noise, monkeypatch, steps_for_noise) -> np.ndarray:
    """Drive a diffusers sigma-space scheduler; its sample is x / alpha."""
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    state = {"i": 0}
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(step_noise[state["i"]]).double(),
                        raising=False)
    # x_T / alpha_T; equal to init_noise_sigma times the noise for trailing spacing.
    x = torch.from_numpy(init).double() * float(torch.sqrt(sched.sigmas[0] ** 2 + 1))
    for t in sched.timesteps:
        state["i"] = steps_for_noise(sched)
        model_in = sched.scale_model_input(x, t)
        x = sched.step(eps(model_in, t).double(), t, x).prev_sample
    return x.numpy()


CASES = [
    # (our sampler, extra args, diffusers class, kwargs, steps)
    ("ode-euler", [], "EulerDiscreteScheduler", {}, 20),
    ("heun", [], "HeunDiscreteScheduler", {}, 10),
    ("euler-a", [], "EulerAncestralDiscreteScheduler", {}, 25),
    ("lms", [], "LMSDiscreteScheduler", {}, 20),
]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,extra,cls,kwargs,steps", CASES, ids=[c[0] for c in CASES])
def test_sigma_space_samplers_match_diffusers(edgediff_bin, tiny_models, tmp_path, monkeypatch,
                                              schedule, sampler, extra, cls, kwargs, steps):
    # Cosine starts at sigma/alpha = 2e4 at t = T-1 (betas capped at 0.999): an Euler step
    # from there cancels x_T/alpha_T against 2e4 eps, and float32 eps from the network leaves
    # ~1e-3 in the result that Heun's second evaluation amplifies. That is conditioning, not
    # the update rule, so cosine starts from t = 900 (leading spacing) instead.
    spacing = "trailing" if schedule == "linear" else "leading"
    init, step_noise = noises(steps, seed=steps + 7)
    got = run_ours(edgediff_bin, tiny_models[schedule], tmp_path, sampler, steps, init, step_noise,
                   *extra, spacing=spacing)
    sched = getattr(diffusers, cls)(**unclipped_config(schedule),
                                    timestep_spacing=spacing, steps_offset=0, **kwargs)
    sched.set_timesteps(steps)
    exact_sigmas(sched, schedule)
    ref = sigma_space_reference(sched, eps_fn(tiny_models[schedule]), init, step_noise, monkeypatch,
                                lambda s: s.step_index or 0)
    err = float(np.abs(got - ref).max())
    print(f"parity {sampler} {schedule} max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,order,algorithm,steps", [
    ("dpm++2m", 2, "dpmsolver++", 20), ("dpm++2m", 2, "dpmsolver++", 8),
    ("dpm++3m", 3, "dpmsolver++", 20), ("dpm++3m", 3, "dpmsolver++", 10),
    ("dpm++2m-sde", 2, "sde-dpmsolver++", 20),
])
def test_dpm_solver_pp_matches_diffusers(edgediff_bin, tiny_models, tmp_path, schedule, sampler,
                                         order, algorithm, steps):
    init, step_noise = noises(steps, seed=steps + 11)
    got = run_ours(edgediff_bin, tiny_models[schedule], tmp_path, sampler, steps, init, step_noise)
    sched = diffusers.DPMSolverMultistepScheduler(
        **unclipped_config(schedule),
        solver_order=order, algorithm_type=algorithm, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    exact_sigmas(sched, schedule)
    ref = drive_vp(sched, eps_fn(tiny_models[schedule]), init,
                   extra=lambda i: {"variance_noise": torch.from_numpy(step_noise[i]).double()})
    err = float(np.abs(got - ref).max())
    print(f"parity {sampler} {schedule} {steps} steps max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order,steps", [(1, 12), (2, 20), (2, 6), (3, 20), (3, 10)])
def test_unipc_matches_diffusers(edgediff_bin, tiny_models, tmp_path, schedule, order, steps):
    init, step_noise = noises(steps, seed=steps + 13)
    got = run_ours(edgediff_bin, tiny_models[schedule], tmp_path, "unipc", steps, init, step_noise,
                   "--order", str(order))
    sched = diffusers.UniPCMultistepScheduler(
        **unclipped_config(schedule),
        solver_order=order, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    exact_sigmas(sched, schedule)
    err = float(np.abs(got - drive_vp(sched, eps_fn(tiny_models[schedule]), init)).max())
    print(f"parity unipc order {order} {schedule} {steps} steps max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [2, 5, 25])
def test_pndm_plms_matches_diffusers(edgediff_bin, tiny_models, tmp_path, schedule, steps):
    from test_parity_diffusers import in_float64

    init, step_noise = noises(steps, seed=steps + 17)
    np.save(tmp_path / "init.npy", init)
    run_cli(edgediff_bin, "sample", "--model", str(tiny_models[schedule]), "--sampler", "pndm",
            "--steps", str(steps), "--spacing", "leading", "--init-noise", str(tmp_path / "init.npy"),
            "--out", str(tmp_path / "out.npy"), "-q")
    got = np.load(tmp_path / "out.npy")
    sched = in_float64(diffusers.PNDMScheduler(
        **unclipped_config(schedule),
        skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"),
        schedule)
    sched.set_timesteps(steps)
    err = float(np.abs(got - drive_vp(sched, eps_fn(tiny_models[schedule]), init)).max())
    print(f"parity pndm {schedule} {steps} steps max abs difference {err:.2e}")
    assert err <= TOL, f"max abs difference {err:.2e}"
