"""BatchNormalization that no convolution absorbs, rewritten as a 1x1 depthwise Conv so int8 has a kernel for it.

A BatchNormalization right after a Conv is folded into that Conv by both int8
engines (and by onnxruntime in fp32). One whose input comes from anything else,
such as the pre-activation BatchNormalization at the start of every
LResNet100E-IR / iresnet residual unit (it reads the residual sum), has no int8
kernel: the int8 model runs it in fp32 between a DequantizeLinear and a
QuantizeLinear, with a layout Transpose on each side. At inference a
BatchNormalization is ``y = s * x + t`` per channel (``s = scale / sqrt(var + eps)``,
``t = B - mean * s``), which is exactly a 1x1 depthwise Conv with weight ``s`` and
bias ``t``; quantized, that Conv keeps the int8 chain unbroken, and its one
weight per channel is the whole of its per-channel int8 range (no weight rounding
beyond float rounding of the scale).
onnxruntime's fp32 NCHWc optimiser makes the same substitution by itself, so
the rewrite only matters for int8, and quantize applies it.

Nodes left as they are, and named in the report: a Conv-fed BatchNormalization
the engines fold anyway (not reported), training mode, non-constant
parameters, per-element (``spatial=0``) normalisation, inputs that are not 4-D,
and nodes excluded by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.runtime.graph import drop_unused_initializers, graph_links, nodes_and_reasons, tensor_ranks

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class BatchNormRewrite:
    """What :func:`rewrite_batchnorm` did: nodes now a 1x1 depthwise Conv, nodes kept and why."""

    rewritten: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return len(self.rewritten)

    def summary(self) -> str:
        parts = []
        if self.rewritten:
            parts.append(f"{len(self.rewritten)} BatchNormalization without a Conv before it -> 1x1 depthwise Conv")
        if self.kept:
            parts.append(f"{len(self.kept)} kept ({nodes_and_reasons(self.kept)})")
        return ", ".join(parts) or "no BatchNormalization to rewrite"

    def to_dict(self) -> dict:
        return {"rewritten": len(self.rewritten), "kept": dict(self.kept)}


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS


def _absorbed(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True when a Conv read by nothing else feeds ``node``: the engines fold the pair into one int8 Conv."""
    p = producer.get(node.input[0])
    return p is not None and p.op_type == "Conv" and len(consumers.get(node.input[0], [])) == 1


def standalone_batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The BatchNormalization nodes no Conv before them absorbs (candidates for :func:`rewrite_batchnorm`)."""
    producer, consumers = graph_links(model)
    return [n for n in model.graph.node if _is_bn(n) and n.input and not _absorbed(n, producer, consumers)]


def rewrite_batchnorm(model: onnx.ModelProto, *, exclude: Collection[str] = ()) -> BatchNormRewrite:
    """Replace, in place, every standalone BatchNormalization of a 4-D input by a 1x1 depthwise Conv.

    The Conv writes the BatchNormalization's output tensor, so every reader is
    unchanged. ``exclude``: node names to leave as they are.
    """
    report = BatchNormRewrite()
    candidates = {n.output[0] for n in standalone_batchnorms(model)}  # output names are unique; node wrappers are not stable
    if not candidates:
        return report
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    _, consumers = graph_links(model)
    graph_outputs = {o.name for o in g.output}
    ranks = tensor_ranks(model)
    taken = {n.name for n in g.node} | set(inits) | {i.name for i in g.input} | {o for n in g.node for o in n.output}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    for node in g.node:
        if not _is_bn(node) or node.output[0] not in candidates:
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        params = list(node.input[1:5])
        why = None
        if label in exclude:
            why = "excluded by name"
        elif attrs.get("training_mode", 0) or any(consumers.get(o) or o in graph_outputs for o in node.output[1:] if o):
            why = "training mode (running statistics are outputs)"
        elif attrs.get("spatial", 1) == 0:
            why = "per-element statistics (spatial=0)"
        elif len(params) != 4 or any(p not in inits or inits[p].data_type != onnx.TensorProto.FLOAT for p in params):
            why = "parameters are not float constants"
        elif ranks.get(node.input[0]) != 4:
            why = f"input of rank {ranks.get(node.input[0])}, not NCHW"
        if why is not None:
            new_nodes.append(node)
            report.kept[label] = why
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64).reshape(-1) for p in params)
        eps = float(attrs.get("epsilon", 1e-5))
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        c = s.size
        w_name, b_name = fresh(f"{label}_dw_w"), fresh(f"{label}_dw_b")
        new_inits.append(numpy_helper.from_array(s.reshape(c, 1, 1, 1).astype(np.float32), w_name))
        new_inits.append(numpy_helper.from_array(t.astype(np.float32), b_name))
        new_nodes.append(helper.make_node(
            "Conv", [node.input[0], w_name, b_name], [node.output[0]], name=fresh(f"{label}_dw"),
            group=c, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1],
        ))
        report.rewritten.append(label)
        replaced.update(params)
    if not report.changed:
        return report
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    # Parameters no node reads any more go, with the graph-input entries old exports give them.
    drop_unused_initializers(model, only=replaced)
    if model.ir_version < 4:  # ir_version 3 wants every initializer listed as a graph input as well
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits)
    return report
