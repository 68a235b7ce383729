"""Hashing and atomic writes shared by every stage.

Nothing a stage writes may appear under its final name half-written: it is
written to a temporary name in the same directory and renamed (``os.replace``
is atomic on one filesystem), and the temporary file is removed on any error,
including KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import UserError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success.

    The caller writes the temporary path however it likes (onnx.save, a
    library's ``save(path)``); on any exception the temporary file is removed
    and ``final`` is untouched.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {final.parent}: {e.strerror}") from e
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # A write error carries no file name; say which file could not be written.
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot write {final}: {e.strerror or 'no space left'} (disk full)") from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a Path if it is a readable, non-empty regular file, else a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        raise UserError(f"{what} is a directory, expected a file: {p}")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror}") from e
    if size == 0:
        raise UserError(f"{what} is empty: {p}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} is not readable: {p}")
    return p
