"""Progress reporting that stages can use without knowing about the terminal.

A stage takes ``progress: Progress | None`` and calls
``with progress.task("embedding fp32", total=n, unit="img") as t: t.advance(k)``.
The CLI passes :class:`RichProgress` (bars with rate and ETA on stderr);
library callers and tests get :data:`NULL_PROGRESS`, which does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol


class TaskHandle(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, *, total: float | None = None, completed: float | None = None) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None, unit: str = "it") -> contextlib.AbstractContextManager[TaskHandle]: ...
    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, completed: float | None = None) -> None:
        pass


class NullProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[TaskHandle]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


NULL_PROGRESS = NullProgress()


class _RichTask:
    def __init__(self, bar, task_id) -> None:
        self._bar = bar
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        self._bar.update(self._id, advance=n)

    def update(self, *, total: float | None = None, completed: float | None = None) -> None:
        self._bar.update(self._id, total=total, completed=completed)


class RichProgress:
    """Progress bars on stderr; bytes are shown with size and transfer rate."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[TaskHandle]:
        if not self.enabled:
            yield _NullTask()
            return
        from rich import progress as rp

        if unit == "B":
            columns = [
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.DownloadColumn(),
                rp.TransferSpeedColumn(),
                rp.TimeRemainingColumn(),
            ]
        else:
            columns = [
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn(unit),
                rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(),
            ]
        with rp.Progress(*columns, console=self.console, transient=False) as bar:
            yield _RichTask(bar, bar.add_task(description, total=total))

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)
