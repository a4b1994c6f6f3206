"""The pipeline exporter's precision and size (issue 18 part 2): `edgediff-export diffusers DIR
--precision fp16`, and graphs with ONNX external data (`model.onnx` + `model.onnx_data`, how a
graph over protobuf's 2 GB limit is stored), on the tiny random pipeline of tests/sd_tiny.py.

Tolerances:
- each fp16 graph against its fp32 graph: precision.FP16_RTOL (2e-2 of max |output|), which the
  exporter itself enforces (on ONNX Runtime's CPU provider); measured on the tiny pipeline
  7.1e-4 (text encoder), 1.3e-3 (U-Net), 4.1e-4 (VAE decoder), 1.2e-3 (VAE encoder), and with
  every fp16 value stored in fp16 (onnx's reference evaluator, as a GPU's fp16 kernels store
  them) 9.1e-4, 1.2e-3, 7.3e-4, 1.5e-3;
- end to end, the same prompt, seed and sampler through the fp16 and the fp32 folder: decoded
  images (in [-1, 1]) within 2e-2 max abs, about 2.5 levels of 255. Each U-Net call differs by
  ~1e-3 relative, guidance 7.5 scales the difference of two such calls by 7.5, and the
  sampler's steps carry it on; 10 DDIM steps measure 1.6e-3 max abs, 2.5e-4 mean;
- external data against inline graphs: the same bytes (the same weights, loaded another way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import sd_tiny
from conftest import ROOT, run_cli

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

GRAPHS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PROMPT = "a lighthouse at dusk"
IMAGE_TOL = 2e-2


def export(src: Path, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter" / "src")}
    proc = subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src), "--out",
                           str(out), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"export failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print("\n".join(line for line in proc.stderr.splitlines() if "MB" in line))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path | dict]:
    """The fp32 inline export (shared with the other tests of the process), an fp16 export,
    and an fp32 export with external data forced on every graph (threshold 0 bytes)."""
    inline = sd_tiny.exported()
    src = inline.parent / "tiny"
    d = tmp_path_factory.mktemp("pipeline-export")
    fp16 = export(src, d / "fp16", "--precision", "fp16")
    external = export(src, d / "external", "--external-data-threshold", "0")
    return {"src": src, "fp32": inline, "fp16": d / "fp16", "external": d / "external",
            "fp16_report": fp16, "external_report": external}


def sample(binary: Path, model: Path, out: Path, *extra: str) -> np.ndarray:
    run_cli(binary, "sample", "--model", str(model), "--prompt", PROMPT, "-n", "2", "--steps", "10",
            "--seed", "3", "-q", "--out", str(out), *extra)
    return np.load(out)


def weight_bytes(path: Path) -> dict[int, int]:
    """Bytes of the graph's initializers by element type (external data included)."""
    sizes: dict[int, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + len(t.raw_data)
    return sizes


_rng = np.random.default_rng(0)
REFERENCE_FEEDS = {
    "text_encoder": lambda: {"input_ids": _rng.integers(0, 500, (1, 77)).astype(np.int64)},
    "unet": lambda: {"sample": _rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
                     "timestep": np.array([500.5], np.float32),
                     "encoder_hidden_states": _rng.standard_normal((1, 77, 32)).astype(np.float32)},
    "vae_decoder": lambda: {"latent_sample": (_rng.standard_normal((1, 4, 8, 8)) / 0.18215).astype(np.float32)},
    "vae_encoder": lambda: {"sample": _rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)},
}


def test_fp16_graphs_are_fp16_inside_with_float32_io_and_islands(folders):
    from onnx.reference import ReferenceEvaluator
    report = folders["fp16_report"]
    assert report["precision"] == "fp16"
    from edgediff_export.precision import FP16_RTOL
    for part in GRAPHS:
        check = report["checks"][part]
        print(f"{part}: fp16 vs fp32 {check['fp16_max_rel_diff']:.1e} relative")
        assert check["fp16_max_rel_diff"] <= FP16_RTOL and not check["external_data"]
        ours, theirs = folders["fp16"] / part / "model.onnx", folders["fp32"] / part / "model.onnx"
        g16, g32 = onnx.load(str(ours)).graph, onnx.load(str(theirs)).graph
        # The same inputs and outputs, float32: the runtime feeds and reads them as for fp32.
        io = lambda g: [(v.name, v.type.tensor_type.elem_type) for v in [*g.input, *g.output]]  # noqa: E731
        assert io(g16) == io(g32)
        # Most of the weights are float16: the fp32 ones are the islands' few.
        w16, w32 = weight_bytes(ours), weight_bytes(theirs)
        share = w16.get(onnx.TensorProto.FLOAT16, 0) / sum(w16.values())
        print(f"{part}: weights {sum(w16.values())} bytes, {share:.0%} of them float16 "
              f"(fp32 export: {sum(w32.values())} bytes)")
        assert sum(w16.values()) < 0.75 * sum(w32.values())
        # Stored in fp16 as a device with fp16 kernels stores it (onnx's reference evaluator;
        # ONNX Runtime's CPU provider computes fp16 nodes in fp32), on one random input.
        feed = REFERENCE_FEEDS[part]()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = ReferenceEvaluator(str(theirs)).run(None, feed)
            b = ReferenceEvaluator(str(ours)).run(None, feed)
        err = max(float(np.abs(y.astype(np.float32) - x).max() / np.abs(x).max()) for x, y in zip(a, b))
        print(f"{part}: stored in fp16 (reference evaluator) {err:.1e} relative; fp16 tensors up to "
              f"{check['fp16_peak']:.3g}")
        assert err <= FP16_RTOL
    # The VAE decoder's last blocks compute in float32, on float32 weights.
    g = onnx.load(str(folders["fp16"] / "vae_decoder" / "model.onnx")).graph
    inits = {t.name: t.data_type for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    conv_out = next(n for n in g.node if n.op_type == "Conv" and "/decoder/conv_out/" in n.name)
    weight = conv_out.input[1]
    while weight not in inits:  # through torch's Identity of a shared weight
        weight = producers[weight].input[0]
    assert inits[weight] == onnx.TensorProto.FLOAT
    mid = next(n for n in g.node if n.op_type == "Conv" and "/decoder/mid_block/" in n.name)
    weight = mid.input[1]
    while weight not in inits:
        weight = producers[weight].input[0]
    assert inits[weight] == onnx.TensorProto.FLOAT16


def test_fp16_pipeline_samples_close_to_fp32(edgediff_bin, folders, tmp_path):
    a = sample(edgediff_bin, folders["fp32"], tmp_path / "a.npy")
    b = sample(edgediff_bin, folders["fp16"], tmp_path / "b.npy")
    diff = np.abs(a - b)
    print(f"fp16 vs fp32 pipeline, 10 DDIM steps, guidance 7.5: images max |diff| {diff.max():.1e}, "
          f"mean {diff.mean():.1e}")
    assert np.isfinite(b).all()
    assert diff.max() <= IMAGE_TOL
    assert diff.max() > 0  # it really ran in fp16
    assert np.mean(np.abs(a) < 0.999) > 0.5, "saturated images would prove little"


def _tiny_vae(scale: float):
    """sd_tiny's VAE with the last resnet of its full-resolution up-block scaled by `scale`:
    its residual stream then exceeds fp16's 65504, and conv_norm_out (a GroupNorm, blind to
    scale) brings it back; the decoded image stays finite and ordinary in float32. A trained
    VAE gets there by itself (SDXL's does, hence diffusers' force_upcast)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    conv = vae.decoder.up_blocks[-1].resnets[-1].conv2
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    return vae


def test_naive_fp16_vae_decoder_overflows_and_the_islands_do_not(tmp_path):
    """An fp16 device stores every fp16 node's output in fp16. ONNX Runtime's CPU provider does
    not (it computes fp16 nodes in fp32 and drops the casts between them), so here onnx's
    reference evaluator, which stores each output in its declared type, plays the device; and
    the exporter's own range check (precision.fp16_peak) reads the fp32 graph's values of the
    tensors that would be fp16."""
    import warnings

    from onnx.reference import ReferenceEvaluator
    from onnxconverter_common import float16

    from edgediff_export.pipeline_export import VaeDecoder, _export_graph, fp32_islands
    from edgediff_export.precision import FP16_MAX, FP16_RTOL, _casts_to_float, fp16_peak, to_fp16
    vae = _tiny_vae(1e5)
    module = VaeDecoder(vae).eval()
    acts = {}
    hook = vae.decoder.up_blocks[-1].register_forward_hook(lambda m, i, o: acts.update(up=float(o.abs().max())))
    feed = lambda n, seed: {"latent_sample": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) / 0.18215}  # noqa: E731
    with torch.no_grad():
        ref = module(**feed(3, 1))
    hook.remove()
    print(f"full-resolution up-block activations up to {acts['up']:.3g}; decoded |x| up to {float(ref.abs().max()):.2f}")
    assert acts["up"] > FP16_MAX and torch.isfinite(ref).all() and float(ref.abs().max()) < 10

    checks = [feed(3, 1), feed(1, 2)]
    fp32 = tmp_path / "fp32" / "model.onnx"
    _export_graph(module, feed(2, 0), ["sample"], fp32, checks)
    ours = _export_graph(module, feed(2, 0), ["sample"], tmp_path / "fp16" / "model.onnx", checks,
                         fp16_islands=lambda graph: fp32_islands("vae_decoder", graph, {}))
    print(f"with the islands: fp16 vs fp32 {ours['fp16_max_rel_diff']:.1e} relative (CPU), fp16 tensors up "
          f"to {ours['fp16_peak']:.3g}")
    assert ours["fp16_max_rel_diff"] <= FP16_RTOL and ours["fp16_peak"] < FP16_MAX

    # Without the decoder's island: the converter alone (onnxconverter-common with its default
    # block list, and the casts to float32 of diffusers' attention kept, without which its graph
    # is invalid), and the single-file models' conversion (norms and time embedding in fp32).
    src = onnx.load(str(fp32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        naive = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True,
                                                 node_block_list=_casts_to_float(src.graph))
    others = {"naive": naive, "norms only": to_fp16(src, keep_io_types=True)}
    x = {k: v.numpy()[:1] for k, v in checks[0].items()}
    expect = ReferenceEvaluator(str(fp32)).run(None, x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's fp16 overflow, on purpose
        got = ReferenceEvaluator(str(tmp_path / "fp16" / "model.onnx")).run(None, x)[0]
        err = float(np.abs(got - expect).max() / np.abs(expect).max())
        print(f"with the islands, stored in fp16 (reference evaluator): finite {np.isfinite(got).all()}, "
              f"{err:.1e} relative to fp32")
        assert np.isfinite(got).all() and err <= FP16_RTOL
        for name, proto in others.items():
            bad = float(np.mean(~np.isfinite(ReferenceEvaluator(proto).run(None, x)[0])))
            peak, where = fp16_peak(fp32, proto.graph, [x])
            print(f"{name} fp16 conversion: {bad:.0%} of the decoded values NaN or inf stored in fp16; "
                  f"{where} reaches {peak:.3g}")
            assert bad > 0.5 and peak > FP16_MAX


def test_external_data_samples_the_same_bytes_mapped_or_read(edgediff_bin, folders, tmp_path):
    ext = folders["external"]
    for part in GRAPHS:
        assert folders["external_report"]["checks"][part]["external_data"]
        data = ext / part / "model.onnx_data"
        assert data.is_file() and data.stat().st_size > (ext / part / "model.onnx").stat().st_size / 2, part
        assert not (folders["fp32"] / part / "model.onnx_data").exists()
        assert oct(data.stat().st_mode & 0o777) == oct((ext / part / "model.onnx").stat().st_mode & 0o777)
    ref = sample(edgediff_bin, folders["fp32"], tmp_path / "ref.npy")
    for extra in ([], ["--no-mmap"]):
        got = sample(edgediff_bin, ext, tmp_path / "got.npy", *extra)
        assert got.tobytes() == ref.tobytes(), extra
    # img2img opens the VAE encoder too.
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    np.save(tmp_path / "image.npy", np.stack([xx * 2 - 1, yy * 2 - 1, xx - yy])[None].astype(np.float32))
    i2i = ["--image", str(tmp_path / "image.npy"), "--strength", "0.6"]
    a = sample(edgediff_bin, folders["fp32"], tmp_path / "i2i-a.npy", *i2i)
    b = sample(edgediff_bin, ext, tmp_path / "i2i-b.npy", *i2i)
    assert a.tobytes() == b.tobytes()


def _most_held(log: str) -> int:
    """The most graphs a run's debug log shows held at once."""
    held: set[str] = set()
    most = 0
    for event, graph in re.findall(r"graph (opened|freed): \S*/(\w+)/model\.onnx", log):
        (held.add if event == "opened" else held.discard)(graph)
        most = max(most, len(held))
    return most


@pytest.mark.parametrize("folder,extra", [("fp16", []), ("external", []), ("external", ["--no-mmap"])])
def test_low_memory_runs_fp16_and_external_data_folders(edgediff_bin, folders, tmp_path, folder, extra):
    """`sample --low-memory` (with img2img, so every graph is freed and opened again) gives the
    same bytes on an fp16 folder and on external-data graphs, mapped or read, one graph at a
    time: a graph read into memory (--no-mmap) is freed and read again too."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    np.save(tmp_path / "image.npy", np.stack([xx * 2 - 1, yy * 2 - 1, xx - yy])[None].astype(np.float32))
    i2i = ["--image", str(tmp_path / "image.npy"), "--strength", "0.6", "--batch-size", "1", *extra]
    ref = sample(edgediff_bin, folders[folder], tmp_path / "ref.npy", *i2i)
    env = {"RUST_LOG": "edgediff=debug"}
    log = run_cli(edgediff_bin, "sample", "--model", str(folders[folder]), "--prompt", PROMPT, "-n", "2",
                  "--steps", "10", "--seed", "3", "-q", "--out", str(tmp_path / "low.npy"), *i2i,
                  "--low-memory", env=env).stderr
    assert np.load(tmp_path / "low.npy").tobytes() == ref.tobytes()
    assert _most_held(log) == 1, log[-3000:]
    # The U-Net was freed (at load, and for the decoding) and opened again for the sampling.
    assert len(re.findall(r"graph freed: \S*/unet/model\.onnx", log)) == 2, log[-3000:]


def test_an_optimum_folder_with_unet_onnx_data_loads(edgediff_bin, folders, tmp_path):
    """optimum's layout: no edgediff.json, and only the graph over 2 GB (the U-Net) in two files."""
    bare = tmp_path / "optimum"
    shutil.copytree(folders["fp32"], bare)
    (bare / "edgediff.json").unlink()
    for f in ("model.onnx", "model.onnx_data"):
        shutil.copy2(folders["external"] / "unet" / f, bare / "unet" / f)
    ref = sample(edgediff_bin, folders["fp32"], tmp_path / "ref.npy")
    got = sample(edgediff_bin, bare, tmp_path / "got.npy")
    assert got.tobytes() == ref.tobytes()


def test_the_weights_in_the_data_file_are_part_of_the_fingerprint(edgediff_bin, folders, tmp_path):
    """A resumed run continues only the same model's output: other weights in unet/model.onnx_data
    (the graph file unchanged) are another model."""
    pipe = tmp_path / "pipe"
    shutil.copytree(folders["external"], pipe)
    out = tmp_path / "x.npy"
    sample(edgediff_bin, pipe, out)
    data = pipe / "unet" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    weights = np.frombuffer(raw, np.float32)[:16].copy()
    raw[:64] = (weights + 0.25).tobytes()
    data.write_bytes(bytes(raw))
    proc = run_cli(edgediff_bin, "sample", "--model", str(pipe), "--prompt", PROMPT, "-n", "2", "--steps", "10",
                   "--seed", "3", "-q", "--out", str(out), "--resume", check=False)
    assert proc.returncode == 2 and "was made with --model" in proc.stderr, proc.stderr


def _maps_during_run(binary: Path, model: Path, out: Path, *extra: str) -> set[str]:
    """The files the process maps, polled while it samples."""
    proc = subprocess.Popen([str(binary), "sample", "--model", str(model), "-n", "8", "--steps", "100", "-q",
                             "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[str] = set()
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                seen.update(line.split()[-1] for line in f if "onnx" in line)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return seen


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_onnx_runtime_maps_the_data_files_unless_told_to_read_them(edgediff_bin, folders, tmp_path):
    """What loading a graph with external data does: ONNX Runtime memory-maps the data file and
    uses the tensors no kernel repacks in place, so the U-Net's data file stays mapped for the
    run; --no-mmap reads it and hands the bytes over, and nothing of it is mapped."""
    pipe = tmp_path / "pipe"
    shutil.copytree(folders["external"], pipe)
    data = str(pipe / "unet" / "model.onnx_data")
    mapped = _maps_during_run(edgediff_bin, pipe, tmp_path / "a.npy")
    read = _maps_during_run(edgediff_bin, pipe, tmp_path / "b.npy", "--no-mmap")
    print("mapped during a run:", sorted(Path(m).relative_to(pipe).as_posix() for m in mapped if m.startswith(str(pipe))))
    assert data in mapped
    assert data not in read
