"""`qpipe run`: download, convert, quantize and verify into one artifact directory.

Layout under the artifact root (``artifacts/`` or ``--workdir``)::

    <recipe name>/
      .lock                       one run at a time per recipe name
      latest -> <date>-<hash>     newest finished build whose gate passed (or a LATEST text file)
      <date>-<hash>/
        fp32.onnx int8.onnx       converted fp32 model and its int8 quantization
        fp32-given.onnx           the model converted but not rewritten (only when convert.prelu changed
                                  the graph): the baseline of the speedup the gate reads
        report.json report.md report.png
        recipe.yaml               the resolved recipe with both inputs pinned by sha256
        MODEL_CARD.md
        manifest.json             written last: its presence marks the build finished
        .state/                   per-stage input hashes and work space (not part of the artifact)

``<hash>`` is a short hash of the inputs (model sha256, data sha256, resolved
recipe hash), so the same inputs map to the same directory (the date is the
day it was first built). Each stage records the hash of its inputs and
settings and of its outputs; a later run reuses a stage whose record still
matches and whose outputs are intact, and re-runs it otherwise. Stage outputs
are produced in ``.state/work/<stage>/`` and moved to their final names only
when the stage has finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_json, atomic_write_text, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.recipe import Recipe, Source

DEFAULT_ROOT = Path("artifacts")
DEFAULT_CACHE = Path("calibration") / "downloads"
DEFAULT_EMBEDDINGS = Path("calibration") / "embeddings"
LOCK_NAME = ".lock"
STATE_DIR = ".state"
LATEST = "latest"
LATEST_FILE = "LATEST"
SHORT_HASH = 12

FP32_NAME = "fp32.onnx"
# The user's model converted but not rewritten: kept when convert.prelu changed the graph, as verify's speed baseline.
FP32_GIVEN_NAME = "fp32-given.onnx"
INT8_NAME = "int8.onnx"
REPORT_FILES = ("report.json", "report.md", "report.png")
CARD_NAME = "MODEL_CARD.md"
RECIPE_COPY = "recipe.yaml"
# Files whose content quotes measured timings: their hashes differ between identical builds.
MEASURED_FILES = (*REPORT_FILES, CARD_NAME)

# Keys of stage results that describe this execution rather than its product: durations, memory,
# and warnings (libraries log some only once per process): kept under the manifest's `execution`.
_TIMING_KEYS = {"seconds", "wall_s", "peak_rss_mb", "peak_mb", "timing", "created", "warnings"}
# Parts of quantize's own manifest that the artifact manifest holds already (or that are timings).
_STAGE_MANIFEST_DROP = {"schema", "recipe", "environment", "timing", "created", "warnings"}


@dataclass
class StageRecord:
    """One stage of a run: whether it was reused, what it cost, what it made."""

    name: str
    key: str
    reused: bool
    wall_s: float
    peak_rss_mb: float
    outputs: dict[str, str]  # file name in the artifact directory -> sha256
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "reused": self.reused,
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "outputs": dict(self.outputs),
        }


@dataclass
class RunResult:
    recipe: str
    directory: Path
    gate: dict[str, Any]
    stages: dict[str, StageRecord]
    manifest: Path
    model_card: Path
    latest: Path | None
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))

    @property
    def int8(self) -> Path:
        return self.directory / INT8_NAME

    @property
    def fp32(self) -> Path:
        return self.directory / FP32_NAME

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "directory": str(self.directory),
            "passed": self.passed,
            "gate": self.gate,
            "int8": str(self.int8),
            "fp32": str(self.fp32),
            "manifest": str(self.manifest),
            "model_card": str(self.model_card),
            "latest": str(self.latest) if self.latest else None,
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "warnings": list(self.warnings),
        }


# --- hashing of inputs ----------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def input_id(model_sha256: str, data_sha256: str | None, recipe_sha256: str) -> str:
    """The short hash naming a build directory: same inputs, same directory."""
    return _hash({"model": model_sha256, "data": data_sha256, "recipe": recipe_sha256})[:SHORT_HASH]


def _source_id(src: Source | None) -> str:
    if src is None:
        return "none"
    if src.sha256:
        return src.sha256
    return "unpinned-" + _hash({"urls": src.urls, "member": src.member})[:16]


def download_cache_key(recipe: Recipe) -> str:
    """CI cache key for the download cache: the inputs' pinned sha256 (an unpinned source: its URLs)."""
    return f"qpipe-downloads-{_source_id(recipe.model)}-{_source_id(recipe.data)}"


# --- stage state ----------------------------------------------------------------------


class _State:
    """``.state/stages.json``: per stage the key (hash of inputs and settings) and output hashes."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / STATE_DIR
        self.path = self.dir / "stages.json"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.stages: dict[str, Any] = data.get("stages", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.stages = {}

    def work(self, stage: str) -> Path:
        w = self.dir / "work" / stage
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        return w

    def save(self) -> None:
        atomic_write_json(self.path, {"stages": self.stages})

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()

    def reusable(self, stage: str, key: str, run_dir: Path) -> dict[str, Any] | None:
        rec = self.stages.get(stage)
        if not isinstance(rec, dict) or rec.get("key") != key:
            return None
        outputs = rec.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return None
        for name, sha in outputs.items():
            p = run_dir / name
            if not p.is_file() or sha256_file(p) != sha:
                return None
        return rec


def _run_stage(
    name: str,
    key: str,
    state: _State,
    run_dir: Path,
    body: Callable[[Path], tuple[dict[str, Any], list[str]]],
    progress: Progress,
) -> StageRecord:
    """Reuse stage ``name`` if its record matches ``key``, else run ``body(work_dir)``.

    ``body`` writes its files into the work directory and returns (result dict,
    names of the files that make up its output); those are then moved into
    the artifact directory and the record saved.
    """
    from pipeline.core.environment import PeakMemory

    rec = state.reusable(name, key, run_dir)
    if rec is not None:
        progress.log(f"{name}: reused (inputs and settings unchanged)")
        return StageRecord(
            name=name, key=key, reused=True, wall_s=float(rec.get("wall_s", 0.0)), peak_rss_mb=float(rec.get("peak_rss_mb", 0.0)),
            outputs=dict(rec["outputs"]), result=rec.get("result", {}),
        )
    state.forget(name)
    work = state.work(name)
    with PeakMemory() as mem:
        result, produced = body(work)
    outputs: dict[str, str] = {}
    for fname in produced:
        src = work / fname
        if not src.is_file():
            raise RuntimeError(f"stage {name} did not write {fname}")
        outputs[fname] = sha256_file(src)
        os.replace(src, run_dir / fname)
    rec = {"key": key, "outputs": outputs, "wall_s": mem.seconds, "peak_rss_mb": mem.peak_mb, "result": result}
    state.stages[name] = rec
    state.save()
    shutil.rmtree(work, ignore_errors=True)
    return StageRecord(name=name, key=key, reused=False, wall_s=mem.seconds, peak_rss_mb=mem.peak_mb, outputs=outputs, result=result)


# --- locking and the latest pointer -----------------------------------------------------


@contextlib.contextmanager
def _locked(name_dir: Path, timeout: float, progress: Progress) -> Iterator[None]:
    """Hold ``<name>/.lock``: a second run waits (saying so) and gives up after ``timeout`` s."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(name_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.log(f"waiting for another qpipe run on {name_dir} (lock {name_dir / LOCK_NAME}, up to {timeout:.0f} s)")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise UserError(
                f"another qpipe run is building {name_dir} (lock {name_dir / LOCK_NAME} held for more than {timeout:.0f} s); "
                "try again when it has finished, or use another --workdir"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _finished_builds(name_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(finished_at, dir, manifest) for every build directory with a readable manifest."""
    out = []
    for d in name_dir.iterdir() if name_dir.is_dir() else []:
        m = d / "manifest.json"
        if d.is_symlink() or not d.is_dir() or d.name.startswith(".") or not m.is_file():
            continue
        try:
            man = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(man, dict):
            out.append((str(man.get("created", {}).get("finished_at", "")), d, man))
    return sorted(out, key=lambda t: (t[0], t[1].name))


def _point_latest(name_dir: Path, exclude: Path | None = None) -> Path | None:
    """Point ``latest`` at the newest finished build whose gate passed; remove it when there is none."""
    candidates = [d for _, d, man in _finished_builds(name_dir) if man.get("gate", {}).get("passed") and d != exclude]
    target = candidates[-1] if candidates else None
    link, text = name_dir / LATEST, name_dir / LATEST_FILE
    if target is None:
        for p in (link, text):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return None
    try:
        tmp = name_dir / f".{LATEST}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target.name, tmp, target_is_directory=True)
        os.replace(tmp, link)  # atomic: readers see the old or the new target, never none
        with contextlib.suppress(FileNotFoundError):
            text.unlink()
    except OSError:
        # No symlinks here (some Windows set-ups, some mounts): a text file naming the directory.
        with contextlib.suppress(OSError):
            tmp.unlink()
        atomic_write_text(text, target.name + "\n")
    return name_dir / LATEST if link.is_symlink() else text


def resolve_latest(name_dir: str | os.PathLike[str]) -> Path | None:
    """The build directory ``latest`` (or ``LATEST``) names, if any."""
    name_dir = Path(name_dir)
    link = name_dir / LATEST
    if link.is_symlink() or link.is_dir():
        return (name_dir / os.readlink(link)) if link.is_symlink() else link
    text = name_dir / LATEST_FILE
    if text.is_file():
        return name_dir / text.read_text(encoding="utf-8").strip()
    return None


def _build_dir(name_dir: Path, ident: str) -> Path:
    """The existing directory for these inputs, or a new ``<UTC date>-<ident>``."""
    existing = sorted(d for d in name_dir.glob(f"*-{ident}") if d.is_dir() and not d.is_symlink())
    if existing:
        return existing[0]
    return name_dir / f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}-{ident}"


# --- the run ------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _absolute_url(url: str, base: Path) -> str:
    """A local path or file URL made absolute (against the recipe's folder); other URLs unchanged."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return url
    if scheme == "file":
        if parsed.netloc in (".", ".."):
            return (base / (parsed.netloc + parsed.path)).resolve().as_uri()
        return url
    if scheme and len(scheme) > 1:
        return url
    p = Path(url).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def pinned_recipe(recipe: Recipe, model_sha256: str, data_sha256: str | None) -> dict[str, Any]:
    """The resolved recipe with both inputs pinned and local paths absolute: rebuilds this exact artifact."""
    data = recipe.resolved()
    data["model"]["sha256"] = model_sha256
    data["model"]["urls"] = [_absolute_url(u, recipe.base_dir) for u in data["model"]["urls"]]
    if data.get("data") is not None:
        data["data"]["sha256"] = data_sha256
        data["data"]["urls"] = [_absolute_url(u, recipe.base_dir) for u in data["data"]["urls"]]
    return data


def _split_timing(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stable part, durations/memory) of a stage result, for the manifest's reproducible part."""
    stable, timing = {}, {}
    for k, v in result.items():
        (timing if k in _TIMING_KEYS else stable)[k] = v
    return stable, timing


def _relative(obj: Any, roots: list[Path]) -> Any:
    """Replace absolute paths under ``roots`` by their names: the manifest must not depend on where it was built."""
    if isinstance(obj, dict):
        return {k: _relative(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, roots) for v in obj]
    if isinstance(obj, str) and obj.startswith(os.sep):
        p = Path(obj)
        for r in roots:
            with contextlib.suppress(ValueError):
                return p.relative_to(r).as_posix()
    return obj


def reproduce_command(recipe_path: str | None, overrides: dict[str, Any] | None) -> str:
    """The `qpipe run` command line that rebuilds with these settings."""
    args = ["qpipe", "run", "--recipe", recipe_path or RECIPE_COPY]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        args += ["--" + key.rsplit(".", 1)[-1].replace("_", "-"), str(value)]
    return shlex.join(args)


def run(
    recipe: Recipe,
    *,
    workdir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    embeddings_dir: str | os.PathLike[str] | None = None,
    command: str | None = None,
    lock_timeout: float = 3600.0,
) -> RunResult:
    """Build the recipe's verified int8 artifact; see the module docstring for the layout.

    ``workdir``: the artifact root (default ``artifacts/``). ``cache_dir``: the
    download cache (default ``calibration/downloads``); ``embeddings_dir``:
    verify's fp32 embedding cache (default ``calibration/embeddings``).
    ``command``: the command line recorded in the manifest and model card as
    the way to reproduce the build (default: ``qpipe run --recipe recipe.yaml``,
    the pinned copy in the artifact). ``lock_timeout``: seconds to wait for
    another run holding the same recipe's directory.

    Returns whether the gate passed; raises nothing for a failed gate (the
    caller turns ``passed`` into exit code 1).
    """
    import yaml

    from pipeline.build import manifest as mf
    from pipeline.stages.download import download
    from pipeline.core.environment import PeakMemory
    from pipeline.build.modelcard import render_model_card

    progress = progress or NULL_PROGRESS
    # Absolute, so that recorded paths can be made relative and the manifest does not depend on the cwd.
    root = (Path(workdir) if workdir is not None else DEFAULT_ROOT).absolute()
    cache = (Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE).absolute()
    embeddings = (Path(embeddings_dir) if embeddings_dir is not None else DEFAULT_EMBEDDINGS).absolute()
    if recipe.data is None:
        raise UserError(f"recipe {recipe.name!r} has no `data:` source: `qpipe run` needs a verification .bin to calibrate and gate on")
    recipe.gate.speed_threshold()  # a CPU the recipe has no speed threshold for fails before the build, not after it
    name_dir = root / recipe.name
    try:
        name_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create artifact directory {name_dir}: {e.strerror}") from None

    with _locked(name_dir, lock_timeout, progress):
        started = _now()
        with PeakMemory() as dl_mem:
            dl = download(recipe, cache, offline=offline, progress=progress)
        assert dl.data is not None
        model_sha, data_sha = dl.model.sha256, dl.data.sha256
        ident = input_id(model_sha, data_sha, recipe.sha256())
        run_dir = _build_dir(name_dir, ident)
        run_dir.mkdir(parents=True, exist_ok=True)
        progress.log(f"building {run_dir}")

        # From here until the new manifest is written the directory is unfinished: it must not be `latest`.
        _point_latest(name_dir, exclude=run_dir)
        with contextlib.suppress(FileNotFoundError):
            (run_dir / mf.MANIFEST_NAME).unlink()

        state = _State(run_dir)
        download_rec = StageRecord(
            name="download", key=_hash({"model": model_sha, "data": data_sha}), reused=dl.model.cached and dl.data.cached,
            wall_s=dl_mem.seconds, peak_rss_mb=dl_mem.peak_mb, outputs={},
        )
        stages = {"download": download_rec}
        stages["convert"] = _convert_stage(recipe, state, run_dir, dl.model.path, model_sha, dl.data.path, data_sha, progress)
        fp32_sha = stages["convert"].outputs[FP32_NAME]
        stages["quantize"] = _quantize_stage(recipe, state, run_dir, dl.model.path, fp32_sha, dl.data.path, data_sha, progress)
        int8_sha = stages["quantize"].outputs[INT8_NAME]
        given_sha = stages["convert"].outputs.get(FP32_GIVEN_NAME)
        stages["verify"] = _verify_stage(
            recipe, state, run_dir, fp32_sha, int8_sha, dl.data.path, data_sha, embeddings, progress, given_sha=given_sha
        )
        gate = stages["verify"].result.get("gate", {"passed": False, "reasons": ["verify recorded no gate result"]})

        report = stages["verify"].result.get("report")
        pinned = pinned_recipe(recipe, model_sha, data_sha)
        reproduce = command or reproduce_command(None, None)
        roots = [run_dir, run_dir.resolve(), cache, cache.resolve()]
        body = _manifest_body(recipe, dl, stages, gate, report, reproduce, started, run_dir=run_dir, roots=roots)

        # The files the manifest lists, then the manifest itself, last.
        header = (
            f"# The resolved recipe of this build ({recipe.name}, inputs {ident}), with both inputs pinned by sha256.\n"
            f"# `qpipe run --recipe {RECIPE_COPY}` rebuilds the same int8 model.\n"
        )
        atomic_write_text(run_dir / RECIPE_COPY, header + yaml.safe_dump(pinned, sort_keys=False))
        body["created"]["finished_at"] = _now()
        atomic_write_text(run_dir / CARD_NAME, render_model_card(body, report))
        manifest_path = run_dir / mf.MANIFEST_NAME
        mf.write_manifest(run_dir, body, measured=MEASURED_FILES)
        latest = _point_latest(name_dir)
        warnings = list(dl.warnings) + list(stages["verify"].result.get("warnings", []))
        return RunResult(
            recipe=recipe.name, directory=run_dir, gate=gate, stages=stages, manifest=manifest_path,
            model_card=run_dir / CARD_NAME, latest=latest, warnings=warnings,
        )


# --- several recipes in one command -----------------------------------------------------


def expand_recipe_paths(values: list[str | os.PathLike[str]]) -> list[Path]:
    """Recipe paths in the order given; a quoted glob (``'recipes/*.yaml'``) expands sorted; duplicates once."""
    import glob

    out: list[Path] = []
    for v in values:
        text = os.fspath(v)
        if not Path(text).exists() and glob.has_magic(text):
            found = sorted(glob.glob(text))
            if not found:
                raise UserError(f"no recipe matches {text!r}")
            out += [Path(f) for f in found]
        else:
            out.append(Path(text))
    unique: dict[Path, Path] = {}
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


@dataclass
class RecipeOutcome:
    """One recipe of a multi-recipe run: its build, or the error that stopped it."""

    path: str
    result: RunResult | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.result is None else (0 if self.result.passed else 1)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe_file": self.path, "exit_code": self.exit_code, "error": self.error, "build": self.result.to_dict() if self.result else None}


def run_many(
    jobs: list[tuple[str, Recipe, str | None]], *, on_outcome: Callable[[RecipeOutcome], None] | None = None, **kwargs: Any
) -> list[RecipeOutcome]:
    """Build each (path, recipe, command) in turn with the same caches (``kwargs`` as :func:`run`).

    A recipe that stops with a user error is recorded and the next one still
    builds; the fp32 embeddings and downloads one recipe caches serve the
    others that share its model or data. ``on_outcome`` hears of each recipe
    as soon as it is done.
    """
    outcomes = []
    for path, recipe, command in jobs:
        try:
            outcome = RecipeOutcome(path, result=run(recipe, command=command, **kwargs))
        except UserError as e:
            outcome = RecipeOutcome(path, error=str(e))
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def combined_exit_code(outcomes: list[RecipeOutcome]) -> int:
    """0 when every gate passed, 2 when any recipe stopped with an error, else 1 (a gate failed)."""
    codes = {o.exit_code for o in outcomes}
    return 2 if 2 in codes else (1 if 1 in codes else 0)


def _settings(*sections: Any) -> list[Any]:
    return [s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections]


def _stage_key(stage: str, **parts: Any) -> str:
    from pipeline import __version__

    return _hash({"stage": stage, "qpipe": __version__, **parts})


def _convert_stage(recipe, state, run_dir, model_path, model_sha, data_path, data_sha, progress) -> StageRecord:
    from pipeline.stages.convert import convert

    c = recipe.convert
    key = _stage_key("convert", model=model_sha, data=data_sha, settings=_settings(c, recipe.model.input))

    def body(work: Path) -> tuple[dict[str, Any], list[str]]:
        kw = dict(
            opset=c.opset, dynamic_batch=c.dynamic_batch, data=data_path, input_spec=recipe.model.input,
            samples=c.check_samples, min_cosine=c.min_cosine, progress=progress,
        )
        res = convert(model_path, work / FP32_NAME, prelu=c.prelu, **kw)
        result = res.to_dict()
        result["output"] = FP32_NAME
        produced = [FP32_NAME]
        # A stale copy from an earlier build of this directory must not be listed as this build's.
        (run_dir / FP32_GIVEN_NAME).unlink(missing_ok=True)
        if res.prelu:
            # The speed baseline is the user's model as given: converted the same way, PRelu kept.
            given = convert(model_path, work / FP32_GIVEN_NAME, prelu="keep", **kw)
            result["given"] = {"output": FP32_GIVEN_NAME, "worst_cosine": given.worst_cosine}
            produced.append(FP32_GIVEN_NAME)
        return result, produced

    return _run_stage("convert", key, state, run_dir, body, progress)


def _quantize_stage(recipe, state, run_dir, source_model, fp32_sha, data_path, data_sha, progress) -> StageRecord:
    from pipeline.build.int8 import build_int8
    from pipeline.build.manifest import quantize_manifest
    from pipeline.stages.quantize.job import Int8Job

    key = _stage_key(
        "quantize", fp32=fp32_sha, data=data_sha,
        settings=_settings(recipe.model.input, recipe.calibration, recipe.quantization, recipe.recovery_target()),
    )

    def body(work: Path) -> tuple[dict[str, Any], list[str]]:
        job = Int8Job.from_recipe(recipe, model=run_dir / FP32_NAME, calib=data_path, out=work / INT8_NAME, source_model=source_model)
        res = build_int8(job, write_manifest=False, progress=progress)
        result = res.to_dict()
        # What `qpipe quantize` would write beside its output is folded into the artifact manifest.
        stage_manifest = quantize_manifest(INT8_NAME, res.manifest_body(), recovery=res.recovery, placement=res.placement)
        result["stage_manifest"] = {k: v for k, v in stage_manifest.items() if k not in _STAGE_MANIFEST_DROP}
        result["output"] = INT8_NAME
        result.pop("manifest", None)  # a path in the work directory, gone after the stage
        return result, [INT8_NAME]

    return _run_stage("quantize", key, state, run_dir, body, progress)


def _verify_stage(recipe, state, run_dir, fp32_sha, int8_sha, data_path, data_sha, embeddings, progress, *, given_sha=None) -> StageRecord:
    from pipeline.stages.report import write_reports
    from pipeline.stages.verify import verify

    key = _stage_key(
        "verify", fp32=fp32_sha, int8=int8_sha, data=data_sha, settings=_settings(recipe.model.input, recipe.verify, recipe.gate),
        cpu=recipe.gate.speed_threshold().to_dict(),  # timed on another class of CPU, the gate is another gate
        **({"baseline": given_sha} if given_sha else {}),
    )

    def body(work: Path) -> tuple[dict[str, Any], list[str]]:
        res = verify(
            run_dir / FP32_NAME, run_dir / INT8_NAME, [data_path], input_spec=recipe.model.input, verify=recipe.verify,
            gate=recipe.gate, cache_dir=embeddings, baseline=run_dir / FP32_GIVEN_NAME if given_sha else None, progress=progress,
        )
        write_reports(res, work)
        g = res.gate
        gate = {k: g.get(k) for k in ("passed", "reasons", "max_accuracy_drop", "min_speedup", "cpu_class")}
        gate["passed"] = bool(gate["passed"])
        produced = [f for f in REPORT_FILES if (work / f).is_file()]
        if "report.json" not in produced:
            raise RuntimeError("verify wrote no report.json")
        # The report travels in the stage record, so a reused stage gives it without reading files back.
        return {"gate": gate, "report": res.to_dict()}, produced

    return _run_stage("verify", key, state, run_dir, body, progress)


def _manifest_body(recipe, dl, stages, gate, report, command, started, *, run_dir, roots) -> dict[str, Any]:
    from pipeline.build import manifest as mf

    stage_info: dict[str, Any] = {}
    execution: dict[str, Any] = {"stages": {}}
    for name, st in stages.items():
        # verify's report is summarised below (accuracy, speed), not copied whole.
        result = {k: v for k, v in st.result.items() if not (name == "verify" and k == "report")}
        stable, durations = _split_timing(_relative(result, roots))
        sm = stable.get("stage_manifest")
        if isinstance(sm, dict):
            # Only what the stage result does not already say (e.g. the calibration indices, the input files' hashes).
            stable["stage_manifest"] = {k: v for k, v in sm.items() if stable.get(k) != v}
        stage_info[name] = {
            "key": st.key,
            "outputs": {f: sha for f, sha in st.outputs.items() if f not in MEASURED_FILES},
            "result": stable,
        }
        execution["stages"][name] = {"reused": st.reused, "wall_s": round(st.wall_s, 3), "peak_rss_mb": round(st.peak_rss_mb, 1)}
        if durations:
            execution["stages"][name]["reported_by_stage"] = durations
    if report:
        speed: dict[str, Any] = {
            k: report.get(k) for k in ("speedup", "speedup_iqr", "speedup_fastest_fp32", "speedup_fastest_fp32_iqr", "speed_note")
        }
        # Which model each speedup is over: the user's model as given (the gate's) and the fastest fp32.
        speed["over"] = {"speedup": FP32_GIVEN_NAME if stages["convert"].outputs.get(FP32_GIVEN_NAME) else FP32_NAME,
                         "speedup_fastest_fp32": FP32_NAME}
        for side in ("fp32", "int8"):
            block = report.get(side) or {}
            speed[side] = {k: v for k, v in block.items() if k.startswith(("latency", "throughput"))}
        given = (report.get("speed") or {}).get("baseline")
        if isinstance(given, dict):
            speed["fp32_given"] = {k: v for k, v in given.items() if k.startswith(("latency", "throughput"))}
        speed["cpu"] = report.get("speed_cpu")
        threads = (report.get("environment") or {}).get("threads")
        speed["threads"] = threads
        execution["speed"] = speed

    def source(res) -> dict[str, Any]:
        return {"source": res.source, "member": res.member, "sha256": res.sha256, "pinned": res.pinned, "size": res.size}

    return {
        "name": recipe.name,
        "inputs": {
            "id": run_dir.name.rsplit("-", 1)[-1],
            "model": source(dl.model),
            "data": source(dl.data),
        },
        "recipe": {"sha256": recipe.sha256(), "resolved": recipe.resolved(), "pinned_copy": RECIPE_COPY},
        "command": command,
        **mf.provenance(),
        "stages": stage_info,
        "accuracy": _accuracy_summary(report),
        "gate": gate,
        "execution": execution,
        "created": {"started_at": started, "finished_at": None, "directory": run_dir.name},
    }


_METRIC_KEYS = ("accuracy", "accuracy_std", "fold_accuracies", "threshold_mean", "best_thresholds", "tar_at_far", "far", "roc_auc")


def _accuracy_summary(report: dict[str, Any] | None) -> dict[str, Any]:
    """Per data set, both models' verification metrics: deterministic, unlike the report's timings."""
    if not report:
        return {}
    out: dict[str, Any] = {"unit": report.get("accuracy_unit", "percent")}
    for name, ds in (report.get("data") or {}).items():
        entry = {k: ds.get(k) for k in ("sha256", "pairs", "total_pairs", "subset", "accuracy_drop")}
        for side in ("fp32", "int8"):
            entry[side] = {k: (ds.get(side) or {}).get(k) for k in _METRIC_KEYS}
        out[name] = entry
    return out
