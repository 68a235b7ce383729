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
from functools import lru_cache
from importlib import metadata
from typing import Any

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


def environment() -> dict[str, Any]:
    """Everything a manifest records about where it was built."""
    return {
        "versions": versions(),
        "cpu": cpu_info(),
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
