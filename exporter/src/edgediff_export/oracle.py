"""An exact "network": the true eps of a Gaussian mixture under a noise schedule, as ONNX.

With data x0 ~ sum_k w_k N(mu_k, diag v_k), the noisy marginal at (alpha, sigma) is
sum_k w_k N(alpha mu_k, diag(alpha² v_k + sigma²)), whose score is closed-form, and
E[eps | x_t] = -sigma * score. Samplers driven by it can be checked against known answers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .metadata import make_metadata, write_metadata
from .schedules import alphas_cumprod, betas_for, schedule_metadata


@dataclass
class Mixture:
    weights: np.ndarray  # [K]
    means: np.ndarray  # [K, D]
    variances: np.ndarray  # [K, D] (diagonal)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + np.sqrt(self.variances[k]) * rng.standard_normal((n, self.dim))

    def to_json(self) -> dict:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(),
                "variances": self.variances.tolist()}


def default_mixture(dim: int = 4) -> Mixture:
    """Three well-separated components with unequal weights and anisotropic variances."""
    means = np.zeros((3, dim))
    means[0, :] = 0.6
    means[1, : dim // 2] = -0.7
    means[2, dim // 2:] = -0.5
    means[2, : dim // 2] = 0.4
    variances = np.array([[0.02] * dim, [0.01 + 0.02 * (i % 2) for i in range(dim)], [0.015] * dim])
    return Mixture(np.array([0.5, 0.3, 0.2]), means, variances)


def random_mixture(dim: int = 4, k: int = 5, seed: int = 5) -> Mixture:
    """Five components of unequal weights, with means and diagonal variances drawn from a
    seeded generator: a second oracle, unlike `default_mixture` in every parameter, for judging
    on one model what was tuned on another."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.35, 0.25, 0.2, 0.12, 0.08][:k])
    return Mixture(weights / weights.sum(), rng.uniform(-0.8, 0.8, (k, dim)),
                   rng.uniform(0.005, 0.05, (k, dim)))


MIXTURES = {"default": default_mixture, "random": random_mixture}


class MixtureEps(nn.Module):
    """eps(x_t, t) of a Gaussian mixture; `time_input` says how t maps to (alpha, sigma)."""

    def __init__(self, mix: Mixture, shape: tuple[int, int, int], schedule: dict, time_input: str) -> None:
        super().__init__()
        self.shape = shape
        self.schedule = schedule
        self.time_input = time_input
        self.register_buffer("log_w", torch.tensor(np.log(mix.weights), dtype=torch.float32))
        self.register_buffer("mu", torch.tensor(mix.means, dtype=torch.float32))
        self.register_buffer("var", torch.tensor(mix.variances, dtype=torch.float32))
        if schedule["kind"] not in ("vp", "ve"):
            ab = alphas_cumprod(betas_for(schedule["kind"], schedule["num_train_timesteps"]))
            self.register_buffer("log_sbar", torch.tensor(0.5 * np.log((1 - ab) / ab), dtype=torch.float32))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.schedule["kind"]
        if kind == "vp":
            b0, b1 = self.schedule["beta_min"], self.schedule["beta_max"]
            log_alpha = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
            alpha = torch.exp(log_alpha)
            # sigma² = 1 - exp(-u), u = -2 log alpha; ONNX has no expm1, so use its series for small u.
            u = -2 * log_alpha
            series = u * (1 - u / 2 * (1 - u / 3 * (1 - u / 4)))
            return alpha, torch.sqrt(torch.where(u < 1e-2, series, 1 - torch.exp(-u)))
        if kind == "ve":
            sigma = t if self.time_input == "sigma" else \
                self.schedule["sigma_min"] * (self.schedule["sigma_max"] / self.schedule["sigma_min"]) ** t
            return torch.ones_like(sigma), sigma
        # Discrete table, fractional indices interpolated in log(sigma/alpha) like the runtime.
        last = self.log_sbar.shape[0] - 1
        tc = t.clamp(0, last)
        i0 = torch.floor(tc).clamp(max=last - 1)
        frac = tc - i0
        i0 = i0.long()
        ls = (1 - frac) * self.log_sbar[i0] + frac * self.log_sbar[i0 + 1]
        sbar = torch.exp(ls)
        alpha = 1 / torch.sqrt(1 + sbar * sbar)
        return alpha, sbar * alpha

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        n = sample.shape[0]
        x = sample.reshape(n, 1, -1)
        alpha, sigma = self.alpha_sigma(timestep.float())
        a, s = alpha.reshape(n, 1, 1), sigma.reshape(n, 1, 1)
        var = a * a * self.var + s * s  # [N, K, D]
        diff = x - a * self.mu  # [N, K, D]
        logp = self.log_w - 0.5 * (diff * diff / var + torch.log(var)).sum(-1)
        r = torch.softmax(logp, dim=-1).unsqueeze(-1)
        eps = s.reshape(n, 1) * (r * diff / var).sum(1)
        return eps.reshape(sample.shape)


def export_oracle(out: Path, schedule: str = "vp", shape: tuple[int, int, int] = (1, 2, 2),
                  mix: Mixture | None = None) -> Mixture:
    c, h, w = shape
    mix = mix or default_mixture(c * h * w)
    if schedule == "vp":
        sched, time_input = {"kind": "vp", "beta_min": 0.1, "beta_max": 20.0}, "continuous"
    elif schedule == "ve":
        sched, time_input = {"kind": "ve", "sigma_min": 0.01, "sigma_max": 50.0}, "sigma"
    else:
        sched, time_input = schedule_metadata(schedule), "index"
    model = MixtureEps(mix, shape, sched, time_input).eval()
    n = 2
    t = torch.tensor([0.5, 0.9]) if time_input != "index" else torch.tensor([10.5, 900.0])
    tmp = out.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (torch.randn(n, c, h, w), t), str(tmp), input_names=["sample", "timestep"],
                      output_names=["out"], dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"}, "out": {0: "N"}},
                      opset_version=17, dynamo=False)
    import onnx
    proto = onnx.load(str(tmp))
    meta = make_metadata(name=f"gmm-oracle-{schedule}", description="exact eps of a Gaussian mixture",
                         prediction="epsilon", time_input=time_input, schedule=sched,
                         sample_shape=list(shape), data_range=(-3.0, 3.0),
                         extra={"mixture": mix.to_json()})
    write_metadata(proto, meta)
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return mix


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-oracle", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--schedule", default="vp", choices=["vp", "ve", "linear", "cosine"])
    p.add_argument("--shape", default="1,2,2")
    p.add_argument("--mixture", default="default", choices=sorted(MIXTURES),
                   help="default: three components (default_mixture); random: five, drawn (random_mixture)")
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    mix = export_oracle(a.out, a.schedule, shape, MIXTURES[a.mixture](int(np.prod(shape))))
    print(json.dumps({"out": str(a.out), "mixture": mix.to_json()}))


if __name__ == "__main__":
    main()
