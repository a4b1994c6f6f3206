"""edgediff-train-t2i resumes exactly: a run stopped anywhere (in either stage) and rerun, or
finished and continued to more U-Net steps, ends with the weights of the run that never stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from edgediff_export import train_t2i  # noqa: E402


def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32), np.arange(64) % 10


def config(unet_steps: int) -> train_t2i.T2IConfig:
    return train_t2i.T2IConfig(vae_steps=4, vae_batch=4, unet_steps=unet_steps, unet_batch=4,
                               warmup=2)


def weights(out: Path) -> dict:
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    return {k: ck[k] for k in ("vae", "ema_text", "ema_unet", "unet")}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_stopped_and_continued_runs_equal_the_straight_run(tmp_path):
    data = tiny_data()
    straight = train_t2i.train(tmp_path / "a", config(4), 100, None, 1, data=data)
    assert straight is not None and (straight / "model_index.json").is_file()

    # A budget of 0 minutes stops after every step (with a checkpoint): 8 reruns finish it,
    # crossing from the VAE stage into the U-Net stage on the way.
    runs = 0
    while train_t2i.train(tmp_path / "b", config(4), 100, 0.0, 1, data=data) is None:
        runs += 1
        assert runs < 20
    assert runs >= 7
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))

    # Finished at 2 U-Net steps, then continued to 4: the flat learning rate makes it the same run.
    assert train_t2i.train(tmp_path / "c", config(2), 100, None, 1, data=data) is not None
    assert train_t2i.train(tmp_path / "c", config(4), 100, None, 1, data=data) is not None
    assert same(weights(tmp_path / "a"), weights(tmp_path / "c"))
    rows = (tmp_path / "c" / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 4  # header, VAE steps 0..3, U-Net steps 0..3: none twice

    # Another setting than the checkpoint's is refused.
    with pytest.raises(SystemExit, match="other settings"):
        train_t2i.train(tmp_path / "c", train_t2i.T2IConfig(vae_steps=5, vae_batch=4, unet_steps=4,
                                                            unet_batch=4, warmup=2), 100, None, 1,
                        data=data)
