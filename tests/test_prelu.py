"""PRelu rewrites: the same function on random tensors, on a small PRelu network and on a real one; int8-ready forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.stages.prelu import DEFAULT_FORM, FORMS, INT8_FORMS, channel_slopes, count_prelu, rewrite_prelu

SHARED_PRELU = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mobilefacenet512-prelu-opset9.onnx"


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(outputs, {s.get_inputs()[0].name: x})


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _one_prelu(slope: np.ndarray, c: int = 6, opset: int = 11) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"], name="p")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c, 5, 7])],
        initializer=[numpy_helper.from_array(slope.astype(np.float32), "slope")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


SLOPES = {
    "negative and above one": np.array([-25.0, -0.5, 0.0, 0.25, 1.0, 21.0]).reshape(6, 1, 1),
    "all in [0, 1)": np.array([0.0, 0.1, 0.2, 0.5, 0.7, 0.99]).reshape(6, 1, 1),
    "(1, C, 1, 1)": np.array([-1.0, 2.0, 0.3, 0.3, -0.1, 0.9]).reshape(1, 6, 1, 1),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("slopes", list(SLOPES), ids=list(SLOPES))
def test_every_form_is_prelu_on_random_tensors(form: str, slopes: str) -> None:
    src = _one_prelu(SLOPES[slopes])
    rng = np.random.default_rng(0)
    # Wide range, exact zeros and values a few ulps around zero: the sign switch is where forms go wrong.
    x = (rng.standard_normal((3, 6, 5, 7)) * rng.choice([1e-3, 1.0, 1e3], size=(3, 6, 5, 7))).astype(np.float32)
    x[0, :, 0, :3] = [0.0, 1e-38, -1e-38]
    want = _run(src, x)[0]
    m = _copy(src)
    rep = rewrite_prelu(m, form)
    onnx.checker.check_model(m, full_check=True)
    assert count_prelu(m) == 0 and rep.rewritten == ["p"] and not rep.kept
    got = _run(m, x)[0]
    if form == "dwconv-min":
        np.testing.assert_array_equal(got, want)  # one product plus an exact zero
    else:
        # a*x + (1-a)*x for x > 0 rounds twice: within a couple of ulps of the larger term.
        scale = np.maximum(np.abs(x), np.abs(want)) * np.maximum(1.0, np.abs(SLOPES[slopes]).reshape(1, 6, 1, 1))
        assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * scale + 1e-37)
    assert rep.slopes_negative == int((SLOPES[slopes] < 0).sum())
    assert rep.slopes_above_one == int((SLOPES[slopes] > 1).sum())


def test_a_sign_branch_only_when_a_slope_exceeds_one() -> None:
    above = _copy(_one_prelu(SLOPES["negative and above one"]))
    below = _copy(_one_prelu(SLOPES["all in [0, 1)"]))
    rewrite_prelu(above, "dwconv-pair")
    rewrite_prelu(below, "dwconv-pair")
    assert [n.op_type for n in below.graph.node].count("Conv") == 2
    assert [n.op_type for n in above.graph.node].count("Conv") == 3


@pytest.mark.parametrize("slope", [np.full((6, 1, 1), 0.25), np.array([0.25]), np.array(-3.0)], ids=["equal", "one", "scalar"])
def test_one_slope_becomes_an_exact_leaky_relu(slope: np.ndarray) -> None:
    src = _one_prelu(slope)
    m = _copy(src)
    rep = rewrite_prelu(m)
    assert [n.op_type for n in m.graph.node] == ["LeakyRelu"] and rep.leaky == ["p"]
    assert not m.graph.initializer  # the slope is gone with its node
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(_run(m, x)[0], _run(src, x)[0])


def test_slopes_that_are_not_per_channel_or_not_constant_are_kept() -> None:
    along_w = _one_prelu(np.linspace(-1, 1, 7))  # (W,): broadcasts along the last axis, not the channels
    m = _copy(along_w)
    rep = rewrite_prelu(m)
    assert count_prelu(m) == 1 and "p" in rep.kept and rep.changed == 0
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "s"], ["y"], name="p")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 5, 7]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [6, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 7])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    rep = rewrite_prelu(m)
    assert count_prelu(m) == 1 and rep.kept == {"p": "slope is not a constant"}


def test_channel_slopes_follow_onnx_broadcasting() -> None:
    assert channel_slopes(np.ones((4, 1, 1)), 4).shape == (4,)
    assert channel_slopes(np.ones((1, 4, 1, 1)), 4).shape == (4,)
    assert channel_slopes(np.ones(4), 4) is None  # along W
    assert channel_slopes(np.ones(4), 2).shape == (4,)  # (N, C): the last axis is the channel axis
    assert channel_slopes(np.ones((4, 1, 1)), None) is None
    assert channel_slopes(np.ones((1, 1, 1, 1, 1)), 4) is None  # would add an axis


def prelu_network(seed: int = 0) -> onnx.ModelProto:
    """Conv -> PRelu -> depthwise Conv -> PRelu -> Conv -> PRelu (shared with a residual Add) -> GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def slopes(c: int) -> np.ndarray:
        # As in real face networks: a third negative, a few above 1.
        a = rng.uniform(-0.8, 0.6, c)
        a[:2] = [1.7, -4.0]
        return a.reshape(c, 1, 1)

    c = 8
    nodes = [
        helper.make_node("Conv", ["x", const("w1", rng.normal(0, 0.3, (c, 3, 3, 3))), const("b1", rng.normal(0, 0.1, c))], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("PRelu", ["c1", const("a1", slopes(c))], ["p1"], name="prelu1"),
        helper.make_node("Conv", ["p1", const("w2", rng.normal(0, 0.5, (c, 1, 3, 3))), const("b2", rng.normal(0, 0.1, c))], ["c2"], name="dw2", group=c, pads=[1] * 4),
        helper.make_node("PRelu", ["c2", const("a2", slopes(c))], ["p2"], name="prelu2"),
        helper.make_node("Conv", ["p2", const("w3", rng.normal(0, 0.3, (c, c, 1, 1)))], ["c3"], name="pw3"),
        helper.make_node("PRelu", ["c3", const("a3", slopes(c))], ["p3"], name="prelu3"),
        helper.make_node("Add", ["p3", "p1"], ["r"], name="residual"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes, "prelu_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("form", FORMS)
def test_every_form_keeps_a_prelu_network_function(form: str) -> None:
    src = prelu_network()
    x = np.random.default_rng(2).standard_normal((4, 3, 12, 12)).astype(np.float32) * 3
    names = ["p1", "p2", "p3", "y"]
    src.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names[:-1])
    want = _run(src, x, names)
    m = _copy(src)
    rep = rewrite_prelu(m, form)
    assert count_prelu(m) == 0 and sorted(rep.rewritten) == ["prelu1", "prelu2", "prelu3"]
    # Only the depthwise Conv is folded, and only in fold-pair; it is gone, its two scaled copies replace it.
    assert rep.folded == (["prelu2"] if form == "fold-pair" else [])
    assert ("dw2" in {n.name for n in m.graph.node}) == (form != "fold-pair")
    got = _run(m, x, names)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("form", INT8_FORMS)
def test_int8_forms_give_every_relu_a_producer_of_its_own(form: str) -> None:
    # Quantizers drop a Relu by narrowing its producer's output range; a producer read by anything
    # else would then feed that reader clipped values, and the Relu would become identity.
    m = prelu_network()
    rewrite_prelu(m, form)
    readers: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    relus = [n for n in m.graph.node if n.op_type == "Relu"]
    assert relus and all(readers[r.input[0]] == 1 for r in relus)
    assert not {n.op_type for n in m.graph.node} & {"Min", "PRelu", "Neg", "Sub"}


def test_the_default_form_is_one_int8_can_run() -> None:
    assert DEFAULT_FORM in INT8_FORMS


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown PRelu form"):
        rewrite_prelu(prelu_network(), "nope")


def test_convert_rewrites_prelu_behind_its_switch_and_gates_it(tmp_path: Path) -> None:
    from pipeline.stages.convert import convert
    from tests.synthdata import face_model

    src = tmp_path / "src.onnx"
    face_model(src, size=(32, 32), opset=8, ir_version=4)
    from pipeline.recipe import InputSpec

    spec = InputSpec(size=[32, 32])
    kept = convert(src, tmp_path / "keep.onnx", input_spec=spec, prelu="keep")
    done = convert(src, tmp_path / "rewrite.onnx", input_spec=spec, prelu="rewrite")
    assert count_prelu(onnx.load(str(tmp_path / "keep.onnx"))) == 3 and kept.prelu == {}
    out = onnx.load(str(tmp_path / "rewrite.onnx"))
    assert count_prelu(out) == 0 and done.prelu["rewritten"] == 3 and done.worst_cosine >= 0.99999
    assert any("PRelu" in r for r in done.repairs)


def test_convert_rewrites_a_model_already_at_the_target_opset(tmp_path: Path) -> None:
    from pipeline.recipe import InputSpec
    from pipeline.stages.convert import convert

    src = tmp_path / "net.onnx"
    onnx.save(prelu_network(), str(src))
    spec = InputSpec(size=[12, 12])
    res = convert(src, tmp_path / "out.onnx", input_spec=spec, prelu="rewrite")
    assert not res.copied and res.prelu["rewritten"] == 3
    assert count_prelu(onnx.load(str(tmp_path / "out.onnx"))) == 0
    res = convert(src, tmp_path / "same.onnx", input_spec=spec, prelu="keep")
    assert res.copied


def test_recipe_switch_defaults_to_rewrite_and_refuses_other_values() -> None:
    from pipeline.core.errors import UserError
    from pipeline.recipe import default_recipe, with_overrides

    assert default_recipe().convert.prelu == "rewrite"
    with pytest.raises(UserError, match="convert.prelu"):
        with_overrides(default_recipe(), {"convert.prelu": "fast"})


def _real_inputs(n: int) -> np.ndarray:
    lfw = SHARED_PRELU.parents[1] / "data" / "lfw.bin"
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess
    from pipeline.recipe import InputSpec

    spec = InputSpec(scale="mean_std", mean=[127, 127, 127], std=[128, 128, 128])
    return preprocess(read_bin(lfw).decode_many(np.arange(0, 40 * n, 40)), spec)


@pytest.mark.parametrize("form", ["dwconv-min", DEFAULT_FORM, "fold-pair"])
def test_real_prelu_network_activations_are_kept(form: str) -> None:
    if not SHARED_PRELU.exists():
        pytest.skip(f"real material not present: {SHARED_PRELU} (../shared is absent in a fresh clone; CI has it)")
    src = onnx.load(str(SHARED_PRELU))
    names = [n.output[0] for n in src.graph.node if n.op_type == "PRelu"] + [src.graph.output[0].name]
    for name in names[:-1]:
        src.graph.output.append(helper.make_empty_tensor_value_info(name))
    x = _real_inputs(3)
    m = _copy(src)
    rep = rewrite_prelu(m, form)
    assert rep.changed == 33 and rep.slopes_negative > 0 and not rep.kept
    worst = 0.0
    for i in range(len(x)):  # the export has a fixed batch of 1
        want, got = _run(src, x[i : i + 1], names), _run(m, x[i : i + 1], names)
        worst = max([worst] + [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want)])
    if form == "dwconv-min":
        assert worst == 0.0
    else:
        assert worst < 1e-5


# --- quantize: PRelu still in the model is expressed in int8 ops before quantizing -----------------------


@pytest.fixture(scope="module")
def unrewritten(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted PRelu face model that kept its PRelu (convert.prelu: keep, or converted elsewhere), and pairs."""
    from tests.synthdata import face_model, synthetic_bin

    d = tmp_path_factory.mktemp("prelu-quantize")
    model = d / "fp32.onnx"
    face_model(model, size=(32, 32))
    assert count_prelu(onnx.load(str(model))) > 1
    return {"model": model, "bin": synthetic_bin(d / "pairs.bin", pairs=20, size=(32, 32))}


def _quantize(material: dict[str, Path], out: Path, **overrides: object):
    from pipeline.recipe import default_recipe, with_overrides
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize

    r = with_overrides(default_recipe(), {"model.input.size": [32, 32], "calibration.samples": 8, **overrides})
    return quantize(Int8Job.from_recipe(r, model=material["model"], calib=material["bin"], out=out))


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("engine", ["inc", "ort"])
def test_quantize_leaves_no_prelu_in_fp32(tmp_path: Path, unrewritten: dict[str, Path], engine: str) -> None:
    prelus = count_prelu(onnx.load(str(unrewritten["model"])))
    res = _quantize(unrewritten, tmp_path / "int8.onnx", **{"quantization.engine": engine})
    assert "PRelu" not in _op_types(res.output) and "PRelu" not in res.op_counts.get("fp32", {})
    assert res.op_counts["int8"].get("Conv", 0) > 0
    assert res.prelu is not None and res.prelu["rewritten"] + res.prelu["leaky_relu"] == prelus
    assert res.prelu["form"] == DEFAULT_FORM and res.prelu["worst_cosine"] >= 0.99999 and res.prelu["faces"] == 8
    assert res.manifest_body()["prelu"] == res.prelu
    assert res.summary()[0].startswith(f"PRelu: {prelus} PRelu -> {DEFAULT_FORM} form")
    # The source file is untouched and nothing but the model is left beside it.
    assert count_prelu(onnx.load(str(unrewritten["model"]))) == prelus
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]


def test_quantize_keeps_prelu_when_the_recipe_says_so(tmp_path: Path, unrewritten: dict[str, Path]) -> None:
    res = _quantize(unrewritten, tmp_path / "int8.onnx", **{"quantization.engine": "ort", "quantization.prelu": "keep"})
    assert "PRelu" in _op_types(res.output) and res.prelu is None and res.manifest_body()["prelu"] is None
    res = _quantize(unrewritten, tmp_path / "int8-b.onnx", **{"quantization.engine": "ort", "quantization.op_types_to_exclude": ["PRelu"]})
    assert "PRelu" in _op_types(res.output) and res.prelu is None


def test_a_prelu_named_in_the_exclusions_stays(tmp_path: Path, unrewritten: dict[str, Path]) -> None:
    names = [n.name for n in onnx.load(str(unrewritten["model"])).graph.node if n.op_type == "PRelu"]
    res = _quantize(unrewritten, tmp_path / "int8.onnx", **{"quantization.engine": "ort", "quantization.nodes_to_exclude": [names[0]]})
    kept = [n.name for n in onnx.load(str(res.output)).graph.node if n.op_type == "PRelu"]
    assert kept == [names[0]]
    assert res.prelu["kept"] == {names[0]: "excluded by name"}
    assert res.prelu["rewritten"] + res.prelu["leaky_relu"] == len(names) - 1


def test_cli_quantize_prints_the_rewrite_and_a_wrong_rewrite_stops_with_exit_2(tmp_path: Path, unrewritten: dict[str, Path], monkeypatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.app import app
    from pipeline.stages.quantize import stage

    import json

    from pipeline.recipe import default_recipe, with_overrides

    recipe = tmp_path / "r.yaml"
    r = with_overrides(default_recipe(), {"model.input.size": [32, 32], "calibration.samples": 8, "quantization.engine": "ort"})
    recipe.write_text(json.dumps(r.resolved()))
    args = ["quantize", "--recipe", str(recipe), "--model", str(unrewritten["model"]), "--calib", str(unrewritten["bin"])]
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a" / "int8.onnx")])
    assert ok.exit_code == 0, ok.output
    assert f"PRelu: {count_prelu(onnx.load(str(unrewritten['model'])))} PRelu -> {DEFAULT_FORM} form" in ok.output
    kept = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b" / "int8.onnx"), "--prelu", "keep"])
    assert kept.exit_code == 0 and "PRelu:" not in kept.output and "PRelu" in _op_types(tmp_path / "b" / "int8.onnx")

    real = stage.rewrite_prelu

    def wrong(model: onnx.ModelProto, form: str, **kw):  # a rewrite that does not compute PRelu
        done = real(model, form, **kw)
        for t in model.graph.initializer:
            if t.name.endswith("_lin_w"):
                t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
        return done

    monkeypatch.setattr(stage, "rewrite_prelu", wrong)
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c" / "int8.onnx")])
    assert bad.exit_code == 2 and "the PRelu rewrite changed the embeddings" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d" / "int8.onnx"), "--prelu", "fast"]).exit_code == 2


def test_an_excluded_conv_feeding_a_prelu_is_not_folded_away(tmp_path: Path) -> None:
    from pipeline.recipe import default_recipe, with_overrides
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize
    from tests.synthdata import synthetic_bin

    model = tmp_path / "net.onnx"
    onnx.save(prelu_network(), str(model))
    m = prelu_network()
    assert rewrite_prelu(m).folded == ["prelu2"]  # dw2 folds into prelu2's branches unless excluded
    m = prelu_network()
    assert rewrite_prelu(m, exclude={"dw2"}).folded == [] and "dw2" in {n.name for n in m.graph.node}
    r = with_overrides(default_recipe(), {"model.input.size": [12, 12], "calibration.samples": 8, "quantization.engine": "ort",
                                          "quantization.nodes_to_exclude": ["dw2"]})
    calib = synthetic_bin(tmp_path / "p.bin", pairs=8, size=(12, 12))
    res = quantize(Int8Job.from_recipe(r, model=model, calib=calib, out=tmp_path / "q" / "int8.onnx"))
    q = onnx.load(str(res.output))
    assert [n.op_type for n in q.graph.node if n.name == "dw2"] == ["Conv"]  # kept, in fp32
    assert "PRelu" not in {n.op_type for n in q.graph.node} and res.prelu["folded"] == 0 and res.prelu["rewritten"] == 3
