"""A PyTorch reference of the discrete ELBO (Ho et al. 2020, eq. 5), written apart from the
runtime's Rust code (runtime/src/elbo.rs) to check it: the posterior mean and variance of
q(x_{t-1} | x_t, x_0) by Ho's eqs. 6-7, the model mean in Ho's eps form (eq. 11), the KLs from
`torch.distributions`, the decoder's bin masses (eq. 13) from `torch.special.log_ndtr`.
Everything but the network runs in float64; x_t is rounded to float32 for the network, as the
runtime does. Indices j = 0..T-1 are Ho's t = j + 1. Results are in nats per image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_eps(net: torch.nn.Module) -> EpsFn:
    """eps_hat(x_t float32, j int64) as float64, for an epsilon-predicting U-Net."""
    net.eval()

    def eps(xt: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(xt.float(), j).double()
    return eps


def onnx_eps(path) -> EpsFn:
    """eps_hat(x_t float32, j int64) as float64 from an exported epsilon-predicting model with
    an index time input, run by onnxruntime on the CPU (j passed in the model's timestep dtype)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t_type = next(i.type for i in sess.get_inputs() if i.name == "timestep")
    t_dtype = np.int64 if t_type == "tensor(int64)" else np.float32

    def eps(xt: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        feed = {"sample": xt.float().numpy(), "timestep": j.numpy().astype(t_dtype)}
        return torch.from_numpy(sess.run(None, feed)[0]).double()
    return eps


class Schedule:
    def __init__(self, betas: np.ndarray, variance: str = "small") -> None:
        self.betas = torch.from_numpy(np.asarray(betas, np.float64))
        self.ab = torch.cumprod(1.0 - self.betas, 0)
        self.ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.ab[:-1]])
        self.T = len(betas)
        # beta-tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) (Ho eq. 7).
        self.post_var = self.betas * (1.0 - self.ab_prev) / (1.0 - self.ab)
        self.model_var = self.post_var if variance == "small" else self.betas.clone()
        # The decoder (t = 1) takes beta-tilde_2 whatever the variance: beta-tilde_1 = 0.
        self.decoder_std = float(self.post_var[1].sqrt())


def prior_term(x0: torch.Tensor, s: Schedule) -> torch.Tensor:
    ab = s.ab[-1]
    q = Normal(ab.sqrt() * x0, (1.0 - ab).sqrt().expand_as(x0))
    return kl_divergence(q, Normal(torch.zeros_like(x0), torch.ones_like(x0))).flatten(1).sum(1)


def _log_bin_mass(x0: torch.Tensor, mean: torch.Tensor, std: float, half: float,
                  lowest: torch.Tensor, highest: torch.Tensor) -> torch.Tensor:
    lo = (x0 - half - mean) / std
    hi = (x0 + half - mean) / std
    # log(Phi(b) - Phi(a)) on the side of 0 where both CDFs are small: flip when a > 0.
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    inner = lb + torch.log(-torch.expm1(la - lb))
    return torch.where(lowest, torch.special.log_ndtr(hi),
                       torch.where(highest, torch.special.log_ndtr(-lo), inner))


def terms(eps_fn: EpsFn, x0: torch.Tensor, j: torch.Tensor, noise: torch.Tensor, s: Schedule,
          half: float, levels: torch.Tensor) -> torch.Tensor:
    """Per row: L_0 = -log p(x0 | x1) where j = 0, L_{t-1} = KL(q || p_theta) where j >= 1.

    x0 [M, C, H, W] float64 on the grid, j [M] schedule indices, noise [M, C, H, W], levels
    [M, C, H, W] the pixels' levels 0..255 (for the open edge bins).
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    ab, ab_prev, beta = s.ab[j].view(shape), s.ab_prev[j].view(shape), s.betas[j].view(shape)
    xt = (ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise).float().double()
    eps = eps_fn(xt.float(), j)
    # Ho eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t).
    mu_p = (xt - beta / (1.0 - ab).sqrt() * eps) / (1.0 - beta).sqrt()
    # Ho eq. 7: the posterior mean.
    mu_q = (ab_prev.sqrt() * beta / (1.0 - ab)) * x0 + \
        ((1.0 - beta).sqrt() * (1.0 - ab_prev) / (1.0 - ab)) * xt
    out = torch.empty(len(j), dtype=torch.float64)
    dec = j == 0
    if dec.any():
        logp = _log_bin_mass(x0[dec], mu_p[dec], s.decoder_std, half, levels[dec] == 0, levels[dec] == 255)
        out[dec] = -logp.flatten(1).sum(1)
    kl = ~dec
    if kl.any():
        q = Normal(mu_q[kl], s.post_var[j[kl]].sqrt().view(shape).expand_as(mu_q[kl]))
        p = Normal(mu_p[kl], s.model_var[j[kl]].sqrt().view(shape).expand_as(mu_p[kl]))
        out[kl] = kl_divergence(q, p).flatten(1).sum(1)
    return out


def all_terms(eps_fn: EpsFn, x0: torch.Tensor, noise: torch.Tensor, s: Schedule, half: float,
              levels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Every term of every image: [N, T] with column 0 = L_0 and column j = L_j (Ho's L_{t-1}, t = j + 1).

    noise [N, T, C, H, W]: noise[i, j] makes x at index j for image i.
    """
    n = x0.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(s.T)]
    out = torch.empty(n, s.T, dtype=torch.float64)
    for k in range(0, len(pairs), batch):
        ii = torch.tensor([p[0] for p in pairs[k:k + batch]])
        jj = torch.tensor([p[1] for p in pairs[k:k + batch]])
        out[ii, jj] = terms(eps_fn, x0[ii], jj, noise[ii, jj].double(), s, half, levels[ii])
    return out


def stratified_kl(eps_fn: EpsFn, x0: torch.Tensor, s: Schedule, half: float, levels: torch.Tensor,
                  strata: int, seed: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """An estimate of sum_{t>=2} L_{t-1} per image by stratified importance sampling, with its
    variance: p(t) proportional to |d log SNR| SNR / (1 + SNR) over t = 2..T, split into `strata`
    equal-mass strata with two independent draws in each (numpy's RNG, not the runtime's).
    """
    ab = s.ab.numpy()
    log_snr = np.log(ab / (1.0 - ab))
    snr = ab / (1.0 - ab)
    w = np.abs(log_snr[:-1] - log_snr[1:]) * snr[1:] / (1.0 + snr[1:])
    p = w / w.sum()                       # over j = 1..T-1
    cdf = np.cumsum(p)
    rng = np.random.default_rng(seed)
    n = x0.shape[0]
    u = (np.arange(strata)[None, :, None] + rng.random((n, strata, 2))) / strata
    j = 1 + np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)   # [n, strata, 2]
    ii = np.repeat(np.arange(n), strata * 2)
    jj = j.reshape(-1)
    vals = torch.empty(len(jj), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for k in range(0, len(jj), batch):
        i_t, j_t = torch.from_numpy(ii[k:k + batch]), torch.from_numpy(jj[k:k + batch])
        z = torch.randn(len(j_t), *x0.shape[1:], generator=gen, dtype=torch.float64)
        vals[k:k + batch] = terms(eps_fn, x0[i_t], j_t, z, s, half, levels[i_t])
    y = (vals.numpy() / p[jj - 1]).reshape(n, strata, 2)
    est = y.mean(axis=2).mean(axis=1)
    # Per stratum the variance of the mean of two draws is (y1 - y2)^2 / 4; strata add up.
    var = ((y[:, :, 0] - y[:, :, 1]) ** 2 / 4.0).sum(axis=1) / strata**2
    return torch.from_numpy(est), torch.from_numpy(var)
