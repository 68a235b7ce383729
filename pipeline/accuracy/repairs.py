"""Which repairs the findings call for, each kept only if the fp32 model still computes the same embeddings.

Model rewrites (:mod:`pipeline.accuracy.rewrites`): cross-layer equalisation
where a few outlier channels set an activation's range (also across the Add a
rewritten PRelu becomes: the tensors inside such a pair are rescaled with it,
so their own findings count as repaired when that balances them too), zeroed
weights where a near-dead channel overflows the int32 bias. Engine settings,
which the caller keeps only if they add accuracy: per-channel weights when
per-channel weight ranges differ by orders of magnitude under one scale per
tensor, 8-bit activations when INC's reduce_range loses Clip bounds,
percentile calibration when outlier ranges remain that no pair absorbs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import onnx

from pipeline.accuracy.findings import ACTIVATION_RANGE_RATIO, Finding
from pipeline.accuracy.ranges import TensorStats
from pipeline.accuracy.rewrites import LinearPair, equalize_pair, find_linear_pair, range_ratio, zero_channels
from pipeline.core.errors import UserError
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.eval.protocol import cosine_rows
from pipeline.runtime.session import OnnxModel

if TYPE_CHECKING:
    from pipeline.recipe import QuantizationSection
    from pipeline.stages.quantize.scheme import QuantScheme

# Rows per forward pass of the equivalence check (a model with a fixed batch gets its own).
CHECK_BATCH = 16


@dataclass
class Repair:
    """A function-preserving rewrite of the fp32 model, or a change of engine setting."""

    kind: str  # equalize | near_dead_channels | per_channel | reduce_range | calibration_method
    nodes: list[str]
    detail: str
    setting: dict[str, Any] = field(default_factory=dict)  # recipe keys it changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def equivalence_check(
    original: onnx.ModelProto, images: np.ndarray, *, input_name: str, output_name: str
) -> Callable[[onnx.ModelProto], float]:
    """A function giving the worst embedding cosine of a rewritten model against ``original`` on ``images``."""

    def embed(model: onnx.ModelProto) -> np.ndarray:
        runner = OnnxModel(model, input_name=input_name, output_name=output_name, nchw=False, what="repaired fp32 model")
        return runner.run(images, CHECK_BATCH)

    reference = embed(original)

    def check(model: onnx.ModelProto) -> float:
        c = cosine_rows(reference, embed(model))
        return float(np.min(np.where(np.isfinite(c), c, -1.0)))

    return check


def plan_repairs(
    model: onnx.ModelProto,
    findings: Sequence[Finding],
    stats: dict[str, TensorStats],
    scheme: "QuantScheme",
    quantization: "QuantizationSection",
    *,
    check: Callable[[onnx.ModelProto], float],
    min_cosine: float,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, list[Repair], list[str]]:
    """Apply the repairs the findings call for, each kept only if the function stays the same.

    ``check(model)`` returns the worst embedding cosine of ``model`` against the
    original on calibration faces (:func:`equivalence_check`). Returns (repaired
    model, repairs, notes).
    """
    progress = progress or NULL_PROGRESS
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    repairs: list[Repair] = []
    notes: list[str] = []
    unrepaired_outliers: list[Finding] = []
    equalised: list[tuple[LinearPair, np.ndarray]] = []
    unpaired: list[Finding] = []

    for f in findings:
        if f.kind != "activation_outliers" or f.severity != "high" or f.tensor is None:
            continue
        pair = find_linear_pair(repaired, f.tensor)
        st = stats.get(f.tensor)
        if pair is None or st is None or st.ch_hi is None or st.ch_lo is None:
            unpaired.append(f)
            continue
        trial = onnx.ModelProto()
        trial.CopyFrom(repaired)
        act_range = np.maximum(st.ch_hi, 0) - np.minimum(st.ch_lo, 0)
        try:
            s = equalize_pair(trial, pair, act_range)
        except UserError as e:
            unrepaired_outliers.append(f)
            notes.append(str(e))
            continue
        worst = check(trial)
        if worst < min_cosine:
            unrepaired_outliers.append(f)
            notes.append(f"equalising {pair.label} changed the embeddings (worst cosine {worst:.7f}); not used")
            continue
        repaired = trial
        equalised.append((pair, s))
        new_ratio = range_ratio(act_range / s)
        repairs.append(
            Repair(
                "equalize", pair.nodes,
                f"cross-layer equalisation of {pair.label} through {f.tensor}: its range was {f.value:.0f}x the "
                f"median channel's (channels {', '.join(map(str, f.channels[:8]))}{' ...' if len(f.channels) > 8 else ''}), now "
                f"{new_ratio:.1f}x; channel scales {s.min():.3g} .. {s.max():.3g}; worst embedding cosine {worst:.7f}",
            )
        )
        progress.log(f"repaired: equalised {pair.label}")

    for f in unpaired:
        # A tensor inside an equalised pair (a branch of a rewritten PRelu's Add) had its channels scaled with it.
        assert f.tensor is not None
        st = stats.get(f.tensor)
        inside = next(((p, s) for p, s in equalised if f.tensor in p.scaled), None)
        if inside is not None and st is not None and st.ch_hi is not None and st.ch_lo is not None:
            pair, s = inside
            ratio = range_ratio((np.maximum(st.ch_hi, 0) - np.minimum(st.ch_lo, 0)) / s)
            if ratio < ACTIVATION_RANGE_RATIO:
                notes.append(f"{f.tensor}: outlier channels rescaled with the equalisation of {pair.label} (range now {ratio:.1f}x the median channel's)")
                continue
            unrepaired_outliers.append(f)
            notes.append(f"{f.tensor}: still {ratio:.0f}x the median channel's range after equalising {pair.label}")
            continue
        unrepaired_outliers.append(f)
        notes.append(f"{f.tensor}: outlier channels but no linear pair to equalise across (it feeds more than one conv, or a non-linearity)")

    overflow = [f for f in findings if f.kind == "bias_overflow"]
    if overflow:
        trial = onnx.ModelProto()
        trial.CopyFrom(repaired)
        for f in overflow:
            zero_channels(trial, f.node, f.channels)
        worst = check(trial)
        if worst >= min_cosine:
            repaired = trial
            repairs.append(
                Repair(
                    "near_dead_channels", [f.node for f in overflow],
                    "zeroed the near-zero weights of channels whose int32 bias overflowed ("
                    + "; ".join(f"{f.node}: {', '.join(map(str, f.channels[:8]))}" for f in overflow)
                    + f"): the engine gives them its placeholder scale and keeps their bias; worst embedding cosine {worst:.7f}",
                )
            )
        else:
            notes.append(f"zeroing near-dead channels changed the embeddings (worst cosine {worst:.7f}); not used")

    weight_range = [f for f in findings if f.kind == "weight_range" and f.severity == "high"]
    if weight_range and not scheme.per_channel:
        repairs.append(
            Repair(
                "per_channel", [f.node for f in weight_range],
                "per-channel weight scales: per-channel weight ranges differ by up to "
                f"{max(f.value or 0 for f in weight_range):.0f}x in {len(weight_range)} node(s)",
                {"quantization.per_channel": True},
            )
        )
    clip = [f for f in findings if f.kind == "clip_bound_lost"]
    if clip and quantization.reduce_range:
        repairs.append(
            Repair(
                "reduce_range", clip[0].nodes,
                f"8-bit activations (quantization.reduce_range: false): with reduce_range INC quantizes activations to 127 "
                f"levels and its fused Clip in {len(clip[0].nodes)} convs keeps only the uint8 clamp at 255, so Clip(0, 6) "
                "passed values up to about 12. Weights become 8-bit too; onnxruntime's u8s8 kernels on CPUs without VNNI "
                "can saturate, which the evaluation on this machine includes",
                {"quantization.reduce_range": False},
            )
        )
    if unrepaired_outliers and quantization.calibration_method == "minmax":
        repairs.append(
            Repair(
                "calibration_method", [f.node for f in unrepaired_outliers],
                "percentile calibration: outlier activation ranges that no linear pair absorbs",
                {"quantization.calibration_method": "percentile"},
            )
        )
    return repaired, repairs, notes
