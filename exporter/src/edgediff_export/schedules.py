"""Noise schedules, defined exactly as the runtime defines them (runtime/src/schedule.rs).

Discrete: linear, quadratic and sigmoid follow the DDPM reference code (Ho et al. 2020); cosine
is the alpha-bar schedule of Nichol & Dhariwal (2021) with offset s and betas capped at
`max_beta`. Continuous (t in [0, 1]): the VP and VE SDEs of Song et al. (2021).
"""

from __future__ import annotations

import math

import numpy as np
import torch

KINDS = ("linear", "cosine", "quadratic", "sigmoid")


def betas_for(kind: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
              beta_end: float = 0.02, cosine_s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    T = num_train_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        return s * (beta_end - beta_start) + beta_start
    if kind == "cosine":
        f = lambda u: math.cos((u + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)])
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")


def schedule_metadata(kind: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> dict:
    if kind in CONTINUOUS_KINDS:
        return continuous_metadata(kind)
    meta: dict = {"kind": kind, "num_train_timesteps": num_train_timesteps}
    if kind == "cosine":
        meta.update({"s": 0.008, "max_beta": 0.999})
    else:
        meta.update({"beta_start": beta_start, "beta_end": beta_end})
    return meta


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


# --- Continuous schedules (Song et al. 2021, "Score-Based Generative Modeling through SDEs") ---
# The parameters are the runtime's (`edgediff schedule --kind vp|ve`, runtime/src/schedule.rs).

CONTINUOUS_KINDS = ("vp", "ve")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.01, 50.0
# The smallest time the runtime's continuous samplers visit (spacing::CONTINUOUS_T_MIN); training
# draws t ~ U[T_MIN, 1] so the network learns exactly the range it will be asked about.
T_MIN = 1e-3


def continuous_metadata(kind: str) -> dict:
    """The metadata record of a continuous schedule; the runtime refuses any other field."""
    if kind == "vp":
        return {"kind": "vp", "beta_min": VP_BETA_MIN, "beta_max": VP_BETA_MAX}
    if kind == "ve":
        return {"kind": "ve", "sigma_min": VE_SIGMA_MIN, "sigma_max": VE_SIGMA_MAX}
    raise ValueError(f"unknown continuous schedule {kind!r}; expected one of {CONTINUOUS_KINDS}")


def continuous_alpha_sigma(spec: dict, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha(t), sigma(t) of x_t = alpha x0 + sigma eps, as the runtime's `Schedule::level`.

    VP: log alpha = -(beta_max - beta_min) t²/4 - beta_min t/2 (the mean scale of the VP
    SDE's transition kernel, Song et al. 2021 appendix B), sigma² = 1 - alpha². VE: alpha = 1,
    sigma = sigma_min (sigma_max/sigma_min)^t. Written with torch ops only so it exports to ONNX.
    """
    if spec["kind"] == "vp":
        log_alpha = -0.25 * t * t * (spec["beta_max"] - spec["beta_min"]) - 0.5 * t * spec["beta_min"]
        # sigma² = 1 - alpha² = -expm1(-I) with I = -2 log alpha, written as tanh(I/2)(1 + e^-I)
        # (an exact identity) because ONNX has no expm1 and 1 - exp(-I) loses digits at small t.
        integral = -2.0 * log_alpha
        return torch.exp(log_alpha), torch.sqrt(torch.tanh(0.5 * integral) * (1.0 + torch.exp(-integral)))
    if spec["kind"] == "ve":
        smin, smax = spec["sigma_min"], spec["sigma_max"]
        return torch.ones_like(t), smin * torch.exp(t * math.log(smax / smin))
    raise ValueError(f"{spec['kind']!r} is not a continuous schedule")


def continuous_elbo_weight(spec: dict, t: torch.Tensor) -> torch.Tensor:
    """-1/2 d log SNR / dt: the ELBO's weight on ||eps - eps_hat||² at time t (Kingma et al.
    2021, VDM, continuous-time diffusion loss). VP: beta(t) / (2 sigma²(t)); VE: log(sigma_max / sigma_min)."""
    if spec["kind"] == "vp":
        _, sigma = continuous_alpha_sigma(spec, t)
        beta = spec["beta_min"] + t * (spec["beta_max"] - spec["beta_min"])
        return 0.5 * beta / sigma**2
    if spec["kind"] == "ve":
        return torch.full_like(t, math.log(spec["sigma_max"] / spec["sigma_min"]))
    raise ValueError(f"{spec['kind']!r} is not a continuous schedule")


def discrete_elbo_weights(betas: np.ndarray) -> np.ndarray:
    """The weight of ||eps - eps_hat||² in the DDPM ELBO term of each index (Ho et al. 2020
    eq. 12 with the posterior variance beta~_t): beta_t / (2 (1 - beta_t) (1 - alpha_bar_{t-1})).
    Index 0 is the decoder term; with variance beta_0 its weight is 1 / (2 (1 - beta_0))."""
    ab = alphas_cumprod(betas)
    # 1 - alpha_bar_{t-1}; at index 0 the decoder's variance beta_0 takes the posterior's place.
    one_minus_prev = np.concatenate([[betas[0]], 1.0 - ab[:-1]])
    return betas / (2.0 * (1.0 - betas) * one_minus_prev)


class LevelSampler:
    """Draws training noise levels for a schedule record and gives the network's time input.

    Discrete: t ~ U{0..T-1} (the index is the time input). Continuous: t ~ U[T_MIN, 1].
    """

    def __init__(self, schedule: dict, device: torch.device | str = "cpu") -> None:
        self.schedule = schedule
        self.continuous = schedule["kind"] in CONTINUOUS_KINDS
        if not self.continuous:
            params = {k: schedule[k] for k in ("beta_start", "beta_end") if k in schedule}
            betas = betas_for(schedule["kind"], schedule["num_train_timesteps"], **params)
            self.abar = torch.from_numpy(alphas_cumprod(betas)).float().to(device)
            self.elbo = torch.from_numpy(discrete_elbo_weights(betas)).float().to(device)

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n time inputs from the CPU generator g (so draws do not depend on the device)."""
        if self.continuous:
            return T_MIN + (1.0 - T_MIN) * torch.rand(n, generator=g)
        return torch.randint(0, len(self.abar), (n,), generator=g)

    def levels(self, t: torch.Tensor) -> "Levels":
        from .objectives import Levels

        if self.continuous:
            t64 = t.to(torch.float64)
            alpha, sigma = continuous_alpha_sigma(self.schedule, t64)
            elbo = continuous_elbo_weight(self.schedule, t64)
            return Levels(alpha.float(), sigma.float(), elbo.float())
        ab = self.abar[t]
        return Levels(ab.sqrt(), (1 - ab).sqrt(), self.elbo[t])

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() if self.continuous else t
