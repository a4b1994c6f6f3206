"""Data integrity of outputs (issue 17): resume continues only the same job, a planted link is
never written through, and a destination that cannot work is refused before sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SAMPLE_BYTES = 4 * 64  # the tiny models' [1, 8, 8] float32 samples


def _sample(binary: Path, model: Path, out: Path, *extra: str, check: bool = True):
    return run_cli(binary, "sample", "--model", str(model), "-n", "9", "--batch-size", "4", "--steps", "5",
                   "-q", "--out", str(out), *extra, check=check)


def _interrupt(tmp: Path, full: Path, name: str, keep: int) -> Path:
    """What a run of `full`'s options killed after `keep` samples leaves at `tmp/name`: the
    partial with those samples, and the job record it wrote before its first batch."""
    data = full.read_bytes()
    header = len(data) - 9 * SAMPLE_BYTES
    (tmp / f".{name}.partial").write_bytes(data[: header + keep * SAMPLE_BYTES])
    (tmp / f"{name}.job.json").write_bytes((tmp / f"{full.name}.job.json").read_bytes())
    return tmp / name


@pytest.mark.parametrize("change,flag,old,new", [
    (["--seed", "2"], "--seed", "1", "2"),
    (["--seed", "1", "--sampler", "dpm++2m"], "--sampler", "ddim", "dpm++2m"),
    (["--seed", "1", "--eta", "1"], "the sampler's options", "", ""),
    (["--seed", "1", "--steps", "6"], "--steps", "5", "6"),
])
def test_resume_refuses_a_partial_of_another_job(edgediff_bin, tiny_models, tmp_path, change, flag, old, new):
    full = tmp_path / "full.npy"
    _sample(edgediff_bin, tiny_models["linear"], full, "--seed", "1")
    out = _interrupt(tmp_path, full, "x.npy", 5)
    partial = (tmp_path / ".x.npy.partial").read_bytes()
    steps = [] if "--steps" in change else ["--steps", "5"]
    args = ["sample", "--model", str(tiny_models["linear"]), "-n", "9", "--batch-size", "4", *steps,
            "-q", "--out", str(out), "--resume", *change]
    proc = run_cli(edgediff_bin, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"was made with {flag} {old}" in proc.stderr and f"this run has {new}" in proc.stderr, proc.stderr
    assert not out.exists() and (tmp_path / ".x.npy.partial").read_bytes() == partial  # kept as it was
    # The same options continue it to the uninterrupted bytes.
    _sample(edgediff_bin, tiny_models["linear"], out, "--seed", "1", "--resume")
    assert out.read_bytes() == full.read_bytes()


def test_resume_refuses_another_model(edgediff_bin, tiny_models, tmp_path):
    full = tmp_path / "full.npy"
    _sample(edgediff_bin, tiny_models["linear"], full)
    out = _interrupt(tmp_path, full, "x.npy", 5)
    proc = _sample(edgediff_bin, tiny_models["cosine"], out, "--resume", check=False)
    assert proc.returncode == 2 and "was made with --model" in proc.stderr, proc.stderr


def test_resume_on_a_complete_output_with_other_options_writes_nothing(edgediff_bin, tiny_models, tmp_path):
    for name in ("done.npy", "done"):
        out = tmp_path / name
        _sample(edgediff_bin, tiny_models["linear"], out, "--seed", "1")
        before = {p: p.read_bytes() for p in ([out] if out.is_file() else sorted(out.iterdir()))}
        proc = _sample(edgediff_bin, tiny_models["linear"], out, "--seed", "2", "--resume", check=False)
        assert proc.returncode == 2 and "was made with --seed 1" in proc.stderr, (name, proc.stderr)
        assert {p: p.read_bytes() for p in before} == before
        # With its own options it is complete: nothing to do, nothing rewritten.
        again = json.loads(_sample(edgediff_bin, tiny_models["linear"], out, "--seed", "1", "--resume",
                                   "--json").stdout)
        assert again["resumed_samples"] == 9, (name, again)


def test_a_finished_file_of_an_unfinished_record_is_not_taken_as_done(edgediff_bin, tiny_models, tmp_path):
    """A fresh run over an old x.npy records its job first; if it dies before its first sample,
    the old x.npy is not this job's, and resume must not call it complete."""
    out = tmp_path / "x.npy"
    _sample(edgediff_bin, tiny_models["linear"], out, "--seed", "1")
    record = json.loads((tmp_path / "x.npy.job.json").read_text())
    record["complete"] = False
    record["seed"] = 2
    (tmp_path / "x.npy.job.json").write_text(json.dumps(record))
    proc = _sample(edgediff_bin, tiny_models["linear"], out, "--seed", "2", "--resume", check=False)
    assert proc.returncode == 2 and "did not finish" in proc.stderr, proc.stderr


def test_a_planted_link_at_the_partial_is_not_followed(edgediff_bin, tiny_models, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    os.symlink(victim, tmp_path / ".x.npy.partial")
    dangling = tmp_path / "created-by-the-link"
    os.symlink(dangling, tmp_path / ".y.npy.partial")
    for name in ("x.npy", "y.npy"):
        for resume in ([], ["--resume"]):
            proc = _sample(edgediff_bin, tiny_models["linear"], tmp_path / name, *resume, check=False)
            assert proc.returncode == 4 and "symbolic link" in proc.stderr, proc.stderr
    assert victim.read_text() == "another user's file" and not dangling.exists()
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


def test_links_at_guessable_temporary_names_are_not_followed(edgediff_bin, tiny_models, tmp_path):
    """PNG temporaries used to be .NAME.PID.tmp, a name another user could plant a link at."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for pid in range(os.getpid(), os.getpid() + 200):
        os.symlink(victim, tmp_path / f".grid.png.{pid}.tmp")
    _sample(edgediff_bin, tiny_models["linear"], tmp_path / "grid.png")
    assert victim.read_text() == "keep"
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("make,out", [
    (lambda t: (t / "x.npy").mkdir(), "x.npy"),
    (lambda t: None, "y.npy/"),
    (lambda t: (t / "g.png").mkdir(), "g.png"),
    (lambda t: (t / "imgs").write_text("a file"), "imgs"),
])
def test_a_destination_that_cannot_work_is_refused_before_sampling(edgediff_bin, tiny_models, tmp_path, make,
                                                                   out):
    make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "-n", "2", "--steps", "2", "-q",
                   "--json", "--out", str(tmp_path) + "/" + out, check=False)
    assert proc.returncode == 2 and "--out" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_name_too_long_for_the_partial_is_refused(edgediff_bin, tiny_models, tmp_path):
    proc = _sample(edgediff_bin, tiny_models["linear"], tmp_path / ("x" * 240 + ".npy"), check=False)
    assert proc.returncode == 2 and "too long" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_records_say_how_an_output_was_made(edgediff_bin, tiny_models, tmp_path):
    _sample(edgediff_bin, tiny_models["linear"], tmp_path / "a.npy", "--seed", "3")
    record = json.loads((tmp_path / "a.npy.job.json").read_text())
    assert record["seed"] == 3 and record["steps"] == 5 and record["n"] == 9 and record["complete"] is True
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy").shape, (9, 1, 8, 8))


@pytest.mark.parametrize("shape", [(3, 2, 1, 8, 8), (3, 4, 1, 4, 4), (3, 4, 3, 8, 8), (4, 1, 8, 8)])
def test_step_noise_of_the_wrong_shape_is_refused_before_sampling(edgediff_bin, tiny_models, tmp_path, shape):
    """These used to panic (exit 101, a partial left) or, with the wrong channels, exit 0 having
    read noise from the wrong offsets."""
    np.save(tmp_path / "z.npy", np.zeros((4, 1, 8, 8), np.float32))
    np.save(tmp_path / "s.npy", np.zeros(shape, np.float32))
    proc = run_cli(edgediff_bin, "sample", "--model", str(tiny_models["linear"]), "--sampler", "ddpm", "-n", "4",
                   "--steps", "3", "--init-noise", str(tmp_path / "z.npy"), "--step-noise", str(tmp_path / "s.npy"),
                   "-q", "--out", str(tmp_path / "x.npy"), check=False)
    assert proc.returncode in (2, 4) and "--step-noise" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "z.npy"]


def _nan_at(path: Path, shape: tuple[int, ...], flat: int) -> None:
    a = np.zeros(shape, np.float32)
    a.reshape(-1)[flat] = np.inf
    np.save(path, a)


@pytest.mark.parametrize("command", [
    ["invert", "--image", "BAD"],
    ["interpolate", "--from", "BAD"],
    ["inpaint", "--image", "BAD", "--mask", "GOOD"],
    ["sample", "--init-noise", "BAD"],
])
def test_a_non_finite_input_file_is_named_not_blamed_on_the_network(edgediff_bin, tiny_models, tmp_path, command):
    _nan_at(tmp_path / "bad.npy", (2, 1, 8, 8), 70)
    np.save(tmp_path / "good.npy", np.ones((2, 1, 8, 8), np.float32))
    args = [str(tmp_path / "bad.npy") if a == "BAD" else str(tmp_path / "good.npy") if a == "GOOD" else a
            for a in command]
    proc = run_cli(edgediff_bin, *args, "--model", str(tiny_models["linear"]), "--steps", "2", "-q",
                   "--out", str(tmp_path / "out.npy"), check=False)
    assert proc.returncode == 4, proc.stderr
    assert str(tmp_path / "bad.npy") in proc.stderr and "inf at [1, 0, 0, 6]" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("args", [
    ["likelihood", "--data", "DATA", "--rtol", "1e-300"],
    ["sample", "--sampler", "adaptive", "--atol", "1e-300"],
    ["sample", "--threads", "100000"],
    ["inpaint", "--image", "DATA", "--mask", "DATA", "--jumps", "3", "--steps", "2"],
])
def test_unbounded_arguments_are_refused_up_front(edgediff_bin, tiny_models, tmp_path, args):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    args = [str(tmp_path / "x.npy") if a == "DATA" else a for a in args]
    proc = run_cli(edgediff_bin, *args, "--model", str(tiny_models["linear"]), "-q", check=False)
    assert proc.returncode == 2 and "must be in" in proc.stderr, proc.stderr


def test_version_help_and_the_help_text(edgediff_bin):
    version = run_cli(edgediff_bin, "--version").stdout
    assert version.startswith("edgediff ") and version.split()[1][0].isdigit()
    short, long = run_cli(edgediff_bin, "-h").stdout, run_cli(edgediff_bin, "--help").stdout
    assert short == long and "Commands:" in long
    assert "{{" not in long and "L_1..L_(T-1)" in long  # argh used to print L_{{T-1}} here
    assert run_cli(edgediff_bin, "sample", "-h").stdout == run_cli(edgediff_bin, "sample", "--help").stdout


def test_a_model_declaring_an_impossible_sample_is_refused_at_open(edgediff_bin, tmp_path):
    """It used to open, then say "use at most --batch-size 0" at sampling."""
    import onnx
    import torch
    from edgediff_export.metadata import make_metadata, write_metadata
    from edgediff_export.schedules import schedule_metadata

    class Twice(torch.nn.Module):
        def forward(self, sample, timestep):
            return sample * 2 + 0 * timestep.float().sum()

    dst = tmp_path / "m.onnx"
    torch.onnx.export(Twice(), (torch.randn(2, 1, 8, 8), torch.tensor([1, 2])), str(dst),
                      input_names=["sample", "timestep"], output_names=["out"], opset_version=17, dynamo=False,
                      dynamic_axes={"sample": {0: "N", 2: "H", 3: "W"}, "timestep": {0: "N"},
                                    "out": {0: "N", 2: "H", 3: "W"}})
    proto = onnx.load(str(dst))
    write_metadata(proto, make_metadata(name="huge", description="", prediction="epsilon", time_input="index",
                                        schedule=schedule_metadata("linear"), sample_shape=[1, 65536, 65536]))
    onnx.save(proto, str(dst))
    proc = run_cli(edgediff_bin, "sample", "--model", str(dst), "-q", "--out", str(tmp_path / "x.npy"), check=False)
    assert proc.returncode == 3 and "makes one sample 16.0 GiB" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("args,code", [
    (["likelihood", "--data", "DATA", "--per-image", "/nonexistent-dir/x.csv"], 4),
    (["calibrate", "--steps", "2", "-o", "/nonexistent-dir/t.txt"], 4),
    (["invert", "--image", "DATA", "-o", "TMP"], 2),
    (["invert", "--image", "DATA", "--reconstruction", "/nonexistent-dir/r.png"], 4),
    (["interpolate", "-o", "/nonexistent-dir/s.png"], 4),
    (["inpaint", "--image", "DATA", "--mask", "DATA", "-o", "/nonexistent-dir/o.npy"], 4),
])
def test_outputs_written_at_the_end_are_checked_before_the_work(edgediff_bin, tiny_models, tmp_path, args, code):
    """These commands write their one output after all the network calls; a destination that
    cannot take it used to fail only then."""
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    args = [str(tmp_path / "x.npy") if a == "DATA" else str(tmp_path) if a == "TMP" else a for a in args]
    proc = run_cli(edgediff_bin, *args, "--model", str(tiny_models["linear"]), "-q", "--json", check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "", "no work was reported: the check came first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
