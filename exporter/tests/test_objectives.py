"""Objectives and continuous schedules against closed forms derived independently here.

Everything runs in float64, so the tolerances (1e-10 relative unless stated) only absorb
rounding; finite differences get 1e-6 (central differences with h = 1e-5 have O(h²) error).
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff_export import data
from edgediff_export.objectives import (OBJECTIVES, Levels, check_combination, eps_weight,
                                        per_sample_loss, target, target_weight)
from edgediff_export.schedules import (LevelSampler, alphas_cumprod, betas_for,
                                       continuous_alpha_sigma, continuous_elbo_weight,
                                       continuous_metadata, discrete_elbo_weights)

VP = continuous_metadata("vp")
VE = continuous_metadata("ve")


def vp_levels(t: list[float]) -> Levels:
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = continuous_alpha_sigma(VP, tt)
    return Levels(a, s, continuous_elbo_weight(VP, tt))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return x0, eps, delta


def test_targets_give_back_x0_through_the_runtime_conversions() -> None:
    # The runtime (denoiser.rs) turns each output into x0: eps -> (x - s e)/a, v -> a x - s v,
    # sample -> itself, score -> (x + s² g)/a. A target that is right must give x0 back.
    lv = vp_levels([0.01, 0.3, 0.9])
    x0, eps, _ = batch(3)
    a, s = lv.alpha[:, None, None, None], lv.sigma[:, None, None, None]
    x = a * x0 + s * eps
    back = {"eps": lambda o: (x - s * o) / a, "v": lambda o: a * x - s * o,
            "x0": lambda o: o, "score": lambda o: (x + s * s * o) / a}
    for pred, to_x0 in back.items():
        torch.testing.assert_close(to_x0(target(pred, x0, eps, lv)), x0, rtol=1e-10, atol=1e-10)


def test_score_target_is_the_gradient_of_the_log_kernel() -> None:
    # DSM target: grad_x log N(x; alpha x0, sigma² I), here by autograd of the log density.
    lv = vp_levels([0.05, 0.5])
    x0, eps, _ = batch(2)
    a, s = lv.alpha[:, None, None, None], lv.sigma[:, None, None, None]
    x = (a * x0 + s * eps).requires_grad_()
    logp = (-0.5 * ((x - a * x0) / s) ** 2).sum()
    (grad,) = torch.autograd.grad(logp, x)
    torch.testing.assert_close(target("score", x0, eps, lv), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "simple"])
def test_a_weighting_is_the_same_objective_for_every_target(objective: str) -> None:
    # Perturb an eps prediction by delta at fixed x_t and derive the other targets' outputs
    # from it by their definitions; every weighted loss must equal the eps-target one.
    lv = vp_levels([0.002, 0.1, 0.4, 0.99])
    x0, eps, delta = batch(4, seed=1)
    a, s = lv.alpha[:, None, None, None], lv.sigma[:, None, None, None]
    x = a * x0 + s * eps
    eps_hat = eps + 0.1 * delta
    x0_hat = (x - s * eps_hat) / a
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - s * x0_hat, "score": -eps_hat / s}
    ref = per_sample_loss(objective, "eps", x0, eps, lv, eps_hat, gamma=5.0)
    for pred, out in outputs.items():
        got = per_sample_loss(objective, pred, x0, eps, lv, out, gamma=5.0)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=0.0)


def test_simple_is_the_plain_mse_of_the_target() -> None:
    lv = vp_levels([0.1, 0.7])
    x0, eps, delta = batch(2)
    for pred in ("eps", "v", "x0", "score"):
        out = target(pred, x0, eps, lv) + delta
        torch.testing.assert_close(per_sample_loss("simple", pred, x0, eps, lv, out),
                                   (delta**2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0.0)


def test_min_snr_matches_hang_et_al_per_target() -> None:
    # Hang et al. 2023: min(SNR, gamma) on the x0 error; their eps and v forms are
    # min(SNR, gamma)/SNR and min(SNR, gamma)/(SNR + 1).
    lv = vp_levels([0.05, 0.2, 0.3, 0.6, 0.95])
    snr, gamma = lv.snr(), 5.0
    assert (snr > gamma).any() and (snr < gamma).any()
    cap = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    torch.testing.assert_close(target_weight("min-snr", "x0", lv, gamma), cap, rtol=1e-12, atol=0)
    torch.testing.assert_close(target_weight("min-snr", "v", lv, gamma), cap / (snr + 1),
                               rtol=1e-12, atol=0)
    w_eps = target_weight("min-snr", "eps", lv, gamma)
    assert torch.all(w_eps[snr < gamma] == 1.0)
    torch.testing.assert_close(w_eps[snr >= gamma], gamma / snr[snr >= gamma], rtol=1e-12, atol=0)


def test_seed_weightings_closed_forms() -> None:
    # The seed's sigma is sqrt(1 - alpha_bar); snr with gamma = 1 is SNR/(1+SNR) = alpha_bar.
    lv = vp_levels([0.01, 0.5, 0.9])
    one_minus_abar = 1 - lv.alpha**2
    torch.testing.assert_close(eps_weight("vlb", lv, 1.0), one_minus_abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(eps_weight("sgm", lv, 1.0), one_minus_abar.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(eps_weight("snr", lv, 1.0), lv.alpha**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(eps_weight("snr", lv, 2.0), lv.snr() * lv.alpha**2, rtol=1e-12, atol=0)


def _ddpm_kl_per_unit_error(betas: np.ndarray, t: int) -> float:
    """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / ||eps_hat - eps||² from the posterior's mean and
    variance (Ho et al. 2020 eqs. 6-7) with the model mean built from x0_hat; index 0 is the
    Gaussian decoder with variance beta_0, whose mean at the true eps is x0 itself."""
    ab = alphas_cumprod(betas)
    rng = np.random.default_rng(t)
    x0, eps, delta = rng.normal(size=(3, 16))
    x = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * eps
    eps_hat = eps + 0.01 * delta
    x0_hat = (x - math.sqrt(1 - ab[t]) * eps_hat) / math.sqrt(ab[t])
    if t == 0:
        return float(np.sum((x0_hat - x0) ** 2) / (2 * betas[0]) / np.sum((eps_hat - eps) ** 2))
    c0 = math.sqrt(ab[t - 1]) * betas[t] / (1 - ab[t])
    ct = math.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t])
    var = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    mean_q, mean_p = c0 * x0 + ct * x, c0 * x0_hat + ct * x
    return float(np.sum((mean_q - mean_p) ** 2) / (2 * var) / np.sum((eps_hat - eps) ** 2))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_elbo_weight_is_the_ddpm_kl_per_unit_error(kind: str) -> None:
    betas = betas_for(kind)
    w = discrete_elbo_weights(betas)
    for t in (0, 1, 10, 500, 999):
        assert w[t] == pytest.approx(_ddpm_kl_per_unit_error(betas, t), rel=1e-8), t
    # The seed's "vlb" weight 1 - alpha_bar is not the ELBO's: the ratios across t disagree
    # by far more than rounding (documented in objectives.py; `elbo` is the true weighting).
    abar = alphas_cumprod(betas)
    assert abs((1 - abar[500]) / (1 - abar[10]) - w[500] / w[10]) > 0.5


@pytest.mark.parametrize("spec", [VP, VE], ids=["vp", "ve"])
def test_continuous_elbo_weight_is_half_the_log_snr_slope(spec: dict) -> None:
    h = 1e-5
    for t in (0.01, 0.3, 0.8):
        def log_snr(u: float) -> float:
            a, s = continuous_alpha_sigma(spec, torch.tensor([u], dtype=torch.float64))
            return float(2 * torch.log(a / s))
        slope = (log_snr(t + h) - log_snr(t - h)) / (2 * h)
        w = float(continuous_elbo_weight(spec, torch.tensor([t], dtype=torch.float64)))
        assert w == pytest.approx(-0.5 * slope, rel=1e-6)


def test_vp_alpha_sigma_closed_form() -> None:
    # alpha(t) = exp(-integral_0^t beta(s) ds / 2) with beta linear from 0.1 to 20, by quadrature.
    for t in (0.001, 0.25, 1.0):
        s = np.linspace(0, t, 20001)
        integral = np.trapezoid(0.1 + s * (20 - 0.1), s)
        a, sig = continuous_alpha_sigma(VP, torch.tensor([t], dtype=torch.float64))
        assert float(a) == pytest.approx(math.exp(-0.5 * integral), rel=1e-8)
        assert float(a) ** 2 + float(sig) ** 2 == pytest.approx(1.0, rel=1e-12)


def test_continuous_draws_cover_the_runtime_range() -> None:
    sampler = LevelSampler(VE)
    t = sampler.draw(4096, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    lv = sampler.levels(t)
    assert torch.all(lv.alpha == 1.0) and float(lv.sigma.max()) <= 50.0


@pytest.mark.parametrize("objective,prediction,schedule,needle", [
    ("dsm", "score", "linear", "use --schedule vp or ve"),
    ("simple", "score", "cosine", "needs a continuous schedule"),
    ("simple", "v", "ve", "variance-preserving"),
    ("huber", "eps", "linear", "unknown objective"),
])
def test_ill_defined_combinations_are_refused(objective, prediction, schedule, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        check_combination(objective, prediction, schedule)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=5)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("EDGEDIFF_FASHION_MNIST", str(tmp_path))
    x, y = data.load_dataset("fashion-mnist", "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], images / 128.0 - 1.0)
    np.testing.assert_array_equal(y, labels)
    monkeypatch.setenv("EDGEDIFF_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", "train")
