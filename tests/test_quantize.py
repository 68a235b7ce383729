"""`qpipe quantize`: both engines on a synthetic model, determinism, manifest, errors, CLI, real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.data.bins import read_bin
from pipeline.data.calibration import calibration_indices, indices_sha256
from pipeline.data.preprocess import preprocess
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.opcounts import count_ops
from pipeline.stages.quantize.stage import MANIFEST_SCHEMA, quantize
from pipeline.stages.quantize.tuning import pair_accuracy
from pipeline.recipe import Recipe, default_recipe, with_overrides
from tests.synthdata import face_model, malicious_pickle, synthetic_bin

ROOT = Path(__file__).resolve().parents[1]
SIZE = [32, 32]


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quantize-material")
    model = d / "fp32.onnx"
    face_model(model, size=tuple(SIZE))
    return {"dir": d, "model": model, "bin": synthetic_bin(d / "synth.bin", pairs=20, size=tuple(SIZE))}


def _recipe(**overrides: object) -> Recipe:
    # The engines on the graph as given: PRelu's rewrite before quantizing is tested in test_prelu.py.
    base = {"model.input.size": SIZE, "calibration.samples": 8, "quantization.prelu": "keep"}
    base.update(overrides)
    return with_overrides(default_recipe(), base)


def _run(material: dict[str, Path], out: Path, recipe: Recipe | None = None, source_model: Path | None = None):
    r = recipe or _recipe()
    return quantize(Int8Job.from_recipe(r, model=material["model"], calib=material["bin"], out=out, source_model=source_model))


def _embed(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]


# --- both engines ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["inc", "ort"])
@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
def test_both_engines_quantize_the_synthetic_model_and_keep_its_function(
    material: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, fmt: str
) -> None:
    monkeypatch.chdir(tmp_path)  # INC writes nc_workspace into the CWD unless told otherwise
    out = tmp_path / "out" / "int8.onnx"
    # Per-channel QDQ needs opset 13; the synthetic model is opset 11 like the converted models.
    res = _run(material, out, _recipe(**{"quantization.engine": engine, "quantization.format": fmt, "quantization.per_channel": fmt == "QOperator"}))
    assert res.output == out and out.is_file()
    assert res.engine == engine and res.format == fmt
    assert res.op_counts["int8"].get("Conv") == 4
    assert res.op_counts["quant_dequant"]["QuantizeLinear"] >= 1
    q = onnx.load(str(out))
    assert any(n.op_type in ("QLinearConv", "DequantizeLinear") for n in q.graph.node)
    # Scratch files stay out of the current and the output directory; the manifest is the build layer's to write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.onnx"]
    # The int8 model computes nearly what the fp32 model computes.
    vb = read_bin(material["bin"])
    x = preprocess(vb.decode_many(range(8)), _recipe().model.input)
    a, b = _embed(material["model"], x), _embed(out, x)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98, cos


def test_op_counts_split_int8_from_fp32(material: dict[str, Path], tmp_path: Path) -> None:
    fp32 = count_ops(onnx.load(str(material["model"])))
    assert fp32["int8"] == {} and fp32["fp32"]["Conv"] == 4 and fp32["quant_dequant"] == {}
    res = _run(material, tmp_path / "int8.onnx", _recipe(**{"quantization.engine": "ort"}))
    assert "PRelu" in res.op_counts["fp32"]  # onnxruntime has no int8 PRelu
    assert res.op_counts == count_ops(onnx.load(str(res.output)))


@pytest.mark.parametrize("engine", ["inc", "ort"])
def test_excluded_nodes_and_op_types_stay_fp32(material: dict[str, Path], tmp_path: Path, engine: str) -> None:
    r = _recipe(**{"quantization.engine": engine, "quantization.nodes_to_exclude": ["conv3"], "quantization.op_types_to_exclude": ["Add"]})
    res = _run(material, tmp_path / "int8.onnx", r)
    q = onnx.load(str(res.output))
    conv3 = [n for n in q.graph.node if n.name.startswith("conv3")]
    assert conv3 and all(n.op_type == "Conv" for n in conv3)
    assert res.op_counts["int8"]["Conv"] == 3 and res.op_counts["fp32"]["Conv"] == 1
    assert "Add" not in res.op_counts["int8"]


# --- reproducibility ------------------------------------------------------------------


_SUBPROCESS = """
import sys
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.stage import quantize
from pipeline.recipe import default_recipe, with_overrides
r = with_overrides(default_recipe(), {"model.input.size": [32, 32], "calibration.samples": 8, "quantization.engine": sys.argv[4]})
res = quantize(Int8Job.from_recipe(r, model=sys.argv[1], calib=sys.argv[2], out=sys.argv[3]))
print(res.int8_sha256)
"""


@pytest.mark.parametrize("engine", ["inc", "ort"])
def test_same_inputs_and_recipe_give_the_same_int8_bytes(material: dict[str, Path], tmp_path: Path, engine: str) -> None:
    # The default recipe, PRelu rewrite included, as the subprocess below runs it.
    r = _recipe(**{"quantization.engine": engine, "quantization.prelu": "rewrite"})
    a = _run(material, tmp_path / "a" / "int8.onnx", r)
    b = _run(material, tmp_path / "b" / "int8.onnx", r)
    assert a.int8_sha256 == b.int8_sha256 == sha256_file(a.output) == sha256_file(b.output)
    # Another process with another hash seed (set iteration order) must agree too.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(material["model"]), str(material["bin"]), str(tmp_path / "c" / "int8.onnx"), engine],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == a.int8_sha256
    c = _run(material, tmp_path / "d" / "int8.onnx", _recipe(**{"quantization.engine": engine, "quantization.prelu": "rewrite", "calibration.seed": 1}))
    assert c.calibration["indices_sha256"] != a.calibration["indices_sha256"]


# --- manifest body ------------------------------------------------------------------------

MANIFEST_KEYS = {
    "schema", "stage", "engine", "format", "weights", "files", "calibration", "recipe", "recipe_sha256",
    "op_counts", "prelu", "batchnorm", "tuning", "warnings", "environment", "timing", "created",
}


def test_manifest_body_hashes_are_true_and_record_recipe_versions_and_cpu(material: dict[str, Path], tmp_path: Path) -> None:
    r = _recipe(**{"quantization.engine": "ort"})
    res = _run(material, tmp_path / "art" / "int8.onnx", r, source_model=material["model"])
    m = res.manifest_body()
    assert set(m) == MANIFEST_KEYS and m["schema"] == MANIFEST_SCHEMA and m["stage"] == "quantize"
    # The stage writes the model only; the manifest is written once, by the build layer.
    assert res.manifest is None and sorted(p.name for p in (tmp_path / "art").iterdir()) == ["int8.onnx"]
    files = m["files"]
    assert files["int8"]["sha256"] == sha256_file(res.output) == res.int8_sha256
    assert files["converted"]["sha256"] == sha256_file(material["model"])
    assert files["source"]["sha256"] == sha256_file(material["model"])
    assert files["calibration"]["sha256"] == sha256_file(material["bin"])
    assert m["recipe"] == r.resolved() and m["recipe_sha256"] == r.sha256()
    idx = calibration_indices(40, 8, seed=0)
    assert m["calibration"]["indices"] == idx.tolist()
    assert m["calibration"]["indices_sha256"] == indices_sha256(idx) == res.calibration["indices_sha256"]
    assert m["calibration"]["samples"] == 8 and m["calibration"]["seed"] == 0
    env = m["environment"]
    for k in ("python", "onnx", "onnxruntime", "neural-compressor", "numpy"):
        assert env["versions"][k], k
    assert {"avx512_vnni", "amx_tile", "avx2"} <= set(env["cpu"]["flags"])
    assert env["cpu"]["model"] and env["cpu"]["physical_cores"] >= 1
    assert m["timing"]["quantize"]["seconds"] > 0 and m["timing"]["quantize"]["peak_rss_mb"] > 0
    assert m["op_counts"] == res.op_counts and m["weights"] == res.weights and m["warnings"] == res.warnings
    assert m["files"]["int8"]["path"] == str(res.output)
    assert json.loads(json.dumps(m)) == m
    m["warnings"].append("added by a writer")
    assert res.manifest_body()["warnings"] == res.warnings  # a copy each time
    d = json.loads(json.dumps(res.to_dict()))
    assert d["output"] == str(res.output) and "record" not in d


def test_quantize_leaves_accuracy_recovery_to_the_build_layer(material: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(material, tmp_path / "plain" / "int8.onnx", _recipe(**{"quantization.engine": "ort"}))
    asked = _run(material, tmp_path / "asked" / "int8.onnx", _recipe(**{"quantization.engine": "ort", "quantization.recovery.enabled": True}))
    assert asked.recovery is None and asked.int8_sha256 == plain.int8_sha256
    assert sorted(p.name for p in (tmp_path / "asked").iterdir()) == ["int8.onnx"]


# --- errors -------------------------------------------------------------------------------


def test_malicious_calibration_file_is_refused_before_anything_runs(material: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(malicious_pickle(target))
    out = tmp_path / "o" / "int8.onnx"
    with pytest.raises(UserError, match="refused to load"):
        quantize(Int8Job.from_recipe(_recipe(), model=material["model"], calib=evil, out=out))
    assert not target.exists() and not out.exists() and not (out.parent / "manifest.json").exists()


def test_truncated_and_non_pickle_calibration_files_are_user_errors(material: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.bin"
    cut.write_bytes(material["bin"].read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        _run({**material, "bin": cut}, tmp_path / "int8.onnx")
    with pytest.raises(UserError, match="not a pickle"):
        _run({**material, "bin": material["model"]}, tmp_path / "int8.onnx")
    assert not (tmp_path / "int8.onnx").exists()


def test_model_and_recipe_image_sizes_must_agree(material: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input 'data' is 32x32 but the recipe's model.input.size is 112x112"):
        _run(material, tmp_path / "int8.onnx", _recipe(**{"model.input.size": [112, 112]}))


def test_calibration_images_of_another_size_are_resized_with_a_warning(material: dict[str, Path], tmp_path: Path) -> None:
    big = synthetic_bin(tmp_path / "big.bin", pairs=6, size=(48, 48))
    res = _run({**material, "bin": big}, tmp_path / "int8.onnx", _recipe(**{"quantization.engine": "ort"}))
    assert any("48x48, resized to 32x32" in w for w in res.warnings)


def test_unconverted_models_are_refused_with_a_hint_to_convert(material: dict[str, Path], tmp_path: Path) -> None:
    old = face_model(None, size=tuple(SIZE), opset=9)
    old_path = tmp_path / "opset9.onnx"
    onnx.save(old, str(old_path))
    with pytest.raises(UserError, match="opset 9 is too old.*qpipe convert"):
        _run({**material, "model": old_path}, tmp_path / "int8.onnx")
    m = onnx.load(str(material["model"]))
    m.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in m.graph.initializer)
    legacy = tmp_path / "legacy.onnx"
    onnx.save(m, str(legacy))
    with pytest.raises(UserError, match="initializers are also listed as graph inputs.*qpipe convert"):
        _run({**material, "model": legacy}, tmp_path / "int8.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(UserError, match="not an ONNX model"):
        _run({**material, "model": junk}, tmp_path / "int8.onnx")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"quantization.inc_recipes": {"no_such_recipe": True}}, "quantization.inc_recipes: unknown key.*no_such_recipe"),
        ({"quantization.inc_recipes": {"graph_optimization_level": "FASTEST"}}, "rejected by Intel Neural Compressor.*FASTEST"),
        ({"quantization.nodes_to_exclude": ["conv99"]}, "nodes_to_exclude names nodes not in .*conv99"),
        ({"calibration.samples": 500}, "calibration.samples is 500 but the calibration set holds only 40 images"),
        ({"model.input.name": "pixels"}, "no input named 'pixels'"),
        (
            {"quantization.engine": "ort", "quantization.format": "QDQ", "quantization.per_channel": True},
            "per_channel with format QDQ needs opset 13",
        ),
    ],
)
def test_recipe_errors_reach_quantize_as_user_errors(material: dict[str, Path], tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _run(material, tmp_path / "int8.onnx", _recipe(**overrides))
    assert not (tmp_path / "int8.onnx").exists()


def test_a_failing_engine_leaves_no_output_and_no_scratch(material: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.quantize import stage as qmod
    from pipeline.stages.quantize.engine import Engine

    def boom(*args: object, **kwargs: object):
        (kwargs["work"] / "partial.onnx").write_bytes(b"half")
        raise UserError("engine exploded")

    monkeypatch.setitem(qmod.ENGINES, "ort", Engine(quantize=boom))
    out = tmp_path / "o" / "int8.onnx"
    with pytest.raises(UserError, match="engine exploded"):
        _run(material, out, _recipe(**{"quantization.engine": "ort"}))
    assert list(out.parent.iterdir()) == []


# --- accuracy-aware tuning -------------------------------------------------------------------


def test_inc_accuracy_aware_tuning_evaluates_on_the_recipe_pairs(material: dict[str, Path], tmp_path: Path) -> None:
    r = _recipe(**{"quantization.tuning.enabled": True, "quantization.tuning.eval_pairs": 20, "quantization.tuning.max_trials": 2})
    res = _run(material, tmp_path / "int8.onnx", r)
    assert res.tuning is not None and res.tuning["trials"], res.tuning
    assert all(t["pairs"] == 20 and 0 <= t["accuracy"] <= 100 for t in res.tuning["trials"])
    assert res.manifest_body()["tuning"]["eval_pairs"] == 20


def test_pair_accuracy_runs_the_protocol_on_a_subset(material: dict[str, Path]) -> None:
    vb = read_bin(material["bin"])
    res = pair_accuracy(material["model"], vb, _recipe().model.input, pairs=20)
    assert res.pairs == 20 and 50.0 <= res.accuracy <= 100.0


# --- CLI ------------------------------------------------------------------------------------


def _recipe_file(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        "name: synth\nmodel:\n  urls: [model.onnx]\n  input: {size: [32, 32]}\n"
        "calibration: {samples: 8, seed: 0}\n" + (extra or "quantization: {prelu: keep}\n")
    )
    return p


def test_cli_quantize_writes_the_model_and_prints_op_counts(material: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli" / "int8.onnx"
    res = CliRunner().invoke(
        app,
        ["quantize", "--recipe", str(_recipe_file(tmp_path)), "--model", str(material["model"]), "--calib", str(material["bin"]),
         "--out", str(out), "--engine", "ort", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert out.is_file() and (out.parent / "manifest.json").is_file()
    assert "int8: " in res.output and "Conv 4" in res.output
    assert json.loads((out.parent / "manifest.json").read_text())["engine"] == "ort"


def test_cli_malicious_bin_exits_2_with_one_line_and_runs_nothing(material: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(malicious_pickle(target))
    out = tmp_path / "o" / "int8.onnx"
    res = CliRunner().invoke(
        app, ["quantize", "--recipe", str(_recipe_file(tmp_path)), "--model", str(material["model"]), "--calib", str(evil), "--out", str(out), "-q"]
    )
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qpipe: error:") and "refused to load" in lines[0], res.output
    assert not target.exists() and not out.exists()


@pytest.mark.parametrize(
    "extra, args, message",
    [
        ("quantization: {engine: tflite}\n", [], "quantization.engine"),
        ("quantization: {per_chanel: true}\n", [], "per_chanel: unknown key"),
        ("", ["--engine", "tflite"], "quantization.engine"),
    ],
)
def test_cli_recipe_errors_exit_2_naming_the_key(material: dict[str, Path], tmp_path: Path, extra: str, args: list[str], message: str) -> None:
    res = CliRunner().invoke(
        app,
        ["quantize", "--recipe", str(_recipe_file(tmp_path, extra)), "--model", str(material["model"]), "--calib", str(material["bin"]),
         "--out", str(tmp_path / "int8.onnx"), "-q", *args],
    )
    assert res.exit_code == 2 and message in res.output, res.output


def test_cli_missing_model_exits_2(material: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["quantize", "--model", str(tmp_path / "none.onnx"), "--calib", str(material["bin"]), "--out", str(tmp_path / "q.onnx"), "-q"]
    )
    assert res.exit_code == 2 and "not found" in res.output


# --- real data --------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mobilefacenet_int8_stays_within_0_3_points_on_all_lfw_pairs(real_int8, real_lfw_verify) -> None:
    # The shipped recipe's int8 (tests/conftest.py) scored by the whole-LFW verify run test_verify.py checks too.
    res = real_int8
    assert res.op_counts["int8"]["Conv"] == 51
    r = real_lfw_verify["cli"]
    assert r.exit_code == 0, r.output
    report = json.loads((real_lfw_verify["report"] / "report.json").read_text())
    assert report["int8"]["sha256"] == res.int8_sha256 == sha256_file(res.output)
    lfw = report["data"]["lfw"]
    assert lfw["pairs"] == 6000 and not lfw["subset"]
    fp32, int8 = lfw["fp32"]["accuracy"], lfw["int8"]["accuracy"]
    assert fp32 - int8 <= 0.3, (fp32, int8)


# --- weight ranges ------------------------------------------------------------------------------


def _qlinearconv_weights(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.name: inits[n.input[3]] for n in m.graph.node if n.op_type == "QLinearConv"}


def _activation_params(path: Path) -> dict[str, list]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.name: [inits[n.input[i]].tolist() for i in (1, 2, 6, 7)] for n in m.graph.node if n.op_type == "QLinearConv"}


@pytest.mark.parametrize("engine", ["inc", "ort"])
def test_reduce_range_gives_7_bit_weights_except_depthwise_and_full_range_activations(
    material: dict[str, Path], tmp_path: Path, engine: str
) -> None:
    base = {"quantization.engine": engine, "quantization.per_channel": True}
    split = _run(material, tmp_path / "split" / "int8.onnx", _recipe(**base))
    assert split.weights == {"reduce_range": True, "depthwise_8bit": 1}
    w = _qlinearconv_weights(split.output)
    dw = [k for k in w if k.startswith("conv2")]
    assert len(dw) == 1  # the synthetic model's one depthwise conv
    assert int(np.abs(w[dw[0]]).max()) == 127
    assert all(int(np.abs(v).max()) <= 64 for k, v in w.items() if k not in dw)

    full = _run(material, tmp_path / "full" / "int8.onnx", _recipe(**base, **{"quantization.reduce_range": False}))
    assert full.weights == {"reduce_range": False, "depthwise_8bit": 0}
    assert all(int(np.abs(v).max()) == 127 for v in _qlinearconv_weights(full.output).values())
    # reduce_range narrows weights only: activation scales and zero points are those of the 8-bit run
    # (INC on its own would narrow the activations to 7 bits too).
    assert _activation_params(split.output) == _activation_params(full.output)

    every = _run(material, tmp_path / "all" / "int8.onnx", _recipe(**base, **{"quantization.reduce_range_depthwise": True}))
    assert every.weights["depthwise_8bit"] == 0
    assert all(int(np.abs(v).max()) <= 64 for v in _qlinearconv_weights(every.output).values())


@pytest.mark.parametrize("engine, default", [("inc", True), ("ort", False)])
def test_per_channel_null_gives_the_engine_default_the_scheme_names(
    material: dict[str, Path], tmp_path: Path, engine: str, default: bool
) -> None:
    from pipeline.stages.quantize.scheme import QuantScheme

    r = _recipe(**{"quantization.engine": engine})
    q_null = r.quantization.model_copy(update={"per_channel": None})
    assert QuantScheme.from_section(q_null).per_channel is default
    null = quantize(Int8Job(model=material["model"], calib=material["bin"], out=tmp_path / "null" / "int8.onnx", input_spec=r.model.input,
                            calibration=r.calibration, quantization=q_null))
    explicit = _run(material, tmp_path / "explicit" / "int8.onnx", _recipe(**{"quantization.engine": engine, "quantization.per_channel": default}))
    assert null.int8_sha256 == explicit.int8_sha256


def test_a_job_copied_with_other_settings_records_them_in_its_recipe_and_leaves_the_original_alone() -> None:
    r = _recipe()
    job = Int8Job.from_recipe(r, model="m.onnx", calib="c.bin", out="q/int8.onnx")
    assert (job.model, job.calib, job.out) == (Path("m.onnx"), Path("c.bin"), Path("q/int8.onnx"))
    assert job.pairs == Path("c.bin") and Int8Job.from_recipe(r, model="m", calib="c", out="o", eval_data="e.bin").pairs == Path("e.bin")
    q = r.quantization.model_copy(update={"nodes_to_exclude": ["conv1"]})
    other = job.with_quantization(q, model=Path("repaired.onnx"))
    assert other.quantization.nodes_to_exclude == ["conv1"] and other.recipe.quantization.nodes_to_exclude == ["conv1"]
    assert other.model == Path("repaired.onnx") and other.calib == job.calib and other.out == job.out
    assert job.quantization.nodes_to_exclude == [] and job.recipe.quantization.nodes_to_exclude == []
    bare = Int8Job(model="m", calib="c", out="o", input_spec=r.model.input, calibration=r.calibration, quantization=r.quantization)
    assert bare.with_quantization(q).recipe is None


def test_each_engine_run_gets_one_weight_range_and_engine_names_from_the_scheme() -> None:
    from pipeline.recipe import QuantizationSection
    from pipeline.stages.quantize.scheme import QuantScheme

    s = QuantScheme.from_section(QuantizationSection(engine="ort", reduce_range=True, calibration_method="percentile"))
    main, donor = s.uniform(s.weight_levels(depthwise=False)), s.uniform(s.weight_levels(depthwise=True))
    assert main.engine_reduce_range and main.depthwise_half_levels is None
    assert not donor.engine_reduce_range and donor.weight_half_levels == 127
    assert (s.inc_algorithm, s.ort_calibration_method, s.histogram_calibration) == ("percentile", "Percentile", True)
    e = QuantScheme.from_section(QuantizationSection(calibration_method="entropy"))
    assert (e.inc_algorithm, e.ort_calibration_method, e.histogram_calibration, e.calibration) == ("kl", "Entropy", True, "minmax")
    m = QuantScheme.from_section(QuantizationSection(calibration_method="minmax", reduce_range=False))
    assert not m.histogram_calibration and not m.engine_reduce_range and m.depthwise_half_levels is None
    with pytest.raises(ValueError):
        s.uniform(100)


def test_environment_facts_and_peak_memory() -> None:
    from pipeline.core.environment import PeakMemory, cpu_info, environment, process_peak_rss_mb

    env = environment()
    assert env["versions"]["python"].count(".") == 2
    assert env["versions"]["onnxruntime"] and env["versions"]["numpy"] == np.__version__
    assert set(env["cpu"]["flags"]) >= {"avx2", "avx512_vnni", "amx_tile", "amx_int8"}
    assert all(isinstance(v, bool) for v in env["cpu"]["flags"].values())
    assert cpu_info()["logical_cores"] >= cpu_info()["physical_cores"] >= 1
    with PeakMemory(interval=0.005) as mem:
        before = mem.peak_mb
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        block.sum()
        import time

        time.sleep(0.05)
    del block
    assert mem.peak_mb >= before + 50 and mem.seconds > 0
    assert process_peak_rss_mb() >= mem.peak_mb * 0.9


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, batch", [("percentile", 1), ("percentile", 3), ("entropy", 1)])
def test_inc_histogram_calibration_streams_and_gives_inc_own_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, batch: int
) -> None:
    """INC keeps every activation of every image for percentile/kl; qpipe reads the data twice instead.

    Same int8 bytes as INC's own calibration (batch 3 over 40 images ends in a
    smaller batch: INC's one-by-one histogram merge), with a memory peak that
    does not grow with the number of calibration images.
    """
    import contextlib
    import tracemalloc

    from neural_compressor.adaptor.ox_utils.calibration import ONNXRTAugment

    from pipeline.stages.quantize import inc_patches, ort

    model = tmp_path / "fp32.onnx"
    face_model(model, size=tuple(SIZE))
    calib = synthetic_bin(tmp_path / "calib.bin", pairs=20, size=tuple(SIZE))
    r = _recipe(**{"quantization.calibration_method": method, "calibration.samples": 40, "calibration.batch": batch})
    streamed_cm = inc_patches.streamed_histograms
    peaks: dict[str, int] = {}

    def measured(label: str, streamed: bool):
        @contextlib.contextmanager
        def cm():
            with (streamed_cm() if streamed else contextlib.nullcontext()):
                inner = ONNXRTAugment.get_activation_tensors_calib_range

                def wrapper(self, q_config=None):
                    tracemalloc.start()
                    try:
                        return inner(self, q_config)
                    finally:
                        peaks[label] = tracemalloc.get_traced_memory()[1]
                        tracemalloc.stop()

                monkeypatch.setattr(ONNXRTAugment, "get_activation_tensors_calib_range", wrapper)
                try:
                    yield
                finally:
                    monkeypatch.setattr(ONNXRTAugment, "get_activation_tensors_calib_range", inner)

        return cm

    outs = {}
    for label, streamed in (("inc", False), ("qpipe", True)):
        monkeypatch.setattr(inc_patches, "streamed_histograms", measured(label, streamed))
        outs[label] = tmp_path / label / "int8.onnx"
        quantize(Int8Job.from_recipe(r, model=model, calib=calib, out=outs[label]))
    assert outs["inc"].read_bytes() == outs["qpipe"].read_bytes()
    per_image = ort.activation_bytes_per_image(onnx.load(str(model)))
    if batch == 1:
        assert peaks["inc"] > 20 * per_image, peaks  # INC held (most of) the 40 images' activations
    assert peaks["qpipe"] < 8 * batch * per_image, peaks  # qpipe: a few batches at a time


def test_ort_histogram_calibration_reads_the_batches_in_slices(material: dict[str, Path]) -> None:
    from pipeline.data.calibration import CalibrationData
    from pipeline.stages.quantize.ort import calibration_stride

    mb = 1 << 20
    assert calibration_stride(200, 40 * mb) == 25  # 1 GiB / 40 MiB = 25 batches, which divides 200
    assert calibration_stride(200, 100 * mb) == 10 and calibration_stride(7, mb) == 7 and calibration_stride(17, 100 * mb) == 1
    assert calibration_stride(200, 2 << 30) == 1
    cd = CalibrationData(read_bin(material["bin"]), _recipe().model.input, samples=6, seed=0, batch_size=2, flip=True)
    whole = list(cd.arrays())
    assert len(whole) == len(cd) == 6
    reader = cd.ort_reader("data")
    sliced = []
    for start in range(0, len(reader), 3):
        reader.set_range(start, start + 3)
        sliced += list(iter(reader.get_next, None))
    assert len(sliced) == 6
    for a, b in zip(whole, sliced):
        np.testing.assert_array_equal(a, b["data"])


def test_the_8_bit_and_7_bit_runs_share_one_calibration(material: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 8-bit depthwise weights INC runs twice; the second run reuses the first one's ranges (same bytes)."""
    import contextlib
    import dataclasses

    from pipeline.stages.quantize import inc, stage

    reads = []
    iterate = inc.CountingLoader.__iter__
    monkeypatch.setattr(inc.CountingLoader, "__iter__", lambda self: (reads.append(1), iterate(self))[1])
    r = _recipe(**{"quantization.calibration_method": "percentile", "quantization.reduce_range": True})
    shared = _run(material, tmp_path / "shared" / "int8.onnx", r)
    assert shared.weights["depthwise_8bit"] > 0  # two engine runs
    assert len(reads) == 2  # the two passes of one streamed calibration
    reads.clear()
    monkeypatch.setitem(stage.ENGINES, "inc", dataclasses.replace(stage.ENGINES["inc"], shared_calibration=contextlib.nullcontext))
    alone = _run(material, tmp_path / "alone" / "int8.onnx", r)
    assert len(reads) == 4
    assert shared.output.read_bytes() == alone.output.read_bytes()
