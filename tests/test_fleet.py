"""Fleet generation (issue 15 part 3): tools/fleet/ray_generate.py on a local Ray cluster of
this machine (2 CPUs, so 2 workers) makes a job of 24 samples in shards of 8 and merges them
into a .npy and a PNG folder byte for byte equal to one `edgediff sample -n 24`; a worker
killed mid-shard is retried and the result is still equal; a rerun skips whole shards; and the
Kubernetes Indexed Job's shell command builds the tool's command line and shard names."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

ray = pytest.importorskip("ray")

FLEET = ROOT / "tools" / "fleet"
MODEL = ROOT / "models" / "mnist-ddpm.onnx"
# Stochastic (fresh noise each step), and batches that divide the shards.
ARGS = ["--model", str(MODEL), "--sampler", "ddpm", "--steps", "10", "--batch-size", "4", "--threads", "1"]
TOTAL, SHARD, SEED = 24, 8, 7


def load_tool():
    spec = importlib.util.spec_from_file_location("ray_generate", FLEET / "ray_generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ray_generate"] = module
    spec.loader.exec_module(module)
    return module


rg = load_tool()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(edgediff_bin, tmp_path_factory) -> Path:
    """The single-process runs the fleet must reproduce: all.npy and the folder all/."""
    d = tmp_path_factory.mktemp("single")
    for out in ("all.npy", "all"):
        run_cli(edgediff_bin, "sample", *ARGS, "-q", "--seed", str(SEED), "-n", str(TOTAL), "--out", str(d / out))
    return d


def fleet(tmp: Path, out: str, binary: str) -> tuple[dict[str, int], Path]:
    args = rg.parse_args(["run", "--out", str(tmp / out), "-n", str(TOTAL), "--shard-size", str(SHARD),
                          "--seed", str(SEED), "--", *ARGS])
    job, shard_dir = rg.job_of(args)
    rg.claim_shard_dir(shard_dir, job)
    counts = rg.run_on_ray(job, shard_dir, binary, retries=2, log=lambda _: None)
    return counts, rg.merge(job, shard_dir, tmp / out)


def same_folder(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_npy_and_folder_merge_to_the_single_run_and_reruns_skip_whole_shards(
        cluster, edgediff_bin, single, tmp_path):
    counts, out = fleet(tmp_path, "all.npy", str(edgediff_bin))
    assert counts == {"submitted": 3, "made": 3, "present": 0}
    assert out.read_bytes() == (single / "all.npy").read_bytes()
    shards = tmp_path / "all.npy.shards"
    assert sorted(p.name for p in shards.iterdir() if not p.name.endswith(".job.json")) == [
        "fleet-job.json", "shard-000000000000-8.npy", "shard-000000000008-8.npy", "shard-000000000016-8.npy"]
    # A rerun makes nothing; a shard cut short (as by a crash after a rename could not be, or a
    # copy gone wrong) is found by its size and made again.
    assert fleet(tmp_path, "all.npy", str(edgediff_bin))[0]["submitted"] == 0
    cut = shards / "shard-000000000008-8.npy"
    cut.write_bytes(cut.read_bytes()[:-100])
    counts, out = fleet(tmp_path, "all.npy", str(edgediff_bin))
    assert counts == {"submitted": 1, "made": 1, "present": 0}
    assert out.read_bytes() == (single / "all.npy").read_bytes()

    counts, out = fleet(tmp_path, "all", str(edgediff_bin))
    assert counts["made"] == 3
    assert same_folder(out, single / "all")


def killer(tmp: Path, real: Path) -> tuple[Path, Path]:
    """An edgediff stand-in that, the first time only, lets the real one write a batch of its
    shard, then kills it and the Ray worker that ran it (SIGKILL: a node lost mid-shard)."""
    marker = tmp / "killed"
    script = tmp / "edgediff-killer"
    script.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys, time
from pathlib import Path
args = sys.argv[1:]
try:
    os.mkdir({str(marker)!r})
except FileExistsError:
    os.execv({str(real)!r}, [{str(real)!r}, *args])
out = Path(args[args.index("--out") + 1])
partial = out.parent / ("." + out.name + ".partial")
child = subprocess.Popen([{str(real)!r}, *args])
deadline = time.time() + 30
while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 128):
    time.sleep(0.002)
Path({str(marker)!r}, "running-when-killed").write_text(str(child.poll() is None))
child.kill()
child.wait()
os.kill(os.getppid(), signal.SIGKILL)
""")
    script.chmod(0o755)
    return script, marker


def test_a_worker_killed_mid_shard_is_retried_and_the_output_is_the_same(
        cluster, edgediff_bin, single, tmp_path):
    script, marker = killer(tmp_path, edgediff_bin)
    counts, out = fleet(tmp_path, "all.npy", str(script))
    assert (marker / "running-when-killed").read_text() == "True"  # killed mid-shard
    assert counts["made"] == 3
    assert out.read_bytes() == (single / "all.npy").read_bytes()
    # The killed attempt's temporary files were cleared by its retry.
    left = [p.name for p in (tmp_path / "all.npy.shards").iterdir() if ".tmp" in p.name]
    assert left == []


def test_merge_refuses_missing_shards_and_another_job(tmp_path):
    args = rg.parse_args(["merge", "--out", str(tmp_path / "x.npy"), "-n", "10", "--shard-size", "4", "--", *ARGS])
    job, shard_dir = rg.job_of(args)
    assert rg.shard_ranges(job.total, job.shard_size) == [(0, 4), (4, 4), (8, 2)]
    rg.claim_shard_dir(shard_dir, job)
    with pytest.raises(SystemExit, match="3 shards are missing"):
        rg.merge(job, shard_dir, tmp_path / "x.npy")
    other = rg.Job(**{**job.__dict__, "seed": 1})
    with pytest.raises(SystemExit, match="differs in seed"):
        rg.claim_shard_dir(shard_dir, other)
    with pytest.raises(SystemExit, match="--first-index"):
        rg.parse_args(["run", "--out", "x.npy", "-n", "4", "--shard-size", "2", "--", "--first-index", "3"])


def test_the_kubernetes_indexed_job_builds_the_tools_command_and_names(tmp_path):
    """No cluster here: the manifest is parsed and its container command run by sh for each
    completion index, with a stand-in edgediff that records its arguments and writes --out."""
    yaml = pytest.importorskip("yaml")
    manifest = yaml.safe_load((FLEET / "k8s-indexed-job.yaml").read_text())
    spec = manifest["spec"]
    assert manifest["kind"] == "Job" and spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    total, shard = int(env["TOTAL"]), int(env["SHARD"])
    ranges = rg.shard_ranges(total, shard)
    assert spec["completions"] == len(ranges)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "edgediff"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SHARDS/argv-$JOB_COMPLETION_INDEX"\n'
                    'while [ "$1" != "--out" ]; do shift; done\n: > "$2"\n')
    stub.chmod(0o755)
    job = rg.Job(total=total, shard_size=shard, seed=int(env["SEED"]), kind="npy",
                 sample_args=shlex.split(env["EDGEDIFF_ARGS"]))
    for index, (first, n) in enumerate(ranges):
        run_env = {**os.environ, **env, "SHARDS": str(tmp_path), "JOB_COMPLETION_INDEX": str(index),
                   "HOSTNAME": f"pod-{index}", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        subprocess.run([*container["command"], *container["args"]], env=run_env, check=True)
        argv = (tmp_path / f"argv-{index}").read_text().splitlines()
        want = rg.shard_command("edgediff", job, first, n, Path("TMP"))[1:]
        assert argv[:-1] == want[:-1]  # all but the temporary --out path
        assert (tmp_path / rg.shard_name(first, n, "npy")).exists()
        assert not any(p.name.endswith(".tmp.npy") for p in tmp_path.iterdir())
