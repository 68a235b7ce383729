"""Fetch a recipe's model and data into a local cache.

A :class:`~pipeline.recipe.Source` lists mirrors (``https://``, ``http://``,
``file://`` or a plain path, relative paths against the recipe's folder) that
are tried in order. The file lands in ``cache_dir/<kind>/<name>`` beside a
sidecar ``<name>.source.json`` recording where it came from and its sha256, so
a second call is answered from the disk alone, without any network I/O.

A source with ``member`` names one file inside a zip archive. Over HTTP only
that member is read, by range requests (remotezip reads the central directory
from the archive's end, then the member's bytes): the pipeline needs ~60 MB of
an 8.1 GB archive. A server without range support falls back to downloading
the whole archive to a temporary file, with a warning.

Every byte goes to a temporary name first (``fsutil.atomic_path``) and is
hashed on the way; only a complete, verified file is renamed to its final
name. A connection dropped mid-file is detected (Content-Length, IncompleteRead)
and resumed with a Range request when the server allows it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import remotezip
import requests
import urllib3
from filelock import FileLock
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pipeline import __version__
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress, TaskHandle
from pipeline.recipe import Recipe, Source

CHUNK = 1 << 20
# urllib3 retries of failed connects and of 429/5xx answers, with exponential backoff.
RETRIES = 3
RETRY_BACKOFF = 0.5
# Body transfers per mirror: a connection dropped mid-file is resumed (Range) or restarted this often.
ATTEMPTS = 3
SIDECAR_SUFFIX = ".source.json"


@dataclass
class FetchResult:
    """One file in the cache and how it got there."""

    kind: str
    path: Path
    sha256: str
    source: str  # the URL or path that served it (for a cache hit: the one recorded when it was fetched)
    cached: bool
    pinned: bool
    size: int
    seconds: float
    member: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "source": self.source,
            "member": self.member,
            "cached": self.cached,
            "pinned": self.pinned,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


@dataclass
class DownloadResult:
    model: FetchResult
    data: FetchResult | None
    cache_dir: Path
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": self.data.to_dict() if self.data else None,
            "cache_dir": str(self.cache_dir),
            "warnings": list(self.warnings),
        }


class _MirrorFailed(Exception):
    """This mirror could not deliver the file; the next one is tried."""


class _NoRanges(Exception):
    """The server answers range requests with the whole file."""


# --- public entry points ----------------------------------------------------------


def download(
    recipe: Recipe,
    cache_dir: str | os.PathLike[str],
    *,
    offline: bool = False,
    progress: Progress | None = None,
    timeout: float = 30.0,
) -> DownloadResult:
    """Fetch the recipe's model and (if it has one) its data into ``cache_dir``.

    Relative local paths in the recipe resolve against the recipe's folder.
    ``offline``: no network; only the cache and local sources are used.
    """
    cache_dir = Path(cache_dir)
    common = dict(base_dir=recipe.base_dir, offline=offline, progress=progress, timeout=timeout)
    model = fetch(recipe.model, cache_dir, kind="model", **common)
    data = fetch(recipe.data, cache_dir, kind="data", **common) if recipe.data is not None else None
    warnings = model.warnings + (data.warnings if data else [])
    return DownloadResult(model=model, data=data, cache_dir=cache_dir, warnings=warnings)


def fetch(
    source: Source,
    cache_dir: str | os.PathLike[str],
    *,
    kind: str,
    base_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: Progress | None = None,
    timeout: float = 30.0,
    retries: int = RETRIES,
) -> FetchResult:
    """Make one source available as ``cache_dir/kind/<name>``, verified, and say how.

    Mirrors are tried in order; a mirror that fails (HTTP error, dropped
    connection, wrong sha256, missing member) gives way to the next, and when
    all fail the UserError lists each one with its reason. ``timeout`` is the
    connect and read timeout in seconds; ``retries`` bounds urllib3's retries
    of failed connects and 429/5xx answers.
    """
    progress = progress or NULL_PROGRESS
    start = time.perf_counter()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    name = cache_name(source)
    mirrors = [(url, _local_path(url, base)) for url in source.urls]
    final = Path(cache_dir) / kind / name
    sidecar = final.with_name(final.name + SIDECAR_SUFFIX)
    label = f"{kind} {name}"
    if final.is_dir():
        raise UserError(f"cannot cache {label}: {final} is a directory")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache directory {final.parent}: {e.strerror}") from None

    with _lock(final):
        hit = _cache_hit(final, sidecar, source)
        if hit is not None:
            res = FetchResult(
                kind=kind, path=final, sha256=hit["sha256"], source=hit.get("source") or str(final), cached=True,
                pinned=source.sha256 is not None, size=final.stat().st_size, seconds=time.perf_counter() - start,
                member=source.member,
            )
            _warn_unpinned(res, progress)
            return res

        if offline:
            local_mirrors = [m for m in mirrors if m[1] is not None]
            if not local_mirrors:
                why = "is not in the cache"
                if final.is_file() and source.sha256:
                    why = f"in the cache does not match the recipe's sha256 {source.sha256}"
                raise UserError(f"offline: {label} {why} ({final}); run without --offline to download it")
            mirrors = local_mirrors

        _remove_stale_parts(final)
        url, local, digest, notes, failures = _fetch_first(
            source, mirrors, final, label, progress=progress, timeout=timeout, retries=retries
        )
        size = final.stat().st_size
        meta = {
            "kind": kind,
            "name": name,
            "sha256": digest,
            "size": size,
            "source": url,
            "member": source.member,
            "local": _stat_record(local),
            "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "qpipe": __version__,
        }
        try:
            with atomic_path(sidecar) as tmp:
                tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                _shareable(tmp)
        except OSError as e:
            raise UserError(f"cannot write {sidecar}: {e.strerror or e}") from None
        failed_first = [f"{u} failed ({why})" for u, why in failures]
        for w in failed_first:
            progress.log(f"warning: {label}: {w}")
        res = FetchResult(
            kind=kind, path=final, sha256=digest, source=url, cached=False, pinned=source.sha256 is not None,
            size=size, seconds=time.perf_counter() - start, member=source.member,
            warnings=[f"{label}: {n}" for n in notes + failed_first],
        )
        _warn_unpinned(res, progress)
        return res


def _fetch_first(
    source: Source,
    mirrors: list[tuple[str, Path | None]],
    final: Path,
    label: str,
    *,
    progress: Progress,
    timeout: float,
    retries: int,
) -> tuple[str, Path | None, str, list[str], list[tuple[str, str]]]:
    """Try the mirrors in order until one delivers verified bytes under ``final``.

    Returns (url, local path or None, sha256, notes from the winning mirror,
    (url, reason) of the mirrors that failed before it).
    """
    session = _session(retries) if any(local is None for _, local in mirrors) else None
    failures: list[tuple[str, str]] = []
    try:
        with progress.task(label, total=None, unit="B") as task:
            for url, local in mirrors:
                notes: list[str] = []
                try:
                    with atomic_path(final) as tmp:
                        with _Sink(tmp, task, final) as sink:
                            _fetch_into(
                                sink, url, local, source.member, session=session, timeout=timeout,
                                progress=progress, notes=notes,
                            )
                            digest = sink.finish()
                        if source.sha256 is not None and digest != source.sha256:
                            raise _MirrorFailed(f"sha256 mismatch: expected {source.sha256}, got {digest}")
                        _shareable(tmp)
                except _MirrorFailed as e:
                    failures.append((url, _one_line(str(e))))
                    continue
                except requests.RequestException as e:  # a network error no closer handler expected
                    failures.append((url, _reason(e)))
                    continue
                except OSError as e:  # creating or renaming the temporary file (the sink reports its own writes)
                    raise UserError(f"cannot write {final}: {e.strerror or e}") from None
                return url, local, digest, notes, failures
    finally:
        if session is not None:
            session.close()
    raise UserError(_all_failed(label, failures))


def cache_name(source: Source) -> str:
    """The file's name in the cache: ``filename``, else the member's or the first URL's basename."""
    if source.filename:
        name = source.filename
    elif source.member:
        name = posixpath.basename(source.member.rstrip("/"))
    else:
        first = source.urls[0]
        parsed = urlparse(first)
        path = parsed.path if parsed.scheme.lower() in ("http", "https", "file") else first
        name = posixpath.basename(unquote(path).replace("\\", "/"))
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise UserError(
            f"cannot name the cached file for {source.urls[0]!r} (got {name!r}); set `filename:` in the recipe source"
        )
    return name


def local_data_file(recipe: Recipe, download_dir: Path) -> Path | None:
    """The recipe's verification set if it is already on disk: its copy in the download cache, or a local path it names."""
    if recipe.data is None:
        return None
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


def match_member(names: list[str], wanted: str) -> str:
    """The archive entry for ``wanted``: the exact path, else the unique entry ending in ``/wanted``.

    The real archive stores ``faces_ms1m_112x112/lfw.bin``, and recipes say ``lfw.bin``.
    """
    files = [n for n in names if not n.endswith("/")]
    if wanted in files:
        return wanted
    tail = wanted.strip("/")
    hits = [n for n in files if n == tail or n.endswith("/" + tail)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise _MirrorFailed(f"member {wanted!r} is ambiguous in the archive ({', '.join(hits[:5])}); give its full path")
    by_base: dict[str, list[str]] = {}
    for n in files:
        by_base.setdefault(posixpath.basename(n), []).append(n)
    close = difflib.get_close_matches(posixpath.basename(tail), list(by_base), n=5, cutoff=0.5)
    if close:
        hint = "close names: " + ", ".join(p for c in close for p in by_base[c])
    else:
        hint = "it holds: " + ", ".join(files[:8]) + (", ..." if len(files) > 8 else "") if files else "it is empty"
    raise _MirrorFailed(f"no member {wanted!r} in the archive ({len(files)} files; {hint})")


# --- cache ------------------------------------------------------------------------


def _cache_hit(final: Path, sidecar: Path, source: Source) -> dict[str, Any] | None:
    """The sidecar record if the cached file answers this source, else None.

    Pinned: the file's hash must equal the pin (whatever served it). Unpinned:
    the file must be the one the sidecar recorded, fetched from a URL still in
    the list (and, for a local source, that file must be unchanged).
    """
    if not final.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            meta = {}
    except (OSError, ValueError):
        meta = {}
    try:
        actual = sha256_file(final)  # re-hashed: a cache hit is verified too, not trusted
    except OSError:
        return None
    if source.sha256 is not None:
        return {**meta, "sha256": actual} if actual == source.sha256 else None
    if meta.get("sha256") != actual or meta.get("member") != source.member or meta.get("source") not in source.urls:
        return None
    local = meta.get("local")
    if isinstance(local, dict):
        now = _stat_record(Path(local.get("path", "")))
        if now is not None and now != local:
            return None
    return meta


def _stat_record(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@contextlib.contextmanager
def _lock(final: Path) -> Iterator[None]:
    """Serialise two qpipe processes filling the same cache entry."""
    lock = FileLock(str(final.with_name(f".{final.name}.lock")))
    try:
        lock.acquire()
    except OSError:
        # A read-only cache can still answer hits; a write will report the real problem.
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _shareable(tmp: Path) -> None:
    """Give a finished temporary file the mode a plain open() would (mkstemp makes it owner-only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~mask)


def _remove_stale_parts(final: Path) -> None:
    # Temporary files of a killed process (SIGKILL skips atomic_path's cleanup); we hold the entry's lock.
    for p in final.parent.glob(f".{final.name}.*.part"):
        with contextlib.suppress(OSError):
            p.unlink()


def _warn_unpinned(res: FetchResult, progress: Progress) -> None:
    if not res.pinned:
        w = (
            f"{res.kind} {res.path.name} is not pinned (sha256: null in the recipe); its sha256 is {res.sha256}: "
            "put it in the recipe to pin it"
        )
        res.warnings.append(w)
        progress.log(f"warning: {w}")


# --- writing ----------------------------------------------------------------------


class _Sink:
    """The temporary file being filled: counts, hashes and reports bytes as they are written.

    A write that fails (disk full, I/O error) is the user's environment, not a
    bad mirror: it becomes a UserError at once instead of trying the next URL.
    """

    def __init__(self, path: Path, task: TaskHandle, final: Path) -> None:
        self.path = path
        self.final = final
        self._task = task
        self.size = 0
        self._hash = hashlib.sha256()
        try:
            self._f = open(path, "wb")
        except OSError as e:
            raise self._error(e) from None

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._f.closed:
            with contextlib.suppress(OSError):
                self._f.close()

    def _error(self, e: OSError) -> UserError:
        what = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            what = f"{what} (disk full after {self.size:,} bytes)"
        return UserError(f"cannot write {self.final}: {what}")

    def expect(self, total: int | None) -> None:
        """Announce the final size: sets the bar's total and checks the free disk space first."""
        self._task.update(total=total, completed=self.size)
        if total is None:
            return
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return
        need = total - self.size
        if need > free:
            raise UserError(
                f"not enough disk space for {self.final.name}: {_human(need)} needed, {_human(free)} free in {self.path.parent}"
            )

    def write(self, chunk: bytes) -> None:
        try:
            self._f.write(chunk)
        except OSError as e:
            raise self._error(e) from None
        self._hash.update(chunk)
        self.size += len(chunk)
        self._task.advance(len(chunk))

    def restart(self) -> None:
        try:
            self._f.seek(0)
            self._f.truncate()
        except OSError as e:
            raise self._error(e) from None
        self._hash = hashlib.sha256()
        self.size = 0
        self._task.update(completed=0)

    def finish(self) -> str:
        """Flush to disk and return the sha256 of everything written."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise self._error(e) from None
        return self._hash.hexdigest()


# --- one mirror -------------------------------------------------------------------


def _fetch_into(
    sink: _Sink,
    url: str,
    local: Path | None,
    member: str | None,
    *,
    session: requests.Session | None,
    timeout: float,
    progress: Progress,
    notes: list[str],
) -> None:
    if local is not None:
        if member:
            _local_member(local, member, sink)
        else:
            _copy_local(local, sink)
    elif member:
        assert session is not None
        _http_member(session, url, member, sink, timeout=timeout, progress=progress, notes=notes)
    else:
        assert session is not None
        _http_file(session, url, sink, timeout=timeout)


def _local_path(url: str, base_dir: Path) -> Path | None:
    """The filesystem path of a ``file:`` URL or a plain path; None for http(s)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        host = parsed.netloc
        if host in ("", "localhost"):
            raw = url2pathname(parsed.path)
        elif host in (".", ".."):
            # file://../x is not RFC 8089, but its meaning is plain: a path relative to the recipe.
            raw = host + url2pathname(parsed.path)
        else:
            raise UserError(f"file URL names a remote host {host!r}: {url} (use file:///absolute/path or a plain path)")
    elif scheme and len(scheme) > 1:
        raise UserError(f"unsupported URL scheme {scheme!r} in {url}: use https://, http://, file:// or a local path")
    else:
        raw = url
    p = Path(raw).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


def _copy_local(path: Path, sink: _Sink) -> None:
    if not path.exists():
        raise _MirrorFailed(f"no such file: {path}")
    if path.is_dir():
        raise _MirrorFailed(f"is a directory: {path}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _MirrorFailed(f"cannot read {path}: {e.strerror}") from None
    with f:
        sink.expect(os.fstat(f.fileno()).st_size)
        while True:
            try:
                chunk = f.read(CHUNK)
            except OSError as e:
                raise _MirrorFailed(f"cannot read {path}: {e.strerror}") from None
            if not chunk:
                return
            sink.write(chunk)


def _local_member(path: Path, member: str, sink: _Sink) -> None:
    if not path.is_file():
        raise _MirrorFailed(f"no such file: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _MirrorFailed(f"not a zip archive: {path}") from None
    except OSError as e:
        raise _MirrorFailed(f"cannot read {path}: {e.strerror}") from None
    with zf:
        _copy_member(zf, match_member(zf.namelist(), member), sink)


def _copy_member(zf: zipfile.ZipFile, name: str, sink: _Sink) -> None:
    """Stream one member into the sink; zipfile checks its CRC at the end."""
    info = zf.getinfo(name)
    sink.expect(info.file_size)
    try:
        with zf.open(info) as m:
            while chunk := m.read(CHUNK):
                sink.write(chunk)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
        raise _MirrorFailed(f"cannot extract {name}: {_one_line(str(e)) or type(e).__name__}") from None
    if sink.size != info.file_size:
        raise _MirrorFailed(f"cannot extract {name}: got {sink.size} of {info.file_size} bytes")


# --- HTTP -------------------------------------------------------------------------


def _session(retries: int) -> requests.Session:
    s = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=RETRY_BACKOFF,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,  # the last answer comes back and is reported as "HTTP 503 ..."
    )
    adapter = HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    # identity: the bytes on the wire are the file, so Content-Length and Range offsets count file bytes.
    s.headers.update({"User-Agent": f"qpipe/{__version__}", "Accept-Encoding": "identity"})
    return s


def _http_file(session: requests.Session, url: str, sink: _Sink, *, timeout: float) -> None:
    """GET ``url`` into the sink; a dropped body is resumed with Range (If-Range) or restarted."""
    total: int | None = None
    validator: str | None = None
    ranges = False
    failure = ""
    for attempt in range(ATTEMPTS):
        resume = sink.size > 0 and ranges and validator is not None
        headers = {"Range": f"bytes={sink.size}-", "If-Range": validator} if resume else {}
        if sink.size and not resume:
            sink.restart()
        try:
            r = session.get(url, stream=True, timeout=timeout, headers=headers)
        except requests.RequestException as e:
            if attempt == 0:
                raise _MirrorFailed(_reason(e)) from None
            failure = f"{failure}; then {_reason(e)}"
            continue
        with r:
            if r.status_code == 206 and resume and _range_start(r) == sink.size:
                pass
            elif r.status_code == 200:
                if sink.size:
                    sink.restart()  # the server sent the whole file again (resource changed or Range ignored)
                encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
                # A server that compresses anyway: Content-Length and Range count encoded bytes, not ours.
                total = None if encoded else _int_header(r, "Content-Length")
                ranges = not encoded and r.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
                etag = r.headers.get("ETag")
                validator = etag if etag and not etag.startswith("W/") else r.headers.get("Last-Modified")
            elif r.status_code >= 400:
                raise _MirrorFailed(f"HTTP {r.status_code} {r.reason}".strip())
            else:
                ranges = False  # an unusable partial answer: start over without Range
                failure = f"unexpected HTTP {r.status_code} to a resume request"
                continue
            sink.expect(total)
            try:
                # read1, not iter_content: bytes that arrived before a drop are kept, so a resume starts after them.
                while chunk := r.raw.read1(CHUNK):
                    sink.write(chunk)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                failure = f"connection dropped after {sink.size:,} of {_of(total)} bytes ({_reason(e)})"
                continue
            if total is not None and sink.size != total:
                failure = f"connection dropped after {sink.size:,} of {_of(total)} bytes"
                continue
            return
    raise _MirrorFailed(f"{failure} [{ATTEMPTS} attempts]")


def _http_member(
    session: requests.Session,
    url: str,
    member: str,
    sink: _Sink,
    *,
    timeout: float,
    progress: Progress,
    notes: list[str],
) -> None:
    """Read one zip member over HTTP by range requests; without range support, download the archive."""
    failure = ""
    for _ in range(ATTEMPTS):
        if sink.size:
            sink.restart()
        try:
            zf = _remote_zip(session, url, timeout)
        except _NoRanges:
            break
        except zipfile.BadZipFile:
            raise _MirrorFailed("not a zip archive (no central directory at its end)") from None
        except (remotezip.RemoteZipError, requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise _MirrorFailed(_reason(e)) from None
        with zf:
            name = match_member(zf.namelist(), member)
            try:
                _copy_member(zf, name, sink)
                return
            except (remotezip.RemoteZipError, requests.RequestException, urllib3.exceptions.HTTPError, EOFError) as e:
                failure = f"connection dropped while reading {name} after {sink.size:,} bytes ({_reason(e)})"
                continue
    else:
        raise _MirrorFailed(f"{failure} [{ATTEMPTS} attempts]")

    notes.append(f"{url} does not support HTTP range requests: downloading the whole archive to extract {member}")
    progress.log(f"warning: {notes[-1]}")
    # Named like atomic_path's temporaries, so a killed run's leftover is swept by _remove_stale_parts.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{sink.final.name}.archive.", suffix=".zip.part", dir=sink.final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with progress.task(f"archive {posixpath.basename(urlparse(url).path)}", total=None, unit="B") as task:
            with _Sink(tmp, task, tmp) as archive:
                _http_file(session, url, archive, timeout=timeout)
                archive.finish()
        _local_member(tmp, member, sink)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _remote_zip(session: requests.Session, url: str, timeout: float) -> remotezip.RemoteZip:
    """Open the archive by range requests: a suffix range first, then HEAD + explicit range."""
    for suffix in (True, False):
        responses: list[requests.Response] = []

        def keep(r: requests.Response, *args: Any, **kwargs: Any) -> None:
            responses.append(r)

        try:
            return remotezip.RemoteZip(
                url, session=session, support_suffix_range=suffix, timeout=timeout, hooks={"response": [keep]}
            )
        except remotezip.RangeNotSupported:
            # remotezip leaves the rejected whole-file answer open; close it rather than leave it streaming.
            for r in responses:
                r.close()
    raise _NoRanges


def _range_start(r: requests.Response) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _int_header(r: requests.Response, name: str) -> int | None:
    try:
        return int(r.headers[name])
    except (KeyError, ValueError):
        return None


def _of(total: int | None) -> str:
    return f"{total:,}" if total is not None else "?"


def _reason(e: BaseException) -> str:
    """A short, one-line cause for a network exception (requests' own messages run to several hundred characters)."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, requests.HTTPError) and x.response is not None:
            return f"HTTP {x.response.status_code} {x.response.reason}".strip()
    for x in chain:
        if isinstance(x, urllib3.exceptions.NameResolutionError):
            m = re.search(r"resolve '([^']+)'", str(x))
            return f"cannot resolve host {m.group(1)}" if m else "cannot resolve host"
    text = " ".join(str(x) for x in chain)
    if "RemoteDisconnected" in text or "without response" in text:
        return "server closed the connection without a response"
    # urllib3 2 makes NewConnectionError a ConnectTimeoutError: look for the OS error before calling it a timeout.
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().rstrip(".")
    for x in chain:
        if isinstance(x, (requests.Timeout, urllib3.exceptions.TimeoutError)):
            return "timed out"
        if isinstance(x, requests.exceptions.SSLError):
            return "TLS error"
        if isinstance(x, (urllib3.exceptions.IncompleteRead, urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError)):
            return "incomplete read"
    return _one_line(str(e))[:200] or type(e).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _all_failed(label: str, failures: list[tuple[str, str]]) -> str:
    if len(failures) == 1:
        url, why = failures[0]
        return f"cannot fetch {label} from {url}: {why}"
    listed = "; ".join(f"{url}: {why}" for url, why in failures)
    return f"cannot fetch {label}: all {len(failures)} sources failed: {listed}"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
