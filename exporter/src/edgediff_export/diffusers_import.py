"""Import of diffusers `UNet2DModel` folders (config.json + weights) as edgediff models.

`edgediff-export diffusers --unet DIR [--scheduler DIR|FILE] --out M.onnx` loads the U-Net
with diffusers itself (so every block type diffusers knows is handled by diffusers' own code),
wraps it as `(sample, timestep[, class_labels]) -> out`, exports it, checks onnxruntime against
PyTorch, and writes the edgediff metadata derived from the scheduler config:

| diffusers scheduler config                  | edgediff metadata                                   |
|---------------------------------------------|-----------------------------------------------------|
| beta_schedule linear                        | schedule kind linear (same beta_start/beta_end)     |
| beta_schedule scaled_linear                 | kind quadratic (sqrt(beta) evenly spaced: the same) |
| beta_schedule squaredcos_cap_v2             | kind cosine, s = 0.008, max_beta = 0.999            |
| beta_schedule sigmoid                       | kind sigmoid                                        |
| trained_betas                               | the closed-form kind it equals, else refused        |
| num_train_timesteps                         | num_train_timesteps                                 |
| prediction_type epsilon, v_prediction, sample | prediction epsilon, v, sample                     |
| UNet num_class_embeds (with --null-class)   | conditioning class                                  |

The contract has no explicit beta table, so `trained_betas` is accepted only where it equals one
of the closed forms (to float32 rounding); `rescale_betas_zero_snr` (alpha-bar reaching 0 at T)
is refused because no sampler can start from infinite noise. Settings of the *sampler* rather
than the model (clip_sample, timestep_spacing, steps_offset, set_alpha_to_one, thresholding)
are kept under `extra.diffusers.scheduler` and returned as `hints`, the `edgediff sample`
flags that reproduce them (e.g. `--clip-x0`).

The data range is [-1, 1], the convention of diffusers' pipelines (they map x / 2 + 0.5 to
images). The timestep input is float32 (time_input index, fractional indices allowed) for sinusoidal
("positional") time embeddings and int64 for "learned" ones (a lookup table of T rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .metadata import make_metadata, write_metadata
from .schedules import betas_for, schedule_metadata

VERIFY_RTOL = 1e-4  # as export.verify: onnxruntime vs PyTorch, relative to max |output|
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic",
                  "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
# diffusers' own defaults (DDPMScheduler) for keys a hand-written config leaves out.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}
# Float32 rounding of betas stored by diffusers is ~6e-8 relative; 1e-5 leaves room for
# betas written as decimal text, and is far below any difference between schedule kinds.
TRAINED_BETAS_RTOL = 1e-5


class DiffusersImportError(ValueError):
    """A folder or config edgediff cannot import; the message says what is wrong and the fix."""


@dataclass
class Layout:
    unet_dir: Path
    # Where a pipeline keeps its scheduler: used when --scheduler is not given.
    default_scheduler: Path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersImportError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise DiffusersImportError(f"{path} is not a JSON object")
    return data


def locate(unet: Path) -> Layout:
    """Find the U-Net folder of a pipeline folder or a bare U-Net folder."""
    if not unet.is_dir():
        raise DiffusersImportError(f"--unet {unet} is not a folder")
    if (unet / "model_index.json").is_file():
        index = _read_json(unet / "model_index.json")
        entry = index.get("unet")
        if isinstance(entry, list) and len(entry) == 2 and entry[1] != "UNet2DModel":
            raise DiffusersImportError(_unsupported_class(entry[1]))
        layout = Layout(unet / "unet", unet / "scheduler")
    elif (unet / "config.json").is_file():
        # A pipeline's unet/ folder given directly: its scheduler/ is the sibling.
        layout = Layout(unet, unet.parent / "scheduler")
    else:
        raise DiffusersImportError(
            f"{unet} holds neither model_index.json (a diffusers pipeline folder) nor config.json "
            "(a UNet2DModel folder); pass the folder that save_pretrained wrote")
    if not (layout.unet_dir / "config.json").is_file():
        raise DiffusersImportError(f"{layout.unet_dir} has no config.json; the pipeline folder is incomplete")
    return layout


def scheduler_config_path(layout: Layout, given: Path | None) -> Path:
    """--scheduler as a file, a scheduler folder or a pipeline folder; else the pipeline's own."""
    if given is not None:
        for candidate in (given, given / "scheduler_config.json", given / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return candidate
        raise DiffusersImportError(
            f"no scheduler config at {given}: pass --scheduler with a scheduler_config.json file or "
            "the folder holding it (a pipeline's scheduler/ folder)")
    if (layout.default_scheduler / "scheduler_config.json").is_file():
        return layout.default_scheduler / "scheduler_config.json"
    raise DiffusersImportError(
        f"no scheduler config found (looked for {layout.default_scheduler}/scheduler_config.json); "
        "pass --scheduler with the scheduler_config.json of the noise scheduler the model was trained with")


def _unsupported_class(name: str) -> str:
    hint = (" (text-conditioned: it needs encoder_hidden_states from a text encoder, which this "
            "importer does not export)") if name == "UNet2DConditionModel" else ""
    return (f"the U-Net is a {name}{hint}; edgediff imports diffusers UNet2DModel folders only "
            "(unconditional or class-conditional)")


def check_unet_config(cfg: dict) -> None:
    """Refuse U-Nets whose inputs or outputs the model contract cannot describe."""
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel" or "cross_attention_dim" in cfg:
        raise DiffusersImportError(_unsupported_class(name))
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise DiffusersImportError(
            f"the U-Net has {cfg.get('in_channels', 3)} input but {cfg.get('out_channels', 3)} output "
            "channels (a learned-variance model?); edgediff needs an output shaped like the sample")
    if cfg.get("time_embedding_type", "positional") not in ("positional", "learned"):
        raise DiffusersImportError(
            f"time_embedding_type {cfg['time_embedding_type']!r} is not supported (fourier embeddings "
            "belong to score-SDE models whose output is divided by sigma); positional and learned are")
    if cfg.get("class_embed_type") is not None:
        raise DiffusersImportError(
            f"class_embed_type {cfg['class_embed_type']!r} is not supported; class conditioning is "
            "imported for integer labels through num_class_embeds (class_embed_type null)")
    if cfg.get("sample_size") is None:
        raise DiffusersImportError("the U-Net config has no sample_size; set it to the training resolution")


def check_weights(unet_dir: Path) -> None:
    if not any((unet_dir / f).is_file() for f in WEIGHT_FILES):
        raise DiffusersImportError(
            f"{unet_dir} has config.json but no weights (expected one of {', '.join(WEIGHT_FILES)}); "
            "save the model with save_pretrained or copy its weight file there")


def sample_shape(cfg: dict) -> list[int]:
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return [int(cfg.get("in_channels", 3)), int(h), int(w)]


def _trained_betas_schedule(betas: np.ndarray) -> dict:
    """The closed-form schedule equal to `betas`, or an error: the contract has no beta table."""
    n = len(betas)
    start, end = float(betas[0]), float(betas[-1])
    lo, hi = 1.0 / (1.0 + math.exp(6.0)), 1.0 / (1.0 + math.exp(-6.0))
    sig_range = (end - start) / (hi - lo)
    candidates = [("linear", start, end), ("quadratic", start, end),
                  ("sigmoid", start - sig_range * lo, start - sig_range * lo + sig_range),
                  ("cosine", 1e-4, 0.02)]
    for kind, b0, b1 in candidates:
        ours = betas_for(kind, n, b0, b1)
        if np.allclose(ours, betas, rtol=TRAINED_BETAS_RTOL, atol=0.0):
            return schedule_metadata(kind, n, b0, b1)
    raise DiffusersImportError(
        "trained_betas is not one of the closed-form schedules edgediff's model contract describes "
        "(linear, scaled_linear, squaredcos_cap_v2, sigmoid); the contract has no explicit beta table. "
        "Use a scheduler config with the matching beta_schedule instead")


def schedule_from_config(sc: dict) -> dict:
    """The edgediff schedule metadata of a diffusers scheduler config."""
    if "beta_schedule" not in sc and "trained_betas" not in sc and "beta_start" not in sc:
        raise DiffusersImportError(
            f"the scheduler config ({sc.get('_class_name', 'unknown class')}) describes no discrete "
            "beta schedule; edgediff imports models of DDPM/DDIM-family schedulers (beta_schedule, "
            "beta_start, beta_end, num_train_timesteps)")
    sc = SCHEDULER_DEFAULTS | sc
    if sc.get("rescale_betas_zero_snr"):
        raise DiffusersImportError(
            "rescale_betas_zero_snr makes alpha-bar reach 0 at the last step (infinite noise), which "
            "edgediff's schedules exclude; this model cannot be imported")
    n = int(sc["num_train_timesteps"])
    if sc.get("trained_betas") is not None:
        betas = np.asarray(sc["trained_betas"], dtype=np.float64)
        if betas.shape != (n,):
            raise DiffusersImportError(f"trained_betas has {betas.size} entries, num_train_timesteps is {n}")
        return _trained_betas_schedule(betas)
    kind = BETA_SCHEDULES.get(sc["beta_schedule"])
    if kind is None:
        raise DiffusersImportError(
            f"beta_schedule {sc['beta_schedule']!r} is not supported; edgediff imports "
            f"{', '.join(BETA_SCHEDULES)}")
    start, end = float(sc["beta_start"]), float(sc["beta_end"])
    if kind != "cosine" and not 0.0 < start <= end < 1.0:
        raise DiffusersImportError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {start}..{end}")
    return schedule_metadata(kind, n, start, end)


def prediction_from_config(sc: dict) -> str:
    pt = sc.get("prediction_type", SCHEDULER_DEFAULTS["prediction_type"])
    if pt not in PREDICTIONS:
        raise DiffusersImportError(f"prediction_type {pt!r} is not supported; expected one of "
                                   f"{', '.join(PREDICTIONS)}")
    return PREDICTIONS[pt]


def conditioning_from_config(cfg: dict, null_class: str | None) -> dict | None:
    """Class conditioning for num_class_embeds; the null label's meaning must be stated."""
    embeds = cfg.get("num_class_embeds")
    if embeds is None:
        if null_class is not None:
            raise DiffusersImportError("--null-class is for class-conditional U-Nets; this one has no "
                                       "num_class_embeds")
        return None
    if null_class is None:
        raise DiffusersImportError(
            f"the U-Net is class-conditional ({embeds} class embeddings): pass --null-class last if "
            "the last label is the unconditional one (trained with label dropout, for classifier-free "
            "guidance), or --null-class none if every label is a class (then sampling needs --class)")
    if null_class == "last":
        if embeds < 2:
            raise DiffusersImportError("--null-class last needs at least 2 class embeddings")
        return {"type": "class", "num_classes": embeds - 1, "null_label": embeds - 1}
    # No unconditional label: the contract's null label is then one past the table, so a run
    # without --class fails in the network instead of silently using a real class.
    return {"type": "class", "num_classes": embeds, "null_label": embeds}


# Consistency schedulers name their sampler; 4 steps is what LCM's and TCD's model cards and
# diffusers' pipeline examples use. Their steps lie on the grid of `original_inference_steps`
# whatever `timestep_spacing` says (edgediff's --spacing lcm).
CONSISTENCY_SCHEDULERS = {"LCMScheduler": "lcm", "TCDScheduler": "tcd"}
CONSISTENCY_STEPS = 4


def consistency_sampling(sc: dict) -> dict | None:
    """The metadata's `sampling` for a consistency scheduler's config, else None."""
    sampler = CONSISTENCY_SCHEDULERS.get(sc.get("_class_name", ""))
    return None if sampler is None else {"sampler": sampler, "steps": CONSISTENCY_STEPS}


def pixel_sampling(sc: dict) -> dict | None:
    """A single-file model's `sampling`: a consistency scheduler's, on its grid (a pipeline
    folder takes the grid from its scheduler config instead)."""
    sampling = consistency_sampling(sc)
    if sampling is None or sc.get("original_inference_steps", 50) != 50:
        return sampling  # --spacing lcm has 50 points; other grids go by --timesteps
    return {**sampling, "spacing": "lcm"}


def sampling_hints(sc: dict) -> list[str]:
    """`edgediff sample` flags that reproduce the scheduler's sampling settings."""
    hints = []
    consistency = consistency_sampling(sc) is not None
    if consistency:
        original = sc.get("original_inference_steps", 50)
        hints.append(f"{sc['_class_name']}: its steps are on the grid of {original} original steps: "
                     "pass --spacing lcm" + ("" if original == 50 else
                                             f" (which takes 50; pass --timesteps for {original})"))
    if sc.get("clip_sample"):
        r = sc.get("clip_sample_range", 1.0)
        note = "" if r == 1.0 else f" (clips to the data range [-1, 1]; diffusers used +-{r})"
        hints.append(f"clip_sample: pass --clip-x0{note}")
    if sc.get("thresholding"):
        hints.append(f"thresholding: pass --dynamic-threshold {sc.get('dynamic_thresholding_ratio', 0.995)} "
                     f"--threshold-max {sc.get('sample_max_value', 1.0)}")
    spacing = sc.get("timestep_spacing")
    if spacing in ("leading", "trailing", "linspace") and not consistency:
        hints.append(f"timestep_spacing {spacing}: pass --spacing {spacing}")
    if sc.get("steps_offset", 0):
        hints.append(f"steps_offset {sc['steps_offset']}: edgediff's spacings have no offset; "
                     "pass --timesteps to reproduce diffusers' exact times")
    if sc.get("set_alpha_to_one") is False:
        hints.append("set_alpha_to_one false: edgediff's DDIM ends at alpha-bar 1 (clean data)")
    return hints


class DiffusersWrapper(torch.nn.Module):
    """(sample, timestep[, class_labels]) -> the U-Net's `.sample`, the contract's signature."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample


def load_unet(unet_dir: Path) -> torch.nn.Module:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise DiffusersImportError("importing diffusers models needs the diffusers package: "
                                   "pip install -e 'exporter[diffusers]'") from e
    try:
        # low_cpu_mem_usage=False: the plain load path, without asking for `accelerate`.
        return UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False).float().eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise DiffusersImportError(f"diffusers could not load the UNet2DModel in {unet_dir}: {e}") from e


def _inputs(cfg: dict, n: int, seed: int, timestep_dtype: torch.dtype, T: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (n,), generator=g)
    if timestep_dtype == torch.float32:
        t = (t.float() + torch.rand(n, generator=g)).clamp(max=T - 1)  # fractional indices too
    inputs = {"sample": torch.randn(n, *sample_shape(cfg), generator=g), "timestep": t}
    if cfg.get("num_class_embeds") is not None:
        inputs["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (n,), generator=g)
    return inputs


def verify(model: torch.nn.Module, path: Path, cfg: dict, timestep_dtype: torch.dtype, T: int) -> dict:
    """onnxruntime vs PyTorch on random inputs; raise beyond VERIFY_RTOL relative to max |ref|."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst_abs, worst_rel = 0.0, 0.0
    for seed in (1, 2):
        inputs = _inputs(cfg, 3, seed, timestep_dtype, T)
        with torch.no_grad():
            ref = model(**inputs).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        diff = float(np.max(np.abs(got - ref)))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(1e-12, float(np.max(np.abs(ref)))))
    if not worst_rel <= VERIFY_RTOL:
        raise RuntimeError(f"ONNX output differs from PyTorch by {worst_rel:.2e} relative "
                           f"(limit {VERIFY_RTOL:.0e}); the export is not faithful")
    return {"max_abs_diff": worst_abs, "max_rel_err": worst_rel}


def export(model: torch.nn.Module, cfg: dict, meta: dict, out: Path, T: int, opset: int = 17) -> dict:
    """Write `model` with `meta` to `out` (atomically, after verifying it); return the check's figures."""
    timestep_dtype = torch.int64 if cfg.get("time_embedding_type") == "learned" else torch.float32
    inputs = _inputs(cfg, 2, 0, timestep_dtype, T)
    names = list(inputs)
    tmp = Path(str(out) + ".tmp")
    try:
        with warnings.catch_warnings():
            # diffusers' channel asserts and batch-size branches trace as constants: harmless
            # (the channel counts are fixed; those branches only make a tensor contiguous).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, tuple(inputs.values()), str(tmp), input_names=names,
                              output_names=["out"], dynamic_axes={k: {0: "N"} for k in [*names, "out"]},
                              opset_version=opset, dynamo=False)
        proto = onnx.load(str(tmp))
        write_metadata(proto, meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        check = verify(model, tmp, cfg, timestep_dtype, T)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return check


def import_folder(unet: Path, scheduler: Path | None, out: Path, name: str | None = None,
                  description: str = "", null_class: str | None = None) -> dict:
    """Export the diffusers model at `unet` to `out`; return what was written and checked."""
    layout = locate(unet)
    cfg = _read_json(layout.unet_dir / "config.json")
    check_unet_config(cfg)
    sc = _read_json(scheduler_config_path(layout, scheduler))
    schedule = schedule_from_config(sc)
    prediction = prediction_from_config(sc)
    conditioning = conditioning_from_config(cfg, null_class)
    check_weights(layout.unet_dir)
    T = schedule["num_train_timesteps"]
    if cfg.get("time_embedding_type") == "learned" and cfg.get("num_train_timesteps", T) < T:
        raise DiffusersImportError(f"the learned time embedding has {cfg['num_train_timesteps']} rows "
                                   f"but the scheduler has {T} training steps")
    model = DiffusersWrapper(load_unet(layout.unet_dir)).eval()
    name = name or unet.resolve().name
    meta = make_metadata(
        name=name, description=description or f"diffusers UNet2DModel imported from {unet.resolve().name}",
        prediction=prediction, time_input="index", schedule=schedule, sample_shape=sample_shape(cfg),
        conditioning=conditioning, sampling=pixel_sampling(sc),
        extra={"diffusers": {"unet": cfg, "scheduler": {k: v for k, v in sc.items() if k != "trained_betas"}}})
    check = export(model, cfg, meta, out, T)
    hints = sampling_hints(sc)
    if null_class == "none":
        hints.append(f"no null label: always pass --class K (0..{cfg['num_class_embeds'] - 1}); "
                     "--guidance needs a model trained with a null label")
    return {"out": str(out), **check, "prediction": prediction, "schedule": schedule,
            "conditioning": conditioning, "hints": hints}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, nargs="?", default=None,
                   help="a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/): exported as a text-to-image folder")
    p.add_argument("--unet", type=Path, default=None,
                   help="a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a "
                        "UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin)")
    p.add_argument("--scheduler", type=Path, default=None,
                   help="scheduler_config.json or its folder (default: the pipeline's scheduler/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="model name (default: the folder's name)")
    p.add_argument("--description", default="")
    p.add_argument("--null-class", choices=["last", "none"], default=None,
                   help="class-conditional U-Nets: 'last' if the last label is the unconditional "
                        "one (classifier-free guidance), 'none' if every label is a class")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 writes float16 weights (time embedding and norms stay fp32; a pipeline "
                        "also keeps softmax, attention scores and the VAE decoder's full-resolution "
                        "blocks fp32, and float32 inputs and outputs)")
    # Tests force external data on tiny graphs with it; the default is below protobuf's 2 GiB.
    from .pipeline_export import EXTERNAL_DATA_THRESHOLD
    p.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD,
                   metavar="BYTES", help=argparse.SUPPRESS)


def run(a: argparse.Namespace) -> dict:
    """The CLI handler: a clear message and exit status 2 for folders it cannot import."""
    try:
        if (a.pipeline is None) == (a.unet is None):
            raise DiffusersImportError("give either a StableDiffusionPipeline folder (DIR --out OUT) "
                                       "or --unet (a UNet2DModel), not both or neither")
        if a.pipeline is not None:
            from .pipeline_export import export_pipeline
            if a.external_data_threshold < 0:
                raise DiffusersImportError("--external-data-threshold must be at least 0 bytes")
            return export_pipeline(a.pipeline, a.out, a.name, a.description, a.precision,
                                   a.external_data_threshold)
        return import_folder(a.unet, a.scheduler, a.out, a.name, a.description, a.null_class)
    except DiffusersImportError as e:
        raise SystemExit(_fail(str(e))) from None


def _fail(message: str) -> int:
    import sys
    print(f"edgediff-export diffusers: error: {message}", file=sys.stderr)
    return 2
