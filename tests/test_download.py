"""qpipe download: mirrors, cache, hashes, atomic writes and zip members by range requests.

Every network test talks to tests/httpserver.py on 127.0.0.1 (random port),
which serves a small model and a zip holding `faces_ms1m_112x112/lfw.bin`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import requests

from pipeline.stages import download as dl
from pipeline.stages.download import download, fetch, match_member
from pipeline.core.errors import UserError
from pipeline.recipe import Source, parse_recipe
from httpserver import Behaviour, FileServer  # tests/ is on sys.path (rootdir conftest), with or without `python -m`

MEMBER = "faces_ms1m_112x112/lfw.bin"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return os.urandom(300_000)


@pytest.fixture(scope="module")
def lfw_bytes() -> bytes:
    # Synthetic, partly compressible: exercises the deflate path of the member read.
    return b"".join(i.to_bytes(4, "little") * 8 for i in range(8_000)) + os.urandom(40_000)


@pytest.fixture(scope="module")
def archive_bytes(lfw_bytes: bytes) -> bytes:
    """A few MB, laid out like faces_ms1m_112x112.zip: the small member sits far from the end."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("faces_ms1m_112x112/property", b"85742,112,112\n")
        z.writestr(MEMBER, lfw_bytes, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("faces_ms1m_112x112/train.rec", os.urandom(3_000_000))  # stored: incompressible bulk
        z.writestr("faces_ms1m_112x112/agedb_30.bin", os.urandom(20_000))
    return buf.getvalue()


@pytest.fixture
def serve(model_bytes: bytes, archive_bytes: bytes) -> Iterator:
    """Start FileServers serving m.onnx and faces.zip; all are stopped after the test."""
    started: list[FileServer] = []

    def start(behaviour: Behaviour | None = None, files: dict[str, bytes] | None = None) -> FileServer:
        s = FileServer(files or {"m.onnx": model_bytes, "faces.zip": archive_bytes}, behaviour).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRY_BACKOFF", 0.0)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network I/O attempted")

    monkeypatch.setattr(requests.Session, "send", refuse)


class RecordingProgress:
    def __init__(self) -> None:
        self.tasks: list[dict] = []
        self.logs: list[str] = []

    @contextlib.contextmanager
    def task(self, description, total=None, unit="it"):
        rec = {"description": description, "total": total, "unit": unit, "advanced": 0}
        self.tasks.append(rec)

        class Handle:
            def advance(self, n=1):
                rec["advanced"] += n

            def update(self, *, total=None, completed=None):
                if total is not None:
                    rec["total"] = total
                if completed is not None:
                    rec["advanced"] = completed

        yield Handle()

    def log(self, message: str) -> None:
        self.logs.append(message)


def leftovers(cache: Path) -> list[str]:
    """Anything in the cache besides lock files: temporaries must never survive."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# --- plain files over HTTP ------------------------------------------------------


def test_http_download_is_verified_cached_and_reported_in_bytes(serve, tmp_path, model_bytes):
    s = serve()
    progress = RecordingProgress()
    res = fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model", progress=progress)
    assert res.path == tmp_path / "model" / "m.onnx"
    assert res.path.read_bytes() == model_bytes
    assert (res.sha256, res.size, res.cached, res.pinned, res.source) == (sha(model_bytes), len(model_bytes), False, True, s.url("m.onnx"))
    assert res.warnings == []
    [task] = progress.tasks
    assert task["unit"] == "B" and task["total"] == len(model_bytes) and task["advanced"] == len(model_bytes)
    assert leftovers(tmp_path) == ["model/m.onnx", "model/m.onnx.source.json"]
    assert res.to_dict()["path"] == str(res.path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert res.path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only mode


def test_two_concurrent_fetches_of_one_file_download_it_once(serve, tmp_path, model_bytes):
    import threading

    s = serve()
    src = Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes))
    results, errors = [], []

    def run():
        try:
            results.append(fetch(src, tmp_path, kind="model"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and sorted(r.cached for r in results) == [False, True]
    assert len(s.requests_for("m.onnx")) == 1


def test_second_call_is_a_cache_hit_with_the_server_stopped(serve, tmp_path, model_bytes, lfw_bytes, monkeypatch):
    s = serve()
    model = Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes))
    data = Source(urls=[s.url("faces.zip")], member="lfw.bin")  # unpinned
    first = [fetch(model, tmp_path, kind="model"), fetch(data, tmp_path, kind="data")]
    s.stop()
    monkeypatch.setattr(requests.Session, "send", lambda *a, **k: pytest.fail("network I/O on a cache hit"))
    second = [fetch(model, tmp_path, kind="model"), fetch(data, tmp_path, kind="data")]
    for a, b in zip(first, second):
        assert (b.cached, b.path, b.sha256, b.source) == (True, a.path, a.sha256, a.source)
    assert second[1].path.read_bytes() == lfw_bytes
    assert any("not pinned" in w for w in second[1].warnings)


def test_wrong_hash_names_expected_and_actual_and_leaves_nothing(serve, tmp_path, model_bytes):
    s = serve()
    wrong = "0" * 64
    with pytest.raises(UserError) as e:
        fetch(Source(urls=[s.url("m.onnx")], sha256=wrong), tmp_path, kind="model")
    msg = str(e.value)
    assert wrong in msg and sha(model_bytes) in msg and "sha256 mismatch" in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


def test_first_mirror_404_then_second_mirror_succeeds(serve, tmp_path, model_bytes):
    s = serve()
    bad, good = s.url("missing.onnx"), s.url("m.onnx")
    progress = RecordingProgress()
    res = fetch(Source(urls=[bad, good], sha256=sha(model_bytes), filename="m.onnx"), tmp_path, kind="model", progress=progress)
    assert res.source == good and res.path.read_bytes() == model_bytes
    assert len(s.requests_for("missing.onnx")) == 1  # a 404 is not retried
    assert any(bad in w and "404" in w for w in res.warnings)
    assert any(bad in line for line in progress.logs)


def test_all_mirrors_failing_lists_each_url_and_reason_on_one_line(serve, tmp_path, model_bytes):
    s = serve()
    refused = "http://127.0.0.1:9/m.onnx"  # discard port: nothing listens
    urls = [s.url("gone.onnx"), refused, s.url("m.onnx")]
    with pytest.raises(UserError) as e:
        fetch(Source(urls=urls, sha256="1" * 64, filename="m.onnx"), tmp_path, kind="model", retries=0)
    msg = str(e.value)
    assert "\n" not in msg and "all 3 sources failed" in msg
    assert f"{urls[0]}: HTTP 404" in msg
    assert f"{refused}: Connection refused" in msg
    assert f"{urls[2]}: sha256 mismatch: expected {'1' * 64}, got {sha(model_bytes)}" in msg
    assert leftovers(tmp_path) == []


def test_transient_503_is_retried(serve, tmp_path, model_bytes):
    s = serve(Behaviour(statuses={"/m.onnx": [503, 503]}))
    res = fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert res.path.read_bytes() == model_bytes
    assert [r.status for r in s.requests_for("m.onnx")] == [503, 503, 200]


def test_connection_dropped_mid_file_fails_that_mirror_and_leaves_nothing(serve, tmp_path, model_bytes):
    # The server announces the full Content-Length, sends 10 kB and closes, every time, and has no Range support.
    s = serve(Behaviour(ranges=False, drops={"/m.onnx": [10_000] * 10}))
    with pytest.raises(UserError) as e:
        fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    msg = str(e.value)
    assert s.url("m.onnx") in msg and f"connection dropped after 10,000 of {len(model_bytes):,} bytes" in msg
    assert len(s.requests_for("m.onnx")) == dl.ATTEMPTS
    assert leftovers(tmp_path) == []


def test_connection_dropped_on_first_mirror_falls_over_to_the_second(serve, tmp_path, model_bytes):
    flaky = serve(Behaviour(ranges=False, drops={"/m.onnx": [5_000] * 10}))
    good = serve()
    res = fetch(Source(urls=[flaky.url("m.onnx"), good.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert res.source == good.url("m.onnx") and res.path.read_bytes() == model_bytes


def test_dropped_connection_is_resumed_with_a_range_request(serve, tmp_path, model_bytes):
    s = serve(Behaviour(drops={"/m.onnx": [120_000]}))
    res = fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert res.path.read_bytes() == model_bytes
    first, second = s.requests_for("m.onnx")
    assert (first.status, first.sent) == (200, 120_000)
    assert (second.range, second.status) == ("bytes=120000-", 206)
    assert s.bytes_sent("m.onnx") == len(model_bytes)  # nothing fetched twice


def test_dropped_connection_without_range_support_restarts_from_zero(serve, tmp_path, model_bytes):
    s = serve(Behaviour(ranges=False, drops={"/m.onnx": [120_000]}))
    res = fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert res.path.read_bytes() == model_bytes
    assert [r.range for r in s.requests_for("m.onnx")] == [None, None]


def test_interrupted_download_leaves_nothing_under_the_final_name(serve, tmp_path, model_bytes):
    s = serve()

    class Interrupting(RecordingProgress):
        @contextlib.contextmanager
        def task(self, description, total=None, unit="it"):
            class Handle:
                def advance(self, n=1):
                    raise KeyboardInterrupt

                def update(self, *, total=None, completed=None):
                    pass

            yield Handle()

    with pytest.raises(KeyboardInterrupt):
        fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model", progress=Interrupting())
    assert leftovers(tmp_path) == []


def test_disk_full_is_a_user_error_and_leaves_nothing(serve, tmp_path, model_bytes, monkeypatch):
    s = serve()
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(dl, "open", fake_open, raising=False)
    with pytest.raises(UserError) as e:
        fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert "No space left on device" in str(e.value) and "m.onnx" in str(e.value)
    assert len(s.requests_for("m.onnx")) == 1  # a full disk is not a bad mirror: no retry elsewhere
    assert leftovers(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(serve, tmp_path, model_bytes, monkeypatch):
    s = serve()
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="not enough disk space for m.onnx"):
        fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert leftovers(tmp_path) == []


def test_corrupted_cache_entry_is_fetched_again(serve, tmp_path, model_bytes):
    s = serve()
    src = Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes))
    res = fetch(src, tmp_path, kind="model")
    res.path.write_bytes(b"bit rot")
    again = fetch(src, tmp_path, kind="model")
    assert again.cached is False and again.path.read_bytes() == model_bytes
    assert len(s.requests_for("m.onnx")) == 2


def test_changing_the_pin_fetches_again(serve, tmp_path, model_bytes):
    s = serve()
    fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch(Source(urls=[s.url("m.onnx")], sha256="2" * 64), tmp_path, kind="model")
    assert len(s.requests_for("m.onnx")) == 2
    # the failed attempt did not destroy the good copy
    assert (tmp_path / "model" / "m.onnx").read_bytes() == model_bytes


def test_unpinned_source_records_its_hash_and_warns(serve, tmp_path, model_bytes):
    s = serve()
    progress = RecordingProgress()
    res = fetch(Source(urls=[s.url("m.onnx")]), tmp_path, kind="model", progress=progress)
    assert res.pinned is False and res.sha256 == sha(model_bytes)
    [w] = res.warnings
    assert "not pinned" in w and sha(model_bytes) in w
    assert any("not pinned" in line for line in progress.logs)
    assert f'"sha256": "{sha(model_bytes)}"' in (tmp_path / "model" / "m.onnx.source.json").read_text()


# --- zip members ---------------------------------------------------------------


def test_zip_member_is_read_with_range_requests_not_the_whole_archive(serve, tmp_path, archive_bytes, lfw_bytes):
    s = serve()
    progress = RecordingProgress()
    res = fetch(Source(urls=[s.url("faces.zip")], member="lfw.bin", sha256=sha(lfw_bytes)), tmp_path, kind="data", progress=progress)
    assert res.path == tmp_path / "data" / "lfw.bin" and res.path.read_bytes() == lfw_bytes
    seen = s.requests_for("faces.zip")
    assert seen and all(r.range and r.status == 206 for r in seen if r.method == "GET")
    assert s.bytes_sent("faces.zip") < len(archive_bytes) / 10
    assert res.warnings == [] and progress.logs == []


def test_zip_member_with_explicit_ranges_only(serve, tmp_path, archive_bytes, lfw_bytes):
    s = serve(Behaviour(suffix_ranges=False))  # "bytes=-N" ignored, "bytes=a-b" honoured
    res = fetch(Source(urls=[s.url("faces.zip")], member=MEMBER, sha256=sha(lfw_bytes)), tmp_path, kind="data")
    assert res.path.read_bytes() == lfw_bytes and res.warnings == []
    gets = [r for r in s.requests_for("faces.zip") if r.method == "GET"]
    # The suffix probe got a whole-file 200, abandoned after its headers; everything else was ranged.
    assert [r.range for r in gets if r.status == 200] == ["bytes=-65536"]
    assert sum(r.sent for r in gets if r.status == 206) < len(archive_bytes) / 10


def test_zip_member_without_range_support_falls_back_to_the_whole_archive_with_a_warning(serve, tmp_path, archive_bytes, lfw_bytes):
    s = serve(Behaviour(ranges=False))
    progress = RecordingProgress()
    res = fetch(Source(urls=[s.url("faces.zip")], member="lfw.bin", sha256=sha(lfw_bytes)), tmp_path, kind="data", progress=progress)
    assert res.path.read_bytes() == lfw_bytes
    assert any("does not support HTTP range requests" in w for w in res.warnings)
    assert any("does not support HTTP range requests" in line for line in progress.logs)
    assert s.bytes_sent("faces.zip") >= len(archive_bytes)
    assert leftovers(tmp_path) == ["data/lfw.bin", "data/lfw.bin.source.json"]  # the temporary archive is gone


def test_zip_member_read_dropped_midway_is_retried(serve, tmp_path, lfw_bytes):
    # GET 1 is the directory (suffix range), GET 2 the member: drop that one after 5 kB.
    s = serve(Behaviour(drops={"/faces.zip": [None, 5_000]}))
    res = fetch(Source(urls=[s.url("faces.zip")], member="lfw.bin", sha256=sha(lfw_bytes)), tmp_path, kind="data")
    assert res.path.read_bytes() == lfw_bytes
    assert any(r.sent == 5_000 for r in s.requests_for("faces.zip"))


def test_zip_member_first_mirror_404_then_second_succeeds(serve, tmp_path, lfw_bytes):
    s = serve()
    res = fetch(Source(urls=[s.url("gone.zip"), s.url("faces.zip")], member="lfw.bin"), tmp_path, kind="data")
    assert res.source == s.url("faces.zip") and res.path.read_bytes() == lfw_bytes
    assert any(s.url("gone.zip") in w and "HTTP 404" in w for w in res.warnings)


def test_stale_temporaries_of_a_killed_run_are_swept(serve, tmp_path, model_bytes):
    s = serve()
    (tmp_path / "model").mkdir()
    stale = [tmp_path / "model" / ".m.onnx.abc123.part", tmp_path / "model" / ".m.onnx.archive.x1.zip.part"]
    for p in stale:
        p.write_bytes(b"half")
    fetch(Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes)), tmp_path, kind="model")
    assert leftovers(tmp_path) == ["model/m.onnx", "model/m.onnx.source.json"]


def test_missing_member_is_a_user_error_listing_close_names(serve, tmp_path):
    s = serve()
    with pytest.raises(UserError) as e:
        fetch(Source(urls=[s.url("faces.zip")], member="lfw.bn"), tmp_path, kind="data")
    assert "no member 'lfw.bn'" in str(e.value) and MEMBER in str(e.value)
    assert leftovers(tmp_path) == []


def test_member_url_that_is_not_a_zip_is_a_user_error(serve, tmp_path):
    s = serve()
    with pytest.raises(UserError, match="not a zip archive"):
        fetch(Source(urls=[s.url("m.onnx")], member="lfw.bin"), tmp_path, kind="data")


def test_member_matching_exact_then_unique_suffix():
    names = ["faces/", "faces/lfw.bin", "faces/cfp_fp.bin", "other/agedb_30.bin", "x/agedb_30.bin"]
    assert match_member(names, "faces/lfw.bin") == "faces/lfw.bin"
    assert match_member(names, "lfw.bin") == "faces/lfw.bin"
    assert match_member(names, "other/agedb_30.bin") == "other/agedb_30.bin"
    with pytest.raises(dl._MirrorFailed, match="ambiguous"):
        match_member(names, "agedb_30.bin")
    with pytest.raises(dl._MirrorFailed, match="close names: faces/cfp_fp.bin"):
        match_member(names, "cfp_ff.bin")


# --- local sources, offline ------------------------------------------------------


def test_file_url_and_plain_relative_path_sources(tmp_path, model_bytes, archive_bytes, lfw_bytes, no_network):
    src_dir = tmp_path / "recipes"
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "m.onnx").write_bytes(model_bytes)
    (tmp_path / "store" / "faces.zip").write_bytes(archive_bytes)
    src_dir.mkdir()
    cases = [
        ((tmp_path / "store" / "m.onnx").as_uri(), None, model_bytes),  # file:///abs
        ("../store/m.onnx", None, model_bytes),  # plain path, relative to the recipe folder
        ("file://../store/m.onnx", None, model_bytes),  # file URL written relative to the recipe folder
        ("file:../store/faces.zip", "lfw.bin", lfw_bytes),  # a local zip: the member is extracted
    ]
    for i, (url, member, want) in enumerate(cases):
        cache = tmp_path / f"cache{i}"
        res = fetch(Source(urls=[url], member=member, sha256=sha(want)), cache, kind="model", base_dir=src_dir)
        assert res.path.read_bytes() == want and res.source == url
        assert fetch(Source(urls=[url], member=member, sha256=sha(want)), cache, kind="model", base_dir=src_dir).cached


def test_missing_local_file_names_the_resolved_path(tmp_path):
    with pytest.raises(UserError) as e:
        fetch(Source(urls=["nothere/m.onnx"]), tmp_path / "cache", kind="model", base_dir=tmp_path)
    assert f"no such file: {tmp_path / 'nothere' / 'm.onnx'}" in str(e.value)


def test_unpinned_local_source_that_changed_is_copied_again(tmp_path, no_network):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"version 1")
    src = Source(urls=[str(f)])
    assert fetch(src, tmp_path / "c", kind="model").path.read_bytes() == b"version 1"
    f.write_bytes(b"version 2, longer")
    res = fetch(src, tmp_path / "c", kind="model")
    assert res.cached is False and res.path.read_bytes() == b"version 2, longer"


def test_unsupported_scheme_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unsupported URL scheme 'ftp'"):
        fetch(Source(urls=["ftp://example.org/m.onnx"]), tmp_path, kind="model")


def test_offline_miss_is_a_user_error_and_offline_hit_works(serve, tmp_path, model_bytes, monkeypatch):
    s = serve()
    src = Source(urls=[s.url("m.onnx")], sha256=sha(model_bytes))
    with pytest.raises(UserError, match=r"offline: model m.onnx is not in the cache"):
        fetch(src, tmp_path, kind="model", offline=True)
    assert s.seen == []
    fetch(src, tmp_path, kind="model")
    s.stop()
    monkeypatch.setattr(requests.Session, "send", lambda *a, **k: pytest.fail("network I/O offline"))
    assert fetch(src, tmp_path, kind="model", offline=True).cached


def test_download_fetches_model_and_data_relative_to_the_recipe(tmp_path, model_bytes, archive_bytes, lfw_bytes, no_network):
    (tmp_path / "m.onnx").write_bytes(model_bytes)
    (tmp_path / "faces.zip").write_bytes(archive_bytes)
    recipe = parse_recipe(
        {
            "name": "t",
            "model": {"urls": ["m.onnx"], "sha256": sha(model_bytes)},
            "data": {"urls": ["faces.zip"], "member": "lfw.bin"},
        }
    )
    recipe._base_dir = tmp_path
    res = download(recipe, tmp_path / "cache")
    assert res.model.path.read_bytes() == model_bytes and res.data is not None and res.data.path.read_bytes() == lfw_bytes
    assert len(res.warnings) == 1 and "not pinned" in res.warnings[0]
    assert res.to_dict()["data"]["member"] == "lfw.bin"


def test_real_model_by_file_url_is_verified_and_cached(shared_model, tmp_path, no_network):
    want = "8faf404663494bcad61ef8aab21d5d38feb0fbe5014a12e5f02b526c19d8d007"  # ../shared/README.md
    src = Source(urls=[shared_model.as_uri()], sha256=want)
    res = fetch(src, tmp_path, kind="model")
    assert (res.sha256, res.cached) == (want, False)
    assert fetch(src, tmp_path, kind="model").cached


# --- the command line ------------------------------------------------------------


def test_cli_download_exit_0_then_2_on_hash_mismatch(serve, tmp_path, model_bytes, lfw_bytes):
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    s = serve()
    recipe = tmp_path / "r.yaml"

    def write(model_sha: str) -> None:
        recipe.write_text(
            f"name: t\nmodel:\n  urls: [{s.url('m.onnx')}]\n  sha256: {model_sha}\n"
            f"data:\n  urls: [{s.url('faces.zip')}]\n  member: lfw.bin\n  sha256: {sha(lfw_bytes)}\n"
        )

    write(sha(model_bytes))
    runner = CliRunner()
    ok = runner.invoke(app, ["download", "--recipe", str(recipe), "--dest", str(tmp_path / "cache")])
    assert ok.exit_code == 0, ok.output
    assert sha(model_bytes) in ok.stdout and sha(lfw_bytes) in ok.stdout
    assert (tmp_path / "cache" / "data" / "lfw.bin").read_bytes() == lfw_bytes

    write("ab" * 32)
    bad = runner.invoke(app, ["download", "--recipe", str(recipe), "--dest", str(tmp_path / "cache2"), "--quiet"])
    assert bad.exit_code == 2
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("qpipe: error: ") and "ab" * 32 in line and sha(model_bytes) in line
    assert "Traceback" not in bad.output
    assert not (tmp_path / "cache2" / "model" / "m.onnx").exists()
