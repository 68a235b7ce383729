"""Export quirks other runtimes accept and onnxruntime or the quantizers refuse, repaired in place.

Each repair takes a model, changes it in place and returns one line per change
for the ``repaired: ...`` lines :func:`pipeline.stages.convert.convert`
prints; an empty list means the model did not have that quirk. Every repair
keeps the function the graph computes: the convert gate then checks that on
real or seeded images.

- :func:`repair_graph_inputs`: graph inputs that a node also produces, or that
  nothing reads (OpenCV loads these; onnxruntime refuses the first and asks for
  a feed for the second).
- :func:`fold_weight_dequantize`: weights shipped as int8 (or int4, int32...)
  behind a DequantizeLinear become the fp32 initializers the graph computes, so
  the quantizers see ordinary fp32 weights and calibrate activations.
- :func:`drop_stale_value_info`: intermediate shapes left by an exporter that
  disagree with shape inference (Intel Neural Compressor's strict inference
  stops on them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.runtime import graph as onnxutil

# Integer element types a weight DequantizeLinear reads; numpy holds int4/uint4 unpacked in int8/uint8.
# Float8 inputs are left alone: numpy_helper gives their raw bits, not their values.
_INTEGER_TYPES = {
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
    TensorProto.INT32, TensorProto.INT4, TensorProto.UINT4,
}


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of the subgraphs (If/Loop/Scan bodies) nested in ``graph``, any depth."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for inner in g.node:
                    names.update(i for i in inner.input if i)
                names |= _subgraph_reads(g)
    return names


def repair_graph_inputs(model: onnx.ModelProto) -> list[str]:
    """Drop graph inputs that a node produces or that nothing reads; initializers listed as inputs stay.

    An input a node also produces is defined twice: onnxruntime refuses the
    graph ("Duplicate definition"), other runtimes take the node's value, and
    so does the repaired graph. An input nothing reads cannot change the result,
    but onnxruntime still demands a feed for it.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer, consumers = onnxutil.graph_links(model)
    read = set(consumers) | _subgraph_reads(graph) | {o.name for o in graph.output}
    keep: list[onnx.ValueInfoProto] = []
    notes: list[str] = []
    for vi in graph.input:
        if vi.name in inits:
            keep.append(vi)
        elif vi.name in producer:
            node = producer[vi.name]
            notes.append(
                f"graph input {vi.name!r} is also the output of node {node.name or '(unnamed)'!r} (op {node.op_type}): "
                "removed from the graph inputs"
            )
        elif vi.name not in read:
            notes.append(f"graph input {vi.name!r} is read by no node: removed from the graph inputs")
        else:
            keep.append(vi)
    if notes:
        del graph.input[:]
        graph.input.extend(keep)
    return notes


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, *, axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear on integer ``x``: ``float32(x - zero_point) * scale``, as onnxruntime computes it.

    Per-tensor when ``scale`` has one element, per-axis (1-D ``scale`` along
    ``axis``) otherwise, blocked (``scale`` of ``x``'s rank, one value per
    ``block_size`` elements along ``axis``) when ``block_size`` is positive.
    """
    x64 = x.astype(np.int64)
    zp = np.zeros(scale.shape, np.int64) if zero_point is None else zero_point.astype(np.int64)
    scale = scale.astype(np.float32)
    if x.ndim:
        axis = axis % x.ndim
    if block_size > 0:
        if scale.ndim != x.ndim:
            raise ValueError(f"blocked scale of rank {scale.ndim} for data of rank {x.ndim}")
        n = x.shape[axis]
        scale = np.take(np.repeat(scale, block_size, axis=axis), np.arange(n), axis=axis)
        zp = np.take(np.repeat(zp, block_size, axis=axis), np.arange(n), axis=axis)
    elif scale.size != 1:
        if scale.ndim != 1 or scale.shape[0] != x.shape[axis]:
            raise ValueError(f"per-axis scale of shape {list(scale.shape)} for axis {axis} of data {list(x.shape)}")
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    return ((x64 - zp).astype(np.float32) * scale).astype(np.float32)


def _dq_kind(scale: np.ndarray, block_size: int) -> str:
    if block_size > 0:
        return "blocked"
    return "per-tensor" if scale.size == 1 else "per-channel"


def fold_weight_dequantize(model: onnx.ModelProto) -> list[str]:
    """Replace each DequantizeLinear whose inputs are all initializers with its fp32 result.

    The result is an initializer named as the node's output, holding exactly the
    values onnxruntime computes for it. Nodes reading activations, with a
    non-float32 output or a float8 input, stay as they are.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    folded: list[onnx.TensorProto] = []
    kinds: dict[str, int] = {}
    for node in graph.node:
        ins = [i for i in node.input if i]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        foldable = (
            node.op_type == "DequantizeLinear"
            and node.domain in onnxutil.DEFAULT_DOMAINS
            and len(ins) >= 2
            and all(i in inits for i in ins)
            and node.output[0] not in outputs
            and inits[ins[0]].data_type in _INTEGER_TYPES
            and inits[ins[1]].data_type == TensorProto.FLOAT
            and attrs.get("output_dtype", TensorProto.FLOAT) in (0, TensorProto.FLOAT)
        )
        if not foldable:
            keep.append(node)
            continue
        x = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        block = int(attrs.get("block_size", 0))
        try:
            value = dequantize(x, scale, zp, axis=int(attrs.get("axis", 1)), block_size=block)
        except ValueError:
            keep.append(node)  # a shape combination onnxruntime would refuse as well; leave it to say so
            continue
        folded.append(numpy_helper.from_array(value, node.output[0]))
        kind = f"{_dq_kind(scale, block)} {TensorProto.DataType.Name(inits[node.input[0]].data_type).lower()}"
        kinds[kind] = kinds.get(kind, 0) + 1
    if not folded:
        return []
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(folded)
    _drop_unread_initializers(model)
    # The folded tensors' shapes are known now; any recorded for the old outputs may say otherwise.
    names = {t.name for t in folded}
    vis = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return [f"folded {len(folded)} weight DequantizeLinear node(s) into fp32 initializers with the values the graph computes ({detail})"]


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    read = {i for n in graph.node for i in n.input} | _subgraph_reads(graph) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in keep}
        inputs = [i for i in graph.input if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.input[:]
        graph.input.extend(inputs)


def _disagree(recorded: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto) -> bool:
    a, b = recorded.type.tensor_type, inferred.type.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    da, db = onnxutil.dims(recorded), onnxutil.dims(inferred)
    if da is None or db is None:
        return False
    if len(da) != len(db):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(da, db))


def drop_stale_value_info(model: onnx.ModelProto) -> list[str]:
    """Drop the recorded intermediate shapes when any of them disagrees with shape inference.

    All of them go, not only the stale ones: shape inference derives them
    again when the converted model is written, so both engines see one
    consistent set. A graph output whose recorded shape disagrees gets the
    inferred one. Returns one line when anything was dropped or rewritten.
    """
    graph = model.graph
    if not graph.value_info and not graph.output:
        return []
    sk = onnxutil.skeleton(model)
    del sk.graph.value_info[:]
    for o in sk.graph.output:  # infer the outputs afresh instead of merging with what the file says
        o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except Exception:
        return []  # inference itself fails: nothing to compare with; onnx's checks report the model later
    derived = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    stale = [(v, derived[v.name]) for v in graph.value_info if v.name in derived and _disagree(v, derived[v.name])]
    stale_out = [(o, derived[o.name]) for o in graph.output if o.name in derived and _disagree(o, derived[o.name])]
    if not stale and not stale_out:
        return []
    first, want = (stale or stale_out)[0]
    example = f"{first.name!r} recorded {onnxutil.dims(first)}, inferred {onnxutil.dims(want)}"
    parts = []
    if stale:
        parts.append(f"dropped {len(graph.value_info)} recorded intermediate shape(s), {len(stale)} of them disagreeing with shape inference")
        del graph.value_info[:]
    if stale_out:
        for o, new in stale_out:
            o.type.CopyFrom(new.type)
        parts.append(f"gave {len(stale_out)} graph output(s) their inferred shape")
    return [f"{' and '.join(parts)} (e.g. {example}); shapes re-inferred"]
