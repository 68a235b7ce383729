"""Accuracy recovery: when int8 misses the target, repair the cause, then fall back nodes to fp32.

The order follows the cost to the user. First the int8 model the recipe asks
for is scored on an evaluation subset (whole folds of the verification pairs,
the insightface protocol). If it misses the target the model is diagnosed
(:mod:`pipeline.accuracy.diagnose`) and root causes are repaired where the function
stays the same and the engine allows:

* **cross-layer equalisation** (Nagel et al., *Data-Free Quantization*, 2019):
  where an activation's uint8 range is set by a few outlier channels and the
  tensor runs through a linear pair ``Conv A -> [BatchNormalization] ->
  [Relu/PRelu] -> Conv B`` and nowhere else, channel ``c`` of A (weights,
  bias, BatchNormalization mean and beta) is divided by ``s_c`` and B's input
  channel ``c`` multiplied by it, with ``s_c = sqrt(r_act_c / r_B_c)``, which
  leaves the activation and B's weight columns the same range
  ``sqrt(r_act_c * r_B_c)``;
* **near-dead channels**: output channels whose weights are so small that the
  int32 bias overflows at scale ``x_scale * w_scale`` are zeroed exactly, so the
  engine gives them its placeholder scale and keeps their bias;
* engine settings, kept only if they add accuracy: **per-channel weights** when
  per-channel weight ranges differ by orders of magnitude under one scale per
  tensor, **8-bit activations** when INC's reduce_range loses Clip bounds, and
  **percentile calibration** when outlier ranges remain that no pair absorbs.

Every rewrite is checked: the repaired fp32 model must give the same
embeddings as the original (cosine >= ``convert.min_cosine`` on calibration
faces). Then, if still needed, nodes go back to fp32 greedily
(``quantization.nodes_to_exclude``), steered by the diagnosis's simulation
(see :func:`_fallback`). A candidate that meets the target on the subset is
re-checked on the pairs the verify gate uses (``recovery.confirm``): a
1,200-pair subset cannot certify a 0.1-point target on its own. Recovery stops
at the first candidate within the target; the result names what was repaired,
which nodes stayed fp32, each attempt's accuracy, the latency cost, and the
recipe keys that reproduce the int8 model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.accuracy import diagnose as D
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, atomic_write_json, atomic_write_text, require_file
from pipeline.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from pipeline.stages.quantize.stage import QuantizeResult
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection, Recipe

# Activations that commute with a positive per-channel scale: f(x / s) = f(x) / s.
HOMOGENEOUS = {"Relu", "PRelu", "LeakyRelu"}


# --- cross-layer equalisation -----------------------------------------------------------


@dataclass
class LinearPair:
    """``first`` (Conv) -> [BatchNormalization] -> [homogeneous activation] -> ``second`` (Conv).

    ``tensor`` is the value entering ``second``: the activation being equalised.
    """

    first: str
    second: str
    tensor: str
    batchnorm: str | None = None
    activation: str | None = None


def _initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def find_linear_pair(model: onnx.ModelProto, tensor: str) -> LinearPair | None:
    """The linear pair that ``tensor`` sits inside, or None when rescaling its channels would change the function."""
    g = D._Graph.of(model)
    inits = g.inits

    def sole_consumer(t: str) -> onnx.NodeProto | None:
        users = g.consumers.get(t, [])
        return users[0] if len(users) == 1 and t not in g.outputs else None

    second = sole_consumer(tensor)
    if second is None or second.op_type != "Conv" or second.input[0] != tensor or second.input[1] not in inits:
        return None
    node = g.producer.get(tensor)
    activation = batchnorm = None
    if node is not None and node.op_type in HOMOGENEOUS:
        if node.op_type == "PRelu" and node.input[1] not in inits:
            return None
        activation = node.name
        if sole_consumer(node.input[0]) is None:
            return None
        node = g.producer.get(node.input[0])
    if node is not None and node.op_type == "BatchNormalization":
        if len(node.output) > 1 and any(node.output[1:]) or any(i not in inits for i in node.input[1:5]):
            return None
        batchnorm = node.name
        if sole_consumer(node.input[0]) is None:
            return None
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Conv" or node.input[1] not in inits:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return None
    return LinearPair(node.name, second.name, tensor, batchnorm, activation)


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
    first, second = _node(model, pair.first), _node(model, pair.second)
    w1 = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
    w2 = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
    channels = w1.shape[0]
    groups = _group(second)
    per_group = w2.shape[1]
    if per_group * groups != channels or act_range.shape[0] != channels:
        raise UserError(f"cannot equalise {pair.first} -> {pair.second}: {channels} channels do not match {second.name}'s input")
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

    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    _set(inits, first.input[1], w1 / s.reshape(shape1))
    if len(first.input) > 2 and first.input[2]:
        _set(inits, first.input[2], numpy_helper.to_array(inits[first.input[2]]) / s)
    if pair.batchnorm:
        bn = _node(model, pair.batchnorm)
        # y = gamma (x - mean) / sqrt(var + eps) + beta: x / s and y / s need mean / s and beta / s.
        _set(inits, bn.input[2], numpy_helper.to_array(inits[bn.input[2]]) / s)
        _set(inits, bn.input[3], numpy_helper.to_array(inits[bn.input[3]]) / s)
    if pair.activation:
        act = _node(model, pair.activation)
        if act.op_type == "PRelu":
            slope = numpy_helper.to_array(inits[act.input[1]])
            if slope.size not in (1, channels):
                raise UserError(f"cannot equalise through {act.name}: PRelu slope of shape {slope.shape}")
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


# --- evaluation on the subset ---------------------------------------------------------------


def subset_pairs(num_pairs: int, eval_pairs: int, folds: int) -> int:
    """``eval_pairs`` rounded up to whole folds of the full set (LFW: 600 pairs, 300 same + 300 different)."""
    if eval_pairs <= 0:
        raise UserError(f"quantization.recovery.eval_pairs must be positive, got {eval_pairs}")
    fold = num_pairs // folds
    if fold == 0:
        return num_pairs
    return min(num_pairs, math.ceil(eval_pairs / fold) * fold)


class Evaluator:
    """fp32 vs candidate accuracy (insightface protocol) on the first ``pairs`` pairs, and on the first
    ``confirm_pairs`` (the verify gate's set) for candidates that pass there.

    A subset of 1,200 pairs screens candidates cheaply but cannot certify a 0.1-point target: one pair
    is 0.08 points, and a handful of pairs decided differently by the two models moves the figure by
    more than the target. The fp32 embeddings are computed once, for the larger set.
    """

    def __init__(
        self, fp32: Path, pairs_bin: Any, spec: "InputSpec", *, pairs: int, confirm_pairs: int | None = None, folds: int = 10,
        flip: bool = True, batch: int = 16, threads: int | None = None, cache_dir: Path | None = None, progress: Progress | None = None,
    ) -> None:
        from pipeline.eval import protocol as metrics
        from pipeline.stages.verify import embed_pairs

        self.bin = pairs_bin
        self.spec = spec
        self.pairs = pairs
        self.confirm_pairs = confirm_pairs if confirm_pairs is not None and confirm_pairs > pairs else None
        self.folds = folds
        self.flip = flip
        self.batch = batch
        self.threads = threads
        self.progress = progress or NULL_PROGRESS
        if pairs < folds:
            raise UserError(f"recovery needs at least {folds} verification pairs to score accuracy; {pairs_bin.path} has {pairs}")
        n = self.confirm_pairs or pairs
        # The verify stage's cache key (same model, data, preprocessing, flip and pairs): verify reuses these.
        self.fp32_emb = embed_pairs(
            fp32, pairs_bin, input_spec=spec, flip=flip, batch=batch, pairs=n, threads=threads, cache_dir=cache_dir, progress=self.progress
        )
        self.fp32 = metrics.evaluate(self.fp32_emb[0 : 2 * pairs : 2], self.fp32_emb[1 : 2 * pairs : 2], pairs_bin.issame[:pairs], folds=folds)
        self.fp32_confirm = (
            metrics.evaluate(self.fp32_emb[0::2], self.fp32_emb[1::2], pairs_bin.issame[:n], folds=folds) if self.confirm_pairs else None
        )
        self._last: tuple[Path, np.ndarray] | None = None  # the last subset embeddings, for a confirmation


    def _embed(self, model: Path, start: int, stop: int) -> np.ndarray:
        from pipeline.stages.verify import embed_pairs

        view = self.bin if start == 0 else _PairsFrom(self.bin, start)
        return embed_pairs(
            model, view, input_spec=self.spec, flip=self.flip, batch=self.batch, pairs=stop - start, threads=self.threads,
            progress=self.progress,
        )

    def score(self, model: Path, *, confirm: bool = False) -> dict[str, Any]:
        """Accuracy, drop and embedding cosine to fp32 on the subset (or, with ``confirm``, the gate's set)."""
        from pipeline.eval import protocol as metrics

        n = self.confirm_pairs if confirm and self.confirm_pairs else self.pairs
        ref = self.fp32_confirm if confirm and self.confirm_pairs else self.fp32
        if confirm and self._last is not None and self._last[0] == model:
            # The subset is the gate set's first folds: only the rest is embedded again.
            emb = np.concatenate([self._last[1], self._embed(model, self.pairs, n)])
        else:
            emb = self._embed(model, 0, n)
        self._last = (model, emb[: 2 * self.pairs]) if not confirm else None
        m = metrics.evaluate(emb[0::2], emb[1::2], self.bin.issame[:n], folds=self.folds)
        cos = np.sum(emb * self.fp32_emb[: 2 * n], axis=1)  # both L2-normalised
        cos = np.where(np.isfinite(cos), cos, -1.0)
        return {
            "pairs": n,
            "accuracy": float(m.accuracy),
            "accuracy_std": float(m.accuracy_std),
            "drop": float(ref.accuracy - m.accuracy),
            "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(np.min(cos)),
        }


class _PairsFrom:
    """The pairs of a verification set from pair ``start`` on, for :func:`pipeline.stages.verify.embed_pairs` (no cache)."""

    def __init__(self, pairs_bin: Any, start: int) -> None:
        self._bin = pairs_bin
        self._offset = 2 * start
        self.num_pairs = pairs_bin.num_pairs - start
        self.num_images = 2 * self.num_pairs
        self.path = pairs_bin.path

    def decode_many(self, idx: Sequence[int]) -> np.ndarray:
        return self._bin.decode_many([int(i) + self._offset for i in idx])


# --- results ------------------------------------------------------------------------------


@dataclass
class Repair:
    """A function-preserving rewrite of the fp32 model, or a change of engine setting."""

    kind: str  # equalize | near_dead_channels | per_channel | calibration_method
    nodes: list[str]
    detail: str
    setting: dict[str, Any] = field(default_factory=dict)  # recipe keys it changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Attempt:
    """One int8 candidate and its score on the evaluation subset."""

    label: str
    nodes_fp32: list[str]
    repairs: list[str]
    settings: dict[str, Any]
    accuracy: float
    accuracy_std: float
    drop: float
    within_target: bool
    cosine_mean: float
    cosine_min: float
    simulated_error: float | None
    seconds: float
    # On the verify gate's pairs, for a candidate that met the target on the subset.
    confirm_pairs: int | None = None
    confirm_accuracy: float | None = None
    confirm_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoverResult:
    """What recovery did. Accuracies in percent on the evaluation subset; drops in points."""

    output: Path
    target: float
    eval_pairs: int
    total_pairs: int
    fp32_accuracy: float
    within_target: bool
    attempts: list[Attempt]
    final: Attempt
    repairs: list[Repair]
    nodes_fp32: list[str]
    recipe_changes: dict[str, Any]
    diagnosis: dict[str, Any] | None
    speed: dict[str, Any] | None
    repaired_model: Path | None
    quantize: "QuantizeResult"
    seconds: float
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    report_json: Path | None = None
    report_md: Path | None = None

    @property
    def baseline(self) -> Attempt:
        return self.attempts[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target_max_accuracy_drop": self.target,
            "eval_pairs": self.eval_pairs,
            "total_pairs": self.total_pairs,
            "fp32_accuracy": self.fp32_accuracy,
            "within_target": self.within_target,
            "baseline": self.baseline.to_dict(),
            "final": self.final.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "repairs": [r.to_dict() for r in self.repairs],
            "nodes_fp32": list(self.nodes_fp32),
            "recipe_changes": self.recipe_changes,
            "diagnosis": self.diagnosis,
            "speed": self.speed,
            "repaired_model": str(self.repaired_model) if self.repaired_model else None,
            "quantize": {k: v for k, v in self.quantize.to_dict().items() if k != "recovery"},
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "report_json": str(self.report_json) if self.report_json else None,
            "report_md": str(self.report_md) if self.report_md else None,
        }

    def summary(self) -> list[str]:
        b, f = self.baseline, self.final
        lines = [
            f"recovery on {self.eval_pairs} of {self.total_pairs} pairs: fp32 {self.fp32_accuracy:.2f}, "
            f"int8 {b.accuracy:.2f} (drop {b.drop:+.2f}) -> {f.accuracy:.2f} (drop {f.drop:+.2f}); target <= {self.target:g} points: "
            + ("met" if self.within_target else "NOT met"),
        ]
        if f.confirm_drop is not None:
            lines.append(f"on the gate's {f.confirm_pairs} pairs: int8 {f.confirm_accuracy:.2f} (drop {f.confirm_drop:+.2f})")
        for r in self.repairs:
            lines.append(f"repaired: {r.kind}: {r.detail}")
        lines.append(f"left in fp32: {', '.join(self.nodes_fp32) if self.nodes_fp32 else 'none'}")
        if self.speed:
            s = self.speed
            lines.append(
                f"speed: int8 {s['final_speedup']:.2f}x fp32 after recovery"
                + (f" (recipe's int8 {s['baseline_speedup']:.2f}x)" if s.get("baseline_speedup") is not None else "")
                + (f"; cost: {s['cost']}" if s.get("cost") else "")
            )
        if self.diagnosis:
            lines.append(f"diagnosis: suspects {', '.join(self.diagnosis.get('culprits', [])[:5])}")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def markdown(res: RecoverResult) -> str:
    out = [
        "# Accuracy recovery",
        "",
        f"- target: int8 within {res.target:g} points of fp32 on the evaluation subset "
        f"({res.eval_pairs} of {res.total_pairs} pairs, whole folds, insightface protocol)",
        f"- fp32 accuracy on the subset: {res.fp32_accuracy:.2f}",
        f"- result: {'within target' if res.within_target else 'target NOT reached (best attempt kept)'}: "
        f"int8 {res.final.accuracy:.2f} (drop {res.final.drop:+.2f}) on the subset"
        + (
            f", {res.final.confirm_accuracy:.2f} (drop {res.final.confirm_drop:+.2f}) on the gate's {res.final.confirm_pairs} pairs"
            if res.final.confirm_drop is not None else ""
        )
        + f"; written to `{res.output}`",
        f"- left in fp32: {', '.join(f'`{n}`' for n in res.nodes_fp32) or 'none'}",
        "",
        "## Repairs",
        "",
    ]
    out += [f"- **{r.kind}** ({', '.join(f'`{n}`' for n in r.nodes)}): {r.detail}" for r in res.repairs] or ["None."]
    out += [
        "", "## Attempts", "",
        f"Accuracy and drop on the {res.eval_pairs}-pair subset; a candidate within the target there is re-checked on the "
        "verify gate's pairs (last column) before recovery stops. Simulated error: 1 - cosine to fp32 predicted by the diagnosis.",
        "",
        "| # | attempt | fp32 nodes | accuracy | drop | cosine mean / min | simulated error | within | s | on the gate's pairs |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for i, a in enumerate(res.attempts):
        sim = "" if a.simulated_error is None else f"{a.simulated_error:.2e}"
        gate = "" if a.confirm_drop is None else f"{a.confirm_accuracy:.2f} (drop {a.confirm_drop:+.2f}, {a.confirm_pairs} pairs)"
        out.append(
            f"| {i} | {a.label} | {len(a.nodes_fp32)} | {a.accuracy:.2f} +- {a.accuracy_std:.2f} | {a.drop:+.2f} | "
            f"{a.cosine_mean:.5f} / {a.cosine_min:.4f} | {sim} | {'yes' if a.within_target else 'no'} | {a.seconds:.0f} | {gate} |"
        )
    if res.speed:
        s = res.speed
        out += ["", "## Speed", "", f"Batch-1 latency, interleaved rounds, {s.get('threads')} threads:", ""]
        out.append(f"- after recovery: fp32 {s['fp32_ms']:.2f} ms, int8 {s['final_ms']:.2f} ms: **{s['final_speedup']:.2f}x**")
        if s.get("baseline_speedup") is not None:
            out.append(f"- the recipe's int8 (no recovery): {s['baseline_ms']:.2f} ms: {s['baseline_speedup']:.2f}x")
        if s.get("cost"):
            out.append(f"- speed cost of recovery: {s['cost']}")
        if s.get("note"):
            out.append(f"- {s['note']}")
    if res.recipe_changes:
        on = f"the repaired fp32 model `{res.repaired_model}`" if res.repaired_model else "your fp32 model"
        out += ["", "## Recipe keys of the result", "", f"Quantizing {on} with these settings gives this int8 model:", "",
                "```json", json.dumps(res.recipe_changes, indent=2), "```"]
    if res.timings:
        out += ["", "## Time", "", f"{res.seconds:.0f} s in all: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in res.timings.items())]
    if res.diagnosis:
        out += ["", "## Diagnosis of the recipe's int8", ""]
        out += [f"- suspects: {', '.join(f'`{c}`' for c in res.diagnosis.get('culprits', []))}"]
        for f in res.diagnosis.get("findings", []):
            if f["severity"] != "info":
                out.append(f"- {f['severity']}: `{f['node']}` {f['kind']}: {f['message']}")
        out += ["", "| rank | node | op | error, only this int8 |", "| ---: | --- | --- | ---: |"]
        for r in res.diagnosis.get("sensitivity", [])[:15]:
            out.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {r['error_alone']:.2e} |")
    if res.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in res.warnings]
    return "\n".join(out) + "\n"


# --- the stage ------------------------------------------------------------------------------


def _cosine_check(original: onnx.ModelProto, repaired: onnx.ModelProto, images: np.ndarray, input_name: str, output_name: str) -> float:
    from pipeline.runtime.graph import cosine_rows

    a = np.concatenate([D._session(original).run([output_name], {input_name: x})[0] for x in D._batches(images, 16)])
    b = np.concatenate([D._session(repaired).run([output_name], {input_name: x})[0] for x in D._batches(images, 16)])
    c = cosine_rows(a, b)
    return float(np.min(np.where(np.isfinite(c), c, -1.0)))


def plan_repairs(
    model: onnx.ModelProto,
    findings: Sequence[D.Finding],
    stats: dict[str, D.TensorStats],
    scheme: D.QuantScheme,
    quantization: "QuantizationSection",
    *,
    check: Callable[[onnx.ModelProto], float],
    min_cosine: float,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, list[Repair], list[str]]:
    """Apply the repairs the findings call for, each kept only if the function stays the same.

    ``check(model)`` returns the worst embedding cosine of ``model`` against the
    original on calibration faces. Returns (repaired model, repairs, notes).
    """
    progress = progress or NULL_PROGRESS
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    repairs: list[Repair] = []
    notes: list[str] = []
    unrepaired_outliers: list[D.Finding] = []

    for f in findings:
        if f.kind != "activation_outliers" or f.severity != "high" or f.tensor is None:
            continue
        pair = find_linear_pair(repaired, f.tensor)
        st = stats.get(f.tensor)
        if pair is None or st is None or st.ch_hi is None or st.ch_lo is None:
            unrepaired_outliers.append(f)
            notes.append(f"{f.tensor}: outlier channels but no linear pair to equalise across (it feeds more than one conv, or a non-linearity)")
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
            notes.append(f"equalising {pair.first} -> {pair.second} changed the embeddings (worst cosine {worst:.7f}); not used")
            continue
        repaired = trial
        new_ratio = _range_ratio(act_range / s)
        repairs.append(
            Repair(
                "equalize", [pair.first, pair.second],
                f"cross-layer equalisation of {pair.first} -> {pair.second} through {f.tensor}: its range was {f.value:.0f}x the "
                f"median channel's (channels {', '.join(map(str, f.channels[:8]))}{' ...' if len(f.channels) > 8 else ''}), now "
                f"{new_ratio:.1f}x; channel scales {s.min():.3g} .. {s.max():.3g}; worst embedding cosine {worst:.7f}",
            )
        )
        progress.log(f"repaired: equalised {pair.first} -> {pair.second}")

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
    if clip and getattr(quantization, "reduce_range", False):
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


def _range_ratio(ch_range: np.ndarray) -> float:
    live = ch_range[ch_range > 0]
    return float(live.max() / np.median(live)) if live.size else 1.0


def _with(q: "QuantizationSection", **changes: Any) -> "QuantizationSection":
    """A copy of the section with ``changes`` and recovery off (candidates are plain quantizations)."""
    data = q.model_dump(mode="python")
    data.update(changes)
    data["recovery"] = {**data["recovery"], "enabled": False}
    return type(q).model_validate(data)


@dataclass
class _Setup:
    """Everything one recovery run needs, resolved from the arguments and the recipe."""

    model: Path
    source: onnx.ModelProto
    calib: Path
    out: Path
    spec: "InputSpec"
    calibration: "CalibrationSection"
    q0: "QuantizationSection"  # the recipe's settings, recovery off
    recipe: "Recipe | None"
    source_model: str | Path | None
    input_name: str
    output_name: str
    target: float
    min_cosine: float
    threads: int
    verify: Any
    work: Path
    report_dir: Path
    repaired_path: Path
    progress: Progress


class _Recovery:
    """One recovery run: the candidates so far and the steps that make new ones."""

    def __init__(self, setup: _Setup, evaluator: Evaluator) -> None:
        from pipeline.stages.quantize.stage import quantize

        self.s = setup
        self.rec = setup.q0.recovery
        self.evaluator = evaluator
        self.quantize = quantize
        self.attempts: list[Attempt] = []
        self.paths: list[Path] = []  # int8 file of each attempt
        self.settings: list[tuple[Path, "QuantizationSection"]] = []  # fp32 model and settings of each attempt
        self.results: list["QuantizeResult"] = []  # what quantize returned for each attempt
        self.repair_sets: list[list[Repair]] = []  # repairs each attempt carries
        self.warnings: list[str] = []
        self.diagnosis: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}  # seconds per phase (attempts carry their own)
        self._images: np.ndarray | None = None

    @property
    def target(self) -> float:
        return self.s.target

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = D.calibration_images(self.s.calib, self.s.spec, self.s.calibration, self.s.input_name)
        return self._images

    def analyse(self, model: onnx.ModelProto, q: "QuantizationSection") -> D.Analysis:
        return D.analyse(
            model, self.images, D.QuantScheme.from_section(q), input_name=self.s.input_name, output_name=self.s.output_name,
            progress=self.s.progress,
        )

    # -- candidates --
    def candidate(
        self, label: str, fp32: Path, q: "QuantizationSection", repairs: list[Repair], *, simulated: float | None = None,
        existing: "QuantizeResult | None" = None,
    ) -> Attempt:
        """Quantize (unless ``existing``), score on the evaluation subset, record."""
        t0 = time.perf_counter()
        if existing is not None:
            qres = existing
        else:
            path = self.s.work / f"candidate{len(self.attempts)}" / "int8.onnx"
            recipe = self.s.recipe.model_copy(update={"quantization": q}) if self.s.recipe is not None else None
            qres = self.quantize(
                fp32, self.s.calib, path, input_spec=self.s.spec, calibration=self.s.calibration, quantization=q, recipe=recipe,
                source_model=self.s.source_model, progress=self.s.progress,
            )
        path = Path(qres.output)
        score = self.evaluator.score(path)
        k = len(self.attempts)
        a = Attempt(
            label=label, nodes_fp32=list(q.nodes_to_exclude), repairs=[r.kind for r in repairs],
            settings={"per_channel": q.per_channel, "reduce_range": q.reduce_range, "calibration_method": q.calibration_method},
            accuracy=score["accuracy"], accuracy_std=score["accuracy_std"], drop=score["drop"],
            within_target=score["drop"] <= self.target + 1e-9, cosine_mean=score["cosine_mean"], cosine_min=score["cosine_min"],
            simulated_error=simulated, seconds=0.0,
        )
        self.s.progress.log(
            f"recovery attempt {k} ({label}): accuracy {a.accuracy:.2f} on {score['pairs']} pairs, drop {a.drop:+.2f} "
            f"(target {self.target:g}), embedding cosine {a.cosine_mean:.5f}"
        )
        if a.within_target and self.evaluator.confirm_pairs:
            full = self.evaluator.score(path, confirm=True)
            a.confirm_pairs, a.confirm_accuracy, a.confirm_drop = full["pairs"], full["accuracy"], full["drop"]
            a.within_target = full["drop"] <= self.target + 1e-9
            self.s.progress.log(
                f"recovery attempt {k} on the gate's {full['pairs']} pairs: accuracy {full['accuracy']:.2f}, drop {full['drop']:+.2f}"
                + ("" if a.within_target else ": misses the target there, continuing")
            )
        a.seconds = time.perf_counter() - t0
        self.attempts.append(a)
        self.paths.append(path)
        self.settings.append((fp32, q))
        self.results.append(qres)
        self.repair_sets.append(list(repairs))
        return a

    def best(self) -> int:
        within = [i for i, a in enumerate(self.attempts) if a.within_target]
        if within:
            return within[0]
        return min(range(len(self.attempts)), key=lambda i: (_drop(self.attempts[i]), len(self.attempts[i].nodes_fp32)))

    # -- steps --
    def diagnose(self) -> tuple[D.Analysis, list[D.Finding]]:
        """Findings and sensitivity of the recipe's int8, written as diagnose.json/.md."""
        t0 = time.perf_counter()
        an = self.analyse(self.s.source, self.s.q0)
        findings = list(an.findings)
        fp32_names = {n.name for n in self.s.source.graph.node}
        for f in D.int8_findings(onnx.load(str(self.paths[0]))):
            f.node = D.int8_node_name(f.node, fp32_names)
            findings.append(f)
        sim = an.simulator(self.rec.sensitivity_samples)
        rows, err_all = D.sensitivity(sim, both=False, progress=self.s.progress)
        self.attempts[0].simulated_error = err_all
        res = D.DiagnoseResult(
            fp32=self.s.model, int8=None, scheme=an.scheme.to_dict(), samples=len(sim.images), range_samples=len(self.images),
            quantizable=len(an.nodes), error_all=err_all, sensitivity=rows, findings=findings, seconds=0.0,
        )
        res.seconds = time.perf_counter() - t0
        D.write_report(res, self.s.report_dir)
        self.diagnosis = {k: v for k, v in res.to_dict().items() if k not in ("fp32", "int8")}
        self.timings["diagnosis"] = res.seconds
        return an, findings

    def repair(self, an: D.Analysis, findings: list[D.Finding]) -> tuple[int, D.Analysis]:
        """Try the repairs; returns the attempt the fp32 fallback should start from, and its analysis."""
        s = self.s
        images = self.images[: self.rec.sensitivity_samples]
        check = lambda m: _cosine_check(s.source, m, images, s.input_name, s.output_name)  # noqa: E731
        repaired, repairs, notes = plan_repairs(
            s.source, findings, an.stats, an.scheme, s.q0, check=check, min_cosine=s.min_cosine, progress=s.progress
        )
        self.warnings += notes
        model_repairs = [x for x in repairs if not x.setting]
        changes: dict[str, Any] = {}
        for x in repairs:
            changes.update({k.split(".")[-1]: v for k, v in x.setting.items()})
        fp32 = s.model
        if model_repairs:
            with atomic_path(s.repaired_path) as tmp:
                onnx.save(repaired, str(tmp))
            fp32 = s.repaired_path
        # Function-preserving rewrites first; engine settings on top, kept only if they add accuracy.
        options = []
        if model_repairs:
            options.append(("repaired", s.q0, model_repairs, repaired))
        if changes:
            label = "repaired + settings" if model_repairs else "settings"
            options.append((label, _with(s.q0, **changes), repairs, repaired if model_repairs else s.source))
        current, current_model = 0, s.source
        for label, q, reps, proto in options:
            a = self.candidate(label, fp32 if proto is repaired else s.model, q, reps)
            if a.accuracy > self.attempts[current].accuracy or (a.within_target and not self.attempts[current].within_target):
                current, current_model = len(self.attempts) - 1, proto
            if a.within_target:
                return current, an
        if options and current == 0:
            self.warnings.append("the repairs did not raise accuracy on the evaluation subset; the fp32 fallback starts from the recipe's int8")
        if current == 0:
            return 0, an
        return current, self.analyse(current_model, self.settings[current][1])

    def fallback(self, start: int, an: D.Analysis) -> None:
        fp32, q = self.settings[start]
        _fallback(self, start, an, fp32, q, self.repair_sets[start], self.rec.max_fp32_nodes, self.rec.sensitivity_samples, self.s.progress)

    def finish(self, quantization: "QuantizationSection", t0: float) -> RecoverResult:
        """Write the chosen candidate to ``out`` with its manifest and the reports."""
        from pipeline.stages.quantize.stage import MANIFEST_NAME

        s = self.s
        chosen = self.best()
        final = self.attempts[chosen]
        final_fp32, final_q = self.settings[chosen]
        if not final.within_target:
            self.warnings.append(
                f"no candidate reached the target drop of {self.target:g} points on the evaluation subset; "
                f"kept the best ({final.label}: drop {final.drop:+.2f})"
            )
        same_kernels = final_q.nodes_to_exclude == self.settings[0][1].nodes_to_exclude
        t_speed = time.perf_counter()
        speed = _speed(
            s.model, self.paths[0], self.paths[chosen], s.spec, s.verify, s.threads, self.evaluator.bin, s.progress, same_kernels=same_kernels
        )
        self.timings["speed"] = time.perf_counter() - t_speed
        self.timings["attempts"] = sum(a.seconds for a in self.attempts)
        changes: dict[str, Any] = {}
        for key in ("nodes_to_exclude", "per_channel", "reduce_range", "calibration_method"):
            if getattr(final_q, key) != getattr(quantization, key):
                changes[f"quantization.{key}"] = getattr(final_q, key)
        with atomic_path(s.out) as tmp:
            shutil.copyfile(self.paths[chosen], tmp)
        keep_repaired = final_fp32 == s.repaired_path
        res = RecoverResult(
            output=s.out, target=self.target, eval_pairs=self.evaluator.pairs, total_pairs=self.evaluator.bin.num_pairs,
            fp32_accuracy=self.evaluator.fp32.accuracy, within_target=final.within_target, attempts=self.attempts, final=final,
            repairs=self.repair_sets[chosen], nodes_fp32=list(final_q.nodes_to_exclude), recipe_changes=changes,
            diagnosis=self.diagnosis, speed=speed, repaired_model=s.repaired_path if keep_repaired else None,
            quantize=self.results[chosen], seconds=time.perf_counter() - t0, warnings=self.warnings, timings=dict(self.timings),
        )
        res.report_json = s.report_dir / "recovery.json"
        res.report_md = s.report_dir / "recovery.md"
        section = _manifest_section(res)
        res.quantize = dataclasses.replace(self.results[chosen], output=s.out, manifest=s.out.parent / MANIFEST_NAME, recovery=section)
        cand_manifest = self.paths[chosen].parent / MANIFEST_NAME
        manifest = json.loads(cand_manifest.read_text()) if cand_manifest.is_file() else {}
        manifest.setdefault("files", {}).setdefault("int8", {})["path"] = str(s.out)
        manifest["recovery"] = section
        atomic_write_json(s.out.parent / MANIFEST_NAME, manifest)
        atomic_write_json(res.report_json, res.to_dict())
        atomic_write_text(res.report_md, markdown(res))
        return res


def recover(
    model: str | Path,
    calib: str | Path,
    out: str | Path,
    *,
    input_spec: "InputSpec",
    calibration: "CalibrationSection",
    quantization: "QuantizationSection",
    recipe: "Recipe | None" = None,
    source_model: str | Path | None = None,
    eval_data: str | Path | None = None,
    first: "QuantizeResult | None" = None,
    report_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> RecoverResult:
    """Quantize ``model`` so that int8 stays within the recovery target of fp32, repairing and falling back as needed.

    Args:
        model: the converted fp32 model.
        calib: calibration faces (``.bin`` or folder), as for :func:`pipeline.stages.quantize.stage.quantize`.
        out: the int8 model to write; ``manifest.json`` goes beside it (with a ``recovery`` section).
        input_spec, calibration, quantization: recipe sections; ``quantization.recovery`` sets the
            target (``max_accuracy_drop``, default ``gate.max_accuracy_drop``), ``eval_pairs``,
            ``max_fp32_nodes``, ``sensitivity_samples`` and ``repair``.
        recipe: the full recipe (the gate's default target, the verification protocol, the
            equivalence threshold ``convert.min_cosine`` that every repair must pass).
        source_model: the original model, hashed into the manifest.
        eval_data: verification pairs (``.bin``) that score the candidates; default ``calib`` when it is a ``.bin``.
        first: the recipe's int8 model, already written at ``out`` by ``quantize`` (not quantized again).
        report_dir: where recovery.json/.md and diagnose.json/.md go; default beside ``out``.
        cache_dir: fp32 embedding cache shared with ``qpipe verify`` (same key), or None.
        progress: progress bars and notes.

    The best candidate is written even when none reaches the target; ``within_target`` says which.
    """
    from pipeline.runtime import graph as onnxutil
    from pipeline.data.bins import VerificationBin, open_images
    from pipeline.core.environment import physical_cores
    from pipeline.stages.quantize.stage import MANIFEST_NAME
    from pipeline.recipe import ConvertSection, GateSection, VerifySection

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    model = require_file(model, "fp32 model")
    out = Path(out)
    rec = quantization.recovery
    gate = recipe.gate if recipe is not None else GateSection()
    vs = recipe.verify if recipe is not None else VerifySection()
    target = rec.max_accuracy_drop if rec.max_accuracy_drop is not None else gate.max_accuracy_drop
    if target < 0:
        raise UserError(f"quantization.recovery.max_accuracy_drop must be >= 0, got {target}")
    if rec.max_fp32_nodes < 0:
        raise UserError(f"quantization.recovery.max_fp32_nodes must be >= 0, got {rec.max_fp32_nodes}")
    if rec.sensitivity_samples <= 0:
        raise UserError(f"quantization.recovery.sensitivity_samples must be positive, got {rec.sensitivity_samples}")
    ev_source = open_images(eval_data if eval_data is not None else calib)
    if not isinstance(ev_source, VerificationBin):
        raise UserError("accuracy recovery needs verification pairs to score its candidates: give a .bin as --calib, not an image folder")
    if first is not None and not out.is_file():
        raise UserError(f"recovery was handed the recipe's int8 model at {out}, but there is no such file")
    source = onnxutil.load_model(model, "fp32 model")
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = _Setup(
        model=model, source=source, calib=Path(calib), out=out, spec=input_spec, calibration=calibration, q0=_with(quantization),
        recipe=recipe, source_model=source_model, input_name=onnxutil.find_input(source, input_spec.name).name,
        output_name=onnxutil.find_output(source, input_spec.output).name, target=target,
        min_cosine=(recipe.convert if recipe is not None else ConvertSection()).min_cosine, threads=vs.threads or physical_cores(),
        verify=vs, work=Path(tempfile.mkdtemp(prefix=".qpipe-recover-", dir=out.parent)),
        report_dir=Path(report_dir) if report_dir is not None else out.parent,
        repaired_path=out.with_name(f"{out.stem}.repaired-fp32.onnx"), progress=progress,
    )
    result: RecoverResult | None = None
    try:
        pairs = subset_pairs(ev_source.num_pairs, rec.eval_pairs, vs.folds)
        confirm = (vs.pairs or ev_source.num_pairs) if rec.confirm else None
        t_fp32 = time.perf_counter()
        evaluator = Evaluator(
            model, ev_source, input_spec, pairs=pairs, confirm_pairs=confirm, folds=vs.folds, flip=vs.flip, batch=vs.batch,
            threads=setup.threads, cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress,
        )
        r = _Recovery(setup, evaluator)
        r.timings["fp32_embeddings"] = time.perf_counter() - t_fp32
        if first is not None:
            # Keep the recipe's int8 and its manifest aside: a candidate may replace them at ``out``.
            kept = setup.work / "baseline"
            kept.mkdir()
            shutil.copyfile(out, kept / "int8.onnx")
            if Path(first.manifest).is_file():
                shutil.copyfile(first.manifest, kept / MANIFEST_NAME)
            r.candidate("recipe's int8", model, setup.q0, [], existing=dataclasses.replace(first, output=kept / "int8.onnx", manifest=kept / MANIFEST_NAME))
        else:
            r.candidate("recipe's int8", model, setup.q0, [])
        if not r.attempts[0].within_target:
            an, findings = r.diagnose()
            start, start_an = r.repair(an, findings) if rec.repair else (0, an)
            if not any(a.within_target for a in r.attempts) and rec.max_fp32_nodes > 0:
                r.fallback(start, start_an)
        result = r.finish(quantization, t0)
        return result
    finally:
        shutil.rmtree(setup.work, ignore_errors=True)
        if (result is None or result.repaired_model is None) and setup.repaired_path.exists():
            setup.repaired_path.unlink()


def _drop(a: Attempt) -> float:
    """The attempt's best-founded drop: on the gate's pairs when it was confirmed there."""
    return a.confirm_drop if a.confirm_drop is not None else a.drop


def _units(an: D.Analysis, pool: Sequence[int]) -> list[tuple[int, ...]]:
    """Fallback candidates: single nodes, and each node with the nodes sharing one of its int8 tensors.

    A tensor between two int8 nodes stays int8 while either of them is int8, so an
    outlier tensor is only removed by returning its producer and readers together.
    """
    producer = {qn.output: qn.index for qn in an.nodes}
    units: dict[tuple[int, ...], None] = {}
    for k in pool:
        qn = an.nodes[k]
        units[(k,)] = None
        if qn.readers:
            units[tuple(sorted({k, *qn.readers}))] = None
        for t in qn.activations:
            if t in producer:
                p = producer[t]
                units[tuple(sorted({p, k, *an.nodes[p].readers}))] = None
    return list(units)


def _fallback(
    r: _Recovery, start: int, an: D.Analysis, fp32: Path, q: "QuantizationSection", repairs: list[Repair], limit: int, samples: int,
    progress: Progress, pool_size: int = 12,
) -> None:
    """Greedy fp32 fallback, steered by the simulation; a real quantize + evaluation only when it predicts success.

    The simulation ranks what returning each node to fp32 would gain with every
    other node int8, then the same for units: a top node together with the nodes
    sharing one of its int8 tensors (a tensor stays int8 while either end is
    int8, so an outlier tensor goes only when its producer and readers go
    together). Units are added in order of gain per node. The starting attempt's
    drop (on the gate's pairs when it was confirmed there) fixes the scale
    between simulated error and accuracy drop, proportionally; a real check runs
    when the prediction meets the target with a margin, when the simulated error
    has halved since the last check, or when the budget of nodes or units runs
    out. Stops at the first real attempt within the target.
    """
    sim = an.simulator(max(16, samples // 2))
    n = len(an.nodes)
    base = np.ones(n, np.float32)
    base[an.index(q.nodes_to_exclude)] = 0.0
    err_base = sim.error_of(base)
    r.attempts[start].simulated_error = err_base

    def gain(unit: Sequence[int]) -> float:
        trial = base.copy()
        trial[list(unit)] = 0.0
        return err_base - sim.error_of(trial, base=base)

    t_rank = time.perf_counter()
    with progress.task("ranking fp32 fallback candidates", total=n, unit="nodes") as t:
        single = {}
        for k in range(n):
            if base[k] == 1.0:
                single[(k,)] = gain((k,))
            t.advance()
    pool = [u[0] for u, _ in sorted(single.items(), key=lambda x: -x[1])[:pool_size]]
    gains = {u: single.get(u) if len(u) == 1 else gain(u) for u in _units(an, pool) if all(base[k] == 1.0 for k in u)}
    order = [u for u, g in sorted(gains.items(), key=lambda x: (-x[1] / len(x[0]), len(x[0]))) if g is not None and g > 0]
    r.timings["fallback_ranking"] = time.perf_counter() - t_rank

    gates = base.copy()
    checked_err, checked_drop = err_base, max(_drop(r.attempts[start]), 1e-6)
    chosen: list[int] = []
    for i, unit in enumerate(order):
        new = [k for k in unit if gates[k] == 1.0]
        if not new or len(chosen) + len(new) > limit:
            continue
        previous = gates.copy()
        chosen += new
        gates[new] = 0.0
        err = sim.error_of(gates, base=previous)
        predicted = checked_drop * err / checked_err if checked_err > 0 else 0.0
        more = any(len(chosen) + len([k for k in u if gates[k] == 1.0]) <= limit and any(gates[k] == 1.0 for k in u) for u in order[i + 1 :])
        if predicted > 0.8 * r.target and err > 0.5 * checked_err and more and len(chosen) < limit:
            continue
        names = [an.nodes[k].name for k in chosen]
        a = r.candidate(
            "fp32: " + ", ".join(names), fp32, _with(q, nodes_to_exclude=list(q.nodes_to_exclude) + names), repairs, simulated=err
        )
        if a.within_target or not more or len(chosen) >= limit:
            return
        checked_err, checked_drop = err, max(_drop(a), 1e-6)


def _speed(
    fp32: Path, baseline: Path, final: Path, spec: "InputSpec", vs: Any, threads: int, pairs_bin: Any, progress: Progress, *,
    same_kernels: bool,
) -> dict[str, Any]:
    """Interleaved batch-1 latency: fp32 vs the final int8, and vs the recipe's int8 when nodes went back to fp32.

    With no node in fp32 the final model runs the same int8 kernels as the recipe's, so its speed is
    the same by construction and a second measurement would only show the machine's noise.
    """
    from pipeline.eval.speed import benchmark
    from pipeline.data.bins import preprocess

    inputs = preprocess(pairs_bin.decode_many(np.arange(min(pairs_bin.num_images, max(1, vs.throughput_batch)))), spec)
    kw = dict(
        inputs=inputs, input_name=spec.name, output_name=spec.output, threads=threads, warmup=vs.warmup,
        rounds=max(4, vs.rounds // 2), runs_per_round=vs.runs_per_round, throughput_batch=1, progress=progress,
    )
    fin = benchmark(fp32, final, **kw)
    out = {
        "threads": threads,
        "fp32_ms": fin.fp32.latency_ms_p50,
        "final_ms": fin.int8.latency_ms_p50,
        "final_speedup": fin.speedup,
        "baseline_ms": None,
        "baseline_speedup": None,
        "note": fin.note,
    }
    if same_kernels:
        out["cost"] = "none: no node went back to fp32 (the same int8 kernels as the recipe's int8)"
    else:
        base = benchmark(fp32, baseline, **kw)
        out["baseline_ms"] = base.int8.latency_ms_p50
        out["baseline_speedup"] = base.speedup
        out["cost"] = (f"speedup after recovery / speedup of the recipe's int8 = {fin.speedup / base.speedup:.2f}") if base.speedup else None
    return out


def _manifest_section(res: RecoverResult) -> dict[str, Any]:
    from pipeline.core.files import sha256_file

    return {
        "target_max_accuracy_drop": res.target,
        "eval_pairs": res.eval_pairs,
        "fp32_accuracy": res.fp32_accuracy,
        "within_target": res.within_target,
        "attempts": [a.to_dict() for a in res.attempts],
        "final": res.final.label,
        "repairs": [x.to_dict() for x in res.repairs],
        "nodes_fp32": res.nodes_fp32,
        "recipe_changes": res.recipe_changes,
        "speed": res.speed,
        "repaired_model": {"path": str(res.repaired_model), "sha256": sha256_file(res.repaired_model)} if res.repaired_model else None,
        "culprits": (res.diagnosis or {}).get("culprits", []),
        "summary": res.summary(),
        "report": str(res.report_md) if res.report_md else None,
    }


def summary_lines(section: dict[str, Any] | None) -> list[str]:
    """What ``qpipe quantize`` prints about recovery, from ``QuantizeResult.recovery``."""
    if not section:
        return []
    lines = list(section.get("summary") or [])
    if section.get("report"):
        lines.append(f"recovery report: {section['report']}")
    return lines
