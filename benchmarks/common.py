"""Shared pieces of the benchmark scripts: the model cache, quantization variants, interleaved timing.

Every variant is quantized in a child process of its own, so its wall time and
peak resident memory (``ru_maxrss`` of that child) are those of the
quantization alone, not of whatever this process already holds. Results are
cached beside the model (``<variant>.onnx`` + ``<variant>.json``) so a second
run only times.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MFN = SHARED / "models" / "mobilefacenet-opset8.onnx"
LFW = SHARED / "data" / "lfw.bin"
DEFAULT_CACHE = ROOT / "artifacts" / "bench-cache"


@dataclass(frozen=True)
class Variant:
    """One int8 recipe. ``engine`` inc goes through pipeline.stages.quantize.stage (the shipped path); ort calls
    onnxruntime.quantization directly so options the recipe does not expose (U8U8, op sets) can be tried."""

    name: str
    engine: str  # "inc" | "ort"
    opset: int
    format: str  # "QOperator" | "QDQ"
    per_channel: bool
    reduce_range: bool = True
    activation: str = "QUInt8"
    weight: str = "QInt8"
    calibration_method: str = "minmax"
    extra_op_types: tuple[str, ...] = ()  # added to onnxruntime's registry set (QDQ: Add, Mul for the residual adds)
    op_types_to_exclude: tuple[str, ...] = ()
    note: str = ""


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("inc-qop", "inc", 11, "QOperator", False, note="INC QOperator, per-tensor, minmax"),
        Variant("inc-qop-pc", "inc", 11, "QOperator", True, note="INC QOperator, per-channel weights"),
        Variant("inc-qdq-o13", "inc", 13, "QDQ", True, note="INC QDQ at opset 13, per-channel"),
        Variant("ort-qop", "ort", 11, "QOperator", False, note="onnxruntime QOperator, per-tensor"),
        Variant("ort-qop-pc", "ort", 11, "QOperator", True, note="onnxruntime QOperator, per-channel"),
        Variant("ort-qdq-pc-o13", "ort", 13, "QDQ", True, extra_op_types=("Add", "Mul"), note="onnxruntime QDQ per-channel, opset 13, Add/Mul quantized"),
        Variant("ort-qop-pc-u8u8", "ort", 11, "QOperator", True, reduce_range=False, weight="QUInt8", note="onnxruntime QOperator per-channel, u8 weights"),
        Variant("ort-qop-pc-fullrange", "ort", 11, "QOperator", True, reduce_range=False, note="per-channel, 8-bit weights (reduce_range off)"),
        Variant("ort-qop-pc-noadd", "ort", 11, "QOperator", True, op_types_to_exclude=("Add", "Mul"), note="per-channel, residual Add and input Mul left fp32"),
        Variant("ort-qop-pc-entropy", "ort", 11, "QOperator", True, calibration_method="entropy", note="per-channel, entropy calibration"),
    ]
}


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --- models --------------------------------------------------------------------------------


def prepare_fp32(model: str, cache: Path, *, depth: int, width: int, opsets: set[int]) -> dict[int, Path]:
    """Converted fp32 models (opset -> path), built once into ``cache``."""
    from pipeline.stages.convert import convert

    cache.mkdir(parents=True, exist_ok=True)
    if model == "standin":
        src = cache / f"lresnet{depth}w{width}-opset8.onnx"
        if not src.exists():
            from pipeline.stages.synth import synth_model

            synth_model(src, depth=depth, width=width)
        stem = f"lresnet{depth}w{width}"
    else:
        src, stem = MFN, "mobilefacenet"
    out = {}
    for op in sorted(opsets):
        dst = cache / f"{stem}-opset{op}.onnx"
        if not dst.exists():
            convert(src, dst, opset=op, dynamic_batch=True)
        out[op] = dst
    return out


def _child_quantize(v: Variant, src: str, out: str, calib: str, samples: int) -> dict[str, Any]:
    """Runs in a fresh process: quantize, return wall time, peak RSS and op counts."""
    import logging

    import onnx

    from pipeline.stages.quantize.opcounts import count_ops

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    if v.engine == "inc":
        from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection
        from pipeline.stages.quantize.job import Int8Job
        from pipeline.stages.quantize.stage import quantize

        quantize(Int8Job(
            model=src, calib=calib, out=out,
            input_spec=InputSpec(),
            calibration=CalibrationSection(samples=samples),
            quantization=QuantizationSection(
                engine="inc", format=v.format, per_channel=v.per_channel, reduce_range=v.reduce_range,
                calibration_method=v.calibration_method, op_types_to_exclude=list(v.op_types_to_exclude),
            ),
        ))
    else:
        import contextlib
        import io
        import tempfile

        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from pipeline.data.bins import open_images
        from pipeline.data.calibration import CalibrationData
        from pipeline.recipe import InputSpec

        data = CalibrationData(open_images(calib), InputSpec(), samples=samples, input_name="data")
        registry = QLinearOpsRegistry if v.format == "QOperator" else QDQRegistry
        op_types = (set(registry) | set(v.extra_op_types)) - set(v.op_types_to_exclude)
        with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(src, str(pre), skip_symbolic_shape=True)
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(pre), out + ".tmp", data.ort_reader("data"),
                    quant_format=QuantFormat[v.format], op_types_to_quantize=sorted(op_types),
                    per_channel=v.per_channel, reduce_range=v.reduce_range,
                    activation_type=QuantType[v.activation], weight_type=QuantType[v.weight],
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[v.calibration_method],
                    extra_options={"max_intermediate_outputs": 32},
                )
        os.replace(out + ".tmp", out)
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    counts = count_ops(onnx.load(out))
    # CPU seconds do not grow with other jobs' load the way wall time does: on a loaded machine they
    # bound what the same step takes on an idle one (from above, as long as it uses at least one core).
    return {"seconds": seconds, "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024.0,
            "op_counts": counts, "samples": samples}


def quantize_variant(v: Variant, src: Path, cache: Path, stem: str, *, calib: Path, samples: int, rebuild: bool = False) -> tuple[Path, dict[str, Any]]:
    out = cache / f"{stem}-{v.name}-s{samples}.onnx"
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists() and not rebuild:
        return out, json.loads(meta.read_text())
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        info = pool.submit(_child_quantize, v, str(src), str(out), str(calib), samples).result()
    info["bytes"] = out.stat().st_size
    info["load_avg"] = load_avg()
    meta.write_text(json.dumps(info, indent=1))
    return out, info


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    rounds_ms: dict[str, list[float]] = field(default_factory=dict)
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""

    def p50(self, name: str) -> float:
        return float(np.percentile(self.samples_ms[name], 50))

    def ratios(self, base: str, name: str) -> list[float]:
        return [b / x for b, x in zip(self.rounds_ms[base], self.rounds_ms[name])]

    def speedup(self, base: str, name: str) -> tuple[float, float, float]:
        q25, q50, q75 = np.percentile(self.ratios(base, name), [25, 50, 75])
        return float(q50), float(q25), float(q75)


def interleaved(paths: dict[str, Path], x: np.ndarray, *, rounds: int, runs: int, warmup: int, threads: int) -> Timing:
    """Time every model at batch 1 in one process, in the same rounds.

    The loop is the package's own (pipeline.eval.speed.interleaved_rounds, also
    behind ``qpipe verify`` and placement): each round runs ``runs`` inferences of
    every model back to back (its figure is their median), the order reversing
    from round to round. Sessions come from pipeline.eval.speed.open_for_latency
    (no spinning threads, sequential execution), the sessions verification uses;
    here fp32 is shared by all variants so they are compared under the same load.
    """
    from pipeline.eval.speed import interleaved_rounds, open_for_latency

    models = open_for_latency(paths, threads=threads, input_name=None, output_name=None)
    one = np.ascontiguousarray(x[:1], dtype=np.float32)
    load_before = load_avg()
    r = interleaved_rounds(models, one, warmup=warmup, rounds=rounds, runs_per_round=runs)
    return Timing(r.rounds_ms, r.samples_ms, load_before, load_avg())


def faces(n: int = 16) -> np.ndarray:
    """``n`` preprocessed LFW faces (the timing and cosine inputs); seeded random pixels without ../shared."""
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess
    from pipeline.recipe import InputSpec

    if LFW.exists():
        b = read_bin(LFW)
        return preprocess(b.decode_many(np.arange(n)), InputSpec())
    return np.random.default_rng(0).uniform(0, 255, size=(n, 3, 112, 112)).astype(np.float32)


def worst_cosine(fp32: Path, int8: Path, x: np.ndarray) -> float:
    from pipeline.runtime.session import OnnxModel

    a = OnnxModel(fp32, threads=1)
    b = OnnxModel(int8, threads=1)
    ea = np.concatenate([a(x[i : i + 1]) for i in range(len(x))])
    eb = np.concatenate([b(x[i : i + 1]) for i in range(len(x))])
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1) + 1e-12)
    return float(cos.min())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_line() -> str:
    from pipeline.core import environment as envinfo

    cpu = envinfo.cpu_info()
    flags = cpu.get("flags", {})
    vnni = bool(flags.get("avx512_vnni") or flags.get("avx_vnni"))
    return (f"CPU {cpu.get('model')}, {cpu.get('physical_cores')} cores, avx2={bool(flags.get('avx2'))} "
            f"avx512f={bool(flags.get('avx512f'))} vnni={vnni}; onnxruntime {envinfo.package_version('onnxruntime')}; "
            f"python {sys.version.split()[0]}")
