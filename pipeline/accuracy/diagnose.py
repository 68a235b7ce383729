"""Why an int8 model loses accuracy: layer-wise sensitivity and static findings, as ``qpipe diagnose`` reports them.

The model is seen the way the engines see it (onnxruntime's basic
optimisations: BatchNormalization folded into its Conv,
:mod:`pipeline.accuracy.engine_graph`), activation ranges are measured once
on the recipe's calibration faces (:mod:`pipeline.accuracy.ranges`), static
findings are read off the weights and ranges (:mod:`pipeline.accuracy.findings`),
and the per-node embedding error comes from the gated simulation
(:mod:`pipeline.accuracy.simulate`), all with the conventions the recipe's
settings mean (:class:`~pipeline.stages.quantize.scheme.QuantScheme`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import onnx

from pipeline.accuracy.engine_graph import GraphIndex, QNode, engine_view, quantizable_nodes
from pipeline.accuracy.findings import (
    MODEL_WIDE, Finding, activation_findings, engine_findings, int8_model_findings, weight_findings,
)
from pipeline.accuracy.ranges import TensorStats, activation_stats, calibrated_ranges, calibration_images
from pipeline.accuracy.simulate import NodeSensitivity, SimulatedModel, sensitivity, simulate
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_json, atomic_write_text, require_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.runtime.graph import find_input, find_output, load_model
from pipeline.stages.quantize.scheme import QuantScheme

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection


@dataclass
class Analysis:
    """A model as the engine sees it, its activation ranges and static findings; the simulation on demand."""

    view: onnx.ModelProto
    nodes: list[QNode]
    stats: dict[str, TensorStats]
    ranges: dict[str, tuple[float, float]]  # what the engine quantizes each tensor with
    scheme: QuantScheme
    images: np.ndarray
    input_name: str
    output_name: str
    findings: list[Finding]
    _sims: dict[int, SimulatedModel] = field(default_factory=dict, repr=False)

    def simulator(self, samples: int) -> SimulatedModel:
        if samples not in self._sims:
            self._sims[samples] = simulate(
                self.view, self.nodes, self.ranges, self.scheme, self.images[:samples], input_name=self.input_name, output_name=self.output_name
            )
        return self._sims[samples]

    def index(self, names: Iterable[str]) -> list[int]:
        pos = {qn.name: qn.index for qn in self.nodes}
        return [pos[n] for n in names if n in pos]


def analyse(
    model: onnx.ModelProto, images: np.ndarray, scheme: QuantScheme, *, input_name: str, output_name: str, progress: Progress | None = None
) -> Analysis:
    """Engine view, quantizable nodes, activation ranges on ``images`` and the static findings of ``model``."""
    view = engine_view(model)
    nodes = quantizable_nodes(view)
    if not nodes:
        raise UserError("the model has no node the engines quantize (Conv, Gemm, MatMul, Add/Mul of two activations)")
    tensors = [t for qn in nodes for t in (*qn.activations, qn.output)]
    percentile = scheme.engine if scheme.calibration == "percentile" else None
    stats = activation_stats(view, images, tensors, input_name=input_name, percentile=percentile, progress=progress)
    g = GraphIndex.of(view)
    ranges = calibrated_ranges(nodes, g, stats, scheme)
    findings = weight_findings(g, nodes, ranges, scheme) + activation_findings(nodes, stats, scheme) + engine_findings(nodes, g, scheme)
    return Analysis(view, nodes, stats, ranges, scheme, images, input_name, output_name, findings)


# --- the result ------------------------------------------------------------------------


@dataclass
class DiagnoseResult:
    fp32: Path
    int8: Path | None
    scheme: dict[str, Any]
    samples: int  # faces in the sensitivity measurement
    range_samples: int  # faces in the range measurement
    quantizable: int
    error_all: float  # simulated: every node quantized
    sensitivity: list[NodeSensitivity]
    findings: list[Finding]
    seconds: float
    report_json: Path | None = None
    report_md: Path | None = None

    @property
    def culprits(self) -> list[str]:
        """Nodes named by a high-severity finding or in the sensitivity top three, most suspect first."""
        names: list[str] = []
        for f in self.findings:
            if f.severity == "high" and f.node not in names and f.node != MODEL_WIDE:
                names.append(f.node)
        for r in self.sensitivity[:3]:
            if r.node not in names:
                names.append(r.node)
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32": str(self.fp32),
            "int8": str(self.int8) if self.int8 else None,
            "scheme": self.scheme,
            "samples": self.samples,
            "range_samples": self.range_samples,
            "quantizable_nodes": self.quantizable,
            "error_all_quantized": self.error_all,
            "culprits": self.culprits,
            "findings": [f.to_dict() for f in self.findings],
            "sensitivity": [r.to_dict() for r in self.sensitivity],
            "seconds": round(self.seconds, 3),
            "report_json": str(self.report_json) if self.report_json else None,
            "report_md": str(self.report_md) if self.report_md else None,
        }

    def summary(self, top: int = 10) -> list[str]:
        lines = [
            f"{self.quantizable} quantizable nodes; simulated all-int8 embedding error {self.error_all:.2e} (1 - cosine, {self.samples} faces)",
        ]
        for f in self.findings:
            if f.severity != "info":
                lines.append(f"{f.severity}: {f.node}: {f.kind}: {f.message}")
        lines.append("most sensitive nodes (error when only that node is int8):")
        for r in self.sensitivity[:top]:
            extra = f", gain if fp32 {r.gain_if_fp32:.2e}" if r.gain_if_fp32 is not None else ""
            lines.append(f"  {r.rank:>3}. {r.node} ({r.op_type}) {r.error_alone:.2e}{extra}")
        return lines


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


def markdown(res: DiagnoseResult) -> str:
    s = res.scheme
    out = [
        "# Quantization diagnosis",
        "",
        f"- fp32 model: `{res.fp32}`" + (f"; int8 model: `{res.int8}`" if res.int8 else ""),
        f"- simulated engine: {s['engine']}, {'per-channel' if s['per_channel'] else 'per-tensor'} int8 weights "
        f"(+-{s['weight_half_levels']} levels"
        + (f", depthwise +-{s['depthwise_half_levels']}" if s.get("depthwise_half_levels") else "")
        + f"), uint8 activations ({s['activation_levels']} levels), {s.get('calibration', 'minmax')} ranges",
        f"- ranges from {res.range_samples} calibration faces; sensitivity on {res.samples}",
        f"- {res.quantizable} quantizable nodes; embedding error with all of them int8 (simulated): {res.error_all:.2e}",
        f"- suspects: {', '.join(f'`{c}`' for c in res.culprits) or 'none'}",
        "",
        "## Findings",
        "",
    ]
    if res.findings:
        out += ["| severity | kind | node | finding | channels / nodes |", "| --- | --- | --- | --- | --- |"]
        order = {"high": 0, "warning": 1, "info": 2}
        for f in sorted(res.findings, key=lambda f: order.get(f.severity, 3)):
            where = [str(c) for c in f.channels] or [f"`{n}`" for n in f.nodes]
            ch = ", ".join(where[:12]) + (" ..." if len(where) > 12 else "")
            out.append(f"| {f.severity} | {f.kind} | `{f.node}` | {f.message} | {ch} |")
    else:
        out.append("None.")
    out += [
        "",
        "## Layer-wise sensitivity",
        "",
        "Embedding error (mean 1 - cosine to fp32) when only this node is int8, and when every node but this one is; "
        "gain = error with all int8 - error with this node left fp32.",
        "",
        "| rank | node | op | error, only this int8 | error, all but this int8 | gain if fp32 |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in res.sensitivity:
        out.append(f"| {r.rank} | `{r.node}` | {r.op_type} | {_fmt(r.error_alone)} | {_fmt(r.error_without)} | {_fmt(r.gain_if_fp32)} |")
    return "\n".join(out) + "\n"


def write_report(res: DiagnoseResult, report_dir: str | Path) -> DiagnoseResult:
    """``diagnose.json`` and ``diagnose.md`` in ``report_dir``."""
    d = Path(report_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"report directory is a file: {d}")
    res.report_json = d / "diagnose.json"
    res.report_md = d / "diagnose.md"
    atomic_write_json(res.report_json, res.to_dict())
    atomic_write_text(res.report_md, markdown(res))
    return res


# --- the command -----------------------------------------------------------------------


def diagnose(
    fp32: str | Path,
    *,
    calib: str | Path | None,
    input_spec: "InputSpec",
    calibration: "CalibrationSection",
    quantization: "QuantizationSection",
    int8: str | Path | None = None,
    samples: int | None = None,
    both: bool = True,
    report_dir: str | Path | None = None,
    images: np.ndarray | None = None,
    progress: Progress | None = None,
) -> DiagnoseResult:
    """Layer-wise sensitivity and static findings for quantizing ``fp32`` as the recipe would.

    Args:
        fp32: the converted fp32 model.
        calib: calibration faces (``.bin`` or folder): the recipe's seeded choice of
            ``calibration.samples`` faces sets the activation ranges.
        input_spec, calibration, quantization: recipe sections; ``quantization`` picks the
            simulated engine's conventions (engine, per_channel, reduce_range).
        int8: an int8 model to inspect for zero/non-finite scales and saturated biases.
        samples: faces the sensitivity is measured on (the first of the calibration
            choice); default ``quantization.recovery.sensitivity_samples``.
        both: also measure each node left fp32 with all others int8 (doubles the runs).
        report_dir: write ``diagnose.json`` and ``diagnose.md`` there.
        images: preprocessed calibration images (NCHW float32) instead of reading ``calib``.
        progress: progress reporting.
    """
    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    fp32 = require_file(fp32, "fp32 model")
    source = load_model(fp32, "fp32 model")
    inp = find_input(source, input_spec.name)
    outp = find_output(source, input_spec.output)
    n_sens = samples if samples is not None else quantization.recovery.sensitivity_samples
    if n_sens <= 0:
        raise UserError(f"diagnose: sensitivity samples must be positive, got {n_sens}")
    int8_proto = None
    int8_path = None
    if int8 is not None:
        int8_path = require_file(int8, "int8 model")
        int8_proto = load_model(int8_path, "int8 model")
    if images is None:
        if calib is None:
            raise UserError("diagnose needs calibration faces: --calib FILE.bin or an image folder")
        images = calibration_images(calib, input_spec, calibration, inp.name)
    scheme = QuantScheme.from_section(quantization)
    an = analyse(source, images, scheme, input_name=inp.name, output_name=outp.name, progress=progress)
    findings = list(an.findings)
    if int8_proto is not None:
        findings += int8_model_findings(int8_proto, source, an.nodes)
    rows, err_all = sensitivity(an.simulator(n_sens), both=both, progress=progress)
    res = DiagnoseResult(
        fp32=fp32, int8=int8_path, scheme=scheme.to_dict(), samples=min(n_sens, len(images)), range_samples=len(images),
        quantizable=len(an.nodes), error_all=err_all, sensitivity=rows, findings=findings, seconds=time.perf_counter() - t0,
    )
    return write_report(res, report_dir) if report_dir is not None else res
