"""float16 copies of edgediff models, and ORT-format copies for memory-mapped loading.

float16 halves the file and is what GPUs run fast. Kept in float32 where accuracy needs it:
- the timestep input and the sinusoidal time embedding up to the first linear layer (t up to
  999 times frequencies near 1 would lose whole radians in fp16's 11-bit mantissa);
- the normalisation layers (their variance sums overflow or lose precision in fp16).
Sample input and output become float16: the runtime feeds and reads `half::f16` tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

FP16_RTOL = 2e-2


def _time_embedding_nodes(graph: onnx.GraphProto, time_input: str) -> list[str]:
    """Nodes computed from the time input before its first linear layer (Gemm/MatMul)."""
    reach, names = {time_input}, []
    for node in graph.node:  # topologically sorted
        if node.op_type in ("Gemm", "MatMul") or not any(i in reach for i in node.input):
            continue
        names.append(node.name)
        reach.update(node.output)
    # Constants feeding those nodes stay float32 with them.
    used = {i for node in graph.node if node.name in names for i in node.input}
    names += [n.name for n in graph.node if n.op_type == "Constant" and set(n.output) & used]
    return names


def _casts_to_float(graph: onnx.GraphProto) -> list[str]:
    """Cast nodes to float32, which the converter leaves casting to float32 while it declares
    their outputs float16 (an invalid graph). diffusers' attention has them (the 1/sqrt(head_dim)
    scale computed from the shape). Blocked, they stay float32 and get a cast to float16 after."""
    return [n.name for n in graph.node if n.op_type == "Cast"
            and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    blocked = _time_embedding_nodes(proto.graph, "timestep") + _casts_to_float(proto.graph)
    ops = list(float16.DEFAULT_OP_BLOCK_LIST) + ["InstanceNormalization", "GroupNormalization",
                                                   "LayerNormalization"]
    import warnings

    with warnings.catch_warnings():  # tiny weights rounding to fp16's smallest normal: expected
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=False,
                                               op_block_list=ops, node_block_list=blocked)
    # The converter made a float timestep input float16 too; it goes straight into fp32 nodes
    # (through an inserted Cast), so declaring it float32 again keeps its full precision.
    for inp in out.graph.input:
        if inp.name == "timestep" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    return out


def verify_fp16(fp32: Path, fp16: Path, batch: int = 3) -> float:
    """Max relative difference of the fp16 model's output from the fp32 model's."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    from .metadata import read_metadata

    # Continuous-time models are checked on the t in [1e-3, 1] the runtime gives them.
    meta = read_metadata(fp32) or {}
    t_range = (1e-3, 1.0) if meta.get("time_input") == "continuous" else (0, 999)
    worst = 0.0
    for _ in range(2):
        feeds = {}
        for inp in a.get_inputs():
            shape = [batch if not isinstance(d, int) else d for d in inp.shape]
            if inp.name == "timestep":
                v = rng.uniform(*t_range, batch) if "float" in inp.type else rng.integers(0, 1000, batch)
                feeds[inp.name] = v.astype(np.float32 if "float" in inp.type else np.int64)
            elif inp.name == "class_labels":
                feeds[inp.name] = rng.integers(0, 2, batch).astype(np.int64)
            else:
                feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        ref = a.run(None, feeds)[0]
        b_feeds = {k: (v.astype(np.float16) if k == "sample" else v) for k, v in feeds.items()}
        got = b.run(None, b_feeds)[0].astype(np.float32)
        worst = max(worst, float(np.abs(got - ref).max() / max(1e-12, np.abs(ref).max())))
    return worst


def write_fp16(src: Path, out: Path) -> float:
    """Write the fp16 copy of `src` to `out`; return (and bound) its relative difference."""
    proto = to_fp16(onnx.load(str(src)))
    tmp = Path(str(out) + ".tmp")
    onnx.save(proto, str(tmp))
    err = verify_fp16(src, tmp)
    if not err <= FP16_RTOL:
        tmp.unlink()
        raise RuntimeError(f"fp16 output differs from fp32 by {err:.2e} relative (limit {FP16_RTOL})")
    os.replace(tmp, out)
    return err


def write_ort_format(src: Path, out: Path) -> None:
    """Write an ORT-format (.ort) copy that ONNX Runtime can run from a memory-mapped file.

    Only basic graph optimisations are applied, so the file runs with any provider.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
