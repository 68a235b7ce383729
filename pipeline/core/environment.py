"""Facts about the machine and software a result was produced on.

Manifests and reports record these so a figure can be traced to the library
versions and CPU features (int8 speed depends on VNNI/AMX) that produced it.
Nothing here imports the heavy libraries: versions come from package metadata.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Iterable, Mapping

from pipeline.core.errors import UserError

# Distribution names as pip knows them.
TRACKED_PACKAGES = ("onnx", "onnxruntime", "neural-compressor", "numpy", "opencv-python-headless", "qpipe")

# CPU flags that decide which int8 kernels onnxruntime can use.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Python and the tracked packages' versions (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in TRACKED_PACKAGES:
        out[dist] = package_version(dist)
    return out


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model, int8-relevant flags, physical and logical core counts."""
    import psutil

    model, flags = _read_cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "flags": {name: name in flags for name in INT8_FLAGS},
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count(),
    }


def physical_cores() -> int:
    return int(cpu_info()["physical_cores"] or 1)


# --- ISA classes: which int8 kernels the CPU runs, and so which speed threshold applies ---------

# Most capable first. Each class needs every flag listed for it in /proc/cpuinfo.
ISA_CLASSES = ("amx", "avx512_vnni", "avx_vnni", "avx2")
CLASS_FLAGS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_tile", "amx_int8"),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "avx2": ("avx2",),
}
# What an injected class stands for: the classes every real CPU of that class also has
# (Sapphire Rapids and later have VNNI in both encodings; Cascade Lake has no AVX-VNNI).
CLASS_IMPLIES: dict[str, tuple[str, ...]] = {
    "amx": ("amx", "avx512_vnni", "avx_vnni", "avx2"),
    "avx512_vnni": ("avx512_vnni", "avx2"),
    "avx_vnni": ("avx_vnni", "avx2"),
    "avx2": ("avx2",),
}
# Replaces /proc/cpuinfo for the class decision: a class name, or `none` (a CPU in no class).
CPU_CLASS_ENV = "QPIPE_CPU_CLASS"
# A name for the machine a build was measured on (a CI runner label); recorded, not interpreted.
TARGET_ENV = "QPIPE_TARGET"
DEFAULT_THRESHOLD_KEY = "default"


@dataclass(frozen=True)
class CpuClass:
    """The ISA classes a CPU belongs to and the evidence for them."""

    classes: tuple[str, ...]  # most capable first; empty: none of ISA_CLASSES
    flags: tuple[str, ...]  # the class-deciding flags found (or implied by an injected class)
    source: str  # "/proc/cpuinfo" or the environment variable that injected the class

    @property
    def detected(self) -> str | None:
        return self.classes[0] if self.classes else None

    def evidence(self) -> str:
        if self.source != "/proc/cpuinfo":
            return f"{self.source}={self.detected or 'none'}"
        if self.flags:
            return f"flags {', '.join(self.flags)} in /proc/cpuinfo"
        return f"none of the flags {', '.join(f for c in ISA_CLASSES for f in CLASS_FLAGS[c])} in /proc/cpuinfo"

    def to_dict(self) -> dict[str, Any]:
        return {"detected": self.detected, "classes": list(self.classes), "flags": list(self.flags), "source": self.source}


def classes_from_flags(flags: Iterable[str]) -> CpuClass:
    """The classes whose flags are all in ``flags`` (most capable first)."""
    have = set(flags)
    classes = tuple(c for c in ISA_CLASSES if all(f in have for f in CLASS_FLAGS[c]))
    found = tuple(f for c in ISA_CLASSES for f in CLASS_FLAGS[c] if f in have)
    return CpuClass(classes=classes, flags=tuple(dict.fromkeys(found)), source="/proc/cpuinfo")


def detect_cpu_class(flags: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> CpuClass:
    """The measuring CPU's ISA classes: from ``$QPIPE_CPU_CLASS`` when set, else from ``flags`` (default: /proc/cpuinfo)."""
    env = os.environ if env is None else env
    injected = (env.get(CPU_CLASS_ENV) or "").strip().lower()
    if injected:
        if injected == "none":
            return CpuClass(classes=(), flags=(), source=CPU_CLASS_ENV)
        if injected not in CLASS_IMPLIES:
            raise UserError(f"{CPU_CLASS_ENV}={injected!r} is not an ISA class: use one of {', '.join(ISA_CLASSES)} or none")
        classes = CLASS_IMPLIES[injected]
        return CpuClass(classes=classes, flags=tuple(f for c in classes for f in CLASS_FLAGS[c]), source=CPU_CLASS_ENV)
    if flags is None:
        flags = _read_cpuinfo()[1]
    return classes_from_flags(flags)


@dataclass(frozen=True)
class SpeedThreshold:
    """The speed threshold the gate applies on this CPU, and why."""

    min_speedup: float
    cpu: CpuClass
    applied_class: str | None  # the table's key that applied; None: no per-class table (gate.min_speedup)
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.cpu.to_dict(), "threshold_class": self.applied_class, "min_speedup": self.min_speedup, "why": self.why}

    def annotate(self, gate: dict[str, Any]) -> dict[str, Any]:
        """A gate result (verify's) with the class decision recorded and named in a speed failure."""
        out = {**gate, "cpu_class": self.to_dict()}
        out["reasons"] = [f"{r} [threshold: {self.why}]" if r.startswith("speedup ") else r for r in gate.get("reasons", [])]
        return out


def speed_threshold(min_speedup: float, by_class: Mapping[str, float] | None, cpu: CpuClass | None = None) -> SpeedThreshold:
    """Pick the gate's speed threshold for ``cpu`` (default: :func:`detect_cpu_class`).

    Without a table, ``min_speedup`` applies on every CPU. With one, the most
    capable class in the table that the CPU has applies (an AMX CPU gated by a
    table naming only avx512_vnni and avx2 uses the avx512_vnni figure, since
    it runs those kernels too); a CPU in none of the named classes uses the
    table's ``default`` entry, and without one it is a UserError.
    """
    cpu = detect_cpu_class() if cpu is None else cpu
    evidence = cpu.evidence()
    seen = f"CPU class {cpu.detected or 'none'} ({evidence})"
    if not by_class:
        return SpeedThreshold(float(min_speedup), cpu, None, f"{seen}; gate.min_speedup applies on every CPU")
    for c in cpu.classes:
        if c in by_class:
            because = "its most capable class" if c == cpu.detected else "the most capable class it has that the table names"
            return SpeedThreshold(float(by_class[c]), cpu, c, f"{seen}; gate.min_speedup_by_class.{c}: {because}")
    named = ", ".join(k for k in ISA_CLASSES if k in by_class)
    if DEFAULT_THRESHOLD_KEY in by_class:
        return SpeedThreshold(
            float(by_class[DEFAULT_THRESHOLD_KEY]), cpu, DEFAULT_THRESHOLD_KEY,
            f"{seen}; gate.min_speedup_by_class.default: the CPU is in none of the named classes ({named})",
        )
    raise UserError(
        f"the measuring CPU is in none of the classes gate.min_speedup_by_class names ({named}): {seen}; "
        f"run on a CPU of one of those classes, or give the recipe a threshold for other CPUs as gate.min_speedup_by_class.default"
    )


def environment() -> dict[str, Any]:
    """Everything a manifest records about where it was built."""
    return {
        "versions": versions(),
        "cpu": {**cpu_info(), "isa_class": detect_cpu_class().to_dict()},
        "target": os.environ.get(TARGET_ENV) or None,
        "os": f"{platform.system()} {platform.release()}",
        "python_implementation": sys.implementation.name,
    }


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


class PeakMemory:
    """Peak RSS during a ``with`` block (sampled every ``interval`` s), in MiB.

    The process-wide peak (``ru_maxrss``) cannot be reset, so one stage of a
    longer run samples its own peak instead; spikes shorter than the interval
    may be missed, so the figure is a lower bound.

        with PeakMemory() as mem:
            ...
        mem.peak_mb
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="qpipe-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._t0
