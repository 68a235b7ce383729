"""`qpipe index` over build directories, and `qpipe run` of several recipes with shared caches.

The index tests use small hand-made build directories (a manifest written by the
manifest module, an int8 file); the end-to-end test builds two tiny synthetic
recipes for real on two injected CPU classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import ci
from pipeline.build import index as ix
from pipeline.build.manifest import write_manifest, verify_manifest
from pipeline.cli.app import app
from pipeline.core.errors import UserError
from tests.synthdata import face_model, synthetic_bin


def fake_build(
    root: Path, recipe: str, target: str | None, *, int8: bytes = b"int8 bytes", passed: bool = True, cls: str = "avx2",
    speedup: float = 1.4, model: str = "Test CPU", day: str = "20260101", latest: bool = False,
) -> Path:
    """A finished build directory as `qpipe run` leaves it, with only the parts the index reads."""
    d = root / recipe / f"{day}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    d.mkdir(parents=True)
    (d / "int8.onnx").write_bytes(int8)
    (d / "report.md").write_text(f"# report {recipe} {target}\n")
    (d / "report.json").write_text(json.dumps({"speedup": speedup}))
    (d / "MODEL_CARD.md").write_text(f"# {recipe}\n")
    (d / "recipe.yaml").write_text(f"name: {recipe}\n")
    sha = hashlib.sha256(int8).hexdigest()
    limit = 1.2
    body = {
        "name": recipe,
        "inputs": {"id": d.name.split("-")[1]},
        "recipe": {"sha256": "r" * 64},
        "environment": {"cpu": {"model": model, "isa_class": {"detected": cls, "classes": [cls], "flags": [cls], "source": "/proc/cpuinfo"}}, "target": target},
        "stages": {"quantize": {"outputs": {"int8.onnx": sha}}},
        "accuracy": {
            "unit": "percent",
            "lfw": {"fp32": {"accuracy": 99.55}, "int8": {"accuracy": 99.5}, "accuracy_drop": 0.05, "pairs": 600, "subset": True},
        },
        "gate": {
            "passed": passed, "reasons": [] if passed else [f"speedup {speedup:.2f}x is below the required {limit:.2f}x"],
            "max_accuracy_drop": 0.1, "min_speedup": limit,
            "cpu_class": {"detected": cls, "threshold_class": cls, "min_speedup": limit, "why": f"CPU class {cls}; gate.min_speedup_by_class.{cls}"},
        },
        "execution": {"speed": {"speedup": speedup, "speedup_iqr": [speedup - 0.1, speedup + 0.1], "threads": 2}},
    }
    write_manifest(d, body, measured=("report.md", "report.json", "MODEL_CARD.md"))
    if latest:
        os.symlink(d.name, d.parent / "latest")
    return d


@pytest.fixture
def cells(tmp_path) -> Path:
    """Downloaded CI artifacts: one folder per cell, each holding one build."""
    root = tmp_path / "cells"
    fake_build(root / "cell--mfn--github-hosted", "mfn", "github-hosted", speedup=1.4, latest=True)
    fake_build(root / "cell--mfn--avx512-vnni", "mfn", "avx512-vnni", cls="avx512_vnni", speedup=2.3, model="Xeon")
    fake_build(root / "failed--prelu--github-hosted", "prelu", "github-hosted", int8=b"prelu", passed=False, speedup=0.9)
    fake_build(root / "cell--prelu--avx512-vnni", "prelu", "avx512-vnni", int8=b"prelu", cls="avx512_vnni", speedup=1.9)
    return root


def test_index_has_one_row_per_build_sorted_by_recipe_and_target(cells):
    idx = ix.build_index([cells])
    rows = idx["builds"]
    assert [(r["recipe"], r["target"]) for r in rows] == [
        ("mfn", "avx512-vnni"), ("mfn", "github-hosted"), ("prelu", "avx512-vnni"), ("prelu", "github-hosted")
    ]  # the `latest` symlink does not count a build twice
    r = rows[0]
    assert r["cpu"] == {"model": "Xeon", "isa_class": "avx512_vnni", "isa_evidence": ["avx512_vnni"], "isa_source": "/proc/cpuinfo", "threads": 2}
    assert r["accuracy"] == {"lfw": {"fp32": 99.55, "int8": 99.5, "drop": 0.05, "pairs": 600, "subset": True}}
    assert r["speedup"] == 2.3 and r["speedup_iqr"] == pytest.approx([2.2, 2.4]) and r["verdict"] == "passed"
    assert r["gate"]["min_speedup"] == 1.2 and r["gate"]["threshold_class"] == "avx512_vnni"
    assert r["int8_sha256"] == hashlib.sha256(b"int8 bytes").hexdigest()
    assert rows[3]["verdict"] == "failed" and rows[3]["gate"]["reasons"]
    assert idx["passed"] is False
    assert idx["recipes"]["mfn"]["same_int8"] and idx["recipes"]["prelu"]["same_int8"]
    assert ix.int8_mismatches(idx) == []


def test_index_files_are_deterministic_and_the_table_names_every_column(cells, tmp_path):
    j1, m1 = ix.write_index(ix.build_index([cells]), tmp_path / "one")
    j2, m2 = ix.write_index(ix.build_index([cells]), tmp_path / "two")
    assert j1.read_bytes() == j2.read_bytes() and m1.read_bytes() == m2.read_bytes()
    md = m1.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| recipe"))
    for col in ("target", "CPU", "ISA class", "data set", "fp32", "int8", "speedup (IQR)", "verdict", "int8 sha256"):
        assert col in header
    assert "| mfn | avx512-vnni | Xeon | avx512_vnni | lfw (first 600 pairs) | 99.55 | 99.50 | 0.05 | 2.30x (2.20-2.40) | - | 1.20x (avx512_vnni) | passed |" in md
    assert "**FAILED**" in md and "below the required 1.20x" in md
    assert json.loads(j1.read_text())["builds"][0]["recipe"] == "mfn"


def test_different_int8_bytes_between_cells_are_named(cells, tmp_path):
    fake_build(cells / "cell--mfn--amx", "mfn", "amx", int8=b"other bytes", cls="amx")
    idx = ix.build_index([cells])
    assert not idx["recipes"]["mfn"]["same_int8"]
    (line,) = ix.int8_mismatches(idx)
    assert line.startswith("mfn: the int8.onnx bytes differ") and "amx (" in line and "github-hosted (" in line
    r = CliRunner().invoke(app, ["index", str(cells), "--out", str(tmp_path / "out"), "--check-same-int8"])
    assert r.exit_code == 1 and "qpipe: error: mfn: the int8.onnx bytes differ" in r.stderr
    assert "the int8.onnx bytes differ" in (tmp_path / "out" / "index.md").read_text()  # written anyway, for the summary
    assert CliRunner().invoke(app, ["index", str(cells), "--out", str(tmp_path / "out")]).exit_code == 0
    # The module entry the release job runs without installing qpipe says the same.
    assert ci.main(["index", str(cells), "--out", str(tmp_path / "m"), "--check-same-int8"]) == 1


def test_an_invalid_manifest_or_no_build_is_a_user_error(cells, tmp_path):
    bad = cells / "cell--x--y" / "x" / "20260101-000000000000"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text("{not json")
    r = CliRunner().invoke(app, ["index", str(cells), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.startswith("qpipe: error: invalid ") and "manifest.json" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o" / "index.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, ["index", str(empty)])
    assert r.exit_code == 2 and "no build directory" in r.stderr
    assert CliRunner().invoke(app, ["index", str(tmp_path / "missing")]).exit_code == 2


def test_default_out_is_the_folder_given_or_beside_a_build(cells):
    one = cells / "cell--mfn--avx512-vnni" / "mfn"
    b = next(one.iterdir())
    assert ix.default_out([cells]) == cells and ix.default_out([b]) == one
    idx = ix.build_index([b])
    assert len(idx["builds"]) == 1 and idx["builds"][0]["directory"] == b.name


def test_release_assets_hold_each_recipes_int8_once_and_every_passing_targets_reports(cells, tmp_path):
    idx = ix.build_index([cells])
    builds = {name: d for d, name in ix.find_builds([cells])}
    written = ix.release_assets(idx, builds, tmp_path / "dist")
    names = sorted(p.name for p in written)
    assert names.count("mfn.int8.onnx") == 1 and names.count("prelu.int8.onnx") == 1
    assert {"mfn--github-hosted.report.md", "mfn--avx512-vnni.report.md", "prelu--avx512-vnni.report.json", "prelu--avx512-vnni.manifest.json"} <= set(names)
    assert "prelu--github-hosted.report.md" not in names  # its gate failed
    assert (tmp_path / "dist" / "prelu.int8.onnx").read_bytes() == b"prelu"
    # A model whose bytes are not the manifest's is never released.
    d = builds[idx["builds"][0]["directory"]]
    (d / "int8.onnx").write_bytes(b"tampered")
    with pytest.raises(UserError, match="not the one the manifest records"):
        ix.release_assets(idx, builds, tmp_path / "dist2")


# --- several recipes in one `qpipe run`, then the index ---------------------------------------

RECIPE = """\
name: NAME
model:
  urls: [file://./src/model8.onnx]
  input: {name: data, size: [32, 32]}
data:
  urls: [DATA]
calibration: {samples: 16}
verify: {warmup: 1, rounds: 3, runs_per_round: 2, batch: 8, throughput_batch: 4}
gate: {max_accuracy_drop: 100.0, GATE}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("multi")
    face_model(d / "src" / "model8.onnx", opset=8, ir_version=4, dynamic_batch=False)
    synthetic_bin(d / "src" / "faces.bin", pairs=20)
    recipes = {
        "a-plain.yaml": ("synth-plain", "file://./src/faces.bin", "min_speedup: 0.0"),
        # Any real speedup is above 0.001x and below 1000x: the class alone decides the verdict.
        "b-per-class.yaml": ("synth-per-class", "file://./src/faces.bin", "min_speedup_by_class: {avx2: 0.001, avx512_vnni: 1000.0}"),
        "c-broken.yaml": ("synth-broken", "file://./src/missing.bin", "min_speedup: 0.0"),
    }
    for fname, (name, data, gate) in recipes.items():
        (d / "recipes").mkdir(exist_ok=True)
        (d / "recipes" / fname).write_text(RECIPE.replace("NAME", name).replace("./src", "../src").replace("DATA", data.replace("./src", "../src")).replace("GATE", gate))
    return d


def _run(project: Path, workdir: str, *recipes: str, cls: str, target: str | None = None, json_out: bool = False):
    args = ["run", "--workdir", str(project / workdir), "--cache", str(project / "dl"), "--embeddings", str(project / "emb"), "--quiet"]
    for r in recipes:
        args += ["--recipe", r]
    env = {"QPIPE_CPU_CLASS": cls, "QPIPE_TARGET": target}
    return CliRunner().invoke(app, args + (["--json"] if json_out else []), env=env)


def test_several_recipes_in_one_run_share_the_caches_and_index_per_class(project, monkeypatch):
    monkeypatch.chdir(project)
    # A quoted glob and an explicit path naming the same file: built once.
    r = _run(project, "art-avx2", "recipes/[ab]-*.yaml", "recipes/a-plain.yaml", cls="avx2", target="avx2-box")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("== recipes/") == 2 and "recipes/a-plain.yaml: passed" in r.stdout and "recipes/b-per-class.yaml: passed" in r.stdout
    assert "download: reused" in r.stdout.split("== recipes/b-per-class.yaml ==")[1]  # the second recipe's inputs came from the cache

    r = _run(project, "art-vnni", "recipes/b-per-class.yaml", "recipes/a-plain.yaml", cls="avx512_vnni", target="vnni-box", json_out=True)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert out["exit_code"] == 1 and [o["exit_code"] for o in out["recipes"]] == [1, 0]
    failed = out["recipes"][0]["build"]
    assert failed["gate"]["cpu_class"]["detected"] == "avx512_vnni" and failed["gate"]["min_speedup"] == 1000.0
    assert "qpipe: gate failed: synth-per-class: speedup" in r.stderr

    idx_run = CliRunner().invoke(app, ["index", "art-avx2", "art-vnni", "--out", "idx", "--check-same-int8", "--json"])
    assert idx_run.exit_code == 0, idx_run.output
    idx = json.loads(idx_run.stdout)
    cells = [(b["recipe"], b["target"], b["cpu"]["isa_class"], b["verdict"]) for b in idx["builds"]]
    assert cells == [
        ("synth-per-class", "avx2-box", "avx2", "passed"),
        ("synth-per-class", "vnni-box", "avx512_vnni", "failed"),
        ("synth-plain", "avx2-box", "avx2", "passed"),
        ("synth-plain", "vnni-box", "avx512_vnni", "passed"),
    ]
    assert all(g["same_int8"] for g in idx["recipes"].values())
    for b in idx["builds"]:
        assert verify_manifest(project / b["directory"]).ok
    assert (project / "idx" / "index.md").is_file()


def test_one_recipe_with_an_error_does_not_stop_the_others_and_exits_2(project, monkeypatch):
    monkeypatch.chdir(project)
    r = _run(project, "art-err", "recipes/c-broken.yaml", "recipes/a-plain.yaml", cls="avx2")
    assert r.exit_code == 2, r.output
    assert "qpipe: error: recipes/c-broken.yaml:" in r.stderr and "Traceback" not in r.output
    assert "recipes/c-broken.yaml: error" in r.stdout and "recipes/a-plain.yaml: passed" in r.stdout


def test_a_glob_matching_nothing_and_a_bad_recipe_stop_before_any_build(project, monkeypatch):
    monkeypatch.chdir(project)
    r = _run(project, "art-none", "recipes/zz-*.yaml", "recipes/a-plain.yaml", cls="avx2")
    assert r.exit_code == 2 and "no recipe matches 'recipes/zz-*.yaml'" in r.stderr
    assert not (project / "art-none").exists()


def test_one_recipe_keeps_the_single_build_output(project, monkeypatch):
    monkeypatch.chdir(project)
    r = _run(project, "art-avx2", "recipes/a-plain.yaml", cls="avx2", json_out=True)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["recipe"] == "synth-plain" and Path(out["directory"]).is_dir()  # the shape the CI helpers read
