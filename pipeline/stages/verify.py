"""The verification gate: fp32 vs int8 accuracy on face-verification sets, and measured speedup.

For each ``.bin`` both models embed every image (and its horizontal flip),
:mod:`pipeline.eval.protocol` scores the pairs with the insightface protocol, and
:mod:`pipeline.eval.speed` times the two models interleaved. The gate passes when,
for every data set, ``int8 accuracy >= fp32 accuracy - gate.max_accuracy_drop``
and the median speedup is at least ``gate.min_speedup``.

Cost: embedding runs in batches when the model's batch dimension is dynamic,
and the fp32 side is cached (``cache_dir``, one ``.npz`` per model x data x
preprocessing x flip x pairs), so a second int8 candidate only pays for its
own forward passes.

Units: accuracies in percent (points); see ``UNITS``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline.eval import protocol as M
from pipeline.eval.speed import OnnxModel, SpeedResult, benchmark
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, require_file, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from pipeline.data.bins import VerificationBin
    from pipeline.recipe import GateSection, InputSpec, VerifySection

# Bump when the cached array's meaning changes, so old cache files are not reused.
CACHE_FORMAT = 1
# Gate comparisons absorb float rounding of means of k/n fractions (99.55 - 0.1 vs 99.45).
GATE_EPS = 1e-9
DECODE_CHUNK = 256

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
    "speedup": "median over rounds of fp32 / int8 batch-1 latency",
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
            "accuracy": M._num(m.accuracy),
            "accuracy_std": M._num(m.accuracy_std),
            "threshold_mean": M._num(m.threshold_mean),
            "tar_at_far": M._num(m.tar_at_far),
            "far": M._num(m.far),
            "roc_auc": M._num(m.roc_auc),
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
            "speed_note": self.speed.note,
            "subset": self.subset,
            "gate": self.gate,
            "data": {d.name: d.to_dict(curves=curves) for d in self.datasets},
            "speed": self.speed.to_dict(samples=True),
            "settings": self.settings,
            "environment": self.environment,
            "report_dir": str(self.report_dir) if self.report_dir else None,
            "seconds": round(self.seconds, 3),
        }


# --- embeddings -----------------------------------------------------------------


def cache_key(*, model_sha256: str, data_sha256: str, input_spec: "InputSpec", flip: bool, pairs: int) -> str:
    """sha256 naming the fp32 embeddings of one model x data x preprocessing x flip x pairs."""
    from pipeline.core import environment as envinfo

    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "model": model_sha256,
            "data": data_sha256,
            "input": input_spec.model_dump(mode="json"),
            "flip": bool(flip),
            "pairs": int(pairs),
            # Another onnxruntime may round differently; its embeddings are not these.
            "onnxruntime": envinfo.package_version("onnxruntime"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"emb-{key[:40]}.npz"


def _load_cache(path: Path, key: str, rows: int, progress: Progress) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            emb = np.array(z["embeddings"], dtype=np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        progress.log(f"warning: ignoring unreadable embedding cache {path}: {e}")
        return None
    if emb.ndim != 2 or emb.shape[0] != rows:
        progress.log(f"warning: ignoring embedding cache {path}: shape {emb.shape}, expected {rows} rows")
        return None
    return emb


def _save_cache(path: Path, key: str, emb: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), embeddings=emb)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _run_batches(model: OnnxModel, x: np.ndarray, batch: int) -> np.ndarray:
    """Model outputs for every row of x, flattened to (N, dim), in batches the model accepts."""
    n = len(x)
    if model.dynamic_batch:
        step = max(1, batch)
    else:
        step = model.fixed_batch or 1
    outs = []
    for start in range(0, n, step):
        part = x[start : start + step]
        k = len(part)
        if not model.dynamic_batch and k < step:
            # A fixed-batch model gets a full batch; the padding rows are dropped.
            part = np.concatenate([part, np.zeros((step - k, *part.shape[1:]), part.dtype)])
        out = np.asarray(model(np.ascontiguousarray(part)))
        if out.ndim < 2 or out.shape[0] != len(part):
            raise UserError(f"model {model.path} output {model.output_name!r} has shape {out.shape}; expected (batch, embedding)")
        outs.append(out.reshape(len(part), -1)[:k])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def embed_pairs(
    model: Path,
    bin: "VerificationBin",
    *,
    input_spec: "InputSpec",
    flip: bool = True,
    batch: int = 16,
    pairs: int | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Final protocol embeddings (2 x pairs rows, float64); see :func:`embed_pairs_with_info`."""
    return embed_pairs_with_info(
        model, bin, input_spec=input_spec, flip=flip, batch=batch, pairs=pairs, cache_dir=cache_dir, threads=threads, progress=progress
    )[0]


def embed_pairs_with_info(
    model: Path,
    bin: "VerificationBin",
    *,
    input_spec: "InputSpec",
    flip: bool = True,
    batch: int = 16,
    pairs: int | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    label: str = "",
    runner: Callable[[], OnnxModel] | None = None,
    model_sha256: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Final protocol embeddings of the first ``pairs`` pairs' images (2 x pairs rows, float64).

    Row 2k / 2k+1 is pair k's first / second face: the L2-normalised sum of
    the image's and (with ``flip``) its mirror's embeddings. With
    ``cache_dir``, the result is read from / written to an ``.npz`` keyed by
    :func:`cache_key` (the model file is then not run at all on a hit).
    ``runner``: returns an already-open session for ``model`` (called only on
    a cache miss); default: open one with ``threads``. ``model_sha256``: the
    model file's hash if the caller has it. Returns (embeddings, info) where info has ``cached``, ``seconds``,
    ``nonfinite`` (rows whose raw output was not finite) and ``cache_file``.
    """
    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    n = bin.num_pairs if pairs is None else min(int(pairs), bin.num_pairs)
    if n <= 0:
        raise UserError(f"verify.pairs must be positive, got {pairs}")
    rows = 2 * n
    model_path = require_file(model, "model")
    cache_file = None
    key = None
    if cache_dir is not None:
        key = cache_key(model_sha256=model_sha256 or sha256_file(model_path), data_sha256=bin.sha256(), input_spec=input_spec, flip=flip, pairs=n)
        cache_file = _cache_file(cache_dir, key)
        hit = _load_cache(cache_file, key, rows, progress)
        if hit is not None:
            info = {"cached": True, "seconds": time.perf_counter() - t0, "nonfinite": int(np.sum(~np.all(np.isfinite(hit), axis=1))), "cache_file": str(cache_file)}
            return hit, info

    session = runner() if runner is not None else OnnxModel(model_path, threads=threads, input_name=input_spec.name, output_name=input_spec.output)
    from pipeline.data.bins import preprocess

    views = (False, True) if flip else (False,)
    parts: list[np.ndarray] = []
    nonfinite = 0
    desc = f"embedding {label or model_path.name}"
    with progress.task(desc, total=rows * len(views), unit="img") as task:
        for start in range(0, rows, DECODE_CHUNK):
            idx = np.arange(start, min(rows, start + DECODE_CHUNK))
            imgs = bin.decode_many(idx)
            acc = None
            finite = np.ones(len(idx), dtype=bool)
            for view in views:
                out = _run_batches(session, preprocess(imgs, input_spec, flip=view), batch)
                finite &= np.all(np.isfinite(out), axis=1)
                # insightface sums the views in float64 (its embedding buffers are np.zeros).
                out = out.astype(np.float64)
                acc = out if acc is None else acc + out
                task.advance(len(idx))
            nonfinite += int(np.sum(~finite))
            parts.append(M.l2_normalize(acc))
    emb = np.concatenate(parts)
    if cache_file is not None and key is not None and nonfinite == 0:
        _save_cache(cache_file, key, emb)
    info = {"cached": False, "seconds": time.perf_counter() - t0, "nonfinite": nonfinite, "cache_file": str(cache_file) if cache_file else None}
    return emb, info


# --- the stage --------------------------------------------------------------------


def _check_input_size(model: OnnxModel, spec: "InputSpec") -> None:
    c, h, w = model.input_shape[1:]
    if (isinstance(h, int) and h > 0 and h != spec.size[0]) or (isinstance(w, int) and w > 0 and w != spec.size[1]):
        raise UserError(
            f"model {model.path} takes {h}x{w} images but model.input.size is {spec.size[0]}x{spec.size[1]}",
            hint="set model.input.size in the recipe",
        )
    if isinstance(c, int) and c > 0 and c != 3:
        raise UserError(f"model {model.path} input has {c} channels; face models take 3 (RGB or BGR)")


def _dataset_names(data: list[Path]) -> list[str]:
    names = [Path(p).stem for p in data]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two data sets share the name {dup[0]!r} (the file stem names a set in the report); rename one")
    return names


def _gate(datasets: list[DatasetResult], speed: SpeedResult, gate: "GateSection") -> dict[str, Any]:
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
    checks.append({"check": "speedup", "speedup": s, "iqr": list(speed.speedup_iqr), "limit": gate.min_speedup, "passed": ok})
    if not ok:
        q25, q75 = speed.speedup_iqr
        reasons.append(
            f"speedup {s:.2f}x (IQR {q25:.2f}-{q75:.2f}, {speed.rounds} rounds, {speed.threads} threads) is below the required "
            f"{gate.min_speedup:.2f}x (short by {gate.min_speedup - s:.2f}x)" + ("; note: " + speed.note if speed.note else "")
        )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "checks": checks,
        "max_accuracy_drop": gate.max_accuracy_drop,
        "min_speedup": gate.min_speedup,
    }


def verify(
    fp32: Path,
    int8: Path,
    data: list[Path],
    *,
    input_spec: "InputSpec",
    verify: "VerifySection",
    gate: "GateSection",
    report_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Score fp32 and int8 on every data set, time them, apply the gate, write reports.

    Returns the result whether or not the gate passed (``result.passed``,
    ``result.gate["reasons"]``); the caller decides the exit code (the CLI
    raises :class:`~pipeline.core.errors.GateFailed`). Problems with the inputs
    (missing files, a model onnxruntime cannot load, too few pairs) raise
    :class:`~pipeline.core.errors.UserError`. ``cache_dir``: where fp32 embeddings
    are cached (None: no cache). ``report_dir``: where report.json, report.md
    and report.png are written (None: no reports).
    """
    from pipeline.core import environment as envinfo
    from pipeline.data.bins import preprocess, read_bin

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    fp32 = require_file(fp32, "fp32 model")
    int8 = require_file(int8, "int8 model")
    if not data:
        raise UserError("verify needs at least one verification set (--data FILE.bin)")
    names = _dataset_names(list(data))
    if verify.folds < 2:
        raise UserError(f"verify.folds must be at least 2, got {verify.folds}")
    if verify.pairs is not None and verify.pairs < verify.folds:
        raise UserError(f"verify.pairs is {verify.pairs}: needs at least one pair per fold ({verify.folds} folds)")
    if verify.batch <= 0 or verify.throughput_batch <= 0:
        raise UserError("verify.batch and verify.throughput_batch must be positive")
    threads = verify.threads or envinfo.physical_cores()

    bins = [read_bin(p) for p in data]
    for name, b in zip(names, bins):
        if b.num_pairs < verify.folds:
            raise UserError(f"{b.path}: {b.num_pairs} pairs cannot be split into {verify.folds} folds")

    spec_kw = {"input_name": input_spec.name, "output_name": input_spec.output}
    int8_model = OnnxModel(int8, threads=threads, **spec_kw)
    _check_input_size(int8_model, input_spec)
    fp32_sha = sha256_file(fp32)
    opened: list[OnnxModel] = []

    def fp32_runner() -> OnnxModel:
        # Opened at most once, and only if some fp32 embeddings are not in the cache.
        if not opened:
            opened.append(OnnxModel(fp32, threads=threads, **spec_kw))
            _check_input_size(opened[0], input_spec)
        return opened[0]

    datasets: list[DatasetResult] = []
    for name, b in zip(names, bins):
        n = b.num_pairs if verify.pairs is None else min(verify.pairs, b.num_pairs)
        subset = n < b.num_pairs
        if subset:
            progress.log(f"{name}: SUBSET gate on the first {n} of {b.num_pairs} pairs")
        evals = {}
        for role in ("fp32", "int8"):
            if role == "fp32":
                emb, info = embed_pairs_with_info(
                    fp32, b, input_spec=input_spec, flip=verify.flip, batch=verify.batch, pairs=n, cache_dir=cache_dir,
                    progress=progress, label=f"fp32 {name}", runner=fp32_runner, model_sha256=fp32_sha,
                )
            else:
                emb, info = embed_pairs_with_info(
                    int8, b, input_spec=input_spec, flip=verify.flip, batch=verify.batch, pairs=n, cache_dir=None,
                    progress=progress, label=f"int8 {name}", runner=lambda: int8_model,
                )
            m = M.evaluate(emb[0::2], emb[1::2], b.issame[:n], folds=verify.folds)
            evals[role] = ModelEval(role=role, metrics=m, cached=info["cached"], seconds=info["seconds"], nonfinite=info["nonfinite"], embedding_dim=int(emb.shape[1]))
        datasets.append(
            DatasetResult(name=name, path=Path(b.path).resolve(), sha256=b.sha256(), pairs=n, total_pairs=b.num_pairs, subset=subset, fp32=evals["fp32"], int8=evals["int8"])
        )

    # The timing sessions are the only ones alive while timing (embedding sessions can be large).
    opened.clear()
    int8_model = None

    # Time on real faces: realistic activations, and the same inputs for both models.
    first = bins[0]
    k = min(first.num_images, max(1, verify.throughput_batch))
    inputs = preprocess(first.decode_many(np.arange(k)), input_spec)
    speed = benchmark(
        fp32,
        int8,
        inputs=inputs,
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
        gate=_gate(datasets, speed, gate),
        environment={**envinfo.environment(), "threads": threads},
        settings={
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
        },
    )
    result.seconds = time.perf_counter() - t0
    if report_dir is not None:
        from pipeline.stages.report import write_reports

        result.report_dir = Path(report_dir)
        write_reports(result, result.report_dir)
    return result



def default_data(recipe: Any, download_dir: Path) -> Path | None:
    """The recipe's verification set when no --data is given: its downloaded copy, or a local path it names."""
    if recipe.data is None:
        return None
    from pipeline.stages.download import cache_name

    cached = Path(download_dir) / cache_name(recipe.data)
    if cached.is_file():
        return cached
    for url in recipe.data.urls:
        if "://" in url or recipe.data.member:
            continue
        p = Path(url) if Path(url).is_absolute() else recipe.base_dir / url
        if p.is_file():
            return p
    return None
