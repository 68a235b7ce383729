"""BatchNormalization no Conv absorbs: rewritten as a 1x1 depthwise Conv, so int8 keeps no fp32 island for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.stages.batchnorm import rewrite_batchnorm, standalone_batchnorms


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(rng.uniform(-3, 3, c).astype(np.float32), f"{prefix}_gamma"),
        numpy_helper.from_array(rng.uniform(-2, 2, c).astype(np.float32), f"{prefix}_beta"),
        numpy_helper.from_array(rng.uniform(-5, 5, c).astype(np.float32), f"{prefix}_mean"),
        numpy_helper.from_array(rng.uniform(0.01, 9, c).astype(np.float32), f"{prefix}_var"),
    ]


def residual_unit(c: int = 8, seed: int = 0, size: int = 12) -> onnx.ModelProto:
    """An LResNet-IR unit after a stem Conv, ``stem + Conv(Relu(BN(Conv(BN(stem)))))``, then a MatMul head.

    ``bn1`` reads the stem's output, which the shortcut reads too (no Conv
    absorbs it); ``bn2`` follows a Conv read by nothing else (the engines fold it).
    """
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(w(c, 3, 3, 3), "stem_w"), numpy_helper.from_array(w(c, c, 3, 3), "conv1_w"),
        numpy_helper.from_array(w(c, c, 3, 3), "conv2_w"), numpy_helper.from_array(w(16, c * size * size).T.copy(), "fc_w"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
        *_bn_params(rng, c, "bn1"), *_bn_params(rng, c, "bn2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["stem", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["bn1"], name="bn1", epsilon=2e-5),
        helper.make_node("Conv", ["bn1", "conv1_w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["bn2"], name="bn2"),
        helper.make_node("Relu", ["bn2"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "conv2_w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["stem", "c2"], ["sum"], name="plus"),
        helper.make_node("Reshape", ["sum", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_only_batchnorm_no_conv_absorbs_is_a_candidate() -> None:
    assert [n.name for n in standalone_batchnorms(residual_unit())] == ["bn1"]


def test_the_depthwise_conv_computes_the_batchnorm_on_random_tensors() -> None:
    src = residual_unit()
    m = _copy(src)
    rep = rewrite_batchnorm(m)
    onnx.checker.check_model(m, full_check=True)
    assert rep.rewritten == ["bn1"] and not rep.kept
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 1  # bn2 stays for the engines to fold
    dw = next(n for n in m.graph.node if n.output[0] == "bn1")
    assert dw.op_type == "Conv" and {a.name: helper.get_attribute_value(a) for a in dw.attribute}["group"] == 8
    assert not {"bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"} & {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 12, 12)) * rng.choice([1e-2, 1.0, 1e2], size=(1, 3, 12, 12))).astype(np.float32)
    want, got = _run(src, x), _run(m, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_a_wrong_epsilon_would_be_caught() -> None:
    # The rewrite reads the node's epsilon (2e-5 here, not the default): a variance of 0.01 makes it count.
    m = residual_unit()
    rewrite_batchnorm(m)
    w = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name.startswith("bn1_dw_w")).reshape(-1)
    src = {t.name: numpy_helper.to_array(t) for t in residual_unit().graph.initializer}
    np.testing.assert_allclose(w, src["bn1_gamma"] / np.sqrt(src["bn1_var"].astype(np.float64) + 2e-5), rtol=1e-6)


def test_batchnorm_that_cannot_be_a_depthwise_conv_is_kept_and_named() -> None:
    m = residual_unit()
    assert rewrite_batchnorm(m, exclude={"bn1"}).kept == {"bn1": "excluded by name"}
    m = residual_unit()
    next(n for n in m.graph.node if n.name == "bn1").attribute.append(helper.make_attribute("training_mode", 1))
    assert "training mode" in rewrite_batchnorm(m).kept["bn1"]
    # A scale that arrives as a graph input is not a constant.
    m = residual_unit()
    m.graph.input.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [8]))
    next(n for n in m.graph.node if n.name == "bn1").input[1] = "g"
    assert rewrite_batchnorm(m).kept == {"bn1": "parameters are not float constants"}
    # A 2-D input (after the head's Reshape): not an image tensor.
    m = residual_unit()
    m.graph.node.append(helper.make_node("Reshape", ["y", "flat_shape"], ["y2"], name="r2"))
    m.graph.node.append(helper.make_node("BatchNormalization", ["y2", "g2", "b2", "m2", "v2"], ["z"], name="bn_fc"))
    m.graph.initializer.extend(numpy_helper.from_array(np.ones(16, np.float32), n) for n in ("g2", "b2", "m2", "v2"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16]))
    rep = rewrite_batchnorm(m)
    assert rep.rewritten == ["bn1"] and rep.kept == {"bn_fc": "input of rank 2, not NCHW"}


def test_a_conv_read_twice_does_not_absorb_its_batchnorm() -> None:
    m = residual_unit()
    # conv1's output also feeds a second output: the engines cannot fold bn2 into conv1 any more.
    m.graph.node.append(helper.make_node("Relu", ["c1"], ["also"], name="also"))
    m.graph.output.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, [1, 8, 12, 12]))
    assert [n.name for n in standalone_batchnorms(m)] == ["bn1", "bn2"]


def test_a_model_whose_batchnorm_follows_its_conv_is_untouched() -> None:
    m = residual_unit()
    m.graph.node.remove(next(n for n in m.graph.node if n.name == "bn1"))
    next(n for n in m.graph.node if n.name == "conv1").input[0] = "stem"
    before = m.SerializeToString()
    assert not rewrite_batchnorm(m).changed and not standalone_batchnorms(m)
    assert m.SerializeToString() == before


# --- op counts: a BatchNormalization between Dequantize and Quantize runs in fp32 -----------------------------------


def test_batchnorm_between_dequantize_and_quantize_counts_as_fp32() -> None:
    from pipeline.stages.quantize.opcounts import count_ops

    c = 4
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    inits += [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("g", "b", "m", "v")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("BatchNormalization", ["xd", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("QuantizeLinear", ["bn", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2, 2])], initializer=inits)
    counts = count_ops(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert counts["fp32"] == {"BatchNormalization": 1} and counts["int8"] == {}


# --- quantize: the rewrite happens before the engine, checked on calibration faces --------------------------------


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.synthdata import synthetic_bin

    d = tmp_path_factory.mktemp("bn-quantize")
    model = d / "fp32.onnx"
    onnx.save(residual_unit(), str(model))
    return {"model": model, "bin": synthetic_bin(d / "pairs.bin", pairs=8, size=(12, 12))}


def _recipe(**overrides: object):
    from pipeline.recipe import default_recipe, with_overrides

    return with_overrides(default_recipe(), {"model.input.size": [12, 12], "calibration.samples": 8, **overrides})


def _quantize(material: dict[str, Path], out: Path, **overrides: object):
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize

    return quantize(Int8Job.from_recipe(_recipe(**overrides), model=material["model"], calib=material["bin"], out=out))


def _optimized_ops(path: Path) -> dict[str, int]:
    """Op types onnxruntime actually runs, after its graph optimisations."""
    from collections import Counter

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.parent.parent / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))


@pytest.mark.parametrize("engine", ["inc", "ort"])
def test_quantize_leaves_no_batchnorm_in_fp32(tmp_path: Path, unit: dict[str, Path], engine: str) -> None:
    res = _quantize(unit, tmp_path / "q" / "int8.onnx", **{"quantization.engine": engine})
    assert "BatchNormalization" not in res.op_counts.get("fp32", {})
    ran = _optimized_ops(res.output)
    assert "BatchNormalization" not in ran and "DequantizeLinear" in ran and ran["DequantizeLinear"] == 1  # only the output's
    assert res.batchnorm is not None and res.batchnorm["rewritten"] == 1 and res.batchnorm["faces"] == 8
    assert res.batchnorm["worst_cosine"] >= 0.99999
    assert res.manifest_body()["batchnorm"] == res.batchnorm
    assert any(line.startswith("BatchNormalization: 1 BatchNormalization without a Conv before it") for line in res.summary())
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["int8.onnx"]
    assert [n.op_type for n in onnx.load(str(unit["model"])).graph.node].count("BatchNormalization") == 2  # source untouched


def test_quantize_keeps_batchnorm_the_recipe_excludes(tmp_path: Path, unit: dict[str, Path]) -> None:
    by_type = _quantize(unit, tmp_path / "a.onnx", **{"quantization.engine": "ort", "quantization.op_types_to_exclude": ["BatchNormalization"]})
    assert by_type.batchnorm is None and by_type.op_counts["fp32"].get("BatchNormalization") == 1
    by_name = _quantize(unit, tmp_path / "b.onnx", **{"quantization.engine": "ort", "quantization.nodes_to_exclude": ["bn1"]})
    assert by_name.batchnorm is None and "bn1" in {n.name for n in onnx.load(str(by_name.output)).graph.node}


def test_cli_prints_the_rewrite_and_a_wrong_one_stops_with_exit_2_writing_nothing(tmp_path: Path, unit: dict[str, Path], monkeypatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.app import app
    from pipeline.stages.quantize import stage

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(**{"quantization.engine": "ort"}).resolved()))
    args = ["quantize", "--recipe", str(recipe), "--model", str(unit["model"]), "--calib", str(unit["bin"])]
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a" / "int8.onnx")])
    assert ok.exit_code == 0, ok.output
    assert "BatchNormalization: 1 BatchNormalization without a Conv before it -> 1x1 depthwise Conv" in ok.output

    real = stage.rewrite_batchnorm

    def wrong(model: onnx.ModelProto, **kw):  # a rewrite that forgets the shift
        done = real(model, **kw)
        for t in model.graph.initializer:
            if t.name.startswith("bn1_dw_b"):
                t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        return done

    monkeypatch.setattr(stage, "rewrite_batchnorm", wrong)
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c" / "int8.onnx")])
    assert bad.exit_code == 2, bad.output
    assert "the BatchNormalization rewrite changed the embeddings" in bad.output and "Traceback" not in bad.output
    assert "op_types_to_exclude" in bad.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_the_lresnet_stand_in_keeps_no_fp32_batchnorm_island(tmp_path: Path) -> None:
    """Every pre-activation BatchNormalization of an LResNet-IR unit (51 at depth 100, 9 at depth 18) goes int8."""
    from pipeline.stages.convert import convert
    from pipeline.stages.synth import synth_model
    from tests.synthdata import synthetic_bin

    src = synth_model(tmp_path / "standin.onnx", depth=18, width=8).path
    fp32 = tmp_path / "standin11.onnx"
    convert(src, fp32, opset=11, prelu="keep")
    lone = [n.name for n in standalone_batchnorms(onnx.load(str(fp32)))]
    # One per residual unit (it reads the residual sum), the head's bn1 before Flatten and fc1 on the 2-D embedding.
    assert len(lone) == 10 and lone[-2:] == ["bn1", "fc1"]
    calib = synthetic_bin(tmp_path / "p.bin", pairs=4, size=(112, 112))
    res = _quantize({"model": fp32, "bin": calib}, tmp_path / "q" / "int8.onnx", **{"model.input.size": [112, 112], "quantization.engine": "ort"})
    assert res.batchnorm["rewritten"] == 9 and list(res.batchnorm["kept"]) == ["fc1"]
    assert res.op_counts["fp32"].get("BatchNormalization") == 1  # the head's fc1, on the 2-D embedding
