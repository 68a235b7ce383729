"""The artifact manifest: what an artifact directory holds and how it was made.

``manifest.json`` is written last into an artifact directory; a directory
without one is unfinished. It lists every file with its sha256 and size, the
sources the inputs came from (pinned or recorded hashes), the resolved recipe
and its hash, library versions, CPU facts, qpipe's git commit, per-stage wall
time and peak memory, the gate result and timestamps.

Reproducibility contract: two builds of the same recipe on the same machine
give manifests that differ only in timestamps (``created``), durations and
memory and stage reuse (``execution``), and the hashes of files flagged
``measured`` (reports and the model card quote latencies). :func:`diff_manifests` and
:func:`unexplained_differences` check exactly that.

Paths that start with a dot (the run's bookkeeping in ``.state/``, the lock,
temporary ``.name.part`` files of atomic writes) are not part of the artifact.

This module imports only the standard library and qpipe's small helpers, so
``python -m pipeline.cli.ci manifest DIR`` checks a downloaded artifact without the
heavy dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_json, atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA = "qpipe.artifact-manifest/1"

# Top-level keys whose values legitimately change from one identical build to the next.
VOLATILE_KEYS = ("created", "execution")


# --- listing and hashing --------------------------------------------------------


def _is_bookkeeping(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def artifact_paths(directory: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of the artifact's files, sorted: no manifest, no dot-paths, no symlinked dirs."""
    root = Path(directory)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            rel = PurePosixPath(path.relative_to(root).as_posix())
            if _is_bookkeeping(rel) or str(rel) == MANIFEST_NAME or not path.is_file():
                continue
            out.append(str(rel))
    return sorted(out)


def list_files(directory: str | os.PathLike[str], *, measured: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Every artifact file under ``directory`` (recursively, sorted): sha256 and size.

    ``manifest.json`` itself and dot-paths are left out. Names in ``measured``
    are flagged: their content quotes timings, so their hash varies between
    otherwise identical builds.
    """
    root = Path(directory)
    measured = set(measured)
    out: dict[str, dict[str, Any]] = {}
    for rel in artifact_paths(root):
        path = root / rel
        entry: dict[str, Any] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        if rel in measured:
            entry["measured"] = True
        out[rel] = entry
    return out


def write_manifest(directory: str | os.PathLike[str], body: dict[str, Any], *, measured: Iterable[str] = ()) -> dict[str, Any]:
    """Hash every file in ``directory`` and write ``manifest.json`` atomically; return the manifest.

    Call it after every other file of the artifact is in place: the manifest's
    presence is what marks the directory finished.
    """
    manifest = {"schema": SCHEMA, **body, "files": list_files(directory, measured=measured)}
    atomic_write_text(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and sanity-check ``DIR/manifest.json``; a UserError (exit 2) when missing or invalid."""
    root = Path(directory)
    if not root.exists():
        raise UserError(f"artifact directory not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a directory: {root} (give the artifact directory that holds {MANIFEST_NAME})")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {root}: not a finished artifact directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"invalid {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"invalid {path}: schema is {found!r}, expected {SCHEMA!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UserError(f"invalid {path}: 'files' must be a mapping of path -> {{sha256, size}}")
    for rel, entry in files.items():
        p = PurePosixPath(rel)
        # A manifest must not make the checker read outside the artifact.
        if p.is_absolute() or ".." in p.parts or not rel or _is_bookkeeping(p):
            raise UserError(f"invalid {path}: file entry {rel!r} is not a plain path inside the directory")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise UserError(f"invalid {path}: file entry {rel!r} needs a sha256 string and an integer size")
    return manifest


# --- the int8 model's manifest ---------------------------------------------------


def quantize_manifest(
    int8: str | os.PathLike[str], body: dict[str, Any], *, recovery: dict[str, Any] | None = None, placement: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``qpipe quantize``'s manifest of the int8 model at ``int8``.

    ``body``: what the quantize stage recorded for the model
    (``QuantizeResult.manifest_body()``); its ``files.int8`` entry is made to name
    ``int8``, where the model now is (recovery and placement quantize their candidates
    elsewhere). ``recovery`` and ``placement``: their sections, when they ran.
    """
    manifest = dict(body)
    files = dict(manifest.get("files") or {})
    files["int8"] = {**(files.get("int8") or {}), "path": str(Path(int8))}
    manifest["files"] = files
    if recovery is not None:
        manifest["recovery"] = recovery
    if placement is not None:
        manifest["placement"] = placement
    return manifest


def write_quantize_manifest(
    int8: str | os.PathLike[str], body: dict[str, Any], *, recovery: dict[str, Any] | None = None, placement: dict[str, Any] | None = None
) -> Path:
    """Write :func:`quantize_manifest` as ``manifest.json`` beside the int8 model; return its path."""
    out = Path(int8).parent / MANIFEST_NAME
    atomic_write_json(out, quantize_manifest(int8, body, recovery=recovery, placement=placement))
    return out


# --- verification ---------------------------------------------------------------


@dataclass
class Changed:
    path: str
    expected_sha256: str
    actual_sha256: str
    expected_size: int
    actual_size: int


@dataclass
class ManifestCheck:
    """The result of re-hashing an artifact directory against its manifest."""

    directory: Path
    checked: int
    missing: list[str] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    extra_allowed: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing and not self.changed and (self.extra_allowed or not self.extra)

    def problems(self) -> list[str]:
        out = [f"missing: {p}" for p in self.missing]
        out += [
            f"changed: {c.path} (sha256 {c.expected_sha256[:12]}... -> {c.actual_sha256[:12]}..., "
            f"size {c.expected_size} -> {c.actual_size})"
            for c in self.changed
        ]
        if not self.extra_allowed:
            out += [f"not in manifest: {p}" for p in self.extra]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["ok"] = self.ok
        d["problems"] = self.problems()
        return d


def verify_manifest(directory: str | os.PathLike[str], *, allow_extra: bool = False) -> ManifestCheck:
    """Re-hash every file the manifest lists and report every difference.

    Missing and changed files always count; files present but not listed count
    unless ``allow_extra``. A missing or invalid manifest is a UserError.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    check = ManifestCheck(directory=root, checked=len(listed), extra_allowed=allow_extra)
    for rel, entry in sorted(listed.items()):
        path = root / rel
        if not path.is_file():
            check.missing.append(rel)
            continue
        actual = sha256_file(path)
        size = path.stat().st_size
        if actual != entry["sha256"] or size != entry["size"]:
            check.changed.append(Changed(rel, entry["sha256"], actual, entry["size"], size))
    check.extra = sorted(set(artifact_paths(root)) - set(listed))
    return check


# --- provenance -------------------------------------------------------------------


def git_revision(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """qpipe's git commit and whether the work tree differs from it; None outside a checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or not (Path(top.stdout.strip()) / "pipeline" / "build" / "manifest.py").is_file():
            return None  # not qpipe's own checkout (e.g. an installed wheel inside some other repo)
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance() -> dict[str, Any]:
    """Software and machine facts for the manifest (versions, CPU, git)."""
    from pipeline import __version__
    from pipeline.core.environment import environment

    env = environment()
    return {"qpipe": {"version": __version__, "git": git_revision()}, "environment": env}


# --- comparing two builds -----------------------------------------------------------


def diff_manifests(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two manifests differ (a key present in only one counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out += diff_manifests(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff_manifests(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [path]


def unexplained_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Differences between two manifests other than timestamps, durations and measured files."""
    out = []
    for p in diff_manifests(a, b):
        top = p.split(".", 1)[0].split("[", 1)[0]
        if top in VOLATILE_KEYS:
            continue
        if p.startswith("files."):
            rel, _, attr = p[len("files.") :].rpartition(".")
            ea, eb = a["files"].get(rel), b["files"].get(rel)
            if ea and eb and ea.get("measured") and eb.get("measured") and attr in ("sha256", "size"):
                continue
        out.append(p)
    return out
