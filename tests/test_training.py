"""Training end to end: every objective lowers its loss on tiny data, resuming is exact for
continuous objectives, and a trained continuous model exports with metadata the runtime reads
and samples from.

"Loss falls" is judged on a fixed evaluation batch (all 64 images, fixed t and noise drawn once
from a seeded generator), so the comparison has no sampling noise: the objective's loss there
with the raw weights after 30 steps must be at most 0.8 of its value at initialisation. On this
tiny data the measured ratios are 0.06-0.59 (elbo on a discrete schedule is the slowest, its
weight is dominated by the t = 0 decoder term); an objective with a wrong target or weight sign
does not fall at all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from edgediff_export import export, train
from edgediff_export.metadata import read_metadata
from edgediff_export.network import build_network
from edgediff_export.objectives import noisy, per_sample_loss
from edgediff_export.schedules import LevelSampler, continuous_alpha_sigma, continuous_metadata
from edgediff_export.unet import UNetConfig

TINY = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), image_size=8,
                  num_groups=4)
STEPS = 30
FALL = 0.8


def bars(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n 8x8 images in [-1, 1]: one full horizontal or vertical bright bar each (label 0/1)."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(n, 1, 8, 8)
    pos = torch.randint(0, 8, (n,), generator=g)
    horizontal = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        if horizontal[i]:
            x[i, 0, pos[i], :] = 1.0
        else:
            x[i, 0, :, pos[i]] = 1.0
    return x, horizontal.long()


def config(objective: str, prediction: str, schedule: str, steps: int = STEPS) -> train.TrainConfig:
    return train.TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup=5, ema_decay=0.9,
                             schedule=schedule, objective=objective, prediction=prediction)


def eval_loss(cfg: train.TrainConfig, state: dict, x0: torch.Tensor) -> float:
    sampler = LevelSampler(cfg.schedule_record())
    g = torch.Generator().manual_seed(1234)
    t = sampler.draw(x0.shape[0], g)
    eps = torch.randn(x0.shape, generator=g)
    lv = sampler.levels(t)
    model = build_network(TINY, cfg.schedule_record(), cfg.prediction)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model(noisy(x0, eps, lv), sampler.net_time(t))
        return float(per_sample_loss(cfg.objective, cfg.prediction, x0, eps, lv, out, cfg.gamma).mean())


@pytest.mark.parametrize("objective,prediction,schedule", [
    ("simple", "eps", "linear"),
    ("vlb", "eps", "linear"),
    ("sgm", "eps", "cosine"),
    ("snr", "eps", "quadratic"),
    ("min-snr", "v", "linear"),
    ("min-snr", "x0", "sigmoid"),
    ("elbo", "eps", "linear"),
    ("dsm", "score", "vp"),
    ("dsm", "score", "ve"),
    ("simple", "v", "vp"),
    ("elbo", "eps", "vp"),
    ("simple", "x0", "ve"),
])
def test_objective_trains(tmp_path: Path, objective: str, prediction: str, schedule: str) -> None:
    x, y = bars()
    cfg = config(objective, prediction, schedule)
    torch.manual_seed(cfg.seed)  # train() builds its initial weights after the same call
    init = build_network(TINY, cfg.schedule_record(), prediction).state_dict()
    path = train.train(tmp_path, cfg, TINY, checkpoint_every=1000, time_budget_min=None,
                       threads=1, data=(x, y))
    ck = torch.load(path, weights_only=False)
    before, after = eval_loss(cfg, init, x), eval_loss(cfg, ck["model"], x)
    assert np.isfinite(after) and after <= FALL * before, (before, after)


@pytest.mark.parametrize("objective,prediction,schedule", [("dsm", "score", "vp"),
                                                           ("min-snr", "x0", "ve")])
def test_resume_is_exact_for_continuous_objectives(tmp_path: Path, objective: str,
                                                   prediction: str, schedule: str) -> None:
    x, y = bars(32)
    cfg = config(objective, prediction, schedule, steps=5)
    whole = train.train(tmp_path / "a", cfg, TINY, 100, None, 1, data=(x, y))
    # The same run stopped by a zero time budget after its first step, then resumed twice.
    train.train(tmp_path / "b", cfg, TINY, 100, 0.0, 1, data=(x, y))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 1
    train.train(tmp_path / "b", cfg, TINY, 3, None, 1, data=(x, y))
    a = torch.load(whole, weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 5
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    with (tmp_path / "b" / "loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr", "samples_per_s", "seconds"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(float(r["samples_per_s"]) > 0 for r in rows)


@pytest.mark.parametrize("kind,column", [("vp", "alpha_bar"), ("ve", "noise_level")])
def test_continuous_schedules_match_the_runtime(edgediff_bin, kind: str, column: str) -> None:
    rows = json.loads(run_cli(edgediff_bin, "schedule", "--kind", kind, "--steps", "7",
                              "--json").stdout)
    t = torch.tensor([r["t"] for r in rows], dtype=torch.float64)
    alpha, sigma = continuous_alpha_sigma(continuous_metadata(kind), t)
    ours = alpha**2 if column == "alpha_bar" else sigma
    np.testing.assert_allclose([r[column] for r in rows], ours.numpy(), rtol=1e-12)


@pytest.mark.parametrize("objective,prediction,schedule", [("simple", "v", "vp"),
                                                           ("dsm", "score", "ve")])
def test_trained_continuous_model_exports_and_samples(edgediff_bin, tmp_path: Path,
                                                       objective: str, prediction: str,
                                                       schedule: str) -> None:
    x, y = bars()
    cfg = config(objective, prediction, schedule, steps=10)
    ckpt = train.train(tmp_path / "run", cfg, TINY, 100, None, 1, data=(x, y))
    model = tmp_path / "m.onnx"
    export.main(["checkpoint", str(ckpt), "--out", str(model), "--name", "tiny-" + schedule])
    meta = json.loads(run_cli(edgediff_bin, "info", "--model", str(model), "--json").stdout)
    expected = {"v": "v", "score": "score"}[prediction]
    assert meta["prediction"] == expected and meta["time_input"] == "continuous"
    assert meta["schedule"] == continuous_metadata(schedule)
    stored = read_metadata(model)
    for key in ("prediction", "time_input", "schedule", "sample_shape", "data_range"):
        assert meta[key] == stored[key], key
    half = tmp_path / "m16.onnx"  # the float16 copy's checks use the continuous time range
    assert export.main(["fp16", str(model), "--out", str(half)]) is None and half.exists()
    for sampler in ("ddim", "euler-maruyama", "dpm++2m"):
        out = tmp_path / f"{sampler}.npy"
        run_cli(edgediff_bin, "sample", "--model", str(model), "--sampler", sampler, "--steps",
                "8", "-n", "3", "-q", "--out", str(out))
        samples = np.load(out)
        assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all(), sampler


def test_bad_training_options_exit_with_their_codes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    base = ["--out-dir", str(tmp_path / "never"), "--steps", "1"]
    with pytest.raises(SystemExit) as e:
        train.main([*base, "--schedule", "linear", "--objective", "dsm"])
    assert e.value.code == 2 and "use --schedule vp or ve" in capsys.readouterr().err
    monkeypatch.setenv("EDGEDIFF_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(SystemExit) as e:
        train.main([*base, "--dataset", "fashion-mnist"])
    assert e.value.code == 4 and "dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "never" / "checkpoint.pt").exists()


def test_loss_log_plots(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    x, y = bars(16)
    train.train(tmp_path / "run", config("min-snr", "v", "vp", steps=3), TINY, 100, None, 1,
                data=(x, y))
    out = tmp_path / "loss.png"
    subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"),
                    str(tmp_path / "run" / "loss.csv"), "--out", str(out), "--window", "2"],
                   check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
