"""The artifact manifest: every file hashed, every difference reported, exit codes 0/1/2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.build import manifest as mf
from pipeline.cli.app import app
from pipeline.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _artifact(tmp_path: Path) -> Path:
    d = tmp_path / "build"
    (d / "sub").mkdir(parents=True)
    (d / "int8.onnx").write_bytes(bytes(range(256)) * 4)
    (d / "report.md").write_text("# report\nlatency 1.23 ms\n")
    (d / "sub" / "notes.txt").write_text("nested files are listed too\n")
    # Bookkeeping that is not part of the artifact.
    (d / ".state").mkdir()
    (d / ".state" / "stages.json").write_text("{}")
    (d / ".int8.onnx.abc.part").write_bytes(b"half-written")
    mf.write_manifest(d, {"name": "t", "created": {"started_at": "a"}}, measured=["report.md"])
    return d


def _flip_one_byte(path: Path, at: int = 10) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def test_manifest_lists_every_artifact_file_with_hash_and_size_but_not_bookkeeping(tmp_path):
    d = _artifact(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema"] == mf.SCHEMA
    assert sorted(m["files"]) == ["int8.onnx", "report.md", "sub/notes.txt"]
    e = m["files"]["int8.onnx"]
    assert e["size"] == 1024 and len(e["sha256"]) == 64 and "measured" not in e
    assert m["files"]["report.md"]["measured"] is True


def test_fresh_artifact_verifies_clean(tmp_path):
    check = mf.verify_manifest(_artifact(tmp_path))
    assert check.ok and check.checked == 3 and check.problems() == []


def test_one_changed_byte_is_reported_as_changed(tmp_path):
    d = _artifact(tmp_path)
    _flip_one_byte(d / "int8.onnx")
    check = mf.verify_manifest(d)
    assert not check.ok
    assert [c.path for c in check.changed] == ["int8.onnx"]
    assert check.changed[0].expected_size == check.changed[0].actual_size == 1024
    assert not check.missing and not check.extra


def test_every_difference_is_reported_at_once(tmp_path):
    d = _artifact(tmp_path)
    _flip_one_byte(d / "int8.onnx")
    (d / "sub" / "notes.txt").unlink()
    (d / "report.md").write_text("# report\nlatency 9.99 ms, and longer\n")
    (d / "surprise.bin").write_bytes(b"x")
    check = mf.verify_manifest(d)
    assert sorted(c.path for c in check.changed) == ["int8.onnx", "report.md"]
    assert check.missing == ["sub/notes.txt"]
    assert check.extra == ["surprise.bin"]
    assert len(check.problems()) == 4


def test_extra_files_fail_unless_allowed(tmp_path):
    d = _artifact(tmp_path)
    (d / "added.txt").write_text("x")
    assert not mf.verify_manifest(d).ok
    allowed = mf.verify_manifest(d, allow_extra=True)
    assert allowed.ok and allowed.extra == ["added.txt"]


def test_missing_or_invalid_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        mf.verify_manifest(tmp_path / "nope")
    d = _artifact(tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        mf.verify_manifest(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid"):
        mf.verify_manifest(d)
    (d / "manifest.json").write_text(json.dumps({"schema": "something-else", "files": {}}))
    with pytest.raises(UserError, match="schema"):
        mf.verify_manifest(d)


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", ".state/stages.json", "a/../../b"])
def test_manifest_cannot_point_outside_the_artifact(tmp_path, bad):
    d = _artifact(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][bad] = {"sha256": "0" * 64, "size": 1}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="not a plain path"):
        mf.verify_manifest(d)


def test_failed_listing_leaves_no_manifest_and_no_temporary_file(tmp_path, monkeypatch):
    d = tmp_path / "build"
    d.mkdir()
    (d / "a.txt").write_text("a")

    def boom(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(mf, "sha256_file", boom)
    with pytest.raises(OSError):
        mf.write_manifest(d, {})
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]


def test_cli_manifest_verify_exit_codes_0_1_2(tmp_path):
    d = _artifact(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["manifest", "verify", str(d)])
    assert ok.exit_code == 0, ok.output
    assert "OK: 3 files" in ok.output

    _flip_one_byte(d / "int8.onnx")
    bad = runner.invoke(app, ["manifest", "verify", str(d)])
    assert bad.exit_code == 1
    assert "changed: int8.onnx" in bad.output

    as_json = runner.invoke(app, ["manifest", "verify", str(d), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["changed"][0]["path"] == "int8.onnx"

    (d / "manifest.json").unlink()
    missing = runner.invoke(app, ["manifest", "verify", str(d)])
    assert missing.exit_code == 2
    assert "no manifest.json" in missing.output


def test_standalone_checker_needs_only_the_standard_library(tmp_path):
    d = _artifact(tmp_path)
    # -S -I: no site-packages, no user paths: the release job runs it on a bare runner Python.
    cmd = [sys.executable, "-S", "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); from pipeline.cli.ci import main; sys.exit(main([\"manifest\"] + sys.argv[2:]))", str(ROOT), str(d)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    _flip_one_byte(d / "report.md", at=3)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "changed: report.md" in r.stdout
    shutil.rmtree(d)
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 2


def _manifest() -> dict:
    return {
        "schema": mf.SCHEMA,
        "inputs": {"model": {"sha256": "a" * 64}},
        "files": {
            "int8.onnx": {"sha256": "1" * 64, "size": 10},
            "report.json": {"sha256": "2" * 64, "size": 20, "measured": True},
        },
        "execution": {"stages": {"quantize": {"wall_s": 1.0, "reused": False}}, "speed": {"speedup_iqr": [1.1, 1.3]}},
        "created": {"started_at": "t0", "finished_at": "t1"},
    }


def test_timestamps_durations_and_measured_files_are_the_only_explained_differences():
    a, b = _manifest(), _manifest()
    b["created"]["finished_at"] = "t2"
    b["execution"]["stages"]["quantize"]["wall_s"] = 2.5
    b["execution"]["speed"]["speedup_iqr"][1] = 1.4
    b["files"]["report.json"].update(sha256="3" * 64, size=21)
    assert mf.diff_manifests(a, b) == [
        "created.finished_at",
        "execution.speed.speedup_iqr[1]",
        "execution.stages.quantize.wall_s",
        "files.report.json.sha256",
        "files.report.json.size",
    ]
    assert mf.unexplained_differences(a, b) == []


def test_a_changed_model_or_unmeasured_file_is_an_unexplained_difference():
    a, b = _manifest(), _manifest()
    b["files"]["int8.onnx"]["sha256"] = "9" * 64
    b["inputs"]["model"]["sha256"] = "b" * 64
    b["files"]["extra.txt"] = {"sha256": "4" * 64, "size": 1}
    assert mf.unexplained_differences(a, b) == ["files.extra.txt", "files.int8.onnx.sha256", "inputs.model.sha256"]


def test_a_measured_flag_on_one_side_only_does_not_excuse_a_hash_change():
    a, b = _manifest(), _manifest()
    del a["files"]["report.json"]["measured"]
    b["files"]["report.json"]["sha256"] = "3" * 64
    assert "files.report.json.sha256" in mf.unexplained_differences(a, b)


def test_git_revision_names_this_checkout_and_nothing_elsewhere(tmp_path):
    assert mf.git_revision(tmp_path) is None
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout of qpipe here")
    rev = mf.git_revision(ROOT)
    assert rev is not None and len(rev["commit"]) == 40 and isinstance(rev["dirty"], bool)
