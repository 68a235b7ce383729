"""Models that quantize badly on purpose, for the diagnose and recover tests.

- :func:`make_twin`: a twin of the shared MobileFaceNet that computes the same
  function but fails a 0.1-point int8 gate with the recipe's defaults. Between ``conv96`` (the global depthwise 7x7 conv) and ``conv97``
  (the final 1x1 conv) there is only a BatchNormalization, so multiplying 8
  output channels of ``conv96`` (weights, ``conv96_bn_beta`` and the moving
  mean, which is zero in this export) by 64 and dividing the matching input
  channels of ``conv97`` by 64 leaves the function unchanged; its 2 weakest
  channels (smallest weight norm) are zeroed, which makes them dead.
- :func:`planted_model`: a small MobileFaceNet-shaped model (opset 11, dynamic
  batch, 32x32 input) with a planted outlier channel pair in the same place
  (``gdc`` -> ``embed``), a planted near-dead channel (weights ~1e-9 with a
  large bias, which overflows INC's int32 bias) and an exactly dead channel;
  optionally with a fixed batch of 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TWIN_SCALE = 64.0
TWIN_SCALED = 8
TWIN_DEAD = 2


def make_twin(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Write the outlier-channel twin of the shared opset-8 MobileFaceNet; returns the scaled and dead channels."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    names = {n.name for n in m.graph.node}
    assert {"conv96", "conv96_bn", "conv97"} <= names, "not the shared MobileFaceNet"
    w1 = numpy_helper.to_array(inits["conv96_weight"]).copy()
    beta = numpy_helper.to_array(inits["conv96_bn_beta"]).copy()
    mean = numpy_helper.to_array(inits["conv96_bn_moving_mean"]).copy()
    w2 = numpy_helper.to_array(inits["conv97_weight"]).copy()
    norms = np.linalg.norm(w1.reshape(w1.shape[0], -1), axis=1)
    dead = np.argsort(norms, kind="stable")[:TWIN_DEAD]
    scaled = np.array([c for c in range(w1.shape[0]) if c not in set(dead.tolist())][:TWIN_SCALED])
    w1[scaled] *= TWIN_SCALE
    beta[scaled] *= TWIN_SCALE
    mean[scaled] *= TWIN_SCALE
    w2[:, scaled] /= TWIN_SCALE
    w1[dead] = 0.0
    for name, arr in (("conv96_weight", w1), ("conv96_bn_beta", beta), ("conv96_bn_moving_mean", mean), ("conv97_weight", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    onnx.save(m, str(dst))
    return {"scaled": [int(c) for c in scaled], "dead": [int(c) for c in dead]}


# --- the small synthetic model ---------------------------------------------------------------

OUTLIER_CHANNELS = [0, 1]
NEAR_DEAD_CHANNEL = 5  # of conv2
DEAD_CHANNEL = 9  # of gdc
SIZE = 32


def planted_model(
    path: str | os.PathLike[str] | None = None,
    *,
    outliers: bool = True,
    near_dead: bool = True,
    dead: bool = True,
    seed: int = 0,
    width: int = 16,
    embedding: int = 32,
    relu6: bool = False,
    batch: int | str = "N",
) -> onnx.ModelProto:
    """data [N,3,32,32] raw pixels -> conv1 -> conv2 -> gdc (global depthwise) -> embed (1x1) -> fc1 [N, embedding].

    ``relu6``: Clip(0, 6) after conv1 and conv2 instead of Relu, as in MobileFaceNet.
    ``batch``: the batch dimension, symbolic (any batch) or a fixed number, as some exports have.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        return name

    def conv_bn(x: str, name: str, w: np.ndarray, *, stride: int = 1, pad: int = 0, group: int = 1, relu: bool = True,
                beta: np.ndarray | None = None) -> str:
        cout = w.shape[0]
        nodes.append(helper.make_node(
            "Conv", [x, const(f"{name}_w", w)], [f"{name}_out"], name=name,
            kernel_shape=list(w.shape[2:]), strides=[stride, stride], pads=[pad] * 4, group=group,
        ))
        bn = [
            const(f"{name}_bn_gamma", rng.uniform(0.8, 1.2, cout)),
            const(f"{name}_bn_beta", rng.normal(0, 0.1, cout) if beta is None else beta),
            const(f"{name}_bn_mean", rng.normal(0, 0.05, cout)),
            const(f"{name}_bn_var", rng.uniform(0.8, 1.2, cout)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_out", *bn], [f"{name}_bn_out"], name=f"{name}_bn", epsilon=1e-5))
        if not relu:
            return f"{name}_bn_out"
        if relu6:
            bounds = [const(f"{name}_clip_min", np.array(0.0)), const(f"{name}_clip_max", np.array(6.0))]
            nodes.append(helper.make_node("Clip", [f"{name}_bn_out", *bounds], [f"{name}_relu"], name=f"{name}_relu"))
        else:
            nodes.append(helper.make_node("Relu", [f"{name}_bn_out"], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    nodes.append(helper.make_node("Sub", ["data", const("mean", np.full((1, 3, 1, 1), 127.5))], ["sub0"], name="minus_mean"))
    nodes.append(helper.make_node("Mul", ["sub0", const("scale", np.full((1, 3, 1, 1), 1 / 128))], ["norm0"], name="times_scale"))
    c1 = width // 2
    x = conv_bn("norm0", "conv1", rng.normal(0, np.sqrt(2 / 27), (c1, 3, 3, 3)), stride=2, pad=1)
    w2 = rng.normal(0, np.sqrt(2 / (9 * c1)), (width, c1, 3, 3))
    beta2 = rng.normal(0, 0.1, width)
    if near_dead:
        # A channel that is all but dead: its output is its bias, and INC's int32 bias overflows.
        w2[NEAR_DEAD_CHANNEL] *= 1e-9
        beta2[NEAR_DEAD_CHANNEL] = 2.0
    x = conv_bn(x, "conv2", w2, stride=2, pad=1, beta=beta2)
    spatial = SIZE // 4
    wg = rng.normal(0, 1.0 / spatial, (width, 1, spatial, spatial))
    betag = rng.normal(0, 0.1, width)
    we = rng.normal(0, np.sqrt(1 / width), (embedding, width, 1, 1))
    if dead:
        wg[DEAD_CHANNEL] = 0.0
    gdc_bn_mean = None
    if outliers:
        wg[OUTLIER_CHANNELS] *= TWIN_SCALE
        betag[OUTLIER_CHANNELS] *= TWIN_SCALE
        we[:, OUTLIER_CHANNELS] /= TWIN_SCALE
        gdc_bn_mean = OUTLIER_CHANNELS
    x = conv_bn(x, "gdc", wg, group=width, relu=False, beta=betag)
    if gdc_bn_mean is not None:
        # The BatchNormalization mean is part of the channel's scale too.
        mean_init = next(t for t in inits if t.name == "gdc_bn_mean")
        m = numpy_helper.to_array(mean_init).copy()
        m[gdc_bn_mean] *= TWIN_SCALE
        mean_init.CopyFrom(numpy_helper.from_array(m, "gdc_bn_mean"))
    x = conv_bn(x, "embed", we, relu=False)
    nodes.append(helper.make_node("Reshape", [x, const("flat", np.array([0, -1]), np.int64)], ["fc1"], name="flatten"))
    graph = helper.make_graph(
        nodes, "planted",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, embedding])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model
