"""Export of a diffusers StableDiffusionPipeline (or StableDiffusionInpaintPipeline) folder to
edgediff's text-to-image folder.

`edgediff-export diffusers DIR --out OUT` loads the pipeline's parts with diffusers and
transformers themselves (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer),
exports each graph with torch.onnx, checks every graph against PyTorch on random inputs, and
writes the folder in the layout of optimum's ONNX export, so that one loader serves both:

    OUT/model_index.json                 the source pipeline's (its class names the family)
    OUT/edgediff.json                    what the runtime needs, in one record (see `manifest`)
    OUT/text_encoder/model.onnx          input_ids int64 [N, L] -> last_hidden_state, pooler_output
    OUT/unet/model.onnx                  sample, timestep float32 [N], encoder_hidden_states -> out_sample
                                         (an inpainting U-Net's sample: latents || mask || masked
                                         image latents, 2C + 1 channels, edgediff.json's
                                         "unet_in_channels"; out_sample has the latents' C)
    OUT/vae_decoder/model.onnx           latent_sample -> sample
    OUT/vae_encoder/model.onnx           sample -> latent_parameters (mean || logvar)
    OUT/tokenizer/                       vocab.json merges.txt tokenizer_config.json special_tokens_map.json
    OUT/scheduler/scheduler_config.json  the source pipeline's scheduler config
    each graph folder: config.json       the part's diffusers/transformers config

The U-Net's timestep is float32 (as in optimum's export): diffusers' Euler-family schedulers
pass fractional timesteps, and the sinusoidal embedding takes any real time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .diffusers_import import (DiffusersImportError, _read_json, prediction_from_config,
                               schedule_from_config)

FORMAT_VERSION = 1
# Relative to max |PyTorch output|, as every other export (export.VERIFY_RTOL).
VERIFY_RTOL = 1e-4
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
# Families whose graphs or conditioning differ (two text encoders, added time ids, a
# transformer instead of a U-Net): refused by name rather than exported wrongly.
REFUSED = {
    "StableDiffusionXLPipeline": "SDXL (two text encoders and added time/size conditioning)",
    "StableDiffusionXLImg2ImgPipeline": "SDXL (two text encoders and added time/size conditioning)",
    "StableDiffusionXLInpaintPipeline": "SDXL (two text encoders and added time/size conditioning)",
    "StableDiffusion3Pipeline": "Stable Diffusion 3 (an MMDiT transformer and three text encoders)",
    "FluxPipeline": "Flux (a rectified-flow transformer with T5 and CLIP text encoders)",
}
SPACINGS = ("leading", "trailing", "linspace")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def refuse_class(name: str) -> None:
    """Raise for every pipeline class but the ones this exporter handles, naming the family."""
    if name in SUPPORTED:
        return
    family = REFUSED.get(name)
    if family is None and ("XL" in name or "StableDiffusion3" in name or "Flux" in name):
        family = name
    what = f"{name} is {family}" if family else f"{name} is not a text-to-image StableDiffusionPipeline"
    raise DiffusersImportError(f"{what}; edgediff exports {', '.join(SUPPORTED)} folders only "
                               "(Stable Diffusion 1.x/2.x and their fine-tunes)")


# ---- the graphs -------------------------------------------------------------------------------

class TextEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        # No attention mask: diffusers' pipeline passes none to CLIP (causal attention makes
        # the padding invisible to the tokens before it).
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNet(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        # The moments after quant_conv: mean and log-variance concatenated on the channels.
        return self.vae.encode(sample, return_dict=False)[0].parameters


def _export_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
                  path: Path, check_inputs: list[dict[str, torch.Tensor]], opset: int = 17) -> dict:
    """Export `module` to `path` (N dynamic everywhere), verify it, return the check's figures."""
    import onnxruntime as ort

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    names = list(inputs)
    dynamic = {k: {0: "N"} for k in [*names, *outputs]}
    try:
        with warnings.catch_warnings():
            # diffusers' shape asserts and batch branches trace as constants (fixed channel counts).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, tuple(inputs.values()), str(tmp), input_names=names,
                              output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                              dynamo=False)
        onnx.checker.check_model(str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst_abs, worst_rel = 0.0, 0.0
        for feed in check_inputs:
            with torch.no_grad():
                ref = module(*feed.values())
            refs = ref if isinstance(ref, tuple) else (ref,)
            got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
            for r, g in zip(refs, got):
                r = r.numpy()
                diff = float(np.max(np.abs(g - r)))
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / max(1e-12, float(np.max(np.abs(r)))))
        if not worst_rel <= VERIFY_RTOL:
            raise RuntimeError(f"{path}: ONNX output differs from PyTorch by {worst_rel:.2e} relative "
                               f"(limit {VERIFY_RTOL:.0e}); the export is not faithful")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"max_abs_diff": worst_abs, "max_rel_err": worst_rel}


# ---- the folder -------------------------------------------------------------------------------

def _sizes(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def manifest(index: dict, sc: dict, unet_cfg: dict, vae_cfg: dict, text_cfg: dict,
             max_length: int, name: str, description: str) -> dict:
    """edgediff.json: the runtime's record of the pipeline, derived from the parts' configs.

    The runtime derives the same record from an optimum folder's JSON files when edgediff.json
    is absent (runtime/src/pipeline.rs), so nothing here is unknown to those configs.
    """
    spacing = sc.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise DiffusersImportError(f"timestep_spacing {spacing!r} is not supported; expected one of "
                                   f"{', '.join(SPACINGS)}")
    hidden = int(text_cfg["hidden_size"])
    cross = unet_cfg.get("cross_attention_dim")
    if cross != hidden:
        raise DiffusersImportError(f"the text encoder's hidden_size {hidden} differs from the U-Net's "
                                   f"cross_attention_dim {cross}: the parts do not belong together")
    # An ordinary U-Net takes and gives the latents' C channels; an inpainting U-Net
    # (StableDiffusionInpaintPipeline's) takes 2C + 1: the latents, the mask and the masked
    # image's latents. The runtime reads "unet_in_channels" to tell them apart.
    c_in, c_out = int(unet_cfg.get("in_channels", 4)), int(unet_cfg.get("out_channels", 4))
    if c_in not in (c_out, 2 * c_out + 1):
        raise DiffusersImportError(
            f"the U-Net has {c_in} input and {c_out} output channels; edgediff runs U-Nets of equal "
            f"channels (text-to-image) or of {2 * c_out + 1} inputs (inpainting: latents, mask, "
            "masked image latents)")
    latent_channels = int(vae_cfg.get("latent_channels", c_out))
    if latent_channels != c_out:
        raise DiffusersImportError(f"the VAE has {latent_channels} latent channels but the U-Net "
                                   f"denoises {c_out}: the parts do not belong together")
    h, w = _sizes(unet_cfg["sample_size"])
    factor = 2 ** (len(vae_cfg.get("block_out_channels", [1])) - 1)
    return {
        "format_version": FORMAT_VERSION,
        "kind": "text-to-image",
        "pipeline": index.get("_class_name"),
        "name": name,
        "description": description,
        "prediction": prediction_from_config(sc),
        "schedule": schedule_from_config(sc),
        "num_train_timesteps": int(sc.get("num_train_timesteps", 1000)),
        "spacing": spacing,
        "steps_offset": int(sc.get("steps_offset", 0)),
        "set_alpha_to_one": bool(sc.get("set_alpha_to_one", True)),
        "latent_shape": [c_out, h, w],
        "unet_in_channels": c_in,
        "image_shape": [int(vae_cfg.get("out_channels", 3)), h * factor, w * factor],
        "data_range": [-1.0, 1.0],
        "vae": {"scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
                "shift_factor": vae_cfg.get("shift_factor")},
        "text": {"max_length": int(max_length), "hidden_size": hidden},
        "guidance": 7.5,  # StableDiffusionPipeline's default guidance_scale
    }


def write_tokenizer(src: Path, dst: Path) -> int:
    """Copy the tokenizer folder with the four files the runtime reads; returns max_length.

    transformers 5 saves CLIPTokenizer as tokenizer.json alone; vocab.json and merges.txt are
    then taken from its BPE model, and special_tokens_map.json from tokenizer_config.json.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    cfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    if not (dst / "vocab.json").is_file() or not (dst / "merges.txt").is_file():
        if not (src / "tokenizer.json").is_file():
            raise DiffusersImportError(f"{src} has neither vocab.json + merges.txt nor tokenizer.json")
        model = _read_json(src / "tokenizer.json").get("model", {})
        if model.get("type") != "BPE":
            raise DiffusersImportError(f"{src}/tokenizer.json is not a BPE tokenizer (CLIP's is)")
        (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if not (dst / "special_tokens_map.json").is_file():
        special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
        (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if not (dst / "tokenizer_config.json").is_file():
        (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    length = cfg.get("model_max_length", 77)
    # transformers writes a huge sentinel when no length was set; CLIP's is 77.
    return int(length) if isinstance(length, int) and length < 10_000 else 77


def export_pipeline(src: Path, out: Path, name: str | None = None, description: str = "") -> dict:
    """Export the StableDiffusionPipeline folder `src` to `out`; return what was written and checked."""
    if not (src / "model_index.json").is_file():
        raise DiffusersImportError(f"{src} has no model_index.json; pass the folder a diffusers "
                                   "pipeline's save_pretrained wrote")
    index = _read_json(src / "model_index.json")
    refuse_class(str(index.get("_class_name")))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (src / part).is_dir():
            raise DiffusersImportError(f"{src} has no {part}/ folder; the pipeline folder is incomplete")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
    except ImportError as e:
        raise DiffusersImportError("exporting a pipeline needs diffusers and transformers: "
                                   "pip install -e 'exporter[diffusers]' transformers") from e
    sc = _read_json(src / "scheduler" / "scheduler_config.json")
    unet_cfg = _read_json(src / "unet" / "config.json")
    vae_cfg = _read_json(src / "vae" / "config.json")
    text_cfg = _read_json(src / "text_encoder" / "config.json")
    out.mkdir(parents=True, exist_ok=True)
    max_length = write_tokenizer(src / "tokenizer", out / "tokenizer")
    meta = manifest(index, sc, unet_cfg, vae_cfg, text_cfg, max_length,
                    name or src.resolve().name,
                    description or f"diffusers {index.get('_class_name')} exported from {src.resolve().name}")

    # low_cpu_mem_usage=False: the plain load path, without asking for `accelerate`.
    unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), low_cpu_mem_usage=False).float().eval()
    vae = AutoencoderKL.from_pretrained(str(src / "vae"), low_cpu_mem_usage=False).float().eval()
    text = CLIPTextModel.from_pretrained(str(src / "text_encoder")).float().eval()

    C, h, w = meta["latent_shape"]
    C_in = meta["unet_in_channels"]
    Ci, H, W = meta["image_shape"]
    L, D = max_length, meta["text"]["hidden_size"]
    T = meta["num_train_timesteps"]
    vocab = int(text_cfg["vocab_size"])

    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def ids(n: int, seed: int) -> dict:
        return {"input_ids": torch.randint(0, vocab, (n, L), generator=g(seed))}

    def unet_in(n: int, seed: int) -> dict:
        r = g(seed)
        # Fractional times too: diffusers' Euler-family schedulers pass them.
        return {"sample": torch.randn(n, C_in, h, w, generator=r),
                "timestep": torch.rand(n, generator=r) * (T - 1),
                "encoder_hidden_states": torch.randn(n, L, D, generator=r)}

    def dec_in(n: int, seed: int) -> dict:
        return {"latent_sample": torch.randn(n, C, h, w, generator=g(seed))}

    def enc_in(n: int, seed: int) -> dict:
        return {"sample": torch.rand(n, Ci, H, W, generator=g(seed)) * 2 - 1}

    checks = {}
    parts = [("text_encoder", TextEncoder(text), ids, ["last_hidden_state", "pooler_output"], text_cfg),
             ("unet", UNet(unet), unet_in, ["out_sample"], unet_cfg),
             ("vae_decoder", VaeDecoder(vae), dec_in, ["sample"], vae_cfg),
             ("vae_encoder", VaeEncoder(vae), enc_in, ["latent_parameters"], vae_cfg)]
    for part, module, make, outputs, cfg in parts:
        checks[part] = _export_graph(module.eval(), make(2, 0), outputs, out / part / "model.onnx",
                                     [make(3, 1), make(1, 2)])
        (out / part / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    shutil.copy2(src / "model_index.json", out / "model_index.json")
    # The manifest last: a folder holding it is complete.
    (out / "edgediff.json").write_text(json.dumps(meta, indent=2))
    for part, c in checks.items():
        print(f"{part}: max abs diff vs PyTorch {c['max_abs_diff']:.2e} "
              f"(relative {c['max_rel_err']:.2e}, limit {VERIFY_RTOL:.0e})", file=sys.stderr)
    return {"out": str(out), "kind": "text-to-image", "checks": checks, "manifest": meta}
