"""Activation ranges: what the calibration faces make each tensor span, and the range the engine quantizes it with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from pipeline.accuracy.engine_graph import GraphIndex, QNode, clip_bounds, fused_clip
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.runtime.session import OnnxModel

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec
    from pipeline.stages.quantize.scheme import QuantScheme

PERCENTILE = 99.999  # both engines' default
PERCENTILE_BINS = 2048


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


def calibration_images(calib: str | Path, spec: "InputSpec", calibration: "CalibrationSection", input_name: str) -> np.ndarray:
    """The recipe's calibration faces, preprocessed (the same seeded choice the engines calibrate on)."""
    from pipeline.data.bins import open_images
    from pipeline.data.calibration import CalibrationData

    source = open_images(calib)
    data = CalibrationData(source, spec, samples=calibration.samples, seed=calibration.seed, batch_size=64, flip=False, input_name=input_name)
    return np.concatenate(list(data.arrays()))


def outputs_in_batches(model: OnnxModel, names: list[str], x: np.ndarray, batch: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(rows, the ``names`` outputs for those rows) per forward pass, in batches the model accepts.

    The range probe reads many tensors at once (:meth:`OnnxModel.batches`: a fixed batch is
    filled with zero rows, whose values are dropped before they reach a range), as float32.
    """
    for k, outs in model.batches(x, batch, names=names):
        yield k, [np.asarray(v, dtype=np.float32) for v in outs]


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
    runner = OnnxModel(probe, input_name=input_name, output_name=names[0], nchw=False, what="model prepared for diagnosis")
    stats = {n: TensorStats(n, math.inf, -math.inf, None, None) for n in names}
    with progress.task("measuring activation ranges", total=len(images), unit="img") as t:
        for k, outs in outputs_in_batches(runner, names, images, batch):
            for n, v in zip(names, outs):
                stats[n].update(v)
            t.advance(k)
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
        for k, outs in outputs_in_batches(runner, names, images, batch):
            for n, v in zip(names, outs):
                v = v.reshape(-1)
                hists[n] += np.histogram(np.abs(v) if percentile == "ort" else v, bins=edges[n])[0]
            t.advance(k)
    cut = (100.0 - PERCENTILE) / 200.0
    for n, st in stats.items():
        hist, e = hists[n], edges[n]
        cdf = np.cumsum(hist / max(hist.sum(), 1))
        p_lo = float(e[np.searchsorted(cdf, cut)])
        p_hi = float(e[min(np.searchsorted(cdf, 1.0 - cut), len(e) - 1)])
        st.p_lo, st.p_hi = max(p_lo, st.lo), min(p_hi, st.hi)
    return stats


def calibrated_range(qn_by_output: dict[str, QNode], g: GraphIndex, st: TensorStats, scheme: "QuantScheme") -> tuple[float, float]:
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
            clip = fused_clip(g, qn)
            bounds = [b for b in clip_bounds(clip, g) if b is not None] if clip is not None else []
            if bounds:
                lo, hi = min([lo, *bounds]), max([hi, *bounds])
    return lo, hi


def calibrated_ranges(
    nodes: Sequence[QNode], g: GraphIndex, stats: dict[str, TensorStats], scheme: "QuantScheme"
) -> dict[str, tuple[float, float]]:
    """:func:`calibrated_range` of every measured tensor."""
    by_output = {qn.output: qn for qn in nodes}
    return {name: calibrated_range(by_output, g, st, scheme) for name, st in stats.items()}
