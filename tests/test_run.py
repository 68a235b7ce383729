"""`qpipe run`: one artifact directory per inputs, stage reuse, reproducibility, locking, latest.

Everything runs on a tiny synthetic opset-8 model and a tiny synthetic .bin served
through file:// URLs, so a whole build takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import ci
from pipeline.build import run as run_mod
from pipeline.cli.app import app
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.build.manifest import read_manifest, unexplained_differences, verify_manifest
from pipeline.recipe import load_recipe, with_overrides
from tests.recording import Logs
from tests.synthdata import face_model, synthetic_bin

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
name: synth-int8
model:
  urls: [file://./src/model8.onnx]
  license: Apache-2.0
  description: A tiny synthetic stand-in for a face-embedding model.
  input: {name: data, size: [32, 32]}
data:
  urls: [file://./src/faces.bin]
calibration: {samples: 16}
verify: {warmup: 1, rounds: 3, runs_per_round: 2, batch: 8, throughput_batch: 4}
gate: {max_accuracy_drop: 100.0, min_speedup: 0.0}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with a recipe whose file:// sources are a synthetic opset-8 model and .bin."""
    d = tmp_path_factory.mktemp("project")
    face_model(d / "src" / "model8.onnx", opset=8, ir_version=4, dynamic_batch=False)
    synthetic_bin(d / "src" / "faces.bin", pairs=20)
    (d / "recipe.yaml").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def first(project):
    """The first build: its own artifact root and caches."""
    recipe = load_recipe(project / "recipe.yaml")
    res = run_mod.run(
        recipe, workdir=project / "a" / "artifacts", cache_dir=project / "a" / "downloads", embeddings_dir=project / "a" / "emb",
        command="qpipe run --recipe recipe.yaml",
    )
    return res


def _run(project: Path, where: str, recipe=None, **kw):
    recipe = recipe or load_recipe(project / "recipe.yaml")
    base = project / where
    kw.setdefault("command", "qpipe run --recipe recipe.yaml")
    return run_mod.run(recipe, workdir=base / "artifacts", cache_dir=base / "downloads", embeddings_dir=base / "emb", **kw)


def test_run_builds_a_complete_artifact_directory(first, project):
    d = first.directory
    assert first.passed
    assert d.parent == project / "a" / "artifacts" / "synth-int8"
    date, ident = d.name.split("-")
    assert len(date) == 8 and date.isdigit() and len(ident) == run_mod.SHORT_HASH
    names = {p.name for p in d.iterdir()}
    assert {"fp32.onnx", "int8.onnx", "manifest.json", "report.json", "report.md", "report.png", "MODEL_CARD.md", "recipe.yaml"} <= names
    m = read_manifest(d)
    assert set(m["files"]) == names - {"manifest.json", ".state"}
    assert m["gate"]["passed"] is True
    assert m["inputs"]["model"]["sha256"] == sha256_file(project / "src" / "model8.onnx")
    assert m["inputs"]["data"]["sha256"] == sha256_file(project / "src" / "faces.bin")
    assert m["inputs"]["model"]["pinned"] is False and m["inputs"]["model"]["source"] == "file://./src/model8.onnx"
    assert m["recipe"]["sha256"] == load_recipe(project / "recipe.yaml").sha256()
    assert set(m["environment"]["versions"]) >= {"python", "onnx", "onnxruntime", "neural-compressor", "numpy", "qpipe"}
    assert "model" in m["environment"]["cpu"] and "flags" in m["environment"]["cpu"]
    for stage in ("download", "convert", "quantize", "verify"):
        t = m["execution"]["stages"][stage]
        assert t["wall_s"] >= 0 and t["peak_rss_mb"] > 0 and t["reused"] in (True, False)
    assert m["stages"]["quantize"]["outputs"]["int8.onnx"] == m["files"]["int8.onnx"]["sha256"]
    assert m["accuracy"]["faces"]["fp32"]["accuracy"] is not None
    assert m["created"]["started_at"] <= m["created"]["finished_at"]
    assert verify_manifest(d).ok


def test_latest_points_at_the_finished_passing_build(first):
    name_dir = first.directory.parent
    assert run_mod.resolve_latest(name_dir).resolve() == first.directory.resolve()


def test_model_card_has_source_licence_use_limits_metrics_environment_and_command(first):
    card = (first.directory / "MODEL_CARD.md").read_text()
    for needle in (
        "Apache-2.0",
        "A tiny synthetic stand-in",
        "## Intended use",
        "## Limits",
        "research",
        "| faces (20 pairs) | accuracy (%) |",
        "latency at batch 1",
        "## Environment",
        "onnxruntime",
        "qpipe run --recipe recipe.yaml",
        read_manifest(first.directory)["files"]["int8.onnx"]["sha256"],
    ):
        assert needle in card, needle


def test_recipe_copy_pins_both_inputs_and_loads(first):
    copy = load_recipe(first.directory / "recipe.yaml")
    m = read_manifest(first.directory)
    assert copy.model.sha256 == m["inputs"]["model"]["sha256"]
    assert copy.data.sha256 == m["inputs"]["data"]["sha256"]
    assert all(u.startswith("file:///") for u in copy.model.urls + copy.data.urls)


def test_second_run_in_the_same_place_reuses_every_stage(first, project):
    again = _run(project, "a")
    assert again.directory == first.directory
    assert all(again.stages[s].reused for s in ("convert", "quantize", "verify"))
    assert again.passed and verify_manifest(again.directory).ok


def test_two_fresh_builds_give_identical_int8_bytes_and_manifests_differing_only_in_timing(first, project):
    other = _run(project, "b")
    # Same inputs, same directory name (the date part is the day each was first built).
    assert other.directory.name.split("-")[1] == first.directory.name.split("-")[1]
    assert not any(other.stages[s].reused for s in ("convert", "quantize", "verify"))
    assert (other.directory / "int8.onnx").read_bytes() == (first.directory / "int8.onnx").read_bytes()
    assert (other.directory / "fp32.onnx").read_bytes() == (first.directory / "fp32.onnx").read_bytes()
    a, b = read_manifest(first.directory), read_manifest(other.directory)
    assert unexplained_differences(a, b) == []
    # The accuracy figures themselves are reproduced, not only excused.
    assert a["accuracy"] == b["accuracy"]


def test_a_missing_output_reruns_only_its_stage(first, project):
    shutil.copytree(project / "a", project / "c", symlinks=True)
    d = project / "c" / "artifacts" / "synth-int8" / first.directory.name
    (d / "int8.onnx").unlink()
    res = _run(project, "c")
    assert res.directory == d
    assert res.stages["convert"].reused
    assert not res.stages["quantize"].reused
    # Quantization is deterministic: the same bytes come back, so verify's inputs are unchanged.
    assert res.stages["verify"].reused
    assert verify_manifest(d).ok


def test_changed_settings_build_a_new_directory(first, project):
    recipe = with_overrides(load_recipe(project / "recipe.yaml"), {"gate.max_accuracy_drop": 50.0})
    assert run_mod.input_id("m", "d", recipe.sha256()) != run_mod.input_id("m", "d", load_recipe(project / "recipe.yaml").sha256())


def test_interrupted_run_leaves_no_finished_artifact_and_resumes(first, project, monkeypatch):
    import pipeline.stages.verify

    shutil.copytree(project / "a" / "downloads", project / "i" / "downloads", symlinks=True)
    recipe = with_overrides(load_recipe(project / "recipe.yaml"), {"verify.rounds": 2})

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.stages.verify, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(project, "i", recipe)
    name_dir = project / "i" / "artifacts" / "synth-int8"
    (d,) = [p for p in name_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    assert not (d / "manifest.json").exists()
    assert not (d / "MODEL_CARD.md").exists()
    assert run_mod.resolve_latest(name_dir) is None
    assert not list(d.glob("*.part")) and not list(d.glob(".*.part"))

    monkeypatch.undo()
    res = _run(project, "i", recipe)
    assert res.directory == d
    assert res.stages["convert"].reused and res.stages["quantize"].reused and not res.stages["verify"].reused
    assert (d / "manifest.json").exists() and verify_manifest(d).ok
    assert run_mod.resolve_latest(name_dir).resolve() == d.resolve()


def test_a_failed_gate_exits_1_keeps_its_reports_and_is_not_latest(first, project):
    shutil.copytree(project / "a", project / "g", symlinks=True)
    runner = CliRunner()
    args = [
        "run", "--recipe", str(project / "recipe.yaml"), "--workdir", str(project / "g" / "artifacts"),
        "--cache", str(project / "g" / "downloads"), "--embeddings", str(project / "g" / "emb"),
        "--min-speedup", "1000000", "--quiet", "--json",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    failed = Path(out["directory"])
    assert out["passed"] is False and failed != project / "g" / "artifacts" / "synth-int8" / first.directory.name
    assert "speedup" in r.stderr
    m = read_manifest(failed)
    assert m["gate"]["passed"] is False and m["gate"]["reasons"]
    assert (failed / "report.md").exists() and "FAILED" in (failed / "MODEL_CARD.md").read_text()
    assert "--min-speedup 1000000" in m["command"]
    # latest still names the earlier passing build.
    assert run_mod.resolve_latest(failed.parent).name == first.directory.name


def test_second_run_on_a_locked_directory_waits_then_fails_clearly(first, project):
    from filelock import FileLock

    name_dir = first.directory.parent
    holder = FileLock(str(name_dir / run_mod.LOCK_NAME))
    logs = Logs()
    with holder:
        with pytest.raises(UserError, match="another qpipe run"):
            _run(project, "a", lock_timeout=0.3, progress=logs)
    assert any("waiting for another qpipe run" in line for line in logs.lines)


def test_a_waiting_run_proceeds_when_the_lock_is_released(first, project):
    from filelock import FileLock

    holder = FileLock(str(first.directory.parent / run_mod.LOCK_NAME), thread_local=False)
    holder.acquire()
    threading.Timer(0.5, holder.release).start()
    logs = Logs()
    res = _run(project, "a", lock_timeout=30, progress=logs)
    assert res.passed and any("waiting" in line for line in logs.lines)


def test_latest_falls_back_to_a_text_file_without_symlinks(first, project, monkeypatch):
    shutil.copytree(project / "a" / "artifacts", project / "s" / "artifacts", symlinks=True)
    name_dir = project / "s" / "artifacts" / "synth-int8"
    (name_dir / "latest").unlink()

    def no_symlinks(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    pointer = run_mod._point_latest(name_dir)
    assert pointer == name_dir / "LATEST"
    assert (name_dir / "LATEST").read_text().strip() == first.directory.name
    assert run_mod.resolve_latest(name_dir).name == first.directory.name


def test_recipe_without_data_is_a_user_error(project, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {urls: [file://./m.onnx]}\n")
    with pytest.raises(UserError, match="no `data:` source"):
        run_mod.run(load_recipe(p), workdir=tmp_path / "art")


def test_download_cache_key_follows_the_pinned_hashes(project):
    r = load_recipe(ROOT / "recipes" / "int8.yaml")
    key = run_mod.download_cache_key(r)
    assert r.model.sha256 in key and "unpinned-" in key  # int8.yaml pins the model, not the data
    repinned = with_overrides(r, {"data.sha256": "ab" * 32})
    assert run_mod.download_cache_key(repinned) == f"qpipe-downloads-{r.model.sha256}-{'ab' * 32}"
    moved = with_overrides(r, {"data.urls": ["https://example.invalid/other.zip"]})
    assert run_mod.download_cache_key(moved) != key


def test_ci_helpers_print_github_outputs(tmp_path, capsys):
    assert ci.main(["cache-key", str(ROOT / "recipes" / "int8.yaml")]) == 0
    assert capsys.readouterr().out.startswith("key=qpipe-downloads-")
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"recipe": "r", "directory": "/x/artifacts/r/20260101-abc"}))
    assert ci.main(["github-outputs", str(j)]) == 0
    assert capsys.readouterr().out.splitlines() == ["directory=/x/artifacts/r/20260101-abc", "artifact=r-20260101-abc"]
    j.write_text("")
    assert ci.main(["github-outputs", str(j)]) == 0 and capsys.readouterr().out == ""
    assert ci.main(["cache-key", str(tmp_path / "missing.yaml")]) == 2


def test_reproduce_command_names_the_overrides():
    cmd = run_mod.reproduce_command("recipes/x.yaml", {"gate.max_accuracy_drop": 0.2, "gate.min_speedup": None, "verify.pairs": 600})
    assert cmd == "qpipe run --recipe recipes/x.yaml --max-accuracy-drop 0.2 --pairs 600"


def test_model_card_reports_every_data_set_the_subset_and_the_failed_gate():
    from pipeline.build.modelcard import render_model_card

    metrics = {"accuracy": 99.5, "accuracy_std": 0.3, "threshold_mean": 1.4, "tar_at_far": 97.0, "roc_auc": 0.998}
    worse = {**metrics, "accuracy": 98.9}
    manifest = {
        "name": "m",
        "recipe": {"resolved": {"model": {"urls": ["https://x/m.onnx"], "license": None, "input": {"size": [112, 112]}}}},
        "inputs": {"model": {"source": "https://x/m.onnx", "sha256": "ab" * 32, "pinned": True}, "data": {"source": "https://x/d.zip", "member": "lfw.bin"}},
        "gate": {"passed": False, "reasons": ["lfw: int8 accuracy 98.90% is 0.60 points below fp32"], "max_accuracy_drop": 0.1, "min_speedup": 1.0},
        "command": "qpipe run --recipe recipes/x.yaml --pairs 600",
    }
    report = {
        "data": {
            "lfw": {"pairs": 600, "total_pairs": 6000, "subset": True, "fp32": metrics, "int8": worse},
            "cfp_fp": {"pairs": 7000, "total_pairs": 7000, "subset": False, "fp32": metrics, "int8": metrics},
        },
        "fp32": {"latency_ms_p50": 2.0}, "int8": {"latency_ms_p50": 1.0}, "speedup": 2.0, "speedup_iqr": [1.9, 2.1],
    }
    card = render_model_card(manifest, report)
    assert "| lfw (subset: first 600 of 6000 pairs) | accuracy (%) | 99.50 | 98.90 | -0.60 |" in card
    assert "| cfp_fp (7000 pairs) | accuracy (%) | 99.50 | 99.50 | 0.00 |" in card
    assert "2.00x (IQR 1.90-2.10)" in card
    assert "**FAILED**" in card and "0.60 points below fp32" in card
    assert "not stated in the recipe" in card  # no licence given: said so, not invented
    assert "qpipe run --recipe recipes/x.yaml --pairs 600" in card
    assert "No verification report" in render_model_card(manifest, None)


@pytest.mark.slow
def test_real_mobilefacenet_artifact_quantizes_reproducibly(shared_model, shared_lfw, tmp_path):
    """The shipped local recipe on a quick subset: complete artifact; re-quantizing gives the same int8 bytes."""
    recipe = with_overrides(
        load_recipe(ROOT / "recipes" / "mobilefacenet-local.yaml"),
        {"calibration.samples": 10, "verify.pairs": 100, "verify.rounds": 3, "gate.min_speedup": 0.0, "gate.max_accuracy_drop": 100.0},
    )
    kw = dict(workdir=tmp_path / "art", cache_dir=tmp_path / "dl", embeddings_dir=tmp_path / "emb")
    res = run_mod.run(recipe, **kw)
    d = res.directory
    assert res.passed and verify_manifest(d).ok
    m = read_manifest(d)
    assert m["inputs"]["model"]["pinned"] and m["inputs"]["model"]["sha256"] == recipe.model.sha256
    assert m["accuracy"]["lfw"]["subset"] is True and m["accuracy"]["lfw"]["pairs"] == 100
    int8 = (d / "int8.onnx").read_bytes()
    (d / "int8.onnx").unlink()
    again = run_mod.run(recipe, **kw)
    assert again.stages["convert"].reused and not again.stages["quantize"].reused
    assert (d / "int8.onnx").read_bytes() == int8
    assert again.stages["verify"].reused  # same bytes, same verify inputs
    assert unexplained_differences(m, read_manifest(d)) == []
