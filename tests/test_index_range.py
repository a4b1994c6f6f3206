"""Index ranges (issue 15 part 2): `--first-index K -n N` makes samples K..K+N-1 of the seed's
stream, byte for byte those of one run with `-n K+N`, for deterministic and stochastic
samplers, with a prompt list on a text-to-image pipeline, and for inpainting; folder outputs
name files by the global index so range folders merge by copying; a resume of another range is
refused. Exact equality is the claim (each sample's noise is its own stream, so nothing but the
float rounding of the network could differ, and the ranges here run with the run's own batch
boundaries or, where they do not, the network rows are computed alike on this CPU)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli

PIPELINE = ROOT / "tests" / "data" / "optimum-tiny"
# (first index, n) of the ranges that together make the run of 7.
RANGES = [(0, 2), (2, 3), (5, 2)]


def sample(binary, *args: str) -> None:
    run_cli(binary, "sample", "--threads", "1", "-q", *args)


def ranges_equal_run(binary, tmp, common: list[str], total: int = 7) -> np.ndarray:
    """Samples `total` in one run and in RANGES; asserts the rows agree byte for byte."""
    sample(binary, *common, "-n", str(total), "--batch-size", "3", "--out", str(tmp / "whole.npy"))
    whole = np.load(tmp / "whole.npy")
    parts = []
    for first, n in RANGES:
        out = tmp / f"range-{first}.npy"
        sample(binary, *common, "--first-index", str(first), "-n", str(n), "--batch-size", "2", "--out", str(out))
        parts.append(np.load(out))
    merged = np.concatenate(parts)
    assert merged.shape == whole.shape
    assert merged.tobytes() == whole.tobytes()
    # The ranges are not all the same samples: a first index that did nothing would fail here.
    assert not np.array_equal(parts[0], parts[2])
    return whole


@pytest.mark.parametrize("sampler", ["ddpm", "euler-a", "dpm++2m-sde", "dpm++2m", "adaptive"])
def test_ranges_make_the_run_for_every_kind_of_sampler(edgediff_bin, tiny_models, tmp_path, sampler):
    steps = [] if sampler == "adaptive" else ["--steps", "4"]
    ranges_equal_run(edgediff_bin, tmp_path,
                     ["--model", str(tiny_models["linear"]), "--sampler", sampler, *steps, "--seed", "11"])


def test_ranges_follow_the_prompt_list_of_a_pipeline(edgediff_bin, tmp_path):
    """Sample i takes line (first_index + i) % lines: a range from 5 starts at line 2 of 3."""
    (tmp_path / "p.txt").write_text("a red dog\nthe sea\na lighthouse at dusk\n", encoding="utf-8")
    whole = ranges_equal_run(edgediff_bin, tmp_path, ["--model", str(PIPELINE), "--prompts", str(tmp_path / "p.txt"),
                                                      "--sampler", "euler-a", "--steps", "3", "--seed", "4"])
    # Against single-prompt runs: range sample 5 is line 2's prompt on stream 5.
    sample(edgediff_bin, "--model", str(PIPELINE), "--prompt", "a lighthouse at dusk", "--sampler", "euler-a",
           "--steps", "3", "--seed", "4", "--first-index", "5", "-n", "1", "--out", str(tmp_path / "one.npy"))
    assert np.load(tmp_path / "one.npy").tobytes() == whole[5:6].tobytes()


def test_folder_ranges_are_named_by_global_index_and_merge_by_copying(edgediff_bin, tiny_models, tmp_path):
    common = ["--model", str(tiny_models["linear"]), "--sampler", "ddpm", "--steps", "3"]
    sample(edgediff_bin, *common, "-n", "7", "--out", str(tmp_path / "whole"))
    merged = tmp_path / "merged"
    merged.mkdir()
    for first, n in RANGES:
        folder = tmp_path / f"range-{first}"
        sample(edgediff_bin, *common, "--first-index", str(first), "-n", str(n), "--out", str(folder))
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(first, first + n)]
        for p in folder.iterdir():
            shutil.copy(p, merged / p.name)
    whole = sorted((tmp_path / "whole").iterdir())
    assert [p.name for p in whole] == sorted(p.name for p in merged.iterdir())
    assert all(p.read_bytes() == (merged / p.name).read_bytes() for p in whole)


def test_inpainting_ranges_take_their_own_images(edgediff_bin, tiny_models, tmp_path):
    """Images K..K+N of a job with --first-index K inpaint as in the job's one run (ddpm: fresh
    noise every step, and the pixel model's pinning noise, both of the global index)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 2:6, 2:6] = 1
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "part.npy", images[2:])
    np.save(tmp_path / "mask.npy", mask)
    common = ["inpaint", "--model", str(tiny_models["linear"]), "--mask", str(tmp_path / "mask.npy"),
              "--sampler", "ddpm", "--steps", "4", "--seed", "3", "-q", "--threads", "1"]
    run_cli(edgediff_bin, *common, "--image", str(tmp_path / "images.npy"), "--out", str(tmp_path / "whole.npy"))
    run_cli(edgediff_bin, *common, "--image", str(tmp_path / "part.npy"), "--first-index", "2",
            "--batch-size", "2", "--out", str(tmp_path / "range.npy"))
    whole, part = np.load(tmp_path / "whole.npy"), np.load(tmp_path / "range.npy")
    assert part.tobytes() == whole[2:].tobytes()
    # From index 0 the same images are other samples.
    run_cli(edgediff_bin, *common, "--image", str(tmp_path / "part.npy"), "--out", str(tmp_path / "zero.npy"))
    assert not np.array_equal(np.load(tmp_path / "zero.npy"), part)


def test_the_job_record_holds_the_range_and_resume_continues_only_it(edgediff_bin, tiny_models, tmp_path):
    common = ["--model", str(tiny_models["linear"]), "--steps", "2", "--out", str(tmp_path / "r")]
    sample(edgediff_bin, *common, "--first-index", "4", "-n", "3")
    import json
    record = json.loads((tmp_path / "r.job.json").read_text())
    assert record["first_index"] == 4 and record["n"] == 3 and record["complete"] is True
    # The same range resumes (nothing left to do); another is refused by name.
    sample(edgediff_bin, *common, "--first-index", "4", "-n", "3", "--resume")
    proc = run_cli(edgediff_bin, "sample", "-q", *common, "--first-index", "3", "-n", "3", "--resume", check=False)
    assert proc.returncode == 2
    assert "was made with --first-index 4, this run has 3" in proc.stderr
    # A record from index 0 has no entry (older records stay resumable) and reads as 0.
    sample(edgediff_bin, *common[:-1], str(tmp_path / "z"), "-n", "2")
    assert "first_index" not in json.loads((tmp_path / "z.job.json").read_text())
    proc = run_cli(edgediff_bin, "sample", "-q", *common[:-1], str(tmp_path / "z"), "--first-index", "2", "-n", "2",
                   "--resume", check=False)
    assert "was made with --first-index 0, this run has 2" in proc.stderr


class NanAboveThreshold(torch.nn.Module):
    """eps = 0.1 x, except NaN for samples with some |x| above 3.2: about one sample in 45 of
    standard normal 4x4 noise fails at its first call, which sample depending on its stream."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        big = sample.abs().flatten(1).amax(1) > 3.2
        nan = torch.full_like(sample, float("nan"))
        return torch.where(big[:, None, None, None], nan, 0.1 * sample) + 0 * timestep.float()[:, None, None, None]


def test_error_messages_name_the_global_sample(edgediff_bin, tmp_path):
    import onnx
    from edgediff_export.metadata import make_metadata, write_metadata
    from edgediff_export.schedules import schedule_metadata
    path = tmp_path / "nan.onnx"
    torch.onnx.export(NanAboveThreshold(), (torch.randn(2, 1, 4, 4), torch.tensor([1, 2])), str(path),
                      input_names=["sample", "timestep"], output_names=["out"],
                      dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"}, "out": {0: "N"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    write_metadata(proto, make_metadata(name="nan", description="NaN above a threshold", prediction="epsilon",
                                        time_input="index", schedule=schedule_metadata("linear"),
                                        sample_shape=[1, 4, 4]))
    onnx.save(proto, str(path))

    def failing_sample(*args: str) -> int:
        proc = run_cli(edgediff_bin, "sample", "--model", str(path), "--steps", "1", "--batch-size", "1",
                       "--seed", "1", "-q", "--out", str(tmp_path / "x.npy"), *args, check=False)
        assert proc.returncode == 5, proc.stderr
        return int(re.search(r"sample (\d+)", proc.stderr).group(1))

    first = failing_sample("-n", "200")
    assert first > 0
    # A range from that sample fails at it, under its global number.
    assert failing_sample("--first-index", str(first), "-n", "2") == first
