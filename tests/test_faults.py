"""Faults: a network that returns NaN, a run killed with SIGKILL and resumed, and a second
process refused on an output another is writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import ROOT, run_cli
from edgediff_export.metadata import make_metadata, write_metadata
from edgediff_export.schedules import schedule_metadata


class NanForMarked(torch.nn.Module):
    """eps = 0.1 x, except NaN for samples whose largest |x| exceeds 1000 (a marker the test
    puts into chosen samples' initial noise), so only those samples' batch fails."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        big = sample.abs().flatten(1).amax(1) > 1000.0
        nan = torch.full_like(sample, float("nan"))
        return torch.where(big[:, None, None, None], nan, 0.1 * sample) + 0 * timestep.float()[:, None, None, None]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nan") / "nan.onnx"
    torch.onnx.export(NanForMarked(), (torch.randn(2, 1, 4, 4), torch.tensor([1, 2])), str(path),
                      input_names=["sample", "timestep"], output_names=["out"],
                      dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"}, "out": {0: "N"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    write_metadata(proto, make_metadata(name="nan", description="NaN for marked samples",
                                        prediction="epsilon", time_input="index",
                                        schedule=schedule_metadata("linear"), sample_shape=[1, 4, 4]))
    onnx.save(proto, str(path))
    return path


def test_nan_names_step_and_sample_and_keeps_finished_chunks(edgediff_bin, nan_model, tmp_path):
    init = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    init[4, 0, 0, 0] = 5000.0  # sample 4, in the third batch of two
    np.save(tmp_path / "init.npy", init)
    out = tmp_path / "imgs"
    proc = run_cli(edgediff_bin, "sample", "--model", str(nan_model), "--init-noise", str(tmp_path / "init.npy"),
                   "--batch-size", "2", "--steps", "5", "--out", str(out), check=False)
    assert proc.returncode == 5, proc.stderr
    assert "sample 4" in proc.stderr and "step 1" in proc.stderr, proc.stderr
    # The two batches before it are written whole; nothing of the failed batch, no temp files.
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06}.png" for i in range(4)]
    # An .npy output is not published at all.
    proc = run_cli(edgediff_bin, "sample", "--model", str(nan_model), "--init-noise", str(tmp_path / "init.npy"),
                   "--batch-size", "2", "--steps", "5", "--out", str(tmp_path / "x.npy"), check=False)
    assert proc.returncode == 5 and not (tmp_path / "x.npy").exists()


def test_sigkill_then_resume_gives_the_uninterrupted_files(edgediff_bin, tmp_path):
    args = ["sample", "-n", "24", "--batch-size", "4", "--steps", "20", "--seed", "9", "-q"]
    run_cli(edgediff_bin, *args, "--out", str(tmp_path / "whole"))
    for out in ("killed", "killed.npy"):
        target = tmp_path / out
        proc = subprocess.Popen([str(edgediff_bin), *args, "--out", str(target)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once some, but not all, of the work is on disk.
        deadline = time.time() + 60
        partial = tmp_path / f".{out}.partial"
        while time.time() < deadline and proc.poll() is None:
            done = (len(list(target.glob("*.png"))) if not out.endswith(".npy")
                    else (partial.stat().st_size if partial.exists() else 0))
            if done >= (8 if not out.endswith(".npy") else 4096):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        run_cli(edgediff_bin, *args, "--out", str(target), "--resume")
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.png")}
    assert len(whole) == 24
    assert {p.name: p.read_bytes() for p in (tmp_path / "killed").glob("*.png")} == whole
    assert not list((tmp_path / "killed").glob(".*"))  # no temporary files left
    run_cli(edgediff_bin, *args, "--out", str(tmp_path / "whole.npy"))
    assert (tmp_path / "killed.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()


@pytest.mark.parametrize("name", ["shared", "shared.npy"])
def test_a_second_writer_on_one_output_is_refused(edgediff_bin, tiny_models, tmp_path, name):
    """One output has one writer (issue 17): while a run holds the output's lock, a second run
    on the same path, with another seed, exits 4 and writes nothing; the first completes as if
    alone. (Before, both exited 0 and a folder held a mix of the two runs.)"""
    out = tmp_path / name
    base = [str(edgediff_bin), "sample", "--model", str(tiny_models["linear"]), "-n", "600", "--batch-size", "5",
            "--steps", "50", "-q"]
    first = subprocess.Popen([*base, "--seed", "1", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    lock = tmp_path / (f".{name}.partial" if name.endswith(".npy") else f".{name}.lock")
    deadline = time.time() + 60
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert first.poll() is None, "the first run ended before the second could start"
    second = subprocess.run([*base, "--seed", "2", "--out", str(out)], capture_output=True, text=True)
    still_running = first.poll() is None
    assert first.wait() == 0, first.stderr.read()
    assert still_running, "the first run ended before the second was refused: make it longer"
    assert second.returncode == 4, second.stderr
    assert "another process is writing" in second.stderr, second.stderr
    alone = tmp_path / f"alone-{name}"
    run_cli(edgediff_bin, *base[1:], "--seed", "1", "--out", str(alone))
    if name.endswith(".npy"):
        assert out.read_bytes() == alone.read_bytes()
    else:
        assert sorted(p.name for p in out.iterdir()) == [f"{i:06}.png" for i in range(600)]
        assert all((out / f.name).read_bytes() == f.read_bytes() for f in alone.iterdir())
