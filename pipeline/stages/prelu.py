"""PRelu rewritten into ops onnxruntime runs fast, in fp32 and in int8.

onnxruntime's PRelu kernel with per-channel slopes is a generic broadcasting
loop: on a PRelu MobileFaceNet it costs as much as all the convolutions
together, it breaks the NCHWc layout chain of the convolutions around it
(reorders in and out), and the int8 engines have no kernel for it, so an int8
model keeps every PRelu in fp32 between a DequantizeLinear and a
QuantizeLinear. Real slopes are negative in a third to a half of the channels
and sometimes above 1, so the rewrites hold for any slope. With ``x`` the
input and ``a`` the per-channel slopes, ``k = |1 - a|``:

* ``dwconv-pair``:
  ``DwConv1x1(x, a) + Relu(DwConv1x1(x, k))``, plus ``DwConv1x1(., sign(1 - a))``
  on the Relu branch when some slope exceeds 1 (``(1 - a) Relu(x)`` is then
  not the Relu of a scaled ``x``). In fp32 the whole chain stays in NCHWc
  (the Relu fuses into its convolution, the Add into the next one); in int8
  every op has a kernel (depthwise QLinearConv with the Relu folded into its
  output range, QLinearAdd), so no fp32 island is left. It equals PRelu up to
  float rounding (about one ulp of ``x``).
* ``fold-pair`` (the default, for fp32 and int8): the same, but where the
  PRelu's input comes from a depthwise Conv read by nothing else, that Conv
  is copied with its weights scaled by ``a`` and by ``k`` instead of adding
  two 1x1 depthwise convolutions (one requantization fewer per PRelu in
  int8; about the same speed).
* ``dwconv-min``: ``Relu(x) + DwConv1x1(Min(x, 0), a)``: bit-identical to
  PRelu (one product plus an exact zero), fp32 only: int8 has no Min kernel,
  and quantizers that drop a Relu by folding it into its producer's output
  range (INC, onnxruntime QOperator) do so even when the producer's output
  also feeds the Min, which silently turns the Relu into identity. The int8
  forms above give every Relu a producer of its own.
* ``mul-pair``: ``dwconv-pair`` with Mul by (C,1,1) constants instead of
  1x1 depthwise convolutions (int8: QLinearMul with per-tensor slope
  quantization: slower and less accurate on the networks measured).

A node whose slopes are all equal (or a single scalar) becomes
``LeakyRelu(alpha)`` in every form: exact, and a QLinearLeakyRelu (a table)
in int8. PRelu nodes whose slope is not a constant, whose slope broadcasts
along something other than the channels, or whose input is not 4-D stay as
they are and are named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.runtime.graph import drop_unused_initializers, nodes_and_reasons, tensor_ranks

FORMS = ("dwconv-pair", "fold-pair", "dwconv-min", "mul-pair")
# The form convert writes, so quantize sees it too: as fast as dwconv-pair in fp32 and in int8 (the fastest
# fp32 forms measured; dwconv-min is slower), quantizable whole, and one requantization fewer where a
# depthwise Conv feeds the PRelu (`python benchmarks/models.py --models prelu512` measures it).
DEFAULT_FORM = "fold-pair"
INT8_FORMS = ("dwconv-pair", "fold-pair", "mul-pair")  # every Relu reads a tensor nothing else reads
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class PreluRewrite:
    """What :func:`rewrite_prelu` did."""

    form: str
    rewritten: list[str] = field(default_factory=list)  # PRelu nodes expressed in ``form``
    leaky: list[str] = field(default_factory=list)  # PRelu nodes with one slope, now LeakyRelu
    folded: list[str] = field(default_factory=list)  # of ``rewritten``: those whose producing Conv was folded in
    kept: dict[str, str] = field(default_factory=dict)  # node -> why it stays a PRelu
    channels: int = 0
    slopes_negative: int = 0  # channels (over all nodes seen) with a slope < 0
    slopes_above_one: int = 0  # channels with a slope > 1

    @property
    def changed(self) -> int:
        return len(self.rewritten) + len(self.leaky)

    def summary(self) -> str:
        parts = []
        if self.rewritten:
            fold = f", {len(self.folded)} with their depthwise Conv folded in" if self.folded else ""
            parts.append(f"{len(self.rewritten)} PRelu -> {self.form} form{fold}")
        if self.leaky:
            parts.append(f"{len(self.leaky)} PRelu with one slope -> LeakyRelu")
        if self.kept:
            parts.append(f"{len(self.kept)} PRelu kept ({nodes_and_reasons(self.kept)})")
        return ", ".join(parts) or "no PRelu"

    def to_dict(self) -> dict:
        return {
            "form": self.form, "rewritten": len(self.rewritten), "folded": len(self.folded), "leaky_relu": len(self.leaky),
            "kept": dict(self.kept), "channels": self.channels, "slopes_negative": self.slopes_negative,
            "slopes_above_one": self.slopes_above_one,
        }


def count_prelu(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "PRelu" and n.domain in _DEFAULT_DOMAINS)


def channel_slopes(slope: np.ndarray, rank: int | None) -> np.ndarray | None:
    """The slopes as one value per channel (axis 1 of a rank-``rank`` input), or None.

    ONNX PRelu broadcasts the slope numpy-style from the right, so only shapes
    that line up with axis 1 ((C,1,1) for NCHW, (1,C,1,1)) are per-channel; a
    (C,) slope runs along the last axis. A single value comes back as a
    length-1 array (whatever the rank, as long as it does not add axes).
    """
    if slope.size == 1 and (slope.ndim <= 1 or (rank is not None and slope.ndim <= rank)):
        return slope.reshape(1).astype(np.float32)
    if rank is None or rank < 2 or slope.ndim > rank:
        return None
    full = (1,) * (rank - slope.ndim) + tuple(slope.shape)
    if all(d == 1 for i, d in enumerate(full) if i != 1):
        return slope.reshape(-1).astype(np.float32)
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


class _Builder:
    """New node and tensor names that collide with nothing in the graph; the initializers made."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.taken = {n.name for n in g.node} | {t.name for t in g.initializer} | {i.name for i in g.input}
        self.taken |= {o for n in g.node for o in n.output}
        self.inits: list[onnx.TensorProto] = []
        self.arrays: dict[str, np.ndarray] = {}

    def name(self, base: str) -> str:
        n, i = base, 1
        while n in self.taken:
            n, i = f"{base}_{i}", i + 1
        self.taken.add(n)
        return n

    def const(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), n))
        return n

    def dwconv(self, base: str, x: str, w: np.ndarray, out: str | None = None) -> onnx.NodeProto:
        c = w.size
        wn = self.const(f"{base}_w", w.reshape(c, 1, 1, 1))
        return helper.make_node("Conv", [x, wn], [out or self.name(f"{base}_out")], name=self.name(base),
                                group=c, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1])

    def mul(self, base: str, x: str, w: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Mul", [x, self.const(f"{base}_c", w.reshape(w.size, 1, 1))], [self.name(f"{base}_out")], name=self.name(base))

    def scaled_conv(self, base: str, conv: onnx.NodeProto, scale: np.ndarray) -> onnx.NodeProto:
        """A copy of ``conv`` whose output channel c is multiplied by ``scale[c]`` (weights and bias scaled)."""
        w = self.arrays[conv.input[1]]
        s64 = scale.astype(np.float64)
        ins = [conv.input[0], self.const(f"{base}_w", w * s64.reshape(-1, *([1] * (w.ndim - 1))))]
        if len(conv.input) > 2 and conv.input[2]:
            ins.append(self.const(f"{base}_b", self.arrays[conv.input[2]] * s64))
        node = helper.make_node("Conv", ins, [self.name(f"{base}_out")], name=self.name(base))
        node.attribute.extend(conv.attribute)
        return node


def _nodes_for(b: _Builder, node: onnx.NodeProto, a: np.ndarray, form: str, producer: onnx.NodeProto | None) -> list[onnx.NodeProto]:
    x, y, base = node.input[0], node.output[0], node.name or node.output[0]
    if form == "dwconv-min":
        zero = b.const(f"{base}_zero", np.zeros((), np.float32))
        mn = helper.make_node("Min", [x, zero], [b.name(f"{base}_min_out")], name=b.name(f"{base}_min"))
        rl = helper.make_node("Relu", [x], [b.name(f"{base}_relu_out")], name=b.name(f"{base}_relu"))
        sc = b.dwconv(f"{base}_slope", mn.output[0], a)
        return [mn, rl, sc, helper.make_node("Add", [rl.output[0], sc.output[0]], [y], name=b.name(f"{base}_add"))]
    one_minus = (1.0 - a.astype(np.float64)).astype(np.float32)
    k = np.abs(one_minus)
    if producer is not None:
        lin, pre = b.scaled_conv(f"{base}_lin", producer, a), b.scaled_conv(f"{base}_pos", producer, k)
    elif form == "mul-pair":
        lin, pre = b.mul(f"{base}_lin", x, a), b.mul(f"{base}_pos", x, k)
    else:
        lin, pre = b.dwconv(f"{base}_lin", x, a), b.dwconv(f"{base}_pos", x, k)
    rl = helper.make_node("Relu", [pre.output[0]], [b.name(f"{base}_pos_relu_out")], name=b.name(f"{base}_pos_relu"))
    out = [lin, pre, rl]
    pos = rl.output[0]
    if np.any(one_minus < 0):
        sign = np.where(one_minus < 0, -1.0, 1.0).astype(np.float32)
        flip = b.mul(f"{base}_sign", pos, sign) if form == "mul-pair" else b.dwconv(f"{base}_sign", pos, sign)
        out.append(flip)
        pos = flip.output[0]
    out.append(helper.make_node("Add", [lin.output[0], pos], [y], name=b.name(f"{base}_add")))
    return out


def _foldable_producers(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> dict[str, onnx.NodeProto]:
    """PRelu node -> the depthwise Conv feeding it, where that Conv can be folded into the PRelu's two branches.

    Only depthwise producers: a second copy of one costs about what the two
    1x1 depthwise convolutions it replaces cost (and int8 saves one
    requantization); a second full or pointwise convolution costs far more
    than it saves. The Conv must feed nothing else and have constant float
    weights and bias.
    """
    from pipeline.runtime.graph import graph_links

    producer, consumers = graph_links(model)
    outputs = {o.name for o in model.graph.output}
    out: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.op_type != "PRelu" or node.domain not in _DEFAULT_DOMAINS:
            continue
        p = producer.get(node.input[0])
        if p is None or p.op_type != "Conv" or p.domain not in _DEFAULT_DOMAINS or node.input[0] in outputs:
            continue
        if len(consumers.get(node.input[0], [])) != 1 or len(p.output) != 1 or len(p.input) < 2:
            continue
        params = [n for n in p.input[1:] if n]
        if any(n not in inits or inits[n].data_type != onnx.TensorProto.FLOAT for n in params):
            continue
        w = inits[p.input[1]]
        group = next((a.i for a in p.attribute if a.name == "group"), 1)
        if len(w.dims) != 4 or group == 1 or w.dims[1] != 1 or w.dims[0] != group:
            continue
        out[node.name or node.output[0]] = p
    return out


def rewrite_prelu(
    model: onnx.ModelProto, form: str = DEFAULT_FORM, *, leaky: bool = True, exclude: Collection[str] = ()
) -> PreluRewrite:
    """Replace the model's PRelu nodes in place by ``form`` (see the module text); returns what changed.

    ``leaky``: a node whose slopes are all equal becomes LeakyRelu (exact)
    instead of ``form``. ``exclude``: node names to leave as they are: a PRelu
    named there stays, a Conv named there is not folded into its PRelu.
    """
    if form not in FORMS:
        raise ValueError(f"unknown PRelu form {form!r}; known: {', '.join(FORMS)}")
    report = PreluRewrite(form)
    if not count_prelu(model):
        return report
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ranks = tensor_ranks(model)
    b = _Builder(model)
    folds = _foldable_producers(model, inits) if form == "fold-pair" else {}
    # An excluded producer keeps its name (an exclusion list names it), so it is not folded away.
    folds = {k: v for k, v in folds.items() if k not in exclude and v.name not in exclude}
    held = {id(p) for p in folds.values()}  # emitted where their PRelu is (scaled, twice) or put back there
    min_needs_broadcast = form == "dwconv-min" and _opset(model) < 8
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for node in g.node:
        if id(node) in held:
            continue
        if node.op_type != "PRelu" or node.domain not in _DEFAULT_DOMAINS:
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        producer = folds.get(label)

        def keep(why: str) -> None:
            if producer is not None:
                new_nodes.append(producer)
            new_nodes.append(node)
            report.kept[label] = why

        if label in exclude:
            keep("excluded by name")
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            keep("slope is not a constant")
            continue
        rank = ranks.get(node.input[0])
        slope = numpy_helper.to_array(inits[node.input[1]])
        a = channel_slopes(slope, rank) if slope.dtype == np.float32 else None
        if a is None:
            keep(f"slope of shape {list(slope.shape)} ({slope.dtype}) is not one float per channel of a rank-{rank} input")
            continue
        report.channels += a.size
        report.slopes_negative += int((a < 0).sum())
        report.slopes_above_one += int((a > 1).sum())
        if leaky and np.all(a == a[0]):
            if producer is not None:
                new_nodes.append(producer)
            new_nodes.append(helper.make_node("LeakyRelu", [node.input[0]], [node.output[0]], name=b.name(f"{label}_leaky"), alpha=float(a[0])))
            report.leaky.append(label)
            replaced.add(node.input[1])
            continue
        if rank != 4:
            keep(f"input of rank {rank}, not NCHW")
            continue
        if min_needs_broadcast:
            keep(f"Min broadcasts only from opset 8 (model: opset {_opset(model)})")
            continue
        if producer is not None:
            for name in producer.input[1:]:
                if name:
                    b.arrays.setdefault(name, numpy_helper.to_array(inits[name]).astype(np.float64))
                    replaced.add(name)
            report.folded.append(label)
        new_nodes.extend(_nodes_for(b, node, a, form, producer))
        report.rewritten.append(label)
        replaced.add(node.input[1])
    if not report.changed:
        return report
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(b.inits)
    # Slopes and folded weights no node reads any more go, with the graph-input entry old exports give them.
    drop_unused_initializers(model, only=replaced)
    # Shapes recorded for the replaced tensors may no longer hold; shape inference fills them in again.
    stale = {o for n in g.node for o in n.output}
    vis = [v for v in g.value_info if v.name in stale]
    del g.value_info[:]
    g.value_info.extend(vis)
    if model.ir_version < 4:  # ir_version 3 wants every initializer listed as a graph input as well
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits)
    return report
