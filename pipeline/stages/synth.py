"""A synthetic stand-in for the Model Zoo ArcFace (LResNet100E-IR, opset 8).

The real Zoo model is a 261 MB download that tests and CI cannot rely on, so
this builds a model with the same op mix, shapes, naming style and file layout
as insightface's MXNet export: input ``data`` [1,3,112,112] raw 0..255,
Sub/Mul input scaling, IR residual units (BN-Conv-BN-PReLU-Conv-BN + shortcut),
BN, Dropout, Flatten, Gemm and a final BatchNormalization named ``fc1``;
ir_version 3 with every initializer also listed as a graph input.

The weights are random but well conditioned: every BatchNormalization gets the
running mean and variance that its input actually has (propagated analytically,
per channel, for uniform 0..255 input images), and each residual branch ends
in a BN with a small gamma, so activations stay near unit scale through 100
layers and the embedding still depends on the image. Nothing is run to build
it; depth 100 takes a few seconds, most of it serialisation.

``spatial0=True`` writes the BatchNormalization nodes with ``spatial=0`` and
per-channel statistics, the form old MXNet exporters produced; the weights are
drawn in the same order, so the model computes exactly what its spatial=1 twin
(same seed) computes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path

# insightface's fresnet.py: units per stage for each LResNet depth, filters per stage.
UNITS: dict[int, list[int]] = {18: [2, 2, 2, 2], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}
FILTERS = [64, 64, 128, 256, 512]  # stem, then the four stages, at width 64
INPUT_SIZE = 112
BN_EPS = 2e-5  # MXNet's default, as in the Zoo export
OPSET = 8
IR_VERSION = 3
# Residual-branch output scale: the stream grows by about RESIDUAL_GAMMA**2 in variance per unit,
# small enough for 30 units per stage, large enough that every unit matters.
RESIDUAL_GAMMA = 0.25
PRELU_SLOPE = 0.25  # MXNet's PReLU initialisation


@dataclass
class SynthResult:
    path: Path
    depth: int
    parameters: int
    bytes: int
    spatial0: bool
    seed: int
    embedding: int
    width: int
    nodes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# --- per-channel moment propagation ----------------------------------------------
# Activations are summarised by per-channel (mean, variance) over images and positions,
# with inputs to a layer treated as independent: the expectation over random weights of
# the true figure. It is only used to choose BN statistics, so "about right" is enough.


def _linear_moments(w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moments of y = w x for w of shape (out, in, positions...) and per-``in`` input moments."""
    w = w.reshape(w.shape[0], w.shape[1], -1)
    mu_out = w.sum(axis=2, dtype=np.float64) @ mu
    var_out = np.square(w).sum(axis=2, dtype=np.float64) @ var
    return mu_out, var_out


def _prelu_moments(mu: np.ndarray, var: np.ndarray, slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # For x ~ N(m, s^2): y = (1-a) max(x,0) + a x, and E[max(x,0) * x] = E[max(x,0)^2].
    s = np.sqrt(np.maximum(var, 1e-12))
    z = mu / s
    cdf = 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in z]))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    e_pos = mu * cdf + s * pdf
    e_pos2 = (mu * mu + var) * cdf + mu * s * pdf
    a = slope.astype(np.float64)
    mean = (1.0 - a) * e_pos + a * mu
    second = (1.0 - a * a) * e_pos2 + a * a * (mu * mu + var)
    return mean, np.maximum(second - mean * mean, 1e-12)


class _Builder:
    """Accumulates nodes and initializers in MXNet-export naming and order."""

    def __init__(self, rng: np.random.Generator, spatial0: bool) -> None:
        self.rng = rng
        self.spatial0 = spatial0
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[tuple[str, np.ndarray]] = []
        self.parameters = 0

    def param(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value, dtype=np.float32)
        self.inits.append((name, value))
        self.parameters += value.size
        return name

    def he(self, shape: tuple[int, ...], gain: float) -> np.ndarray:
        # Uniform with variance gain/fan_in (PyTorch's kaiming_uniform); about twice as fast as
        # normal draws, which matters at 65 M weights.
        fan_in = int(np.prod(shape[1:]))
        w = self.rng.random(shape, dtype=np.float32)
        w -= np.float32(0.5)
        w *= np.float32(2.0 * math.sqrt(3.0 * gain / fan_in))
        return w

    def conv(self, name: str, x: str, moments, cout: int, k: int, stride: int, gain: float):
        cin = moments[0].shape[0]
        w = self.he((cout, cin, k, k), gain)
        self.nodes.append(
            helper.make_node(
                "Conv", [x, self.param(f"{name}_weight", w)], [name], name=name,
                kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, dilations=[1, 1], group=1,
            )
        )
        return name, _linear_moments(w, *moments)

    def bn(self, name: str, x: str, moments, gamma_scale: float = 1.0, beta_scale: float = 0.0, fix_gamma: bool = False):
        mu, var = moments
        c = mu.shape[0]
        if fix_gamma:
            gamma = np.ones(c, np.float32)
        else:
            gamma = gamma_scale * (1.0 + 0.1 * self.rng.standard_normal(c, dtype=np.float32))
        beta = beta_scale * self.rng.standard_normal(c, dtype=np.float32)
        inputs = [
            x,
            self.param(f"{name}_gamma", gamma),
            self.param(f"{name}_beta", beta),
            self.param(f"{name}_moving_mean", mu),
            self.param(f"{name}_moving_var", var),
        ]
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", inputs, [name], name=name,
                epsilon=BN_EPS, momentum=0.9, spatial=0 if self.spatial0 else 1,
            )
        )
        g = gamma.astype(np.float64)
        return name, (beta.astype(np.float64), g * g * var / (var + BN_EPS))

    def prelu(self, name: str, x: str, moments):
        c = moments[0].shape[0]
        slope = PRELU_SLOPE + 0.05 * self.rng.standard_normal(c, dtype=np.float32)
        # (C,1,1): broadcasts over N,C,H,W by channel, as opset 8 PRelu requires.
        self.nodes.append(helper.make_node("PRelu", [x, self.param(f"{name}_gamma", slope.reshape(c, 1, 1))], [name], name=name))
        return name, _prelu_moments(*moments, slope)

    def add(self, name: str, a: str, b: str, ma, mb):
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name, (ma[0] + mb[0], ma[1] + mb[1])

    def residual_unit(self, prefix: str, x: str, moments, filters: int, stride: int, dim_match: bool):
        # insightface residual_unit_v3: bn1 - conv1 - bn2 - prelu - conv2(stride) - bn3 (+ shortcut)
        t, m = self.bn(f"{prefix}_bn1", x, moments)
        t, m = self.conv(f"{prefix}_conv1", t, m, filters, 3, 1, gain=1.0)
        t, m = self.bn(f"{prefix}_bn2", t, m, beta_scale=0.1)
        t, m = self.prelu(f"{prefix}_relu1", t, m)
        t, m = self.conv(f"{prefix}_conv2", t, m, filters, 3, stride, gain=1.0 / float(np.mean(m[1] + m[0] ** 2)))
        t, m = self.bn(f"{prefix}_bn3", t, m, gamma_scale=RESIDUAL_GAMMA, beta_scale=0.02)
        if dim_match:
            sc, msc = x, moments
        else:
            sc, msc = self.conv(f"{prefix}_conv1sc", x, moments, filters, 1, stride, gain=1.0 / float(np.mean(moments[1] + moments[0] ** 2)))
            sc, msc = self.bn(f"{prefix}_sc", sc, msc)
        return self.add(f"{prefix}_plus", t, sc, m, msc)


def build_model(
    *, depth: int = 100, spatial0: bool = False, seed: int = 0, embedding: int = 512, width: int = 64
) -> tuple[onnx.ModelProto, int]:
    """The stand-in as a ModelProto and its parameter count (no I/O).

    ``width`` scales every stage's filters (64: the Zoo model); narrow models
    keep the graph and its depth but convert and run in a fraction of the time.
    """
    if depth not in UNITS:
        raise UserError(f"synth-model: depth must be one of {sorted(UNITS)}, got {depth}")
    if embedding <= 0:
        raise UserError(f"synth-model: embedding size must be positive, got {embedding}")
    if width <= 0:
        raise UserError(f"synth-model: width must be positive, got {width}")
    filters = [f * width // 64 or 1 for f in FILTERS]
    b = _Builder(np.random.default_rng(seed), spatial0)

    # Input statistics of uniform random 0..255 pixels, then MXNet's "(x - 127.5) * 0.0078125".
    mean_px, scale = 127.5, 0.0078125
    m = (np.zeros(3), np.full(3, (255.0**2 / 12.0) * scale * scale))
    b.nodes.append(helper.make_node("Sub", ["data", b.param("_minusscalar0_second", np.array([mean_px]))], ["_minusscalar0"], name="_minusscalar0"))
    b.nodes.append(helper.make_node("Mul", ["_minusscalar0", b.param("_mulscalar0_second", np.array([scale]))], ["_mulscalar0"], name="_mulscalar0"))
    t, m = b.conv("conv0", "_mulscalar0", m, filters[0], 3, 1, gain=1.0 / float(np.mean(m[1])))
    t, m = b.bn("bn0", t, m, beta_scale=0.1)
    t, m = b.prelu("relu0", t, m)

    side = INPUT_SIZE
    for stage, units in enumerate(UNITS[depth], start=1):
        for unit in range(1, units + 1):
            first = unit == 1
            t, m = b.residual_unit(f"stage{stage}_unit{unit}", t, m, filters[stage], 2 if first else 1, dim_match=not first)
        side //= 2

    # Output "E": BN - Dropout - FullyConnected (Flatten + Gemm) - BN(fix_gamma) named fc1.
    t, m = b.bn("bn1", t, m)
    b.nodes.append(helper.make_node("Dropout", [t], ["dropout0"], name="dropout0", ratio=0.4))
    b.nodes.append(helper.make_node("Flatten", ["dropout0"], ["flatten0"], name="flatten0", axis=1))
    features = filters[-1] * side * side
    w = b.he((embedding, features), gain=1.0 / float(np.mean(m[1] + m[0] ** 2)))
    bias = np.zeros(embedding, np.float32)
    # Flatten keeps channel-major order, so the Gemm weight reads as (embedding, channel, position).
    m = _linear_moments(w.reshape(embedding, filters[-1], side * side), *m)
    b.nodes.append(
        helper.make_node(
            "Gemm", ["flatten0", b.param("pre_fc1_weight", w), b.param("pre_fc1_bias", bias)], ["pre_fc1"], name="pre_fc1",
            alpha=1.0, beta=1.0, transA=0, transB=1,
        )
    )
    b.bn("fc1", "pre_fc1", m, fix_gamma=True)

    # Filled in place: make_graph/make_model would copy 261 MB of weights twice.
    model = onnx.ModelProto()
    model.ir_version = IR_VERSION
    model.producer_name = "qpipe-synth"
    model.opset_import.append(helper.make_opsetid("", OPSET))
    graph = model.graph
    graph.name = f"lresnet{depth}e-ir-synthetic"
    graph.node.extend(b.nodes)
    graph.input.append(helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE]))
    for name, v in b.inits:
        t = graph.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(v.shape)
        t.raw_data = v.tobytes()
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
    graph.output.append(helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, embedding]))
    return model, b.parameters


def synth_model(
    out: Path, *, depth: int = 100, spatial0: bool = False, seed: int = 0, embedding: int = 512, width: int = 64
) -> SynthResult:
    """Write an opset-8 LResNet``depth``E-IR stand-in with seeded random weights to ``out`` (atomically)."""
    model, parameters = build_model(depth=depth, spatial0=spatial0, seed=seed, embedding=embedding, width=width)
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return SynthResult(
        path=out, depth=depth, parameters=parameters, bytes=out.stat().st_size, spatial0=spatial0, seed=seed,
        embedding=embedding, width=width, nodes=len(model.graph.node),
    )
