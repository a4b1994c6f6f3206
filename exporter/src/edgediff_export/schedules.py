"""Discrete noise schedules, defined exactly as the runtime defines them (runtime/src/schedule.rs).

linear, quadratic and sigmoid follow the DDPM reference code (Ho et al. 2020); cosine is the
alpha-bar schedule of Nichol & Dhariwal (2021) with offset s and betas capped at `max_beta`.
"""

from __future__ import annotations

import math

import numpy as np

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
    meta: dict = {"kind": kind, "num_train_timesteps": num_train_timesteps}
    if kind == "cosine":
        meta.update({"s": 0.008, "max_beta": 0.999})
    else:
        meta.update({"beta_start": beta_start, "beta_end": beta_end})
    return meta


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)
