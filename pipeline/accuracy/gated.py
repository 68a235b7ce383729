"""The gated model: the fp32 model with one fake-quantization switch per quantizable node.

``If`` nodes either pass a tensor through or send it through
QuantizeLinear/DequantizeLinear, on the node's activation inputs and output,
and choose between the float and the quantized-dequantized weight and bias.
The quantized side follows the engine's conventions as the recipe's
:class:`~pipeline.stages.quantize.scheme.QuantScheme` states them: uint8
asymmetric activations, int8 symmetric weights per channel or per tensor,
7-bit when ``reduce_range`` (8-bit for depthwise convs), the int32 bias at
scale ``x_scale * w_scale`` with the engine's overflow behaviour, the fused
Relu/Clip taken before the output is quantized. The switches are one graph
input, :data:`GATES`, so one session answers every question: all off is the
fp32 model exactly; one on measures that node int8 alone; all on but one
measures leaving that node in fp32.

A tensor between two quantized nodes is quantized once in the real model;
here the producer's and the reader's switches both quantize it, with the same
scale, which is the same to within float rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.accuracy.engine_graph import GraphIndex, QNode
from pipeline.accuracy.qmath import activation_qparams, fake_quant_weight, quantize_bias, weight_scales

if TYPE_CHECKING:
    from pipeline.stages.quantize.scheme import QuantScheme

GATES = "qpipe_gates"
GATE_PREFIX = "qpipe_g_"
# Names of the nodes that turn GATES into one boolean per quantizable node; they come first in the graph.
_GATE_NODE_PREFIXES = ("qpipe_gather_", "qpipe_gate_")
_SWITCH_PREFIX = "qpipe_n"


def _const(inits: list[onnx.TensorProto], name: str, value: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(value, name))
    return name


def build_gated_model(
    model: onnx.ModelProto, nodes: Sequence[QNode], ranges: dict[str, tuple[float, float]], scheme: "QuantScheme"
) -> onnx.ModelProto:
    """The model with one fake-quantization switch per node, driven by the input ``qpipe_gates`` [len(nodes)]."""
    gm = onnx.ModelProto()
    gm.CopyFrom(model)
    graph = gm.graph
    g = GraphIndex.of(gm)
    # Positions, not proto objects: protobuf hands out a new wrapper on every access.
    position = {n.name: i for i, n in enumerate(graph.node) if n.name}
    made_by = {o: i for i, n in enumerate(graph.node) for o in n.output}
    inits: list[onnx.TensorProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # node position -> chains inserted before it
    after: dict[int, list[onnx.NodeProto]] = {}
    graph.input.append(helper.make_tensor_value_info(GATES, TensorProto.FLOAT, [len(nodes)]))

    gate_nodes: list[onnx.NodeProto] = []  # all switch conditions, computed first (see split_gates)
    for qn in nodes:
        idx = _const(inits, f"qpipe_gidx_{qn.index}", np.array(qn.index, dtype=np.int64))
        half = _const(inits, f"qpipe_ghalf_{qn.index}", np.array(0.5, dtype=np.float32))
        out = f"{GATE_PREFIX}{qn.index}"
        gate_nodes.extend([
            helper.make_node("Gather", [GATES, idx], [f"{out}_f"], axis=0, name=f"{_GATE_NODE_PREFIXES[0]}{qn.index}"),
            helper.make_node("Greater", [f"{out}_f", half], [out], name=f"{_GATE_NODE_PREFIXES[1]}{qn.index}"),
        ])

    def gate(qn: QNode) -> str:
        return f"{GATE_PREFIX}{qn.index}"

    def switch(cond: str, dst: str, tag: str, then_nodes: list[onnx.NodeProto], then_out: str, else_src: str, depends: str) -> onnx.NodeProto:
        # An If computes only the branch taken: a switched-off node costs an Identity, not a fake-quant.
        out_info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
        then_g = helper.make_graph(then_nodes, f"{tag}_then", [], [out_info(then_out)])
        else_g = helper.make_graph(
            [helper.make_node("Identity", [else_src], [f"{tag}_keep"], name=f"{tag}_keep")], f"{tag}_else", [], [out_info(f"{tag}_keep")]
        )
        # doc_string: the switches this If depends on, for switch_spans.
        return helper.make_node("If", [cond], [dst], name=f"{tag}_If", then_branch=then_g, else_branch=else_g, doc_string=depends)

    def fq_act(
        src: str, dst: str, tensor: str, gname: str, tag: str, bucket: list[onnx.NodeProto], depends: str, quantize_src: str | None = None
    ) -> None:
        # ``tensor``: the fp32 model's name for the value, whose range was measured;
        # ``quantize_src``: what the int8 kernel actually quantizes, when not ``src``.
        scale, zp = activation_qparams(*ranges[tensor], scheme.activation_levels)
        s = _const(inits, f"{tag}_s", np.array(scale, dtype=np.float32))
        z = _const(inits, f"{tag}_z", np.array(zp, dtype=np.uint8))
        then_nodes = [
            helper.make_node("QuantizeLinear", [quantize_src or src, s, z], [f"{tag}_q"], name=f"{tag}_Q"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"], name=f"{tag}_DQ"),
        ]
        bucket.append(switch(gname, dst, tag, then_nodes, f"{tag}_dq", src, depends))

    def fq_const(src: str, deq: np.ndarray, gname: str, tag: str, bucket: list[onnx.NodeProto], depends: str) -> str:
        dq = _const(inits, f"{tag}_dq", deq.astype(np.float32))
        then_nodes = [helper.make_node("Identity", [dq], [f"{tag}_use"], name=f"{tag}_use")]
        bucket.append(switch(gname, f"{tag}_eff", tag, then_nodes, f"{tag}_use", src, depends))
        return f"{tag}_eff"

    for qn in nodes:
        pos = position[qn.name]
        node = graph.node[pos]
        pre: list[onnx.NodeProto] = []
        gname = gate(qn)
        mine = str(qn.index)
        tag = f"{_SWITCH_PREFIX}{qn.index}"
        # Activation inputs: a private fake-quantized copy feeds this node only.
        for k, t in enumerate(list(node.input)):
            if t in qn.activations:
                dst = f"qpipe_in{qn.index}_{k}"
                fq_act(t, dst, t, gname, f"{tag}_a{k}", pre, mine)
                node.input[k] = dst
        sx = None
        if qn.activations and qn.activations[0] in ranges:
            sx, _ = activation_qparams(*ranges[qn.activations[0]], scheme.activation_levels)
        if qn.weight is not None and qn.weight in g.inits:
            w = g.array(qn.weight).astype(np.float32)
            axis = qn.weight_axis if scheme.per_channel else None
            levels = scheme.weight_levels(qn.depthwise)
            sw = weight_scales(w, axis, levels)
            wdq = fake_quant_weight(w, sw, axis, levels)
            k = list(node.input).index(qn.weight)
            node.input[k] = fq_const(qn.weight, wdq, gname, f"{tag}_w", pre, mine)
            if qn.bias is not None and qn.bias in g.inits and sx is not None:
                b = g.array(qn.bias).astype(np.float32)
                n_out = b.size
                sw_full = sw if sw.size == n_out else np.full(n_out, sw[0], np.float32)
                bscale = (np.float32(sx) * sw_full).astype(np.float32)
                bq, _ = quantize_bias(b.reshape(-1), bscale, scheme.bias_overflow)
                bdq = (bq.astype(np.float64) * bscale.astype(np.float64)).astype(np.float32).reshape(b.shape)
                kb = list(node.input).index(qn.bias)
                node.input[kb] = fq_const(qn.bias, bdq, gname, f"{tag}_b", pre, mine)
        before.setdefault(pos, []).extend(pre)
        # Output: the producer writes a raw tensor and the fake-quantized one keeps the name,
        # so every consumer (and a graph output) sees it without rewiring. A fused Relu/Clip is
        # fused whether or not the reader is int8 (INC removes it from the graph).
        last_pos = made_by[qn.output]
        last = graph.node[last_pos]
        raw = f"qpipe_raw{qn.index}"
        for k, o in enumerate(list(last.output)):
            if o == qn.output:
                last.output[k] = raw
        post: list[onnx.NodeProto] = []
        # The int8 conv quantizes its own result and lets the uint8 clamp stand in for the Clip.
        lost = qn.fused and scheme.clip_bound_lost and qn.activation_op == "Clip"
        fq_act(raw, qn.output, qn.output, gname, f"{tag}_o", post, mine, qn.raw_output if lost else None)
        after.setdefault(last_pos, []).extend(post)

    ordered: list[onnx.NodeProto] = list(gate_nodes)
    for i, node in enumerate(graph.node):
        ordered.extend(before.get(i, []))
        ordered.append(node)
        ordered.extend(after.get(i, []))
    new_graph_nodes = [onnx.NodeProto() for _ in ordered]
    for dst_node, src_node in zip(new_graph_nodes, ordered):
        dst_node.CopyFrom(src_node)
    del graph.node[:]
    graph.node.extend(new_graph_nodes)
    graph.initializer.extend(inits)
    del graph.value_info[:]
    return gm


def split_gates(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(the nodes computing the switch conditions, the rest of the graph) of a gated model."""
    nodes = list(graph.node)
    n = sum(1 for node in nodes if node.name.startswith(_GATE_NODE_PREFIXES))
    return nodes[:n], nodes[n:]


def switch_spans(body: Sequence[onnx.NodeProto]) -> dict[int, tuple[int, int]]:
    """For each quantizable node's index, the first and last position in ``body`` of its switches."""
    span: dict[int, tuple[int, int]] = {}
    for pos, n in enumerate(body):
        if n.op_type == "If" and n.name.startswith(_SWITCH_PREFIX):
            for k in (int(i) for i in n.doc_string.split(",")):
                lo, hi = span.get(k, (pos, pos))
                span[k] = (min(lo, pos), max(hi, pos))
    return span
