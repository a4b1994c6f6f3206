"""Recover a diffusers pipeline folder from an edgediff text-to-image folder (what
`edgediff-export diffusers` wrote), so that a shipped pipeline whose PyTorch weights are gone
can be trained further, e.g. as the teacher of `edgediff-train distill-t2i`:

    edgediff-export recover-pipeline models/mnist-t2i --out /tmp/mnist-t2i-pipeline

How the weights are found. torch.onnx keeps the names of some parameters (convolutions) and
stores others anonymously (`onnx::MatMul_812`: a Linear's weight, transposed; GroupNorm's gamma
reshaped to [C, 1, 1]). Rather than reverse each lowering by hand (onnx_weights.py does that for
edgediff's own U-Net), each part is rebuilt from its config.json, every parameter filled with
distinct random values, and exported again by the same wrapper and torch build that wrote the
folder: the probe graph. Each probe initializer whose values equal a parameter's (as stored,
or transposed) names which parameter the folder's tensor of the same name holds (an
initializer, or an Identity node's output: torch.onnx keeps one of several initializers of
equal values, such as a fresh model's zero biases, and names the others as Identity nodes). Every parameter must be
found, and the recovered module is then checked against the folder's graph itself on random
inputs (VERIFY_RTOL, as every export): a weight the graph folded into another constant would
fail one or the other.

The probe is exported with the same torch.onnx settings as pipeline_export (opset 17, the
TorchScript exporter, the same dynamic axes); a folder whose graph has other nodes (another
torch version) is refused, never guessed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .diffusers_import import DiffusersImportError
from .pipeline_export import VERIFY_RTOL, TextEncoder, UNet, VaeDecoder, VaeEncoder

PARTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _graph(path: Path) -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    proto = onnx.load(str(path))
    return proto.graph, {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _resolve(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The initializers, and each Identity node's output as the tensor it passes on:
    torch.onnx keeps one of several initializers of equal values (a fresh model's zero
    biases) and names the others as Identity nodes of it."""
    out = dict(inits)
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    for name in alias:
        src = name
        while src in alias:
            src = alias[src]
        if src in inits:
            out[name] = inits[src]
    return out


# Each part's outputs and the inputs and outputs with dynamic height and width, as
# pipeline_export.export_pipeline exports them: constant folding sees the same graph only when
# the axes are the same.
OUTPUTS = {"text_encoder": (["last_hidden_state", "pooler_output"], ()),
           "unet": (["out_sample"], ("sample", "out_sample")),
           "vae_decoder": (["sample"], ("latent_sample", "sample")),
           "vae_encoder": (["latent_parameters"], ("sample", "latent_parameters"))}


def _probe_export(wrapper: torch.nn.Module, feed: dict[str, torch.Tensor], part: str,
                  path: Path) -> None:
    outputs, spatial = OUTPUTS[part]
    dynamic = {k: {0: "N", 2: f"{k}_height", 3: f"{k}_width"} if k in spatial else {0: "N"}
               for k in [*feed, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's own, shown when the folder was written
        torch.onnx.export(wrapper, tuple(feed.values()), str(path), input_names=list(feed),
                          output_names=outputs, dynamic_axes=dynamic, opset_version=17,
                          dynamo=False)


def _fill_distinct(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and distinct (a fresh module's norms are all ones and zeros,
    which would match each other)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _fingerprint(a: np.ndarray) -> tuple:
    flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    return (flat.size, *flat[:4].tolist())


def recover_weights(module: torch.nn.Module, wrapper: torch.nn.Module,
                    feed: dict[str, torch.Tensor], graph: Path, part: str,
                    only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The folder graph's values of `module`'s parameters (those named in `only`, when given),
    found through a probe export of `wrapper` (which wraps `module`) on `feed`."""
    _fill_distinct(module, seed=len(part))
    params = {k: v.detach().numpy() for k, v in module.named_parameters()
              if only is None or k in only}
    # Two views of each parameter: as stored, and transposed (a Linear lowered to MatMul).
    index: dict[tuple, list[tuple[str, bool]]] = {}
    for name, value in params.items():
        index.setdefault(_fingerprint(value), []).append((name, False))
        if value.ndim == 2:
            index.setdefault(_fingerprint(value.T), []).append((name, True))
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        _probe_export(wrapper, feed, part, probe_path)
        probe = _graph(probe_path)[1]
    shipped_graph, inits = _graph(graph)
    shipped = _resolve(shipped_graph, inits)
    found: dict[str, torch.Tensor] = {}
    for init, value in probe.items():
        hits = [(n, t) for n, t in index.get(_fingerprint(value), [])
                if np.array_equal((params[n].T if t else params[n]).reshape(-1),
                                  value.reshape(-1))]
        if not hits:
            continue
        name, transposed = hits[0]
        held = shipped.get(init)
        if held is None or held.size != value.size:
            raise DiffusersImportError(
                f"{graph}: no tensor {init} of {value.size} values, where the probe export "
                f"keeps {part}'s {name}; the folder was written by another exporter or torch "
                "version, so its weights cannot be matched")
        got = held.astype(np.float32).reshape(value.shape)
        found[name] = torch.from_numpy(np.ascontiguousarray(got.T if transposed else got)
                                       .reshape(params[name].shape))
    missing = sorted(set(params) - set(found))
    if missing:
        raise DiffusersImportError(f"{graph}: {part}'s parameters {', '.join(missing[:6])}"
                                   f"{' ...' if len(missing) > 6 else ''} are not in the graph "
                                   "as stored weights (folded into other constants?)")
    return found


def _check(wrapper: torch.nn.Module, graph: Path, feed: dict[str, torch.Tensor], part: str) -> float:
    """Relative error of the recovered module against the folder's graph."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = wrapper(*feed.values())
    refs = ref if isinstance(ref, tuple) else (ref,)
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
    worst = 0.0
    for r, g in zip(refs, got):
        r = r.numpy()
        worst = max(worst, float(np.max(np.abs(g - r))) / max(1e-12, float(np.max(np.abs(r)))))
    if not worst <= VERIFY_RTOL:
        raise DiffusersImportError(f"{graph}: the recovered {part} differs from the graph by "
                                   f"{worst:.2e} relative (limit {VERIFY_RTOL:.0e})")
    return worst


def recover_pipeline(src: Path, out: Path) -> dict:
    """Write the diffusers pipeline folder `out` whose export is the text-to-image folder
    `src`; returns each part's check against `src`'s graphs."""
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    for part in PARTS:
        if not (src / part / "model.onnx").is_file() or not (src / part / "config.json").is_file():
            raise DiffusersImportError(f"{src} has no {part}/model.onnx and config.json; pass a "
                                       "folder edgediff-export diffusers wrote")
        if (src / part / "model.onnx_data").exists():
            raise DiffusersImportError(f"{src / part} keeps its weights as external data; "
                                       "recover-pipeline reads single-file graphs only")
    cfg = {p: json.loads((src / p / "config.json").read_text()) for p in PARTS}
    meta = json.loads((src / "edgediff.json").read_text())
    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg["unet"]).eval()
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
    vae = AutoencoderKL.from_config(cfg["vae_decoder"]).eval()
    C, h, w = meta["latent_shape"]
    Ci, H, W = meta["image_shape"]
    L, D = meta["text"]["max_length"], meta["text"]["hidden_size"]
    feeds = {
        "text_encoder": {"input_ids": torch.randint(0, int(cfg["text_encoder"]["vocab_size"]),
                                                    (2, L), generator=g)},
        "unet": {"sample": torch.randn(2, meta["unet_in_channels"], h, w, generator=g),
                 "timestep": torch.rand(2, generator=g) * 999,
                 "encoder_hidden_states": torch.randn(2, L, D, generator=g)},
        "vae_decoder": {"latent_sample": torch.randn(2, C, h, w, generator=g)},
        "vae_encoder": {"sample": torch.rand(2, Ci, H, W, generator=g) * 2 - 1},
    }
    if cfg["unet"].get("time_cond_proj_dim"):
        feeds["unet"]["timestep_cond"] = torch.rand(2, int(cfg["unet"]["time_cond_proj_dim"]),
                                                    generator=g) * 2 - 1
    wrappers = {"text_encoder": TextEncoder(text), "unet": UNet(unet),
                "vae_decoder": VaeDecoder(vae), "vae_encoder": VaeEncoder(vae)}
    vae_names = {k for k, _ in vae.named_parameters()}
    # The decoder graph holds post_quant_conv and the decoder; the encoder graph the rest.
    decoder = {k for k in vae_names if k.startswith(("decoder.", "post_quant_conv."))}
    owners = {"text_encoder": (text, None), "unet": (unet, None),
              "vae_decoder": (vae, decoder), "vae_encoder": (vae, vae_names - decoder)}
    states: dict[str, dict[str, torch.Tensor]] = {"text_encoder": {}, "unet": {}, "vae": {}}
    for part in PARTS:
        module, only = owners[part]
        got = recover_weights(module, wrappers[part], feeds[part], src / part / "model.onnx",
                              part, only)
        states["vae" if part.startswith("vae") else part].update(got)
    for module, key in ((text, "text_encoder"), (unet, "unet"), (vae, "vae")):
        # strict: buffers (CLIP's position ids) keep their config values.
        result = module.load_state_dict(states[key], strict=False)
        if result.unexpected_keys or set(result.missing_keys) & {k for k, _ in module.named_parameters()}:
            raise DiffusersImportError(f"{src}: the recovered {key} weights do not fit its config")
    checks = {part: _check(wrappers[part], src / part / "model.onnx", feeds[part], part)
              for part in PARTS}

    vae.register_to_config(scaling_factor=meta["vae"]["scaling_factor"])
    tok = CLIPTokenizer(str(src / "tokenizer" / "vocab.json"), str(src / "tokenizer" / "merges.txt"),
                        model_max_length=L)
    index = json.loads((src / "model_index.json").read_text())
    sc = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sc["_class_name"]).from_config(sc)
    pipe_cls = getattr(diffusers, index["_class_name"])
    parts = dict(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler)
    if "safety_checker" in index:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe: DiffusionPipeline = pipe_cls(**parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    pipe.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"out": str(out), "max_rel_err": checks}
