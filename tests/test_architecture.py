"""The package's layers and the absence of import cycles, as declared in pyproject.toml, hold (checked by import-linter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else ["lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*cmd, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def test_every_import_points_down_the_layers_and_no_folder_has_a_cycle():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_an_import_inside_a_function_that_reaches_up_breaks_the_layers_contract(tmp_path):
    root = _copy(tmp_path)
    errors = root / "pipeline" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from pipeline.build import run  # noqa: F401\n")
    r = _lint_imports(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pipeline.core is not allowed to import pipeline.build" in r.stdout


def test_a_cycle_between_two_modules_of_one_folder_breaks_the_cycle_contract(tmp_path):
    root = _copy(tmp_path)
    protocol = root / "pipeline" / "eval" / "protocol.py"
    protocol.write_text(protocol.read_text() + "\n\nif False:\n    from pipeline.eval import speed  # noqa: F401\n")
    speed = root / "pipeline" / "eval" / "speed.py"
    speed.write_text(speed.read_text() + "\n\nif False:\n    from pipeline.eval import protocol  # noqa: F401\n")
    r = _lint_imports(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "No cycles are allowed in pipeline.eval" in r.stdout


def test_a_module_outside_every_layer_breaks_the_contract(tmp_path):
    root = _copy(tmp_path)
    (root / "pipeline" / "misc.py").write_text('"""A module that belongs to no layer."""\n')
    r = _lint_imports(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pipeline.misc" in r.stdout
