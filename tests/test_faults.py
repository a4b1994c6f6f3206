"""Faults: a network that returns NaN, a run killed with SIGKILL and resumed, and two processes
writing into one output directory.
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


def test_two_processes_share_an_output_directory(edgediff_bin, tiny_models, tmp_path):
    out = tmp_path / "shared"
    base = [str(edgediff_bin), "sample", "--model", str(tiny_models["linear"]), "-n", "40", "--batch-size", "5",
            "--steps", "10", "-q", "--out", str(out)]
    procs = [subprocess.Popen([*base, "--seed", str(s)]) for s in (1, 2)]
    assert [p.wait() for p in procs] == [0, 0]
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{i:06}.png" for i in range(40)]  # no temporary leftovers
    # Every file is whole: one of the two runs' PNG for that index, byte for byte.
    singles = {}
    for s in (1, 2):
        run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "40", "--batch-size", "5",
                "--steps", "10", "-q", "--seed", str(s), "--out", str(tmp_path / f"s{s}"))
        singles[s] = {p.name: p.read_bytes() for p in (tmp_path / f"s{s}").iterdir()}
    for f in files:
        assert f.read_bytes() in (singles[1][f.name], singles[2][f.name]), f.name
