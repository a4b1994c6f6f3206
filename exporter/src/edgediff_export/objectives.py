"""Training objectives: what the network predicts (the target) and how each noise level is
weighted (the weighting), for x_t = alpha x0 + sigma eps.

Following Kingma & Gao (2023, "Understanding Diffusion Objectives"), a weighting is a weight
w(t) on ||eps - eps_hat||²; the target only changes the network's parameterisation. A weighting
applied to another target is converted so the objective stays the same: with the output's error
expressed in eps terms, ||d eps||² = SNR ||d x0||² = alpha² ||d v||² (VP) = sigma² ||d score||².
The one exception is `simple`, which by its usual meaning is the plain MSE of whatever the
network predicts (Ho et al. 2020 for eps, Salimans & Ho 2022's v loss for v).

The seed's "vlb" and "sgm" weightings are kept as the seed defines them (sigma = sqrt(1 -
alpha_bar)), but "vlb" is *not* the ELBO's weighting; `elbo` is (see `eps_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Prediction names on the command line -> the metadata's names (DESIGN.md, model contract).
PREDICTIONS = {"eps": "epsilon", "v": "v", "x0": "sample", "score": "score"}
OBJECTIVES = ("simple", "vlb", "sgm", "snr", "min-snr", "elbo", "dsm")
# gamma when none is given: the seed's exponent for snr (SNR^gamma grows without bound, so a large
# exponent makes low-noise levels dominate), Hang et al.'s recommended cap for min-snr.
DEFAULT_GAMMA = {"snr": 1.0, "min-snr": 5.0}


def resolve_gamma(objective: str, gamma: float | None) -> float:
    return gamma if gamma is not None else DEFAULT_GAMMA.get(objective, 1.0)


@dataclass(frozen=True)
class Levels:
    """Per-sample noise levels of a batch: alpha, sigma and the ELBO's eps weight, each [N]."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    elbo: torch.Tensor

    def snr(self) -> torch.Tensor:
        return (self.alpha / self.sigma) ** 2

    def expand(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and sigma shaped to broadcast against x [N, ...]."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.alpha.reshape(shape), self.sigma.reshape(shape)


def noisy(x0: torch.Tensor, eps: torch.Tensor, lv: Levels) -> torch.Tensor:
    """x_t = alpha x0 + sigma eps."""
    a, s = lv.expand(x0)
    return a * x0 + s * eps


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, lv: Levels) -> torch.Tensor:
    """What the network should output.

    eps: eps (Ho 2020). v: alpha eps - sigma x0 (Salimans & Ho 2022, progressive distillation). x0: x0.
    score: grad log q(x_t | x0) = -eps / sigma (Song et al. 2021, the DSM target).
    """
    a, s = lv.expand(x0)
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "x0":
        return x0
    if prediction == "score":
        return -eps / s
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(PREDICTIONS)}")


def eps_per_target(prediction: str, lv: Levels) -> torch.Tensor:
    """||d eps||² / ||d target||² for an output error d at fixed x_t: the factor that turns a
    weight on the eps error into the same objective's weight on the target's error.

    From x_t = alpha x0 + sigma eps: d x0 = -(sigma/alpha) d eps, so the x0 factor is SNR;
    d v = alpha d eps - sigma d x0 = d eps / alpha for VP (alpha² + sigma² = 1), so alpha²;
    d score = -d eps / sigma, so sigma².
    """
    return {"eps": lambda: torch.ones_like(lv.alpha), "x0": lv.snr, "v": lambda: lv.alpha**2,
            "score": lambda: lv.sigma**2}[prediction]()


def eps_weight(objective: str, lv: Levels, gamma: float) -> torch.Tensor:
    """The objective's weight on ||eps - eps_hat||² at each level.

    vlb: sigma² = 1 - alpha_bar, the seed's "vlb" (tutorial §3.2; not the ELBO's weight).
    sgm: sigma, the seed's "sgm" (tutorial §3.2).
    snr: SNR^gamma / (1 + SNR), the seed's reweighted ELBO (tutorial §4.3).
    min-snr: min(SNR, gamma) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy": min(SNR, gamma) on the x0 error, in eps form).
    elbo: the ELBO's own weight (Ho 2020 eq. 12 per discrete term; Kingma et al. 2021
        (VDM) -1/2 dlogSNR/dt in continuous time), taken from `Levels.elbo`.
    dsm: 1, i.e. lambda(t) = sigma(t)² on ||score - grad log q(x_t|x0)||² (Song et al. 2021's weighted
        DSM objective with their lambda choice; continuous VP/VE schedules, t ~ U[T_MIN, 1]).
    """
    if objective == "vlb":
        return lv.sigma**2
    if objective == "sgm":
        return lv.sigma
    if objective == "snr":
        snr = lv.snr()
        return snr**gamma / (1.0 + snr)
    if objective == "min-snr":
        snr = lv.snr()
        return torch.clamp(snr, max=gamma) / snr
    if objective == "elbo":
        return lv.elbo
    if objective in ("dsm", "simple"):
        return torch.ones_like(lv.alpha)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def target_weight(objective: str, prediction: str, lv: Levels, gamma: float) -> torch.Tensor:
    """The weight on ||target - output||² (per sample): the eps weight converted to the target,
    except `simple`, which is the unweighted MSE of the target itself."""
    if objective == "simple":
        return torch.ones_like(lv.alpha)
    return eps_weight(objective, lv, gamma) * eps_per_target(prediction, lv)


def per_sample_loss(objective: str, prediction: str, x0: torch.Tensor, eps: torch.Tensor,
                    lv: Levels, output: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """w(t) * mean over pixels of (target - output)²; shape [N]. gamma None: DEFAULT_GAMMA."""
    err = (target(prediction, x0, eps, lv) - output) ** 2
    w = target_weight(objective, prediction, lv, resolve_gamma(objective, gamma))
    return w * err.flatten(1).mean(1)


def check_combination(objective: str, prediction: str, schedule: str) -> None:
    """Refuse objective/target/schedule combinations that are ill-defined or that the runtime
    would sample wrongly, with a message saying what to use instead."""
    continuous = schedule in ("vp", "ve")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    if objective == "dsm" and not continuous:
        raise ValueError("--objective dsm is continuous-time score matching: use --schedule vp or ve")
    if prediction == "score" and not continuous:
        raise ValueError("--prediction score needs a continuous schedule (--schedule vp or ve)")
    if prediction == "v" and schedule == "ve":
        # v = alpha eps - sigma x0 is defined for variance-preserving paths; the runtime turns
        # v into x0 as alpha x_t - sigma v, which only holds when alpha² + sigma² = 1.
        raise ValueError("--prediction v needs a variance-preserving schedule; with ve use eps, x0 or score")
