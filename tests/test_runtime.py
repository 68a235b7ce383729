"""The onnxruntime session factory and the model wrapper: options, errors, batches the model accepts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.core.errors import UserError
from pipeline.data.bins import read_bin
from pipeline.eval.embeddings import embed_images, embed_pairs_with_info
from pipeline.recipe import InputSpec
from pipeline.runtime.session import OnnxModel, session
from tests.synthdata import face_model, synthetic_bin


def _mean_model(batch: int | str, size: int = 4) -> onnx.ModelProto:
    """(batch, 3, size, size) -> y (batch, 3): the mean of each channel, so every row's output is known;
    also r, the input through Relu (unchanged for pixels)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0), helper.make_node("Relu", ["x"], ["r"])]
    graph = helper.make_graph(
        nodes, "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3]), helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, 3, size, size])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def _rows(n: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 255, (n, 3, size, size)).astype(np.float32)


def test_a_fixed_batch_model_gets_only_full_batches_and_the_padding_is_dropped(monkeypatch):
    m = OnnxModel(_mean_model(3))
    assert not m.dynamic_batch and m.fixed_batch == 3 and m.step(16) == 3
    sizes: list[int] = []
    original = OnnxModel.__call__

    def counted(self, x, extra=None):
        sizes.append(len(x))
        return original(self, x, extra)

    monkeypatch.setattr(OnnxModel, "__call__", counted)
    x = _rows(7)
    y = m.run(x, batch=16)
    assert sizes == [3, 3, 3]  # 7 rows: two full batches and one padded with two zero rows
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-5)
    # Several tensors per pass (the range probe's form): the padding rows never reach the caller.
    parts = list(m.batches(x, 16, names=["y", "r"]))
    assert [k for k, _ in parts] == [3, 3, 1] and [v[1].shape[0] for _, v in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([v[1] for _, v in parts]), x)


def test_a_dynamic_batch_model_runs_the_requested_batch(monkeypatch):
    m = OnnxModel(_mean_model("batch"))
    assert m.dynamic_batch and m.fixed_batch is None
    sizes: list[int] = []
    original = OnnxModel.__call__

    def counted(self, x, extra=None):
        sizes.append(len(x))
        return original(self, x, extra)

    monkeypatch.setattr(OnnxModel, "__call__", counted)
    x = _rows(10)
    np.testing.assert_allclose(m.run(x, batch=4), x.mean(axis=(2, 3)), rtol=1e-5)
    assert sizes == [4, 4, 2]


def test_a_batch_one_model_embeds_whatever_batch_is_asked_for(tmp_path):
    fixed = face_model(tmp_path / "fixed.onnx", seed=0, dynamic_batch=False)
    dynamic = face_model(tmp_path / "dynamic.onnx", seed=0)
    assert fixed is not None and dynamic is not None
    b = read_bin(synthetic_bin(tmp_path / "pairs.bin", pairs=10, seed=1))
    spec = InputSpec(size=[32, 32])
    e_fixed, _ = embed_pairs_with_info(tmp_path / "fixed.onnx", b, input_spec=spec, batch=16)
    e_dyn, _ = embed_pairs_with_info(tmp_path / "dynamic.onnx", b, input_spec=spec, batch=16)
    np.testing.assert_allclose(e_fixed, e_dyn, atol=1e-6)
    # The image-level runner, as the photos commands use it: unit rows, all finite.
    emb, finite = embed_images(OnnxModel(tmp_path / "fixed.onnx"), b.decode_many(range(5)), spec, flip=True, batch=16)
    assert emb.shape == (5, 16) and finite.all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_session_options_follow_the_arguments():
    import onnxruntime as ort

    m = _mean_model("batch")
    opts = session(m, threads=1, optimization="basic").get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session(m, optimization="disabled").get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert OnnxModel(m).session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(UserError, match="thread count must be positive"):
        session(m, threads=0)


def test_a_rejected_model_is_a_one_line_user_error_naming_it(tmp_path):
    bad = _mean_model("batch")
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UserError) as e:
        session(bad, what="converted model")
    assert str(e.value.message).startswith("onnxruntime cannot load the converted model: ") and "\n" not in e.value.message
    with pytest.raises(UserError, match="model not found"):
        session(tmp_path / "missing.onnx")
    m = OnnxModel(_mean_model("batch"), what="probe")
    with pytest.raises(UserError, match="onnxruntime failed to run the probe on an input of shape"):
        m.run(np.zeros((2, 3, 5, 5, 1), np.float32))
