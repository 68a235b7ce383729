"""The synthetic LResNet-IR stand-in: the Zoo model's structure, sizes and sane activations."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.runtime import graph as onnxutil
from pipeline.runtime.session import OnnxModel
from pipeline.core.errors import UserError
from pipeline.stages.synth import UNITS, build_model, synth_model

ZOO_OPS = {"Sub", "Mul", "Conv", "BatchNormalization", "PRelu", "Add", "Dropout", "Flatten", "Gemm"}


def _embed(path_or_model, n: int = 4, seed: int = 1) -> np.ndarray:
    model = OnnxModel(path_or_model, input_name="data", output_name="fc1")
    x = np.random.default_rng(seed).integers(0, 256, (n, 3, 112, 112)).astype(np.float32)
    return model.run(x)


def _spatial(model: onnx.ModelProto) -> set[int]:
    return {a.i for n in model.graph.node if n.op_type == "BatchNormalization" for a in n.attribute if a.name == "spatial"}


def test_written_model_has_the_zoo_op_mix_io_and_opset8_layout(tmp_path: Path):
    res = synth_model(tmp_path / "r18.onnx", depth=18, seed=3)
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model)
    assert res.bytes == res.path.stat().st_size and res.depth == 18 and res.seed == 3
    assert {n.op_type for n in model.graph.node} == ZOO_OPS
    assert model.ir_version == 3 and onnxutil.model_opset(model) == 8
    # Old exports list every initializer as a graph input as well.
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
    inp = onnxutil.graph_inputs(model)
    assert [i.name for i in inp] == ["data"] and onnxutil.dims(inp[0]) == [1, 3, 112, 112]
    assert [o.name for o in model.graph.output] == ["fc1"] and onnxutil.dims(model.graph.output[0]) == [1, 512]
    # The embedding is the final BatchNormalization, named fc1 as in the Zoo model.
    assert model.graph.node[-1].op_type == "BatchNormalization" and model.graph.node[-1].output[0] == "fc1"
    assert _spatial(model) == {1}
    assert res.parameters == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert not list(tmp_path.glob("*.part")), "no temporary file left behind"


@pytest.mark.parametrize("depth", sorted(UNITS))
def test_residual_unit_counts_follow_insightface(depth: int):
    model, _ = build_model(depth=depth, width=8)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    assert counts["Add"] == sum(UNITS[depth])
    # Per unit: bn1, bn2, bn3 (+ shortcut BN on the first unit of each stage); plus bn0, bn1 and fc1.
    assert counts["BatchNormalization"] == 3 * sum(UNITS[depth]) + 4 + 3
    assert counts["Conv"] == 2 * sum(UNITS[depth]) + 4 + 1


def test_depth100_has_the_zoo_models_size():
    _, parameters = build_model(depth=100)
    # The Model Zoo arcfaceresnet100-8: 65.2 M parameters, 261 MB.
    assert 64_500_000 < parameters < 66_000_000
    assert 255e6 < parameters * 4 < 265e6


def test_activations_stay_finite_and_embeddings_distinct_through_depth_50():
    model, _ = build_model(depth=50, width=16, seed=2)
    emb = _embed(model)
    assert np.isfinite(emb).all()
    norms = np.linalg.norm(emb, axis=1)
    # BN statistics match the activations, so each of the 512 outputs is about unit scale.
    assert np.all((norms > 5) & (norms < 100)), norms
    unit = emb / norms[:, None]
    off_diagonal = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.6, "different images must give clearly different embeddings"


@pytest.mark.slow
def test_full_width_depth100_embeddings_are_finite_and_distinct(tmp_path: Path):
    res = synth_model(tmp_path / "r100.onnx", depth=100)
    emb = _embed(res.path, n=3)
    assert np.isfinite(emb).all()
    norms = np.linalg.norm(emb, axis=1)
    assert np.all((norms > 5) & (norms < 100)), norms
    unit = emb / norms[:, None]
    assert np.abs((unit @ unit.T)[~np.eye(3, dtype=bool)]).max() < 0.6


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_model(depth=18, width=8, seed=5)
    b, _ = build_model(depth=18, width=8, seed=5)
    c, _ = build_model(depth=18, width=8, seed=6)
    assert a.SerializeToString() == b.SerializeToString()
    wa = numpy_helper.to_array(a.graph.initializer[2])
    wc = numpy_helper.to_array(c.graph.initializer[2])
    assert not np.array_equal(wa, wc)


def test_spatial0_variant_differs_from_its_twin_only_in_the_spatial_attribute():
    one, _ = build_model(depth=18, width=8, seed=4)
    zero, _ = build_model(depth=18, width=8, seed=4, spatial0=True)
    assert _spatial(one) == {1} and _spatial(zero) == {0}
    for t1, t0 in zip(one.graph.initializer, zero.graph.initializer, strict=True):
        assert t1.name == t0.name and t1.raw_data == t0.raw_data
    # Per-channel statistics: every BN's moving mean is (C,), the MXNet export form.
    inits = {t.name: t for t in zero.graph.initializer}
    for n in zero.graph.node:
        if n.op_type == "BatchNormalization":
            assert len(inits[n.input[3]].dims) == 1
    for n1, n0 in zip(one.graph.node, zero.graph.node, strict=True):
        n0_attrs = {a.name: a for a in n0.attribute if a.name != "spatial"}
        assert {a.name: a for a in n1.attribute if a.name != "spatial"} == n0_attrs


@pytest.mark.parametrize("kwargs", [{"depth": 34}, {"depth": 18, "embedding": 0}, {"depth": 18, "width": 0}])
def test_bad_options_are_user_errors(tmp_path: Path, kwargs):
    with pytest.raises(UserError):
        synth_model(tmp_path / "x.onnx", **kwargs)
    assert not list(tmp_path.iterdir())
