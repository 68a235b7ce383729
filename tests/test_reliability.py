"""The reliability matrix: what users really feed qpipe, through the real command line.

Every case must end in ONE line on stderr (``qpipe: error: ...``) and exit code 2
(1 for a failed gate, 130 for an interrupt), never a traceback, and must leave
nothing half-written under a final name and no temporary file beside it. The
inputs are the ones users hit: missing, directory, empty and non-ONNX files;
models of the wrong shape or opset; broken, truncated, malicious and inconsistent
``.bin`` files; bad recipes; hash mismatches; mirrors that are all down; a full
disk; SIGINT/SIGTERM in the middle of download, quantize and verify; two
``qpipe run`` on the same directory.

Most cases run in-process (typer's CliRunner); the signal and locking cases run
``python -m pipeline.cli.app`` in a subprocess and wait until it is demonstrably in
the middle of its work (a temporary file exists, or its progress bar has moved)
before sending the signal. Every wait is bounded.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.stages import download as download_mod
from pipeline.cli.app import app
from pipeline.core.files import sha256_file
from tests.httpserver import Behaviour, FileServer
from tests.synthdata import face_model, malicious_pickle, synthetic_bin, synthetic_pairs

RECIPE32 = """\
name: rel
model:
  urls: [m8.onnx]
  input: {size: [32, 32]}
data:
  urls: [faces.bin]
calibration: {samples: 16}
verify: {warmup: 1, rounds: 3, runs_per_round: 2, batch: 8, throughput_batch: 4}
gate: {max_accuracy_drop: 100.0, min_speedup: 0.0}
"""

# Names a killed or failed writer may leave beside its target: atomic_path's `.NAME.*.part`,
# quantize's scratch directory, run's latest-link temporary. Lock files are expected to stay.
TEMP_PATTERN = re.compile(r"\.part$|^\.qpipe-|\.tmp$")
INTERRUPTED = "qpipe: error: interrupted; nothing was left under a final name"


# --- material ------------------------------------------------------------------------------


def _flat_model(path: Path, shape: list) -> Path:
    """A valid float model with an arbitrary input shape: Flatten + MatMul to 8 outputs."""
    n = int(np.prod(shape[1:]))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["fc1"])],
        "flat",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [shape[0], 8])],
        initializer=[numpy_helper.from_array(np.random.default_rng(0).random((n, 8), dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mat(tmp_path_factory) -> SimpleNamespace:
    """Tiny synthetic models and data: a 32x32 face model (opset 8 and 11), its int8, a .bin, a recipe."""
    import cv2

    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize
    from pipeline.recipe import load_recipe, with_overrides

    d = tmp_path_factory.mktemp("material")
    m = SimpleNamespace(dir=d)
    m.m8 = d / "m8.onnx"
    face_model(m.m8, opset=8, ir_version=4, dynamic_batch=False)
    m.fp32 = d / "fp32.onnx"
    face_model(m.fp32)  # opset 11, dynamic batch
    m.faces = synthetic_bin(d / "faces.bin", pairs=20)
    m.recipe = d / "r32.yaml"
    m.recipe.write_text(RECIPE32)
    m.int8 = d / "q" / "int8.onnx"
    r = with_overrides(load_recipe(m.recipe), {"quantization.engine": "ort"})
    quantize(Int8Job.from_recipe(r, model=m.fp32, calib=m.faces, out=m.int8))
    m.photo = d / "photo.jpg"
    cv2.imwrite(str(m.photo), np.full((120, 120, 3), 128, np.uint8))
    # Wrong input shapes for the default recipe (3x112x112).
    m.shapes = {
        "32x32": m.fp32,
        "1-channel": _flat_model(d / "gray.onnx", ["N", 1, 112, 112]),
        "channels-last": _flat_model(d / "nhwc.onnx", ["N", 112, 112, 3]),
        "rank-2": _flat_model(d / "vector.onnx", ["N", 512]),
    }
    return m


@pytest.fixture(scope="module", autouse=True)
def _command_built_once() -> Iterator[None]:
    # typer rebuilds the click command from the function signatures on every invoke (~0.1 s),
    # and this matrix invokes it a few hundred times.
    import typer.main
    import typer.testing

    command = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(typer.testing, "_get_command", lambda a: command if a is app else typer.main.get_command(a))
        yield


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # Commands default to relative paths (calibration/, artifacts/): keep them out of the repository.
    monkeypatch.chdir(tmp_path)


def cli(*args: object) -> "object":
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(result, *needles: str, code: int = 2, notes: bool = False) -> str:
    """Exit ``code``, one stderr line ``qpipe: error: ...`` matching every regex in ``needles``, no traceback.

    ``notes``: the command may have logged progress notes (``qpipe run``: "building ...") before the
    error; the error must still be the one and last line that says ``error``.
    """
    out = f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == code, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert "Traceback" not in result.stdout + result.stderr, out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("qpipe: error: "), out
    assert len(lines) == 1 or (notes and not any("error" in x.lower() for x in lines[:-1])), out
    for n in needles:
        assert re.search(n, lines[-1]), f"{n!r} not in {lines[-1]!r}"
    return lines[-1]


def written(d: Path) -> list[str]:
    """Every file under ``d`` except lock files: what a failed command left behind."""
    if not d.exists():
        return []
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def temporaries(d: Path) -> list[str]:
    if not d.exists():
        return []
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if TEMP_PATTERN.search(p.name))


# --- bad model files ---------------------------------------------------------------------------


def _bad_file(kind: str, d: Path, mat: SimpleNamespace) -> Path:
    p = d / f"bad-{kind}.onnx"
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a model\n")
    elif kind == "truncated":
        data = mat.fp32.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "a-bin":
        p.write_bytes(mat.faces.read_bytes())
    return p  # "missing": never created


BAD_FILES = ["missing", "directory", "empty", "text", "truncated", "a-bin"]

# stage -> CLI arguments given (model under test, output directory)
MODEL_STAGES: dict[str, Callable[[Path, Path, SimpleNamespace], list]] = {
    "convert": lambda m, out, s: ["convert", "-m", m, "-o", out / "fp32.onnx", "-r", s.recipe, "-q"],
    "quantize": lambda m, out, s: ["quantize", "-r", s.recipe, "--engine", "ort", "-m", m, "--calib", s.faces, "-o", out / "int8.onnx", "-q"],
    "verify-fp32": lambda m, out, s: ["verify", "-r", s.recipe, "--fp32", m, "--int8", s.int8, "--data", s.faces, "--report", out / "report",
                                      "--cache-dir", out / "emb", "-q"],
    "verify-int8": lambda m, out, s: ["verify", "-r", s.recipe, "--fp32", s.fp32, "--int8", m, "--data", s.faces, "--report", out / "report",
                                      "--cache-dir", out / "emb", "-q"],
    "embed": lambda m, out, s: ["embed", s.photo, "-m", m, "-r", s.recipe, "-o", out / "emb.npy", "-q"],
    "compare": lambda m, out, s: ["compare", s.photo, s.photo, "-m", m, "-r", s.recipe, "--threshold", "0.5"],
}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("stage", list(MODEL_STAGES))
def test_a_bad_model_file_is_one_clear_error_and_writes_nothing(mat, tmp_path, stage, kind):
    bad = _bad_file(kind, tmp_path, mat)
    out = tmp_path / "out"
    r = cli(*MODEL_STAGES[stage](bad, out, mat))
    assert_one_error(r, re.escape(bad.name))
    assert written(out) == []


@pytest.mark.parametrize("shape", ["32x32", "1-channel", "channels-last", "rank-2"])
@pytest.mark.parametrize("stage", ["convert", "quantize", "verify", "embed"])
def test_a_model_whose_input_is_not_3x112x112_is_refused_by_name(mat, tmp_path, stage, shape):
    # No recipe: the default input is 3x112x112, as for the Model Zoo ArcFace.
    m, out = mat.shapes[shape], tmp_path / "out"
    args = {
        "convert": ["convert", "-m", m, "-o", out / "fp32.onnx", "-q"],
        "quantize": ["quantize", "--engine", "ort", "-m", m, "--calib", mat.faces, "-o", out / "int8.onnx", "-q"],
        "verify": ["verify", "--fp32", m, "--int8", m, "--data", mat.faces, "--report", out / "report", "--cache-dir", out / "emb", "-q"],
        "embed": ["embed", mat.photo, "-m", m, "-o", out / "emb.npy", "-q"],
    }[stage]
    assert_one_error(cli(*args), r"shape|channel|\d+x\d+|dimensions|4-D", rf"'data'|{re.escape(m.name)}")
    assert written(out) == []


# --- opsets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [11, 9])
def test_convert_copies_a_model_already_at_or_above_the_target_opset(mat, tmp_path, target):
    out = tmp_path / "out" / "fp32.onnx"
    # The stand-in has PRelu, which the default convert.prelu would rewrite (tests/test_prelu.py covers that).
    r = cli("convert", "-m", mat.fp32, "-o", out, "-r", mat.recipe, "--opset", target, "--prelu", "keep", "-q")
    assert r.exit_code == 0, r.stderr
    assert f"copied {mat.fp32} unchanged to {out} (already at opset 11)" in r.stdout
    assert out.read_bytes() == mat.fp32.read_bytes()
    assert temporaries(out.parent) == []


@pytest.mark.parametrize("opset", ["99", "0", "-1"])
def test_convert_refuses_an_opset_the_converter_does_not_know(mat, tmp_path, opset):
    out = tmp_path / "out"
    r = cli("convert", "-m", mat.m8, "-o", out / "fp32.onnx", "-r", mat.recipe, f"--opset={opset}", "-q")
    assert_one_error(r, rf"knows opsets 1 to \d+; cannot convert to opset {re.escape(opset)}")
    assert written(out) == []


# --- bad .bin files ------------------------------------------------------------------------------


def _bad_bin(kind: str, d: Path, mat: SimpleNamespace) -> Path:
    images, issame = synthetic_pairs(20)
    p = d / f"{kind}.bin"
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "not-a-pickle":
        p.write_text("name,image\nalice,alice.jpg\n")
    elif kind == "an-onnx-model":
        p.write_bytes(mat.fp32.read_bytes())
    elif kind == "truncated":
        data = mat.faces.read_bytes()
        p.write_bytes(data[: len(data) * 2 // 3])
    elif kind.startswith("malicious-"):
        p.write_bytes(malicious_pickle(d / f"PWNED-{kind}", via=kind.removeprefix("malicious-"), pairs=20))
    elif kind.startswith("corrupt-image-"):
        k = int(kind.rsplit("-", 1)[1])
        images[k] = images[k][:40] + b"\x00" * 64  # a JPEG header, then nothing decodable
        p.write_bytes(pickle.dumps((images, issame), protocol=4))
    elif kind == "odd-image-count":
        p.write_bytes(pickle.dumps((images + images[:1], issame), protocol=2))
    elif kind == "pairs-mismatch":
        p.write_bytes(pickle.dumps((images, issame + [True] * 5), protocol=2))
    return p


BAD_BINS = {
    "missing": r"not found",
    "directory": r"is a directory",
    "empty": r"is empty",
    "not-a-pickle": r"not a pickle|corrupt pickle",
    "an-onnx-model": r"not a pickle",
    "truncated": r"truncated",
    "malicious-os.system": r"refused to load",
    "malicious-open": r"refused to load",
    "malicious-numpy": r"refused to load",
    "corrupt-image-0": r"\bimage 0\b",
    "corrupt-image-7": r"\bimage 7\b",
    "odd-image-count": r"41 images for 20 pairs",
    "pairs-mismatch": r"40 images for 25 pairs",
}

# stage -> CLI arguments given (.bin under test, output directory); every image is used, so a corrupt one is reached.
BIN_STAGES: dict[str, Callable[[Path, Path, SimpleNamespace], list]] = {
    "convert": lambda b, out, s: ["convert", "-m", s.m8, "-o", out / "fp32.onnx", "-r", s.recipe, "--data", b, "--samples", "40", "-q"],
    "quantize": lambda b, out, s: ["quantize", "-r", s.recipe, "--engine", "ort", "-m", s.fp32, "--calib", b, "--samples", "40",
                                   "-o", out / "int8.onnx", "-q"],
    "verify": lambda b, out, s: ["verify", "-r", s.recipe, "--fp32", s.fp32, "--int8", s.int8, "--data", b, "--report", out / "report",
                                 "--cache-dir", out / "emb", "-q"],
}


@pytest.mark.parametrize("kind", list(BAD_BINS))
@pytest.mark.parametrize("stage", list(BIN_STAGES))
def test_a_bad_bin_is_one_clear_error_and_writes_nothing(mat, tmp_path, stage, kind):
    bad = _bad_bin(kind, tmp_path, mat)
    out = tmp_path / "out"
    needle = BAD_BINS[kind]
    if stage == "quantize" and kind == "directory":
        needle = r"no images .* in this folder"  # quantize also takes a folder of aligned faces
    assert_one_error(cli(*BIN_STAGES[stage](bad, out, mat)), re.escape(bad.name), needle)
    assert written(out) == []
    # The payload of a malicious pickle never ran.
    assert not list(tmp_path.glob("PWNED-*"))


def test_a_corrupt_calibration_image_under_inc_is_one_clear_error(mat, tmp_path):
    """The default engine, INC, runs the calibration reader inside its own try/except."""
    bad = _bad_bin("corrupt-image-7", tmp_path, mat)
    out = tmp_path / "out"
    r = cli("quantize", "-r", mat.recipe, "-m", mat.fp32, "--calib", bad, "--samples", "40", "-o", out / "int8.onnx", "-q")
    assert_one_error(r, re.escape(bad.name), r"\bimage 7\b")
    assert written(out) == []


# --- recipes ---------------------------------------------------------------------------------------

_BOMB = "name: t\nmodel: {urls: [m8.onnx]}\nquantization:\n  extra_options:\n    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)
BAD_RECIPES = {
    "unknown-key": ("name: t\nmodel:\n  urls: [m8.onnx]\nquantization:\n  engin: ort\n", r":5: quantization\.engin: unknown key"),
    "wrong-type": ("name: t\nmodel:\n  urls: [m8.onnx]\ncalibration:\n  samples: many\n", r":5: calibration\.samples: .*got 'many'"),
    "missing-name": ("model:\n  urls: [m8.onnx]\n", r": name: required key is missing"),
    "missing-urls": ("name: t\nmodel:\n  input: {size: [112, 112]}\n", r":2: model\.urls: required key is missing"),
    "invalid-yaml": ("name: t\nmodel:\n  urls: [m8.onnx\n", r"invalid YAML in recipe .*:\d+: "),
    "python-tag": ("name: !!python/object/apply:os.system [touch PWNED-recipe]\nmodel: {urls: [m8.onnx]}\n", r"invalid YAML in recipe .*:1"),
    "empty": ("", r"recipe is empty"),
    "not-a-mapping": ("- name: t\n- model: {}\n", r"top level must be a mapping"),
    "alias-bomb": (_BOMB, r"expands to more than"),
    "missing-file": (None, r"recipe not found"),
    "directory": ("<dir>", r"recipe is a directory"),
}

# stage -> CLI arguments given (recipe, output directory)
RECIPE_STAGES: dict[str, Callable[[Path, Path, SimpleNamespace], list]] = {
    "download": lambda r, out, s: ["download", "-r", r, "--dest", out / "cache", "-q"],
    "convert": lambda r, out, s: ["convert", "-r", r, "-m", s.m8, "-o", out / "fp32.onnx", "-q"],
    "quantize": lambda r, out, s: ["quantize", "-r", r, "-m", s.fp32, "--calib", s.faces, "-o", out / "int8.onnx", "-q"],
    "verify": lambda r, out, s: ["verify", "-r", r, "--fp32", s.fp32, "--int8", s.int8, "--data", s.faces, "--report", out / "report",
                                 "--cache-dir", out / "emb", "-q"],
    "run": lambda r, out, s: ["run", "-r", r, "--workdir", out / "artifacts", "--cache", out / "cache", "--embeddings", out / "emb", "-q"],
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
@pytest.mark.parametrize("stage", list(RECIPE_STAGES))
def test_a_bad_recipe_is_one_clear_error_naming_the_key(mat, tmp_path, stage, case):
    text, needle = BAD_RECIPES[case]
    recipe = tmp_path / f"{case}.yaml"
    if text == "<dir>":
        recipe.mkdir()
    elif text is not None:
        recipe.write_text(text)
    out = tmp_path / "out"
    start = time.monotonic()
    assert_one_error(cli(*RECIPE_STAGES[stage](recipe, out, mat)), re.escape(recipe.name), needle)
    assert time.monotonic() - start < 20, "a hostile recipe must be refused, not expanded"
    assert written(out) == [] and not list(tmp_path.glob("PWNED-*"))


# --- the gate ----------------------------------------------------------------------------------------


def test_a_failed_gate_exits_1_with_one_line_per_reason_and_a_complete_report(mat, tmp_path):
    report = tmp_path / "report"
    r = cli("verify", "-r", mat.recipe, "--fp32", mat.fp32, "--int8", mat.int8, "--data", mat.faces, "--report", report,
            "--cache-dir", tmp_path / "emb", "--min-speedup", "1000", "-q")
    assert r.exit_code == 1, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines and all(x.startswith("qpipe: gate failed: ") for x in lines), r.stderr
    assert any("below the required 1000.00x" in x for x in lines)
    assert json.loads((report / "report.json").read_text())["gate"]["passed"] is False
    assert temporaries(report) == []


# --- download: hashes and mirrors ---------------------------------------------------------------------


def _source_recipe(d: Path, urls: list[str], sha256: str | None = None) -> Path:
    pin = f"\n  sha256: {sha256}" if sha256 else ""
    p = d / "download.yaml"
    p.write_text(f"name: dl\nmodel:\n  urls: [{', '.join(urls)}]{pin}\n")
    return p


def test_a_hash_mismatch_on_every_mirror_keeps_nothing_in_the_cache(mat, tmp_path):
    with FileServer({"m.onnx": mat.fp32.read_bytes()}) as server:
        recipe = _source_recipe(tmp_path, [str(mat.m8), server.url("m.onnx")], sha256="ab" * 32)
        cache = tmp_path / "cache"
        line = assert_one_error(cli("download", "-r", recipe, "--dest", cache, "-q"), r"all 2 sources failed")
    assert line.count("sha256 mismatch: expected " + "ab" * 32) == 2
    assert sha256_file(mat.m8) in line and sha256_file(mat.fp32) in line
    assert written(cache) == []


def test_a_cached_file_that_no_longer_matches_its_pin_is_refused_offline_and_fetched_again(mat, tmp_path):
    with FileServer({"m8.onnx": mat.m8.read_bytes()}) as server:
        recipe = _source_recipe(tmp_path, [server.url("m8.onnx")], sha256=sha256_file(mat.m8))
        cache = tmp_path / "cache"
        assert cli("download", "-r", recipe, "--dest", cache, "-q").exit_code == 0
        cached = cache / "model" / "m8.onnx"
        cached.write_bytes(cached.read_bytes()[:-10] + b"tampered!!")
        assert_one_error(cli("download", "-r", recipe, "--dest", cache, "--offline", "-q"), r"does not match the recipe's sha256")
        r = cli("download", "-r", recipe, "--dest", cache, "-q")
    assert r.exit_code == 0, r.stderr
    assert sha256_file(cached) == sha256_file(mat.m8) and temporaries(cache) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_mirror_down_names_each_mirror_and_keeps_nothing(mat, tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod, "RETRY_BACKOFF", 0.0)  # urllib3 still retries 503 and refused connections, without sleeping
    behaviour = Behaviour(statuses={"/busy.onnx": [503] * 20})
    with FileServer({"busy.onnx": b"x"}, behaviour) as server:
        urls = [server.url("busy.onnx"), server.url("gone.onnx"), f"http://127.0.0.1:{_closed_port()}/m.onnx", "file:///nonexistent/m.onnx"]
        recipe = _source_recipe(tmp_path, urls)
        cache = tmp_path / "cache"
        line = assert_one_error(cli("download", "-r", recipe, "--dest", cache, "-q"), r"all 4 sources failed")
    for url, why in zip(urls, ["HTTP 503", "HTTP 404", "refused", "no such file"]):
        assert re.search(re.escape(url) + r": [^;]*" + why, line), (url, why, line)
    assert written(cache) == []


# --- disk full ----------------------------------------------------------------------------------------


class _FullDisk:
    """A writable file object on a disk that fills up after ``budget`` more bytes (shared by all files)."""

    def __init__(self, f, state: dict) -> None:
        self._f = f
        self._state = state

    def write(self, data) -> int:
        room = self._state["budget"]
        if len(data) > room:
            if room > 0:
                self._f.write(bytes(data[:room]))
                self._state["budget"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._state["budget"] -= len(data)
        return self._f.write(data)

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def disk_full(monkeypatch, under: Path, budget: int = 512, only: str = "") -> Iterator[None]:
    """Writes to files under ``under`` fail with ENOSPC once ``budget`` bytes are written (partial writes land first).

    ``only``: just files whose name contains it (the disk fills up exactly when that file is written).
    Python-level opens (open, io.open, pathlib) are wrapped; the rest of the process is untouched.
    """
    real_open = builtins.open
    root = Path(under).resolve()
    state = {"budget": budget}

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if (
            isinstance(file, (str, os.PathLike))
            and any(c in mode for c in "wax+")
            and Path(file).resolve().is_relative_to(root)
            and only in Path(file).name
        ):
            return _FullDisk(f, state)
        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fake_open)
        m.setattr(io, "open", fake_open)
        yield


FULL_DISK_STAGES: dict[str, Callable[[Path, SimpleNamespace, Path], list]] = {
    "download": lambda out, s, t: ["download", "-r", s.recipe, "--dest", out, "-q"],
    "convert": lambda out, s, t: ["convert", "-r", s.recipe, "-m", s.m8, "-o", out / "fp32.onnx", "-q"],
    "quantize": lambda out, s, t: ["quantize", "-r", s.recipe, "--engine", "ort", "-m", s.fp32, "--calib", s.faces, "-o", out / "int8.onnx", "-q"],
    "verify": lambda out, s, t: ["verify", "-r", s.recipe, "--fp32", s.fp32, "--int8", s.int8, "--data", s.faces, "--report", out / "report",
                                 "--cache-dir", out / "emb", "-q"],
    "run": lambda out, s, t: ["run", "-r", t, "--workdir", out, "--cache", out.parent / "cache", "--embeddings", out.parent / "emb", "-q"],
}


@pytest.mark.parametrize("stage", list(FULL_DISK_STAGES))
def test_a_full_disk_is_one_clear_error_leaves_nothing_and_the_next_run_succeeds(mat, tmp_path, monkeypatch, stage):
    ort_recipe = tmp_path / "ort.yaml"  # `run` takes the engine from the recipe only
    ort_recipe.write_text(RECIPE32.replace("urls: [m8.onnx]", f"urls: [{mat.m8}]").replace("urls: [faces.bin]", f"urls: [{mat.faces}]")
                          + "quantization: {engine: ort}\n")
    out = tmp_path / "out"
    args = FULL_DISK_STAGES[stage](out, mat, ort_recipe)
    with disk_full(monkeypatch, out):
        r = cli(*args)
    assert_one_error(r, r"No space left on device", notes=stage == "run")
    assert written(out) == []
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert temporaries(out) == []


def _two_lfw_pairs(shared_raw: Path, d: Path) -> Path:
    lines = (shared_raw / "pairs.txt").read_text().splitlines()
    pairs = d / "pairs.txt"
    pairs.write_text("1\t1\n" + lines[1] + "\n" + lines[51] + "\n")  # the first same and the first different pair
    return pairs


def test_a_full_disk_during_pack_bin_and_embed_leaves_nothing(shared_raw, mat, tmp_path, monkeypatch):
    out = tmp_path / "out"
    m112 = tmp_path / "m112.onnx"
    face_model(m112, size=(112, 112))
    photo = next(shared_raw.glob("*/*.jpg"))
    cases = [
        ["pack-bin", "--images", shared_raw, "--pairs", _two_lfw_pairs(shared_raw, tmp_path), "-o", out / "mine.bin", "-q"],
        ["embed", photo, "-m", m112, "-o", out / "emb.npy", "-q"],
    ]
    for args in cases:
        for budget in (100, 1000):  # the first file fails, or the second of a set (embed's .npy, then its index)
            with disk_full(monkeypatch, out, budget):
                r = cli(*args)
            assert_one_error(r, r"cannot write .*No space left on device")
            assert written(out) == [], "no file of a set may stay behind when another of it failed"


def test_a_full_disk_while_writing_the_quantize_manifest_leaves_no_model_its_manifest_contradicts(mat, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["quantize", "-r", mat.recipe, "--engine", "ort", "-m", mat.fp32, "--calib", mat.faces, "-o", out / "int8.onnx", "-q"]
    assert cli(*args).exit_code == 0  # an earlier build: int8.onnx and its manifest.json
    with disk_full(monkeypatch, out, budget=0, only="manifest.json"):  # another build into the same place fills the disk
        r = cli(*args, "--samples", "8")
    assert_one_error(r, r"cannot write .*manifest\.json.*No space left on device")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["int8"]["sha256"] == sha256_file(out / "int8.onnx"), "manifest.json describes another int8.onnx"
    assert temporaries(out) == []


# --- interrupts ------------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Running:
    """``python -m pipeline.cli.app ARGS`` in a subprocess, its output collected as it arrives.

    With ``bars`` rich is told it writes to an interactive terminal, so progress bars
    (and their counts) reach the pipe while the work runs.
    """

    def __init__(self, args: list, cwd: Path, bars: bool = False) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if bars:
            env.update(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1", NO_COLOR="1", COLUMNS="120")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli.app", *[str(a) for a in args]], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        self._out, self._err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    @property
    def stderr(self) -> str:
        return ANSI.sub("", self._err.decode("utf-8", "replace"))

    @property
    def stdout(self) -> str:
        return self._out.decode("utf-8", "replace")

    def lines(self) -> list[str]:
        return [x.strip() for x in re.split(r"[\r\n]", self.stderr) if x.strip()]

    def progress(self, label: str) -> int:
        """The highest count the progress bar ``label`` has shown."""
        counts = re.findall(re.escape(label) + r"[^\r\n]*?\s(\d+)/\d+\s", self.stderr)
        return max((int(c) for c in counts), default=0)

    def wait_until(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                if cond():
                    return
                pytest.fail(f"exited {self.proc.returncode} before {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no {what} within {timeout} s:\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s later:\n{self.stderr[-3000:]}")
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., Running]]:
    """Start qpipe subprocesses; any still running at the end of the test are killed (by their own pid)."""
    started: list[Running] = []

    def start(args: list, bars: bool = False) -> Running:
        p = Running(args, tmp_path, bars)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def assert_interrupted(p: Running, rc: int) -> None:
    err = p.stderr
    assert rc == 130, f"exit {rc}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert err.count("qpipe: error:") == 1 and p.lines()[-1] == INTERRUPTED, err[-3000:]


class TrickleServer:
    """HTTP on 127.0.0.1 that sends the first KiB of a file, then holds the rest until :meth:`release`."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.released = threading.Event()
        self.closing = threading.Event()
        self.sent_first = threading.Event()  # a client has the first KiB and waits for the rest
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = owner.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[:1024])
                    self.wfile.flush()
                    owner.sent_first.set()
                    while not owner.released.wait(0.05):
                        if owner.closing.is_set():
                            return
                    self.wfile.write(body[1024:])
                    self.wfile.flush()
                except OSError:  # the client was interrupted: expected
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> "TrickleServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def _mid_download(server: TrickleServer, cache: Path) -> Callable[[], bool]:
    """True once the server has sent part of a file and the client holds it in a temporary file."""
    return lambda: server.sent_first.is_set() and cache.exists() and any(cache.rglob("*.part"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_download_leaves_no_partial_file_and_the_next_run_fetches_it(mat, tmp_path, spawn, sig):
    body = mat.fp32.read_bytes()
    with TrickleServer({"m.onnx": body}) as server:
        recipe = _source_recipe(tmp_path, [server.url("m.onnx")], sha256=sha256_file(mat.fp32))
        cache = tmp_path / "cache"
        p = spawn(["download", "-r", recipe, "--dest", cache, "-q"])
        p.wait_until(_mid_download(server, cache), "partly received download", timeout=30)
        p.proc.send_signal(sig)
        assert_interrupted(p, p.finish(30))
        assert written(cache) == []
        server.release()
        r = cli("download", "-r", recipe, "--dest", cache, "-q")
    assert r.exit_code == 0, r.stderr
    assert sha256_file(cache / "model" / "m.onnx") == sha256_file(mat.fp32)
    assert temporaries(cache) == []


@pytest.fixture(scope="module")
def calib400(mat) -> Path:
    """Enough calibration faces that calibration lasts a few seconds: time to be interrupted in."""
    return synthetic_bin(mat.dir / "calib400.bin", pairs=200)


@pytest.mark.parametrize(
    "engine,sig",
    [("inc", signal.SIGINT), ("ort", signal.SIGINT), ("ort", signal.SIGTERM)],
    ids=["inc-SIGINT", "ort-SIGINT", "ort-SIGTERM"],
)
def test_interrupted_quantize_leaves_no_model_no_manifest_and_reruns_cleanly(mat, calib400, tmp_path, spawn, engine, sig):
    out = tmp_path / "q"
    args = ["quantize", "-r", mat.recipe, "--engine", engine, "-m", mat.fp32, "--calib", calib400, "--samples", "400", "-o", out / "int8.onnx"]
    p = spawn(args, bars=True)
    label = f"calibrating ({engine}"  # the bar may say more: "calibrating (ort, 8-bit weights)"
    p.wait_until(lambda: p.progress(label) > 0, f"{label} progress", timeout=60)
    p.proc.send_signal(sig)
    assert_interrupted(p, p.finish(60))
    assert written(out) == [] and temporaries(out) == []
    r = cli(*args, "-q")
    assert r.exit_code == 0, r.stderr
    assert (out / "int8.onnx").is_file() and (out / "manifest.json").is_file() and temporaries(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_verify_leaves_no_report_and_the_rerun_reuses_finished_work(mat, tmp_path, spawn, sig):
    report, emb = tmp_path / "report", tmp_path / "emb"
    args = ["verify", "-r", mat.recipe, "--fp32", mat.fp32, "--int8", mat.int8, "--data", mat.faces, "--report", report, "--cache-dir", emb]
    p = spawn([*args, "--rounds", "1000000"], bars=True)
    p.wait_until(lambda: p.progress("timing fp32 vs int8") > 0, "timing progress", timeout=60)
    p.proc.send_signal(sig)
    assert_interrupted(p, p.finish(30))
    assert written(report) == [] and temporaries(emb) == []
    # The fp32 embeddings finished before the signal: their cache file is complete, not half-written.
    for f in emb.glob("*.npz"):
        with np.load(f) as z:
            assert z["embeddings"].shape[0] == 40
    r = cli(*args, "--rounds", "3", "-q")
    assert r.exit_code == 0, r.stderr
    rep = json.loads((report / "report.json").read_text())
    assert rep["data"]["faces"]["fp32"]["cached"] is True and temporaries(report) == []


# --- two runs at once --------------------------------------------------------------------------------------


def test_two_runs_on_one_work_directory_one_fails_clearly_one_waits_and_neither_corrupts_the_other(mat, tmp_path, spawn):
    """A is held in its download (inside the lock); B gives up at once; C waits, then reuses A's finished build."""
    with TrickleServer({"m8.onnx": mat.m8.read_bytes()}) as server:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(
            RECIPE32.replace("urls: [m8.onnx]", f"urls: [{server.url('m8.onnx')}]").replace("urls: [faces.bin]", f"urls: [{mat.faces}]")
            + "quantization: {engine: ort}\n"
        )
        common = ["run", "-r", recipe, "--workdir", tmp_path / "artifacts", "--cache", tmp_path / "cache", "--embeddings", tmp_path / "emb", "-q"]
        a = spawn(common)
        a.wait_until(_mid_download(server, tmp_path / "cache"), "run A inside its download", timeout=30)

        b = spawn([*common, "--lock-timeout", "0"])
        c = spawn([*common, "--lock-timeout", "120"])
        rc_b = b.finish(60)
        assert rc_b == 2 and "Traceback" not in b.stderr, b.stderr
        errors = [x for x in b.lines() if x.startswith("qpipe: error:")]
        assert len(errors) == 1 and b.lines()[-1] == errors[0], b.stderr
        assert "another qpipe run is building" in errors[0] and ".lock" in errors[0], b.stderr

        c.wait_until(lambda: "waiting for another qpipe run" in c.stderr, "run C waiting for the lock", timeout=30)
        assert a.proc.poll() is None, "A must still hold the lock while C waits"
        server.release()
        rc_a = a.finish(120)
        rc_c = c.finish(120)
    assert rc_a == 0, a.stderr
    assert rc_c == 0, c.stderr
    assert "Traceback" not in a.stderr + c.stderr
    assert all(f"{stage}: reused" in c.stdout for stage in ("convert", "quantize", "verify")), c.stdout
    build = Path(re.search(r"artifact: (\S+)", a.stdout).group(1))
    assert Path(re.search(r"artifact: (\S+)", c.stdout).group(1)) == build
    check = cli("manifest", "verify", build)
    assert check.exit_code == 0, check.stdout + check.stderr
    assert temporaries(tmp_path / "artifacts") == [] and temporaries(tmp_path / "cache") == []
