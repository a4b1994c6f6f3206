"""Recover a PyTorch `UNet` from an ONNX file this exporter wrote (its initializers), so a shipped
model whose checkpoint is gone can be trained further, e.g. as a distillation teacher.

`torch.onnx.export` keeps parameter names for convolutions and linear layers, but lowers each
GroupNorm to Reshape -> InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta) and stores
gamma and beta as anonymous initializers (`onnx::Mul_912`, shaped [C, 1, 1]). Their module is
recovered from the scope in the Mul/Add node's output name (`/down.0.0/norm1/Mul_output_0`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .metadata import KEY
from .network import build_network
from .unet import UNetConfig


def _read_metadata(proto: onnx.ModelProto, path: Path) -> dict:
    import json

    for prop in proto.metadata_props:
        if prop.key == KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} has no edgediff metadata; only files written by edgediff-export "
                     "can be turned back into a UNet")


def _scope(output_name: str) -> str:
    """'/down.0.0/norm1/Mul_output_0' -> 'down.0.0.norm1'."""
    return ".".join(p for p in output_name.split("/")[:-1] if p)


def _norm_affine(proto: onnx.ModelProto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GroupNorm gammas and betas by state-dict key, from the Mul/Add nodes that follow each
    InstanceNormalization's reshape."""
    found: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            continue
        anon = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not anon:
            continue
        scope = _scope(node.output[0])
        key = f"{scope}.{'weight' if node.op_type == 'Mul' else 'bias'}"
        if key in found:
            raise ValueError(f"two initializers claim {key}; "
                             "the graph is not one edgediff-export wrote")
        found[key] = inits[anon[0]].reshape(-1)
    return found


def unet_from_onnx(path: Path) -> tuple[torch.nn.Module, dict]:
    """The network (a `UNet`, or `ContinuousUNet` for a continuous schedule) with the ONNX
    file's weights, and the file's metadata. Raises ValueError naming any parameter the file
    lacks or holds in another shape."""
    proto = onnx.load(str(path))
    meta = _read_metadata(proto, path)
    unet = (meta.get("extra") or {}).get("unet")
    if unet is None:
        raise ValueError(f"{path}'s metadata has no extra.unet record (the network config); "
                         "it was not exported from an edgediff UNet")
    cfg = UNetConfig.from_dict(unet)
    prediction = {"epsilon": "eps", "v": "v", "sample": "x0", "score": "score"}[meta["prediction"]]
    model = build_network(cfg, meta["schedule"], prediction)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    tensors = {**{k: v for k, v in inits.items() if not k.startswith("onnx::")},
               **_norm_affine(proto, inits)}
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise ValueError(f"{path} lacks these parameters of the UNet its metadata describes: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    new = {}
    for k, ref in state.items():
        value = torch.from_numpy(np.array(tensors[k], dtype=np.float32))
        if value.numel() != ref.numel():
            raise ValueError(f"{path}: {k} holds {tuple(value.shape)}, "
                             f"the UNet expects {tuple(ref.shape)}")
        new[k] = value.reshape(ref.shape)
    model.load_state_dict(new)
    return model.eval(), meta
