"""Function-preserving rewrites of an fp32 model that make it quantize better.

* **cross-layer equalisation** (Nagel et al., *Data-Free Quantization*, 2019):
  where a tensor runs through a linear pair ``A -> [BatchNormalization] ->
  [Relu/PRelu/LeakyRelu] -> Conv B`` and nowhere else, channel ``c`` of A
  (weights and bias of its convolutions, BatchNormalization mean and beta) is
  divided by ``s_c`` and B's input channel ``c`` multiplied by it, with
  ``s_c = sqrt(r_act_c / r_B_c)``, which leaves the activation and B's weight
  columns the same range ``sqrt(r_act_c * r_B_c)``. A is a Conv, or an Add of
  two branches that each run ``Conv -> [homogeneous activation] -> Add`` and
  nowhere else: the form a PRelu takes after ``qpipe convert``
  (:mod:`pipeline.stages.prelu`), ``Add(Conv_lin(x), [Conv_sign](Relu(Conv_pos(x))))``.
  Scaling the Conv that ends each branch divides the sum's channel ``c`` by
  ``s_c`` exactly, since a homogeneous activation commutes with a positive
  scale; a Conv inside a branch (the pos Conv under a sign Conv) stays as it is;
* **zeroed channels**: output channels whose weights are so small that the
  int32 bias overflows are set exactly to zero, so the engine gives them its
  placeholder scale and keeps their bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.accuracy.engine_graph import GraphIndex
from pipeline.core.errors import UserError

# Activations that commute with a positive per-channel scale: f(x / s) = f(x) / s.
HOMOGENEOUS = {"Relu", "PRelu", "LeakyRelu"}


@dataclass
class LinearPair:
    """``firsts`` -> [BatchNormalization] -> [homogeneous activation] -> ``second`` (Conv).

    ``firsts`` is one Conv, or the Convs ending the two branches of the Add
    ``add`` (through ``branch_activations``). ``tensor`` is the value entering
    ``second``: the activation being equalised. A single name given for
    ``firsts`` stands for a one-Conv pair.
    """

    firsts: tuple[str, ...]
    second: str
    tensor: str
    batchnorm: str | None = None
    activation: str | None = None
    add: str | None = None
    branch_activations: tuple[str, ...] = ()
    # Every tensor from the firsts' outputs up to ``tensor``: equalisation scales their channels alike.
    scaled: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        self.firsts = (self.firsts,) if isinstance(self.firsts, str) else tuple(self.firsts)

    @property
    def nodes(self) -> list[str]:
        return [*self.firsts, self.second]

    @property
    def label(self) -> str:
        """``a+b -> c``: the convolutions the pair rescales."""
        return f"{'+'.join(self.firsts)} -> {self.second}"


def find_linear_pair(model: onnx.ModelProto, tensor: str) -> LinearPair | None:
    """The linear pair that ``tensor`` sits inside, or None when rescaling its channels would change the function."""
    g = GraphIndex.of(model)
    inits = g.inits

    def sole_consumer(t: str) -> onnx.NodeProto | None:
        users = g.consumers.get(t, [])
        return users[0] if len(users) == 1 and t not in g.outputs else None

    def homogeneous(node: onnx.NodeProto | None) -> bool:
        return node is not None and node.op_type in HOMOGENEOUS and (node.op_type != "PRelu" or node.input[1] in inits)

    def scalable_conv(node: onnx.NodeProto | None) -> bool:
        """A Conv whose output channels can be rescaled: constant weights and bias, one output."""
        if node is None or node.op_type != "Conv" or len(node.output) != 1 or node.input[1] not in inits:
            return False
        return not (len(node.input) > 2 and node.input[2] and node.input[2] not in inits)

    second = sole_consumer(tensor)
    if second is None or second.op_type != "Conv" or second.input[0] != tensor or second.input[1] not in inits:
        return None
    scaled = [tensor]
    node = g.producer.get(tensor)
    activation = batchnorm = None
    if node is not None and node.op_type in HOMOGENEOUS:
        if not homogeneous(node):
            return None
        activation = node.name
        if sole_consumer(node.input[0]) is None:
            return None
        scaled.append(node.input[0])
        node = g.producer.get(node.input[0])
    if node is not None and node.op_type == "BatchNormalization":
        if len(node.output) > 1 and any(node.output[1:]) or any(i not in inits for i in node.input[1:5]):
            return None
        batchnorm = node.name
        if sole_consumer(node.input[0]) is None:
            return None
        scaled.append(node.input[0])
        node = g.producer.get(node.input[0])
    if scalable_conv(node):
        assert node is not None
        return LinearPair(node.name, second.name, tensor, batchnorm, activation, scaled=tuple(scaled))
    if node is None or node.op_type != "Add" or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    firsts: list[str] = []
    acts: list[str] = []
    channels: set[int] = set()
    for t in node.input:
        # Each branch: the Add's input, read by the Add alone, made by a Conv through at most one activation.
        if sole_consumer(t) is None:
            return None
        scaled.append(t)
        p = g.producer.get(t)
        if homogeneous(p):
            assert p is not None
            acts.append(p.name)
            if sole_consumer(p.input[0]) is None:
                return None
            scaled.append(p.input[0])
            p = g.producer.get(p.input[0])
        if not scalable_conv(p):
            return None
        assert p is not None
        firsts.append(p.name)
        channels.add(int(inits[p.input[1]].dims[0]))
    if len(channels) != 1:  # a one-channel branch broadcast over the other's channels cannot carry a per-channel scale
        return None
    return LinearPair(tuple(firsts), second.name, tensor, batchnorm, activation, node.name, tuple(acts), tuple(scaled))


def _initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(inits[name]).dtype), name))


def equalize_pair(model: onnx.ModelProto, pair: LinearPair, act_range: np.ndarray) -> np.ndarray:
    """Rescale the pair's channels in place; returns the scales ``s`` (activation channel c is divided by s[c]).

    ``act_range``: per-channel range (max(hi, 0) - min(lo, 0)) of ``pair.tensor`` on calibration faces.
    """
    inits = _initializer_map(model)
    firsts = [_node(model, n) for n in pair.firsts]
    second = _node(model, pair.second)
    w1s = [numpy_helper.to_array(inits[f.input[1]]).astype(np.float64) for f in firsts]
    w2 = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
    groups = _group(second)
    per_group = w2.shape[1]
    channels = per_group * groups
    if any(w1.shape[0] != channels for w1 in w1s) or act_range.shape[0] != channels:
        found = "/".join(str(w1.shape[0]) for w1 in w1s)
        raise UserError(f"cannot equalise {pair.label}: {found} channels do not match {second.name}'s input")
    # Range of each input channel of the second conv over every output channel and tap that reads it.
    r2 = np.zeros(channels)
    out_per_group = w2.shape[0] // groups
    for c in range(channels):
        grp, k = divmod(c, per_group)
        r2[c] = np.max(np.abs(w2[grp * out_per_group : (grp + 1) * out_per_group, k]))
    r1 = np.asarray(act_range, dtype=np.float64)
    s = np.ones(channels)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    if ok.any():
        # Channels the second conv ignores are brought to the common level rather than left as outliers.
        level = float(np.median(np.sqrt(r1[ok] * r2[ok])))
        ignored = (r1 > 0) & (r2 == 0)
        s[ignored] = r1[ignored] / level
    s = s.astype(np.float32).astype(np.float64)  # representable scales keep the rescale exact to float rounding

    for act_name in (pair.activation, *pair.branch_activations):
        if not act_name:
            continue
        act = _node(model, act_name)
        if act.op_type == "PRelu":
            slope = numpy_helper.to_array(inits[act.input[1]])
            if slope.size not in (1, channels):
                raise UserError(f"cannot equalise through {act.name}: PRelu slope of shape {slope.shape}")
    for first, w1 in zip(firsts, w1s):
        _set(inits, first.input[1], w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1)))
        if len(first.input) > 2 and first.input[2]:
            _set(inits, first.input[2], numpy_helper.to_array(inits[first.input[2]]) / s)
    if pair.batchnorm:
        bn = _node(model, pair.batchnorm)
        # y = gamma (x - mean) / sqrt(var + eps) + beta: x / s and y / s need mean / s and beta / s.
        _set(inits, bn.input[2], numpy_helper.to_array(inits[bn.input[2]]) / s)
        _set(inits, bn.input[3], numpy_helper.to_array(inits[bn.input[3]]) / s)
    w2n = w2.copy()
    for c in range(channels):
        grp, k = divmod(c, per_group)
        w2n[grp * out_per_group : (grp + 1) * out_per_group, k] *= s[c]
    _set(inits, second.input[1], w2n)
    return s


def zero_channels(model: onnx.ModelProto, conv: str, channels: Sequence[int]) -> None:
    """Set the weights of ``conv``'s output ``channels`` to exactly zero (their bias stays)."""
    inits = _initializer_map(model)
    node = _node(model, conv)
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    w[list(channels)] = 0
    _set(inits, node.input[1], w)


def range_ratio(ch_range: np.ndarray) -> float:
    """Largest over median of the non-zero per-channel ranges: how far outlier channels stretch one shared range."""
    live = ch_range[ch_range > 0]
    return float(live.max() / np.median(live)) if live.size else 1.0
