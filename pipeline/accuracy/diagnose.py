"""Why an int8 model loses accuracy: layer-wise sensitivity and static findings.

Quantizing a node one at a time with the real engine would take a full
calibration per node (a minute or more each with INC). Instead the model is
seen the way the engines see it (onnxruntime's basic optimisations:
BatchNormalization folded into its Conv), activation ranges are measured once
on the recipe's calibration faces, and one *gated* copy of the model is built
in which every quantizable node has its own fake-quantization switch: ``If``
nodes that either pass a tensor through or send it through
QuantizeLinear/DequantizeLinear, on the node's activation inputs and output,
and choose between the float and the quantized-dequantized weight and bias.
The quantized side follows the conventions of :mod:`pipeline.stages.quantize.stage`
(:class:`QuantScheme`): uint8 asymmetric activations, int8 symmetric weights
per channel or per tensor, 7-bit when ``reduce_range`` (8-bit for depthwise
convs), the int32 bias at scale ``x_scale * w_scale`` with INC's overflow
behaviour, the fused Relu/Clip taken before the output is quantized. The
switches are one graph input, so one session answers every question: all off
is the fp32 model exactly; one on measures that node int8 alone; all on but
one measures leaving that node in fp32. On MobileFaceNet the simulated
all-int8 embedding agrees with INC's real int8 model to within a few
thousandths of cosine.

The model is also cut where a single tensor flows (block boundaries), and a
measurement starts from cached values at the cut before the node that
changed, so a run costs the part of the network after that node.

The error is the embedding error ``1 - cosine`` against fp32, averaged over
the faces. A tensor between two quantized nodes is quantized once in the real
model; here the producer's and the reader's switches both quantize it, with
the same scale, which is the same to within float rounding.

Static findings need no inference beyond the range measurement: all-zero
(dead) output channels, int32 bias overflow (a near-zero weight scale),
per-channel weight ranges that differ by orders of magnitude, activation
tensors whose range is set by a few outlier channels, engine conventions that
cost accuracy (a lost Clip bound), and, given an int8 model, zero or
non-finite scales and saturated int32 biases in it.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_json, atomic_write_text, require_file
from pipeline.runtime.graph import graph_links
from pipeline.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection

# Ops the engines turn into int8 kernels. Weighted ops carry an initializer weight (and bias);
# element-wise ops are quantized when every operand is an activation (INC leaves Mul/Add by a
# constant, e.g. the input normalisation, in fp32).
WEIGHTED_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}  # value: weight output-channel axis
ELEMENTWISE_OPS = {"Add", "Mul"}
# Activations the engines fuse into the preceding Conv: its int8 output is taken after them.
FUSED_ACTIVATIONS = {"Relu", "Clip"}

GATES = "qpipe_gates"
GATE_PREFIX = "qpipe_g_"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Thresholds of the static findings.
WEIGHT_RANGE_RATIO = 64.0  # max / median of per-channel |w| max
ACTIVATION_OUTLIER_RATIO = 8.0  # a channel whose |x| max exceeds this many times the median channel's
ACTIVATION_RANGE_RATIO = 16.0  # tensor range / median channel range that makes a finding


# --- quantization conventions ---------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """How an engine maps float ranges to integers, so the simulation matches it."""

    engine: str
    activation_levels: int  # uint8 asymmetric: scale = (max - min) / levels
    weight_half_levels: int  # int8 symmetric: scale = |w|max / half_levels
    per_channel: bool
    bias_overflow: str  # "wrap": numpy astype(int32) (INC); "clip": saturate (onnxruntime)
    # INC fuses Clip into the int8 conv by clamping its uint8 output; with 127 levels the clamp
    # sits at level 255, so Clip(0, 6) lets values up to about 12 through.
    clip_bound_lost: bool = False
    depthwise_half_levels: int | None = None  # depthwise convs' weights, when they differ
    calibration: str = "minmax"  # activation range estimator: minmax | percentile (entropy is simulated as minmax)

    @classmethod
    def from_section(cls, q: "QuantizationSection") -> "QuantScheme":
        """The conventions ``pipeline.stages.quantize.stage`` applies for these settings."""
        from pipeline.stages.quantize import stage as qmod

        reduce = bool(getattr(q, "reduce_range", False))
        per_channel = q.per_channel if q.per_channel is not None else q.engine == "inc"
        half = 64 if reduce else 127
        # quantize.py keeps 8-bit weights for depthwise convs (their kernel cannot saturate) unless told otherwise.
        dw = 127 if reduce and not getattr(q, "reduce_range_depthwise", True) and hasattr(qmod, "merge_depthwise_weights") else None
        calib = q.calibration_method if q.calibration_method == "percentile" else "minmax"
        if q.engine == "inc":
            # INC's own reduce_range also narrows activations to 127 levels; quantize.py undoes that.
            narrow = reduce and not hasattr(qmod, "_inc_full_range_activations")
            return cls(
                "inc", 127 if narrow else 255, half, bool(per_channel), "wrap", clip_bound_lost=narrow, depthwise_half_levels=dw,
                calibration=calib,
            )
        return cls(q.engine, 255, half, bool(per_channel), "clip", depthwise_half_levels=dw, calibration=calib)

    def weight_levels(self, node: "QNode") -> int:
        return self.depthwise_half_levels if node.depthwise and self.depthwise_half_levels else self.weight_half_levels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_qparams(lo: float, hi: float, levels: int) -> tuple[float, int]:
    """(scale, zero point) of uint8 asymmetric quantization of [lo, hi] (zero always representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / levels
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return float(np.float32(scale)), zp


def weight_scales(w: np.ndarray, axis: int | None, half_levels: int) -> np.ndarray:
    """Symmetric int8 scales: one per output channel (``axis``) or one for the tensor (axis None).

    A channel whose weights are all zero gets scale 1.0, as both engines do.
    """
    if axis is None:
        m = np.array([np.max(np.abs(w))]) if w.size else np.zeros(1)
    else:
        m = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1)
    scale = (m.astype(np.float64) / half_levels).astype(np.float32)
    scale[m == 0] = 1.0
    return scale


def fake_quant_weight(w: np.ndarray, scales: np.ndarray, axis: int | None, half_levels: int) -> np.ndarray:
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    s = scales.reshape(shape) if axis is not None else scales.reshape(())
    q = np.clip(np.round(w / s), -half_levels, half_levels)
    return (q * s).astype(np.float32)


def quantize_bias(b: np.ndarray, bias_scale: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias as the engine computes it, and a mask of channels that overflowed int32."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        raw = np.round(b.astype(np.float64) / bias_scale.astype(np.float64))
        overflow = ~np.isfinite(raw) | (raw < INT32_MIN) | (raw > INT32_MAX)
        if mode == "wrap":
            # INC: (bias / scale).round().astype(np.int32); out-of-range values become INT32_MIN.
            q = np.where(overflow, INT32_MIN, np.nan_to_num(raw)).astype(np.int64)
        else:
            q = np.clip(np.nan_to_num(raw, nan=0.0, posinf=INT32_MAX, neginf=INT32_MIN), INT32_MIN, INT32_MAX).astype(np.int64)
    return q, overflow


# --- the model as the engines see it ----------------------------------------------


def engine_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic optimisations (BatchNormalization folded into Conv), which both engines apply first."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qpipe-diagnose-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"onnxruntime cannot load the fp32 model: {str(e).strip().splitlines()[0]}") from None
        opt = onnx.load(str(out))
    # The optimiser declares every domain it knows; keep the ones the graph uses.
    used = {n.domain for n in opt.graph.node}
    keep = [o for o in opt.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del opt.opset_import[:]
    opt.opset_import.extend(keep)
    return opt


@dataclass
class _Graph:
    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Graph":
        producer, consumers = graph_links(model)
        return cls(model, {t.name: t for t in model.graph.initializer}, producer, consumers, {o.name for o in model.graph.output})

    def is_constant(self, name: str) -> bool:
        p = self.producer.get(name)
        return name in self.inits or (p is not None and p.op_type == "Constant")

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])


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
    g = _Graph.of(model)
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


# --- activation ranges --------------------------------------------------------------


@dataclass
class TensorStats:
    """Range of one activation over the calibration faces, overall and per channel (axis 1)."""

    name: str
    lo: float
    hi: float
    ch_lo: np.ndarray | None
    ch_hi: np.ndarray | None
    p_lo: float | None = None  # the engine's percentile range, when measured
    p_hi: float | None = None

    def update(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(np.min(x))) if x.size else self.lo
        self.hi = max(self.hi, float(np.max(x))) if x.size else self.hi
        if x.ndim >= 2 and x.size:
            flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
            lo, hi = flat.min(axis=1), flat.max(axis=1)
            self.ch_lo = lo if self.ch_lo is None else np.minimum(self.ch_lo, lo)
            self.ch_hi = hi if self.ch_hi is None else np.maximum(self.ch_hi, hi)


def _session(model: onnx.ModelProto, *, basic: bool = False):
    import onnxruntime as ort

    from pipeline.core.environment import physical_cores

    so = ort.SessionOptions()
    so.intra_op_num_threads = physical_cores()
    so.log_severity_level = 3
    if basic:
        # Keep the fake-quant chains as written: no QDQ fusion into int8 kernels.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"onnxruntime cannot run the model prepared for diagnosis: {str(e).strip().splitlines()[0]}") from None


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield np.ascontiguousarray(x[i : i + size])


def _fixed_batch(model: onnx.ModelProto, input_name: str) -> int | None:
    for i in model.graph.input:
        if i.name == input_name:
            d = i.type.tensor_type.shape.dim
            if d and d[0].HasField("dim_value") and d[0].dim_value > 0:
                return int(d[0].dim_value)
    return None


PERCENTILE = 99.999  # both engines' default
PERCENTILE_BINS = 2048


def activation_stats(
    model: onnx.ModelProto, images: np.ndarray, tensors: Iterable[str], *, input_name: str, batch: int = 16,
    percentile: str | None = None, progress: Progress | None = None,
) -> dict[str, TensorStats]:
    """Min/max of ``tensors`` (overall and per channel) over ``images``; with ``percentile`` ("inc" or "ort")
    also the engine's 99.999-percentile range, from a second pass that fills one fixed-range histogram per tensor."""
    progress = progress or NULL_PROGRESS
    names = list(dict.fromkeys(tensors))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for n in names:
        if n not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = _session(probe)
    step = _fixed_batch(model, input_name) or batch
    stats = {n: TensorStats(n, math.inf, -math.inf, None, None) for n in names}
    with progress.task("measuring activation ranges", total=len(images), unit="img") as t:
        for x in _batches(images, step):
            outs = sess.run(names, {input_name: x})
            for n, v in zip(names, outs):
                stats[n].update(np.asarray(v, dtype=np.float32))
            t.advance(len(x))
    if percentile is None:
        return stats
    # One histogram over every value of the calibration set, as INC builds it (np.histogram of all the
    # data at once over [-max|x|, max|x|]); a fixed range makes per-batch histograms add up to it exactly.
    # onnxruntime histograms |x| over [0, max|x|] instead.
    hists: dict[str, np.ndarray] = {}
    edges: dict[str, np.ndarray] = {}
    for n, st in stats.items():
        th = max(abs(st.lo), abs(st.hi))
        lo = -th if percentile == "inc" else 0.0
        edges[n] = np.histogram_bin_edges(np.zeros(1, np.float32), PERCENTILE_BINS, range=(lo, th) if th > lo else (lo, lo + 1.0))
        hists[n] = np.zeros(PERCENTILE_BINS, np.int64)
    with progress.task("measuring percentile ranges", total=len(images), unit="img") as t:
        for x in _batches(images, step):
            outs = sess.run(names, {input_name: x})
            for n, v in zip(names, outs):
                v = np.asarray(v, dtype=np.float32).reshape(-1)
                hists[n] += np.histogram(np.abs(v) if percentile == "ort" else v, bins=edges[n])[0]
            t.advance(len(x))
    cut = (100.0 - PERCENTILE) / 200.0
    for n, st in stats.items():
        hist, e = hists[n], edges[n]
        cdf = np.cumsum(hist / max(hist.sum(), 1))
        p_lo = float(e[np.searchsorted(cdf, cut)])
        p_hi = float(e[min(np.searchsorted(cdf, 1.0 - cut), len(e) - 1)])
        st.p_lo, st.p_hi = max(p_lo, st.lo), min(p_hi, st.hi)
    return stats


def calibrated_range(qn_by_output: dict[str, "QNode"], g: "_Graph", st: TensorStats, scheme: QuantScheme) -> tuple[float, float]:
    """The range the engine quantizes tensor ``st.name`` with.

    The recipe's estimator (min-max or percentile), widened to include zero, and for
    the output of a conv with a fused activation INC's rules: Relu starts the range at
    zero, Clip stretches it to the clip bounds.
    """
    lo, hi = (st.p_lo, st.p_hi) if scheme.calibration == "percentile" and st.p_lo is not None else (st.lo, st.hi)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qn = qn_by_output.get(st.name)
    if qn is not None and qn.fused:
        if qn.activation_op == "Relu":
            lo = max(lo, 0.0)
        elif qn.activation_op == "Clip":
            clip = next((n for n in g.consumers.get(qn.raw_output, []) if n.op_type == "Clip"), None)
            bounds = [b for b in (_clip_bound(clip, g, 1, "min"), _clip_bound(clip, g, 2, "max")) if b is not None] if clip else []
            if bounds:
                lo, hi = min([lo, *bounds]), max([hi, *bounds])
    return lo, hi


def calibrated_ranges(nodes: Sequence["QNode"], g: "_Graph", stats: dict[str, TensorStats], scheme: QuantScheme) -> dict[str, tuple[float, float]]:
    by_output = {qn.output: qn for qn in nodes}
    return {name: calibrated_range(by_output, g, st, scheme) for name, st in stats.items()}


# --- static findings ------------------------------------------------------------------


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


MODEL_WIDE = "(model)"


def engine_findings(nodes: Sequence[QNode], g: "_Graph", scheme: QuantScheme) -> list[Finding]:
    """What the engine's own conventions cost this model, whatever its weights."""
    out: list[Finding] = []
    if scheme.clip_bound_lost:
        clipped = []
        for qn in nodes:
            if qn.activation_op != "Clip":
                continue
            clip = next(n for n in g.consumers.get(qn.raw_output, []) if n.op_type == "Clip")
            upper = _clip_bound(clip, g, 2, "max")
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


def _clip_bound(node: onnx.NodeProto, g: "_Graph", index: int, attr: str) -> float | None:
    """A Clip's min (index 1, attribute "min") or max (index 2, "max") when it is a constant."""
    for a in node.attribute:
        if a.name == attr:
            return float(a.f)
    if len(node.input) > index and node.input[index]:
        name = node.input[index]
        if name in g.inits:
            return float(g.array(name).reshape(-1)[0])
        p = g.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return float(numpy_helper.to_array(p.attribute[0].t).reshape(-1)[0])
    return None


def _folded_weight(g: _Graph, qn: QNode) -> np.ndarray | None:
    return g.array(qn.weight) if qn.weight and qn.weight in g.inits else None


def weight_findings(g: _Graph, nodes: Sequence[QNode], ranges: dict[str, tuple[float, float]], scheme: QuantScheme) -> list[Finding]:
    """Dead channels, int32 bias overflow, per-channel weight ranges far apart."""
    out: list[Finding] = []
    for qn in nodes:
        w = _folded_weight(g, qn)
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
            if scheme.per_channel:
                sw = weight_scales(w, axis, scheme.weight_levels(qn))
            else:
                sw = np.full(ch_max.shape, weight_scales(w, None, scheme.weight_levels(qn))[0], np.float32)
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


def activation_findings(nodes: Sequence[QNode], stats: dict[str, TensorStats], scheme: QuantScheme) -> list[Finding]:
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
            owner = qn.name
            out.append(
                Finding(
                    "activation_outliers", "high" if levels < 16 else "warning", owner,
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
    g = _Graph.of(model)
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


# --- sensitivity --------------------------------------------------------------------


def _const(inits: list[onnx.TensorProto], name: str, value: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(value, name))
    return name


def build_gated_model(
    model: onnx.ModelProto, nodes: Sequence[QNode], ranges: dict[str, tuple[float, float]], scheme: QuantScheme
) -> onnx.ModelProto:
    """The model with one fake-quantization switch per node, driven by the input ``qpipe_gates`` [len(nodes)]."""
    gm = onnx.ModelProto()
    gm.CopyFrom(model)
    graph = gm.graph
    g = _Graph.of(gm)
    # Positions, not proto objects: protobuf hands out a new wrapper on every access.
    position = {n.name: i for i, n in enumerate(graph.node) if n.name}
    made_by = {o: i for i, n in enumerate(graph.node) for o in n.output}
    inits: list[onnx.TensorProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # node position -> chains inserted before it
    after: dict[int, list[onnx.NodeProto]] = {}
    graph.input.append(helper.make_tensor_value_info(GATES, TensorProto.FLOAT, [len(nodes)]))

    gate_nodes: list[onnx.NodeProto] = []  # all switch conditions, computed first (see SimulatedModel)
    for qn in nodes:
        idx = _const(inits, f"qpipe_gidx_{qn.index}", np.array(qn.index, dtype=np.int64))
        half = _const(inits, f"qpipe_ghalf_{qn.index}", np.array(0.5, dtype=np.float32))
        out = f"{GATE_PREFIX}{qn.index}"
        gate_nodes.extend([
            helper.make_node("Gather", [GATES, idx], [f"{out}_f"], axis=0, name=f"qpipe_gather_{qn.index}"),
            helper.make_node("Greater", [f"{out}_f", half], [out], name=f"qpipe_gate_{qn.index}"),
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
        # doc_string: the switches this If depends on, for SimulatedModel's spans.
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
        # Activation inputs: a private fake-quantized copy feeds this node only.
        for k, t in enumerate(list(node.input)):
            if t in qn.activations:
                dst = f"qpipe_in{qn.index}_{k}"
                fq_act(t, dst, t, gname, f"qpipe_n{qn.index}_a{k}", pre, mine)
                node.input[k] = dst
        sx = None
        if qn.activations and qn.activations[0] in ranges:
            sx, _ = activation_qparams(*ranges[qn.activations[0]], scheme.activation_levels)
        if qn.weight is not None and qn.weight in g.inits:
            w = g.array(qn.weight).astype(np.float32)
            axis = qn.weight_axis if scheme.per_channel else None
            sw = weight_scales(w, axis, scheme.weight_levels(qn))
            wdq = fake_quant_weight(w, sw, axis, scheme.weight_levels(qn))
            k = list(node.input).index(qn.weight)
            node.input[k] = fq_const(qn.weight, wdq, gname, f"qpipe_n{qn.index}_w", pre, mine)
            if qn.bias is not None and qn.bias in g.inits and sx is not None:
                b = g.array(qn.bias).astype(np.float32)
                n_out = b.size
                sw_full = sw if sw.size == n_out else np.full(n_out, sw[0], np.float32)
                bscale = (np.float32(sx) * sw_full).astype(np.float32)
                bq, _ = quantize_bias(b.reshape(-1), bscale, scheme.bias_overflow)
                bdq = (bq.astype(np.float64) * bscale.astype(np.float64)).astype(np.float32).reshape(b.shape)
                kb = list(node.input).index(qn.bias)
                node.input[kb] = fq_const(qn.bias, bdq, gname, f"qpipe_n{qn.index}_b", pre, mine)
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
        fq_act(raw, qn.output, qn.output, gname, f"qpipe_n{qn.index}_o", post, mine, qn.raw_output if lost else None)
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


@dataclass
class NodeSensitivity:
    """Embedding error (mean 1 - cosine to fp32) attributable to one node."""

    rank: int
    node: str
    op_type: str
    error_alone: float  # only this node quantized
    error_without: float | None  # every other node quantized, this one fp32
    gain_if_fp32: float | None  # error_all - error_without

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosine_error(ref: np.ndarray, y: np.ndarray) -> float:
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = y.reshape(len(y), -1).astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / (na * nb)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    return float(np.mean(1.0 - cos))


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If branches) read."""
    refs: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            made = {t.name for t in sg.initializer} | {i.name for i in sg.input}
            for n in sg.node:
                made.update(n.output)
            for n in sg.node:
                refs.update(i for i in [*n.input, *_subgraph_refs(n)] if i and i not in made)
    return refs


def _uses(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_refs(node))


def single_tensor_cuts(graph: onnx.GraphProto, free: set[str]) -> list[tuple[int, str]]:
    """(position, tensor) where ``tensor`` is the only value flowing past node ``position``.

    ``free``: names available everywhere (initializers, the gates). Cutting there
    splits the model into pieces that each take one tensor and give one.
    """
    last_use: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for t in _uses(n):
            last_use[t] = i
    outputs = {o.name for o in graph.output}
    live = {i.name for i in graph.input if i.name not in free}
    cuts = []
    for i, n in enumerate(graph.node):
        live.update(o for o in n.output if o and o not in free and (o in last_use or o in outputs))
        live = {t for t in live if t in outputs or last_use.get(t, -1) > i}
        if len(live) == 1 and i < len(graph.node) - 1:
            t = next(iter(live))
            if t not in outputs:
                cuts.append((i, t))
    return cuts


def _piece(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], inputs: Sequence[str], output: str) -> onnx.ModelProto:
    """A model made of ``nodes`` reading ``inputs`` (with the initializers they use) and giving ``output``."""
    refs = {t for n in nodes for t in _uses(n)}
    inits = [t for t in model.graph.initializer if t.name in refs]
    declared = {i.name: i for i in model.graph.input}
    ins = [declared.get(n) or helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs]
    g = helper.make_graph(list(nodes), "piece", ins, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


@dataclass
class _Segment:
    start: int  # first position in the gated graph
    end: int  # last position
    input: str
    output: str
    gated: Any  # session of this piece of the gated model
    plain_rest: Any | None  # session: fp32 from ``output`` to the embedding (None for the last piece)


class SimulatedModel:
    """The gated model, cut into pieces, with sessions: the embedding error of any set of int8 nodes.

    The model is cut where a single tensor flows (every block boundary of a
    MobileFaceNet or ResNet). Measuring one node quantized alone then starts
    from cached fp32 values at the cut before it, runs the gated piece(s)
    holding its switches, and finishes in the plain, fully optimised fp32 model;
    measuring all but one node starts from cached all-int8 values. That saves
    most of the runs' cost against running the whole gated model each time.
    """

    def __init__(
        self, view: onnx.ModelProto, gated: onnx.ModelProto, nodes: list[QNode], images: np.ndarray, *,
        input_name: str, output_name: str, batch: int = 32, pieces: int = 8,
    ) -> None:
        self.nodes = nodes
        self.images = images
        self.input_name = input_name
        self.output_name = output_name
        self.batch = _fixed_batch(view, input_name) or batch
        graph = gated.graph
        free = {t.name for t in graph.initializer} | {GATES}
        n_gate_nodes = sum(1 for n in graph.node if n.name.startswith(("qpipe_gather_", "qpipe_gate_")))
        free |= {o for n in list(graph.node)[:n_gate_nodes] for o in n.output}
        body = list(graph.node)[n_gate_nodes:]
        gate_defs = list(graph.node)[:n_gate_nodes]
        view_cuts = {t: p for p, t in single_tensor_cuts(view.graph, {t.name for t in view.graph.initializer})}
        cuts = [(p - n_gate_nodes, t) for p, t in single_tensor_cuts(graph, free) if t in view_cuts and p >= n_gate_nodes]
        chosen = _spread(cuts, len(body), pieces)
        # Each node's switches sit between two positions of the body.
        self.span: dict[int, tuple[int, int]] = {}
        for pos, n in enumerate(body):
            if n.op_type == "If" and n.name.startswith("qpipe_n"):
                for k in (int(i) for i in n.doc_string.split(",")):
                    lo, hi = self.span.get(k, (pos, pos))
                    self.span[k] = (min(lo, pos), max(hi, pos))
        view_body = list(view.graph.node)
        bounds = [(-1, input_name)] + chosen + [(len(body) - 1, output_name)]
        self.segments: list[_Segment] = []
        for (a, t_in), (b, t_out) in zip(bounds[:-1], bounds[1:]):
            part = body[a + 1 : b + 1]
            needed = {t for n in part for t in _uses(n)}
            gdefs = []
            for n in reversed(gate_defs):  # the switch conditions this piece reads, with what they read
                if any(o in needed for o in n.output):
                    gdefs.insert(0, n)
                    needed.update(n.input)
            gdefs_inputs = {i for n in gdefs for i in n.input}
            ins = [t_in] + ([GATES] if (GATES in needed or GATES in gdefs_inputs) else [])
            gated_piece = _session(_piece(gated, gdefs + part, ins, t_out), basic=True)
            rest = None
            if t_out != output_name:
                rest = _session(_piece(view, view_body[view_cuts[t_out] + 1 :], [t_out], output_name))
            self.segments.append(_Segment(a + 1, b, t_in, t_out, gated_piece, rest))
        self._plain = _session(view)
        self.reference = self._run_plain(images)
        self._fp32_cache = self._cut_values(np.zeros(len(nodes), np.float32))
        self._value_cache: dict[bytes, list[np.ndarray]] = {}

    def _run_plain(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self._plain.run([self.output_name], {self.input_name: b})[0] for b in _batches(x, self.batch)])

    def _run_segment(self, seg: _Segment, x: np.ndarray, gates: np.ndarray) -> np.ndarray:
        feeds_extra = {GATES: gates} if any(i.name == GATES for i in seg.gated.get_inputs()) else {}
        return np.concatenate([seg.gated.run([seg.output], {seg.input: b, **feeds_extra})[0] for b in _batches(x, self.batch)])

    def _cut_values(self, gates: np.ndarray) -> list[np.ndarray]:
        """The value at every piece's input (the model input first) with ``gates``."""
        vals = [self.images]
        x = self.images
        for seg in self.segments[:-1]:
            x = self._run_segment(seg, x, gates)
            vals.append(x)
        return vals

    def run(self, gates: np.ndarray, *, start: int = 0, cache: list[np.ndarray] | None = None, plain_after: int | None = None) -> np.ndarray:
        """Embeddings with ``gates``, from piece ``start`` (its input taken from ``cache``), optionally
        switching to the plain fp32 model after piece ``plain_after``."""
        gates = np.asarray(gates, dtype=np.float32)
        x = (cache or self._fp32_cache)[start] if start else self.images
        for j in range(start, len(self.segments)):
            seg = self.segments[j]
            x = self._run_segment(seg, x, gates)
            if plain_after is not None and j >= plain_after and seg.plain_rest is not None:
                return np.concatenate([seg.plain_rest.run([self.output_name], {seg.output: b})[0] for b in _batches(x, self.batch)])
        return x

    def _piece_of(self, pos: int) -> int:
        return next(j for j, s in enumerate(self.segments) if s.start <= pos <= s.end)

    def error(self, quantized: Iterable[int]) -> float:
        gates = np.zeros(len(self.nodes), np.float32)
        gates[list(quantized)] = 1.0
        return _cosine_error(self.reference, self.run(gates))

    def error_alone(self, k: int) -> float:
        """Only node ``k`` int8: from the fp32 values before it, back to plain fp32 after it."""
        lo, hi = self.span[k]
        gates = np.zeros(len(self.nodes), np.float32)
        gates[k] = 1.0
        y = self.run(gates, start=self._piece_of(lo), cache=self._fp32_cache, plain_after=self._piece_of(hi))
        return _cosine_error(self.reference, y)

    def _values_for(self, gates: np.ndarray) -> list[np.ndarray]:
        key = gates.tobytes()
        if key not in self._value_cache:
            if len(self._value_cache) >= 4:
                self._value_cache.pop(next(iter(self._value_cache)))
            self._value_cache[key] = self._cut_values(gates)
        return self._value_cache[key]

    def error_of(self, gates: np.ndarray, *, base: np.ndarray | None = None) -> float:
        """Error with ``gates``; given ``base`` (gates whose piece inputs are cached), only the pieces after
        the first switch that differs are run."""
        gates = np.asarray(gates, dtype=np.float32)
        if base is None:
            return _cosine_error(self.reference, self.run(gates))
        base = np.asarray(base, dtype=np.float32)
        diff = np.flatnonzero(gates != base)
        spans = [self.span[int(k)][0] for k in diff if int(k) in self.span]
        if not spans:
            return _cosine_error(self.reference, self.run(base))
        start = min(self._piece_of(p) for p in spans)
        return _cosine_error(self.reference, self.run(gates, start=start, cache=self._values_for(base)))

    def error_all_but(self, fp32: Iterable[int]) -> float:
        """Every node int8 except ``fp32``."""
        ones = np.ones(len(self.nodes), np.float32)
        gates = ones.copy()
        gates[list(fp32)] = 0.0
        return self.error_of(gates, base=ones)


def _spread(cuts: list[tuple[int, str]], length: int, pieces: int) -> list[tuple[int, str]]:
    """At most ``pieces - 1`` cuts, spread evenly over the positions."""
    if pieces <= 1 or not cuts:
        return []
    chosen: list[tuple[int, str]] = []
    for i in range(1, pieces):
        target = length * i / pieces
        best = min(cuts, key=lambda c: abs(c[0] - target))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def simulate(
    model: onnx.ModelProto,
    nodes: list[QNode],
    ranges: dict[str, tuple[float, float]],
    scheme: QuantScheme,
    images: np.ndarray,
    *,
    input_name: str,
    output_name: str,
    batch: int = 32,
    pieces: int = 8,
) -> SimulatedModel:
    """The gated copy of ``model`` (see :func:`build_gated_model`), ready to answer error questions on ``images``."""
    gm = build_gated_model(model, nodes, ranges, scheme)
    return SimulatedModel(model, gm, nodes, images, input_name=input_name, output_name=output_name, batch=batch, pieces=pieces)


def sensitivity(sim: SimulatedModel, *, both: bool = True, progress: Progress | None = None) -> tuple[list[NodeSensitivity], float]:
    """Per-node errors, ranked (largest ``error_alone`` first), and the all-quantized error."""
    progress = progress or NULL_PROGRESS
    n = len(sim.nodes)
    with progress.task("layer-wise sensitivity", total=n * (2 if both else 1) + 1, unit="runs") as t:
        err_all = sim.error(range(n))
        t.advance()
        rows = []
        for qn in sim.nodes:
            alone = sim.error_alone(qn.index)
            t.advance()
            without = None
            if both:
                without = sim.error_all_but([qn.index])
                t.advance()
            rows.append(
                NodeSensitivity(0, qn.name, qn.op_type, alone, without, None if without is None else err_all - without)
            )
    rows.sort(key=lambda r: (-r.error_alone, -(r.gain_if_fp32 or 0.0), r.node))
    for i, r in enumerate(rows, 1):
        r.rank = i
    return rows, err_all


# --- the stage ------------------------------------------------------------------------


@dataclass
class DiagnoseResult:
    fp32: Path
    int8: Path | None
    scheme: dict[str, Any]
    samples: int  # faces in the sensitivity measurement
    range_samples: int  # faces in the range measurement
    quantizable: int
    error_all: float  # simulated: every node quantized
    sensitivity: list[NodeSensitivity]
    findings: list[Finding]
    seconds: float
    report_json: Path | None = None
    report_md: Path | None = None

    @property
    def culprits(self) -> list[str]:
        """Nodes named by a high-severity finding or in the sensitivity top three, most suspect first."""
        names: list[str] = []
        for f in self.findings:
            if f.severity == "high" and f.node not in names and f.node != MODEL_WIDE:
                names.append(f.node)
        for r in self.sensitivity[:3]:
            if r.node not in names:
                names.append(r.node)
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32": str(self.fp32),
            "int8": str(self.int8) if self.int8 else None,
            "scheme": self.scheme,
            "samples": self.samples,
            "range_samples": self.range_samples,
            "quantizable_nodes": self.quantizable,
            "error_all_quantized": self.error_all,
            "culprits": self.culprits,
            "findings": [f.to_dict() for f in self.findings],
            "sensitivity": [r.to_dict() for r in self.sensitivity],
            "seconds": round(self.seconds, 3),
            "report_json": str(self.report_json) if self.report_json else None,
            "report_md": str(self.report_md) if self.report_md else None,
        }

    def summary(self, top: int = 10) -> list[str]:
        lines = [
            f"{self.quantizable} quantizable nodes; simulated all-int8 embedding error {self.error_all:.2e} (1 - cosine, {self.samples} faces)",
        ]
        for f in self.findings:
            if f.severity != "info":
                lines.append(f"{f.severity}: {f.node}: {f.kind}: {f.message}")
        lines.append("most sensitive nodes (error when only that node is int8):")
        for r in self.sensitivity[:top]:
            extra = f", gain if fp32 {r.gain_if_fp32:.2e}" if r.gain_if_fp32 is not None else ""
            lines.append(f"  {r.rank:>3}. {r.node} ({r.op_type}) {r.error_alone:.2e}{extra}")
        return lines


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


def markdown(res: DiagnoseResult) -> str:
    s = res.scheme
    out = [
        "# Quantization diagnosis",
        "",
        f"- fp32 model: `{res.fp32}`" + (f"; int8 model: `{res.int8}`" if res.int8 else ""),
        f"- simulated engine: {s['engine']}, {'per-channel' if s['per_channel'] else 'per-tensor'} int8 weights "
        f"(+-{s['weight_half_levels']} levels"
        + (f", depthwise +-{s['depthwise_half_levels']}" if s.get("depthwise_half_levels") else "")
        + f"), uint8 activations ({s['activation_levels']} levels), {s.get('calibration', 'minmax')} ranges",
        f"- ranges from {res.range_samples} calibration faces; sensitivity on {res.samples}",
        f"- {res.quantizable} quantizable nodes; embedding error with all of them int8 (simulated): {res.error_all:.2e}",
        f"- suspects: {', '.join(f'`{c}`' for c in res.culprits) or 'none'}",
        "",
        "## Findings",
        "",
    ]
    if res.findings:
        out += ["| severity | kind | node | finding | channels / nodes |", "| --- | --- | --- | --- | --- |"]
        order = {"high": 0, "warning": 1, "info": 2}
        for f in sorted(res.findings, key=lambda f: order.get(f.severity, 3)):
            where = [str(c) for c in f.channels] or [f"`{n}`" for n in f.nodes]
            ch = ", ".join(where[:12]) + (" ..." if len(where) > 12 else "")
            out.append(f"| {f.severity} | {f.kind} | `{f.node}` | {f.message} | {ch} |")
    else:
        out.append("None.")
    out += [
        "",
        "## Layer-wise sensitivity",
        "",
        "Embedding error (mean 1 - cosine to fp32) when only this node is int8, and when every node but this one is; "
        "gain = error with all int8 - error with this node left fp32.",
        "",
        "| rank | node | op | error, only this int8 | error, all but this int8 | gain if fp32 |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in res.sensitivity:
        out.append(f"| {r.rank} | `{r.node}` | {r.op_type} | {_fmt(r.error_alone)} | {_fmt(r.error_without)} | {_fmt(r.gain_if_fp32)} |")
    return "\n".join(out) + "\n"


def calibration_images(calib: str | Path, spec: "InputSpec", calibration: "CalibrationSection", input_name: str) -> np.ndarray:
    """The recipe's calibration faces, preprocessed (the same seeded choice the engines calibrate on)."""
    from pipeline.data.bins import CalibrationData, open_images

    source = open_images(calib)
    data = CalibrationData(source, spec, samples=calibration.samples, seed=calibration.seed, batch_size=64, flip=False, input_name=input_name)
    return np.concatenate(list(data.arrays()))


@dataclass
class Analysis:
    """A model as the engine sees it, its activation ranges and static findings; the simulation on demand."""

    view: onnx.ModelProto
    nodes: list[QNode]
    stats: dict[str, TensorStats]
    ranges: dict[str, tuple[float, float]]  # what the engine quantizes each tensor with
    scheme: QuantScheme
    images: np.ndarray
    input_name: str
    output_name: str
    findings: list[Finding]
    _sims: dict[int, SimulatedModel] = field(default_factory=dict, repr=False)

    def simulator(self, samples: int) -> SimulatedModel:
        if samples not in self._sims:
            self._sims[samples] = simulate(
                self.view, self.nodes, self.ranges, self.scheme, self.images[:samples], input_name=self.input_name, output_name=self.output_name
            )
        return self._sims[samples]

    def index(self, names: Iterable[str]) -> list[int]:
        pos = {qn.name: qn.index for qn in self.nodes}
        return [pos[n] for n in names if n in pos]


def analyse(
    model: onnx.ModelProto, images: np.ndarray, scheme: QuantScheme, *, input_name: str, output_name: str, progress: Progress | None = None
) -> Analysis:
    """Engine view, quantizable nodes, activation ranges on ``images`` and the static findings of ``model``."""
    view = engine_view(model)
    nodes = quantizable_nodes(view)
    if not nodes:
        raise UserError("the model has no node the engines quantize (Conv, Gemm, MatMul, Add/Mul of two activations)")
    tensors = [t for qn in nodes for t in (*qn.activations, qn.output)]
    percentile = scheme.engine if scheme.calibration == "percentile" else None
    stats = activation_stats(view, images, tensors, input_name=input_name, percentile=percentile, progress=progress)
    g = _Graph.of(view)
    ranges = calibrated_ranges(nodes, g, stats, scheme)
    findings = weight_findings(g, nodes, ranges, scheme) + activation_findings(nodes, stats, scheme) + engine_findings(nodes, g, scheme)
    return Analysis(view, nodes, stats, ranges, scheme, images, input_name, output_name, findings)


def int8_node_name(name: str, fp32_names: set[str]) -> str:
    """The fp32 node an engine's int8 node came from (INC appends ``_quant``)."""
    for suffix in ("_quant", "_QuantizeLinear", "_DequantizeLinear"):
        if name.endswith(suffix) and name[: -len(suffix)] in fp32_names:
            return name[: -len(suffix)]
    return name


def write_report(res: DiagnoseResult, report_dir: str | Path) -> DiagnoseResult:
    d = Path(report_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"report directory is a file: {d}")
    res.report_json = d / "diagnose.json"
    res.report_md = d / "diagnose.md"
    atomic_write_json(res.report_json, res.to_dict())
    atomic_write_text(res.report_md, markdown(res))
    return res


def diagnose(
    fp32: str | Path,
    *,
    calib: str | Path | None,
    input_spec: "InputSpec",
    calibration: "CalibrationSection",
    quantization: "QuantizationSection",
    int8: str | Path | None = None,
    samples: int | None = None,
    both: bool = True,
    report_dir: str | Path | None = None,
    images: np.ndarray | None = None,
    progress: Progress | None = None,
) -> DiagnoseResult:
    """Layer-wise sensitivity and static findings for quantizing ``fp32`` as the recipe would.

    Args:
        fp32: the converted fp32 model.
        calib: calibration faces (``.bin`` or folder): the recipe's seeded choice of
            ``calibration.samples`` faces sets the activation ranges.
        input_spec, calibration, quantization: recipe sections; ``quantization`` picks the
            simulated engine's conventions (engine, per_channel, reduce_range).
        int8: an int8 model to inspect for zero/non-finite scales and saturated biases.
        samples: faces the sensitivity is measured on (the first of the calibration
            choice); default ``quantization.recovery.sensitivity_samples``.
        both: also measure each node left fp32 with all others int8 (doubles the runs).
        report_dir: write ``diagnose.json`` and ``diagnose.md`` there.
        images: preprocessed calibration images (NCHW float32) instead of reading ``calib``.
        progress: progress reporting.
    """
    from pipeline.runtime import graph as onnxutil

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    fp32 = require_file(fp32, "fp32 model")
    source = onnxutil.load_model(fp32, "fp32 model")
    inp = onnxutil.find_input(source, input_spec.name)
    outp = onnxutil.find_output(source, input_spec.output)
    n_sens = samples if samples is not None else quantization.recovery.sensitivity_samples
    if n_sens <= 0:
        raise UserError(f"diagnose: sensitivity samples must be positive, got {n_sens}")
    int8_proto = None
    int8_path = None
    if int8 is not None:
        int8_path = require_file(int8, "int8 model")
        int8_proto = onnxutil.load_model(int8_path, "int8 model")
    if images is None:
        if calib is None:
            raise UserError("diagnose needs calibration faces: --calib FILE.bin or an image folder")
        images = calibration_images(calib, input_spec, calibration, inp.name)
    scheme = QuantScheme.from_section(quantization)
    an = analyse(source, images, scheme, input_name=inp.name, output_name=outp.name, progress=progress)
    findings = list(an.findings)
    if int8_proto is not None:
        names = {qn.name for qn in an.nodes} | {n.name for n in source.graph.node}
        for f in int8_findings(int8_proto):
            f.node = int8_node_name(f.node, names)
            findings.append(f)
    rows, err_all = sensitivity(an.simulator(n_sens), both=both, progress=progress)
    res = DiagnoseResult(
        fp32=fp32, int8=int8_path, scheme=scheme.to_dict(), samples=min(n_sens, len(images)), range_samples=len(images),
        quantizable=len(an.nodes), error_all=err_all, sensitivity=rows, findings=findings, seconds=time.perf_counter() - t0,
    )
    return write_report(res, report_dir) if report_dir is not None else res
