"""The one error type a user can cause.

Every stage raises :class:`UserError` for problems the user can fix (a bad
path, a bad recipe, a corrupt file, a hash mismatch, the wrong model). The CLI
turns it into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: reported as one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class GateFailed(Exception):
    """The verification gate failed: exit code 1, with the reasons."""

    exit_code = 1

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def first_line(e: BaseException) -> str:
    """A library exception's message cut to its first line (or its type's name), for a one-line UserError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
