"""Latency and throughput of an fp32 and an int8 model, measured so the ratio can be trusted.

Both models are timed in one process with one fixed intra-op thread count,
sessions created once, after warm-up, and *interleaved*: every round times
``runs_per_round`` batch-1 runs of each model (the round's figure is their
median), and the model that goes first alternates from round to round. A slow
phase of a noisy machine (another job, frequency scaling, a cold cache) then
hits both models within the same round, and the speedup is the median of the
per-round ratios fp32/int8, reported with its interquartile range so the
spread is visible rather than hidden in one mean.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.runtime.session import OnnxModel

# Throughput is a secondary figure: a few interleaved batch runs per model.
THROUGHPUT_MIN_ROUNDS = 3
THROUGHPUT_ROUND_DIVISOR = 8


@dataclass
class ModelTiming:
    """One model's timings. Latency at batch 1, in milliseconds."""

    name: str
    path: str
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_mean: float
    rounds_ms: list[float]
    samples_ms: list[float] = field(repr=False)
    dynamic_batch: bool
    throughput_batch: int | None = None
    throughput_ips: float | None = None

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


@dataclass
class SpeedResult:
    """fp32 vs int8 speed. ``speedup`` = median over rounds of fp32 / int8 round latency."""

    fp32: ModelTiming
    int8: ModelTiming
    speedup: float
    speedup_iqr: tuple[float, float]
    ratios: list[float]
    first_in_round: list[str]
    threads: int
    warmup: int
    rounds: int
    runs_per_round: int
    batch: int
    cpu_model: str
    cpu_flags: dict[str, bool]
    vnni: bool
    amx: bool
    onnxruntime_version: str
    throughput_ratio: float | None = None
    note: str | None = None
    spinning: bool = False

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("fp32", "int8")}
        d["speedup_iqr"] = list(self.speedup_iqr)
        d["fp32"] = self.fp32.to_dict(samples=samples)
        d["int8"] = self.int8.to_dict(samples=samples)
        return d


def no_vnni_note(vnni: bool, amx: bool) -> str | None:
    if vnni or amx:
        return None
    return (
        "this CPU has no VNNI (AVX-512 VNNI / AVX-VNNI) or AMX: onnxruntime's int8 kernels fall back to "
        "plain AVX2/AVX-512 integer arithmetic, so int8 gains here are smaller than on a VNNI CPU"
    )


def _repeat_to(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else np.ascontiguousarray(x[:n])


def benchmark(
    fp32: Path,
    int8: Path,
    *,
    inputs: np.ndarray | None = None,
    input_shape: Sequence[int] = (3, 112, 112),
    input_name: str | None = None,
    output_name: str | None = None,
    threads: int | None = None,
    warmup: int = 10,
    rounds: int = 40,
    runs_per_round: int = 5,
    throughput_batch: int = 16,
    progress: Progress | None = None,
    model_factory: Callable[..., Any] = OnnxModel,
    clock: Callable[[], float] = time.perf_counter,
) -> SpeedResult:
    """Interleaved batch-1 latency (and batch throughput) of ``fp32`` and ``int8``.

    ``inputs``: NCHW float32 images to time on (real faces give realistic
    activations; repeated if fewer than the throughput batch); default seeded
    random pixels 0..255 of ``input_shape`` (C, H, W). ``threads``: intra-op
    threads for both sessions; None means all physical cores. Throughput is
    measured for a model only when its batch dimension is dynamic and
    ``throughput_batch`` > 1. ``model_factory`` and ``clock`` are seams for
    tests.
    """
    from pipeline.core import environment as envinfo

    progress = progress or NULL_PROGRESS
    if rounds < 1 or runs_per_round < 1 or warmup < 0:
        raise UserError(f"timing needs rounds >= 1 and runs_per_round >= 1 (got {rounds}, {runs_per_round}) and warmup >= 0")
    if threads is None:
        threads = envinfo.physical_cores()
    if threads <= 0:
        raise UserError(f"verify.threads must be positive, got {threads}")

    models = {
        "fp32": model_factory(fp32, threads=threads, input_name=input_name, output_name=output_name),
        "int8": model_factory(int8, threads=threads, input_name=input_name, output_name=output_name),
    }
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = rng.uniform(0, 255, size=(max(1, throughput_batch), *input_shape)).astype(np.float32)
    for name, m in models.items():
        if not m.dynamic_batch and m.fixed_batch != 1:
            raise UserError(f"the {name} model has a fixed batch of {m.fixed_batch}; latency is measured at batch 1")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    one = inputs[:1]
    names = ("fp32", "int8")

    def timed(name: str, x: np.ndarray) -> float:
        m = models[name]
        t0 = clock()
        m(x)
        return (clock() - t0) * 1000.0

    samples: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    first: list[str] = []
    tp_ms: dict[str, list[float]] = {n: [] for n in names}
    tp_names = [n for n in names if models[n].dynamic_batch and throughput_batch > 1]
    tp_rounds = max(THROUGHPUT_MIN_ROUNDS, rounds // THROUGHPUT_ROUND_DIVISOR) if tp_names else 0
    batch_x = _repeat_to(inputs, throughput_batch) if tp_names else None

    # The collector pausing mid-run would land on whichever model happens to be running.
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with progress.task("timing fp32 vs int8", total=warmup + rounds + tp_rounds, unit="rounds") as task:
            for i in range(warmup):
                for name in names if i % 2 == 0 else names[::-1]:
                    timed(name, one)
                task.advance()
            for r in range(rounds):
                order = names if r % 2 == 0 else names[::-1]
                first.append(order[0])
                for name in order:
                    runs = [timed(name, one) for _ in range(runs_per_round)]
                    samples[name].extend(runs)
                    per_round[name].append(float(np.median(runs)))
                task.advance()
            if tp_names:
                for name in tp_names:  # the first batch run allocates bigger buffers: not timed
                    timed(name, batch_x)
                for r in range(tp_rounds):
                    for name in tp_names if r % 2 == 0 else tp_names[::-1]:
                        tp_ms[name].append(timed(name, batch_x))
                    task.advance()
    finally:
        if gc_was_enabled:
            gc.enable()

    def timing(name: str) -> ModelTiming:
        s = np.asarray(samples[name])
        tp = None
        if tp_ms[name]:
            tp = float(throughput_batch / (np.median(tp_ms[name]) / 1000.0))
        return ModelTiming(
            name=name,
            path=str(fp32 if name == "fp32" else int8),
            latency_ms_p50=float(np.percentile(s, 50)),
            latency_ms_p90=float(np.percentile(s, 90)),
            latency_ms_mean=float(np.mean(s)),
            rounds_ms=per_round[name],
            samples_ms=[float(v) for v in s],
            dynamic_batch=bool(models[name].dynamic_batch),
            throughput_batch=throughput_batch if tp is not None else None,
            throughput_ips=tp,
        )

    ratios = [f / i if i > 0 else float("inf") for f, i in zip(per_round["fp32"], per_round["int8"])]
    q25, q50, q75 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    fp, it = timing("fp32"), timing("int8")
    cpu = envinfo.cpu_info()
    flags = dict(cpu.get("flags", {}))
    vnni = bool(flags.get("avx512_vnni") or flags.get("avx_vnni"))
    amx = bool(flags.get("amx_int8") or flags.get("amx_tile"))
    return SpeedResult(
        fp32=fp,
        int8=it,
        speedup=q50,
        speedup_iqr=(q25, q75),
        ratios=[float(r) for r in ratios],
        first_in_round=first,
        threads=int(threads),
        warmup=warmup,
        rounds=rounds,
        runs_per_round=runs_per_round,
        batch=1,
        cpu_model=str(cpu.get("model")),
        cpu_flags=flags,
        vnni=vnni,
        amx=amx,
        onnxruntime_version=envinfo.package_version("onnxruntime") or "unknown",
        throughput_ratio=(it.throughput_ips / fp.throughput_ips) if (fp.throughput_ips and it.throughput_ips) else None,
        note=no_vnni_note(vnni, amx),
    )
