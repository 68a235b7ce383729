"""Context managers that change how INC 3.7.1 behaves inside ``quantization.fit``, each for one reason.

Each changes one thing (a method of INC's ONNX Runtime adaptor, the signal
handlers, or the memo of calibrated ranges) for the duration of a ``with``
block and restores it afterwards, so nothing leaks into other code that
imports INC. They are written against INC 3.7.1,
the release the pipeline pins (later releases dropped the ONNX backend).

- :func:`full_range_activations`: ``reduce_range`` narrows the weights only, as in onnxruntime.
- :func:`shared_calibration`: the 8-bit and 7-bit runs of one quantize calibrate once.
- :func:`streamed_histograms`: percentile/kl calibration in bounded memory, same ranges.
- :func:`signals_survive`: Ctrl-C and SIGTERM are not swallowed by INC's tuning loop.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import signal
import threading
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def full_range_activations() -> Iterator[None]:
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
# shared_calibration is active: the 8-bit and 7-bit runs of one quantize calibrate the same graph
# on the same data, and only the weights differ between them.
_CALIB_MEMO: dict[tuple[Any, ...], tuple[dict[str, list[list[Any]]], int]] | None = None


@contextlib.contextmanager
def shared_calibration() -> Iterator[None]:
    """While active, INC runs that calibrate the same augmented graph on the same batches reuse the ranges.

    Takes effect through :func:`streamed_histograms`, which does the calibrating.
    """
    global _CALIB_MEMO
    _CALIB_MEMO = {}
    try:
        yield
    finally:
        _CALIB_MEMO = None


@contextlib.contextmanager
def streamed_histograms() -> Iterator[None]:
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
def signals_survive() -> Iterator[None]:
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
