#!/usr/bin/env python3
"""Fleet generation on Ray: one `edgediff sample` job of TOTAL samples, cut into index ranges
(`--first-index`), run as Ray tasks, merged into one `.npy` or PNG folder that is byte for
byte the output of a single `edgediff sample -n TOTAL` (each sample's noise is its own stream
of the seed, so where it is made does not change it).

Usage (everything after `--` goes to every shard's `edgediff sample`):

    tools/fleet/ray_generate.py run --out all.npy -n 100000 --shard-size 1000 --seed 0 \\
        [--shard-dir DIR] [--edgediff BIN] [--address auto | --num-cpus N] [--retries R] \\
        -- --model models/mnist-ddpm.onnx --sampler ddpm --steps 50 --batch-size 100 --threads 1
    tools/fleet/ray_generate.py merge --out all.npy -n 100000 --shard-size 1000 --shard-dir DIR

`run` submits one task per shard not yet complete, each retried on failure (an edgediff that
exits non-zero, a worker or node that dies), then merges. A shard is written under a
temporary name and renamed when edgediff has finished it, so a shard file present is a whole
shard; a rerun skips the shards present and whole (their `.npy` header and size, or their PNG
files' signature and end chunk, checked). `merge` alone merges shards made elsewhere, e.g. by
the Kubernetes Indexed Job of `k8s-indexed-job.yaml` (same shard names). The shard folder must
be one the workers and the driver all see (a shared file system on a real cluster).

Give a `--batch-size` that divides the shard size (and the same to any single run compared
with): the batches are then the same in both, so even a backend whose results depend on the
batch composition gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

NPY_MAGIC = b"\x93NUMPY"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Flags the tool sets on every shard; given after `--` they would contradict its ranges.
OWNED_FLAGS = ("-n", "--first-index", "--out", "-o", "--seed", "--resume", "--init-noise", "--step-noise")
COPY_CHUNK = 1 << 22


@dataclass(frozen=True)
class Job:
    """What makes the merged output what it is: the same Job gives the same bytes."""

    total: int
    shard_size: int
    seed: int
    kind: str  # "npy" or "folder"
    sample_args: list[str] = field(default_factory=list)


def output_kind(out: Path) -> str:
    """The kind of output edgediff writes at `out`: a .npy array or a folder of PNGs."""
    suffix = out.suffix.lower()
    if suffix == ".png":
        raise SystemExit("ray_generate: a .png grid cannot be merged from shards; give a .npy or a folder")
    return "npy" if suffix == ".npy" else "folder"


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    """(first index, n) of each shard: shard_size samples each, the last one the rest."""
    if total < 1 or shard_size < 1:
        raise SystemExit("ray_generate: -n and --shard-size must be at least 1")
    return [(first, min(shard_size, total - first)) for first in range(0, total, shard_size)]


def shard_name(first: int, n: int, kind: str) -> str:
    """A shard's file (or folder) name; the Kubernetes manifest builds the same."""
    return f"shard-{first:012d}-{n}" + (".npy" if kind == "npy" else "")


def shard_command(binary: str, job: Job, first: int, n: int, out: Path) -> list[str]:
    """The edgediff command line that makes samples first..first+n-1 of the job at `out`."""
    return [binary, "sample", *job.sample_args, "-q", "--seed", str(job.seed),
            "--first-index", str(first), "-n", str(n), "--out", str(out)]


def check_sample_args(args: list[str]) -> list[str]:
    """Refuses, in the arguments after `--`, the flags each shard's range sets."""
    for a in args:
        if a.split("=", 1)[0] in OWNED_FLAGS:
            raise SystemExit(f"ray_generate: {a} is set by the tool for each shard; leave it out after --")
    return args


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A float32 .npy header (format 1.0) for `shape`, as edgediff writes it."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }"
    total = len(NPY_MAGIC) + 4 + len(text) + 1
    text += " " * ((64 - total % 64) % 64) + "\n"
    return NPY_MAGIC + b"\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def read_npy_shape(path: Path) -> tuple[tuple[int, ...], int] | None:
    """(shape, header length) of a float32 .npy written as edgediff does; None if it is not one."""
    try:
        with path.open("rb") as f:
            head = f.read(10)
            if len(head) < 10 or head[:6] != NPY_MAGIC or head[6] != 1:
                return None
            length = int.from_bytes(head[8:10], "little")
            text = f.read(length).decode("latin1")
    except OSError:
        return None
    m = re.search(r"'descr': '<f4', 'fortran_order': False, 'shape': \(([0-9, ]*)\)", text)
    if not m:
        return None
    shape = tuple(int(d) for d in m.group(1).replace(" ", "").split(",") if d)
    return shape, 10 + length


def npy_complete(path: Path, n: int) -> bool:
    """Whether `path` is a whole float32 .npy of n samples: its header says n and its size fits."""
    parsed = read_npy_shape(path)
    if parsed is None or not parsed[0] or parsed[0][0] != n:
        return False
    shape, header = parsed
    count = 1
    for d in shape:
        count *= d
    return path.stat().st_size == header + 4 * count


def png_whole(path: Path) -> bool:
    """Whether `path` begins with the PNG signature and ends with the IEND chunk."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            start = f.read(len(PNG_SIGNATURE))
            f.seek(max(0, size - len(PNG_END)))
            end = f.read()
    except OSError:
        return False
    return start == PNG_SIGNATURE and end == PNG_END


def folder_complete(path: Path, first: int, n: int) -> bool:
    """Whether the folder holds the n whole PNGs of samples first..first+n-1 (by global index)."""
    return path.is_dir() and all(png_whole(path / f"{i:06d}.png") for i in range(first, first + n))


def shard_complete(path: Path, first: int, n: int, kind: str) -> bool:
    return npy_complete(path, n) if kind == "npy" else folder_complete(path, first, n)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temps(final: Path) -> None:
    """Removes what killed attempts at `final` left: their temporary outputs, and edgediff's
    hidden partial, lock and record files beside those."""
    for p in final.parent.glob(f".*{final.name}.*.tmp*"):
        remove(p)


def make_shard(binary: str, job: Job, first: int, n: int, final: Path) -> str:
    """Makes one shard at `final` unless it is there and whole; returns what it did. The
    output goes to a temporary name first, so a killed attempt leaves no file at `final`."""
    if shard_complete(final, first, n, job.kind):
        return "present"
    remove_stale_temps(final)
    suffix = ".tmp.npy" if job.kind == "npy" else ".tmp"
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}{suffix}"
    proc = subprocess.run(shard_command(binary, job, first, n, tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        remove_stale_temps(final)
        raise RuntimeError(f"edgediff failed on samples {first}..{first + n - 1} "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    remove(final)  # an incomplete one: replaced
    os.replace(tmp, final)
    record = tmp.parent / f"{tmp.name}.job.json"
    if record.exists():
        os.replace(record, final.parent / f"{final.name}.job.json")
    return "made"


def job_file(shard_dir: Path) -> Path:
    return shard_dir / "fleet-job.json"


def claim_shard_dir(shard_dir: Path, job: Job) -> None:
    """Records the job in the shard folder, refusing one that holds another job's shards."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = job_file(shard_dir)
    want = asdict(job)
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise SystemExit(f"ray_generate: {shard_dir} holds shards of another job (it differs in "
                             f"{', '.join(diff)}); give another --shard-dir or remove it")
        return
    path.write_text(json.dumps(want, indent=1))


def stream_npy(parts: list[Path], out: Path, total: int) -> None:
    """Concatenates the shards' samples into one .npy at `out`, a chunk at a time."""
    first = read_npy_shape(parts[0])
    assert first is not None
    header = npy_header((total, *first[0][1:]))
    with out.open("wb") as dst:
        dst.write(header)
        for part in parts:
            parsed = read_npy_shape(part)
            if parsed is None or parsed[0][1:] != first[0][1:]:
                raise SystemExit(f"ray_generate: {part} is not a sample array of the job's shape")
            with part.open("rb") as src:
                src.seek(parsed[1])
                shutil.copyfileobj(src, dst, COPY_CHUNK)


def copy_folders(parts: list[Path], out: Path) -> None:
    """Copies every shard's PNGs (named by global index) into one folder at `out`."""
    out.mkdir()
    for part in parts:
        for png in sorted(part.glob("*.png")):
            shutil.copyfile(png, out / png.name)


def merge(job: Job, shard_dir: Path, out: Path) -> Path:
    """Merges the job's shards into `out`, through a temporary name; every shard must be whole."""
    ranges = shard_ranges(job.total, job.shard_size)
    parts = [shard_dir / shard_name(first, n, job.kind) for first, n in ranges]
    missing = [p.name for p, (first, n) in zip(parts, ranges) if not shard_complete(p, first, n, job.kind)]
    if missing:
        raise SystemExit(f"ray_generate: {len(missing)} shards are missing or incomplete "
                         f"(first: {missing[0]}); rerun `run` to make them")
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.merging{out.suffix}"
    try:
        if job.kind == "npy":
            stream_npy(parts, tmp, job.total)
        else:
            copy_folders(parts, tmp)
        remove(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            remove(tmp)
    return out


def pending(job: Job, shard_dir: Path) -> Iterator[tuple[int, int, Path]]:
    """The shards not yet present and whole."""
    for first, n in shard_ranges(job.total, job.shard_size):
        final = shard_dir / shard_name(first, n, job.kind)
        if not shard_complete(final, first, n, job.kind):
            yield first, n, final


def run_on_ray(job: Job, shard_dir: Path, binary: str, retries: int,
               log: Callable[[str], None] = print) -> dict[str, int]:
    """Runs the job's pending shards as Ray tasks (Ray must be initialised); counts outcomes."""
    import ray
    from ray import cloudpickle

    if __name__ != "__main__":  # run as a script, cloudpickle sends __main__'s by value anyway
        # Workers need not import this file: its functions travel by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # retry_exceptions: an edgediff that fails is retried as a dead worker is (max_retries).
    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(make_shard)
    todo = list(pending(job, shard_dir))
    log(f"ray_generate: {len(todo)} of {len(shard_ranges(job.total, job.shard_size))} shards to make")
    refs = [task.remote(binary, job, first, n, final) for first, n, final in todo]
    outcomes = ray.get(refs)
    return {"submitted": len(todo), "made": outcomes.count("made"), "present": outcomes.count("present")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ray_generate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "merge"):
        s = sub.add_parser(name, help="make the shards on Ray and merge them" if name == "run"
                           else "merge shards made elsewhere (no Ray)")
        s.add_argument("--out", type=Path, required=True, help="merged output: a .npy or a folder")
        s.add_argument("-n", type=int, required=True, dest="total", help="total samples")
        s.add_argument("--shard-size", type=int, required=True, help="samples per shard (task)")
        s.add_argument("--seed", type=int, default=0, help="edgediff's --seed (default 0)")
        s.add_argument("--shard-dir", type=Path, help="where shards go (default OUT.shards beside OUT)")
        if name == "run":
            s.add_argument("--edgediff", default=os.environ.get("EDGEDIFF_BIN", "edgediff"),
                           help="the edgediff binary on the workers (default $EDGEDIFF_BIN, else edgediff)")
            s.add_argument("--address", help="a Ray cluster to join (e.g. auto); default: a local one")
            s.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
            s.add_argument("--retries", type=int, default=3, help="retries of a failed shard (default 3)")
        s.add_argument("sample_args", nargs=argparse.REMAINDER,
                       help="-- then edgediff sample's options (model, sampler, steps, batch size, ...)")
    a = p.parse_args(argv)
    a.sample_args = check_sample_args(a.sample_args[1:] if a.sample_args[:1] == ["--"] else a.sample_args)
    return a


def job_of(a: argparse.Namespace) -> tuple[Job, Path]:
    job = Job(total=a.total, shard_size=a.shard_size, seed=a.seed, kind=output_kind(a.out),
              sample_args=list(a.sample_args))
    shard_ranges(job.total, job.shard_size)  # checks them
    return job, a.shard_dir or a.out.parent / f"{a.out.name}.shards"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    job, shard_dir = job_of(a)
    claim_shard_dir(shard_dir, job)
    if a.command == "run":
        import ray

        if not ray.is_initialized():
            ray.init(address=a.address, num_cpus=a.num_cpus, include_dashboard=False)
        counts = run_on_ray(job, shard_dir, a.edgediff, a.retries)
        print(f"ray_generate: shards made {counts['made']}, already present {counts['present']}")
    out = merge(job, shard_dir, a.out)
    print(f"ray_generate: wrote {out} ({job.total} samples from {shlex.join(job.sample_args) or 'defaults'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
