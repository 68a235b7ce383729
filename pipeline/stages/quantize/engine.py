"""What an engine is to the stage: one call that quantizes, and what it hands back.

Both engines (:mod:`~pipeline.stages.quantize.inc`, :mod:`~pipeline.stages.quantize.ort`)
are called as ``engine.quantize(model_path, facts, data, q, scheme, *, work, progress,
eval_bin, spec, label)``: ``scheme`` (one weight range for every weight, see
:meth:`QuantScheme.uniform`) says what the recipe's settings mean, ``q`` carries the
settings that need no interpretation (format, exclusions, tuning, pass-through options)
and ``work`` is a scratch directory the stage removes afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import onnx


@dataclass
class EngineRun:
    model: onnx.ModelProto
    warnings: list[str] = field(default_factory=list)
    tuning: dict[str, Any] | None = None


@dataclass(frozen=True)
class Engine:
    quantize: Callable[..., EngineRun]
    # While active, a second run on the same model and data reuses the first run's activation
    # ranges (the 8-bit and 7-bit runs of one quantize differ only in their weights).
    shared_calibration: Callable[[], ContextManager[None]] = contextlib.nullcontext


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def quiet_libraries(logger_name: str) -> Iterator[LogCapture]:
    """Route a library's log to a capture (warnings and errors kept) and silence onnxruntime's C++ log."""
    import onnxruntime as ort

    log = logging.getLogger(logger_name)
    saved = (list(log.handlers), log.level, log.propagate)
    cap = LogCapture()
    log.handlers[:] = [cap]
    log.setLevel(logging.WARNING)
    log.propagate = False
    ort.set_default_logger_severity(3)
    try:
        yield cap
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
        ort.set_default_logger_severity(2)
