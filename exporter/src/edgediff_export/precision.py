"""float16 copies of edgediff models, and ORT-format copies for memory-mapped loading.

float16 halves the file and is what GPUs run fast. Kept in float32 where accuracy needs it:
- the timestep input and the sinusoidal time embedding up to the first linear layer (t up to
  999 times frequencies near 1 would lose whole radians in fp16's 11-bit mantissa);
- the normalisation layers (their variance sums overflow or lose precision in fp16);
- whatever else a caller names: operator types (`fp32_ops`, e.g. Softmax) and nodes
  (`fp32_nodes`, e.g. the last blocks of a VAE decoder, see pipeline_export.fp32_islands).
A single-file pixel model's sample input and output become float16 (the runtime feeds and reads
`half::f16` tensors); `keep_io_types` keeps every float input and output float32 instead, with
the casts inside the graph (what the pipeline export does).

Tolerance (FP16_RTOL, relative to max |fp32 output|): fp16 rounds each operation to 2^-11
(4.9e-4) relative; through a network's tens of layers the roundings add up (and norms, which
divide by a variance, amplify them) to a few 1e-3 measured on the tiny test models. 2e-2 keeps a
factor of several above that, while an overflow (inf, NaN) or a wrongly typed island (errors of
order 1) fails it by far.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

FP16_RTOL = 2e-2
# Always float32: their sums of squares overflow or lose precision in fp16.
NORM_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")


def _time_embedding_nodes(graph: onnx.GraphProto, time_input: str) -> list[str]:
    """Nodes computed from the time input before its first linear layer (Gemm/MatMul)."""
    reach, names = {time_input}, []
    for node in graph.node:  # topologically sorted
        if node.op_type in ("Gemm", "MatMul") or not any(i in reach for i in node.input):
            continue
        names.append(node.name)
        reach.update(node.output)
    return names


def _with_feeders(graph: onnx.GraphProto, names: list[str]) -> list[str]:
    """`names` and the Constant and Identity nodes feeding them: their values stay float32
    with them (an Identity of an initializer is how torch.onnx shares a deduplicated weight;
    converted, the island would compute in fp32 on fp16-rounded, fp16-clamped weights)."""
    keep = set(names)
    used = {i for n in graph.node if n.name in keep for i in n.input}
    for node in reversed(graph.node):  # consumers before producers
        if node.op_type in ("Constant", "Identity") and node.name not in keep and set(node.output) & used:
            keep.add(node.name)
            used.update(node.input)
    return [n.name for n in graph.node if n.name in keep]


def _split_shared_initializers(graph: onnx.GraphProto, blocked: set[str], ops: set[str]) -> None:
    """Give the float32 nodes their own copy of each initializer they share with float16 nodes.

    torch.onnx shares equal weights (every LayerNorm's ones, say) between nodes; the converter
    keeps an initializer float32 if any float32 node reads it and then feeds it uncast to the
    float16 readers too (an invalid graph). The copies are as small as what is shared.
    """
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            if i in inits:
                readers.setdefault(i, []).append(node)
    for name, nodes in readers.items():
        fp32 = [n for n in nodes if n.op_type in ops or n.name in blocked]
        if not fp32 or len(fp32) == len(nodes) or inits[name].data_type != onnx.TensorProto.FLOAT:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_fp32"
        graph.initializer.append(copy)
        for n in fp32:
            n.input[:] = [copy.name if i == name else i for i in n.input]


def _casts_to_float(graph: onnx.GraphProto) -> list[str]:
    """Cast nodes to float32, which the converter leaves casting to float32 while it declares
    their outputs float16 (an invalid graph). diffusers' attention has them (the 1/sqrt(head_dim)
    scale computed from the shape). Blocked, they stay float32 and get a cast to float16 after."""
    return [n.name for n in graph.node if n.op_type == "Cast"
            and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]


def to_fp16(proto: onnx.ModelProto, *, keep_io_types: bool = False, fp32_ops=(), fp32_nodes=(),
            time_input: str = "timestep", shapes_inferred: bool = False) -> onnx.ModelProto:
    """The float16 conversion of `proto`, with the time embedding, the norms, `fp32_ops` and
    `fp32_nodes` kept float32. `shapes_inferred`: the graph already holds its value types (see
    `load_inferred`; the converter's own inference serialises the model, which fails past 2 GB)."""
    from onnxconverter_common import float16

    graph = proto.graph
    ops = list(float16.DEFAULT_OP_BLOCK_LIST) + list(NORM_OPS) + list(fp32_ops)
    by_op = [n.name for n in graph.node if n.op_type in ops]
    blocked = _with_feeders(graph, by_op + _time_embedding_nodes(graph, time_input) + list(fp32_nodes))
    blocked = [n for n in blocked if n] + _casts_to_float(graph)
    _split_shared_initializers(graph, set(blocked), set(ops))
    import warnings

    with warnings.catch_warnings():  # tiny weights rounding to fp16's smallest normal: expected
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(proto, keep_io_types=keep_io_types,
                                               disable_shape_infer=shapes_inferred,
                                               op_block_list=ops, node_block_list=blocked)
    _drop_round_trips(out.graph)
    if keep_io_types:
        _outputs_float32(out.graph)
    # The converter made a float timestep input float16 too; it goes straight into fp32 nodes
    # (through an inserted Cast), so declaring it float32 again keeps its full precision.
    for inp in out.graph.input:
        if inp.name == time_input and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    return out


def _cast_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def _drop_round_trips(graph: onnx.GraphProto) -> None:
    """Float32 values passed between float32 nodes directly, not through float16.

    The converter casts each blocked node's output to float16 and each blocked node's input back
    to float32, and removes such a pair only where the float16 cast has one reader: a value read
    by two float32 nodes (a residual stream: the next norm and the skip connection) made the
    round trip, rounded to fp16 and, past 65504, inf, inside an island. Each such cast to float32
    reads the float32 value itself instead; float16 casts nobody reads any more go.
    """
    producer = {o: n for n in graph.node for o in n.output}
    fp32 = {v.name for v in [*graph.value_info, *graph.input] if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for node in graph.node:
        if _cast_to(node, onnx.TensorProto.FLOAT):
            up = producer.get(node.input[0])
            if up is not None and _cast_to(up, onnx.TensorProto.FLOAT16) and up.input[0] in fp32:
                node.input[0] = up.input[0]  # a cast of float32 to float32: the value itself
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if _cast_to(n, onnx.TensorProto.FLOAT16) and not set(n.output) & read]
    for n in dead:
        graph.node.remove(n)
    # The types of tensors no node makes any more (the converter leaves those of the casts it
    # removes itself) would only mislead.
    made = {o for n in graph.node for o in n.output}
    kept = [v for v in graph.value_info if v.name in made]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _outputs_float32(graph: onnx.GraphProto) -> None:
    """Graph outputs float32 again where the converter left them float16 with keep_io_types:
    it does so for an output made by a float32 node (a blocked one), which it casts to float16
    for the nodes reading it and then finds the output already float16. The output then reads
    the float32 value itself; the nodes inside keep reading the float16 cast."""
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        half = out.name + "_fp16"
        node = producer.get(out.name)
        if node is not None:
            node.output[:] = [half if o == out.name else o for o in node.output]
        for n in graph.node:
            n.input[:] = [half if i == out.name else i for i in n.input]
        if node is not None and _cast_to(node, onnx.TensorProto.FLOAT16):  # of a float32 value: the output takes that value, unrounded
            graph.node.append(onnx.helper.make_node("Identity", [node.input[0]], [out.name],
                                                    name=f"{out.name}_float32"))
        else:
            graph.node.append(onnx.helper.make_node("Cast", [half], [out.name], name=f"{out.name}_float32",
                                                    to=onnx.TensorProto.FLOAT))
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def io_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of each graph input and output, by name."""
    return {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}


def load_inferred(path: Path) -> onnx.ModelProto:
    """`path` with its value types inferred, by file (so graphs over 2 GB work), its external
    data loaded: what `to_fp16(..., shapes_inferred=True)` takes."""
    path = Path(path)
    # Beside the model, so that its external data (a location relative to it) resolves.
    inferred = path.parent / f".{path.name}.inferred"
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        return onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)


def _feed_as(feeds: dict[str, np.ndarray], sess) -> dict[str, np.ndarray]:
    """`feeds` cast to the element types `sess` declares (float16 inputs of an fp16 graph)."""
    kinds = {i.name: i.type for i in sess.get_inputs()}
    return {k: (v.astype(np.float16) if kinds.get(k) == "tensor(float16)" else v) for k, v in feeds.items()}


def compare(fp32: Path, fp16: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Max over `feeds` and outputs of |fp16 - fp32| / max |fp32|; NaN or inf give inf."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in feeds:
        refs = a.run(None, _feed_as(feed, a))
        gots = b.run(None, _feed_as(feed, b))
        for ref, got in zip(refs, gots):
            got = got.astype(np.float32)
            if not np.isfinite(got).all():
                return float("inf")
            worst = max(worst, float(np.abs(got - ref).max() / max(1e-12, np.abs(ref).max())))
    return worst


FP16_MAX = 65504.0  # the largest finite float16
# Attention masks add -inf or float32's lowest (transformers' torch.finfo(dtype).min) to the
# positions they hide; converted, those constants become fp16's -1e4 or -inf, and the masked
# scores stay masked. No activation comes near this, so values past it are masks, not overflow.
MASK_MAGNITUDE = 1e30


def fp16_peak(fp32: Path, fp16: onnx.GraphProto, feeds: list[dict[str, np.ndarray]],
              group: int = 64) -> tuple[float, str]:
    """The largest |value| over `feeds`, and its tensor, of the tensors the fp16 graph keeps in
    float16, as the fp32 graph computes them: past FP16_MAX they overflow on a device with fp16
    kernels. `compare` cannot see that: ONNX Runtime's CPU provider computes fp16 nodes in fp32
    (casts it inserts around them) and drops the casts between consecutive ones.
    The tensors are read `group` at a time, each group by another run of the fp32 graph.
    Constants are not computed (the converter rounds and clamps them), and infinite values and
    values past MASK_MAGNITUDE are attention masks: neither counts.
    """
    import onnxruntime as ort

    made = {o for n in fp16.node for o in n.output}
    half = {v.name for v in [*fp16.value_info, *fp16.output]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 and v.name in made}
    proto = onnx.load(str(fp32), load_external_data=False)
    names = [o for n in proto.graph.node if n.op_type != "Constant" for o in n.output if o in half]
    probe = Path(fp32).parent / f".{Path(fp32).name}.peaks"  # beside it: its external data resolves
    peak, where = 0.0, ""
    try:
        for start in range(0, len(names), group):
            chunk = names[start:start + group]
            del proto.graph.output[:]
            proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                      for n in chunk)
            onnx.save(proto, str(probe))
            sess = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
            for feed in feeds:
                for name, value in zip(chunk, sess.run(chunk, _feed_as(feed, sess))):
                    a = np.abs(value)
                    m = float(np.max(a, where=a < MASK_MAGNITUDE, initial=0.0))  # NaN and inf excluded
                    if m > peak:
                        peak, where = m, name
    finally:
        probe.unlink(missing_ok=True)
    return peak, where


def verify_fp16(fp32: Path, fp16: Path, batch: int = 3) -> float:
    """Max relative difference of the fp16 model's output from the fp32 model's."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    from .metadata import read_metadata

    # Continuous-time models are checked on the t in [1e-3, 1] the runtime gives them.
    meta = read_metadata(fp32) or {}
    t_range = (1e-3, 1.0) if meta.get("time_input") == "continuous" else (0, 999)
    feeds = []
    for _ in range(2):
        feed = {}
        for inp in a.get_inputs():
            shape = [batch if not isinstance(d, int) else d for d in inp.shape]
            if inp.name == "timestep":
                v = rng.uniform(*t_range, batch) if "float" in inp.type else rng.integers(0, 1000, batch)
                feed[inp.name] = v.astype(np.float32 if "float" in inp.type else np.int64)
            elif inp.name == "class_labels":
                feed[inp.name] = rng.integers(0, 2, batch).astype(np.int64)
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return compare(fp32, fp16, feeds)


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
