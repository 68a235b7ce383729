"""`qpipe verify`: gate pass/fail, subset mode, fp32 cache, several data sets, reports, exit codes,
and the int8 figure against an independent evaluation (no pipeline code) on synthetic and real faces."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from pipeline.eval.embeddings import cache_key, embed_pairs_with_info
from pipeline.runtime.session import OnnxModel
from pipeline.stages.report import write_reports
from pipeline.cli.app import app
from pipeline.core.errors import UserError
from pipeline.recipe import GateSection, InputSpec, VerifySection
from pipeline.stages.verify import verify
from tests.synthdata import face_model, synthetic_bin

SPEC = InputSpec(size=[32, 32])
FAST = dict(rounds=3, warmup=1, runs_per_round=2, throughput_batch=4, batch=8)
EASY_GATE = GateSection(max_accuracy_drop=100.0, min_speedup=0.0)


# --- fixtures -----------------------------------------------------------------


def _ort_int8(fp32: Path, out: Path, images: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"data": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    # BatchNormalization folded into Conv first, and u8 activations with s8 weights: onnxruntime's
    # fast x64 pairing (s8/s8 QOperator ran ~7x slower than fp32 here).
    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8
    )
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    fp32, other = d / "fp32.onnx", d / "other.onnx"
    face_model(fp32, seed=0)
    face_model(other, seed=1)
    lfw = synthetic_bin(d / "lfw.bin", pairs=60, seed=0)
    cfp = synthetic_bin(d / "cfp_fp.bin", pairs=40, seed=5)
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    calib = preprocess(read_bin(cfp).decode_many(np.arange(16)), SPEC)
    int8 = _ort_int8(fp32, d / "int8.onnx", calib)
    return {"dir": d, "fp32": fp32, "int8": int8, "other": other, "lfw": lfw, "cfp": cfp}


def _run(synth, tmp_path, *, int8=None, data=None, gate=EASY_GATE, cache=True, report=False, **verify_kw):
    res = verify(
        synth["fp32"],
        int8 or synth["int8"],
        data or [synth["lfw"]],
        input_spec=SPEC,
        verify=VerifySection(**{**FAST, **verify_kw}),
        gate=gate,
        cache_dir=tmp_path / "cache" if cache else None,
    )
    if report:
        write_reports(res, tmp_path / "rep")
    return res


# --- an independent evaluation: cv2 + onnxruntime + insightface's calculate_roc -------------


def independent_accuracy(model: Path, bin_path: Path, pairs: int | None = None) -> tuple[float, float]:
    """insightface verification written out from scratch: no pipeline code. Percent, mean and std."""
    import cv2
    import onnxruntime as ort

    with open(bin_path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")  # trusted test data
    n = len(issame_list) if pairs is None else pairs
    issame = np.asarray(issame_list[:n], dtype=bool)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    step = 32 if not isinstance(inp.shape[0], int) else inp.shape[0]
    rgb = [cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1] for i in range(2 * n)]  # BGR -> RGB
    views = []
    for flip in (0, 1):
        x = np.stack([img[:, ::-1, :] if flip else img for img in rgb]).transpose(0, 3, 1, 2).astype(np.float32)
        out = [sess.run(None, {inp.name: np.ascontiguousarray(x[i : i + step])})[0] for i in range(0, len(x), step)]
        views.append(np.concatenate(out).astype(np.float64))
    emb = views[0] + views[1]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    thresholds = np.arange(0, 4, 0.01)
    sizes = np.full(10, n // 10)
    sizes[: n % 10] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    acc = np.zeros(10)

    def accuracy(t, d, same):
        pred = np.less(d, t)
        return float(np.sum(pred & same) + np.sum(~pred & ~same)) / d.size

    for k in range(10):
        test = np.arange(bounds[k], bounds[k + 1])
        train = np.setdiff1d(np.arange(n), test)
        best = int(np.argmax([accuracy(t, dist[train], issame[train]) for t in thresholds]))
        acc[k] = accuracy(thresholds[best], dist[test], issame[test])
    return float(np.mean(acc) * 100), float(np.std(acc) * 100)


# --- gate ---------------------------------------------------------------------------


def test_gate_passes_when_int8_is_within_the_allowed_drop_and_fast_enough(synth, tmp_path):
    res = _run(synth, tmp_path)
    assert res.passed and res.gate["reasons"] == []
    d = res.datasets[0]
    assert d.name == "lfw" and d.pairs == 60 and not d.subset
    assert res.accuracy_drop == pytest.approx(d.fp32.metrics.accuracy - d.int8.metrics.accuracy)
    assert 50 < d.fp32.metrics.accuracy <= 100  # synthetic same pairs really are more alike


def test_impossible_accuracy_threshold_fails_and_says_by_how_much(synth, tmp_path):
    # int8 == fp32 file, so the drop is exactly 0; the gate demands int8 be 1 point *better*.
    int8 = tmp_path / "same.onnx"
    shutil.copy(synth["fp32"], int8)
    res = _run(synth, tmp_path, int8=int8, gate=GateSection(max_accuracy_drop=-1.0, min_speedup=0.0))
    assert not res.passed
    assert res.accuracy_drop == 0.0
    (reason,) = res.gate["reasons"]
    assert reason.startswith("lfw: int8 accuracy") and "a drop of 0.00 points" in reason and "over by 1.00 points" in reason


def test_impossible_speedup_fails_and_says_by_how_much(synth, tmp_path):
    res = _run(synth, tmp_path, gate=GateSection(max_accuracy_drop=100.0, min_speedup=1e6))
    assert not res.passed
    (reason,) = res.gate["reasons"]
    assert "below the required 1000000.00x" in reason and "short by" in reason
    check = next(c for c in res.gate["checks"] if c["check"] == "speedup")
    assert check["speedup"] == res.speed.speedup and not check["passed"]


def test_non_finite_embeddings_fail_the_gate(synth, tmp_path):
    # sqrt(mean(pixel) - 1000) is NaN for every image.
    g = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["data"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("Sub", ["m", "k"], ["s"]),
            helper.make_node("Sqrt", ["s"], ["fc1"]),
        ],
        "nan",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 3])],
        initializer=[onnx.numpy_helper.from_array(np.array(1000.0, np.float32), "k")],
    )
    nan_model = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), nan_model)
    res = _run(synth, tmp_path, int8=nan_model)
    assert not res.passed
    assert any("non-finite" in r and "int8" in r for r in res.gate["reasons"])


# --- protocol against an independent evaluation ------------------------------------


def test_int8_accuracy_equals_an_independent_evaluation_of_the_same_file(synth, tmp_path):
    res = _run(synth, tmp_path, cache=False)
    d = res.datasets[0]
    acc, std = independent_accuracy(synth["int8"], synth["lfw"])
    assert d.int8.metrics.accuracy == pytest.approx(acc, abs=0.01)
    assert d.int8.metrics.accuracy_std == pytest.approx(std, abs=0.01)
    acc, std = independent_accuracy(synth["fp32"], synth["lfw"])
    assert d.fp32.metrics.accuracy == pytest.approx(acc, abs=0.01)


def test_embeddings_do_not_depend_on_batching_or_a_fixed_batch(synth, tmp_path):
    from pipeline.data.bins import read_bin

    b = read_bin(synth["lfw"])
    fixed = tmp_path / "fixed.onnx"
    face_model(fixed, seed=0, dynamic_batch=False)
    e1, _ = embed_pairs_with_info(synth["fp32"], b, input_spec=SPEC, batch=7, pairs=10)
    e2, _ = embed_pairs_with_info(fixed, b, input_spec=SPEC, batch=7, pairs=10)
    assert e1.shape == (20, 16)
    np.testing.assert_allclose(e1, e2, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0)


# --- subset, cache, several sets ----------------------------------------------------


def test_subset_gate_uses_the_first_n_pairs_and_says_it_is_a_subset(synth, tmp_path):
    res = _run(synth, tmp_path, pairs=20, report=True)
    d = res.datasets[0]
    assert d.subset and d.pairs == 20 and d.total_pairs == 60
    assert d.fp32.metrics.pairs == 20 and len(d.fp32.metrics.fold_accuracies) == 10
    assert res.subset
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["subset"] is True and report["data"]["lfw"]["subset"] is True and report["data"]["lfw"]["pairs"] == 20
    assert "SUBSET" in (tmp_path / "rep" / "report.md").read_text()
    # pairs beyond the set's size is simply the whole set, not a subset
    res = _run(synth, tmp_path, pairs=10_000)
    assert not res.datasets[0].subset and res.datasets[0].pairs == 60


class _CallCounter:
    """Counts forward passes per model file through OnnxModel."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        original = OnnxModel.__call__
        counter = self

        def counted(model_self, x, extra=None):
            counter.calls[model_self.path.name] = counter.calls.get(model_self.path.name, 0) + len(x)
            return original(model_self, x, extra)

        monkeypatch.setattr(OnnxModel, "__call__", counted)


def test_second_verify_reads_fp32_embeddings_from_the_cache_and_only_runs_int8(synth, tmp_path, monkeypatch):
    counter = _CallCounter(monkeypatch)
    first = _run(synth, tmp_path, rounds=1, warmup=0, runs_per_round=1)
    assert counter.calls["fp32.onnx"] > 0 and not first.datasets[0].fp32.cached
    assert len(list((tmp_path / "cache").glob("emb-*.npz"))) == 1

    counter.calls.clear()
    # Another int8 candidate; the benchmark is what still times fp32, so count embedding passes
    # by replacing the benchmark with a stand-in.
    monkeypatch.setattr("pipeline.stages.verify.benchmark", lambda *a, **k: first.speed)
    second = _run(synth, tmp_path, int8=synth["other"])
    assert "fp32.onnx" not in counter.calls  # the fp32 model never ran
    assert counter.calls["other.onnx"] == 60 * 2 * 2  # 120 images, each with its flip
    assert second.datasets[0].fp32.cached and not second.datasets[0].int8.cached
    assert second.datasets[0].fp32.metrics.accuracy == first.datasets[0].fp32.metrics.accuracy


def test_cache_is_keyed_by_model_data_preprocessing_flip_and_pairs():
    base = dict(model_sha256="a" * 64, data_sha256="b" * 64, input_spec=SPEC, flip=True, pairs=100)
    k = cache_key(**base)
    assert k == cache_key(**base)
    for change in (
        {"model_sha256": "c" * 64},
        {"data_sha256": "c" * 64},
        {"input_spec": InputSpec(size=[32, 32], channels="BGR")},
        {"flip": False},
        {"pairs": 99},
    ):
        assert cache_key(**{**base, **change}) != k, change


def test_a_corrupt_cache_file_is_recomputed_not_fatal(synth, tmp_path):
    from pipeline.data.bins import read_bin

    b = read_bin(synth["lfw"])
    e1, info1 = embed_pairs_with_info(synth["fp32"], b, input_spec=SPEC, pairs=10, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("emb-*.npz")
    cache_file.write_bytes(b"garbage")
    e2, info2 = embed_pairs_with_info(synth["fp32"], b, input_spec=SPEC, pairs=10, cache_dir=tmp_path)
    assert not info1.cached and not info2.cached
    np.testing.assert_array_equal(e1, e2)
    e3, info3 = embed_pairs_with_info(synth["fp32"], b, input_spec=SPEC, pairs=10, cache_dir=tmp_path)
    assert info3.cached
    np.testing.assert_array_equal(e1, e3)
    assert not list(tmp_path.glob("*.part"))


def test_each_data_set_is_reported_and_gated(synth, tmp_path):
    same = tmp_path / "same.onnx"  # drop exactly 0 on both sets: the impossible gate fails each
    shutil.copy(synth["fp32"], same)
    res = _run(
        synth, tmp_path, int8=same, data=[synth["lfw"], synth["cfp"]], gate=GateSection(max_accuracy_drop=-1.0, min_speedup=0.0), report=True
    )
    assert [d.name for d in res.datasets] == ["lfw", "cfp_fp"]
    assert [d.pairs for d in res.datasets] == [60, 40]
    assert [c["data_set"] for c in res.gate["checks"] if c["check"] == "accuracy"] == ["lfw", "cfp_fp"]
    assert len(res.gate["reasons"]) == 2 and res.gate["reasons"][1].startswith("cfp_fp:")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["data"]) == {"lfw", "cfp_fp"}
    assert report["fp32"]["data_set"] == "lfw"  # top level refers to the first set
    assert report["data"]["cfp_fp"]["int8"]["accuracy"] == pytest.approx(res.datasets[1].int8.metrics.accuracy)


def test_two_data_sets_with_the_same_name_are_a_user_error(synth, tmp_path):
    other = tmp_path / "x" / "lfw.bin"
    other.parent.mkdir()
    shutil.copy(synth["lfw"], other)
    with pytest.raises(UserError, match="share the name 'lfw'"):
        _run(synth, tmp_path, data=[synth["lfw"], other])


# --- reports ------------------------------------------------------------------------


def test_reports_are_written_and_parseable(synth, tmp_path):
    res = _run(synth, tmp_path, report=True)
    rep = tmp_path / "rep"
    assert res.report_dir == rep
    report = json.loads((rep / "report.json").read_text())
    assert report["accuracy_unit"] == "percent"
    for side in ("fp32", "int8"):
        for key in ("accuracy", "accuracy_std", "latency_ms_p50", "latency_ms_p90", "threshold_mean", "tar_at_far", "roc_auc", "sha256"):
            assert key in report[side], (side, key)
    assert report["fp32"]["accuracy"] == pytest.approx(res.datasets[0].fp32.metrics.accuracy)
    assert report["accuracy_drop"] == pytest.approx(res.accuracy_drop)
    assert report["speedup"] == pytest.approx(res.speed.speedup) and len(report["speedup_iqr"]) == 2
    assert report["gate"]["passed"] is True and report["gate"]["reasons"] == []
    assert set(report["data"]) == {"lfw"}
    assert report["environment"]["cpu"]["model"] and report["environment"]["threads"] >= 1
    assert len(report["speed"]["fp32"]["rounds_ms"]) == 3
    md = (rep / "report.md").read_text()
    assert "| accuracy (%) |" in md and "Verdict: PASSED" in md and "Speedup" in md
    if not res.speed.vnni:
        assert "no VNNI" in md
    png = (rep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in rep.iterdir()) == ["report.json", "report.md", "report.png"]


# --- CLI ----------------------------------------------------------------------------


def _recipe(tmp_path: Path, **gate) -> Path:
    p = tmp_path / "recipe.yaml"
    g = {"max_accuracy_drop": 100.0, "min_speedup": 0.0, **gate}
    p.write_text(
        "name: t\nmodel:\n  urls: [fp32.onnx]\n  input: {size: [32, 32]}\n"
        "verify: {rounds: 2, warmup: 1, runs_per_round: 1, throughput_batch: 2}\n"
        f"gate: {{max_accuracy_drop: {g['max_accuracy_drop']}, min_speedup: {g['min_speedup']}}}\n"
    )
    return p


def _cli(synth, tmp_path, *extra, recipe=None):
    args = ["verify", "--recipe", str(recipe or _recipe(tmp_path)), "--fp32", str(synth["fp32"]), "--int8", str(synth["int8"]),
            "--cache-dir", str(tmp_path / "cache"), "-q", *extra]
    return CliRunner().invoke(app, args)


def test_cli_exit_0_when_the_gate_passes(synth, tmp_path):
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--report", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    assert "lfw: fp32" in r.output and "PASSED" in r.output
    assert (tmp_path / "rep" / "report.json").is_file()


def test_cli_exit_1_on_an_impossible_gate_with_the_reason(synth, tmp_path):
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--min-speedup", "1000000")
    assert r.exit_code == 1, r.output
    assert "gate failed: speedup" in r.output and "short by" in r.output
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--max-accuracy-drop", "-5")
    assert r.exit_code == 1 and "gate failed: lfw: int8 accuracy" in r.output and "more than the allowed -5.00 (over by" in r.output


def test_cli_subset_says_subset(synth, tmp_path):
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--pairs", "20")
    assert r.exit_code == 0, r.output
    assert "SUBSET: first 20 of 60 pairs" in r.output


def test_cli_json_output_is_the_report(synth, tmp_path):
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--data", str(synth["cfp"]), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["accuracy_unit"] == "percent" and set(out["data"]) == {"lfw", "cfp_fp"}


def test_cli_takes_the_recipe_data_set_when_no_data_is_given(synth, tmp_path):
    shutil.copy(synth["lfw"], tmp_path / "faces.bin")
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "data:\n  urls: [faces.bin]\n")  # relative to the recipe's folder
    r = _cli(synth, tmp_path, recipe=recipe)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("faces: fp32")


def test_cli_exit_2_on_input_errors(synth, tmp_path):
    r = _cli(synth, tmp_path)  # no --data and the recipe names no data
    assert r.exit_code == 2 and "--data" in r.output
    r = _cli(synth, tmp_path, "--data", str(tmp_path / "missing.bin"))
    assert r.exit_code == 2 and "missing.bin" in r.output
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a pickle at all")
    r = _cli(synth, tmp_path, "--data", str(junk))
    assert r.exit_code == 2 and "junk.bin" in r.output
    r = CliRunner().invoke(app, ["verify", "--fp32", str(synth["fp32"]), "--int8", str(tmp_path / "nope.onnx"), "--data", str(synth["lfw"])])
    assert r.exit_code == 2 and "nope.onnx" in r.output
    # the default input size (112) does not fit the 32x32 model: named, not a traceback
    r = CliRunner().invoke(app, ["verify", "--fp32", str(synth["fp32"]), "--int8", str(synth["int8"]), "--data", str(synth["lfw"]), "-q"])
    assert r.exit_code == 2 and "model.input.size" in r.output
    r = _cli(synth, tmp_path, "--data", str(synth["lfw"]), "--pairs", "5")
    assert r.exit_code == 2 and "fold" in r.output


# --- real faces (../shared) --------------------------------------------------------
#
# The converted MobileFaceNet (tests/conftest.py: pipeline.stages.convert, opset 11, dynamic batch).
# The whole-set check verifies it against the int8 the quantize stage makes with the shipped recipe
# (one verify run shared with test_quantize.py); the first-fold check against an int8 made here with
# onnxruntime's quantize_static (independent of pipeline.stages.quantize.stage). fp32 embeddings are
# cached in pytest's cache directory, keyed by model and data hash like any verify cache.

REAL_SPEC = InputSpec()


@pytest.fixture(scope="session")
def real(real_converted, shared_lfw, real_embedding_cache, tmp_path_factory):
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("real")
    b = read_bin(shared_lfw)
    calib = preprocess(b.decode_many(np.arange(0, 12000, 375)), REAL_SPEC)  # 32 faces from every fold
    int8 = _ort_int8(real_converted.output, d / "mobilefacenet-int8.onnx", calib)
    return {"fp32": real_converted.output, "int8": int8, "lfw": shared_lfw, "cache": real_embedding_cache}


@pytest.mark.slow
def test_real_lfw_full_6000_pairs_reproduces_fp32_99_55(real_lfw_verify):
    # 24,000 forward passes per model (image + flip for 12,000 faces); fp32 is cached after the first run.
    r = real_lfw_verify["cli"]
    assert r.exit_code == 0, r.output
    report = json.loads((real_lfw_verify["report"] / "report.json").read_text())
    lfw = report["data"]["lfw"]
    assert lfw["pairs"] == 6000 and not lfw["subset"]
    assert round(report["fp32"]["accuracy"], 2) == 99.55
    assert round(report["fp32"]["accuracy_std"], 2) == 0.26
    assert report["int8"]["accuracy"] > 99.0


def _seed_first_pairs(cache: Path, fp32: Path, lfw: Path, pairs: int, into: Path) -> bool:
    """Cache the fp32 embeddings of the first ``pairs`` pairs in ``into``, cut from a cached whole-set run in ``cache``.

    verify caches per pair count; the whole set's first rows are embeddings of the same images, so
    once the whole set ran they need not be embedded again. False: nothing cached to cut from (the
    whole-set check deselected and no earlier run).
    """
    from pipeline.core.files import sha256_file
    from pipeline.data.bins import read_bin
    from pipeline.eval.embeddings import cache_file, cache_key

    b = read_bin(lfw)
    kw = dict(model_sha256=sha256_file(fp32), data_sha256=b.sha256(), input_spec=REAL_SPEC, flip=True)
    whole = cache_file(cache, cache_key(**kw, pairs=b.num_pairs))
    if not whole.is_file():
        return False
    with np.load(whole, allow_pickle=False) as z:
        emb = np.array(z["embeddings"][: 2 * pairs])
    key = cache_key(**kw, pairs=pairs)
    into.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file(into, key), key=np.array(key), embeddings=emb)
    return True


# After the whole-set check in this file, whose cached fp32 embeddings it starts from.
def test_real_lfw_first_fold_int8_equals_an_independent_evaluation(real, tmp_path):
    # Pairs 0-599 are LFW's first fold: 300 same and 300 different pairs.
    cache = tmp_path / "cache"
    seeded = _seed_first_pairs(real["cache"], real["fp32"], real["lfw"], 600, cache)
    res = verify(
        real["fp32"], real["int8"], [real["lfw"]], input_spec=REAL_SPEC,
        verify=VerifySection(pairs=600, rounds=4, warmup=2, runs_per_round=2, throughput_batch=8, batch=32),
        gate=EASY_GATE, cache_dir=cache if seeded else real["cache"],
    )
    write_reports(res, tmp_path / "rep")
    d = res.datasets[0]
    if seeded:
        assert d.fp32.cached  # the cut rows read as verify's own cache: no fp32 forward pass here
    assert d.subset and d.pairs == 600
    assert d.fp32.metrics.accuracy > 98.0 and d.fp32.metrics.roc_auc > 0.99
    acc, std = independent_accuracy(real["int8"], real["lfw"], pairs=600)
    assert d.int8.metrics.accuracy == pytest.approx(acc, abs=0.01)
    assert d.int8.metrics.accuracy_std == pytest.approx(std, abs=0.01)
    assert (tmp_path / "rep" / "report.png").is_file()
