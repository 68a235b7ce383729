"""Cross-layer equalisation across the forms ``qpipe convert`` gives a PRelu (dwconv-pair, fold-pair):
the pair is found on the Add the PRelu becomes, rescaling it keeps the function and balances the
outlier channel, and a branch tensor read elsewhere blocks it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.accuracy.diagnose import analyse
from pipeline.accuracy.repairs import equivalence_check, plan_repairs
from pipeline.accuracy.rewrites import LinearPair, equalize_pair, find_linear_pair, range_ratio
from pipeline.recipe import default_recipe
from pipeline.runtime.session import session
from pipeline.stages.prelu import rewrite_prelu
from pipeline.stages.quantize.scheme import QuantScheme

C = 8  # channels of the PRelu
OUTLIER = 3  # its outlier channel
SIZE = 16
# Negative, zero, above-1 slopes: every case the rewrite has to handle; the outlier channel's slope is above 1.
SLOPES_ABOVE_ONE = np.array([-0.5, 0.25, 0.1, 1.5, -1.0, 0.3, 2.0, 0.0], np.float32)
SLOPES_BELOW_ONE = np.array([-0.5, 0.25, 0.1, 0.6, -1.0, 0.3, 0.9, 0.0], np.float32)
FORMS = [
    pytest.param("dwconv-pair", SLOPES_ABOVE_ONE, id="dwconv-pair-sign"),
    pytest.param("dwconv-pair", SLOPES_BELOW_ONE, id="dwconv-pair"),
    pytest.param("fold-pair", SLOPES_ABOVE_ONE, id="fold-pair-sign"),
    pytest.param("fold-pair", SLOPES_BELOW_ONE, id="fold-pair"),
]


def prelu_model(slopes: np.ndarray, *, outlier: float = 200.0, seed: int = 0) -> onnx.ModelProto:
    """data [N,3,16,16] -> stem (Conv + Relu) -> A (depthwise Conv) -> PRelu -> B (1x1 Conv) -> pool -> emb [N,16].

    Channel OUTLIER of A is ``outlier`` times larger and B's column for it as much smaller: the same
    function (PRelu commutes with a positive scale), but one channel sets the range of B's input.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    wa, ba = rng.normal(0, 0.4, (C, 1, 3, 3)), rng.normal(0, 0.1, C)
    wb, bb = rng.normal(0, np.sqrt(1 / C), (16, C, 1, 1)), rng.normal(0, 0.1, 16)
    wa[OUTLIER] *= outlier
    ba[OUTLIER] *= outlier
    wb[:, OUTLIER] /= outlier
    nodes = [
        helper.make_node("Mul", ["data", const("scale", np.full((1, 3, 1, 1), 1 / 128))], ["norm"], name="norm"),
        helper.make_node("Conv", ["norm", const("stem_w", rng.normal(0, 0.3, (C, 3, 3, 3))), const("stem_b", rng.normal(0, 0.1, C))],
                         ["stem_out"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem_out"], ["stem_relu"], name="stem_relu"),
        helper.make_node("Conv", ["stem_relu", const("A_w", wa), const("A_b", ba)], ["A_out"], name="A",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=C),
        helper.make_node("PRelu", ["A_out", const("slope", slopes.reshape(C, 1, 1))], ["act"], name="prelu"),
        helper.make_node("Conv", ["act", const("B_w", wb), const("B_b", bb)], ["B_out"], name="B", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["B_out"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["emb"], name="flatten", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "prelu_pair",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    return model


def rewritten(form: str, slopes: np.ndarray, **kw) -> onnx.ModelProto:
    m = prelu_model(slopes, **kw)
    rep = rewrite_prelu(m, form)
    assert rep.rewritten == ["prelu"] and not rep.kept
    assert (rep.folded == ["prelu"]) == (form == "fold-pair")
    assert not any(n.op_type == "PRelu" for n in m.graph.node)
    return m


def images(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, SIZE, SIZE)).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray, *names: str) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in names:
        if n not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    return session(probe).run(list(names), {"data": x})


def channel_range(t: np.ndarray) -> np.ndarray:
    axes = (0, 2, 3)
    return np.maximum(t.max(axis=axes), 0) - np.minimum(t.min(axis=axes), 0)


def nodes_by_name(m: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in m.graph.node}


def branch_ends(m: onnx.ModelProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """The Add that produces ``act`` and the producers of its two inputs."""
    producer = {o: n for n in m.graph.node for o in n.output}
    add = producer["act"]
    assert add.op_type == "Add"
    return add, [producer[t] for t in add.input]


@pytest.mark.parametrize("form,slopes", FORMS)
def test_pair_is_found_on_the_add_and_ends_at_the_convs_ending_each_branch(form: str, slopes: np.ndarray):
    m = rewritten(form, slopes)
    add, ends = branch_ends(m)
    pair = find_linear_pair(m, "act")
    assert pair is not None and pair.second == "B" and pair.tensor == "act" and pair.add == add.name
    lin, pos = ends
    assert lin.op_type == "Conv"
    sign = bool((slopes > 1).any())
    if sign:
        # The sign conv ends the Relu branch; the pos conv above its Relu is not scaled.
        assert pos.op_type == "Conv" and pair.firsts == (lin.name, pos.name) and pair.branch_activations == ()
        relu = next(n for n in m.graph.node if n.output[0] == pos.input[0])
        pos_conv = next(n for n in m.graph.node if n.output[0] == relu.input[0])
        assert relu.op_type == "Relu" and pos_conv.op_type == "Conv" and pos_conv.name not in pair.firsts
    else:
        assert pos.op_type == "Relu" and pair.branch_activations == (pos.name,)
        pos_conv = next(n for n in m.graph.node if n.output[0] == pos.input[0])
        assert pair.firsts == (lin.name, pos_conv.name)
    assert pair.nodes == [*pair.firsts, "B"] and pair.label == f"{pair.firsts[0]}+{pair.firsts[1]} -> B"
    # fold-pair: A itself is copied into the two branches (they read the stem); dwconv-pair: both read A.
    source = "stem_relu" if form == "fold-pair" else "A_out"
    assert lin.input[0] == source and pos_conv.input[0] == source
    assert ("A" in nodes_by_name(m)) == (form == "dwconv-pair")


@pytest.mark.parametrize("form,slopes", FORMS)
def test_equalising_across_the_add_keeps_the_function_and_balances_the_range(form: str, slopes: np.ndarray):
    m = rewritten(form, slopes)
    x = images()
    before, act = run(m, x, "emb", "act")
    r = channel_range(act)
    assert range_ratio(r) > 16 and int(np.argmax(r)) == OUTLIER
    pair = find_linear_pair(m, "act")
    assert pair is not None
    s = equalize_pair(m, pair, r)
    onnx.checker.check_model(m)
    after, act_after = run(m, x, "emb", "act")
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))
    # Channel c of the Add's output is divided by s[c], exactly as the scales say.
    np.testing.assert_allclose(channel_range(act_after), r / s, rtol=1e-5)
    assert int(np.argmax(s)) == OUTLIER and s[OUTLIER] > 8 * np.median(s)
    assert range_ratio(channel_range(act_after)) < range_ratio(r) / 8


def with_spy(base: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``base`` with ``tensor`` also read by an Identity whose output is a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.node.append(helper.make_node("Identity", [tensor], ["spy"], name="spy"))
    m.graph.output.append(helper.make_empty_tensor_value_info("spy"))
    return m


@pytest.mark.parametrize("form,slopes", FORMS)
def test_a_branch_tensor_read_by_another_node_blocks_the_pair(form: str, slopes: np.ndarray):
    base = rewritten(form, slopes)
    add, (lin, pos_end) = branch_ends(base)
    producer = {o: n for n in base.graph.node for o in n.output}
    sign = bool((slopes > 1).any())
    # The tensors from the Conv ending each branch to the Add: lin's output, and the sign conv's output or
    # the pos conv's output and its Relu's.
    branch = [lin.output[0], pos_end.output[0]] + ([] if sign else [pos_end.input[0]])
    assert find_linear_pair(base, "act") is not None
    for t in branch:
        assert find_linear_pair(with_spy(base, t), "act") is None, t
    # A branch tensor that is a graph output is read elsewhere too.
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.output.append(helper.make_empty_tensor_value_info(add.input[0]))
    assert find_linear_pair(m, "act") is None
    if sign:
        # Above the sign conv nothing is rescaled, so a reader of the Relu's output or the pos conv's is no obstacle.
        relu = producer[pos_end.input[0]]
        x = images(8)
        for t in (relu.output[0], relu.input[0]):
            m = with_spy(base, t)
            before, spy, act = run(m, x, "emb", "spy", "act")
            pair = find_linear_pair(m, "act")
            assert pair is not None
            equalize_pair(m, pair, channel_range(act))
            after, spy_after = run(m, x, "emb", "spy")
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))
            np.testing.assert_array_equal(spy_after, spy)


def test_an_add_of_a_branch_without_a_conv_is_no_pair():
    m = rewritten("dwconv-pair", SLOPES_BELOW_ONE)
    add, (lin, _) = branch_ends(m)
    # The lin branch made by a Mul instead of a Conv: its channels cannot be rescaled by a weight.
    lin.op_type = "Mul"
    del lin.attribute[:]
    assert find_linear_pair(m, "act") is None


def test_a_single_conv_pair_is_still_a_one_first_pair():
    m = prelu_model(SLOPES_ABOVE_ONE)
    pair = find_linear_pair(m, "act")
    assert pair == LinearPair(("A",), "B", "act", None, "prelu") == LinearPair("A", "B", "act", None, "prelu")
    assert pair.label == "A -> B" and pair.nodes == ["A", "B"]


@pytest.mark.parametrize("form", ["fold-pair", "dwconv-pair"])
def test_recovery_repairs_pick_equalisation_on_a_rewritten_model(form: str):
    m = rewritten(form, SLOPES_ABOVE_ONE)
    x = images(24)
    scheme = QuantScheme("inc", 255, 64, True, "wrap", prelu_form=form)
    an = analyse(m, x, scheme, input_name="data", output_name="emb")
    high = [f for f in an.findings if f.kind == "activation_outliers" and f.severity == "high"]
    assert "act" in {f.tensor for f in high}
    check = equivalence_check(m, x, input_name="data", output_name="emb")
    q = default_recipe().quantization.model_copy(update={"per_channel": True, "reduce_range": False, "calibration_method": "minmax"})
    repaired, repairs, notes = plan_repairs(m, an.findings, an.stats, scheme, q, check=check, min_cosine=0.99999)
    eq = [r for r in repairs if r.kind == "equalize"]
    pair = find_linear_pair(m, "act")
    assert pair is not None and len(eq) == 1 and eq[0].nodes == pair.nodes
    assert pair.label in eq[0].detail
    assert check(repaired) >= 0.99999
    after = run(repaired, x, "act")[0]
    assert range_ratio(channel_range(after)) < 4
    # The branch tensors into the Add are rescaled and balanced with the pair: not left to percentile calibration.
    for t in pair.scaled:
        assert not any(n.startswith(f"{t}: outlier channels but no linear pair") for n in notes), notes
    unpaired = [n.split(":")[0] for n in notes if "no linear pair" in n]
    if form == "fold-pair":
        # A is folded into the branches: no tensor is left outside the pair.
        assert unpaired == [] and "calibration_method" not in {r.kind for r in repairs}, notes
    else:
        # A's output feeds both 1x1 convs of the pair form: two readers, no pair of its own.
        assert unpaired == ["A_out"]
