"""The trained network as the runtime sees it: a U-Net plus what its schedule and prediction
type ask of the graph.

Discrete schedules use the bare U-Net with the training index as its time input. Continuous
(VP/VE) models take t in [0, 1] (metadata `time_input: continuous`) and, inside the exported
graph: scale t by `TIME_SCALE` so the sinusoidal embedding sees the same range as an index
model; divide x_t by sqrt(alpha² + sigma²) so VE inputs (sigma up to 50) reach the network at
unit scale (EDM's c_in, Karras et al. 2022, with sigma_data = 1); and for score prediction
return -h / sigma(t), so the network itself learns an O(1) quantity while the output is the
score (the parameterisation of Song et al. 2021's NCSN++ `scale_by_sigma`).
"""

from __future__ import annotations

import torch
from torch import nn

from .schedules import CONTINUOUS_KINDS, continuous_alpha_sigma
from .unet import UNet, UNetConfig

TIME_SCALE = 1000.0


class ContinuousUNet(UNet):
    """A U-Net for a continuous schedule; same parameters (and state-dict keys) as `UNet`."""

    def __init__(self, cfg: UNetConfig, schedule: dict, prediction: str) -> None:
        super().__init__(cfg)
        self.schedule = dict(schedule)
        self.prediction = prediction

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = timestep.to(torch.float32)
        alpha, sigma = continuous_alpha_sigma(self.schedule, t)
        c_in = torch.rsqrt(alpha * alpha + sigma * sigma)[:, None, None, None]
        h = super().forward(sample * c_in, t * TIME_SCALE, class_labels)
        if self.prediction == "score":
            return -h / sigma[:, None, None, None]
        return h


def build_network(cfg: UNetConfig, schedule: dict, prediction: str = "eps") -> nn.Module:
    """The network for a schedule record (`schedules.schedule_metadata`) and a prediction name
    (eps, v, x0, score)."""
    if schedule["kind"] in CONTINUOUS_KINDS:
        return ContinuousUNet(cfg, schedule, prediction)
    return UNet(cfg)


def is_continuous(model: nn.Module) -> bool:
    return isinstance(model, ContinuousUNet)
