"""The model as the engines see it: their graph optimisation, and the nodes they turn into int8 kernels."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.runtime.graph import graph_links
from pipeline.runtime.session import session

# Ops the engines turn into int8 kernels. Weighted ops carry an initializer weight (and bias);
# element-wise ops are quantized when every operand is an activation (INC leaves Mul/Add by a
# constant, e.g. the input normalisation, in fp32).
WEIGHTED_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}  # value: weight output-channel axis
ELEMENTWISE_OPS = {"Add", "Mul"}
# Activations the engines fuse into the preceding Conv: its int8 output is taken after them.
FUSED_ACTIVATIONS = {"Relu", "Clip"}


def engine_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic optimisations (BatchNormalization folded into Conv), which both engines apply first."""
    with tempfile.TemporaryDirectory(prefix="qpipe-diagnose-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(model, optimization="basic", optimized_model_path=out, what="fp32 model")
        opt = onnx.load(str(out))
    # The optimiser declares every domain it knows; keep the ones the graph uses.
    used = {n.domain for n in opt.graph.node}
    keep = [o for o in opt.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del opt.opset_import[:]
    opt.opset_import.extend(keep)
    return opt


@dataclass
class GraphIndex:
    """A model's initializers, the producer and readers of every tensor, and its outputs."""

    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphIndex":
        producer, consumers = graph_links(model)
        return cls(model, {t.name: t for t in model.graph.initializer}, producer, consumers, {o.name for o in model.graph.output})

    def is_constant(self, name: str) -> bool:
        p = self.producer.get(name)
        return name in self.inits or (p is not None and p.op_type == "Constant")

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for a computed tensor."""
        if name in self.inits:
            return self.array(name)
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None


@dataclass
class QNode:
    """A node the engine quantizes, with the tensors the simulation fake-quantizes."""

    name: str
    op_type: str
    activations: list[str]  # float inputs quantized to uint8
    weight: str | None
    weight_axis: int | None  # output-channel axis of the weight (per-channel scales)
    bias: str | None
    output: str  # the int8 output: after a fused Relu/Clip when there is one
    index: int = 0
    raw_output: str = ""  # the node's own output (before the fused activation; == output without one)
    readers: list[int] = field(default_factory=list)  # quantizable nodes reading ``output``
    activation_op: str | None = None  # the fused Relu/Clip
    depthwise: bool = False  # a grouped Conv with one input channel per group

    @property
    def fused(self) -> bool:
        return self.raw_output != self.output


def quantizable_nodes(model: onnx.ModelProto) -> list[QNode]:
    """The nodes the engines quantize, in graph order, each named as in the model."""
    g = GraphIndex.of(model)
    out: list[QNode] = []
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in WEIGHTED_OPS:
            ins = list(node.input)
            if op == "MatMul":
                if len(ins) < 2 or not g.is_constant(ins[1]) or g.is_constant(ins[0]):
                    continue
                weight, axis, bias = ins[1], None, None
                w_rank = len(g.inits[ins[1]].dims) if ins[1] in g.inits else 2
                axis = w_rank - 1
            elif op == "Gemm":
                if len(ins) < 2 or ins[1] not in g.inits or g.is_constant(ins[0]):
                    continue
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                weight, axis = ins[1], (0 if trans_b else 1)
                bias = ins[2] if len(ins) > 2 and ins[2] in g.inits else None
            else:
                if len(ins) < 2 or ins[1] not in g.inits or g.is_constant(ins[0]):
                    continue
                weight, axis = ins[1], WEIGHTED_OPS[op]
                bias = ins[2] if len(ins) > 2 and ins[2] and ins[2] in g.inits else None
            acts = [ins[0]]
        elif op in ELEMENTWISE_OPS:
            if len(node.input) != 2 or any(g.is_constant(i) for i in node.input):
                continue
            acts, weight, axis, bias = list(dict.fromkeys(node.input)), None, None, None
        else:
            continue
        y = raw = node.output[0]
        users = g.consumers.get(y, [])
        act_op = None
        if op in WEIGHTED_OPS and y not in g.outputs and len(users) == 1 and users[0].op_type in FUSED_ACTIVATIONS:
            y, act_op = users[0].output[0], users[0].op_type
        depthwise = (
            op == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) > 1
            and weight in g.inits and len(g.inits[weight].dims) == 4 and g.inits[weight].dims[1] == 1
        )
        out.append(QNode(node.name or y, op, acts, weight, axis, bias, y, len(out), raw, activation_op=act_op, depthwise=depthwise))
    for qn in out:
        qn.readers = [r.index for r in out if qn.output in r.activations]
    return out


def fused_clip(g: GraphIndex, qn: QNode) -> onnx.NodeProto | None:
    """The Clip fused into ``qn``'s int8 output, if any."""
    if qn.activation_op != "Clip":
        return None
    return next((n for n in g.consumers.get(qn.raw_output, []) if n.op_type == "Clip"), None)


def clip_bounds(clip: onnx.NodeProto, g: GraphIndex) -> tuple[float | None, float | None]:
    """A Clip's (min, max) where they are constants: attributes (opset < 11) or inputs 1 and 2."""

    def bound(index: int, attr: str) -> float | None:
        for a in clip.attribute:
            if a.name == attr:
                return float(a.f)
        if len(clip.input) > index and clip.input[index]:
            value = g.constant(clip.input[index])
            if value is not None:
                return float(value.reshape(-1)[0])
        return None

    return bound(1, "min"), bound(2, "max")
