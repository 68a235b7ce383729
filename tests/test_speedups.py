"""Batch-1 models embedded through a checked batched copy; two speedups (over the model as given and over the
fastest fp32), the gate reading the first; `qpipe run` keeping the model as given beside the rewritten fp32.

Timings are injected (a fake clock and fake sessions): nothing here asserts wall-clock times.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from pipeline.build import run as run_mod
from pipeline.build.index import build_index
from pipeline.build.manifest import read_manifest, verify_manifest
from pipeline.cli.app import app
from pipeline.core.files import sha256_file
from pipeline.data.bins import read_bin
from pipeline.eval import embeddings as E
from pipeline.eval import protocol as M
from pipeline.eval import speed as bench
from pipeline.recipe import InputSpec, load_recipe, with_overrides
from pipeline.runtime.graph import make_batch_dynamic
from pipeline.runtime.session import OnnxModel
from pipeline.stages import verify as verify_mod
from tests.recording import Logs
from tests.synthdata import INPUT_NAME, face_model, synthetic_bin

SPEC = InputSpec(size=[32, 32])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("speedups")
    face_model(d / "static.onnx", dynamic_batch=False)
    return {
        "static": d / "static.onnx",
        "bin": synthetic_bin(d / "faces.bin", pairs=40),
        "dir": d,
    }


def _tiny(path: Path, nodes, inits, opset: int = 14) -> Path:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _unbatchable(path: Path) -> Path:
    """A batch-1 model whose Reshape pins the batch (allowzero with -1): no batched copy can be made."""
    shape = onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    return _tiny(path, [helper.make_node("Reshape", [INPUT_NAME, "shape"], ["emb"], allowzero=1)], [shape])


def _batch_mixing(path: Path) -> Path:
    """A batch-1 model that averages over the batch: a batched copy runs but gives other embeddings."""
    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Add", [INPUT_NAME, "mean"], ["sum"]),
        helper.make_node("Flatten", ["sum"], ["emb"], axis=1),
    ]
    return _tiny(path, nodes, [], opset=13)


# --- the batched copy of a batch-1 model ---------------------------------------------------------------


def test_batched_copy_gives_the_single_runs_embeddings_accuracy_and_cache_key(data, tmp_path):
    model = data["static"]
    before = sha256_file(model)
    b = read_bin(data["bin"])
    logs = Logs()
    single, _ = E.embed_pairs_with_info(model, b, input_spec=SPEC, batch=1)
    cache = tmp_path / "cache"
    batched, info = E.embed_pairs_with_info(model, b, input_spec=SPEC, batch=8, cache_dir=cache, progress=logs)
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)
    m1 = M.evaluate(single[0::2], single[1::2], b.issame, folds=10)
    m8 = M.evaluate(batched[0::2], batched[1::2], b.issame, folds=10)
    assert m8.accuracy == m1.accuracy and m8.threshold_mean == m1.threshold_mean
    assert not any("one image per pass" in line for line in logs.lines), logs.lines
    # The copy lives in memory only: the file, and so the cache key, are the user's.
    assert sha256_file(model) == before
    key = E.cache_key(model_sha256=before, data_sha256=b.sha256(), input_spec=SPEC, flip=True, pairs=b.num_pairs)
    assert info.cache_file == str(E.cache_file(cache, key)) and Path(info.cache_file).is_file()


def test_batch_runner_uses_a_dynamic_copy_only_for_a_fixed_batch_of_one(data):
    imgs = read_bin(data["bin"]).decode_many(np.arange(8))
    static = OnnxModel(data["static"], input_name=SPEC.name)
    runner = E.batch_runner(static, imgs, SPEC, batch=8)
    assert runner is not static and runner.dynamic_batch and not static.dynamic_batch
    assert E.batch_runner(static, imgs, SPEC, batch=1) is static
    dynamic = OnnxModel(face_model(dynamic_batch=True), input_name=SPEC.name)
    assert E.batch_runner(dynamic, imgs, SPEC, batch=8) is dynamic


def test_a_batch_one_int8_model_gets_a_faithful_batched_copy(data, tmp_path):
    """QLinear operators hide shapes from ONNX shape inference; the copy still frees the batch, and is checked."""
    from pipeline.data.preprocess import preprocess
    from tests.test_verify import _ort_int8

    b = read_bin(data["bin"])
    int8 = _ort_int8(data["static"], tmp_path / "int8.onnx", preprocess(b.decode_many(np.arange(8)), SPEC))
    static = OnnxModel(int8, input_name=SPEC.name)
    assert static.fixed_batch == 1
    logs = Logs()
    runner = E.batch_runner(static, b.decode_many(np.arange(16)), SPEC, batch=8, progress=logs)
    assert runner is not static and runner.dynamic_batch, logs.lines
    single, _ = E.embed_pairs_with_info(int8, b, input_spec=SPEC, batch=1, pairs=12)
    batched, _ = E.embed_pairs_with_info(int8, b, input_spec=SPEC, batch=8, pairs=12)
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)


class _NoBytes:
    """The same pairs without ``encoded``: every row is embedded."""

    def __init__(self, b) -> None:
        self._b, self.path, self.num_pairs = b, b.path, b.num_pairs

    def decode_many(self, idx):
        return self._b.decode_many(idx)


def test_an_image_repeated_across_pairs_is_embedded_once_and_its_rows_agree(data, tmp_path):
    from pipeline.data.bins import write_bin
    from tests.synthdata import synthetic_pairs

    images, issame = synthetic_pairs(12, size=(32, 32))
    for dup, orig in ((4, 0), (9, 0), (13, 2), (23, 17)):  # as LFW: one photo in several pairs
        images[dup] = images[orig]
    b = read_bin(write_bin(tmp_path / "dups.bin", images, issame))
    distinct, copy_of = E.distinct_images(b, len(images))
    assert len(distinct) == len(images) - 4 and list(distinct[copy_of[[4, 9, 13, 23]]]) == [0, 0, 2, 17]
    passes: list[int] = []
    model = OnnxModel(data["static"], input_name=SPEC.name)
    real_run = model.run

    def counted(x, *a, **kw):
        passes.append(len(x))
        return real_run(x, *a, **kw)

    model.run = counted  # type: ignore[method-assign]
    once, info = E.embed_pairs_with_info(model, b, input_spec=SPEC, batch=1)
    assert sum(passes) == 2 * (len(images) - 4) and info.nonfinite == 0  # each distinct image and its flip
    every, _ = E.embed_pairs_with_info(OnnxModel(data["static"], input_name=SPEC.name), _NoBytes(b), input_spec=SPEC, batch=1)
    np.testing.assert_array_equal(once, every)
    np.testing.assert_array_equal(once[4], once[0])


@pytest.mark.parametrize("make,why", [(_unbatchable, "cannot be made dynamic"), (_batch_mixing, "does not reproduce")])
def test_a_model_without_a_faithful_batched_copy_falls_back_to_single_runs(data, tmp_path, make, why):
    model = make(tmp_path / "m.onnx")
    b = read_bin(data["bin"])
    spec = InputSpec(size=[32, 32], output="emb")
    logs = Logs()
    single, _ = E.embed_pairs_with_info(model, b, input_spec=spec, batch=1, pairs=10)
    got, _ = E.embed_pairs_with_info(model, b, input_spec=spec, batch=8, pairs=10, progress=logs)
    np.testing.assert_array_equal(got, single)
    assert any(why in line and "one image per pass" in line for line in logs.lines), logs.lines


def test_make_batch_dynamic_lives_in_the_graph_helpers_and_convert_still_uses_it(data):
    from pipeline.stages import convert as convert_mod

    m = onnx.load(str(data["static"]))
    notes = make_batch_dynamic(m, INPUT_NAME)
    assert notes and OnnxModel(m, input_name=INPUT_NAME).dynamic_batch
    m2 = onnx.load(str(data["static"]))
    assert convert_mod.make_batch_dynamic(m2, INPUT_NAME) == notes


# --- two speedups ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


LATENCY_MS = {"given": 4.0, "fp32": 2.0, "int8": 1.0}


def _fake_factory(clock):
    class Fake:
        def __init__(self, path, *, threads, input_name=None, output_name=None):
            name = Path(path).stem
            self.ms = next(v for k, v in LATENCY_MS.items() if k in name)
            self.dynamic_batch, self.fixed_batch = False, 1

        def __call__(self, x):
            clock.now += self.ms / 1000.0
            return np.zeros((len(x), 4), np.float32)

    return Fake


def test_benchmark_times_the_baseline_in_the_same_rounds_and_reports_both_speedups(tmp_path):
    clock = FakeClock()
    res = bench.benchmark(
        tmp_path / "fp32.onnx", tmp_path / "int8.onnx", baseline=tmp_path / "given.onnx", threads=1, warmup=1, rounds=4,
        runs_per_round=2, throughput_batch=1, model_factory=_fake_factory(clock), clock=clock,
    )
    assert res.speedup == pytest.approx(4.0) and res.speedup_iqr == pytest.approx((4.0, 4.0))
    assert res.speedup_fastest_fp32 == pytest.approx(2.0) and res.speedup_fastest_fp32_iqr == pytest.approx((2.0, 2.0))
    assert res.baseline is not None and res.baseline.latency_ms_p50 == pytest.approx(4.0)
    assert len(res.baseline.rounds_ms) == len(res.int8.rounds_ms) == 4
    d = res.to_dict()
    assert d["baseline"]["path"].endswith("given.onnx") and d["speedup_fastest_fp32"] == pytest.approx(2.0)
    assert d["isa_class"] and d["cpu_model"]


def test_without_a_separate_baseline_the_two_speedups_are_one_figure(tmp_path):
    clock = FakeClock()
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(b"x")
    res = bench.benchmark(
        fp32, tmp_path / "int8.onnx", baseline=fp32, threads=1, warmup=0, rounds=3, runs_per_round=1, throughput_batch=1,
        model_factory=_fake_factory(clock), clock=clock,
    )
    assert res.baseline is None and res.speedup == res.speedup_fastest_fp32 == pytest.approx(2.0)


@pytest.fixture()
def injected_timing(monkeypatch):
    """verify's timing with fake sessions and clock: as given 4 ms, fp32 2 ms, int8 1 ms."""
    real = bench.benchmark

    def fake(fp32, int8, **kw):
        clock = FakeClock()
        kw.update(model_factory=_fake_factory(clock), clock=clock)
        return real(fp32, int8, **kw)

    monkeypatch.setattr(verify_mod, "benchmark", fake)


def _models(data, tmp_path):
    """fp32 and 'int8' (a copy: accuracy parity by construction) and the model as given."""
    fp32 = shutil.copy(data["static"], tmp_path / "fp32.onnx")
    int8 = shutil.copy(data["static"], tmp_path / "int8.onnx")
    given = shutil.copy(data["static"], tmp_path / "given.onnx")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: t\nmodel:\n  urls: [fp32.onnx]\n  input: {size: [32, 32]}\n"
        "verify: {rounds: 4, warmup: 1, runs_per_round: 1, throughput_batch: 2}\n"
    )
    return recipe, fp32, int8, given


def test_verify_gate_reads_the_speedup_over_the_model_as_given(data, tmp_path, injected_timing):
    recipe, fp32, int8, given = _models(data, tmp_path)
    common = ["verify", "--recipe", str(recipe), "--fp32", str(fp32), "--int8", str(int8), "--data", str(data["bin"]),
              "--cache-dir", str(tmp_path / "cache"), "--min-speedup", "3", "--max-accuracy-drop", "100", "-q"]
    r = CliRunner().invoke(app, [*common, "--baseline", str(given), "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "over the user's model as given: 4.00x" in r.output and "over the fastest fp32: 2.00x" in r.output
    assert "ISA class" in r.output and "CPU:" in r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["speedup"] == pytest.approx(4.0) and rep["speedup_fastest_fp32"] == pytest.approx(2.0)
    assert rep["speedup_iqr"] == pytest.approx([4.0, 4.0]) and rep["speedup_fastest_fp32_iqr"] == pytest.approx([2.0, 2.0])
    assert rep["baseline"]["path"] == str(Path(given).resolve()) and rep["speed_cpu"]["isa_class"]
    assert rep["fp32"]["accuracy"] == rep["int8"]["accuracy"]  # accuracy stays int8 vs --fp32
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "baseline (as given)" in md and "Speedup of int8 over the fastest fp32: **2.00x**" in md and "ISA class" in md
    # Without the baseline the gate reads the speedup over --fp32 (2x) and fails the same 3x threshold.
    r = CliRunner().invoke(app, common)
    assert r.exit_code == 1, r.output
    assert "speedup over fp32 2.00x" in r.output


def test_int8_slower_than_the_fastest_fp32_fails_the_gate_though_faster_than_the_model_as_given(data, tmp_path, injected_timing, monkeypatch):
    monkeypatch.setitem(LATENCY_MS, "int8", 3.0)  # as given 4 ms, fp32 (rewritten) 2 ms: int8 1.33x over given, 0.67x over fp32
    recipe, fp32, int8, given = _models(data, tmp_path)
    common = ["verify", "--recipe", str(recipe), "--fp32", str(fp32), "--int8", str(int8), "--data", str(data["bin"]),
              "--cache-dir", str(tmp_path / "cache"), "--max-accuracy-drop", "100", "--baseline", str(given), "-q"]
    r = CliRunner().invoke(app, [*common, "--report", str(tmp_path / "rep")])
    assert r.exit_code == 1, r.output
    assert "int8 is slower than the fastest fp32 (the --fp32 model): 0.67x" in r.output
    gate = json.loads((tmp_path / "rep" / "report.json").read_text())["gate"]
    checks = {c["over"]: c for c in gate["checks"] if c["check"] == "speedup"}
    assert checks["the user's model"]["passed"] and not checks["the fastest fp32"]["passed"]
    assert checks["the fastest fp32"]["limit"] == 1.0 and checks["the fastest fp32"]["speedup"] == pytest.approx(2 / 3)
    assert "| speedup over the fastest fp32 | 0.67x | >= 1.00x | FAIL |" in (tmp_path / "rep" / "report.md").read_text()
    # Switched off in the recipe (0), or with speed not gated at all, only the speedup over the model as given counts.
    text = recipe.read_text()
    recipe.write_text(text + "gate: {min_speedup_fastest_fp32: 0}\n")
    assert CliRunner().invoke(app, common).exit_code == 0
    recipe.write_text(text + "gate: {min_speedup: 0.5}\n")  # the floor follows the threshold below 1.0
    assert CliRunner().invoke(app, common).exit_code == 0
    recipe.write_text(text + "gate: {min_speedup_fastest_fp32: 0.6}\n")
    assert CliRunner().invoke(app, common).exit_code == 0
    recipe.write_text(text + "gate: {min_speedup_fastest_fp32: 0.7}\n")
    r = CliRunner().invoke(app, common)
    assert r.exit_code == 1 and "below gate.min_speedup_fastest_fp32 0.70x" in r.output
    # A median just under its limit is printed with the decimals that show it is under, never as "0.67x below 0.67x".
    recipe.write_text(text + "gate: {min_speedup_fastest_fp32: 0.667}\n")
    r = CliRunner().invoke(app, [*common, "--report", str(tmp_path / "rep2")])
    assert r.exit_code == 1 and "0.6667x (IQR" in r.output and "below gate.min_speedup_fastest_fp32 0.6670x" in r.output, r.output
    assert "| speedup over the fastest fp32 | 0.6667x | >= 0.6670x | FAIL |" in (tmp_path / "rep2" / "report.md").read_text()
    recipe.write_text(text + "gate: {min_speedup_fastest_fp32: -1}\n")
    r = CliRunner().invoke(app, common)
    assert r.exit_code == 2 and "min_speedup_fastest_fp32" in r.output and "Traceback" not in r.output


# --- qpipe run keeps the model as given when the rewrite changed the graph ---------------------------

RECIPE = """\
name: synth-speedups
model:
  urls: [file://./src/model8.onnx]
  license: Apache-2.0
  description: A tiny synthetic stand-in for a PRelu face-embedding model.
  input: {name: data, size: [32, 32]}
data:
  urls: [file://./src/faces.bin]
calibration: {samples: 16}
verify: {warmup: 1, rounds: 3, runs_per_round: 2, batch: 8, throughput_batch: 4}
gate: {max_accuracy_drop: 100.0, min_speedup: 0.0}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run-speedups")
    face_model(d / "src" / "model8.onnx", opset=8, ir_version=4, dynamic_batch=False)  # PRelu in every block but one
    synthetic_bin(d / "src" / "faces.bin", pairs=20)
    (d / "recipe.yaml").write_text(RECIPE)
    return d


def _build(project: Path, where: str, prelu: str):
    recipe = with_overrides(load_recipe(project / "recipe.yaml"), {"convert.prelu": prelu})
    base = project / where
    return run_mod.run(
        recipe, workdir=base / "artifacts", cache_dir=base / "downloads", embeddings_dir=base / "emb", command="qpipe run"
    )


def test_run_keeps_the_model_as_given_when_the_rewrite_changed_the_graph(project):
    res = _build(project, "rewrite", "rewrite")
    d = res.directory
    given = d / run_mod.FP32_GIVEN_NAME
    assert res.passed and given.is_file()
    assert not any(n.op_type == "PRelu" for n in onnx.load(str(d / run_mod.FP32_NAME)).graph.node)
    assert any(n.op_type == "PRelu" for n in onnx.load(str(given)).graph.node)
    m = read_manifest(d)
    assert m["files"][run_mod.FP32_GIVEN_NAME]["sha256"] == sha256_file(given)
    assert m["stages"]["convert"]["outputs"][run_mod.FP32_GIVEN_NAME] == sha256_file(given)
    speed = m["execution"]["speed"]
    assert speed["over"]["speedup"] == run_mod.FP32_GIVEN_NAME and speed["fp32_given"]["latency_ms_p50"] > 0
    assert speed["speedup_fastest_fp32"] is not None and len(speed["speedup_fastest_fp32_iqr"]) == 2
    rep = json.loads((d / "report.json").read_text())
    assert rep["baseline"]["sha256"] == sha256_file(given)
    assert verify_manifest(d).ok
    card = (d / "MODEL_CARD.md").read_text()
    assert "speedup over the model as given" in card and "speedup over the fastest fp32" in card
    index = build_index([d.parent.parent])
    row = index["builds"][0]
    assert row["speedup"] == pytest.approx(rep["speedup"]) and row["speedup_fastest_fp32"] == pytest.approx(rep["speedup_fastest_fp32"])
    # A second run reuses every stage, the model as given included.
    again = _build(project, "rewrite", "rewrite")
    assert all(st.reused for name, st in again.stages.items() if name != "download")
    assert verify_manifest(again.directory).ok


def test_run_without_the_rewrite_keeps_no_second_fp32(project):
    res = _build(project, "keep", "keep")
    assert res.passed and not (res.directory / run_mod.FP32_GIVEN_NAME).exists()
    m = read_manifest(res.directory)
    assert run_mod.FP32_GIVEN_NAME not in m["files"]
    assert m["execution"]["speed"]["over"]["speedup"] == run_mod.FP32_NAME
    assert verify_manifest(res.directory).ok


def test_a_changed_prelu_setting_changes_the_convert_stage_key(project):
    a = load_recipe(project / "recipe.yaml")
    keys = set()
    for prelu in ("keep", "rewrite"):
        c = with_overrides(a, {"convert.prelu": prelu}).convert
        keys.add(run_mod._stage_key("convert", settings=run_mod._settings(c)))
    assert len(keys) == 2
