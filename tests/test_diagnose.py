"""`qpipe diagnose`: the simulation matches the engines' arithmetic, the gated model is exact when off,
the piecewise runs agree with whole runs, and the planted culprits are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.accuracy.diagnose import Analysis, analyse, diagnose
from pipeline.accuracy.engine_graph import GraphIndex, engine_view, quantizable_nodes
from pipeline.accuracy.findings import MODEL_WIDE, engine_findings, int8_findings, int8_node_name
from pipeline.accuracy.gated import GATES, build_gated_model
from pipeline.accuracy.qmath import INT32_MAX, INT32_MIN, activation_qparams, fake_quant_weight, quantize_bias, weight_scales
from pipeline.accuracy.ranges import calibration_images
from pipeline.accuracy.simulate import embedding_error, sensitivity, single_tensor_cuts
from pipeline.cli.app import app
from pipeline.core.errors import UserError
from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection
from pipeline.runtime.session import session
from pipeline.stages.quantize.scheme import QuantScheme
from tests.synthdata import synthetic_bin
from tests.twin import DEAD_CHANNEL, NEAR_DEAD_CHANNEL, OUTLIER_CHANNELS, SIZE, planted_model

SPEC = InputSpec(size=[SIZE, SIZE])
CALIB = CalibrationSection(samples=48, seed=0)
INC = QuantizationSection()  # engine inc, per-channel (INC's default), reduce_range


@pytest.fixture(scope="module")
def pairs_bin(tmp_path_factory) -> Path:
    return synthetic_bin(tmp_path_factory.mktemp("diag") / "pairs.bin", pairs=60, size=(SIZE, SIZE), seed=3)


@pytest.fixture(scope="module")
def images(pairs_bin: Path) -> np.ndarray:
    return calibration_images(pairs_bin, SPEC, CALIB, "data")


# --- the engines' arithmetic ------------------------------------------------------------


def test_weight_scales_match_inc_per_channel_quantization_including_a_dead_channel():
    from neural_compressor.adaptor.ox_utils.util import quantize_data_per_channel
    from onnx import onnx_pb as onnx_proto

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)
    w[2] = 0.0
    for reduce_range, half in ((True, 64), (False, 127)):
        qrange = 128 if reduce_range else 254
        _, _, _, inc_scale, inc_q = quantize_data_per_channel(w, 0, qrange, onnx_proto.TensorProto.INT8, "sym")
        ours = weight_scales(w, 0, half)
        np.testing.assert_allclose(ours, inc_scale.reshape(-1), rtol=1e-6)
        deq = fake_quant_weight(w, ours, 0, half)
        np.testing.assert_allclose(deq, inc_q.astype(np.float32) * inc_scale.reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-9)
    assert weight_scales(w, 0, 64)[2] == 1.0  # INC's placeholder for a zero range


def test_activation_qparams_match_inc_uint8_ranges():
    from neural_compressor.adaptor.ox_utils.util import calculate_scale_zp
    from onnx import onnx_pb as onnx_proto

    for lo, hi in ((-1.5, 4.0), (0.0, 6.0), (0.2, 3.0), (-7.0, -1.0)):
        for levels in (127, 255):
            inc_scale, inc_zp = calculate_scale_zp(min(lo, 0.0), max(hi, 0.0), levels, onnx_proto.TensorProto.UINT8, "asym")
            scale, zp = activation_qparams(lo, hi, levels)
            assert scale == pytest.approx(float(inc_scale), rel=1e-6)
            assert zp == int(inc_zp)


def test_bias_overflow_becomes_int32_min_as_in_inc_and_saturates_in_onnxruntime():
    b = np.array([2.0, 0.5, -1.0])
    scale = np.array([1e-13, 1e-3, 1e-13])
    wrapped, overflow = quantize_bias(b, scale, "wrap")
    assert overflow.tolist() == [True, False, True]
    assert wrapped.tolist() == [INT32_MIN, 500, INT32_MIN]
    with np.errstate(invalid="ignore"):
        inc_style = (b / scale).round().astype(np.int32)  # what INC 3.7.1's quantize_bias does
    assert inc_style[0] == INT32_MIN
    clipped, _ = quantize_bias(b, scale, "clip")
    assert clipped.tolist() == [INT32_MAX, 500, INT32_MIN]


def test_scheme_follows_the_quantize_stage_conventions():
    # quantize.py gives INC full-range activations and keeps depthwise convs at 8-bit weights.
    inc = QuantScheme.from_section(QuantizationSection(engine="inc", reduce_range=True))
    assert (inc.activation_levels, inc.weight_half_levels, inc.depthwise_half_levels) == (255, 64, 127)
    assert (inc.per_channel, inc.bias_overflow, inc.clip_bound_lost) == (True, "wrap", False)
    every = QuantScheme.from_section(QuantizationSection(engine="inc", reduce_range=True, reduce_range_depthwise=True))
    assert every.depthwise_half_levels is None
    ort = QuantScheme.from_section(QuantizationSection(engine="ort", reduce_range=False, per_channel=None, calibration_method="minmax"))
    assert (ort.activation_levels, ort.weight_half_levels, ort.per_channel, ort.bias_overflow) == (255, 127, False, "clip")
    assert ort.calibration == "minmax"
    assert QuantScheme.from_section(QuantizationSection(calibration_method="percentile")).calibration == "percentile"
    assert QuantScheme.from_section(QuantizationSection(calibration_method="entropy")).calibration == "minmax"
    assert inc.weight_levels(depthwise=True) == 127 and every.weight_levels(depthwise=True) == 64
    assert inc.weight_levels(depthwise=False) == 64


# --- the gated simulation ----------------------------------------------------------------


def _analysis(images: np.ndarray, **planted) -> Analysis:
    model = planted_model(**planted)
    return analyse(model, images, QuantScheme.from_section(INC), input_name="data", output_name="fc1")


def test_gated_model_with_every_switch_off_is_exactly_the_fp32_model(images: np.ndarray):
    an = _analysis(images)
    gated = build_gated_model(an.view, an.nodes, an.ranges, an.scheme)
    # Same optimisation level on both sides: fused kernels would differ in the last float bit.
    plain = session(an.view, optimization="basic").run(["fc1"], {"data": images})[0]
    off = session(gated, optimization="basic").run(["fc1"], {"data": images, GATES: np.zeros(len(an.nodes), np.float32)})[0]
    np.testing.assert_array_equal(off, plain)
    on = session(gated, optimization="basic").run(["fc1"], {"data": images, GATES: np.ones(len(an.nodes), np.float32)})[0]
    assert not np.allclose(on, plain)


def test_piecewise_runs_agree_with_whole_gated_runs(images: np.ndarray):
    an = _analysis(images)
    sim = an.simulator(32)
    assert len(sim.segments) > 1, "the planted model has block boundaries to cut at"
    n = len(an.nodes)
    for k in range(n):
        assert sim.error_alone(k) == pytest.approx(sim.error([k]), rel=1e-4, abs=1e-9)
        assert sim.error_all_but([k]) == pytest.approx(sim.error([i for i in range(n) if i != k]), rel=1e-4, abs=1e-9)


def test_single_tensor_cuts_are_block_boundaries():
    m = planted_model()
    cuts = [t for _, t in single_tensor_cuts(m.graph, {t.name for t in m.graph.initializer})]
    assert "conv1_relu" in cuts and "gdc_bn_out" in cuts
    assert "fc1" not in cuts


# --- findings and culprits ------------------------------------------------------------------


def test_diagnose_names_the_planted_outlier_pair_and_dead_channels(tmp_path: Path, pairs_bin: Path):
    model = tmp_path / "planted.onnx"
    planted_model(model)
    res = diagnose(
        model, calib=pairs_bin, input_spec=SPEC, calibration=CALIB, quantization=INC, samples=32, report_dir=tmp_path / "rep"
    )
    kinds = {(f.kind, f.node) for f in res.findings}
    outliers = next(f for f in res.findings if f.kind == "activation_outliers")
    assert outliers.node == "gdc" and outliers.tensor == "gdc_bn_out" and outliers.severity == "high"
    assert sorted(outliers.channels) == OUTLIER_CHANNELS
    overflow = next(f for f in res.findings if f.kind == "bias_overflow")
    assert overflow.node == "conv2" and overflow.channels == [NEAR_DEAD_CHANNEL]
    assert ("dead_channels", "gdc") in kinds
    assert next(f for f in res.findings if f.kind == "dead_channels").channels == [DEAD_CHANNEL]
    top = [r.node for r in res.sensitivity[:3]]
    assert {"conv2", "gdc", "embed"} == set(top)
    assert res.sensitivity[0].error_alone > 10 * res.sensitivity[3].error_alone
    assert {"conv2", "gdc", "embed"} <= set(res.culprits)
    report = json.loads((tmp_path / "rep" / "diagnose.json").read_text())
    assert report["culprits"][:3] == res.culprits[:3]
    assert len(report["sensitivity"]) == res.quantizable == 4
    md = (tmp_path / "rep" / "diagnose.md").read_text()
    assert "`gdc`" in md and "activation_outliers" in md and "| 1 |" in md


def test_clean_model_has_no_high_findings_and_small_errors(images: np.ndarray):
    an = _analysis(images, outliers=False, near_dead=False, dead=False)
    assert [f for f in an.findings if f.severity == "high"] == []
    rows, err_all = sensitivity(an.simulator(32), both=True)
    assert err_all < 0.02
    assert all(r.gain_if_fp32 is not None for r in rows)


def test_a_lost_clip_bound_is_a_finding_only_where_the_engine_loses_it(images: np.ndarray):
    # INC's own reduce_range (127 activation levels) implements Clip(0, 6) by the uint8 clamp at 255.
    m = planted_model(outliers=False, near_dead=False, dead=False, relu6=True)
    view = engine_view(m)
    nodes = quantizable_nodes(view)
    narrow = QuantScheme("inc", 127, 64, True, "wrap", clip_bound_lost=True)
    found = engine_findings(nodes, GraphIndex.of(view), narrow)
    assert [(f.kind, f.node, f.nodes, f.severity) for f in found] == [("clip_bound_lost", MODEL_WIDE, ["conv1", "conv2"], "high")]
    assert engine_findings(nodes, GraphIndex.of(view), QuantScheme.from_section(INC)) == []
    relu = planted_model(outliers=False, near_dead=False, dead=False)
    rv = engine_view(relu)
    assert engine_findings(quantizable_nodes(rv), GraphIndex.of(rv), narrow) == []


def test_simulated_error_matches_inc_int8_model(tmp_path: Path, pairs_bin: Path, images: np.ndarray):
    """The gated simulation reproduces INC's real int8 arithmetic, including the lost Clip bound."""
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize
    from pipeline.recipe import default_recipe, with_overrides

    fp32 = tmp_path / "relu6.onnx"
    m = planted_model(fp32, outliers=True, near_dead=False, dead=False, relu6=True)
    r = with_overrides(default_recipe(), {"model.input.size": [SIZE, SIZE], "calibration.samples": 48})
    out = tmp_path / "int8.onnx"
    quantize(Int8Job.from_recipe(r, model=fp32, calib=pairs_bin, out=out))
    an = analyse(m, images, QuantScheme.from_section(r.quantization), input_name="data", output_name="fc1")
    sim = an.simulator(len(images))
    simulated = sim.error_of(np.ones(len(an.nodes), np.float32))
    real = embedding_error(sim.reference, session(onnx.load(str(out))).run(["fc1"], {"data": images})[0])
    assert real > 1e-3, "the planted outliers must cost something"
    assert simulated == pytest.approx(real, rel=0.15)


def _qlinearconv_model(w_scale: float, bias: int) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "x_s"), numpy_helper.from_array(np.array(0, np.uint8), "x_z"),
        numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w_q"),
        numpy_helper.from_array(np.array([w_scale, 0.5], np.float32), "w_s"), numpy_helper.from_array(np.zeros(2, np.int8), "w_z"),
        numpy_helper.from_array(np.array(0.2, np.float32), "y_s"), numpy_helper.from_array(np.array(0, np.uint8), "y_z"),
        numpy_helper.from_array(np.array([bias, 3], np.int32), "b_q"),
    ]
    node = helper.make_node("QLinearConv", ["x", "x_s", "x_z", "w_q", "w_s", "w_z", "y_s", "y_z", "b_q"], ["y"], name="conv_quant")
    g = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2, 4, 4])], inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])


def test_int8_findings_flag_zero_scales_and_saturated_biases():
    found = int8_findings(_qlinearconv_model(0.0, INT32_MIN))
    kinds = {(f.kind, f.node, tuple(f.channels)) for f in found}
    assert ("bad_scale", "conv_quant", (0,)) in kinds
    assert ("bias_saturated", "conv_quant", (0,)) in kinds
    assert int8_findings(_qlinearconv_model(0.25, 7)) == []
    assert int8_node_name("conv96_quant", {"conv96"}) == "conv96"
    assert int8_node_name("other_quant", {"conv96"}) == "other_quant"


def test_diagnose_of_a_model_without_quantizable_nodes_is_a_user_error(tmp_path: Path, pairs_bin: Path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["data"], ["fc1"], name="r")], "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    with pytest.raises(UserError, match="no node the engines quantize"):
        diagnose(path, calib=pairs_bin, input_spec=SPEC, calibration=CALIB, quantization=INC)


# --- command line ------------------------------------------------------------------------------


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        "name: t\nmodel: {urls: [m.onnx], input: {size: [32, 32]}}\ncalibration: {samples: 40}\n"
        "quantization: {recovery: {sensitivity_samples: 24}}\n"
    )
    return p


def test_cli_diagnose_prints_the_culprits_and_writes_the_report(tmp_path: Path, pairs_bin: Path):
    model = tmp_path / "planted.onnx"
    planted_model(model)
    r = CliRunner().invoke(
        app, ["diagnose", "--recipe", str(_recipe(tmp_path)), "--fp32", str(model), "--calib", str(pairs_bin), "--report", str(tmp_path / "rep"), "-q", "--alone-only"]
    )
    assert r.exit_code == 0, r.output
    assert "activation_outliers" in r.output and "gdc" in r.output and "conv2" in r.output
    assert (tmp_path / "rep" / "diagnose.md").is_file()
    data = json.loads((tmp_path / "rep" / "diagnose.json").read_text())
    assert data["samples"] == 24 and data["range_samples"] == 40
    assert all(row["error_without"] is None for row in data["sensitivity"])


def test_cli_diagnose_works_on_a_model_with_a_fixed_batch_of_one(tmp_path: Path, pairs_bin: Path):
    model = tmp_path / "batch1.onnx"
    planted_model(model, batch=1)
    r = CliRunner().invoke(
        app, ["diagnose", "--recipe", str(_recipe(tmp_path)), "--fp32", str(model), "--calib", str(pairs_bin), "--report", str(tmp_path / "rep"), "-q"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "rep" / "diagnose.json").read_text())
    assert data["samples"] == 24 and data["range_samples"] == 40
    assert {"conv2", "gdc", "embed"} <= set(data["culprits"])
    # The same findings and errors as with any batch: the batch changes how the faces are fed, not the result.
    dynamic = tmp_path / "dynamic.onnx"
    planted_model(dynamic)
    r = CliRunner().invoke(
        app, ["diagnose", "--recipe", str(_recipe(tmp_path)), "--fp32", str(dynamic), "--calib", str(pairs_bin), "--report", str(tmp_path / "dyn"), "-q"]
    )
    assert r.exit_code == 0, r.output
    ref = json.loads((tmp_path / "dyn" / "diagnose.json").read_text())
    assert data["culprits"] == ref["culprits"]
    assert [f["kind"] for f in data["findings"]] == [f["kind"] for f in ref["findings"]]
    assert data["error_all_quantized"] == pytest.approx(ref["error_all_quantized"], rel=1e-3)


def test_cli_diagnose_user_errors_exit_2(tmp_path: Path, pairs_bin: Path):
    r = CliRunner().invoke(app, ["diagnose", "--calib", str(pairs_bin)])
    assert r.exit_code == 2 and "--fp32" in r.output
    r = CliRunner().invoke(app, ["diagnose", "--fp32", str(tmp_path / "missing.onnx"), "--calib", str(pairs_bin)])
    assert r.exit_code == 2 and "missing.onnx" in r.output
