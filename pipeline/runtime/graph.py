"""ONNX graph helpers shared by the stages: loading, inputs and outputs, shapes, tensor links.

Everything a user can get wrong about a model file (missing, not ONNX,
truncated) leaves here as a UserError that names the file; the stages never
see raw protobuf exceptions. Running a model is :mod:`pipeline.runtime.session`.
"""

from __future__ import annotations

import os
from typing import Collection

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from pipeline.core.errors import UserError, first_line
from pipeline.core.files import require_file

DEFAULT_DOMAINS = ("", "ai.onnx")
BATCH_DIM = "batch"  # the symbolic name a dynamic batch dimension gets
Dim = int | str | None


def load_model(path: str | os.PathLike[str], what: str = "model") -> onnx.ModelProto:
    """Parse an ONNX file; a UserError for a missing, empty, non-ONNX or corrupt file."""
    p = require_file(path, what)
    try:
        model = onnx.load(str(p))
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{what} {p} is not a readable ONNX model ({type(e).__name__}: {first_line(e) if str(e).strip() else 'cannot parse'})") from None
    # Protobuf parses many non-ONNX byte strings without complaint; a real model has these.
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node or not model.graph.output:
        raise UserError(f"{what} {p} is not an ONNX model (no graph, opset or outputs found in it)")
    return model


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model declares."""
    for op in model.opset_import:
        if op.domain in DEFAULT_DOMAINS:
            return int(op.version)
    raise UserError("the model declares no default-domain (ai.onnx) opset")


def graph_links(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The node producing each tensor, and the nodes reading it (in graph order)."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    return producer, consumers


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exports list both)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def dims(value_info: onnx.ValueInfoProto) -> list[Dim] | None:
    """Shape as ints (fixed), strings (symbolic) or None (unknown); None when the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def find_input(model: onnx.ModelProto, name: str | None = None) -> onnx.ValueInfoProto:
    inputs = graph_inputs(model)
    if not inputs:
        raise UserError("the model has no inputs besides its weights")
    if name is None:
        return inputs[0]
    for i in inputs:
        if i.name == name:
            return i
    raise UserError(f"the model has no input named {name!r} (inputs: {', '.join(i.name for i in inputs)})")


def find_output(model: onnx.ModelProto, name: str | None = None) -> onnx.ValueInfoProto:
    outputs = list(model.graph.output)
    if name is None:
        return outputs[0]
    for o in outputs:
        if o.name == name:
            return o
    raise UserError(f"the model has no output named {name!r} (outputs: {', '.join(o.name for o in outputs)})")


def skeleton(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """The model without its large weights, for cheap shape inference.

    Initializers above ``max_elements`` become typed graph inputs of the same
    shape (shape inference needs only that); small ones (Reshape targets, Clip
    bounds) stay, so data propagation still sees their values. Nothing here
    copies the hundreds of megabytes a full ``CopyFrom`` or serialisation would.
    """
    sk = onnx.ModelProto()
    sk.ir_version = max(model.ir_version, 4)  # initializers need not be inputs from ir_version 4
    sk.opset_import.extend(model.opset_import)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    inits = {t.name for t in src.initializer}
    g.input.extend(i for i in src.input if i.name not in inits)
    for t in src.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= max_elements:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return sk


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor shape inference can tell (on a weightless copy: cheap for big models)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:  # a graph shape inference cannot follow: ranks unknown, nodes kept
        inferred = model
    out: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def nodes_and_reasons(reasons: dict[str, str], shown: int = 3) -> str:
    """``node: why; node: why; ...`` for the first ``shown`` nodes of a rewrite's report of what it left alone."""
    text = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:shown])
    return text + ("; ..." if len(reasons) > shown else "")


def drop_unused_initializers(model: onnx.ModelProto, only: Collection[str] | None = None) -> None:
    """Remove initializers no node or output reads (and their graph-input entries); with ``only``, just those named there."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used or (only is not None and t.name not in only)]
    if len(keep) != len(graph.initializer):
        kept = {t.name for t in keep}
        dropped = {t.name for t in graph.initializer} - kept
        inputs = [i for i in graph.input if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.input[:]
        graph.input.extend(inputs)


def make_batch_dynamic(
    model: onnx.ModelProto, input_name: str, *, hint: str | None = None, unknown_carries_batch: bool = False
) -> list[str]:
    """Make dim 0 of the input and outputs symbolic and fix nodes that hard-code batch 1 (in place).

    Which tensors carry the batch is found by shape inference with a symbolic
    batch: a Reshape whose data has that symbolic first dimension but whose
    constant target shape says 1 gets 0 ("copy from input") there, and a
    Flatten with axis 0 (which folds the batch into one row) gets axis 1.
    ``unknown_carries_batch``: also treat a tensor whose shape inference could
    not follow (operators from other domains) as carrying the batch; only for
    a copy whose outputs are then checked against the original's. Returns what
    was changed, one line each; a UserError (with ``hint``) for a graph whose
    batch cannot be freed this way.
    """
    graph = model.graph
    notes: list[str] = []
    for vi in [*[i for i in graph.input if i.name == input_name], *graph.output]:
        shape = vi.type.tensor_type.shape
        if shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = BATCH_DIM
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception as e:
        raise UserError(f"shape inference failed on the model: {first_line(e)}") from None
    shapes = {v.name: dims(v) for v in [*inferred.graph.input, *inferred.graph.value_info]}
    inits = {t.name: t for t in graph.initializer}

    def carries_batch(name: str) -> bool:
        s = shapes.get(name)
        if not s:
            return unknown_carries_batch and name not in inits
        return s[0] == BATCH_DIM or (unknown_carries_batch and s[0] is None)

    for node in graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits and carries_batch(node.input[0]):
            target = numpy_helper.to_array(inits[node.input[1]])
            if target.ndim == 1 and target.size and target[0] == 1:
                allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
                if allowzero:
                    if (target == -1).any():
                        raise UserError(f"Reshape node {node.name!r} hard-codes batch 1 and cannot be made batch-independent", hint=hint)
                    fixed_first = -1
                else:
                    fixed_first = 0
                fixed = target.copy()
                fixed[0] = fixed_first
                new_name = f"{node.input[1]}_batch"
                graph.initializer.append(numpy_helper.from_array(fixed, new_name))
                notes.append(f"Reshape {node.name!r}: target shape {target.tolist()} -> {fixed.tolist()} (batch no longer fixed)")
                node.input[1] = new_name
        elif node.op_type == "Flatten" and carries_batch(node.input[0]):
            axis = next((a for a in node.attribute if a.name == "axis"), None)
            if axis is not None and axis.i == 0:
                axis.i = 1
                notes.append(f"Flatten {node.name!r}: axis 0 -> 1 (batch no longer folded into one row)")
    drop_unused_initializers(model)
    notes.append(f"batch dimension of {input_name!r} and the outputs made symbolic ({BATCH_DIM!r})")
    return notes
