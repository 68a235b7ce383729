"""A Progress for tests that keeps the notes a stage logs."""

from __future__ import annotations


class Logs:
    """A Progress that records its notes."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def task(self, description, total=None, unit="it"):
        from pipeline.core.progress import NULL_PROGRESS

        return NULL_PROGRESS.task(description, total, unit)

    def log(self, message: str) -> None:
        self.lines.append(message)
