"""Every row of docs/errors.md, run: each bad input gives its exit code and its exact message,
and leaves nothing at the output path. The table is generated from these runs
(`EDGEDIFF_WRITE_ERRORS_DOC=1 tools/test tests/test_errors.py` rewrites it); the test fails
when the document and the program disagree. Paths in messages appear as $TMP and $REPO.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, run_cli

DOC = ROOT / "docs" / "errors.md"
C_STATUS = {2: "EDGEDIFF_ERR_ARGUMENT", 3: "EDGEDIFF_ERR_MODEL", 4: "EDGEDIFF_ERR_IO",
            5: "EDGEDIFF_ERR_NONFINITE"}


def _strip_metadata(src: Path, dst: Path) -> None:
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    onnx.save(proto, str(dst))


def _set_metadata(src: Path, dst: Path, edit) -> None:
    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key == "edgediff":
            p.value = edit(p.value)
    onnx.save(proto, str(dst))


def _rename_input(src: Path, dst: Path) -> None:
    proto = onnx.load(str(src))
    old = proto.graph.input[1].name
    proto.graph.input[1].name = "time"
    for node in proto.graph.node:
        node.input[:] = ["time" if i == old else i for i in node.input]
    onnx.save(proto, str(dst))


def do(*steps):
    """Runs the setup steps (evaluated as arguments) and returns the last: the CLI arguments."""
    return steps[-1]


# (id, case, setup(tmp, tiny) -> extra CLI args, expected exit code)
def cases():
    return [
        ("not-onnx", "the model file is not ONNX",
         lambda t, m: do((t / "m.onnx").write_text("hello"), ["--model", str(t / "m.onnx")]), 3),
        ("truncated", "a truncated ONNX file",
         lambda t, m: do((t / "m.onnx").write_bytes(m.read_bytes()[:3000]), ["--model", str(t / "m.onnx")]), 3),
        ("no-metadata", "an ONNX model without edgediff metadata",
         lambda t, m: do(_strip_metadata(m, t / "m.onnx"), ["--model", str(t / "m.onnx")]), 3),
        ("bad-metadata", "malformed edgediff metadata (not JSON)",
         lambda t, m: do(_set_metadata(m, t / "m.onnx", lambda v: v[:40]), ["--model", str(t / "m.onnx")]), 3),
        ("missing-field", "metadata missing a field",
         lambda t, m: do(_set_metadata(m, t / "m.onnx", lambda v: v.replace('"prediction"', '"predictionx"')),
                         ["--model", str(t / "m.onnx")]), 3),
        ("shape-mismatch", "metadata shape disagrees with the graph",
         lambda t, m: do(_set_metadata(m, t / "m.onnx", lambda v: re.sub(r'"sample_shape": \[[^\]]*\]',
                                                                         '"sample_shape": [1, 16, 16]', v)),
                         ["--model", str(t / "m.onnx")]), 3),
        ("output-shape", "the network's output is not shaped like its input",
         lambda t, m: _half_size(t), 3),
        ("sample-dtype", "the graph's sample input is not float",
         lambda t, m: _int_sample(t), 3),
        ("missing-input", "the graph lacks the timestep input",
         lambda t, m: do(_rename_input(m, t / "m.onnx"), ["--model", str(t / "m.onnx")]), 3),
        ("unknown-sampler", "unknown sampler", lambda t, m: ["--model", str(m), "--sampler", "magic"], 2),
        ("unknown-spacing", "unknown spacing", lambda t, m: ["--model", str(m), "--spacing", "odd"], 2),
        ("steps-0", "zero steps", lambda t, m: ["--model", str(m), "--steps", "0"], 2),
        ("steps-too-many", "more steps than the schedule has", lambda t, m: ["--model", str(m), "--steps", "1001"], 2),
        ("n-0", "zero samples", lambda t, m: ["--model", str(m), "-n", "0"], 2),
        ("huge-batch", "a batch too large for memory",
         lambda t, m: ["--model", str(m), "-n", "10000000", "--batch-size", "100000000"], 2),
        ("class-unconditional", "a class for an unconditional model", lambda t, m: ["--model", str(m), "--class", "3"], 2),
        ("class-range", "a class label out of range", lambda t, m: _conditional(t), 2),
        ("inpaint-mask", "an inpainting mask of the wrong size", lambda t, m: _inpaint_bad_mask(t, m), 2),
        ("guidance-unconditional", "guidance on an unconditional model",
         lambda t, m: ["--model", str(m), "--guidance", "3"], 2),
        ("bad-eta", "eta outside [0, 1]", lambda t, m: ["--model", str(m), "--eta", "2"], 2),
        ("bad-gamma", "tcd's gamma outside [0, 1]",
         lambda t, m: ["--model", str(m), "--sampler", "tcd", "--gamma", "1.5"], 2),
        ("lcm-continuous", "lcm on a continuous-time (VP) model (its boundary condition is on training indices)",
         lambda t, m: _vp_model(t) + ["--sampler", "lcm"], 2),
        ("lcm-grid-steps", "more steps than the lcm spacing's grid of 50",
         lambda t, m: ["--model", str(m), "--spacing", "lcm", "--steps", "51"], 2),
        ("metadata-sampler", "metadata whose default sampler this runtime lacks",
         lambda t, m: do(_set_metadata(m, t / "m.onnx", lambda v: v[:-1] + ', "sampling": {"sampler": "magic", "steps": 4}}'),
                         ["--model", str(t / "m.onnx")]), 3),
        ("metadata-sampling-timesteps", "metadata whose per-step-count times do not fit their step count",
         lambda t, m: do(_set_metadata(m, t / "m.onnx", lambda v: v[:-1] + ', "sampling": {"sampler": "lcm", "steps": 2, "timesteps": {"2": [749]}}}'),
                         ["--model", str(t / "m.onnx")]), 3),
        ("timestep-cond-dynamic", "a pixel model whose timestep_cond input has a dynamic width",
         lambda t, m: _dynamic_timestep_cond(t), 3),
        ("init-noise-shape", "initial noise of the wrong shape",
         lambda t, m: do(np.save(t / "z.npy", np.zeros((2, 1, 4, 4), np.float32)),
                         ["--model", str(m), "--init-noise", str(t / "z.npy")]), 2),
        ("npy-garbage", "an initial-noise file that is not .npy",
         lambda t, m: do((t / "z.npy").write_text("x"), ["--model", str(m), "--init-noise", str(t / "z.npy")]), 4),
        ("elbo-shape", "ELBO images of the wrong shape for the model",
         lambda t, m: do(np.save(t / "x.npy", np.zeros((2, 1, 5, 5), np.float32)),
                         ["elbo", "--model", str(m), "--data", str(t / "x.npy")]), 2),
        ("elbo-off-grid", "ELBO float images off the 256-level grid",
         lambda t, m: do(np.save(t / "x.npy", np.full((2, 1, 8, 8), 0.3, np.float32)),
                         ["elbo", "--model", str(m), "--data", str(t / "x.npy")]), 2),
        ("elbo-continuous", "the ELBO of a continuous-time (VP) model", lambda t, m: _elbo_continuous(t), 2),
        ("likelihood-shape", "likelihood data of the wrong image shape",
         lambda t, m: do(np.save(t / "x.npy", np.zeros((2, 1, 4, 4), np.float32)),
                         ["likelihood", "--model", str(m), "--data", str(t / "x.npy")]), 2),
        ("likelihood-not-4d", "likelihood data that is not 4-D",
         lambda t, m: do(np.save(t / "x.npy", np.zeros((2, 64), np.float32)),
                         ["likelihood", "--model", str(m), "--data", str(t / "x.npy")]), 4),
        ("likelihood-nan", "likelihood data holding NaN",
         lambda t, m: do(np.save(t / "x.npy", np.full((2, 1, 8, 8), np.nan, np.float32)),
                         ["likelihood", "--model", str(m), "--data", str(t / "x.npy")]), 2),
        ("likelihood-n", "likelihood -n beyond the images in the file",
         lambda t, m: do(np.save(t / "x.npy", np.zeros((2, 1, 8, 8), np.float32)),
                         ["likelihood", "--model", str(m), "--data", str(t / "x.npy"), "-n", "5"]), 2),
        ("likelihood-probes", "an absurd number of Hutchinson probes",
         lambda t, m: ["likelihood", "--model", str(m), "--data", str(t / "x.npy"), "--probes", "100000"], 2),
        ("likelihood-steps", "zero likelihood ODE steps",
         lambda t, m: ["likelihood", "--model", str(m), "--data", str(t / "x.npy"), "--steps", "0"], 2),
        ("likelihood-solver", "both --steps and --rtol for the likelihood",
         lambda t, m: ["likelihood", "--model", str(m), "--data", str(t / "x.npy"), "--steps", "8",
                       "--rtol", "1e-3"], 2),
        ("compare-classifier-alone", "compare: a classifier without reference images",
         lambda t, m: ["compare", "--model", str(m), "--samplers", "ddim",
                       "--classifier", str(ROOT / "models" / "mnist-classifier.onnx")], 2),
        ("compare-reference-shape", "compare: reference images of the wrong shape",
         lambda t, m: do(np.save(t / "r.npy", np.zeros((2, 1, 4, 4), np.float32)),
                         ["compare", "--model", str(m), "--samplers", "ddim", "--reference", str(t / "r.npy"),
                          "--classifier", str(ROOT / "models" / "mnist-classifier.onnx")]), 4),
        ("compare-unknown-sampler", "compare: an unknown sampler in the list",
         lambda t, m: ["compare", "--model", str(m), "--samplers", "ddim,magic"], 2),
        ("calibrate-stochastic", "calibrate: a stochastic sampler (it cannot follow the ODE teacher)",
         lambda t, m: ["calibrate", "--model", str(m), "--sampler", "euler-maruyama"], 2),
        ("calibrate-steps", "calibrate: a single time point (nothing to place)",
         lambda t, m: ["calibrate", "--model", str(m), "--steps", "1"], 2),
        ("calibrate-fitted-steps", "calibrate: the fitted sampler on more steps than it fits",
         lambda t, m: ["calibrate", "--model", str(m), "--sampler", "fitted", "--steps", "51", "--json"], 2),
        ("calibrate-fitted-unsaved", "calibrate: the fitted sampler with nowhere to keep its coefficients",
         lambda t, m: ["calibrate", "--model", str(m), "--sampler", "fitted", "--steps", "3", "-q"], 2),
        ("calibration-not-json", "a calibration file that is not JSON",
         lambda t, m: do((t / "c.json").write_text("999,500,1"), ["--model", str(m), "--calibration", str(t / "c.json")]), 4),
        ("calibration-schedule", "a calibration file made for another schedule",
         lambda t, m: _calibration(t, m, lambda c: c["schedule"].update(kind="quadratic")), 4),
        ("calibration-coefficients", "a calibration file whose coefficients do not fit its time steps",
         lambda t, m: _calibration(t, m, lambda c: c["coefficients"][1].pop()), 4),
        ("calibration-and-sampler", "a calibration file beside --sampler",
         lambda t, m: _calibration(t, m, lambda c: None) + ["--sampler", "ddim"], 2),
        ("fitted-without-calibration", "the fitted sampler without a calibration file",
         lambda t, m: ["--model", str(m), "--sampler", "fitted"], 2),
        ("provider", "a GPU provider this build or library lacks", lambda t, m: ["--model", str(m), "--provider", "cuda"], 3),
        ("no-ort", "no ONNX Runtime library at the path given",
         lambda t, m: ["--model", str(m), "--ort-lib", str(t / "libonnxruntime.so")], 3),
        ("not-ort", "a library that is not ONNX Runtime",
         lambda t, m: ["--model", str(m), "--ort-lib", _libm()], 3),
        ("unwritable", "an output location that cannot be written",
         lambda t, m: ["--model", str(m), "--out", "/proc/edgediff-test/x.npy"], 4),
        ("disk-full", "the disk fills up while writing (a 16 KiB file-size limit)",
         lambda t, m: ["--model", str(m), "-n", "64", "--ULIMIT"], 4),
        ("resume-other-job", "resuming an output that another job's options made",
         lambda t, m: _made_with_seed_1(t, m), 2),
        ("resume-other-range", "resuming an output of another index range (`--first-index`)",
         lambda t, m: _made_from_index_4(t, m), 2),
        ("first-index-overflow", "a first index whose range passes the largest index",
         lambda t, m: ["--model", str(m), "-n", "2", "--first-index", "18446744073709551615"], 2),
        ("first-index-init-noise", "a first index with injected noise (it replaces the streams the index selects)",
         lambda t, m: do(np.save(t / "z.npy", np.zeros((2, 1, 8, 8), np.float32)),
                         ["--model", str(m), "--init-noise", str(t / "z.npy"), "--first-index", "2"]), 2),
        ("partial-link", "a symbolic link planted where the hidden partial file goes",
         lambda t, m: do(os.symlink(t / "elsewhere", t / ".out.npy.partial"), ["--model", str(m)]), 4),
        ("out-is-directory", "a .npy output path that is an existing directory",
         lambda t, m: do((t / "d.npy").mkdir(), ["--model", str(m), "--out", str(t / "d.npy")]), 2),
        ("step-noise-shape", "per-step noise for another number of samples",
         lambda t, m: do(np.save(t / "z.npy", np.zeros((2, 1, 8, 8), np.float32)),
                         np.save(t / "s.npy", np.zeros((3, 4, 1, 8, 8), np.float32)),
                         ["--model", str(m), "--sampler", "ddpm", "--init-noise", str(t / "z.npy"),
                          "--step-noise", str(t / "s.npy")]), 2),
        ("init-noise-nan", "initial noise holding NaN (the file is at fault, not the network)",
         lambda t, m: do(np.save(t / "z.npy", np.where(np.arange(128).reshape(2, 1, 8, 8) == 10, np.nan, 0.0)
                                 .astype(np.float32)), ["--model", str(m), "--init-noise", str(t / "z.npy")]), 4),
        ("frames-huge", "interpolate: an absurd number of frames (checked before allocating them)",
         lambda t, m: ["interpolate", "--model", str(m), "--frames", "100000000"], 2),
        ("resample-overflow", "inpaint: a resampling count that would overflow",
         lambda t, m: do(np.save(t / "img.npy", np.zeros((2, 1, 8, 8), np.float32)),
                         np.save(t / "mask.npy", np.ones((2, 1, 8, 8), np.float32)),
                         ["inpaint", "--model", str(m), "--image", str(t / "img.npy"), "--mask", str(t / "mask.npy"),
                          "--jumps", "1", "--resample", "18446744073709551615"]), 2),
        ("threads-huge", "an absurd number of ONNX Runtime threads",
         lambda t, m: ["--model", str(m), "--threads", "100000"], 2),
        ("rtol-tiny", "an absurdly small error tolerance (the run would crawl to its step cap)",
         lambda t, m: ["--model", str(m), "--sampler", "ode-adaptive", "--rtol", "1e-300", "--atol", "1e-300"], 2),
        ("model-directory", "a directory given as the model",
         lambda t, m: ["--model", str(t)], 3),
        ("text-model-env-missing", "a prompt with no --model, EDGEDIFF_TEXT_MODEL naming no pipeline folder",
         lambda t, m: ["--ENV", f"EDGEDIFF_TEXT_MODEL={t / 'nowhere'}", "--prompt", "a cat"], 2),
        ("prompt-no-text", "a prompt for a model without text conditioning",
         lambda t, m: ["--model", str(m), "--prompt", "a cat"], 2),
        ("class-text", "a class label for a text-to-image pipeline",
         lambda t, m: ["--model", str(_pipeline(t)), "--class", "3"], 2),
        ("pipeline-no-vae", "a pipeline folder without vae_decoder",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: shutil.rmtree(d / "vae_decoder")))], 3),
        ("pipeline-no-merges", "a pipeline tokenizer missing merges.txt (and no tokenizer.json)",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: (
             (d / "tokenizer" / "merges.txt").unlink(),
             (d / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)))), "--prompt", "a cat"], 3),
        ("pipeline-sdxl", "an unsupported pipeline class (SDXL), refused by name",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: _edit_json(
             d / "model_index.json", _class_name="StableDiffusionXLPipeline")))], 3),
        ("pipeline-hidden-size", "a text encoder wider than the U-Net's cross-attention (optimum folder)",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: ((d / "edgediff.json").unlink(), _edit_json(
             d / "text_encoder" / "config.json", hidden_size=64))))], 3),
        ("lcm-negative-prompt", "a negative prompt for an LCM pipeline (its U-Net takes the guidance scale; no CFG)",
         lambda t, m: ["--model", str(_lcm_folder(t)), "--prompt", "a cat", "--negative-prompt", "blurry"], 2),
        ("lcm-cond-width", "a U-Net whose timestep_cond width differs from its config's time_cond_proj_dim",
         lambda t, m: ["--model", str(_lcm_folder(t, lambda d: _edit_json(
             d / "unet" / "config.json", time_cond_proj_dim=16)))], 3),
        ("lcm-cond-missing", "a U-Net config naming time_cond_proj_dim for a graph without timestep_cond",
         lambda t, m: ["--model", str(_optimum_folder(t, "optimum-tiny", lambda d: _edit_json(
             d / "unet" / "config.json", time_cond_proj_dim=32)))], 3),
        ("strength-zero", "img2img: --strength 0 (outside (0, 1])",
         lambda t, m: ["--model", str(_pipeline(t)), *_init_image(t), "--strength", "0"], 2),
        ("strength-high", "img2img: --strength 1.5 (outside (0, 1])",
         lambda t, m: ["--model", str(_pipeline(t)), *_init_image(t), "--strength", "1.5"], 2),
        ("image-pixel", "img2img: --image for a pixel model (no VAE to encode it)",
         lambda t, m: do(np.save(t / "img.npy", np.zeros((1, 1, 8, 8), np.float32)),
                         ["--model", str(m), "--image", str(t / "img.npy")]), 2),
        ("pipeline-no-vae-encoder", "img2img: a pipeline folder without vae_encoder",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: shutil.rmtree(d / "vae_encoder"))),
                       *_init_image(t)], 3),
        ("prompts-not-utf8", "a prompts file that is not UTF-8 (the line is named)",
         lambda t, m: do((t / "prompts.txt").write_bytes(b"a cat\nun caf\xe9\n"),
                         ["--model", str(_pipeline(t)), "--prompts", str(t / "prompts.txt")]), 4),
        ("low-memory-pixel", "--low-memory for a single-file pixel model (one graph already)",
         lambda t, m: ["--model", str(m), "--low-memory"], 2),
        ("vae-tiles-pixel", "--vae-tiles for a single-file pixel model (no VAE)",
         lambda t, m: ["--model", str(m), "--vae-tiles", "16"], 2),
        ("vae-tiles-small", "--vae-tiles below 4 latent pixels (the overlap would be 0)",
         lambda t, m: ["--model", str(_pipeline(t)), "--vae-tiles", "2"], 2),
        ("vae-tiles-huge", "--vae-tiles above 4096 latent pixels",
         lambda t, m: ["--model", str(_pipeline(t)), "--vae-tiles", "5000"], 2),
        ("vae-tiles-fixed-decoder", "--vae-tiles smaller than the latents, for a VAE decoder graph that takes one latent size only",
         lambda t, m: ["--model", str(_pipeline(t, _fixed_size_decoder)), "--vae-tiles", "4"], 3),
        ("inpaint-pipeline-mask", "inpaint: a pipeline's mask of the latents' size, not the image's",
         lambda t, m: _inpaint_pipeline(t, _pipeline(t), mask=(1, 1, 8, 8)), 2),
        ("inpaint-pipeline-latents", "inpaint: latents given as a pipeline's images",
         lambda t, m: _inpaint_pipeline(t, _pipeline(t), image=(1, 4, 8, 8), mask=(1, 1, 8, 8)), 2),
        ("inpaint-no-vae-encoder", "inpaint: a pipeline folder without vae_encoder",
         lambda t, m: _inpaint_pipeline(t, _pipeline(t, lambda d: shutil.rmtree(d / "vae_encoder"))), 3),
        ("inpaint-low-memory-pixel", "inpaint: --low-memory for a single-file pixel model",
         lambda t, m: do(np.save(t / "img.npy", np.zeros((1, 1, 8, 8), np.float32)),
                         np.save(t / "mask.npy", np.ones((1, 1, 8, 8), np.float32)),
                         ["inpaint", "--model", str(m), "--image", str(t / "img.npy"), "--mask", str(t / "mask.npy"),
                          "--low-memory"]), 2),
        ("sample-inpainting-unet", "sample: a pipeline whose U-Net is an inpainting U-Net (9 channels)",
         lambda t, m: ["--model", str(_pipeline(t, inpainting=True)), "--prompt", "a cat"], 2),
        ("elbo-pipeline", "elbo: a text-to-image pipeline (a bound on its latents is not the images')",
         lambda t, m: do(np.save(t / "x.npy", np.zeros((1, 3, 16, 16), np.float32)),
                         ["elbo", "--model", str(_pipeline(t)), "--data", str(t / "x.npy")]), 2),
        ("external-data-missing", "a graph whose external data file (model.onnx_data) is missing",
         lambda t, m: do(_external(m, t / "model.onnx"), (t / "model.onnx_data").unlink(),
                         ["--model", str(t / "model.onnx")]), 3),
        ("external-data-outside", "a graph naming an external data file outside its folder",
         lambda t, m: do(_external(m, t / "model.onnx", location="../model.onnx_data"),
                         ["--model", str(t / "model.onnx")]), 3),
        ("pipeline-context-dtype", "a pipeline U-Net whose encoder_hidden_states is not float (int32)",
         lambda t, m: ["--model", str(_pipeline(t, _int_context))], 3),
        ("image-size-multiple", "--height/--width not a multiple of what the pipeline needs (VAE x U-Net)",
         lambda t, m: ["--model", str(_pipeline(t)), "--height", "18", "--width", "16"], 2),
        ("image-size-fixed-unet", "--height/--width for a U-Net graph of one fixed size",
         lambda t, m: ["--model", str(_pipeline(t, _fixed_size_unet)), "--height", "32", "--width", "32"], 3),
        ("image-size-pixel", "--height for a single-file pixel model",
         lambda t, m: ["--model", str(m), "--height", "16"], 2),
        ("image-size-img2img", "img2img: --height/--width other than the --image's size (not resized)",
         lambda t, m: ["--model", str(_pipeline(t)), *_init_image(t), "--height", "32", "--width", "32"], 2),
        ("pipeline-external-missing", "a pipeline whose VAE decoder's model.onnx_data is missing",
         lambda t, m: ["--model", str(_pipeline(t, lambda d: (
             _external(d / "vae_decoder" / "model.onnx", d / "vae_decoder" / "model.onnx"),
             (d / "vae_decoder" / "model.onnx_data").unlink())))], 3),
    ]


def _external(src: Path, dst: Path, location: str | None = None) -> None:
    """`src` saved as `dst` with its tensors in `dst`_data (ONNX external data, as a graph over
    2 GB is stored); `location`: the data file the graph names instead."""
    proto = onnx.load(str(src))
    onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + "_data", size_threshold=0)
    if location is not None:
        proto = onnx.load(str(dst), load_external_data=False)
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(proto, str(dst))


def _init_image(t: Path) -> list[str]:
    """--image with one gray image of the tiny pipeline's shape."""
    np.save(t / "img.npy", np.zeros((1, 3, 16, 16), np.float32))
    return ["--image", str(t / "img.npy")]


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pipeline(t: Path, edit=None, inpainting: bool = False) -> Path:
    """A copy in `t` of the tiny exported text-to-image pipeline (tests/sd_tiny.py; with
    `inpainting`, the one with a 9-channel U-Net), edited."""
    import sd_tiny
    src = sd_tiny.exported(inpainting=inpainting)
    dst = t / "pipe"
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def _optimum_folder(t: Path, name: str, edit=None) -> Path:
    """A copy in `t` of the optimum folder tests/data/`name`, edited."""
    dst = t / name
    shutil.copytree(ROOT / "tests" / "data" / name, dst)
    if edit is not None:
        edit(dst)
    return dst


def _lcm_folder(t: Path, edit=None) -> Path:
    """A copy of optimum's tiny LCM folder (U-Net with timestep_cond of width 32), edited."""
    return _optimum_folder(t, "optimum-tiny-lcm", edit)


def _fixed_size_decoder(d: Path) -> None:
    """The pipeline's VAE decoder declaring its latents 8x8 (as an export with only N dynamic)."""
    path = d / "vae_decoder" / "model.onnx"
    proto = onnx.load(str(path))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 8
    onnx.save(proto, str(path))


def _fixed_size_unet(d: Path) -> None:
    """The pipeline's U-Net declaring its sample 8x8 (as an export with only N dynamic)."""
    path = d / "unet" / "model.onnx"
    proto = onnx.load(str(path))
    sample = next(i for i in proto.graph.input if i.name == "sample")
    for dim in sample.type.tensor_type.shape.dim[2:]:
        dim.dim_value = 8
    onnx.save(proto, str(path))


def _int_context(d: Path) -> None:
    """The pipeline's U-Net taking encoder_hidden_states as int32 (cast to float inside)."""
    path = d / "unet" / "model.onnx"
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.input[:] = ["ehs_float" if i == "encoder_hidden_states" else i for i in node.input]
    proto.graph.node.insert(0, onnx.helper.make_node("Cast", ["encoder_hidden_states"], ["ehs_float"],
                                                     to=onnx.TensorProto.FLOAT))
    ehs = next(i for i in proto.graph.input if i.name == "encoder_hidden_states")
    ehs.type.tensor_type.elem_type = onnx.TensorProto.INT32
    onnx.save(proto, str(path))


def _inpaint_pipeline(t: Path, pipe: Path, image=(1, 3, 16, 16), mask=(1, 1, 16, 16)) -> list[str]:
    """`inpaint` on `pipe` with zero images and a full mask of these shapes."""
    np.save(t / "img.npy", np.zeros(image, np.float32))
    np.save(t / "mask.npy", np.ones(mask, np.float32))
    return ["inpaint", "--model", str(pipe), "--image", str(t / "img.npy"), "--mask", str(t / "mask.npy")]


def _made_with_seed_1(t: Path, m: Path) -> list[str]:
    run_cli(ROOT / "target" / "debug" / "edgediff", "sample", "--model", str(m), "-n", "2", "--steps", "2",
            "-q", "--seed", "1", "--out", str(t / "imgs"))
    return ["--model", str(m), "-n", "2", "--seed", "2", "--resume", "--out", str(t / "imgs")]


def _made_from_index_4(t: Path, m: Path) -> list[str]:
    run_cli(ROOT / "target" / "debug" / "edgediff", "sample", "--model", str(m), "-n", "2", "--steps", "2",
            "-q", "--first-index", "4", "--out", str(t / "range.npy"))
    return ["--model", str(m), "-n", "2", "--resume", "--out", str(t / "range.npy")]


def _torch_model(dst: Path, module, sample_dtype=None, extra=None) -> None:
    """An edgediff-described ONNX model of `module` with an 8x8 one-channel sample; `extra`:
    further inputs, {name: (example tensor, dynamic axes)}."""
    import torch
    from edgediff_export.metadata import make_metadata, write_metadata
    from edgediff_export.schedules import schedule_metadata
    x = torch.randn(2, 1, 8, 8) if sample_dtype is None else torch.zeros(2, 1, 8, 8, dtype=sample_dtype)
    extra = extra or {}
    axes = {"sample": {0: "N"}, "timestep": {0: "N"}, "out": {0: "N"}, **{k: a for k, (_, a) in extra.items()}}
    torch.onnx.export(module, (x, torch.tensor([1, 2]), *(v for v, _ in extra.values())), str(dst),
                      input_names=["sample", "timestep", *extra], output_names=["out"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(dst))
    write_metadata(proto, make_metadata(name="bad", description="", prediction="epsilon", time_input="index",
                                        schedule=schedule_metadata("linear"), sample_shape=[1, 8, 8]))
    onnx.save(proto, str(dst))


def _half_size(t: Path) -> list[str]:
    import torch

    class Half(torch.nn.Module):
        def forward(self, sample, timestep):
            return torch.nn.functional.avg_pool2d(sample, 2) + 0 * timestep.float().sum()
    _torch_model(t / "m.onnx", Half())
    return ["--model", str(t / "m.onnx")]


def _int_sample(t: Path) -> list[str]:
    import torch

    class Int(torch.nn.Module):
        def forward(self, sample, timestep):
            return sample * 2 + timestep.sum().to(sample.dtype)
    _torch_model(t / "m.onnx", Int(), sample_dtype=torch.int32)
    return ["--model", str(t / "m.onnx")]


def _conditional(t: Path) -> list[str]:
    import subprocess
    subprocess.run([sys.executable, "-m", "edgediff_export.export", "random", "--out", str(t / "m.onnx"),
                    "--num-classes", "3"], check=True, capture_output=True)
    return ["--model", str(t / "m.onnx"), "--class", "7"]


def _inpaint_bad_mask(t: Path, m: Path) -> list[str]:
    np.save(t / "img.npy", np.zeros((2, 1, 8, 8), np.float32))
    np.save(t / "mask.npy", np.ones((2, 1, 5, 5), np.float32))
    return ["inpaint", "--model", str(m), "--image", str(t / "img.npy"), "--mask", str(t / "mask.npy")]


def _vp_model(t: Path) -> list[str]:
    """--model with a continuous-time (VP) oracle model."""
    from edgediff_export.oracle import export_oracle
    export_oracle(t / "vp.onnx", "vp", shape=(1, 8, 8))
    return ["--model", str(t / "vp.onnx")]


def _elbo_continuous(t: Path) -> list[str]:
    np.save(t / "x.npy", np.full((2, 1, 8, 8), -1.0, np.float32))
    return ["elbo", *_vp_model(t), "--data", str(t / "x.npy")]


def _dynamic_timestep_cond(t: Path) -> list[str]:
    """A model taking timestep_cond [N, D] with D left dynamic: no embedding width to fill."""
    import torch

    class Cond(torch.nn.Module):
        def forward(self, sample, timestep, timestep_cond):
            return sample + 0 * timestep.float().sum() + timestep_cond.mean()
    _torch_model(t / "m.onnx", Cond(), extra={"timestep_cond": (torch.randn(2, 8), {0: "N", 1: "D"})})
    return ["--model", str(t / "m.onnx")]


def _calibration(t: Path, m: Path, edit) -> list[str]:
    """A valid 2-step calibration file of the fitted sampler for the tiny linear model, edited."""
    cal = {"edgediff_calibration": 1, "model": "tiny",
           "schedule": {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02},
           "sampler": "fitted", "timesteps": [999.0, 400.0], "coefficients": [[0.9, 0.1], [0.0, 0.2, 0.8]]}
    edit(cal)
    (t / "c.json").write_text(json.dumps(cal))
    return ["--model", str(m), "--calibration", str(t / "c.json")]


def _libm() -> str:
    for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"):
        if Path(p).exists():
            return p
    pytest.skip("no libm.so.6 found")


def run_case(binary: Path, tiny: Path, tmp: Path, setup) -> tuple[int, str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    args = setup(tmp, tiny)
    command = args.pop(0) if args[0] in ("inpaint", "invert", "interpolate", "elbo", "likelihood", "compare", "calibrate") else "sample"
    out = tmp / "out.npy"
    if command == "likelihood":  # its only output file is the per-image table
        out = tmp / "out.csv"
        args = [*args, "--per-image", str(out)]
    elif "--out" not in args and command != "elbo":  # elbo writes nothing but stdout
        args = [*args, "--out", str(out)]
    if "--steps" not in args and "--calibration" not in args and command not in ("invert", "elbo"):
        args = [*args, "--steps", "2"]
    env = {}
    while "--ENV" in args:  # --ENV K=V: an environment variable for this case's run
        i = args.index("--ENV")
        key, value = args[i + 1].split("=", 1)
        env[key] = value
        del args[i:i + 2]
    if "--ULIMIT" in args:
        args.remove("--ULIMIT")
        import subprocess
        cmd = " ".join(f"'{a}'" for a in [str(binary), command, *args])
        proc = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 16; exec {cmd}"],
                              capture_output=True, text=True)
    else:
        proc = run_cli(binary, command, *args, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("edgediff: error:")), len(lines))
    message = " / ".join(line.strip() for line in lines[start:])
    message = message.replace(str(tmp), "$TMP").replace(str(ROOT), "$REPO").replace(str(tiny), "$MODEL")
    return proc.returncode, message, out


# `edgediff serve --stdio`: (id, case, setup(tmp) -> the request line); the answer is an error
# event with a stable code (docs/serving.md), and the server goes on to the next line.
def serve_cases():
    return [
        ("serve-malformed-json", "serve: a request line that is not JSON", lambda t: "{not json"),
        ("serve-unknown-field", "serve: a misspelt field",
         lambda t: json.dumps({"id": "serve-unknown-field", "stpes": 2})),
        ("serve-wrong-type", "serve: a value of the wrong type",
         lambda t: json.dumps({"id": "serve-wrong-type", "steps": "ten"})),
        ("serve-unknown-model", "serve: a model that does not exist",
         lambda t: json.dumps({"id": "serve-unknown-model", "model": str(t / "none.onnx")})),
        ("serve-unknown-sampler", "serve: an unknown sampler",
         lambda t: json.dumps({"id": "serve-unknown-sampler", "sampler": "magic"})),
        ("serve-n-too-large", "serve: more samples than one request may hold",
         lambda t: json.dumps({"id": "serve-n-too-large", "n": 5000})),
        ("serve-batch-too-large", "serve: a batch size beyond the server's bound",
         lambda t: json.dumps({"id": "serve-batch-too-large", "batch_size": 1000})),
        ("serve-output-directory", "serve: an output .npy that is a directory",
         lambda t: do((t / "d.npy").mkdir(), json.dumps({"id": "serve-output-directory", "steps": 2,
                                                           "output": str(t / "d.npy")}))),
    ]


def run_serve_cases(binary: Path, tmp: Path) -> list[tuple[str, str, str, str]]:
    """Every serve case as one line of one `serve --stdio` run: (id, case, code, message)."""
    import subprocess
    tmp.mkdir(parents=True, exist_ok=True)
    cases = serve_cases()
    lines = [setup(tmp) for _, _, setup in cases]
    proc = subprocess.run([str(binary), "serve", "--stdio", "--threads", "1"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = {e["id"]: e for e in map(json.loads, proc.stdout.splitlines()) if e["event"] == "error"}
    rows = []
    for cid, case, _ in cases:
        e = events[cid if cid != "serve-malformed-json" else None]
        rows.append((cid, case, e["code"], e["message"].replace(str(tmp), "$TMP").replace(str(ROOT), "$REPO")))
    assert not any(p.is_file() for p in tmp.rglob("*")), list(tmp.rglob("*"))
    return rows


def table(rows: list[tuple[str, str, int, str]], serve_rows: list[tuple[str, str, str, str]] = ()) -> str:
    head = ["# Errors: what bad input gives", "",
            "Every row is run by `tests/test_errors.py` (which also rewrites this table with",
            "`EDGEDIFF_WRITE_ERRORS_DOC=1`): the CLI's exit code, the C library's status for the same",
            "failure, and the exact message (paths shortened to $TMP, $REPO, $MODEL). In every case",
            "nothing is left at the output path (a failed `.npy` write keeps its hidden `.NAME.partial`",
            "with the samples already written, for `--resume`). Further faults are tested in `tests/test_faults.py`",
            "(NaN from the network: exit 5 naming the step and sample, finished chunks kept; SIGKILL",
            "then `--resume`: the uninterrupted bytes; a second writer on one output: exit 4),",
            "`tests/test_integrity.py` (resume of another job, planted links, impossible destinations),",
            "`tests/c/capi_check.c` (NULL handles, small buffers, invalid UTF-8, cancellation),",
            "`tests/c/text_check.c` (bad img2img, prompt-list and latents fields of `edgediff_sample_params`:",
            "EDGEDIFF_ERR_ARGUMENT naming the field, the output buffers untouched) and `tests/c/size_check.c`",
            "(bad `height`/`width`: the rows of --height/--width below, naming `height/width`; buffers of the",
            "folder's size at another: naming `out`, `init_noise_len`, `latents_out_len`, `init_image_len`).", "",
            "| case | id | exit | C status | message |", "|---|---|---|---|---|"]
    body = [f"| {case} | `{cid}` | {code} | {C_STATUS.get(code, '-')} | {msg.replace('|', '/')} |"
            for cid, case, code, msg in rows]
    serve = ["", "## The server's requests", "",
             "`edgediff serve` answers a bad request with an error event (stdio: a JSON line; HTTP: the body,",
             "status 400) carrying a stable `code` (docs/serving.md) and goes on serving. These rows are one",
             "`serve --stdio` run, a line each; nothing is written at their output paths.", "",
             "| case | id | code | message |", "|---|---|---|---|"]
    serve += [f"| {case} | `{cid}` | `{code}` | {msg.replace('|', '/')} |" for cid, case, code, msg in serve_rows]
    return "\n".join(head + body + serve) + "\n"


def test_errors_table(edgediff_bin, tiny_models, tmp_path):
    rows = []
    for cid, case, setup, code in cases():
        got, message, out = run_case(edgediff_bin, tiny_models["linear"], tmp_path / cid, setup)
        assert got == code, (cid, got, message)
        assert message.startswith("edgediff: error:"), (cid, message)
        assert not out.exists(), cid
        # Only a failed .npy write keeps its partial file, on purpose, for --resume.
        left = [p for p in out.parent.glob(".*") if p.is_file()]
        assert not left or (cid == "disk-full" and left[0].name == ".out.npy.partial"), (cid, left)
        rows.append((cid, case, code, message))
    text = table(rows, run_serve_cases(edgediff_bin, tmp_path / "serve"))
    if os.environ.get("EDGEDIFF_WRITE_ERRORS_DOC"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, \
        "docs/errors.md differs from what the program says; rerun with EDGEDIFF_WRITE_ERRORS_DOC=1"
