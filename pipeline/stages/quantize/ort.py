"""The ``ort`` engine: onnxruntime's ``quantize_static`` after its ``quant_pre_process``.

It keeps the pipeline working without INC's ONNX backend, which later INC
releases dropped. onnxruntime's own ``reduce_range`` already narrows only the
weights. Histogram calibration (entropy, percentile) is fed the calibration
batches a slice at a time, so its memory stays bounded by the slice.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from pipeline.core.errors import UserError
from pipeline.core.progress import Progress
from pipeline.data.bins import VerificationBin
from pipeline.data.calibration import CalibrationData
from pipeline.stages.quantize.checks import ModelFacts
from pipeline.stages.quantize.engine import Engine, EngineRun, quiet_libraries
from pipeline.stages.quantize.scheme import QuantScheme

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec, QuantizationSection


def quantize_ort(
    model_path: Path,
    facts: ModelFacts,
    data: CalibrationData,
    q: "QuantizationSection",
    scheme: QuantScheme,
    *,
    work: Path,
    progress: Progress,
    eval_bin: VerificationBin | None,
    spec: "InputSpec",
    label: str = "",
) -> EngineRun:
    """``quant_pre_process`` then ``quantize_static``, with every weight at ``scheme``'s range; no tuning."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings: list[str] = []
    if q.tuning.enabled:
        warnings.append("quantization.tuning is INC-only; engine ort quantizes once without tuning")
    if q.inc_recipes:
        warnings.append("quantization.inc_recipes is ignored by engine ort")
    pre = work / "preprocessed.onnx"
    out = work / f"int8{'-rr' if scheme.engine_reduce_range else ''}.onnx"
    # A second run (the other weight range) reuses the first run's activation ranges.
    cache = work / "calibration-cache.json"
    with quiet_libraries("onnxruntime") as cap, quiet_libraries("root"):
        # Shape inference and onnxruntime's basic optimisations (BatchNormalization folded into Conv),
        # which INC applies by itself before quantizing.
        try:
            if not pre.exists():
                # ONNX's own shape inference covers these CNNs; the symbolic pass would need sympy.
                quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            raise UserError(f"onnxruntime could not prepare {model_path} for quantization: {type(e).__name__}: {e}") from None
        registry = QLinearOpsRegistry if q.format == "QOperator" else QDQRegistry
        op_types = set(q.op_types_to_quantize) if q.op_types_to_quantize is not None else set(registry)
        op_types -= set(q.op_types_to_exclude)
        pre_nodes = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        gone = [n for n in q.nodes_to_exclude if n not in pre_nodes]
        if gone:
            warnings.append(f"nodes_to_exclude {gone} were folded away by graph optimisation (e.g. a BatchNormalization into its Conv)")
        extra = dict(q.extra_options)
        if scheme.histogram_calibration:
            # The histogram calibrators keep every activation of every batch they are given; fed a
            # slice at a time (their histograms merge), memory stays bounded by the slice.
            batch_bytes = activation_bytes_per_image(onnx.load(str(pre), load_external_data=False)) * data.batch_size
            extra.setdefault("CalibStridedMinMax", calibration_stride(len(data), batch_bytes))
        with progress.task(f"calibrating (ort{label})", total=0 if cache.exists() else data.num_samples, unit="img") as t:
            reader = ProgressReader(data.ort_reader(facts.input_name), t)
            # The histogram calibrators print their progress with print(); a stage does not print.
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(pre),
                        str(out),
                        reader,
                        quant_format=QuantFormat.QOperator if q.format == "QOperator" else QuantFormat.QDQ,
                        op_types_to_quantize=sorted(op_types),
                        per_channel=scheme.per_channel,
                        reduce_range=scheme.engine_reduce_range,
                        # u8 activations and s8 weights, as INC uses: onnxruntime's fastest CPU pairing.
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(q.nodes_to_exclude),
                        calibrate_method=CalibrationMethod[scheme.ort_calibration_method],
                        extra_options=extra,
                        calibration_cache_path=str(cache),
                    )
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"onnxruntime could not quantize {model_path}: {type(e).__name__}: {e}") from None
    warnings += [m for m in cap.messages(logging.WARNING)]
    return EngineRun(onnx.load(str(out)), warnings)


class ProgressReader:
    """An onnxruntime CalibrationDataReader that also advances a progress bar."""

    def __init__(self, reader: Any, task: Any) -> None:
        self._reader = reader
        self._task = task

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = self._reader.get_next()
        if item is not None:
            self._task.advance(len(next(iter(item.values()))))
        return item

    def __iter__(self):
        return iter(self.get_next, None)

    def rewind(self) -> None:
        self._reader.rewind()

    def set_range(self, start_index: int, end_index: int) -> None:
        self._reader.set_range(start_index, end_index)

    def __len__(self) -> int:
        return len(self._reader)


# Activation bytes (shape-inference estimate) one slice of histogram calibration may hold. A fixed
# figure, not the free memory: the slicing changes the merged histograms, so it must not vary by machine.
CALIBRATION_SLICE_BYTES = 1 << 30


def calibration_stride(batches: int, batch_bytes: int, budget: int = CALIBRATION_SLICE_BYTES) -> int:
    """Batches per slice: the largest divisor of ``batches`` (onnxruntime requires one) within ``budget``."""
    most = max(1, budget // max(1, batch_bytes))
    return max(d for d in range(1, min(most, batches) + 1) if batches % d == 0)


def activation_bytes_per_image(model: onnx.ModelProto) -> int:
    """Bytes of the float activations one image produces (batch 1), BatchNormalization outputs left out.

    An estimate of what a histogram calibrator (percentile, kl) would hold per
    calibration image if it kept every calibrated tensor until the end, as
    INC's own does (qpipe streams INC's, see :func:`~pipeline.stages.quantize.inc_patches.streamed_histograms`,
    and feeds onnxruntime's a slice at a time). BatchNormalization is folded
    into its Conv before calibration, so its outputs do not count.
    """
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    try:
        m = shape_inference.infer_shapes(m)
    except Exception:
        return 0
    skip = {o for n in m.graph.node if n.op_type in ("BatchNormalization", "Constant", "Shape") for o in n.output}
    total = 0
    for vi in list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if vi.name in skip or t.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += int(np.prod(dims)) * 4
    return total


# The second run of a split quantize (the other weight range) reuses the first run's activation
# ranges through onnxruntime's calibration cache in the shared work directory.
ENGINE = Engine(quantize=quantize_ort)
