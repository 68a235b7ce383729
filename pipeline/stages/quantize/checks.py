"""Refusing float models the engines would fail on obscurely, and the facts about the ones they accept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from pipeline.core.errors import UserError
from pipeline.runtime.graph import dims as value_dims
from pipeline.runtime.graph import graph_inputs, model_opset
from pipeline.stages.quantize.depthwise import has_depthwise_conv

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection
    from pipeline.stages.quantize.scheme import QuantScheme


@dataclass
class ModelFacts:
    """What the stage and the engines need to know about a float model that passed :func:`check_model`."""

    opset: int
    depthwise: bool
    input_name: str
    output_name: str
    dynamic_batch: bool
    node_names: set[str]
    op_types: set[str]


def load_model(path: Path, what: str) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError... for a non-model
        raise UserError(f"{what} {path} is not an ONNX model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def check_model(model: onnx.ModelProto, path: Path, spec: "InputSpec", calibration: "CalibrationSection") -> ModelFacts:
    """Refuse models the engines would fail on obscurely, with a message that says what to do."""
    try:
        opset: int | None = model_opset(model)
    except UserError:
        opset = None  # reported below as too old, with the hint to convert
    if opset is None or opset < 10:
        raise UserError(
            f"{path}: opset {opset} is too old to quantize (QLinearConv needs opset 10+)",
            hint="convert it first: qpipe convert",
        )
    real_inputs = graph_inputs(model)
    if len(real_inputs) != len(model.graph.input):
        # INC 3.7.1's topological sort fails with a bare KeyError on these (old MXNet exports).
        raise UserError(
            f"{path}: {len(model.graph.input) - len(real_inputs)} initializers are also listed as graph inputs "
            f"(ir_version {model.ir_version} style)",
            hint="convert it first: qpipe convert",
        )
    if not real_inputs:
        raise UserError(f"{path}: the model has no inputs")
    names = [i.name for i in real_inputs]
    name = spec.name or names[0]
    if name not in names:
        raise UserError(f"{path}: no input named {name!r} (model.input.name); the model's inputs are {names}")
    vi = next(i for i in real_inputs if i.name == name)
    dims = value_dims(vi) or []
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"{path}: input {name!r} is not float32; only float models can be quantized")
    if len(dims) != 4:
        raise UserError(f"{path}: input {name!r} has shape {dims}, expected NCHW (4 dimensions)")
    _, c, h, w = dims
    if isinstance(c, int) and c != 3:
        raise UserError(f"{path}: input {name!r} has {c} channels, expected 3 (shape {dims})")
    if isinstance(h, int) and isinstance(w, int) and [h, w] != list(spec.size):
        raise UserError(
            f"{path}: input {name!r} is {h}x{w} but the recipe's model.input.size is {spec.size[0]}x{spec.size[1]}"
        )
    dynamic = not isinstance(dims[0], int)
    if not dynamic and dims[0] != 1 and dims[0] != calibration.batch:
        raise UserError(f"{path}: input {name!r} has a fixed batch of {dims[0]}; calibration.batch is {calibration.batch}")
    if not dynamic and calibration.batch > 1 and dims[0] == 1:
        raise UserError(
            f"{path}: input {name!r} has a fixed batch of 1 but calibration.batch is {calibration.batch}",
            hint="set calibration.batch: 1 or convert with convert.dynamic_batch: true",
        )
    outputs = [o.name for o in model.graph.output]
    out_name = spec.output or (outputs[0] if outputs else "")
    if out_name not in outputs:
        raise UserError(f"{path}: no output named {out_name!r} (model.input.output); the model's outputs are {outputs}")
    return ModelFacts(
        opset=int(opset),
        depthwise=has_depthwise_conv(model),
        input_name=name,
        output_name=out_name,
        dynamic_batch=dynamic,
        node_names={n.name for n in model.graph.node if n.name},
        op_types={n.op_type for n in model.graph.node},
    )


def check_exclusions(facts: ModelFacts, path: Path, q: "QuantizationSection") -> list[str]:
    """Refuse node exclusions that name no node; warnings for excluded op types the model does not have."""
    unknown_nodes = [n for n in q.nodes_to_exclude if n not in facts.node_names]
    if unknown_nodes:
        raise UserError(f"invalid recipe: quantization.nodes_to_exclude names nodes not in {path}: {', '.join(unknown_nodes)}")
    absent = [t for t in q.op_types_to_exclude if t not in facts.op_types]
    return [f"quantization.op_types_to_exclude: the model has no {', '.join(absent)} nodes"] if absent else []


def check_format(facts: ModelFacts, path: Path, q: "QuantizationSection", scheme: "QuantScheme") -> None:
    """Refuse a format the engine cannot write at the model's opset."""
    # onnxruntime writes per-channel DequantizeLinear (an axis attribute) only from opset 13.
    if scheme.engine == "ort" and q.format == "QDQ" and scheme.per_channel and facts.opset < 13:
        raise UserError(
            f"invalid recipe: quantization.per_channel with format QDQ needs opset 13+, {path} is opset {facts.opset}",
            hint="use format: QOperator, per_channel: false, or convert with convert.opset: 13",
        )
