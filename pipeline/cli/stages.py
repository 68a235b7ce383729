"""The stage commands: download, convert, synth-model, quantize, verify.

Each parses its options, calls one function of a lower layer, prints the typed result
and leaves the exit code to :func:`pipeline.cli.common.stage_command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import DEFAULT_CACHE, JsonOpt, QuietOpt, RecipeOpt, emit, progress_bars, recipe_with, stage_command
from pipeline.core.errors import GateFailed, UserError


@stage_command


def download(
    recipe: RecipeOpt = Path("recipes/int8.yaml"),
    dest: Annotated[Path, typer.Option(help="Cache directory for the model and the data.")] = DEFAULT_CACHE,
    offline: Annotated[
        bool, typer.Option(help="No network: use the cache and local (file://, path) sources only; fail if a file is in neither.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch the model and the evaluation data, trying mirrors in order, verifying sha256, into a cache.

    A zip member (data.member) is read by HTTP range requests; a second call is answered from the cache.
    """
    from pipeline.stages.download import download as run_download

    r = recipe_with(recipe)
    # Warnings (unpinned hash, failed mirrors, no range support) reach stderr through progress.log as they happen.
    res = run_download(r, dest, offline=offline, progress=progress_bars(quiet))
    lines = []
    for f in (res.model, res.data):
        if f is not None:
            how = "cached" if f.cached else f"from {f.source}, {f.size / 1e6:.1f} MB in {f.seconds:.1f} s"
            lines.append(f"{f.kind}: {f.path} sha256={f.sha256} ({how})")
    emit(res, json_out, lines)


@stage_command


def convert(
    model: Annotated[Path, typer.Option("--model", "-m", help="Source ONNX model (e.g. opset 8).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Converted model to write.")],
    opset: Annotated[Optional[int], typer.Option(help="Target opset [recipe convert.opset, default 11].")] = None,
    data: Annotated[Optional[Path], typer.Option(help="insightface .bin: real faces for the equivalence gate (else seeded random images).")] = None,
    dynamic_batch: Annotated[
        Optional[bool], typer.Option("--dynamic-batch/--static-batch", help="Symbolic batch, or the batch the model was exported with [recipe convert.dynamic_batch, default dynamic].")
    ] = None,
    samples: Annotated[Optional[int], typer.Option(help="Inputs in the equivalence gate [recipe convert.check_samples].")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Gate: worst embedding cosine allowed [recipe convert.min_cosine].")] = None,
    prelu: Annotated[
        Optional[str], typer.Option(help="rewrite: PRelu as depthwise 1x1 convolutions, Relu and Add (same function, faster); keep: as exported [recipe convert.prelu, default rewrite].")
    ] = None,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to a newer opset with onnx.version_converter, repair old exports, and prove equivalence."""
    from pipeline.stages.convert import convert as run_convert

    r = recipe_with(
        recipe,
        **{
            "convert.opset": opset, "convert.dynamic_batch": dynamic_batch, "convert.check_samples": samples,
            "convert.min_cosine": min_cosine, "convert.prelu": prelu,
        },
    )
    c = r.convert
    res = run_convert(
        model,
        out,
        opset=c.opset,
        dynamic_batch=c.dynamic_batch,
        data=data,
        input_spec=r.model.input,
        samples=c.check_samples,
        min_cosine=c.min_cosine,
        prelu=c.prelu,
        progress=progress_bars(quiet),
    )
    if res.copied:
        lines = [f"copied {res.source} unchanged to {res.output} (already at opset {res.opset_from})"]
    else:
        lines = [f"wrote {res.output} (opset {res.opset_from} -> {res.opset_to}, ir_version {res.ir_version}) in {res.seconds:.1f} s"]
    lines += [f"repaired: {x}" for x in res.repairs]
    batch = f" and one batch of {res.batch_checked}" if res.batch_checked else ""
    against = "" if res.reference == "source model" else f" (compared with the {res.reference})"
    lines.append(
        f"equivalence: worst cosine {res.worst_cosine:.7f}, max abs diff {res.max_abs_diff:.3g} "
        f"over {res.samples} {res.sample_source}{batch}{against}"
    )
    emit(res, json_out, lines)


@stage_command


def synth_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the opset-8 stand-in model.")],
    depth: Annotated[int, typer.Option(help="LResNet-IR depth: 18, 50 or 100 (100 is the Zoo model's size, ~261 MB).")] = 100,
    spatial0: Annotated[bool, typer.Option("--spatial0", help="Write BatchNormalization with spatial=0 (old MXNet exports).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Build an opset-8 LResNet-IR stand-in with the Zoo ArcFace's op mix and shapes (random weights)."""
    from pipeline.stages.synth import synth_model as run_synth

    res = run_synth(out, depth=depth, spatial0=spatial0, seed=seed)
    emit(res, json_out, [f"wrote {res.path}: depth {res.depth}, {res.parameters:,} parameters, {res.bytes:,} bytes"])


@stage_command


def quantize(
    recipe: RecipeOpt = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Converted fp32 model (opset 11).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration faces: insightface .bin or a folder of aligned images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="int8 model to write; manifest.json goes beside it.")] = Path("int8.onnx"),
    engine: Annotated[Optional[str], typer.Option(help="inc or ort [recipe quantization.engine].")] = None,
    quant_format: Annotated[Optional[str], typer.Option("--format", help="QOperator or QDQ [recipe quantization.format].")] = None,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor", help="Weight scales [recipe quantization.per_channel].")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Calibration images [recipe calibration.samples].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the calibration choice [recipe calibration.seed].")] = None,
    recover: Annotated[
        Optional[bool], typer.Option("--recover/--no-recover", help="Accuracy recovery when int8 misses the target [recipe quantization.recovery.enabled].")
    ] = None,
    placement: Annotated[
        Optional[bool],
        typer.Option("--placement/--no-placement", help="Time int8 variants with node groups in fp32 and keep the fastest within the accuracy target [recipe quantization.placement.enabled]."),
    ] = None,
    prelu: Annotated[
        Optional[str],
        typer.Option(help="rewrite: PRelu left in the model is expressed in int8-kernel ops first (checked on calibration faces); keep: it stays fp32 [recipe quantization.prelu, default rewrite]."),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Post-training static int8 quantization (Intel Neural Compressor or onnxruntime), driven by the recipe."""
    from pipeline.accuracy.recovery_report import summary_lines as recovery_summary
    from pipeline.build.int8 import build_int8
    from pipeline.stages.quantize.job import Int8Job

    if model is None or calib is None:
        raise UserError("quantize needs --model (the converted fp32 model) and --calib (a .bin or image folder)")
    r = recipe_with(
        recipe,
        **{
            "quantization.engine": engine,
            "quantization.format": quant_format,
            "quantization.per_channel": per_channel,
            "calibration.samples": samples,
            "calibration.seed": seed,
            "quantization.recovery.enabled": recover,
            "quantization.placement.enabled": placement,
            "quantization.prelu": prelu,
        },
    )
    res = build_int8(Int8Job.from_recipe(r, model=model, calib=calib, out=out), progress=progress_bars(quiet))
    lines = [f"wrote {res.output} ({res.engine}, {res.format}) in {res.seconds:.1f} s, peak {res.peak_rss_mb:.0f} MB"]
    lines += res.summary()
    if res.weights.get("reduce_range"):
        dw = res.weights.get("depthwise_8bit", 0)
        lines.append("weights: 7-bit (reduce_range)" + (f", 8-bit in {dw} depthwise conv(s)" if dw else ""))
    lines.append(f"calibration: {res.calibration['samples']} images (seed {res.calibration['seed']}) from {res.calibration['source']}")
    lines.append(f"manifest: {res.manifest}")
    lines += [f"warning: {w}" for w in res.warnings]
    lines += recovery_summary(res.recovery)
    lines += list((res.placement or {}).get("summary") or [])
    emit(res, json_out, lines)


@stage_command


def verify(
    recipe: RecipeOpt = None,
    fp32: Annotated[Optional[Path], typer.Option(help="The fp32 model.")] = None,
    int8: Annotated[Optional[Path], typer.Option(help="The int8 model.")] = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option(help="The user's model as given (converted, not rewritten); the gate reads the speedup over it [default: the --fp32 model]."),
    ] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="insightface verification .bin; give several times for several sets.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Directory for report.json, report.md and report.png.")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Use only the first N pairs: a quick subset gate [recipe verify.pairs].")] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads for latency [recipe verify.threads].")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Interleaved timing rounds [recipe verify.rounds].")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Gate: largest accuracy drop in points [recipe gate.max_accuracy_drop].")] = None,
    min_speedup: Annotated[Optional[float], typer.Option(help="Gate: smallest speedup [recipe gate.min_speedup].")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Cache of fp32 embeddings.")] = Path("calibration") / "embeddings",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gate the int8 model on verification accuracy parity with fp32 and on measured speedup (exit 1 on failure)."""
    from pipeline.stages.download import local_data_file
    from pipeline.stages.report import summary_lines, write_reports
    from pipeline.stages.verify import verify as run_verify

    r = recipe_with(
        recipe,
        **{
            "verify.pairs": pairs,
            "verify.threads": threads,
            "verify.rounds": rounds,
            "gate.max_accuracy_drop": max_accuracy_drop,
            "gate.min_speedup": min_speedup,
            "gate.min_speedup_by_class": {} if min_speedup is not None else None,  # --min-speedup applies on every CPU
        },
    )
    if fp32 is None or int8 is None:
        raise UserError("verify needs --fp32 and --int8: the two models to compare")
    sets = list(data or [])
    if not sets and recipe is not None:
        found = local_data_file(r, DEFAULT_CACHE)
        sets = [found] if found is not None else []
    if not sets:
        raise UserError("verify needs --data FILE.bin (an insightface verification set; give it several times for several sets)")
    res = run_verify(
        fp32, int8, sets, input_spec=r.model.input, verify=r.verify, gate=r.gate,
        cache_dir=cache_dir, baseline=baseline, progress=progress_bars(quiet),
    )
    if report is not None:
        write_reports(res, report)
    emit(res, json_out, summary_lines(res))
    if not res.passed:
        raise GateFailed(res.gate["reasons"])
