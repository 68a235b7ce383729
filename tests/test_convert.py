"""Opset conversion: repairs, clean-ups, the equivalence gate and its errors."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import pipeline.stages.convert as convert_mod
from pipeline.runtime import graph as onnxutil
from pipeline.runtime.session import OnnxModel
from pipeline.cli.app import app
from pipeline.stages.convert import convert
from pipeline.core.errors import UserError
from pipeline.recipe import InputSpec
from pipeline.stages.synth import synth_model
from tests.synthdata import face_model, synthetic_bin

SMALL = InputSpec(size=[16, 16])


# --- small hand-built opset-8 models, MXNet-export style ---------------------------------


def tiny_model(
    path: Path,
    *,
    tail: str = "reshape",
    input_shape: list[int] | None = None,
    opset: int = 8,
    names: tuple[str, ...] = ("minus", "times", "conv1", "bn", "clip", "conv2"),
    seed: int = 0,
    bn_stats_shape: tuple[int, ...] = (4,),
    spatial: int = 1,
) -> Path:
    """data [1,3,16,16] -> Sub, Mul, Conv, BN, Clip, Conv 1x1 -> Reshape [1,-1] or Flatten axis 0 -> Gemm -> emb [1,8]."""
    rng = np.random.default_rng(seed)
    shape = input_shape or [1, 3, 16, 16]
    cin = shape[1] if len(shape) > 1 else 3
    inits: dict[str, np.ndarray] = {
        "mean": np.array([127.5], np.float32),
        "scale": np.array([1 / 128], np.float32),
        "w1": (rng.standard_normal((4, cin, 3, 3)) * 0.3).astype(np.float32),
        "gamma": (1 + 0.1 * rng.standard_normal(bn_stats_shape)).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(bn_stats_shape)).astype(np.float32),
        "mu": (0.1 * rng.standard_normal(bn_stats_shape)).astype(np.float32),
        "var": (1 + rng.random(bn_stats_shape)).astype(np.float32),
        "w2": (rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32),
        "fc_w": (rng.standard_normal((8, 4 * 16 * 16)) * 0.05).astype(np.float32),
        "fc_b": np.zeros(8, np.float32),
    }
    n = names
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["s"], name=n[0]),
        helper.make_node("Mul", ["s", "scale"], ["m"], name=n[1]),
        helper.make_node("Conv", ["m", "w1"], ["c1"], name=n[2], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mu", "var"], ["b1"], name=n[3], epsilon=1e-5, spatial=spatial),
        helper.make_node("Clip", ["b1"], ["r1"], name=n[4], min=0.0, max=6.0),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name=n[5], kernel_shape=[1, 1]),
    ]
    if tail == "reshape":
        inits["target"] = np.array([1, -1], np.int64)
        nodes.append(helper.make_node("Reshape", ["c2", "target"], ["flat"], name="reshape"))
    else:
        nodes.append(helper.make_node("Flatten", ["c2"], ["flat"], name="flatten", axis=0))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["emb"], name="fc", transB=1))
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, "tiny", inputs, [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 8])], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.save(model, str(path))
    return path


def _images(n: int, size: int = 16, seed: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size)).astype(np.float32)


def _embed_each(model, x: np.ndarray, output: str = "emb") -> np.ndarray:
    return OnnxModel(model, input_name="data", output_name=output, nchw=False).run(x)


def _assert_clean_opset11(path: Path, input_name: str, output_name: str) -> onnx.ModelProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert onnxutil.model_opset(model) == 11
    assert model.ir_version >= 6, "ir_version must suit opset 11"
    inits = {t.name for t in model.graph.initializer}
    assert not inits & {i.name for i in model.graph.input}, "initializers must not be graph inputs"
    assert "Constant" not in {n.op_type for n in model.graph.node}
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert [i.name for i in model.graph.input] == [input_name]
    assert [o.name for o in model.graph.output] == [output_name]
    assert len(model.graph.value_info) > 0, "shape inference results are stored"
    return model


# --- the LResNet stand-in --------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_twins(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("r18")
    return {
        "spatial1": synth_model(d / "r18.onnx", depth=18, seed=7).path,
        "spatial0": synth_model(d / "r18_spatial0.onnx", depth=18, seed=7, spatial0=True).path,
        "dir": d,
    }


@pytest.fixture(scope="module")
def r18_converted(r18_twins) -> dict[str, convert_mod.ConvertResult]:
    d = r18_twins["dir"]
    return {
        "spatial1": convert(r18_twins["spatial1"], d / "r18_11.onnx", dynamic_batch=False),
        "spatial0": convert(r18_twins["spatial0"], d / "r18_spatial0_11.onnx", samples=4, dynamic_batch=False),
    }


def test_depth18_stand_in_converts_to_clean_opset11_and_passes_the_gate(r18_converted):
    res = r18_converted["spatial1"]
    assert (res.opset_from, res.opset_to) == (8, 11)
    assert res.worst_cosine >= 0.99999 and np.isfinite(res.max_abs_diff)
    assert res.samples == 8 and res.sample_source == "seeded random" and res.reference == "source model"
    assert not res.copied and res.batch_checked == 0
    model = _assert_clean_opset11(res.output, "data", "fc1")
    assert model.ir_version == res.ir_version
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    assert any("initializers from the graph inputs" in r for r in res.repairs)
    d = res.to_dict()
    assert d["output"] == str(res.output) and d["worst_cosine"] == res.worst_cosine


def test_spatial0_stand_in_converts_to_the_same_numbers_as_its_spatial1_twin(r18_converted):
    one, zero = r18_converted["spatial1"], r18_converted["spatial0"]
    assert zero.worst_cosine >= 0.99999
    assert "spatial=0" in zero.repairs[0] and "spatial=1" in zero.repairs[0]
    # onnxruntime cannot run spatial=0; the gate says what it compared against.
    assert "repaired" in zero.reference
    model = _assert_clean_opset11(zero.output, "data", "fc1")
    assert not [a for n in model.graph.node for a in n.attribute if a.name == "spatial"]
    x = np.random.default_rng(11).integers(0, 256, (3, 3, 112, 112)).astype(np.float32)
    np.testing.assert_array_equal(_embed_each(zero.output, x, "fc1"), _embed_each(one.output, x, "fc1"))


def test_narrow_depth50_and_depth100_stand_ins_convert_with_dynamic_batch(tmp_path: Path):
    for depth in (50, 100):
        src = synth_model(tmp_path / f"r{depth}.onnx", depth=depth, width=8).path
        res = convert(src, tmp_path / f"r{depth}_11.onnx", dynamic_batch=True, samples=3)
        assert res.worst_cosine >= 0.99999 and res.batch_checked == 8
        model = _assert_clean_opset11(res.output, "data", "fc1")
        assert onnxutil.dims(model.graph.input[0])[0] == "batch"


# --- clean-ups on small models ---------------------------------------------------------


def test_clip_bounds_are_folded_into_initializers(tmp_path: Path):
    res = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL)
    model = _assert_clean_opset11(res.output, "data", "emb")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    clip = next(n for n in model.graph.node if n.op_type == "Clip")
    assert [float(inits[i]) for i in clip.input[1:]] == [0.0, 6.0]
    assert any("Constant" in r for r in res.repairs)


def test_empty_and_duplicate_node_names_become_unique(tmp_path: Path):
    # Old exports leave names empty or repeat them.
    src = tiny_model(tmp_path / "t.onnx", names=("minus", "times", "conv", "", "clip", "conv"))
    res = convert(src, tmp_path / "t11.onnx", input_spec=SMALL)
    model = _assert_clean_opset11(res.output, "data", "emb")
    names = [n.name for n in model.graph.node]
    assert "conv" in names and "minus" in names, "names that were fine are kept"
    assert any("empty or duplicate" in r for r in res.repairs)
    # onnxruntime refuses duplicate names, so the renamed opset-8 graph stood in for the source.
    assert "repaired" in res.reference


def test_source_that_onnxruntime_runs_is_the_gate_reference(tmp_path: Path):
    res = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL)
    assert res.reference == "source model"
    assert not any("empty or duplicate" in r for r in res.repairs)


@pytest.mark.parametrize("tail", ["reshape", "flatten"])
def test_dynamic_batch_fixes_hard_coded_batch_and_runs_a_batch(tmp_path: Path, tail: str):
    src = tiny_model(tmp_path / "t.onnx", tail=tail)
    res = convert(src, tmp_path / "t11.onnx", input_spec=SMALL, dynamic_batch=True)
    assert res.dynamic_batch and res.batch_checked == 8 and res.worst_cosine >= 0.99999
    assert any(("Reshape" if tail == "reshape" else "Flatten") in r for r in res.repairs)
    model = _assert_clean_opset11(res.output, "data", "emb")
    assert onnxutil.dims(model.graph.input[0]) == ["batch", 3, 16, 16]
    assert onnxutil.dims(model.graph.output[0]) == ["batch", 8]
    x = _images(5)
    batched = OnnxModel(res.output, input_name="data", output_name="emb").run(x, batch=5)
    np.testing.assert_allclose(batched, _embed_each(src, x), rtol=1e-5, atol=1e-5)


def test_without_dynamic_batch_the_batch_stays_fixed(tmp_path: Path):
    res = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL, dynamic_batch=False)
    model = onnx.load(str(res.output))
    assert onnxutil.dims(model.graph.input[0]) == [1, 3, 16, 16]
    assert res.batch_checked == 0 and not res.dynamic_batch


def test_spatial0_with_per_activation_statistics_becomes_mul_add(tmp_path: Path):
    # Real spatial=0 semantics: statistics of shape (C, H, W). onnxruntime runs this form,
    # so the gate compares against the untouched source.
    src = tiny_model(tmp_path / "t.onnx", bn_stats_shape=(4, 16, 16), spatial=0)
    res = convert(src, tmp_path / "t11.onnx", input_spec=SMALL)
    assert res.reference == "source model" and res.worst_cosine >= 0.99999
    assert any("per-activation" in r for r in res.repairs)
    ops = collections.Counter(n.op_type for n in onnx.load(str(res.output)).graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 1


def test_gate_uses_faces_from_a_bin(tmp_path: Path):
    data = synthetic_bin(tmp_path / "faces.bin", pairs=3, size=(16, 16))
    res = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL, data=data, samples=4)
    assert res.sample_source == "faces.bin faces" and res.samples == 4 and res.worst_cosine >= 0.99999
    # A set smaller than the request gives all its images.
    res = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL, data=data, samples=50)
    assert res.samples == 6


# --- export quirks (pipeline.stages.repairs) ------------------------------------------------


def _dq_probe(x: np.ndarray, x_type: int, scale: np.ndarray, zp: np.ndarray | None, opset: int, **attrs) -> np.ndarray:
    """What onnxruntime computes for one DequantizeLinear on constant inputs."""
    inits = [helper.make_tensor("x", x_type, list(x.shape), x.flatten().tolist()), numpy_helper.from_array(scale, "s")]
    ins = ["x", "s"]
    if zp is not None:
        inits.append(helper.make_tensor("z", x_type, list(zp.shape), zp.flatten().tolist()))
        ins.append("z")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ins, ["y"], **attrs)], "dq", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 7
    return session_run_constant(model)


def session_run_constant(model: onnx.ModelProto) -> np.ndarray:
    from pipeline.runtime.session import session

    return session(model, optimization="disabled").run(None, {})[0]


@pytest.mark.parametrize(
    "x_type, lo, hi, opset, scale_shape, attrs",
    [
        (TensorProto.UINT8, 0, 256, 13, (), {}),
        (TensorProto.INT8, -128, 128, 13, (5,), {"axis": -2}),
        (TensorProto.INT32, -(2**20), 2**20, 13, (3,), {"axis": 0}),
        (TensorProto.INT4, -8, 8, 21, (3, 2, 4), {"axis": 1, "block_size": 3}),
        (TensorProto.UINT8, 0, 256, 21, (2, 5, 4), {"axis": 0, "block_size": 2}),
    ],
)
def test_dequantize_matches_onnxruntime_bit_for_bit(x_type, lo, hi, opset, scale_shape, attrs):
    from pipeline.stages.repairs import dequantize

    rng = np.random.default_rng(3)
    x = rng.integers(lo, hi, (3, 5, 4))
    scale = rng.uniform(1e-3, 0.3, scale_shape).astype(np.float32)
    zp = None if x_type == TensorProto.INT32 else rng.integers(lo, hi, scale_shape)
    want = _dq_probe(x, x_type, scale, zp, opset, **attrs)
    got = dequantize(x, scale, zp, axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_dequantize_nodes_reading_activations_or_float8_stay(tmp_path: Path):
    from pipeline.stages.repairs import fold_weight_dequantize

    inits = [
        helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [2], [1.5, 2.0]),
        numpy_helper.from_array(np.array(0.5, np.float32), "s"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s"], ["act"], name="activation"),
        helper.make_node("DequantizeLinear", ["f8", "s"], ["w"], name="float8"),
        helper.make_node("Add", ["act", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert fold_weight_dequantize(model) == []
    assert [n.name for n in model.graph.node if n.op_type == "DequantizeLinear"] == ["activation", "float8"]


def test_inputs_read_only_inside_a_subgraph_are_kept():
    from pipeline.stages.repairs import repair_graph_inputs

    then = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["cond_f"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])]
    )
    graph = helper.make_graph(
        [helper.make_node("Cast", ["c"], ["cond_f"], to=TensorProto.FLOAT), helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info(n, t, [1]) for n, t in (("c", TensorProto.BOOL), ("outer", TensorProto.FLOAT), ("spare", TensorProto.FLOAT))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert repair_graph_inputs(model) == ["graph input 'spare' is read by no node: removed from the graph inputs"]
    assert [i.name for i in model.graph.input] == ["c", "outer"]


def test_clean_opset11_model_has_nothing_repaired(tmp_path: Path):
    from pipeline.stages.repairs import drop_stale_value_info, fold_weight_dequantize, repair_graph_inputs

    first = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL)
    model = onnx.load(str(first.output))
    assert repair_graph_inputs(model) == [] and drop_stale_value_info(model) == [] and fold_weight_dequantize(model) == []
    again = convert(first.output, tmp_path / "copy.onnx", input_spec=SMALL)
    assert again.copied and again.repairs == ["already at opset 11 (target 11): not converted"]


def test_stale_output_shape_gets_the_inferred_one(tmp_path: Path):
    first = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL)
    model = onnx.load(str(first.output))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 15]))
    onnx.save(model, str(tmp_path / "stale.onnx"))
    res = convert(tmp_path / "stale.onnx", tmp_path / "fixed.onnx", input_spec=SMALL)
    assert not res.copied
    assert any("gave 1 graph output(s) their inferred shape (e.g. 'emb' recorded ['batch', 15], inferred ['batch', 8])" in r for r in res.repairs)
    fixed = onnx.load(str(res.output))
    onnx.checker.check_model(fixed, full_check=True)
    assert onnxutil.dims(fixed.graph.output[0]) == ["batch", 8]


def test_a_batch_dependent_export_suggests_a_static_batch(tmp_path: Path):
    # Reshape with allowzero and -1 cannot be told to copy the batch.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["data", "shape"], ["emb"], name="fold", allowzero=1)],
        "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 768])],
        initializer=[numpy_helper.from_array(np.array([1, -1], np.int64), "shape")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(src))
    with pytest.raises(UserError, match="--static-batch"):
        convert(src, tmp_path / "o.onnx", input_spec=SMALL)
    assert convert(src, tmp_path / "o.onnx", input_spec=SMALL, dynamic_batch=False).copied


def test_cli_convert_makes_a_dynamic_batch_by_default_and_a_static_one_when_asked(tmp_path: Path):
    # No recipe: the recipe's defaults (112x112 input, convert.dynamic_batch true) apply.
    src = tmp_path / "m.onnx"
    face_model(src, size=(112, 112), width=2, dynamic_batch=False)
    for flag, want in (([], "batch"), (["--static-batch"], 1)):
        out = tmp_path / f"o{len(flag)}.onnx"
        r = CliRunner().invoke(app, ["convert", "--model", str(src), "--out", str(out), "--samples", "2", "-q", *flag])
        assert r.exit_code == 0, r.output
        assert onnxutil.dims(onnx.load(str(out)).graph.input[0])[0] == want


# --- already converted --------------------------------------------------------------------


def test_model_at_or_above_target_opset_is_copied_unchanged(tmp_path: Path):
    first = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL)
    for target in (11, 9):
        res = convert(first.output, tmp_path / f"copy{target}.onnx", input_spec=SMALL, opset=target)
        assert res.copied and res.opset_from == res.opset_to == 11
        assert "already at opset 11" in res.repairs[0]
        assert res.output.read_bytes() == first.output.read_bytes()
        assert res.worst_cosine >= 0.99999


def test_converted_fixed_batch_model_gets_only_a_dynamic_batch(tmp_path: Path):
    first = convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "t11.onnx", input_spec=SMALL, dynamic_batch=False)
    res = convert(first.output, tmp_path / "dyn.onnx", input_spec=SMALL, dynamic_batch=True)
    assert not res.copied and res.batch_checked == 8 and res.opset_to == 11
    assert onnxutil.dims(onnx.load(str(res.output)).graph.input[0])[0] == "batch"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [0, 99])
def test_target_opset_the_converter_does_not_know_is_a_user_error(tmp_path: Path, opset: int):
    with pytest.raises(UserError, match="opset"):
        convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "out.onnx", input_spec=SMALL, opset=opset)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"", "empty"), (b"this is not a model\n" * 20, "ONNX"), ("truncated", "ONNX")],
)
def test_missing_empty_non_onnx_and_truncated_files_are_user_errors(tmp_path: Path, content, message):
    src = tmp_path / "model.onnx"
    if content == "truncated":
        full = tiny_model(tmp_path / "full.onnx").read_bytes()
        src.write_bytes(full[: len(full) // 2])
    elif content is not None:
        src.write_bytes(content)
    with pytest.raises(UserError, match=message):
        convert(src, tmp_path / "out.onnx", input_spec=SMALL)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("shape", [[1, 1, 16, 16], [1, 3, 16], [1, 3, 32, 32]])
def test_model_input_that_is_not_3xHxW_of_the_recipe_size_is_a_user_error(tmp_path: Path, shape):
    src = tmp_path / "bad.onnx"
    # Build a valid graph around the odd input by giving Sub a broadcastable constant only.
    nodes = [helper.make_node("Relu", ["data"], ["emb"], name="r")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("emb", TensorProto.FLOAT, shape)]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)]), str(src))
    with pytest.raises(UserError, match="data"):
        convert(src, tmp_path / "out.onnx", input_spec=SMALL)


def test_input_name_the_model_lacks_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="no input named 'image'"):
        convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "o.onnx", input_spec=InputSpec(size=[16, 16], name="image"))


def test_node_the_converter_rejects_is_named_with_its_op(tmp_path: Path):
    src = tmp_path / "old.onnx"
    shape = [1, 3, 16, 16]
    nodes = [
        helper.make_node("Relu", ["data"], ["h"], name="relu"),
        helper.make_node("Dropout", ["h"], ["emb"], name="train_dropout", is_test=0),  # opset 6 training mode
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("emb", TensorProto.FLOAT, shape)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    onnx.save(model, str(src))
    with pytest.raises(UserError, match=r"node 'train_dropout' \(op Dropout\).*is_test"):
        convert(src, tmp_path / "out.onnx", input_spec=SMALL)


def test_spatial0_with_non_constant_statistics_is_a_user_error_naming_the_node(tmp_path: Path):
    src = tiny_model(tmp_path / "t.onnx", spatial=0)
    model = onnx.load(str(src))
    # Feed the BN mean from outside the graph: it is no longer a constant.
    keep = [t for t in model.graph.initializer if t.name != "mu"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    assert model.graph.node[3].name == "bn"
    onnx.save(model, str(src))
    with pytest.raises(UserError, match="'bn'"):
        convert(src, tmp_path / "out.onnx", input_spec=SMALL)


def test_failed_gate_raises_and_leaves_the_previous_output_untouched(tmp_path: Path, monkeypatch):
    real_finish = convert_mod._finish

    def broken_finish(model, **kw):
        out = real_finish(model, **kw)
        w = next(t for t in out.graph.initializer if t.name == "w2")
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), "w2"))  # a conversion bug
        return out

    monkeypatch.setattr(convert_mod, "_finish", broken_finish)
    dst = tmp_path / "t11.onnx"
    dst.write_bytes(b"previous")
    with pytest.raises(UserError, match="equivalence gate failed: worst embedding cosine"):
        convert(tiny_model(tmp_path / "t.onnx"), dst, input_spec=SMALL)
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_impossible_min_cosine_fails_the_gate(tmp_path: Path):
    with pytest.raises(UserError, match="equivalence gate failed"):
        convert(tiny_model(tmp_path / "t.onnx"), tmp_path / "o.onnx", input_spec=SMALL, min_cosine=1.5)
    assert not (tmp_path / "o.onnx").exists()


# --- command line ---------------------------------------------------------------------------


def _write_recipe(tmp_path: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel:\n  urls: [t.onnx]\n  input: {size: [16, 16]}\nconvert: {dynamic_batch: false}\n")
    return p


def test_cli_convert_prints_worst_cosine_and_exits_0(tmp_path: Path):
    src = tiny_model(tmp_path / "t.onnx")
    r = CliRunner().invoke(app, ["convert", "--model", str(src), "--out", str(tmp_path / "o.onnx"), "--recipe", str(_write_recipe(tmp_path)), "-q"])
    assert r.exit_code == 0, r.output
    assert "worst cosine 1.0000000" in r.output and "opset 8 -> 11" in r.output
    assert (tmp_path / "o.onnx").exists()


def test_cli_convert_user_errors_exit_2_with_one_line(tmp_path: Path):
    r = CliRunner().invoke(app, ["convert", "--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "o.onnx"), "-q"])
    assert r.exit_code == 2
    assert "not found" in r.output and "Traceback" not in r.output
    src = tiny_model(tmp_path / "t.onnx")
    r = CliRunner().invoke(app, ["convert", "--model", str(src), "--out", str(tmp_path / "o.onnx"), "--opset", "99", "-q"])
    assert r.exit_code == 2 and "opset 99" in r.output


def test_cli_synth_model_writes_the_model_and_rejects_unknown_depth(tmp_path: Path):
    r = CliRunner().invoke(app, ["synth-model", "--depth", "18", "--out", str(tmp_path / "r18.onnx"), "--spatial0", "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "depth 18" in r.output and "24,040,322 parameters" in r.output
    model = onnx.load(str(tmp_path / "r18.onnx"))
    assert {a.i for n in model.graph.node for a in n.attribute if a.name == "spatial"} == {0}
    r = CliRunner().invoke(app, ["synth-model", "--depth", "34", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and not (tmp_path / "x.onnx").exists()


# --- the real model (../shared) ----------------------------------------------------------------
#
# real_converted (tests/conftest.py): convert(shared model, data=lfw.bin, samples=16), made once for every test file.


def test_real_mobilefacenet_converts_with_worst_cosine_on_real_faces(real_converted):
    res = real_converted
    assert res.sample_source == "lfw.bin faces" and res.samples == 16
    assert res.worst_cosine >= 0.99999, res.worst_cosine
    assert res.batch_checked == 8
    model = _assert_clean_opset11(res.output, "data", "fc1")
    assert onnxutil.dims(model.graph.output[0]) == ["batch", 128]


def test_converted_real_model_goes_through_inc_static_quantization(real_converted, shared_lfw, tmp_path: Path, monkeypatch):
    from neural_compressor import PostTrainingQuantConfig
    from neural_compressor.quantization import fit

    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    monkeypatch.chdir(tmp_path)  # INC writes nc_workspace/ into the working directory
    faces = preprocess(read_bin(shared_lfw).decode_many(range(0, 16, 2)), InputSpec())

    class Calib:
        batch_size = 1

        def __iter__(self):
            for i in range(len(faces)):
                yield faces[i : i + 1], 0

    q = fit(onnx.load(str(real_converted.output)), PostTrainingQuantConfig(approach="static"), calib_dataloader=Calib())
    assert q is not None, "INC returned no quantized model"
    ops = collections.Counter(n.op_type for n in q.model.graph.node)
    assert ops["QLinearConv"] > 0
    emb = OnnxModel(q.model, input_name="data", output_name="fc1").run(faces[:2])
    assert emb.shape == (2, 128) and np.isfinite(emb).all()
