"""Shared fixtures for the cross-language tests: the edgediff binary and small exported models."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def edgediff_bin() -> Path:
    if "EDGEDIFF_BIN" in os.environ:
        return Path(os.environ["EDGEDIFF_BIN"])
    # Always build: a stale binary from before a change would test the old code.
    subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)
    return ROOT / "target" / "debug" / "edgediff"


def run_cli(binary: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgediff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


class AnchoredUNet(torch.nn.Module):
    """A random U-Net around the exact eps of N(0, I) data: eps = sigma_t x_t + 0.1 unet(x_t, t).

    A bare random network predicts eps far from any data's, so x0 = (x - sigma eps)/alpha blows
    up to hundreds and float32 rounding alone exceeds 1e-4. Anchored, trajectories stay O(1)
    like a trained model's, while the U-Net still makes every sample and step differ.
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: np.ndarray) -> None:
        super().__init__()
        self.unet = unet
        self.cfg = unet.cfg
        self.register_buffer("sigma", torch.from_numpy(np.sqrt(1.0 - alphas_cumprod)).float())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        s = self.sigma[timestep.long()][:, None, None, None]
        return s * sample + 0.1 * self.unet(sample, timestep)


def export_tiny(out: Path, schedule: str = "linear", seed: int = 0) -> Path:
    from edgediff_export.export import export_unet, unet_metadata
    from edgediff_export.schedules import alphas_cumprod, betas_for, schedule_metadata
    from edgediff_export.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                     image_size=8, num_groups=4)
    model = AnchoredUNet(UNet(cfg), alphas_cumprod(betas_for(schedule)))
    export_unet(model, unet_metadata(cfg, schedule_metadata(schedule), "tiny", "test model"), out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {k: export_tiny(d / f"tiny-{k}.onnx", k) for k in ("linear", "cosine", "quadratic", "sigmoid")}
