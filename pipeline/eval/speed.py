"""Latency and throughput of an fp32 and an int8 model, measured so the ratio can be trusted.

Both models are timed in one process with one fixed intra-op thread count,
sessions created once, after warm-up, and *interleaved* (:func:`interleaved_rounds`,
the one timing loop for any number of models): every round times
``runs_per_round`` batch-1 runs of each model (the round's figure is their
median), and the order is reversed from one round to the next. A slow
phase of a noisy machine (another job, frequency scaling, a cold cache) then
hits both models within the same round, and the speedup is the median of the
per-round ratios fp32/int8, reported with its interquartile range so the
spread is visible rather than hidden in one mean.

Two speedups are reported. ``speedup`` is over the *baseline*, the user's model
as given (converted, not rewritten): what int8 buys the user, and what the gate
reads. ``speedup_fastest_fp32`` is over the fp32 model given, the fastest fp32
qpipe makes of it (PRelu rewritten): what int8 itself adds. When no separate
baseline is given the fp32 model is the baseline and the two are the same figure.
Every result names the CPU and its ISA class (:mod:`pipeline.core.environment`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.progress import NULL_PROGRESS, Progress, TaskHandle
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
    """fp32 (and baseline) vs int8 speed.

    ``speedup`` = median over rounds of baseline / int8 round latency (the
    baseline is the fp32 model unless another was timed); ``speedup_fastest_fp32``
    the same over the fp32 model. ``isa_class``: the CPU's most capable ISA class
    (amx, avx512_vnni, avx_vnni, avx2) or "none".
    """

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
    baseline: ModelTiming | None = None  # None: the fp32 model is the baseline
    speedup_fastest_fp32: float = float("nan")
    speedup_fastest_fp32_iqr: tuple[float, float] = (float("nan"), float("nan"))
    ratios_fastest_fp32: list[float] = field(default_factory=list)
    isa_class: str = "none"
    isa_classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not math.isfinite(self.speedup_fastest_fp32) and self.baseline is None:
            self.speedup_fastest_fp32 = self.speedup
            self.speedup_fastest_fp32_iqr = tuple(self.speedup_iqr)  # type: ignore[assignment]
            self.ratios_fastest_fp32 = list(self.ratios)

    @property
    def baseline_timing(self) -> ModelTiming:
        """The model ``speedup`` is over."""
        return self.baseline if self.baseline is not None else self.fp32

    def cpu_line(self) -> str:
        """The CPU and ISA class every printed speed figure goes with."""
        return f"CPU: {self.cpu_model}; ISA class: {self.isa_class}; VNNI: {'yes' if self.vnni else 'no'}; AMX: {'yes' if self.amx else 'no'}"

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("fp32", "int8", "baseline")}
        d["speedup_iqr"] = list(self.speedup_iqr)
        d["speedup_fastest_fp32_iqr"] = list(self.speedup_fastest_fp32_iqr)
        d["fp32"] = self.fp32.to_dict(samples=samples)
        d["int8"] = self.int8.to_dict(samples=samples)
        d["baseline"] = self.baseline.to_dict(samples=samples) if self.baseline is not None else None
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


# --- the interleaved loop ----------------------------------------------------------


@dataclass
class Rounds:
    """What :func:`interleaved_rounds` measured, per model, in milliseconds (warm-up runs not included)."""

    samples_ms: dict[str, list[float]]  # every timed run, in the order run
    rounds_ms: dict[str, list[float]]  # one figure a round: the median of its runs
    first_in_round: list[str]


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: as given in even rounds, reversed in odd ones.

    Over a pair of rounds a model at position p stands at N-1-p too, so every
    model's mean position is (N-1)/2: a cost that grows with the position in a
    round (a cache warmed by the model before, a frequency ramp) hits all alike.
    """
    return list(names) if r % 2 == 0 else list(names)[::-1]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector off for the block: a collection mid-run would land on whichever model happens to be running."""
    was_enabled = gc.isenabled()
    if was_enabled:  # nested in another pause: that one collected already
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _time_ms(run: Callable[[np.ndarray], Any], x: np.ndarray, clock: Callable[[], float]) -> float:
    t0 = clock()
    run(x)
    return (clock() - t0) * 1000.0


def check_counts(warmup: int, rounds: int, runs_per_round: int) -> None:
    if rounds < 1 or runs_per_round < 1 or warmup < 0:
        raise UserError(f"timing needs rounds >= 1 and runs_per_round >= 1 (got {rounds}, {runs_per_round}) and warmup >= 0")


def interleaved_rounds(
    models: Mapping[str, Callable[[np.ndarray], Any]],
    x: np.ndarray,
    *,
    warmup: int,
    rounds: int,
    runs_per_round: int,
    clock: Callable[[], float] = time.perf_counter,
    task: TaskHandle | None = None,
) -> Rounds:
    """Time every model of ``models`` on ``x`` in the same rounds: the project's one latency loop.

    ``warmup`` untimed rounds of one run per model, then ``rounds`` rounds in which each model
    runs ``runs_per_round`` times back to back; the order is :func:`round_order`'s. ``task``
    (a bar the caller opened) advances once per warm-up round and once per round. The
    collector is paused throughout.
    """
    check_counts(warmup, rounds, runs_per_round)
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    first: list[str] = []
    with gc_paused():
        for i in range(warmup):
            for name in round_order(names, i):
                _time_ms(models[name], x, clock)
            if task is not None:
                task.advance()
        for r in range(rounds):
            order = round_order(names, r)
            first.append(order[0])
            for name in order:
                runs = [_time_ms(models[name], x, clock) for _ in range(runs_per_round)]
                samples[name].extend(runs)
                per_round[name].append(float(np.median(runs)))
            if task is not None:
                task.advance()
    return Rounds(samples_ms=samples, rounds_ms=per_round, first_in_round=first)


def open_for_latency(
    paths: Mapping[str, Path], *, threads: int, input_name: str | None, output_name: str | None, model_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """One session per model (``model_factory``, default :class:`OnnxModel`), refusing a model whose fixed batch is not 1."""
    factory = model_factory or OnnxModel
    models = {name: factory(p, threads=threads, input_name=input_name, output_name=output_name) for name, p in paths.items()}
    for name, m in models.items():
        if not m.dynamic_batch and m.fixed_batch != 1:
            raise UserError(f"the {name} model has a fixed batch of {m.fixed_batch}; latency is measured at batch 1")
    return models


def benchmark(
    fp32: Path,
    int8: Path,
    *,
    baseline: Path | None = None,
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
    """Interleaved batch-1 latency (and batch throughput) of ``fp32``, ``int8`` and ``baseline``.

    ``baseline``: the user's model as given, timed in the same rounds when it is
    another file than ``fp32``; ``speedup`` is over it, ``speedup_fastest_fp32``
    over ``fp32`` (None, or the same file: one model, one figure).

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
    check_counts(warmup, rounds, runs_per_round)
    if threads is None:
        threads = envinfo.physical_cores()
    if threads <= 0:
        raise UserError(f"verify.threads must be positive, got {threads}")

    if baseline is not None and _same_file(baseline, fp32):
        baseline = None
    paths = {"fp32": fp32, "int8": int8, **({"baseline": baseline} if baseline is not None else {})}
    models = open_for_latency(paths, threads=threads, input_name=input_name, output_name=output_name, model_factory=model_factory)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = rng.uniform(0, 255, size=(max(1, throughput_batch), *input_shape)).astype(np.float32)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    names = tuple(models)

    tp_ms: dict[str, list[float]] = {n: [] for n in names}
    tp_names = [n for n in names if models[n].dynamic_batch and throughput_batch > 1]
    tp_rounds = max(THROUGHPUT_MIN_ROUNDS, rounds // THROUGHPUT_ROUND_DIVISOR) if tp_names else 0
    batch_x = _repeat_to(inputs, throughput_batch) if tp_names else None

    with gc_paused(), progress.task("timing " + " vs ".join(names), total=warmup + rounds + tp_rounds, unit="rounds") as task:
        lat = interleaved_rounds(models, inputs[:1], warmup=warmup, rounds=rounds, runs_per_round=runs_per_round, clock=clock, task=task)
        if tp_names:
            for name in tp_names:  # the first batch run allocates bigger buffers: not timed
                _time_ms(models[name], batch_x, clock)
            for r in range(tp_rounds):
                for name in round_order(tp_names, r):
                    tp_ms[name].append(_time_ms(models[name], batch_x, clock))
                task.advance()
    samples, per_round = lat.samples_ms, lat.rounds_ms

    def timing(name: str) -> ModelTiming:
        s = np.asarray(samples[name])
        tp = None
        if tp_ms[name]:
            tp = float(throughput_batch / (np.median(tp_ms[name]) / 1000.0))
        return ModelTiming(
            name=name,
            path=str(paths[name]),
            latency_ms_p50=float(np.percentile(s, 50)),
            latency_ms_p90=float(np.percentile(s, 90)),
            latency_ms_mean=float(np.mean(s)),
            rounds_ms=per_round[name],
            samples_ms=[float(v) for v in s],
            dynamic_batch=bool(models[name].dynamic_batch),
            throughput_batch=throughput_batch if tp is not None else None,
            throughput_ips=tp,
        )

    def ratios_over(ref: str) -> tuple[list[float], float, tuple[float, float]]:
        r = [f / i if i > 0 else float("inf") for f, i in zip(per_round[ref], per_round["int8"])]
        q25, q50, q75 = (float(v) for v in np.percentile(r, [25, 50, 75]))
        return [float(v) for v in r], q50, (q25, q75)

    ratios, speedup, iqr = ratios_over("baseline" if "baseline" in models else "fp32")
    ratios_f, speedup_f, iqr_f = ratios_over("fp32")
    fp, it = timing("fp32"), timing("int8")
    base = timing("baseline") if "baseline" in models else None
    cpu = envinfo.cpu_info()
    flags = dict(cpu.get("flags", {}))
    # The ISA class has one home (core.environment), which also honours an injected class.
    cls = envinfo.detect_cpu_class()
    vnni = bool({"avx512_vnni", "avx_vnni"} & set(cls.classes))
    amx = "amx" in cls.classes
    return SpeedResult(
        fp32=fp,
        int8=it,
        speedup=speedup,
        speedup_iqr=iqr,
        ratios=ratios,
        first_in_round=lat.first_in_round,
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
        baseline=base,
        speedup_fastest_fp32=speedup_f,
        speedup_fastest_fp32_iqr=iqr_f,
        ratios_fastest_fp32=ratios_f,
        isa_class=cls.detected or "none",
        isa_classes=list(cls.classes),
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False
