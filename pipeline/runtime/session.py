"""onnxruntime sessions: the one place a model is opened for inference, and the model wrapper that runs it.

:func:`session` opens an onnxruntime CPU session with the options the pipeline
uses (threads, graph optimisation level, quiet probing, thread spinning);
whatever onnxruntime rejects leaves as a one-line UserError naming ``what``.
:class:`OnnxModel` is that session with the model's input and output names and
its batch dimension: it runs any number of rows in batches the model accepts
(a fixed batch is filled with zero rows that are dropped again), so no caller
can feed a batch of 16 to a model exported for one image at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import onnx

from pipeline.core.errors import UserError, first_line
from pipeline.core.files import require_file

Optimization = Literal["all", "basic", "disabled"]
ModelSource = str | os.PathLike[str] | onnx.ModelProto | bytes


def session(
    model: ModelSource,
    *,
    threads: int | None = None,
    optimization: Optimization = "all",
    what: str = "model",
    quiet: bool = False,
    spinning: bool = True,
    optimized_model_path: str | os.PathLike[str] | None = None,
):
    """An onnxruntime CPU session for a model file, a ModelProto or serialized bytes.

    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core).
    ``optimization``: "all" (onnxruntime's default, QDQ chains fused into int8 kernels),
    "basic" (constant folding and BatchNormalization into Conv, fake-quant chains kept
    as written) or "disabled". ``quiet``: the caller handles a failure (probing whether
    a model runs), so onnxruntime's own error line stays out of the terminal.
    ``spinning``: let idle worker threads spin (onnxruntime's default). ``optimized_model_path``:
    also write the optimised graph there. A rejected model raises a UserError naming ``what``.
    """
    import onnxruntime as ort

    if threads is not None and threads <= 0:
        raise UserError(f"thread count must be positive, got {threads}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    # One operator at a time: the intra-op count is then the whole thread budget.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.log_severity_level = 4 if quiet else 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if isinstance(model, onnx.ModelProto):
        src: str | bytes = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        src = bytes(model)
    else:
        src = str(require_file(model, what))
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
        raise UserError(f"onnxruntime cannot load the {what}: {first_line(e)}") from None


class OnnxModel:
    """A model opened once: its session, input/output names, input shape and batch dimension.

    ``input_name`` / ``output_name``: the recipe's names (None: the model's first).
    ``spinning`` is off by default: spinning worker threads of an idle session keep
    burning the cores another session needs; measured here (2 cores, fp32 and int8
    MobileFaceNet timed interleaved), spinning made batch-1 latency 2.7x worse and the
    model timed second in a round systematically slower (ratio 1.13 vs 1.61 by order).
    The other options are :func:`session`'s. ``what`` names the model in errors
    (default: "model <path>" for a file). ``nchw``: the input must be an image batch
    (4 dimensions); off for a piece of a model whose input is an inner tensor.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        threads: int | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        spinning: bool = False,
        optimization: Optimization = "all",
        quiet: bool = False,
        what: str | None = None,
        nchw: bool = True,
    ) -> None:
        self.path: Path | None = None
        if not isinstance(model, (onnx.ModelProto, bytes, bytearray)):
            self.path = require_file(model, what or "model")
            model = self.path
        self.what = what or (f"model {self.path}" if self.path is not None else "model")
        self.threads = threads
        self.session = session(model, threads=threads, optimization=optimization, what=self.what, quiet=quiet, spinning=spinning)
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        names = [i.name for i in inputs]
        if input_name is not None and input_name not in names:
            raise UserError(f"{self.what} has no input {input_name!r} (inputs: {', '.join(names)})")
        self.input_name = input_name or names[0]
        out_names = [o.name for o in outputs]
        if output_name is not None and output_name not in out_names:
            raise UserError(f"{self.what} has no output {output_name!r} (outputs: {', '.join(out_names)})")
        self.output_name = output_name or out_names[0]
        shape = next(i.shape for i in inputs if i.name == self.input_name)
        if nchw and len(shape) != 4:
            raise UserError(f"{self.what} input {self.input_name!r} has shape {shape}; expected NCHW (4 dimensions)")
        if not shape:
            raise UserError(f"{self.what} input {self.input_name!r} is a scalar; expected a batch of rows")
        # A symbolic or unknown first dimension means any batch size is accepted.
        self.dynamic_batch = not isinstance(shape[0], int) or shape[0] <= 0
        self.fixed_batch: int | None = None if self.dynamic_batch else int(shape[0])
        self.input_shape = tuple(shape)

    def __call__(self, x: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One forward pass on exactly ``x`` (its batch must be one the model accepts); ``extra``: other inputs."""
        return self.outputs(x, [self.output_name], extra)[0]

    def outputs(self, x: np.ndarray, names: list[str], extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """One forward pass on exactly ``x``, returning the tensors ``names``."""
        try:
            return self.session.run(names, {self.input_name: x, **(extra or {})})
        except Exception as e:
            raise UserError(f"onnxruntime failed to run the {self.what} on an input of shape {tuple(x.shape)}: {first_line(e)}") from None

    def step(self, batch: int) -> int:
        """Rows per forward pass: ``batch`` if the batch is dynamic, else the model's fixed batch."""
        return max(1, int(batch)) if self.dynamic_batch else (self.fixed_batch or 1)

    def batches(
        self, x: np.ndarray, batch: int = 1, *, names: list[str] | None = None, extra: dict[str, np.ndarray] | None = None
    ) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Per forward pass: (rows of ``x`` it covered, the tensors ``names`` for those rows).

        A dynamic batch is run ``batch`` rows at a time; a fixed batch always gets
        full batches (the last one padded with zero rows, whose values are dropped
        here). ``names``: default the model's output. ``extra``: inputs other than
        the batch, fed unchanged to every pass.
        """
        step = self.step(batch)
        for start in range(0, len(x), step):
            part = np.ascontiguousarray(x[start : start + step], dtype=np.float32)
            k = len(part)
            if not self.dynamic_batch and k < step:
                part = np.concatenate([part, np.zeros((step - k, *part.shape[1:]), part.dtype)])
            if names is None:
                out = np.asarray(self(part, extra))
                if out.ndim < 1 or out.shape[0] != len(part):
                    raise UserError(f"the {self.what} returned output {self.output_name!r} of shape {out.shape} for a batch of {len(part)}")
                yield k, [out[:k]]
            else:
                yield k, [np.asarray(v)[:k] for v in self.outputs(part, names, extra)]

    def run(self, x: np.ndarray, batch: int = 1, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The model's output for every row of ``x``, stacked (see :meth:`batches`)."""
        outs = [o[0] for _, o in self.batches(x, batch, extra=extra)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
