"""Opset conversion: repair old exports, onnx.version_converter, clean up, prove equivalence.

The Model Zoo ArcFace and its kin are MXNet exports at opset 8: initializers
listed as graph inputs, ir_version 3, sometimes BatchNormalization written with
``spatial=0`` but per-channel statistics. Models from other projects bring other
quirks (:mod:`pipeline.stages.repairs`). Quantization tools want opset 11 or
newer. :func:`convert`

1. repairs export quirks: graph inputs a node produces or nothing reads, stale
   recorded shapes, weights behind DequantizeLinear (folded to fp32), and what
   the converter would refuse (``spatial=0`` BatchNormalization becomes its
   exact spatial=1 equivalent);
2. runs ``onnx.version_converter``; a node it cannot convert is named in the error;
3. cleans up: ir_version raised to suit the opset, initializers dropped from the
   graph inputs, Constant nodes folded into initializers, node names made
   unique, a symbolic batch dimension unless told otherwise, then shape
   inference and ``onnx.checker``;
4. runs source and result with onnxruntime on the same inputs and refuses to
   write the result unless every embedding keeps a cosine of at least
   ``min_cosine`` to the source's.

A model already at the target opset is not converted, but still repaired and
cleaned up when it needs it; otherwise it is copied unchanged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.runtime import graph as onnxutil
from pipeline.eval.embeddings import Agreement, agreement, embed_each
from pipeline.runtime.session import OnnxModel
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.stages.repairs import drop_stale_value_info, fold_weight_dequantize, repair_graph_inputs

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec

BATCH_DIM = "batch"
BATCH_CHECK = 8  # the dynamic-batch model must give the same embeddings in a batch of this size
STATIC_HINT = "--static-batch (recipe convert.dynamic_batch: false) keeps the batch the model was exported with"


@dataclass
class ConvertResult:
    source: Path
    output: Path
    opset_from: int
    opset_to: int
    ir_version: int
    repairs: list[str]
    worst_cosine: float
    max_abs_diff: float
    samples: int
    sample_source: str  # "lfw.bin faces" (the .bin's file name) or "seeded random"
    dynamic_batch: bool
    batch_checked: int  # batch size the gate ran through the result besides batch 1 (0: none)
    copied: bool  # already at or above the target opset: written unchanged
    seconds: float
    reference: str  # what the result was compared against
    input_name: str = ""
    output_name: str = ""
    cosines: list[float] = field(default_factory=list)
    prelu: dict[str, Any] = field(default_factory=dict)  # what the PRelu rewrite did (empty: none asked for or none found)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"] = str(self.source)
        d["output"] = str(self.output)
        return d


def convert(
    src: Path,
    dst: Path,
    *,
    opset: int = 11,
    dynamic_batch: bool = True,
    data: Path | None = None,
    input_spec: "InputSpec | None" = None,
    samples: int = 8,
    min_cosine: float = 0.99999,
    seed: int = 0,
    prelu: str = "keep",
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert ``src`` to ``opset`` and write it to ``dst`` only if it is equivalent to the source.

    Args:
        src: the source ONNX model (typically opset 8).
        dst: where to write the result (atomically; untouched on any failure).
        opset: target default-domain opset. A model already at or above it is
            not converted: copied unchanged unless it needs a repair or, with
            ``dynamic_batch``, a symbolic batch.
        dynamic_batch: make the batch dimension symbolic (Reshape/Flatten that
            hard-code batch 1 are fixed) and also check a batch of 8 in the gate
            (the default, as the recipe's ``convert.dynamic_batch``); False
            leaves the batch as the source has it.
        data: an insightface ``.bin``; its faces feed the gate. None: seeded
            random 0..255 images.
        input_spec: input name, size, channel order and scaling (recipe
            ``model.input``); None: the defaults (first input, 112x112, RGB, raw).
        samples: images in the gate.
        min_cosine: every embedding's cosine to the source's must reach this.
        seed: chooses the faces from ``data`` or draws the random images.
        prelu: "rewrite" expresses PRelu in ops onnxruntime runs fast in fp32 and
            int8 (pipeline.stages.prelu; the gate proves it); "keep" leaves it.
        progress: progress reporting; None: silent.

    Raises:
        UserError: unreadable model, wrong input shape, unknown opset, a node
            the converter rejects (named), or a failed equivalence gate.
    """
    from pipeline.recipe import InputSpec

    progress = progress or NULL_PROGRESS
    spec = input_spec or InputSpec()
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    if samples < 1:
        raise UserError(f"convert: samples must be at least 1, got {samples}")
    max_known = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= max_known:
        raise UserError(f"convert: onnx {onnx.__version__} knows opsets 1 to {max_known}; cannot convert to opset {opset}")

    source = onnxutil.load_model(src, "source model")
    opset_from = onnxutil.model_opset(source)
    # The source is not needed again in memory (the gate reads it from src): repair it in place.
    model = source
    # Before the input is looked up: a bogus first input would otherwise be taken for the image.
    before = repair_graph_inputs(model) + drop_stale_value_info(model)
    inp = onnxutil.find_input(model, spec.name)
    out = onnxutil.find_output(model, spec.output)
    _check_input_shape(inp, spec)
    # Read the gate's images first: a bad --data fails before a long conversion, not after.
    images, sample_source = _gate_inputs(data, spec, samples, seed)

    converting = opset_from < opset
    if converting:
        before += repair_batchnorm_spatial(model)
        renamed = unique_node_names(model)
        if renamed:
            before.append(f"named {renamed} node(s) that had an empty or duplicate name")
    reference_model: Path | onnx.ModelProto = src
    reference = "source model"
    # onnxruntime refuses spatial=0 BatchNormalization, duplicate node names, inputs a node also
    # produces, and wants feeds for unread inputs; the repaired graph is the same function in a
    # form it runs, so it stands in when it must.
    if before and not _runs(src, images[:1], inp.name, out.name):
        reference_model = model
        reference = f"repaired opset-{opset_from} source (onnxruntime cannot run the original)"
    work = model
    if reference_model is model:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    # Folding changes the graph, not its function: the gate compares with the graph before it.
    folded = fold_weight_dequantize(work)

    repairs = before + folded
    copied = False
    if not converting:
        repairs.insert(0, f"already at opset {opset_from} (target {opset}): not converted")
        make_dynamic = dynamic_batch and not _batch_is_symbolic(inp)
        if repairs[1:] or make_dynamic:
            result = _finish(work, dynamic_batch=make_dynamic, input_name=inp.name, output_name=out.name, repairs=repairs)
        else:
            result = None
            copied = True
        opset_to = opset_from
    else:
        with progress.task(f"converting opset {opset_from} -> {opset}", total=1, unit="model") as t:
            converted = _version_convert(work, opset)
            t.advance(1)
        del work
        result = _finish(converted, dynamic_batch=dynamic_batch, input_name=inp.name, output_name=out.name, repairs=repairs)
        opset_to = opset

    prelu_done = None
    if prelu not in ("keep", "rewrite"):
        raise UserError(f"convert: prelu must be keep or rewrite, got {prelu!r}")
    if prelu == "rewrite":
        from pipeline.stages.prelu import count_prelu, rewrite_prelu

        if result is None and count_prelu(work):
            result, copied = _finish(work, dynamic_batch=False, input_name=inp.name, output_name=out.name, repairs=repairs), False
        if result is not None and count_prelu(result):
            prelu_done = rewrite_prelu(result)
            repairs.append(prelu_done.summary())

    with atomic_path(dst) as tmp:
        if result is None:
            shutil.copyfile(src, tmp)
        else:
            onnx.save(result, str(tmp))
            _check_file(tmp)
        # Gate the file exactly as written; failing leaves nothing under dst.
        gate = _equivalence_gate(
            reference_model, tmp, images, input_name=inp.name, output_name=out.name,
            dynamic_batch=(result is not None and dynamic_batch and _batch_is_symbolic(onnxutil.find_input(result, inp.name)))
            or (copied and _batch_is_symbolic(inp)),
            min_cosine=min_cosine, sample_source=sample_source, reference=reference, progress=progress,
        )
    ir_version = result.ir_version if result is not None else source.ir_version
    return ConvertResult(
        source=src, output=dst, opset_from=opset_from, opset_to=opset_to, ir_version=int(ir_version), repairs=repairs,
        worst_cosine=gate["worst"], max_abs_diff=gate["max_abs"], samples=len(images), sample_source=sample_source,
        dynamic_batch=gate["dynamic"], batch_checked=gate["batch"], copied=copied, seconds=round(time.perf_counter() - t0, 3),
        reference=reference, input_name=inp.name, output_name=out.name, cosines=gate["cosines"],
        prelu=prelu_done.to_dict() if prelu_done is not None else {},
    )


# --- input checks and gate inputs --------------------------------------------------


def _check_input_shape(inp: onnx.ValueInfoProto, spec: "InputSpec") -> None:
    shape = onnxutil.dims(inp)
    h, w = spec.size
    want = f"[N, 3, {h}, {w}]"
    if shape is None or len(shape) != 4:
        got = "unknown rank" if shape is None else f"{shape}"
        raise UserError(f"model input {inp.name!r} must be a 4-D image tensor {want} ({spec.layout}), got {got}")
    ok = [
        not isinstance(shape[1], int) or shape[1] == 3,
        not isinstance(shape[2], int) or shape[2] == h,
        not isinstance(shape[3], int) or shape[3] == w,
    ]
    if not all(ok):
        raise UserError(
            f"model input {inp.name!r} has shape {shape}, expected {want} (3 channels, {h}x{w} as the recipe's model.input.size says)"
        )
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"model input {inp.name!r} is not float32 (elem_type {inp.type.tensor_type.elem_type})")


def _batch_is_symbolic(inp: onnx.ValueInfoProto) -> bool:
    shape = onnxutil.dims(inp)
    return bool(shape) and not isinstance(shape[0], int)


def _gate_inputs(data: Path | None, spec: "InputSpec", samples: int, seed: int) -> tuple[np.ndarray, str]:
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    rng = np.random.default_rng(seed)
    if data is not None:
        vb = read_bin(data)
        n = min(samples, vb.num_images)
        idx = np.sort(rng.choice(vb.num_images, size=n, replace=False))
        return preprocess(vb.decode_many(idx), spec), f"{Path(data).name} faces"
    # Faces as large as the crop expects, so that the crop leaves exactly the model's input size.
    top, bottom, left, right = spec.crop
    h, w = spec.size[0] + top + bottom, spec.size[1] + left + right
    images = rng.integers(0, 256, size=(samples, h, w, 3), dtype=np.uint8)
    return preprocess(images, spec), "seeded random"


# --- repairs -----------------------------------------------------------------------


def repair_batchnorm_spatial(model: onnx.ModelProto) -> list[str]:
    """Rewrite BatchNormalization ``spatial=0`` in place; returns lines describing what changed.

    Old MXNet exporters wrote ``spatial=0`` with per-channel (C,) statistics,
    which is just spatial=1 mislabelled: the attribute is set to 1 and nothing
    else changes. Statistics with real per-activation shape (C, H, W) are folded
    into a Mul and an Add with (C, H, W) constants. Statistics that are not
    constants cannot be rewritten: a UserError names the node.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    repairs: list[str] = []
    per_channel: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    changed = False
    for node in graph.node:
        spatial = next((a for a in node.attribute if a.name == "spatial"), None)
        if node.op_type != "BatchNormalization" or spatial is None or spatial.i != 0:
            new_nodes.append(node)
            continue
        changed = True
        stats = node.input[1:5]
        missing = [s for s in stats if s not in inits]
        if missing:
            raise UserError(
                f"BatchNormalization node {node.name!r} has spatial=0 and statistics that are not constants "
                f"({', '.join(missing)}); it cannot be rewritten for the converter"
            )
        arrays = [numpy_helper.to_array(inits[s]) for s in stats]
        c = arrays[0].shape[0] if arrays[0].ndim else 1
        if all(a.ndim >= 1 and a.shape[0] == c and a.size == c for a in arrays):
            for name, a in zip(stats, arrays):
                if a.ndim != 1:  # (C,1,1) and the like: the same numbers as (C,)
                    inits[name].CopyFrom(numpy_helper.from_array(a.reshape(c), name))
                    for vi in graph.input:
                        if vi.name == name:
                            vi.CopyFrom(helper.make_tensor_value_info(name, inits[name].data_type, [c]))
            spatial.i = 1
            per_channel.append(node.name)
            new_nodes.append(node)
            continue
        gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        base = node.name or node.output[0]
        s_name, b_name, mid = f"{base}_folded_scale", f"{base}_folded_shift", f"{base}_folded_mul"
        folded = [numpy_helper.from_array(scale.astype(np.float32), s_name), numpy_helper.from_array(shift.astype(np.float32), b_name)]
        graph.initializer.extend(folded)
        if model.ir_version < 4:  # ir_version 3 requires every initializer to be a graph input too
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in folded)
        new_nodes.append(helper.make_node("Mul", [node.input[0], s_name], [mid], name=f"{base}_mul"))
        new_nodes.append(helper.make_node("Add", [mid, b_name], [node.output[0]], name=f"{base}_add"))
        repairs.append(
            f"BatchNormalization {node.name!r}: spatial=0 with per-activation statistics {list(arrays[0].shape)} -> Mul + Add"
        )
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        onnxutil.drop_unused_initializers(model)
    if per_channel:
        repairs.insert(
            0,
            f"BatchNormalization spatial=0 with per-channel statistics -> spatial=1 (exactly equivalent) on {len(per_channel)} "
            f"node(s): {', '.join(per_channel[:3])}{', ...' if len(per_channel) > 3 else ''}",
        )
    return repairs


def _version_convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    # The converter trusts its input: a malformed node (a Scan without a body) crashes the process.
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise UserError(f"the source model is not valid ONNX: {_first_line(e)}") from None
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises RuntimeError, ValidationError, IndexError...
        message = _first_line(e)
        culprit = _find_unconvertible_node(model, opset)
        if culprit is not None:
            node, node_message = culprit
            raise UserError(
                f"onnx.version_converter cannot convert node {node.name or '(unnamed)'!r} (op {node.op_type}) "
                f"to opset {opset}: {node_message}"
            ) from None
        raise UserError(f"onnx.version_converter cannot convert the model to opset {opset}: {message}") from None


def _find_unconvertible_node(model: onnx.ModelProto, opset: int) -> tuple[onnx.NodeProto, str] | None:
    """Convert node by node to find the one the converter rejects (its own message names none)."""
    from onnx import version_converter

    try:
        inferred = onnx.shape_inference.infer_shapes(onnxutil.skeleton(model))
    except Exception:
        inferred = model
    types = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        ins = [n for n in node.input if n]
        weights = [inits[n] for n in ins if n in inits]
        graph = helper.make_graph(
            [node], "probe",
            # ir_version 3 wants initializers listed as inputs too; later versions accept it.
            [types.get(n) or helper.make_empty_tensor_value_info(n) for n in ins if n not in inits]
            + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights],
            [types.get(n) or helper.make_empty_tensor_value_info(n) for n in node.output if n],
            initializer=weights,
        )
        probe = helper.make_model(graph, opset_imports=list(model.opset_import))
        probe.ir_version = model.ir_version
        try:
            version_converter.convert_version(probe, opset)
        except Exception as e:
            return node, _first_line(e)
    return None


def _finish(model: onnx.ModelProto, *, dynamic_batch: bool, input_name: str, output_name: str, repairs: list[str]) -> onnx.ModelProto:
    """Post-conversion clean-up; appends a line to ``repairs`` for each change it makes."""
    graph = model.graph
    min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < min_ir:
        repairs.append(f"ir_version {model.ir_version} -> {min_ir} (the minimum for opset {onnxutil.model_opset(model)})")
        model.ir_version = min_ir

    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    if len(real_inputs) != len(graph.input):
        repairs.append(f"removed {len(graph.input) - len(real_inputs)} initializers from the graph inputs")
        del graph.input[:]
        graph.input.extend(real_inputs)

    folded = fold_constants(model)
    if folded:
        repairs.append(f"folded {folded} Constant node(s) into initializers")

    renamed = unique_node_names(model)
    if renamed:
        repairs.append(f"named {renamed} node(s) that had an empty or duplicate name")

    if dynamic_batch:
        repairs += make_batch_dynamic(model, input_name)

    # Intermediate shapes recorded before the changes may be stale (a fixed batch of 1);
    # _check_file infers them afresh once the model is written.
    del graph.value_info[:]
    if input_name not in {i.name for i in model.graph.input}:
        raise UserError(f"conversion lost the input {input_name!r}")
    if output_name not in {o.name for o in model.graph.output}:
        raise UserError(f"conversion lost the output {output_name!r}")
    return model


def _check_file(path: Path) -> None:
    """Strict shape inference (stored in the file) and onnx.checker, on the written file.

    Working on the file keeps the C++ side from receiving a serialised copy of a
    quarter-gigabyte model twice.
    """
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True, data_prop=True)
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise UserError(f"the converted model fails onnx's checks: {_first_line(e)}") from None


def fold_constants(model: onnx.ModelProto) -> int:
    """Turn top-level Constant nodes into initializers of the same name; returns how many."""
    graph = model.graph
    keep: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.domain in onnxutil.DEFAULT_DOMAINS else None
        if tensor is None:
            keep.append(node)
        else:
            tensors.append(tensor)
    if tensors:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(tensors)
    return len(tensors)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    name = node.output[0]
    if a.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
        t.name = name
        return t
    values = {
        "value_float": lambda: np.array(a.f, np.float32),
        "value_floats": lambda: np.array(list(a.floats), np.float32),
        "value_int": lambda: np.array(a.i, np.int64),
        "value_ints": lambda: np.array(list(a.ints), np.int64),
    }
    if a.name in values:
        return numpy_helper.from_array(values[a.name](), name)
    return None  # sparse and string constants stay as nodes


def unique_node_names(model: onnx.ModelProto) -> int:
    """Give every node a non-empty name no other node has; returns how many were renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for node in model.graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{node.output[0] if node.output else 'node'}"
        candidate, k = base, 1
        while candidate in taken or candidate in seen:
            candidate = f"{base}_{k}"
            k += 1
        node.name = candidate
        taken.add(candidate)
        seen.add(candidate)
        renamed += 1
    return renamed


def make_batch_dynamic(model: onnx.ModelProto, input_name: str) -> list[str]:
    """:func:`pipeline.runtime.graph.make_batch_dynamic`, pointing a user at ``--static-batch`` when it cannot."""
    return onnxutil.make_batch_dynamic(model, input_name, hint=STATIC_HINT)


def _runs(model: Path | onnx.ModelProto, probe: np.ndarray, input_name: str, output_name: str) -> bool:
    """Whether onnxruntime loads ``model`` and runs it on ``probe``."""
    try:
        OnnxModel(model, input_name=input_name, output_name=output_name, quiet=True, nchw=False).run(probe)
        return True
    except UserError:
        return False


# --- the equivalence gate ------------------------------------------------------------


def _equivalence_gate(
    reference_model: Path | onnx.ModelProto,
    result_path: Path,
    images: np.ndarray,
    *,
    input_name: str,
    output_name: str,
    dynamic_batch: bool,
    min_cosine: float,
    sample_source: str,
    reference: str,
    progress: Progress,
) -> dict[str, Any]:
    n = len(images)
    batch = BATCH_CHECK if dynamic_batch else 0
    with progress.task("equivalence gate", total=2 * n + (1 if batch else 0), unit="run") as t:
        ref = OnnxModel(reference_model, input_name=input_name, output_name=output_name, what=reference, nchw=False)
        want = embed_each(ref, images, t.advance)
        new = OnnxModel(result_path, input_name=input_name, output_name=output_name, what="converted model", nchw=False)
        single = agreement(want, embed_each(new, images, t.advance))
        cos, diff = single.cosines, single.max_abs
        if batch:
            reps = -(-batch // n)
            idx = np.tile(np.arange(n), reps)[:batch]
            try:
                got_b = new.run(images[idx], batch=batch)
            except UserError as e:
                raise UserError(f"the converted model does not run a batch of {batch}: {e.message}", hint=STATIC_HINT) from None
            t.advance(1)
            if got_b.shape[0] != batch:
                raise UserError(f"the converted model returned {got_b.shape[0]} embeddings for a batch of {batch}", hint=STATIC_HINT)
            batched = agreement(want[idx], got_b)
            cos = np.concatenate([cos, batched.cosines])
            diff = max(diff, batched.max_abs)
    checked = Agreement(cosines=cos, max_abs=diff)
    worst = checked.worst
    if not checked.holds(min_cosine):
        bad = int(np.sum(~(cos >= min_cosine)))
        raise UserError(
            f"equivalence gate failed: worst embedding cosine {worst:.7f} < {min_cosine} "
            f"({bad} of {len(cos)} runs below; max abs diff {diff:.3g}; {sample_source}, against the {reference}); "
            "the converted model was not written",
            # Batch 1 agrees but the batch does not: the export computes something batch-dependent.
            hint=STATIC_HINT if bool(np.all(cos[:n] >= min_cosine)) else None,
        )
    return {"worst": worst, "max_abs": diff, "cosines": [float(c) for c in cos], "batch": batch, "dynamic": dynamic_batch}


def _first_line(e: BaseException) -> str:
    """onnx's message on one line, without the C++ source location of a failed assertion."""
    text = " ".join(part.strip() for part in str(e).split("\n") if part.strip())
    if "failed: " in text:
        text = text.split("failed: ", 1)[1]
    return text.replace("==> Context: ", "").strip() or type(e).__name__
