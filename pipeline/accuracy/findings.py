"""Static findings: what in a model, its activation ranges or its int8 file costs accuracy, found without a sensitivity run.

All-zero (dead) output channels, int32 bias overflow (a near-zero weight
scale), per-channel weight ranges that differ by orders of magnitude,
activation tensors whose range is set by a few outlier channels, engine
conventions that cost accuracy (a lost Clip bound), and, given an int8 model,
zero or non-finite scales and saturated int32 biases in it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx

from pipeline.accuracy.engine_graph import GraphIndex, QNode, clip_bounds, fused_clip
from pipeline.accuracy.qmath import INT32_MAX, INT32_MIN, activation_qparams, quantize_bias, weight_scales
from pipeline.accuracy.ranges import TensorStats

if TYPE_CHECKING:
    from pipeline.stages.quantize.scheme import QuantScheme

# Thresholds of the findings.
WEIGHT_RANGE_RATIO = 64.0  # max / median of per-channel |w| max
ACTIVATION_OUTLIER_RATIO = 8.0  # a channel whose |x| max exceeds this many times the median channel's
ACTIVATION_RANGE_RATIO = 16.0  # tensor range / median channel range that makes a finding

MODEL_WIDE = "(model)"


@dataclass
class Finding:
    """One thing the diagnosis found. ``severity``: high (costs accuracy), warning, info."""

    kind: str
    severity: str
    node: str
    message: str
    tensor: str | None = None
    channels: list[int] = field(default_factory=list)
    value: float | None = None
    nodes: list[str] = field(default_factory=list)  # a finding about many nodes (``node`` is then MODEL_WIDE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_findings(nodes: Sequence[QNode], g: GraphIndex, scheme: "QuantScheme") -> list[Finding]:
    """What the engine's own conventions cost this model, whatever its weights."""
    out: list[Finding] = []
    if scheme.clip_bound_lost:
        clipped = []
        for qn in nodes:
            clip = fused_clip(g, qn)
            if clip is None:
                continue
            upper = clip_bounds(clip, g)[1]
            if upper is not None and math.isfinite(upper):
                clipped.append(qn.name)
        if clipped:
            out.append(
                Finding(
                    "clip_bound_lost", "high", MODEL_WIDE,
                    f"{len(clipped)} convs have a fused Clip with an upper bound: INC's reduce_range quantizes activations "
                    "to 127 uint8 levels but lets the uint8 clamp at 255 stand in for the Clip, so Clip(0, 6) passes values up "
                    "to about 12; 8-bit activations (quantization.reduce_range: false) keep the bound",
                    nodes=clipped,
                )
            )
    return out


def weight_findings(g: GraphIndex, nodes: Sequence[QNode], ranges: dict[str, tuple[float, float]], scheme: "QuantScheme") -> list[Finding]:
    """Dead channels, int32 bias overflow, per-channel weight ranges far apart."""
    out: list[Finding] = []
    for qn in nodes:
        w = g.array(qn.weight) if qn.weight and qn.weight in g.inits else None
        if w is None or qn.weight_axis is None:
            continue
        axis = qn.weight_axis
        ch_max = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1)
        dead = np.flatnonzero(ch_max == 0)
        if dead.size:
            out.append(
                Finding(
                    "dead_channels", "warning", qn.name,
                    f"{dead.size} of {ch_max.size} output channels have all-zero weights: a zero weight range, "
                    "so the engine's weight scale for them is a placeholder (1.0) and their output is the bias alone",
                    channels=[int(c) for c in dead],
                )
            )
        live = ch_max[ch_max > 0]
        if live.size >= 2:
            ratio = float(live.max() / np.median(live))
            if ratio >= WEIGHT_RANGE_RATIO:
                big = np.flatnonzero(ch_max >= np.median(live) * WEIGHT_RANGE_RATIO / 4)
                sev = "high" if not scheme.per_channel else "info"
                how = "one per-tensor scale leaves the other channels a few levels" if not scheme.per_channel else "per-channel scales absorb it"
                out.append(
                    Finding(
                        "weight_range", sev, qn.name,
                        f"per-channel weight ranges differ {ratio:.0f}x (max / median): {how}",
                        channels=[int(c) for c in big[:32]], value=ratio,
                    )
                )
        if qn.bias and qn.bias in g.inits and qn.activations and qn.activations[0] in ranges:
            sx, _ = activation_qparams(*ranges[qn.activations[0]], scheme.activation_levels)
            levels = scheme.weight_levels(qn.depthwise)
            if scheme.per_channel:
                sw = weight_scales(w, axis, levels)
            else:
                sw = np.full(ch_max.shape, weight_scales(w, None, levels)[0], np.float32)
            b = g.array(qn.bias).reshape(-1)
            if b.size == sw.size:
                _, overflow = quantize_bias(b, sx * sw.astype(np.float64), scheme.bias_overflow)
                if overflow.any():
                    how = "become INT32_MIN (numpy's invalid cast in INC)" if scheme.bias_overflow == "wrap" else "saturate"
                    out.append(
                        Finding(
                            "bias_overflow", "high", qn.name,
                            f"{int(overflow.sum())} bias values do not fit int32 at scale x_scale * w_scale "
                            f"(a near-zero weight scale) and {how}",
                            channels=[int(c) for c in np.flatnonzero(overflow)[:32]],
                        )
                    )
    return out


def activation_findings(nodes: Sequence[QNode], stats: dict[str, TensorStats], scheme: "QuantScheme") -> list[Finding]:
    """Activation tensors whose one uint8 range is set by a few outlier channels."""
    out: list[Finding] = []
    seen: set[str] = set()
    for qn in nodes:
        for t in [*qn.activations, qn.output]:
            if t in seen or t not in stats:
                continue
            seen.add(t)
            st = stats[t]
            if st.ch_lo is None or st.ch_hi is None or st.ch_hi.size < 4:
                continue
            ch_range = np.maximum(st.ch_hi, 0) - np.minimum(st.ch_lo, 0)
            live = ch_range[ch_range > 0]
            if live.size < 4:
                continue
            med = float(np.median(live))
            total = max(st.hi, 0.0) - min(st.lo, 0.0)
            ratio = total / med if med > 0 else math.inf
            if ratio < ACTIVATION_RANGE_RATIO:
                continue
            outliers = np.flatnonzero(ch_range > ACTIVATION_OUTLIER_RATIO * med)
            if outliers.size == 0:
                continue
            levels = scheme.activation_levels / ratio
            out.append(
                Finding(
                    "activation_outliers", "high" if levels < 16 else "warning", qn.name,
                    f"{outliers.size} of {ch_range.size} channels set the range of {t}: it is {ratio:.0f}x the median "
                    f"channel's, which is left about {levels:.1f} of {scheme.activation_levels} uint8 levels",
                    tensor=t, channels=[int(c) for c in outliers[:32]], value=ratio,
                )
            )
    return out


# QLinear* inputs that are scales (onnxruntime's QOperator contrib and standard ops).
_SCALE_INPUTS = {
    "QuantizeLinear": (1,), "DequantizeLinear": (1,), "QLinearConv": (1, 4, 6), "QLinearMatMul": (1, 4, 6),
    "QLinearAdd": (1, 4, 6), "QLinearMul": (1, 4, 6), "QGemm": (1, 4), "QLinearConcat": (0,),
    "QLinearGlobalAveragePool": (1, 3), "QLinearAveragePool": (1, 3), "QLinearLeakyRelu": (1, 3), "QLinearSigmoid": (1, 3),
}


def int8_findings(model: onnx.ModelProto) -> list[Finding]:
    """Zero or non-finite scales, saturated int32 biases and all-zero weight channels in an int8 model."""
    g = GraphIndex.of(model)
    out: list[Finding] = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        for k in _SCALE_INPUTS.get(node.op_type, ()):
            if k >= len(node.input) or node.input[k] not in g.inits:
                continue
            s = g.array(node.input[k]).astype(np.float64).reshape(-1)
            bad = np.flatnonzero(~np.isfinite(s) | (s <= 0))
            if bad.size:
                out.append(
                    Finding(
                        "bad_scale", "high", name, f"scale {node.input[k]} has {bad.size} zero, negative or non-finite value(s)",
                        tensor=node.input[k], channels=[int(c) for c in bad[:32]],
                    )
                )
        if node.op_type == "QLinearConv":
            if len(node.input) > 8 and node.input[8] in g.inits:
                b = g.array(node.input[8]).astype(np.int64).reshape(-1)
                sat = np.flatnonzero((b <= INT32_MIN) | (b >= INT32_MAX))
                if sat.size:
                    out.append(
                        Finding(
                            "bias_saturated", "high", name,
                            f"{sat.size} int32 bias values sit at the int32 limit (overflow during bias quantization)",
                            tensor=node.input[8], channels=[int(c) for c in sat[:32]],
                        )
                    )
            if node.input[3] in g.inits and node.input[4] in g.inits:
                wq = g.array(node.input[3])
                ws = g.array(node.input[4]).reshape(-1)
                zero = np.flatnonzero(np.all(wq.reshape(wq.shape[0], -1) == 0, axis=1))
                if zero.size and ws.size == wq.shape[0]:
                    out.append(
                        Finding(
                            "dead_channels", "info", name,
                            f"{zero.size} output channels quantized to all-zero weights (weight scale {float(ws[zero[0]]):g})",
                            tensor=node.input[3], channels=[int(c) for c in zero[:32]],
                        )
                    )
    return out


def int8_node_name(name: str, fp32_names: set[str]) -> str:
    """The fp32 node an engine's int8 node came from (INC appends ``_quant``)."""
    for suffix in ("_quant", "_QuantizeLinear", "_DequantizeLinear"):
        if name.endswith(suffix) and name[: -len(suffix)] in fp32_names:
            return name[: -len(suffix)]
    return name


def int8_model_findings(int8: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Sequence[QNode]) -> list[Finding]:
    """:func:`int8_findings` of ``int8``, each named after the fp32 node it came from."""
    names = {qn.name for qn in nodes} | {n.name for n in fp32.graph.node}
    found = int8_findings(int8)
    for f in found:
        f.node = int8_node_name(f.node, names)
    return found
