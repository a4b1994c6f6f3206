"""Memory for small boxes (issue 18 part 7): `sample --low-memory` holds one graph of a
text-to-image pipeline at a time and gives the same bytes; `--vae-tiles T` decodes the latents
in overlapping tiles, blended so that it agrees with untiled decoding as far as a VAE allows.
Peak memory itself is measured by benches/bench_pipeline_memory.py, not here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import sd_tiny
from conftest import run_cli

pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a lighthouse at dusk", "blurry low quality"
GRAPHS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def held_graphs(log: str) -> tuple[int, list[str]]:
    """From a run's debug log: the most graphs held at once, and the order graphs were opened."""
    held: set[str] = set()
    most, opened = 0, []
    for m in re.finditer(r"graph (opened|freed): \S*/(\w+)/model\.onnx", log):
        event, graph = m.groups()
        if event == "opened":
            held.add(graph)
            opened.append(graph)
        else:
            held.discard(graph)
        most = max(most, len(held))
    return most, opened


def run_logged(binary: Path, *args: str) -> str:
    return run_cli(binary, "sample", *args, env={"RUST_LOG": "edgediff=debug"}).stderr


CASES = {
    # Guidance with a negative prompt, three batches, the latents kept too.
    "guided": lambda d, t: ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "-n", "5",
                            "--batch-size", "2", "--latents-out", str(t / "lat.npy")],
    # One prompt per sample: every distinct line is encoded before the U-Net is opened.
    "prompts": lambda d, t: ["--prompts", str(d / "p.txt"), "-n", "5", "--batch-size", "2"],
    # img2img: the VAE encoder is held only while it encodes the images.
    "img2img": lambda d, t: ["--prompt", PROMPT, "--image", str(d / "img.npy"), "--strength", "0.6",
                             "-n", "3", "--batch-size", "2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_low_memory_gives_the_same_bytes_holding_one_graph_at_a_time(edgediff_bin, tmp_path, case):
    model = sd_tiny.exported()
    (tmp_path / "p.txt").write_text("a red dog\nthe sea\na red dog\n", encoding="utf-8")
    np.save(tmp_path / "img.npy", np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32))
    outs = {}
    for mode, flags in (("normal", []), ("low", ["--low-memory"])):
        d = tmp_path / mode
        d.mkdir()
        log = run_logged(edgediff_bin, "--model", str(model), "--steps", "4", "-q", "--out",
                         str(d / "x.npy"), *CASES[case](tmp_path, d), *flags)
        outs[mode] = (d, *held_graphs(log))
    (dn, most_n, _), (dl, most_l, opened) = outs["normal"], outs["low"]
    assert (dn / "x.npy").read_bytes() == (dl / "x.npy").read_bytes()
    if case == "guided":
        assert (dn / "lat.npy").read_bytes() == (dl / "lat.npy").read_bytes()
    # Normal mode holds the text encoder, U-Net and decoder together; low-memory mode one.
    assert most_n >= 3 and most_l == 1, (most_n, most_l)
    # Each graph is opened once at load (to check it) and once in the run: the U-Net and the
    # decoder are not reopened per batch.
    assert opened.count("unet") == 2 and opened.count("vae_decoder") == 2, opened
    run = opened[3:]  # after the load's checks (unet, vae_decoder, text_encoder)
    assert run[-2:] == ["unet", "vae_decoder"], opened
    assert run.count("vae_encoder") == (case == "img2img"), opened


@pytest.mark.parametrize("inpainting,strength", [(False, 1.0), (True, 1.0), (True, 0.6)])
def test_low_memory_inpaints_the_same_bytes_holding_one_graph_at_a_time(edgediff_bin, tmp_path, inpainting,
                                                                        strength):
    """`inpaint --low-memory`, for an ordinary U-Net (the image latents pinned) and a 9-channel
    inpainting U-Net (the mask and masked image's latents as input; below strength 1 the image
    encoded twice): the VAE encoder is held alone, before the prompts, and the bytes are the
    same."""
    model = sd_tiny.exported(inpainting=inpainting)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "img.npy", rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32))
    mask = np.zeros((3, 1, 16, 16), np.float32)
    mask[:, :, 3:11, 5:14] = 1
    np.save(tmp_path / "mask.npy", mask)
    outs = {}
    for mode, flags in (("normal", []), ("low", ["--low-memory"])):
        out = tmp_path / f"{mode}.npy"
        log = run_cli(edgediff_bin, "inpaint", "--model", str(model), "--image", str(tmp_path / "img.npy"),
                      "--mask", str(tmp_path / "mask.npy"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                      "--strength", str(strength), "--steps", "4", "--batch-size", "2", "-q", "--out", str(out),
                      *flags, env={"RUST_LOG": "edgediff=debug"}).stderr
        outs[mode] = (out, *held_graphs(log))
    (on, most_n, _), (ol, most_l, opened) = outs["normal"], outs["low"]
    assert on.read_bytes() == ol.read_bytes()
    assert most_n >= 3 and most_l == 1, (most_n, most_l)
    # After the load's checks: the encoder alone, then the stages of any run, each opened once.
    assert opened[3:] == ["vae_encoder", "text_encoder", "unet", "vae_decoder"], opened


def test_low_memory_runs_an_optimum_folder(edgediff_bin, tmp_path):
    """optimum's folder as it is (no edgediff.json, a scalar-timestep U-Net, no vae_encoder):
    the same bytes, one graph at a time, the U-Net opened again with its scalar timestep."""
    folder = Path(__file__).resolve().parent / "data" / "optimum-tiny"
    outs = {}
    for mode, flags in (("normal", []), ("low", ["--low-memory"])):
        d = tmp_path / mode
        d.mkdir()
        log = run_logged(edgediff_bin, "--model", str(folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                         "-n", "3", "--batch-size", "2", "--steps", "4", "-q", "--out", str(d / "x.npy"), *flags)
        outs[mode] = (d, *held_graphs(log))
    (dn, most_n, _), (dl, most_l, opened) = outs["normal"], outs["low"]
    assert (dn / "x.npy").read_bytes() == (dl / "x.npy").read_bytes()
    assert most_n >= 3 and most_l == 1, (most_n, most_l)
    assert opened.count("unet") == 2 and "vae_encoder" not in opened, opened


def test_low_memory_png_folder_and_resume_are_unchanged(edgediff_bin, tmp_path):
    """A folder of PNGs is the same in both modes, and a low-memory run resumes a normal one
    (the mode is not part of the job: it does not change a sample)."""
    model = sd_tiny.exported()
    common = ["sample", "--model", str(model), "--prompt", PROMPT, "-n", "3", "--batch-size", "2",
              "--steps", "3", "-q"]
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "a"))
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "b"), "--low-memory")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(names) == 3
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    (tmp_path / "a" / names[-1]).unlink()
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "a"), "--resume", "--low-memory")
    assert (tmp_path / "a" / names[-1]).read_bytes() == (tmp_path / "b" / names[-1]).read_bytes()


# ---- tiled VAE decoding -------------------------------------------------------------------

def reference_tiled(decode, z: np.ndarray, tile: int, overlap: int, factor: int) -> np.ndarray:
    """The blend runtime/src/tiles.rs documents, written again: full tiles spread evenly with
    at least `overlap`, raised-cosine ramps across each overlap, weights divided by their sum."""
    def starts(n):
        if n <= tile:
            return [0]
        k = -(-(n - tile) // (tile - overlap)) + 1
        return [(2 * i * (n - tile) + k - 1) // (2 * (k - 1)) for i in range(k)]  # nearest, halves up

    def weights(st, n):
        spans = [(s * factor, (s + tile) * factor) for s in st]
        raw = []
        for i, (a, b) in enumerate(spans):
            p = np.arange(a, b) + 0.5
            w = np.ones(b - a)
            if i > 0:
                e = spans[i - 1][1]
                w *= np.where(p < e, 0.5 - 0.5 * np.cos(np.pi * (p - a) / (e - a)), 1.0)
            if i + 1 < len(spans):
                s = spans[i + 1][0]
                w *= np.where(p >= s, 0.5 - 0.5 * np.cos(np.pi * (b - p) / (b - s)), 1.0)
            raw.append(w)
        total = np.zeros(n * factor)
        for (a, b), w in zip(spans, raw):
            total[a:b] += w
        return [w / total[a:b] for (a, b), w in zip(spans, raw)]

    n, _, h, w = z.shape
    ys, xs = starts(h), starts(w)
    out = np.zeros((n, 3, h * factor, w * factor), np.float64)
    for y0, wy in zip(ys, weights(ys, h)):
        for x0, wx in zip(xs, weights(xs, w)):
            part = decode(z[:, :, y0:y0 + tile, x0:x0 + tile])
            out[:, :, y0 * factor:(y0 + tile) * factor, x0 * factor:(x0 + tile) * factor] += \
                np.outer(wy, wx) * part
    return out


# Measured on this pipeline and run (tiles of 16 of the 32x32 latents, overlap 4 rounded up to
# 8 by the even spread): max 0.149, mean 0.0134 of images in [-1, 1] whose std is 0.31;
# diffusers' tiled_decode of the same latents and tile size: max 0.255, mean 0.0240. A random
# VAE's group norms and mid-block attention see the whole latent, which no blend restores.
TILE, TILED_MAX, TILED_MEAN = 16, 0.2, 0.02


def test_vae_tiles_agree_with_untiled_decoding(edgediff_bin, tmp_path):
    import onnxruntime as ort
    import torch
    from diffusers import AutoencoderKL
    model = sd_tiny.exported(sample_size=32)
    common = ["sample", "--model", str(model), "--prompt", PROMPT, "-n", "4", "--steps", "4", "-q"]
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "full.npy"), "--latents-out", str(tmp_path / "z.npy"))
    full, z = np.load(tmp_path / "full.npy"), np.load(tmp_path / "z.npy")
    assert full.shape == (4, 3, 64, 64) and z.shape == (4, 4, 32, 32)
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "tiled.npy"), "--vae-tiles", str(TILE))
    tiled = np.load(tmp_path / "tiled.npy")
    diff = np.abs(tiled - full)
    print(f"tiles of {TILE}: max abs diff {diff.max():.4f}, mean {diff.mean():.5f} (image std {full.std():.3f})")
    assert diff.max() <= TILED_MAX and diff.mean() <= TILED_MEAN
    assert diff.mean() > 0  # several tiles really were decoded

    # The documented blend, written again over the decoder graph, gives the same images.
    sess = ort.InferenceSession(str(model / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    scale = json.loads((model / "edgediff.json").read_text())["vae"]["scaling_factor"]
    zs = z / np.float32(scale)
    decode = lambda t: sess.run(None, {"latent_sample": np.ascontiguousarray(t)})[0]
    ref = np.clip(reference_tiled(decode, zs, TILE, TILE // 4, 2), -1, 1)
    assert np.abs(ref - tiled).max() < 1e-5

    # No worse than diffusers' own tiled decoding of the same latents and tile size.
    vae = AutoencoderKL.from_pretrained(str(model.parent / "tiny32" / "vae")).eval()
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = TILE, 2 * TILE
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(zs)).sample.clamp(-1, 1).numpy()
    d2 = np.abs(theirs - full)
    print(f"diffusers' tiled_decode: max abs diff {d2.max():.4f}, mean {d2.mean():.5f}")
    assert diff.max() <= d2.max() and diff.mean() <= d2.mean()

    # Low-memory mode changes nothing of it.
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "tiled-low.npy"), "--vae-tiles", str(TILE),
            "--low-memory")
    assert (tmp_path / "tiled-low.npy").read_bytes() == (tmp_path / "tiled.npy").read_bytes()


@pytest.mark.parametrize("tile", [32, 4096])
def test_a_tile_covering_the_latents_decodes_the_same_bytes(edgediff_bin, tmp_path, tile):
    model = sd_tiny.exported(sample_size=32)
    common = ["sample", "--model", str(model), "--prompt", PROMPT, "-n", "2", "--steps", "2", "-q"]
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "a.npy"))
    run_cli(edgediff_bin, *common, "--out", str(tmp_path / "b.npy"), "--vae-tiles", str(tile))
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_vae_tiles_are_part_of_the_job(edgediff_bin, tmp_path):
    """Tiling changes the images, so a resume with another tile size (or none) is refused."""
    model = sd_tiny.exported()
    common = ["sample", "--model", str(model), "-n", "2", "--steps", "2", "-q", "--out", str(tmp_path / "o")]
    run_cli(edgediff_bin, *common, "--vae-tiles", "4")
    for other in (["--vae-tiles", "6"], []):
        proc = subprocess.run([str(edgediff_bin), *common, "--resume", *other], capture_output=True, text=True)
        assert proc.returncode == 2 and "was made with --vae-tiles" in proc.stderr, proc.stderr
    run_cli(edgediff_bin, *common, "--resume", "--vae-tiles", "4")


def test_the_exported_decoder_takes_any_latent_size():
    """edgediff-export writes the VAE decoder with dynamic height and width (tiles need it)."""
    import onnx
    proto = onnx.load(str(sd_tiny.exported() / "vae_decoder" / "model.onnx"), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:2]] == [4]
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3])), dims
