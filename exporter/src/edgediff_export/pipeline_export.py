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
                                         "unet_in_channels"; out_sample has the latents' C;
                                         a guidance-distilled U-Net, time_cond_proj_dim D in its
                                         config, also takes timestep_cond float32 [N, D], LCM's
                                         guidance-scale embedding, as optimum names it)
    OUT/vae_decoder/model.onnx           latent_sample -> sample (any height and width: tiled decoding)
    OUT/vae_encoder/model.onnx           sample -> latent_parameters (mean || logvar)
    OUT/tokenizer/                       vocab.json merges.txt tokenizer_config.json special_tokens_map.json
    OUT/scheduler/scheduler_config.json  the source pipeline's scheduler config
    each graph folder: config.json       the part's diffusers/transformers config
    a graph over 2 GB: model.onnx_data   its tensors (ONNX external data), beside model.onnx

`--precision fp16` converts each graph to float16 (precision.py's to_fp16) with float32 islands
where fp16 overflows or loses accuracy (see `fp32_islands`), and keeps every graph's inputs and
outputs float32: the casts sit inside the graphs, so the runtime feeds and reads the same
tensors as for fp32 and the sampler's latents never round to fp16 between steps. Each fp16
graph is checked against the fp32 graph on the same random inputs (FP16_RTOL), and refused if
a tensor it keeps in fp16 reaches fp16's 65504 in the fp32 graph (precision.fp16_peak).

A graph whose tensors exceed `--external-data-threshold` bytes (default EXTERNAL_DATA_THRESHOLD,
below protobuf's 2 GiB limit; SD 1.5's fp32 U-Net is 3.4 GB) keeps its weights in
`model.onnx_data` beside `model.onnx`, one file per graph as optimum writes it.

The U-Net's timestep is float32 (as in optimum's export): diffusers' Euler-family schedulers
pass fractional timesteps, and the sinusoidal embedding takes any real time. The batch axis N
is dynamic in every graph, and the height and width of the U-Net's and the VAE's images and
latents too (as in optimum's export), so that the runtime can make images of other sizes
(`edgediff sample --height --width`) and decode large latents in tiles (`--vae-tiles`).
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

from .precision import FP16_MAX, FP16_RTOL, compare, fp16_peak, io_types, load_inferred, to_fp16

from .diffusers_import import (DiffusersImportError, _read_json, consistency_sampling,
                               prediction_from_config, schedule_from_config)

FORMAT_VERSION = 1
# Relative to max |PyTorch output|, as every other export (export.VERIFY_RTOL).
VERIFY_RTOL = 1e-4
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
             "LatentConsistencyModelPipeline")
# The pipelines' default guidance_scale: StableDiffusionPipeline's, LatentConsistencyModelPipeline's.
GUIDANCE = {"LatentConsistencyModelPipeline": 8.5}
DEFAULT_GUIDANCE = 7.5
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
# protobuf refuses messages of 2 GiB; 128 MiB below it leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data, optimum's name
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

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                          return_dict=False)[0]


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


def _attention_scores(graph: onnx.GraphProto) -> list[str]:
    """Each Softmax's score computation: the MatMul of queries and keys and the elementwise
    nodes (scale, mask) between it and the Softmax."""
    producer = {o: n for n in graph.node for o in n.output}
    names = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        cur = producer.get(node.input[0])
        while cur is not None and cur.op_type in ("Mul", "Div", "Add", "Sub", "Where", "Cast"):
            names.append(cur.name)
            # Follow the operand that is computed (not a constant or an initializer).
            cur = next((producer[i] for i in cur.input if i in producer
                        and producer[i].op_type not in ("Constant", "Identity")), None)
        if cur is not None and cur.op_type == "MatMul":
            names.append(cur.name)
    return names


def fp32_islands(part: str, graph: onnx.GraphProto, cfg: dict) -> tuple[list[str], list[str]]:
    """(operator types, node names) of graph `part` kept float32 in the fp16 export, besides
    to_fp16's own (the norms, the time embedding):

    - Softmax everywhere (diffusers' `upcast_softmax`), and the attention scores before it
      (query x key, scale, mask) in the VAE, whose attention diffusers always upcasts, and in a
      U-Net whose config asks `upcast_attention` (SD 2.x: its scores overflow fp16);
    - in the VAE decoder, everything at the output resolution: the last up-block, the
      upsampler that produces its input, conv_norm_out, conv_act and conv_out. Their activations
      are where a VAE exceeds fp16's 65504 (the "black images" of naive fp16 ONNX pipelines, and
      why diffusers' `force_upcast` runs SDXL's VAE in float32; its older `upcast_vae` kept
      post_quant_conv, conv_in and the mid-block in fp16 and the up-blocks in fp32). The rest of
      the decoder, at lower resolutions, is fp16.
    """
    import re

    nodes: list[str] = []
    if part.startswith("vae") or (part == "unet" and cfg.get("upcast_attention")):
        nodes += _attention_scores(graph)
    if part == "vae_decoder":
        ups = [int(m.group(1)) for n in graph.node if (m := re.search(r"(?:^|/)decoder/up_blocks\.(\d+)/", n.name))]
        if ups:
            last = max(ups)
            full = re.compile(rf"(?:^|/)decoder/(up_blocks\.{last}/|up_blocks\.{last - 1}/upsamplers|"
                              r"conv_norm_out/|conv_act/|conv_out/)")
            nodes += [n.name for n in graph.node if full.search(n.name)]
    return ["Softmax"], nodes


def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the graph's tensor data (initializers and constants, subgraphs included); not
    ByteSize(), which serialises, and fails for one tensor over 2 GB."""
    from onnx.external_data_helper import _get_all_tensors

    def size(t: onnx.TensorProto) -> int:
        return (len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
                + 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
                + sum(len(x) for x in t.string_data))
    return sum(size(t) for t in _get_all_tensors(proto))


def save_graph(proto: onnx.ModelProto, path: Path, threshold: int) -> bool:
    """Write `proto` to `path` (in a folder of its own: onnx appends to an existing data file),
    its tensors in `path`_data when they exceed `threshold` bytes; returns whether they do."""
    external = tensor_bytes(proto) > threshold
    if external:
        # Tensors under 1 KiB stay inline (onnx's default): shapes and scalars the graph reads.
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + DATA_SUFFIX, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(proto, str(path))
    return external


def _export_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
                  path: Path, check_inputs: list[dict[str, torch.Tensor]], opset: int = 17,
                  spatial: tuple[str, ...] = (), fp16_islands=None,
                  threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """Export `module` to `path` (N dynamic everywhere; height and width too, axes 2 and 3, of
    the [N, C, H, W] inputs and outputs named in `spatial`), verify it, return the check's
    figures.

    fp16_islands: None for float32; else a function of the fp32 graph giving the
    (operator types, node names) kept float32 in the float16 graph written instead.
    """
    import onnxruntime as ort

    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / ".export"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "fp32").mkdir(parents=True)
    raw = stage / "fp32" / "torch.onnx"  # torch.onnx writes a graph over 2 GB as many files here
    names = list(inputs)
    dynamic = {k: {0: "N", 2: f"{k}_height", 3: f"{k}_width"} if k in spatial else {0: "N"}
               for k in [*names, *outputs]}
    try:
        with warnings.catch_warnings():
            # diffusers' shape asserts and batch branches trace as constants (fixed channel counts).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, tuple(inputs.values()), str(raw), input_names=names,
                              output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                              dynamo=False)
        onnx.checker.check_model(str(raw))
        sess = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
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
        del sess
        if not worst_rel <= VERIFY_RTOL:
            raise RuntimeError(f"{path}: ONNX output differs from PyTorch by {worst_rel:.2e} relative "
                               f"(limit {VERIFY_RTOL:.0e}); the export is not faithful")
        figures = {"max_abs_diff": worst_abs, "max_rel_err": worst_rel}
        (stage / "out").mkdir()
        final = stage / "out" / path.name
        if fp16_islands is None:
            # Loaded with its data and saved again: torch's file per tensor becomes one data file.
            proto = onnx.load(str(raw))
        else:
            plain = onnx.load(str(raw), load_external_data=False)
            ops, nodes = fp16_islands(plain.graph)
            proto = to_fp16(load_inferred(raw), keep_io_types=True, fp32_ops=ops, fp32_nodes=nodes,
                            shapes_inferred=True)
            if io_types(proto) != io_types(plain):  # the runtime feeds and reads float32
                raise RuntimeError(f"{path}: the fp16 graph's inputs and outputs {io_types(proto)} are not "
                                   f"the fp32 graph's {io_types(plain)}")
        graph16 = onnx.GraphProto()
        if fp16_islands is not None:  # its nodes and value types, for fp16_peak
            graph16.node.extend(proto.graph.node)
            graph16.value_info.extend(proto.graph.value_info)
            graph16.output.extend(proto.graph.output)
        figures["external_data"] = save_graph(proto, final, threshold)
        del proto
        onnx.checker.check_model(str(final))
        if fp16_islands is not None:
            feeds = [{k: v.numpy() for k, v in f.items()} for f in check_inputs]
            err = compare(raw, final, feeds)
            if not err <= FP16_RTOL:
                raise RuntimeError(f"{path}: the fp16 graph differs from the fp32 graph by {err:.2e} relative "
                                   f"(limit {FP16_RTOL:.0e})")
            peak, where = fp16_peak(raw, graph16, feeds)
            if not peak <= FP16_MAX:
                raise RuntimeError(f"{path}: {where} reaches {peak:.3g} in float32, past float16's {FP16_MAX:g}: "
                                   "it would overflow on a device with fp16 kernels; its part of the graph "
                                   "has to stay float32")
            figures["fp16_max_rel_diff"], figures["fp16_peak"] = err, peak
        data = path.parent / (path.name + DATA_SUFFIX)
        data.unlink(missing_ok=True)  # a stale one from an earlier export
        if figures["external_data"]:
            # onnx creates it private (0600); it gets the graph file's permissions.
            os.chmod(final.parent / data.name, final.stat().st_mode & 0o777)
            os.replace(final.parent / data.name, data)
        os.replace(final, path)
        figures["bytes"] = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return figures


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
    # A consistency scheduler (LCMScheduler, TCDScheduler) names its sampler and grid: the
    # runtime then samples with it at 4 steps when a run names none.
    consistency = {}
    sampling = consistency_sampling(sc)
    if sampling is not None:
        consistency = {"sampling": sampling,
                       "original_inference_steps": int(sc.get("original_inference_steps", 50))}
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
        "guidance": GUIDANCE.get(index.get("_class_name"), DEFAULT_GUIDANCE),
        **consistency,
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


def export_pipeline(src: Path, out: Path, name: str | None = None, description: str = "",
                    precision: str = "fp32", threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """Export the StableDiffusionPipeline folder `src` to `out` in `precision` (fp32 or fp16),
    graphs whose tensors exceed `threshold` bytes with external data; return what was written
    and checked."""
    if precision not in ("fp32", "fp16"):
        raise DiffusersImportError(f"precision {precision!r} is not supported (fp32, fp16)")
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

    cond_dim = unet_cfg.get("time_cond_proj_dim")

    def unet_in(n: int, seed: int, size: tuple[int, int] | None = None) -> dict:
        r = g(seed)
        # Fractional times too: diffusers' Euler-family schedulers pass them.
        feed = {"sample": torch.randn(n, C_in, *(size or (h, w)), generator=r),
                "timestep": torch.rand(n, generator=r) * (T - 1),
                "encoder_hidden_states": torch.randn(n, L, D, generator=r)}
        if cond_dim is not None:
            # The guidance-scale embedding is sines and cosines: values in [-1, 1].
            feed["timestep_cond"] = torch.rand(n, int(cond_dim), generator=r) * 2 - 1
        return feed

    def dec_in(n: int, seed: int, size: tuple[int, int] | None = None) -> dict:
        # What the runtime feeds: unit-variance latents divided by the scaling factor.
        return {"latent_sample": torch.randn(n, C, *(size or (h, w)), generator=g(seed))
                / meta["vae"]["scaling_factor"]}

    def enc_in(n: int, seed: int, size: tuple[int, int] | None = None) -> dict:
        return {"sample": torch.rand(n, Ci, *(size or (H, W)), generator=g(seed)) * 2 - 1}

    # Every graph but the text encoder takes any height and width (the runtime's --height
    # --width; the decoder's tiles), each checked at a smaller, non-square size too (in fp16
    # against the fp32 graph as well). The U-Net's latent sides must divide by 2 for each of
    # its downsamplings: its skip connections meet the upsampled path at their own size (the
    # traced graph has no diffusers' upsample_size branch), and the check size keeps to that.
    m = 2 ** (len(unet_cfg.get("block_out_channels", [1])) - 1)
    vf = H // h
    unet_other = (max(m, h - m), w + m)
    dec_other = (h // 2 + 1, max(1, w // 2))
    spatial = {"unet": (("sample", "out_sample"), unet_other),
               "vae_decoder": (("latent_sample", "sample"), dec_other),
               "vae_encoder": (("sample", "latent_parameters"), (dec_other[0] * vf, dec_other[1] * vf))}

    checks = {}
    parts = [("text_encoder", TextEncoder(text), ids, ["last_hidden_state", "pooler_output"], text_cfg),
             ("unet", UNet(unet), unet_in, ["out_sample"], unet_cfg),
             ("vae_decoder", VaeDecoder(vae), dec_in, ["sample"], vae_cfg),
             ("vae_encoder", VaeEncoder(vae), enc_in, ["latent_parameters"], vae_cfg)]
    for part, module, make, outputs, cfg in parts:
        axes, other = spatial.get(part, ((), None))
        extra = [make(2, 3, other)] if other else []
        islands = None
        if precision == "fp16":
            islands = (lambda graph, part=part, cfg=cfg: fp32_islands(part, graph, cfg))
        checks[part] = _export_graph(module.eval(), make(2, 0), outputs, out / part / "model.onnx",
                                     [make(3, 1), make(1, 2), *extra], spatial=axes,
                                     fp16_islands=islands, threshold=threshold)
        (out / part / "config.json").write_text(json.dumps(cfg, indent=2))
    if (src / "distillation.json").is_file():
        # How a distilled student was made (edgediff-train distill-t2i writes it): the
        # runtime and the model card read it as a single-file student's `distillation`.
        meta["distillation"] = _read_json(src / "distillation.json")
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    shutil.copy2(src / "model_index.json", out / "model_index.json")
    # The manifest last: a folder holding it is complete.
    (out / "edgediff.json").write_text(json.dumps(meta, indent=2))
    for part, c in checks.items():
        fp16 = (f"; fp16 vs fp32 {c['fp16_max_rel_diff']:.2e} relative (limit {FP16_RTOL:.0e}), "
                f"fp16 tensors up to {c['fp16_peak']:.3g} (limit {FP16_MAX:g})" if "fp16_max_rel_diff" in c else "")
        where = " + model.onnx_data" if c["external_data"] else ""
        print(f"{part}: max abs diff vs PyTorch {c['max_abs_diff']:.2e} "
              f"(relative {c['max_rel_err']:.2e}, limit {VERIFY_RTOL:.0e}){fp16}; "
              f"{c['bytes'] / 1e6:.1f} MB{where}", file=sys.stderr)
    return {"out": str(out), "kind": "text-to-image", "precision": precision, "checks": checks,
            "manifest": meta}
