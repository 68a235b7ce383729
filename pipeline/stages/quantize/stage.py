"""Post-training static int8 quantization behind one function, two engines.

``engine: inc`` runs Intel Neural Compressor 3.7's ``quantization.fit`` with a
``PostTrainingQuantConfig``; ``engine: ort`` runs onnxruntime's own
``quantize_static`` (after its ``quant_pre_process``), so the pipeline keeps
working without INC's ONNX backend, which later INC releases dropped. Both
engines read the same :class:`~pipeline.data.bins.CalibrationData`, take their
settings from the recipe's ``quantization`` section, and leave nothing in the
current directory: their scratch files live in a temporary directory beside
the output, removed afterwards.

The int8 model is written atomically with ``manifest.json`` beside it: hashes
of the source, converted and int8 models and of the calibration set, the
resolved recipe and its hash, the calibration indices, library versions, CPU
facts, wall time and peak memory.

Both engines are deterministic for the same inputs and recipe (same bytes).
INC's default for ``reduce_range`` depends on the CPU (7-bit weights unless
the CPU has VNNI), which would make the bytes machine-dependent; the recipe
therefore always passes an explicit value, and it means the same in both
engines: 7-bit weights in the GEMM-based kernels, 8-bit activations, 8-bit
depthwise weights (see "weight range per kernel" below).

Measured on the converted MobileFaceNet, 200 LFW calibration faces, full LFW
(fp32 99.55), on an AVX2 CPU without VNNI:

===========================================================  =======  =======
setting                                                       inc      ort
===========================================================  =======  =======
INC's defaults here (7-bit weights *and* activations), minmax  99.15
per-tensor weights, minmax                                             99.05
8-bit weights (u8s8 int16 saturation), minmax                  99.37
7-bit weights, minmax                                          99.40    99.47
7-bit weights, 8-bit depthwise, minmax                         99.35    99.38
7-bit weights, percentile                                               99.37
7-bit weights, 8-bit depthwise, percentile (the default)       99.53    99.47
===========================================================  =======  =======

The default holds for calibration seeds 0 and 1 alike.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import onnx

from pipeline.data.bins import CalibrationData, VerificationBin, open_images, preprocess
from pipeline.core.environment import PeakMemory, environment, physical_cores
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, atomic_write_json, require_file, sha256_bytes, sha256_file
from pipeline.runtime.graph import graph_links
from pipeline.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection, Recipe

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "qpipe.quantize-manifest/1"

# onnxruntime's QOperator kernels -> the float op they replace, so int8 and fp32 counts line up.
_QOP_TO_FLOAT = {
    "QGemm": "Gemm",
    "ConvInteger": "Conv",
    "MatMulInteger": "MatMul",
    "QAttention": "Attention",
    "QEmbedLayerNormalization": "EmbedLayerNormalization",
    "QLinearWhere": "Where",
}
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


# --- result --------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """What ``qpipe quantize`` produced. ``op_counts``: {"int8": {op: n}, "fp32": {op: n}, "quant_dequant": {...}}."""

    output: Path
    manifest: Path
    engine: str
    format: str
    op_counts: dict[str, dict[str, int]]
    calibration: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)
    int8_sha256: str = ""
    tuning: dict[str, Any] | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # reduce_range and how many depthwise convs kept 8-bit weights
    # Set when quantization.recovery ran (pipeline/recover.py): what it repaired, kept in fp32, measured.
    recovery: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["manifest"] = str(self.manifest)
        return d

    def summary(self) -> list[str]:
        lines = []
        for kind in ("int8", "fp32"):
            counts = self.op_counts.get(kind, {})
            if counts:
                lines.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return lines


# --- op counting ---------------------------------------------------------------


def count_ops(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Nodes by op type, split into int8 and fp32 (Quantize/DequantizeLinear counted apart).

    QOperator: ``QLinearConv`` counts as an int8 ``Conv``; data-movement ops
    (Flatten, Reshape, MaxPool...) whose input is already quantized count as
    int8. QDQ: an op counts as int8 when it sits between DequantizeLinear and
    QuantizeLinear and onnxruntime has an int8 kernel or fusion for its type
    (the quantizer's registries); any other op between Q/DQ pairs runs in fp32.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    int8_capable = set(QDQRegistry) | set(QLinearOpsRegistry)
    producer, consumers = graph_links(model)

    def requantized(node: onnx.NodeProto) -> bool:
        users = [u for out in node.output for u in consumers.get(out, [])]
        return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)
    quantized: set[str] = set()  # tensors holding int8/uint8 values (QOperator)
    counts: dict[str, Counter[str]] = {"int8": Counter(), "fp32": Counter(), "quant_dequant": Counter()}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        op = node.op_type
        first = node.input[0] if node.input else ""
        if op in _QDQ_OPS:
            counts["quant_dequant"][op] += 1
            if op == "QuantizeLinear":
                quantized.update(node.output)
            continue
        if op.startswith("QLinear") or op in _QOP_TO_FLOAT:
            counts["int8"][_QOP_TO_FLOAT.get(op, op[len("QLinear") :])] += 1
            quantized.update(node.output)
        elif first in quantized:
            counts["int8"][op] += 1
            quantized.update(node.output)
        elif (
            op in int8_capable
            and first in producer
            and producer[first].op_type == "DequantizeLinear"
            and requantized(node)
        ):
            counts["int8"][op] += 1
        else:
            counts["fp32"][op] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


# --- model checks ----------------------------------------------------------------


@dataclass
class _ModelFacts:
    opset: int
    depthwise: bool
    input_name: str
    output_name: str
    dynamic_batch: bool
    node_names: set[str]
    op_types: set[str]


def _load_model(path: Path, what: str) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError... for a non-model
        raise UserError(f"{what} {path} is not an ONNX model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def check_model(model: onnx.ModelProto, path: Path, spec: "InputSpec", calibration: "CalibrationSection") -> _ModelFacts:
    """Refuse models the engines would fail on obscurely, with a message that says what to do."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 10:
        raise UserError(
            f"{path}: opset {opset} is too old to quantize (QLinearConv needs opset 10+)",
            hint="convert it first: qpipe convert",
        )
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
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
    dims = _dims(vi)
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
    return _ModelFacts(
        opset=int(opset),
        depthwise=has_depthwise_conv(model),
        input_name=name,
        output_name=out_name,
        dynamic_batch=dynamic,
        node_names={n.name for n in model.graph.node if n.name},
        op_types={n.op_type for n in model.graph.node},
    )


# --- evaluation used by accuracy-aware tuning -------------------------------------


def _session(model: onnx.ModelProto | bytes | str | Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = physical_cores()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (str(model) if isinstance(model, Path) else model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def pair_accuracy(
    model: onnx.ModelProto | bytes | Path,
    pairs_bin: VerificationBin,
    spec: "InputSpec",
    *,
    pairs: int | None = None,
    folds: int = 10,
    flip: bool = True,
    batch: int = 32,
):
    """The insightface protocol on the first ``pairs`` pairs: a ``metrics.VerificationMetrics``.

    Images are decoded and run chunk by chunk; a model with a fixed batch of 1
    is run one image at a time.
    """
    from pipeline.eval import protocol as metrics

    sess = _session(model)
    inp = sess.get_inputs()[0] if spec.name is None else next(i for i in sess.get_inputs() if i.name == spec.name)
    out_name = spec.output or sess.get_outputs()[0].name
    if isinstance(inp.shape[0], int):
        batch = inp.shape[0]
    n_pairs = pairs_bin.num_pairs if pairs is None else min(pairs, pairs_bin.num_pairs)
    n_img = 2 * n_pairs

    def run(x: np.ndarray) -> np.ndarray:
        outs = [sess.run([out_name], {inp.name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        return np.concatenate(outs).reshape(len(x), -1)

    emb = []
    for _, imgs in pairs_bin.iter_chunks(np.arange(n_img), chunk=256):
        e = run(preprocess(imgs, spec))
        f = run(preprocess(imgs, spec, flip=True)) if flip else None
        emb.append(metrics.flip_sum(e, f))
    e = np.concatenate(emb)
    return metrics.evaluate(e[0::2], e[1::2], pairs_bin.issame[:n_pairs], folds=folds)


# --- engines -----------------------------------------------------------------------


@dataclass
class _EngineRun:
    model: onnx.ModelProto
    warnings: list[str] = field(default_factory=list)
    tuning: dict[str, Any] | None = None


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def _quiet_libraries(logger_name: str) -> Iterator[_LogCapture]:
    """Route a library's log to a capture (warnings and errors kept) and silence onnxruntime's C++ log."""
    import onnxruntime as ort

    log = logging.getLogger(logger_name)
    saved = (list(log.handlers), log.level, log.propagate)
    cap = _LogCapture()
    log.handlers[:] = [cap]
    log.setLevel(logging.WARNING)
    log.propagate = False
    ort.set_default_logger_severity(3)
    try:
        yield cap
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
        ort.set_default_logger_severity(2)


class _CountingLoader:
    """Wraps CalibrationData for INC, advancing a progress bar per batch."""

    def __init__(self, data: CalibrationData, task: Any) -> None:
        self.data = data
        self.batch_size = data.batch_size
        self._task = task

    def __iter__(self):
        for item in self.data:
            yield item
            self._task.advance(len(next(iter(item[0].values()))))

    def __len__(self) -> int:
        return len(self.data)

    def reused(self, images: int) -> None:
        """The calibration ranges came from an earlier run on the same data (see _shared_calibration)."""
        self._task.update(completed=images)


_INC_FORMATS = {"QOperator": "default", "QDQ": "QDQ"}
_INC_ALGORITHMS = {"minmax": "minmax", "entropy": "kl", "percentile": "percentile"}
# Weighted op types whose weight granularity per_channel switches (INC's capability names).
_INC_WEIGHTED = ("Conv", "FusedConv", "MatMul", "Gemm")


def _inc_static_op_types() -> set[str]:
    """Every op type INC's ONNX Runtime adaptor can quantize statically (from its capability file)."""
    import neural_compressor.adaptor as adaptor_pkg
    import yaml

    caps = yaml.safe_load((Path(adaptor_pkg.__file__).parent / "onnxrt.yaml").read_text())
    out: set[str] = set()
    for entry in caps:
        static = entry.get("int8", {}).get("static", {})
        out.update(static.keys() if isinstance(static, dict) else [])
    return out


def _inc_recipes(q: "QuantizationSection") -> dict[str, Any]:
    from neural_compressor import PostTrainingQuantConfig

    known = set(PostTrainingQuantConfig().recipes)
    unknown = sorted(set(q.inc_recipes) - known)
    if unknown:
        raise UserError(
            f"invalid recipe: quantization.inc_recipes: unknown key(s) {', '.join(unknown)}; "
            f"INC knows {', '.join(sorted(known))}"
        )
    return dict(q.inc_recipes)


def _inc_config(q: "QuantizationSection", facts: _ModelFacts, num_samples: int, reduce_range: bool):
    from neural_compressor import PostTrainingQuantConfig
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    op_type_dict: dict[str, Any] = {}
    algorithm = _INC_ALGORITHMS[q.calibration_method]
    if q.calibration_method != "minmax":
        for op in _inc_static_op_types():
            op_type_dict.setdefault(op, {})["activation"] = {"algorithm": [algorithm]}
    if q.per_channel is not None:
        granularity = "per_channel" if q.per_channel else "per_tensor"
        for op in _INC_WEIGHTED:
            op_type_dict.setdefault(op, {})["weight"] = {"granularity": [granularity]}
    fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    excluded_types = set(q.op_types_to_exclude)
    if q.op_types_to_quantize is not None:
        excluded_types |= _inc_static_op_types() - set(q.op_types_to_quantize)
    for op in excluded_types:
        op_type_dict[op] = fp32
    op_name_dict = {name: fp32 for name in q.nodes_to_exclude} or None

    tuning = q.tuning
    kwargs: dict[str, Any] = {}
    if tuning.enabled:
        kwargs["accuracy_criterion"] = AccuracyCriterion(
            higher_is_better=True, criterion=tuning.criterion, tolerable_loss=tuning.tolerable_loss
        )
        kwargs["tuning_criterion"] = TuningCriterion(strategy="basic", max_trials=tuning.max_trials)
    try:
        return PostTrainingQuantConfig(
            approach="static",
            quant_format=_INC_FORMATS[q.format],
            calibration_sampling_size=[num_samples],
            op_type_dict=op_type_dict or None,
            op_name_dict=op_name_dict,
            recipes=_inc_recipes(q),
            reduce_range=reduce_range,
            # Without eval_func INC does not tune anyway; level 1 keeps it from an "auto" search when it does.
            quant_level=1,
            **kwargs,
        )
    except UserError:
        raise
    except Exception as e:  # INC validates with assert and schema.SchemaError
        raise UserError(f"invalid recipe: quantization settings rejected by Intel Neural Compressor: {e}") from None


@contextlib.contextmanager
def _inc_full_range_activations() -> Iterator[None]:
    """Make INC's ``reduce_range`` mean 7-bit *weights* only, as it does in onnxruntime.

    INC 3.7 applies ``reduce_range`` to the activation ranges as well (uint8
    0..127), which costs MobileFaceNet 0.4 LFW points. The saturation it guards
    against comes from the weights alone (u8 x s8 pairs summed in int16 by
    AVX2's vpmaddubsw), so onnxruntime and OpenVINO reduce only the weights.
    INC's calibrator (``ONNXRTAugment``) is the only user of the flag for
    activations; its quantizer keeps it for the weights.
    """
    from neural_compressor.adaptor.ox_utils.calibration import ONNXRTAugment

    original = ONNXRTAugment.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.reduce_range = False

    ONNXRTAugment.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        ONNXRTAugment.__init__ = original  # type: ignore[method-assign]


class _PresetHistogram:
    """Stands in for INC's HistogramCollector once the histogram is already built."""

    def __init__(self, histogram: tuple[Any, ...]) -> None:
        self.histogram = histogram

    def collect_data(self, datas: Any) -> None:
        pass


# Activation ranges INC's calibration found, by (augmented model, methods, batches), while
# _shared_calibration is active: the 8-bit and 7-bit runs of one quantize calibrate the same graph
# on the same data, and only the weights differ between them.
_CALIB_MEMO: dict[tuple[Any, ...], tuple[dict[str, list[list[Any]]], int]] | None = None


@contextlib.contextmanager
def _shared_calibration() -> Iterator[None]:
    global _CALIB_MEMO
    _CALIB_MEMO = {}
    try:
        yield
    finally:
        _CALIB_MEMO = None


@contextlib.contextmanager
def _inc_streamed_histograms() -> Iterator[None]:
    """INC's percentile and kl calibration in bounded memory, with the same ranges.

    INC 3.7 keeps every calibrated activation of every calibration batch until
    the end and then builds one histogram per tensor (about 14 GiB for 200
    faces through LResNet100E-IR). Here the calibration set is read twice
    instead: the first pass finds each tensor's range (and does INC's min-max
    tensors as INC does), the second fills histograms over that fixed range,
    which add up bin for bin to the histogram of all the data at once. Where
    the batches differ in shape, INC merges them one by one, and so does this,
    in the same order. INC's calibrator then picks the range from that histogram.
    """
    import onnxruntime
    from neural_compressor.adaptor.ox_utils.calibration import ONNXRTAugment
    from neural_compressor.adaptor.ox_utils.calibrator import CALIBRATOR, HistogramCollector
    from neural_compressor.model.onnx_model import ONNXModel

    original = ONNXRTAugment.get_activation_tensors_calib_range

    def calib_range(self: Any, q_config: Any = None) -> dict[str, list[list[Any]]]:
        if q_config is None or self.layer_wise or self.model_wrapper.is_large_model:
            return original(self, q_config)
        so = onnxruntime.SessionOptions()
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        backend = self.backend if self.backend != "TensorrtExecutionProvider" else "CUDAExecutionProvider"
        session = onnxruntime.InferenceSession(self.augmented_model.SerializeToString(), so, providers=[backend])
        input_names = [i.name for i in session.get_inputs()]
        outputs = [o.name if o.name not in self.dequantized_output else self.dequantized_output[o.name] for o in session.get_outputs()]
        wrapper = ONNXModel(self.augmented_model, load_external_data=False)
        node_of = {}
        for name in outputs:
            node = wrapper.output_name_to_node.get(name) or (wrapper.input_name_to_nodes.get(name) or [None])[0]
            assert node, f"{name} is neither an input nor an output of nodes in augmented model."
            node_of[name] = node.name

        def method(name: str) -> str:
            cfg = q_config.get(node_of[name])
            return cfg["activation"]["algorithm"] if cfg and cfg not in ("fp32", "fp16", "bf16") and "activation" in cfg else "minmax"

        fed = 0  # images read, for a progress bar when the ranges are reused

        def feeds() -> Iterator[dict[str, np.ndarray]]:
            # The batches INC's own loop would use, fed as it feeds them.
            nonlocal fed
            for idx, (inputs, _labels) in enumerate(self.dataloader):
                if self.iterations:
                    if idx > max(self.iterations):
                        break
                    if idx not in self.iterations:
                        continue
                if isinstance(inputs, dict):
                    feed = {k: np.asarray(v) for k, v in inputs.items()}
                elif len(input_names) == 1:
                    feed = {input_names[0]: np.asarray(inputs)}
                else:
                    feed = dict(zip(input_names, [np.asarray(i) for i in inputs]))
                fed += len(next(iter(feed.values())))
                yield feed

        self._dataloder_for_next_split_model = []  # (sic) INC's name; only layer-wise calibration fills it
        key = None
        if _CALIB_MEMO is not None:
            digest = hashlib.sha256(self.augmented_model.SerializeToString()).hexdigest()
            key = (digest, tuple(method(n) for n in outputs), tuple(self.iterations))
            if key in _CALIB_MEMO:
                ranges, images = _CALIB_MEMO[key]
                getattr(self.dataloader, "reused", lambda n: None)(images)
                return copy.deepcopy(ranges)
        ranges: dict[str, list[list[Any]]] = {}
        minmax: dict[str, Any] = {}
        seen: dict[str, list[Any]] = {}  # histogram tensors: [min, max, shapes]
        for feed in feeds():
            for name, out in zip(outputs, session.run(None, feed)):
                if out.size == 0:
                    continue
                if method(name) == "minmax":
                    cal = minmax.setdefault(name, CALIBRATOR["minmax"]())
                    cal.collect(out)
                    ranges[name] = [list(cal.calib_range)]
                else:
                    lo, hi = np.min(out), np.max(out)
                    st = seen.setdefault(name, [lo, hi, set()])
                    st[0], st[1] = min(st[0], lo), max(st[1], hi)
                    st[2].add(out.shape)
        if not seen:
            return _remember(key, ranges, fed)
        cals = {name: CALIBRATOR[method(name)]() for name in seen}
        hists: dict[str, Any] = {}
        for feed in feeds():
            for name, out in zip(outputs, session.run(None, feed)):
                if name not in seen or out.size == 0:
                    continue
                lo, hi, shapes = seen[name]
                if len(shapes) == 1:
                    th = max(abs(lo), abs(hi))
                    h, edges = np.histogram(out.reshape(-1), cals[name].num_bins, range=(-th, th))
                    if name in hists:
                        hists[name][0] += h
                    else:
                        hists[name] = [h, edges, lo, hi, th]
                else:
                    hists.setdefault(name, HistogramCollector(cals[name].num_bins))._collect_value(out)
        for name, cal in cals.items():
            h = hists[name]
            cal.collector = _PresetHistogram(h.histogram if isinstance(h, HistogramCollector) else tuple(h))
            cal.collect(None)
            ranges.setdefault(name, []).append(list(cal.calib_range))
        return _remember(key, ranges, fed)

    def _remember(key: tuple[Any, ...] | None, ranges: dict[str, list[list[Any]]], images: int) -> dict[str, list[list[Any]]]:
        if key is not None and _CALIB_MEMO is not None:
            _CALIB_MEMO[key] = (copy.deepcopy(ranges), images)
        return ranges

    ONNXRTAugment.get_activation_tensors_calib_range = calib_range  # type: ignore[method-assign]
    try:
        yield
    finally:
        ONNXRTAugment.get_activation_tensors_calib_range = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _signals_survive_inc() -> Iterator[None]:
    """Re-raise Ctrl-C / SIGTERM after INC's fit(), which swallows KeyboardInterrupt.

    INC 3.7 wraps its tuning loop in ``except KeyboardInterrupt: pass`` and then
    returns None (or its best model so far), so an interrupted quantize would
    look like an engine failure or even a success. The signal is recorded here
    and raised again once fit() has returned.
    """
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)
    if received:
        raise KeyboardInterrupt


def activation_bytes_per_image(model: onnx.ModelProto) -> int:
    """Bytes of the float activations one image produces (batch 1), BatchNormalization outputs left out.

    An estimate of what a histogram calibrator (percentile, kl) would hold per
    calibration image if it kept every calibrated tensor until the end, as
    INC's own does (qpipe streams INC's, see :func:`_inc_streamed_histograms`,
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


def _quantize_inc(
    model_path: Path,
    facts: _ModelFacts,
    data: CalibrationData,
    q: "QuantizationSection",
    *,
    reduce_range: bool,
    work: Path,
    progress: Progress,
    eval_bin: VerificationBin | None,
    spec: "InputSpec",
    label: str = "",
) -> _EngineRun:
    try:
        # Imported before its log is redirected: INC installs its own handler on first import.
        from neural_compressor import quantization as inc_quantization
        from neural_compressor.config import options
    except ImportError as e:
        raise UserError(
            f"Intel Neural Compressor is not importable ({e})", hint="install neural-compressor<=3.7.1 or use quantization.engine: ort"
        ) from None
    with _quiet_libraries("neural_compressor") as cap:
        conf = _inc_config(q, facts, data.num_samples, reduce_range)
        eval_func = None
        tuning_log: list[dict[str, Any]] = []
        if q.tuning.enabled:
            if eval_bin is None:
                raise UserError("accuracy-aware tuning needs verification pairs: give a .bin as the calibration set")

            def eval_func(m: Any) -> float:
                proto = m if isinstance(m, onnx.ModelProto) else onnx.load(str(m))
                res = pair_accuracy(proto, eval_bin, spec, pairs=q.tuning.eval_pairs)
                tuning_log.append({"accuracy": res.accuracy, "pairs": res.pairs})
                progress.log(f"tuning trial {len(tuning_log)}: LFW accuracy {res.accuracy:.2f} on {res.pairs} pairs")
                return res.accuracy / 100.0  # INC's tolerable_loss is a fraction

        saved_workspace = options.workspace
        options.workspace = str(work / "nc_workspace")
        try:
            passes = 1 if q.calibration_method == "minmax" else 2  # see _inc_streamed_histograms
            with _inc_full_range_activations(), _inc_streamed_histograms(), _signals_survive_inc(), progress.task(
                f"calibrating (inc{label}{', 2 passes' if passes == 2 else ''})", total=passes * data.num_samples, unit="img"
            ) as t:
                qmodel = inc_quantization.fit(
                    str(model_path), conf, calib_dataloader=_CountingLoader(data, t), eval_func=eval_func
                )
        finally:
            options.workspace = saved_workspace
    if qmodel is None:
        errors = cap.messages(logging.ERROR)
        detail = next((m for m in errors if "Unexpected exception" in m), errors[0] if errors else "no quantized model was produced")
        raise UserError(
            f"Intel Neural Compressor could not quantize {model_path}: {detail}",
            hint="try quantization.engine: ort" if not q.tuning.enabled else "loosen quantization.tuning or disable it",
        )
    warnings = [m for m in cap.messages(logging.WARNING) if _interesting_inc_warning(m)]
    tuning = {"trials": tuning_log, "eval_pairs": q.tuning.eval_pairs} if q.tuning.enabled else None
    return _EngineRun(qmodel.model, warnings, tuning)


def _interesting_inc_warning(message: str) -> bool:
    # INC warns about optional extras and its own defaults on every run; those are noise here.
    noise = (
        "mpi4py",
        "automatically detected",
        "automatically set",
        "Please note that calibration sampling size",
        "eval_func is not a plain function",
    )
    return not any(n in message for n in noise)


def _quantize_ort(
    model_path: Path,
    facts: _ModelFacts,
    data: CalibrationData,
    q: "QuantizationSection",
    *,
    reduce_range: bool,
    work: Path,
    progress: Progress,
    eval_bin: VerificationBin | None,
    spec: "InputSpec",
    label: str = "",
) -> _EngineRun:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings: list[str] = []
    if q.tuning.enabled:
        warnings.append("quantization.tuning is INC-only; engine ort quantizes once without tuning")
    if q.inc_recipes:
        warnings.append("quantization.inc_recipes is ignored by engine ort")
    pre = work / "preprocessed.onnx"
    out = work / f"int8{'-rr' if reduce_range else ''}.onnx"
    # A second run (the other weight range) reuses the first run's activation ranges.
    cache = work / "calibration-cache.json"
    with _quiet_libraries("onnxruntime") as cap, _quiet_libraries("root"):
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
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        extra = dict(q.extra_options)
        if q.calibration_method != "minmax":
            # The histogram calibrators keep every activation of every batch they are given; fed a
            # slice at a time (their histograms merge), memory stays bounded by the slice.
            batch_bytes = activation_bytes_per_image(onnx.load(str(pre), load_external_data=False)) * data.batch_size
            extra.setdefault("CalibStridedMinMax", _calibration_stride(len(data), batch_bytes))
        with progress.task(f"calibrating (ort{label})", total=0 if cache.exists() else data.num_samples, unit="img") as t:
            reader = _ProgressReader(data.ort_reader(facts.input_name), t)
            # The histogram calibrators print their progress with print(); a stage does not print.
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(pre),
                        str(out),
                        reader,
                        quant_format=QuantFormat.QOperator if q.format == "QOperator" else QuantFormat.QDQ,
                        op_types_to_quantize=sorted(op_types),
                        per_channel=bool(q.per_channel),
                        reduce_range=reduce_range,
                        # u8 activations and s8 weights, as INC uses: onnxruntime's fastest CPU pairing.
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(q.nodes_to_exclude),
                        calibrate_method=methods[q.calibration_method],
                        extra_options=extra,
                        calibration_cache_path=str(cache),
                    )
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"onnxruntime could not quantize {model_path}: {type(e).__name__}: {e}") from None
    warnings += [m for m in cap.messages(logging.WARNING)]
    return _EngineRun(onnx.load(str(out)), warnings)


class _ProgressReader:
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


def _calibration_stride(batches: int, batch_bytes: int, budget: int = CALIBRATION_SLICE_BYTES) -> int:
    """Batches per slice: the largest divisor of ``batches`` (onnxruntime requires one) within ``budget``."""
    most = max(1, budget // max(1, batch_bytes))
    return max(d for d in range(1, min(most, batches) + 1) if batches % d == 0)


ENGINES: dict[str, Callable[..., _EngineRun]] = {"inc": _quantize_inc, "ort": _quantize_ort}


# --- weight range per kernel -------------------------------------------------------------
#
# On AVX2 CPUs without VNNI, onnxruntime's u8 x s8 GEMM kernels add pairs of products in int16
# (vpmaddubsw) and saturate when weights use all 8 bits; the cure is 7-bit weights
# (reduce_range). Its depthwise convolution kernel widens to 16 bits and accumulates in int32, so
# it cannot saturate, and depthwise filters (9 weights per channel) are the ones that lose most from
# a 7th bit. So by default depthwise convolutions keep 8-bit weights: the engine runs twice, with
# the same activation ranges, and the depthwise weights of the 8-bit run are spliced into the
# 7-bit model. On MobileFaceNet this halves the int8 embedding error (mean cosine to fp32 0.988 ->
# 0.992 on 500 LFW faces).


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def has_depthwise_conv(model: onnx.ModelProto) -> bool:
    """Whether a float model has a grouped Conv with one input channel per group."""
    inits = {i.name: i for i in model.graph.initializer}
    return any(
        n.op_type == "Conv" and _attr(n, "group", 1) > 1 and len(n.input) > 1 and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 4 and inits[n.input[1]].dims[1] == 1
        for n in model.graph.node
    )


@dataclass
class _DepthwiseSite:
    weight: list[str]  # initializers of the quantized weight and bias (with their scales and zero points)
    activation: list[str]  # initializers of the input/output quantization parameters
    owners: set[str]  # nodes allowed to read the weight initializers (the conv and its DequantizeLinear)


def _depthwise_sites(model: onnx.ModelProto) -> dict[str, _DepthwiseSite]:
    """Quantized depthwise convolutions by node name, in QOperator (QLinearConv) or QDQ form."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def dq(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    sites: dict[str, _DepthwiseSite] = {}
    for n in model.graph.node:
        if _attr(n, "group", 1) <= 1:
            continue
        if n.op_type == "QLinearConv":
            w = n.input[3]
            site = _DepthwiseSite(
                weight=[n.input[i] for i in (3, 4, 5, 8) if i < len(n.input) and n.input[i]],
                activation=[n.input[i] for i in (1, 2, 6, 7)],
                owners={n.name},
            )
        elif n.op_type == "Conv" and len(n.input) > 1 and dq(n.input[1]) is not None:
            wdq = dq(n.input[1])
            bdq = dq(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            xdq = dq(n.input[0])
            w = wdq.input[0]
            site = _DepthwiseSite(
                weight=list(wdq.input) + (list(bdq.input) if bdq is not None else []),
                activation=list(xdq.input[1:]) if xdq is not None else [],
                owners={n.name, wdq.name} | ({bdq.name} if bdq is not None else set()),
            )
        else:
            continue
        if w in inits and len(inits[w].dims) == 4 and inits[w].dims[1] == 1:
            site.weight = [x for x in site.weight if x in inits]
            site.activation = [x for x in site.activation if x in inits]
            sites[n.name] = site
    return sites


def merge_depthwise_weights(reduced: onnx.ModelProto, full: onnx.ModelProto) -> int:
    """Copy ``full``'s depthwise conv weights (and biases) into ``reduced``, in place; returns how many.

    A conv is taken over only where both models quantized it the same way: the same
    inputs and bit-identical activation parameters. An initializer that another node
    also reads is taken only if it is identical in both models already.
    """
    a_inits = {i.name: i for i in reduced.graph.initializer}
    b_inits = {i.name: i for i in full.graph.initializer}
    a_nodes = {n.name: n for n in reduced.graph.node}
    b_nodes = {n.name: n for n in full.graph.node}
    readers: dict[str, set[str]] = {}
    for n in reduced.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(n.name)
    b_sites = _depthwise_sites(full)
    merged = 0
    for name, site in _depthwise_sites(reduced).items():
        other = b_sites.get(name)
        if other is None or (other.weight, other.activation) != (site.weight, site.activation):
            continue
        if list(a_nodes[name].input) != list(b_nodes[name].input):
            continue
        if any(x not in b_inits or a_inits[x] != b_inits[x] for x in site.activation):
            continue
        if any(x not in b_inits for x in site.weight):
            continue
        if any(readers.get(x, set()) - site.owners and a_inits[x] != b_inits[x] for x in site.weight):
            continue
        for x in site.weight:
            a_inits[x].CopyFrom(b_inits[x])
        merged += 1
    return merged


# --- the stage --------------------------------------------------------------------------


def _file_entry(path: Path | None, sha: str | None = None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(path), "sha256": sha or sha256_file(path), "size": path.stat().st_size if path.is_file() else None}


def _settings_blob(spec: "InputSpec", calibration: "CalibrationSection", quantization: "QuantizationSection") -> dict[str, Any]:
    return {
        "model": {"input": spec.model_dump(mode="json")},
        "calibration": calibration.model_dump(mode="json"),
        "quantization": quantization.model_dump(mode="json"),
    }


def quantize(
    model: str | Path,
    calib: str | Path,
    out: str | Path,
    *,
    input_spec: "InputSpec",
    calibration: "CalibrationSection",
    quantization: "QuantizationSection",
    recipe: "Recipe | None" = None,
    source_model: str | Path | None = None,
    eval_data: str | Path | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize a converted fp32 model to int8 with the recipe's engine and write it with its manifest.

    Args:
        model: the converted fp32 ONNX model (opset 10+, initializers not listed as inputs).
        calib: calibration images: an insightface ``.bin`` or a folder of aligned faces.
        out: the int8 model to write (atomically); ``manifest.json`` is written beside it.
        input_spec: how images become the model input (recipe ``model.input``).
        calibration: sample count, seed, batch and flip (recipe ``calibration``).
        quantization: engine, format, per-channel, exclusions, pass-through options (recipe ``quantization``).
        recipe: the full recipe, recorded resolved in the manifest with its hash.
        source_model: the original (pre-conversion) model, hashed into the manifest when given.
        eval_data: verification pairs for INC accuracy-aware tuning; default: ``calib`` when it is a ``.bin``.
        progress: progress bars and notes.
    """
    progress = progress or NULL_PROGRESS
    model_path = require_file(model, "fp32 model")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out is a directory, expected a file name: {out}")
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out} would overwrite the input model")
    src_path = require_file(source_model, "source model") if source_model is not None else None
    q = quantization
    if q.engine not in ENGINES:
        raise UserError(f"invalid recipe: quantization.engine {q.engine!r}; known engines: {', '.join(ENGINES)}")

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        proto = _load_model(model_path, "fp32 model")
        facts = check_model(proto, model_path, input_spec, calibration)
        del proto
        unknown_nodes = [n for n in q.nodes_to_exclude if n not in facts.node_names]
        if unknown_nodes:
            raise UserError(f"invalid recipe: quantization.nodes_to_exclude names nodes not in {model_path}: {', '.join(unknown_nodes)}")
        warnings: list[str] = []
        absent = [t for t in q.op_types_to_exclude if t not in facts.op_types]
        if absent:
            warnings.append(f"quantization.op_types_to_exclude: the model has no {', '.join(absent)} nodes")

        source = open_images(calib)
        data = CalibrationData.from_section(source, input_spec, calibration, facts.input_name)
        # Decode the chosen images up front: a corrupt one is then our one-line error naming its
        # index, not an exception inside the engine (INC prints its own traceback for those).
        for start in range(0, len(data.indices), 64):
            source.decode_many(data.indices[start : start + 64])
        if input_spec.cropped_size(*source.image_size) != tuple(input_spec.size):
            warnings.append(
                f"calibration images are {source.image_size[0]}x{source.image_size[1]}, resized to "
                f"{input_spec.size[0]}x{input_spec.size[1]} (model.input.size)"
            )
        eval_bin: VerificationBin | None = None
        if q.engine == "inc" and q.tuning.enabled:
            ev = open_images(eval_data) if eval_data is not None else source
            if not isinstance(ev, VerificationBin):
                raise UserError("accuracy-aware tuning needs verification pairs (a .bin), not an image folder")
            eval_bin = ev

        if q.engine == "ort" and q.format == "QDQ" and q.per_channel and facts.opset < 13:
            raise UserError(
                f"invalid recipe: quantization.per_channel with format QDQ needs opset 13+, {model_path} is opset {facts.opset}",
                hint="use format: QOperator, per_channel: false, or convert with convert.opset: 13",
            )

        reduce_range = bool(q.reduce_range)
        split = reduce_range and not q.reduce_range_depthwise and facts.depthwise
        engine = ENGINES[q.engine]
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".qpipe-quantize-", dir=out.parent))
        common: dict[str, Any] = {"work": work, "progress": progress, "eval_bin": eval_bin, "spec": input_spec}
        weights: dict[str, Any] = {"reduce_range": reduce_range, "depthwise_8bit": 0}
        try:
            if split:
                # The 8-bit run only donates depthwise weights: no tuning there.
                q_full = q.model_copy(update={"tuning": q.tuning.model_copy(update={"enabled": False})})
                with _shared_calibration():
                    full = engine(model_path, facts, data, q_full, reduce_range=False, label=", 8-bit weights", **common)
                    run = engine(model_path, facts, data, q, reduce_range=True, label=", 7-bit weights", **common)
                weights["depthwise_8bit"] = merge_depthwise_weights(run.model, full.model)
                warnings += [w for w in full.warnings if w not in run.warnings]
                del full
                if weights["depthwise_8bit"] == 0:
                    warnings.append("depthwise convolutions could not be given 8-bit weights; all weights are 7-bit")
            else:
                run = engine(model_path, facts, data, q, reduce_range=reduce_range, **common)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        warnings += run.warnings

        int8_bytes = run.model.SerializeToString()
        _smoke_test(int8_bytes, data, facts)
        op_counts = count_ops(run.model)
        del run.model
        int8_sha = sha256_bytes(int8_bytes)

    seconds = time.perf_counter() - t0
    calib_info = {
        "source": str(source.path),
        "kind": "bin" if isinstance(source, VerificationBin) else "folder",
        "sha256": source.sha256(),
        "images": source.num_images,
        "samples": len(data.indices),
        "seed": calibration.seed,
        "batch": calibration.batch,
        "flip": calibration.flip,
        "indices_sha256": data.indices_sha256,
    }
    settings = recipe.resolved() if recipe is not None else _settings_blob(input_spec, calibration, q)
    settings_sha = recipe.sha256() if recipe is not None else hashlib.sha256(
        json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    manifest_path = out.parent / MANIFEST_NAME
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "stage": "quantize",
        "engine": q.engine,
        "format": q.format,
        "weights": weights,
        "files": {
            "source": _file_entry(src_path),
            "converted": _file_entry(model_path),
            "int8": {"path": str(out), "sha256": int8_sha, "size": len(int8_bytes)},
            "calibration": {"path": str(source.path), "sha256": calib_info["sha256"], "kind": calib_info["kind"]},
        },
        "calibration": {**calib_info, "indices": [int(i) for i in data.indices]},
        "recipe": settings,
        "recipe_sha256": settings_sha,
        "op_counts": op_counts,
        "tuning": run.tuning,
        "warnings": warnings,
        "environment": environment(),
        "timing": {"quantize": {"seconds": round(seconds, 3), "peak_rss_mb": round(mem.peak_mb, 1)}},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # The model is renamed into place only after its manifest is written: a failure in between
    # (a full disk) leaves the previous int8.onnx beside the manifest that describes it.
    with atomic_path(out) as tmp:
        tmp.write_bytes(int8_bytes)
        atomic_write_json(manifest_path, manifest)
    del int8_bytes
    for w in warnings:
        progress.log(f"warning: {w}")
    result = QuantizeResult(
        output=out,
        manifest=manifest_path,
        engine=q.engine,
        format=q.format,
        op_counts=op_counts,
        calibration=calib_info,
        seconds=seconds,
        peak_rss_mb=mem.peak_mb,
        warnings=warnings,
        int8_sha256=int8_sha,
        tuning=run.tuning,
        weights=weights,
    )
    if q.recovery.enabled:
        # Accuracy recovery starts from this int8 model and may replace it (and its manifest) at ``out``;
        # its own quantizations run with recovery off.
        from pipeline.accuracy.recover import recover

        return recover(
            model_path, calib, out, input_spec=input_spec, calibration=calibration, quantization=q, recipe=recipe,
            source_model=source_model, eval_data=eval_data, first=result, progress=progress,
        ).quantize
    return result


def _smoke_test(int8: bytes, data: CalibrationData, facts: _ModelFacts) -> None:
    """Run the int8 model once on a calibration batch: a model onnxruntime cannot run is not written."""
    x = next(data.arrays())[:1]
    try:
        sess = _session(int8)
        y = sess.run([facts.output_name], {facts.input_name: x})[0]
    except Exception as e:
        raise UserError(f"the quantized model does not run in onnxruntime: {type(e).__name__}: {e}") from None
    if not np.all(np.isfinite(y)):
        raise UserError("the quantized model produces non-finite outputs on a calibration image")
