"""Exporter: metadata round trip, self-verification, schedules and exact training resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff_export import export, train
from edgediff_export.metadata import read_metadata
from edgediff_export.schedules import alphas_cumprod, betas_for
from edgediff_export.unet import UNet, UNetConfig

TINY = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_size=8,
                  num_groups=4)


def test_export_writes_metadata_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    export.main(["random", "--out", str(out), "--schedule", "cosine"])
    meta = read_metadata(out)
    assert meta["schedule"] == {"kind": "cosine", "num_train_timesteps": 1000, "s": 0.008, "max_beta": 0.999}
    assert meta["sample_shape"] == [1, 8, 8] and meta["prediction"] == "epsilon"


def test_verify_rejects_an_unfaithful_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet(TINY)
    out = tmp_path / "m.onnx"
    export.export_unet(model, export.unet_metadata(TINY, {"kind": "linear"}, "t", ""), out)
    with torch.no_grad():
        model.conv_out.bias.add_(0.5)  # the PyTorch model now differs from the file
    with pytest.raises(RuntimeError, match="not faithful"):
        export.verify(model, out)


def test_conditional_unet_uses_labels() -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(**{**TINY.__dict__, "num_classes": 3})
    model = UNet(cfg).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    with torch.no_grad():
        model.label_emb.weight.normal_()
        a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_linear_schedule_closed_form() -> None:
    ab = alphas_cumprod(betas_for("linear"))
    closed = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert abs(ab[-1] - closed) < 1e-15
    cos = alphas_cumprod(betas_for("cosine"))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(cos[499] - f(0.5) / f(0.0)) < 1e-12


def test_training_resumes_exactly(tmp_path: Path) -> None:
    args = ["--steps", "4", "--batch-size", "4", "--base-channels", "8", "--channel-mult", "1,2",
            "--attention-resolutions", "", "--warmup", "2", "--threads", "1"]
    train.main(["--out-dir", str(tmp_path / "a"), *args])
    # The same run interrupted: a zero time budget checkpoints and stops after one step.
    cfg = train.TrainConfig(steps=4, batch_size=4, warmup=2)
    ucfg = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=())
    train.train(tmp_path / "b", cfg, ucfg, checkpoint_every=2, time_budget_min=0.0, threads=1)
    step_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"]
    assert step_b == 1
    train.main(["--out-dir", str(tmp_path / "b"), *args])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
