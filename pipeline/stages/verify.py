"""The verification gate: fp32 vs int8 accuracy on face-verification sets, and measured speedup.

For each ``.bin`` both models embed every image (and its horizontal flip),
:mod:`pipeline.eval.protocol` scores the pairs with the insightface protocol, and
:mod:`pipeline.eval.speed` times the models interleaved (int8, fp32 and, when it is
another file, the baseline: the user's model as given). The gate passes when,
for every data set, ``int8 accuracy >= fp32 accuracy - gate.max_accuracy_drop``
and the median speedup over the baseline is at least ``gate.min_speedup``; the
speedup over the fp32 model (the fastest fp32 qpipe makes) is reported beside it
and, when a baseline is timed, must reach ``gate.min_speedup_fastest_fp32``
(by default the applied speed threshold, at most 1.0): an int8 slower than the
fp32 the build could ship instead does not pass.

Embedding is :mod:`pipeline.eval.embeddings` (batched as the model allows; the
fp32 side cached in ``cache_dir``, so a second int8 candidate only pays for its
own forward passes). :func:`verify` returns a typed :class:`VerifyResult`;
:func:`pipeline.stages.report.write_reports` turns it into files.

Units: accuracies in percent (points); see ``UNITS``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import require_file, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.data.bins import VerificationBin, read_bin
from pipeline.data.preprocess import preprocess
from pipeline.eval import protocol as M
from pipeline.eval.embeddings import EmbedInfo, embed_pairs_with_info, open_model
from pipeline.eval.speed import SpeedResult, benchmark
from pipeline.recipe import GateSection, InputSpec, VerifySection
from pipeline.runtime.session import OnnxModel

# Gate comparisons absorb float rounding of means of k/n fractions (99.55 - 0.1 vs 99.45).
GATE_EPS = 1e-9

UNITS = {
    "accuracy": "percent",
    "accuracy_std": "percent (population std over folds)",
    "accuracy_drop": "percentage points (fp32 - int8)",
    "fold_accuracies": "percent",
    "tar_at_far": "percent (TAR at FAR = far_target, insightface VAL)",
    "far": "fraction",
    "roc_auc": "fraction",
    "threshold": "squared L2 distance between normalised embeddings",
    "latency_ms": "milliseconds per image at batch 1",
    "throughput_ips": "images per second at throughput_batch",
    "speedup": "median over rounds of baseline (the user's model as given; default the fp32 model) / int8 batch-1 latency",
    "speedup_fastest_fp32": "median over rounds of fp32 (the fastest fp32 qpipe makes) / int8 batch-1 latency",
}


@dataclass
class ModelEval:
    """One model on one data set."""

    role: str
    metrics: M.VerificationMetrics
    cached: bool
    seconds: float
    nonfinite: int
    embedding_dim: int

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        d = self.metrics.to_dict(curves=curves)
        d.update(cached=self.cached, seconds=round(self.seconds, 3), nonfinite_embeddings=self.nonfinite, embedding_dim=self.embedding_dim)
        return d


@dataclass
class DatasetResult:
    name: str
    path: Path
    sha256: str
    pairs: int
    total_pairs: int
    subset: bool
    fp32: ModelEval
    int8: ModelEval

    @property
    def accuracy_drop(self) -> float:
        return self.fp32.metrics.accuracy - self.int8.metrics.accuracy

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "pairs": self.pairs,
            "total_pairs": self.total_pairs,
            "subset": self.subset,
            "fp32": self.fp32.to_dict(curves=curves),
            "int8": self.int8.to_dict(curves=curves),
            "accuracy_drop": self.accuracy_drop,
        }


@dataclass
class VerifyResult:
    """Everything ``qpipe verify`` measured. ``to_dict()`` is report.json."""

    fp32: dict[str, Any]
    int8: dict[str, Any]
    datasets: list[DatasetResult]
    speed: SpeedResult
    gate: dict[str, Any]
    environment: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    report_dir: Path | None = None
    baseline: dict[str, Any] | None = None  # the user's model as given, when it is not the fp32 model
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    @property
    def subset(self) -> bool:
        return any(d.subset for d in self.datasets)

    @property
    def accuracy_drop(self) -> float:
        return self.datasets[0].accuracy_drop

    def model_summary(self, role: str) -> dict[str, Any]:
        """report.json's top-level fp32/int8 block: first data set's accuracy + speed."""
        ds = self.datasets[0]
        ev: ModelEval = getattr(ds, role)
        t = getattr(self.speed, role)
        m = ev.metrics
        return {
            **getattr(self, role),
            "data_set": ds.name,
            "accuracy": M.finite_or_none(m.accuracy),
            "accuracy_std": M.finite_or_none(m.accuracy_std),
            "threshold_mean": M.finite_or_none(m.threshold_mean),
            "tar_at_far": M.finite_or_none(m.tar_at_far),
            "far": M.finite_or_none(m.far),
            "roc_auc": M.finite_or_none(m.roc_auc),
            "latency_ms_p50": t.latency_ms_p50,
            "latency_ms_p90": t.latency_ms_p90,
            "latency_ms_mean": t.latency_ms_mean,
            "throughput_ips": t.throughput_ips,
            "throughput_batch": t.throughput_batch,
        }

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        return {
            "report_format": 1,
            "accuracy_unit": "percent",
            "units": UNITS,
            "fp32": self.model_summary("fp32"),
            "int8": self.model_summary("int8"),
            "accuracy_drop": self.accuracy_drop,
            "speedup": self.speed.speedup,
            "speedup_iqr": list(self.speed.speedup_iqr),
            "speedup_fastest_fp32": self.speed.speedup_fastest_fp32,
            "speedup_fastest_fp32_iqr": list(self.speed.speedup_fastest_fp32_iqr),
            "baseline": self.baseline or {**self.fp32, "same_as_fp32": True},
            "speed_note": self.speed.note,
            "speed_cpu": {"model": self.speed.cpu_model, "isa_class": self.speed.isa_class},
            "subset": self.subset,
            "gate": self.gate,
            "data": {d.name: d.to_dict(curves=curves) for d in self.datasets},
            "speed": self.speed.to_dict(samples=True),
            "settings": self.settings,
            "environment": self.environment,
            "report_dir": str(self.report_dir) if self.report_dir else None,
            "seconds": round(self.seconds, 3),
        }


# --- the stage --------------------------------------------------------------------


def _dataset_names(data: list[Path]) -> list[str]:
    names = [Path(p).stem for p in data]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two data sets share the name {dup[0]!r} (the file stem names a set in the report); rename one")
    return names


def against_limit(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` as text with enough decimals that a failing value never reads as equal to its limit."""
    for digits in (2, 3, 4):
        a, b = f"{value:.{digits}f}", f"{limit:.{digits}f}"
        if a != b or value == limit:
            return a, b
    return f"{value:.6f}", f"{limit:.6f}"


def _gate(datasets: list[DatasetResult], speed: SpeedResult, gate: GateSection) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    for d in datasets:
        f, i = d.fp32.metrics.accuracy, d.int8.metrics.accuracy
        drop = f - i
        ok = math.isfinite(drop) and i >= f - gate.max_accuracy_drop - GATE_EPS
        checks.append(
            {"check": "accuracy", "data_set": d.name, "fp32": f, "int8": i, "drop": drop, "limit": gate.max_accuracy_drop, "passed": ok, "subset": d.subset}
        )
        if not ok:
            reasons.append(
                f"{d.name}: int8 accuracy {i:.2f}% vs fp32 {f:.2f}% is a drop of {drop:.2f} points, "
                f"more than the allowed {gate.max_accuracy_drop:.2f} (over by {drop - gate.max_accuracy_drop:.2f} points)"
                + (f" [subset: first {d.pairs} of {d.total_pairs} pairs]" if d.subset else "")
            )
        for role in ("fp32", "int8"):
            bad = getattr(d, role).nonfinite
            if bad:
                checks.append({"check": "finite", "data_set": d.name, "model": role, "nonfinite": bad, "passed": False})
                reasons.append(f"{d.name}: the {role} model produced {bad} non-finite embeddings (NaN/inf)")
    s = speed.speedup
    ok = math.isfinite(s) and s >= gate.min_speedup - GATE_EPS
    over = "the user's model" if speed.baseline is not None else "fp32"
    checks.append(
        {"check": "speedup", "over": over, "speedup": s, "iqr": list(speed.speedup_iqr), "limit": gate.min_speedup, "passed": ok}
    )
    if not ok:
        q25, q75 = speed.speedup_iqr
        got, need = against_limit(s, gate.min_speedup)
        reasons.append(
            f"speedup over {over} {got}x (IQR {q25:.2f}-{q75:.2f}, {speed.rounds} rounds, {speed.threads} threads) is below the required "
            f"{need}x" + (f" (short by {gate.min_speedup - s:.2f}x)" if gate.min_speedup - s >= 0.005 else "") + ("; note: " + speed.note if speed.note else "")
        )
    floor = gate.min_speedup_fastest_fp32 if gate.min_speedup_fastest_fp32 is not None else min(1.0, gate.min_speedup)
    if speed.baseline is not None and floor > 0:
        # Faster than the model as given is not enough when qpipe's own fp32 of it is faster still.
        sf = speed.speedup_fastest_fp32
        ok = math.isfinite(sf) and sf >= floor - GATE_EPS
        checks.append(
            {"check": "speedup", "over": "the fastest fp32", "speedup": sf, "iqr": list(speed.speedup_fastest_fp32_iqr), "limit": floor, "passed": ok}
        )
        if not ok:
            q25, q75 = speed.speedup_fastest_fp32_iqr
            got, need = against_limit(sf, floor)
            reasons.append(
                f"int8 is slower than the fastest fp32 (the --fp32 model): {got}x (IQR {q25:.2f}-{q75:.2f}) is below "
                f"gate.min_speedup_fastest_fp32 {need}x; that fp32 model is the faster one to ship on this CPU"
            )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "checks": checks,
        "max_accuracy_drop": gate.max_accuracy_drop,
        "min_speedup": gate.min_speedup,
        "min_speedup_fastest_fp32": floor if speed.baseline is not None and floor > 0 else None,
    }


def _check_settings(data: list[Path], verify: VerifySection) -> list[str]:
    """The data sets' names; a UserError for settings the protocol cannot run with."""
    if not data:
        raise UserError("verify needs at least one verification set (--data FILE.bin)")
    names = _dataset_names(list(data))
    if verify.folds < 2:
        raise UserError(f"verify.folds must be at least 2, got {verify.folds}")
    if verify.pairs is not None and verify.pairs < verify.folds:
        raise UserError(f"verify.pairs is {verify.pairs}: needs at least one pair per fold ({verify.folds} folds)")
    if verify.batch <= 0 or verify.throughput_batch <= 0:
        raise UserError("verify.batch and verify.throughput_batch must be positive")
    return names


def _read_sets(data: list[Path], folds: int) -> list[VerificationBin]:
    bins = [read_bin(p) for p in data]
    for b in bins:
        if b.num_pairs < folds:
            raise UserError(f"{b.path}: {b.num_pairs} pairs cannot be split into {folds} folds")
    return bins


def _score(role: str, emb: np.ndarray, info: EmbedInfo, b: VerificationBin, pairs: int, folds: int) -> ModelEval:
    m = M.evaluate(emb[0::2], emb[1::2], b.issame[:pairs], folds=folds)
    return ModelEval(role=role, metrics=m, cached=info.cached, seconds=info.seconds, nonfinite=info.nonfinite, embedding_dim=int(emb.shape[1]))


def _settings(input_spec: InputSpec, verify: VerifySection, gate: GateSection) -> dict[str, Any]:
    """report.json's settings: the recipe sections used and the protocol's fixed choices."""
    return {
        "verify": verify.model_dump(mode="json"),
        "gate": gate.model_dump(mode="json"),
        "input": input_spec.model_dump(mode="json"),
        "protocol": {
            "distance": "squared L2 of L2-normalised (image + flip) embeddings" if verify.flip else "squared L2 of L2-normalised embeddings",
            "folds": verify.folds,
            "shuffle": False,
            "thresholds": "np.arange(0, 4, 0.01)",
            "val_thresholds": "np.arange(0, 4, 0.001)",
            "far_target": M.FAR_TARGET,
        },
    }


def verify(
    fp32: Path,
    int8: Path,
    data: list[Path],
    *,
    input_spec: InputSpec,
    verify: VerifySection,
    gate: GateSection,
    cache_dir: Path | None = None,
    baseline: Path | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Score fp32 and int8 on every data set, time them, apply the gate.

    Returns the result whether or not the gate passed (``result.passed``,
    ``result.gate["reasons"]``); the caller decides the exit code (the CLI
    raises :class:`~pipeline.core.errors.GateFailed`). Problems with the inputs
    (missing files, a model onnxruntime cannot load, too few pairs) raise
    :class:`~pipeline.core.errors.UserError`. ``cache_dir``: where fp32 embeddings
    are cached (None: no cache). Reports are
    :func:`pipeline.stages.report.write_reports` of the result. ``baseline``: the
    user's model as given (converted, not rewritten), timed with the other two;
    the gate reads the speedup over it (None: over ``fp32``). Accuracy is always
    int8 against ``fp32``.
    """
    from pipeline.core import environment as envinfo

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    fp32 = require_file(fp32, "fp32 model")
    int8 = require_file(int8, "int8 model")
    if baseline is not None:
        baseline = require_file(baseline, "baseline model")
    names = _check_settings(data, verify)
    threads = verify.threads or envinfo.physical_cores()
    speed_rule = gate.speed_threshold()  # the CPU's ISA class picks the threshold; no applicable one stops here, before any work
    bins = _read_sets(data, verify.folds)

    # Accuracy. The fp32 model is opened at most once, and only if some of its embeddings are not cached.
    int8_model: OnnxModel | None = open_model(int8, input_spec, threads=threads)
    fp32_sha = sha256_file(fp32)
    opened: list[OnnxModel] = []

    def fp32_runner() -> OnnxModel:
        if not opened:
            opened.append(open_model(fp32, input_spec, threads=threads))
        return opened[0]

    embed_kw = dict(input_spec=input_spec, flip=verify.flip, batch=verify.batch, threads=threads, progress=progress)
    datasets: list[DatasetResult] = []
    for name, b in zip(names, bins):
        n = b.num_pairs if verify.pairs is None else min(verify.pairs, b.num_pairs)
        subset = n < b.num_pairs
        if subset:
            progress.log(f"{name}: SUBSET gate on the first {n} of {b.num_pairs} pairs")
        emb, info = embed_pairs_with_info(
            fp32, b, pairs=n, cache_dir=cache_dir, label=f"fp32 {name}", runner=fp32_runner, model_sha256=fp32_sha, **embed_kw
        )
        fp = _score("fp32", emb, info, b, n, verify.folds)
        emb, info = embed_pairs_with_info(int8_model, b, pairs=n, label=f"int8 {name}", **embed_kw)
        it = _score("int8", emb, info, b, n, verify.folds)
        datasets.append(
            DatasetResult(name=name, path=Path(b.path).resolve(), sha256=b.sha256(), pairs=n, total_pairs=b.num_pairs, subset=subset, fp32=fp, int8=it)
        )

    # Speed. The timing sessions are the only ones alive while timing (embedding sessions can be large).
    opened.clear()
    int8_model = None
    # Timed on real faces: realistic activations, and the same inputs for both models.
    first = bins[0]
    k = min(first.num_images, max(1, verify.throughput_batch))
    speed = benchmark(
        fp32,
        int8,
        baseline=baseline,
        inputs=preprocess(first.decode_many(np.arange(k)), input_spec),
        input_name=input_spec.name,
        output_name=input_spec.output,
        threads=threads,
        warmup=verify.warmup,
        rounds=verify.rounds,
        runs_per_round=verify.runs_per_round,
        throughput_batch=verify.throughput_batch,
        progress=progress,
    )

    result = VerifyResult(
        fp32={"path": str(fp32.resolve()), "sha256": fp32_sha},
        int8={"path": str(int8.resolve()), "sha256": sha256_file(int8)},
        datasets=datasets,
        speed=speed,
        gate=speed_rule.annotate(_gate(datasets, speed, gate.model_copy(update={"min_speedup": speed_rule.min_speedup}))),
        environment={**envinfo.environment(), "threads": threads},
        settings=_settings(input_spec, verify, gate),
        baseline={"path": str(baseline.resolve()), "sha256": sha256_file(baseline)} if speed.baseline is not None and baseline is not None else None,
    )
    result.seconds = time.perf_counter() - t0
    return result
