"""`edgediff-export`: turn a trained network into a self-describing ONNX file, and verify it.

Subcommands:
  checkpoint CKPT --out M.onnx   export the EMA weights of an `edgediff-train` checkpoint
  random --out M.onnx            export a randomly initialised U-Net (tests, benchmarks)
  add-metadata M.onnx ...        attach edgediff metadata to an ONNX file made elsewhere
  fp16 M.onnx --out M16.onnx     write a float16 copy (half the size; checked against fp32)
  diffusers DIR --out OUT        a StableDiffusion(Inpaint)Pipeline folder as a text-to-image folder
                                 (--unet DIR: a UNet2DModel as one ONNX file)
  ort M.onnx --out M.ort         write an ORT-format copy, which the runtime uses in place
                                 from a memory-mapped file (zero-copy weights)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from .metadata import make_metadata, write_metadata
from .network import build_network, is_continuous
from .schedules import T_MIN, schedule_metadata
from .unet import UNet, UNetConfig

VERIFY_RTOL = 1e-4


def _inputs(model: UNet, n: int, seed: int, timestep_dtype: str = "int64") -> dict[str, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=g)
    if is_continuous(model):
        # Continuous models are verified on the times the runtime passes them.
        t = T_MIN + (1.0 - T_MIN) * torch.rand(n, generator=g)
    elif timestep_dtype == "float32":
        # Fractional indices too: continuous-time samplers evaluate between table entries.
        t = t.float() + torch.rand(n, generator=g)
    inputs = {
        "sample": torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g),
        "timestep": t,
    }
    if cfg.num_classes is not None:
        inputs["class_labels"] = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    return inputs


def export_unet(model: UNet, meta: dict, out: Path, opset: int = 17,
                timestep_dtype: str = "int64") -> float:
    """Write `model` to `out` with metadata; return the verified max relative error.

    timestep_dtype: "int64" (training indices only) or "float32" (fractional indices allowed,
    so samplers with Karras or log-SNR spacing give the network its exact time).
    """
    model = model.eval()
    inputs = _inputs(model, 2, seed=0, timestep_dtype=timestep_dtype)
    names = list(inputs)
    dynamic = {k: {0: "N"} for k in names} | {"out": {0: "N"}}
    tmp = out.with_suffix(".onnx.tmp")
    torch.onnx.export(model, tuple(inputs.values()), str(tmp), input_names=names,
                      output_names=["out"], dynamic_axes=dynamic, opset_version=opset,
                      dynamo=False)
    proto = onnx.load(str(tmp))
    write_metadata(proto, meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    err = verify(model, tmp, timestep_dtype=timestep_dtype)
    os.replace(tmp, out)
    return err


def verify(model: UNet, path: Path, batch: int = 3, timestep_dtype: str = "int64") -> float:
    """onnxruntime vs PyTorch on random inputs; raise beyond VERIFY_RTOL (relative to max |ref|)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed in (1, 2):
        inputs = _inputs(model, batch, seed, timestep_dtype)
        with torch.no_grad():
            ref = model(*inputs.values()).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        rel = float(np.max(np.abs(got - ref)) / max(1e-12, float(np.max(np.abs(ref)))))
        worst = max(worst, rel)
    if not worst <= VERIFY_RTOL:
        raise RuntimeError(f"ONNX output differs from PyTorch by {worst:.2e} relative "
                           f"(limit {VERIFY_RTOL:.0e}); the export is not faithful")
    return worst


def unet_metadata(cfg: UNetConfig, schedule: dict, name: str, description: str,
                  prediction: str = "epsilon", time_input: str = "index") -> dict:
    conditioning = None
    if cfg.num_classes is not None:
        conditioning = {"type": "class", "num_classes": cfg.num_classes, "null_label": cfg.num_classes}
    return make_metadata(name=name, description=description, prediction=prediction,
                         time_input=time_input, schedule=schedule,
                         sample_shape=[cfg.in_channels, cfg.image_size, cfg.image_size],
                         conditioning=conditioning, extra={"unet": cfg.to_dict()})


def _finish(a: argparse.Namespace, result: dict) -> dict:
    """Apply --precision fp16 to a freshly exported file (a pipeline folder's graphs were
    converted as they were exported)."""
    if getattr(a, "precision", "fp32") == "fp16" and result.get("kind") != "text-to-image":
        from .precision import write_fp16
        result["fp16_max_rel_diff"] = write_fp16(a.out, a.out)
    return result


def _cmd_fp16(a: argparse.Namespace) -> dict:
    from .precision import write_fp16
    return {"out": str(a.out), "fp16_max_rel_diff": write_fp16(a.model, a.out)}


def _cmd_ort(a: argparse.Namespace) -> dict:
    from .precision import write_ort_format
    write_ort_format(a.model, a.out)
    return {"out": str(a.out)}


def _cmd_checkpoint(a: argparse.Namespace) -> dict:
    ck = torch.load(a.checkpoint, weights_only=False, map_location="cpu")
    cfg = UNetConfig.from_dict(ck["unet_config"])
    # Checkpoints from before the objectives were added are eps-prediction index models.
    prediction = ck.get("prediction", "epsilon")
    train_cfg = ck.get("train_config", {})
    model = build_network(cfg, ck["schedule"], train_cfg.get("prediction", "eps"))
    model.load_state_dict(ck["ema"] if not a.raw_weights else ck["model"])
    objective = train_cfg.get("objective", "simple")
    meta = unet_metadata(cfg, ck["schedule"], a.name, a.description or
                         f"U-Net trained {ck['step']} steps by edgediff-train "
                         f"({objective} objective, {prediction} prediction)",
                         prediction=prediction, time_input=ck.get("time_input", "index"))
    return _finish(a, {"out": str(a.out), "max_rel_err": export_unet(
        model, meta, a.out, timestep_dtype=a.timestep_dtype)})


def _cmd_random(a: argparse.Namespace) -> dict:
    torch.manual_seed(a.seed)
    cfg = UNetConfig(in_channels=a.channels, base_channels=a.base_channels,
                     channel_mult=tuple(int(c) for c in a.channel_mult.split(",")),
                     num_res_blocks=a.num_res_blocks,
                     attention_resolutions=tuple(int(r) for r in a.attention_resolutions.split(",") if r),
                     image_size=a.image_size, num_groups=a.num_groups, num_classes=a.num_classes)
    model = UNet(cfg)
    meta = unet_metadata(cfg, schedule_metadata(a.schedule, a.num_train_timesteps),
                         a.name, "randomly initialised U-Net (tests)")
    return _finish(a, {"out": str(a.out), "max_rel_err": export_unet(model, meta, a.out)})


def _cmd_add_metadata(a: argparse.Namespace) -> dict:
    proto = onnx.load(str(a.model))
    meta = make_metadata(name=a.name, description=a.description, prediction=a.prediction,
                         time_input=a.time_input,
                         schedule=schedule_metadata(a.schedule, a.num_train_timesteps,
                                                    a.beta_start, a.beta_end),
                         sample_shape=[int(s) for s in a.sample_shape.split(",")],
                         data_range=(a.data_min, a.data_max))
    write_metadata(proto, meta)
    out = a.out or a.model
    tmp = Path(str(out) + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return {"out": str(out), "metadata": meta}


def _cmd_recover_pipeline(a: argparse.Namespace) -> dict:
    from .diffusers_import import DiffusersImportError
    from .onnx_pipeline import recover_pipeline
    try:
        return recover_pipeline(a.folder, a.out)
    except DiffusersImportError as e:
        print(f"edgediff-export recover-pipeline: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_diffusers(a: argparse.Namespace) -> dict:
    from .diffusers_import import run
    return _finish(a, run(a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("checkpoint", help="export an edgediff-train checkpoint (EMA weights)")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--name", default="mnist-ddpm")
    c.add_argument("--description", default="")
    c.add_argument("--raw-weights", action="store_true", help="export the raw, not the EMA, weights")
    c.add_argument("--timestep-dtype", choices=["int64", "float32"], default="float32",
                   help="float32 lets samplers pass fractional indices (default)")
    c.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 writes float16 weights and sample tensors (time embedding and norms stay fp32)")
    c.set_defaults(fn=_cmd_checkpoint)

    r = sub.add_parser("random", help="export a randomly initialised U-Net")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--channels", type=int, default=1)
    r.add_argument("--image-size", type=int, default=8)
    r.add_argument("--base-channels", type=int, default=8)
    r.add_argument("--channel-mult", default="1,2")
    r.add_argument("--num-res-blocks", type=int, default=1)
    r.add_argument("--attention-resolutions", default="4")
    r.add_argument("--num-groups", type=int, default=4)
    r.add_argument("--num-classes", type=int, default=None)
    r.add_argument("--schedule", default="linear", choices=["linear", "cosine", "quadratic", "sigmoid"])
    r.add_argument("--num-train-timesteps", type=int, default=1000)
    r.add_argument("--name", default="tiny-random-unet")
    r.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 writes float16 weights and sample tensors (time embedding and norms stay fp32)")
    r.set_defaults(fn=_cmd_random)

    f = sub.add_parser("fp16", help="write a float16 copy of an edgediff model")
    f.add_argument("model", type=Path)
    f.add_argument("--out", type=Path, required=True)
    f.set_defaults(fn=_cmd_fp16)

    o = sub.add_parser("ort", help="write an ORT-format copy for zero-copy memory-mapped loading")
    o.add_argument("model", type=Path)
    o.add_argument("--out", type=Path, required=True)
    o.set_defaults(fn=_cmd_ort)

    m = sub.add_parser("add-metadata", help="attach edgediff metadata to an existing ONNX file")
    m.add_argument("model", type=Path)
    m.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    m.add_argument("--prediction", default="epsilon", choices=["epsilon", "v", "sample", "score"])
    m.add_argument("--time-input", default="index", choices=["index", "continuous", "sigma"])
    m.add_argument("--schedule", default="linear", choices=["linear", "cosine", "quadratic", "sigmoid"])
    m.add_argument("--num-train-timesteps", type=int, default=1000)
    m.add_argument("--beta-start", type=float, default=1e-4)
    m.add_argument("--beta-end", type=float, default=0.02)
    m.add_argument("--sample-shape", required=True, help="C,H,W")
    m.add_argument("--data-min", type=float, default=-1.0)
    m.add_argument("--data-max", type=float, default=1.0)
    m.add_argument("--name", default="model")
    m.add_argument("--description", default="")
    m.set_defaults(fn=_cmd_add_metadata)

    d = sub.add_parser("diffusers", help="export a diffusers StableDiffusionPipeline or StableDiffusionInpaintPipeline folder (DIR) or import a UNet2DModel (--unet); needs diffusers (and transformers for pipelines)")
    from .diffusers_import import add_arguments
    add_arguments(d)
    d.set_defaults(fn=_cmd_diffusers)

    rp = sub.add_parser("recover-pipeline", help="write the diffusers pipeline folder (PyTorch "
                        "weights) of a text-to-image folder edgediff-export diffusers wrote, e.g. "
                        "as a distill-t2i teacher; needs diffusers and transformers")
    rp.add_argument("folder", type=Path, help="the edgediff text-to-image folder")
    rp.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    rp.set_defaults(fn=_cmd_recover_pipeline)

    a = p.parse_args(argv)
    print(json.dumps(a.fn(a)))


if __name__ == "__main__":
    main()
