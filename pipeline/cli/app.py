"""The qpipe command line.

Each command parses options, calls one stage function, prints its typed
result and sets the exit code: 0 success, 1 a failed gate, 2 a usage or input
error (one line on stderr, never a traceback), 130 interrupted. Stage modules
are imported inside the commands so that `qpipe --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipeline.core.errors import GateFailed, UserError

app = typer.Typer(
    name="qpipe",
    help="Turn an ArcFace-style ONNX face model into a verified int8 artifact: "
    "download, convert, quantize, verify; `qpipe run` chains them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help texts cite recipe keys as [recipe a.b]; rich markup would eat the brackets.
    rich_markup_mode=None,
)
manifest_app = typer.Typer(help="Check an artifact directory against its manifest.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")

DEFAULT_CACHE = Path("calibration") / "downloads"

RecipeOpt = Annotated[
    Optional[Path],
    typer.Option("--recipe", "-r", help="YAML build recipe (see `qpipe recipe-doc`); without it, every option has its default."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _err(message: str) -> None:
    typer.echo(f"qpipe: error: {message}", err=True)


def stage_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map stage exceptions to exit codes: UserError -> 2, GateFailed -> 1, interrupt -> 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _err(str(e))
            raise typer.Exit(code=2) from None
        except GateFailed as e:
            for reason in e.reasons:
                typer.echo(f"qpipe: gate failed: {reason}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            _err("interrupted; nothing was left under a final name")
            raise typer.Exit(code=130) from None
        except MemoryError:
            _err("out of memory")
            raise typer.Exit(code=2) from None
        except OSError as e:
            # Disk full, permission denied and the like are the user's environment, not a bug.
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            _err(f"{e.strerror or e}{where}")
            raise typer.Exit(code=2) from None

    return wrapper


def _recipe(path: Path | None, **overrides: Any):
    from pipeline.recipe import default_recipe, load_recipe, with_overrides

    recipe = load_recipe(path) if path is not None else default_recipe()
    return with_overrides(recipe, overrides) if any(v is not None for v in overrides.values()) else recipe


def _progress(quiet: bool):
    from pipeline.core.progress import RichProgress

    return RichProgress(enabled=not quiet)


def _emit(result: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


# --- stages -------------------------------------------------------------------


@app.command()
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

    r = _recipe(recipe)
    # Warnings (unpinned hash, failed mirrors, no range support) reach stderr through progress.log as they happen.
    res = run_download(r, dest, offline=offline, progress=_progress(quiet))
    lines = []
    for f in (res.model, res.data):
        if f is not None:
            how = "cached" if f.cached else f"from {f.source}, {f.size / 1e6:.1f} MB in {f.seconds:.1f} s"
            lines.append(f"{f.kind}: {f.path} sha256={f.sha256} ({how})")
    _emit(res, json_out, lines)


@app.command()
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
    recipe: RecipeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to a newer opset with onnx.version_converter, repair old exports, and prove equivalence."""
    from pipeline.stages.convert import convert as run_convert

    r = _recipe(
        recipe,
        **{"convert.opset": opset, "convert.dynamic_batch": dynamic_batch, "convert.check_samples": samples, "convert.min_cosine": min_cosine},
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
        progress=_progress(quiet),
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
    _emit(res, json_out, lines)


@app.command("synth-model")
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
    _emit(res, json_out, [f"wrote {res.path}: depth {res.depth}, {res.parameters:,} parameters, {res.bytes:,} bytes"])


@app.command()
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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Post-training static int8 quantization (Intel Neural Compressor or onnxruntime), driven by the recipe."""
    from pipeline.accuracy.recovery_report import summary_lines as recovery_summary
    from pipeline.build.int8 import build_int8

    if model is None or calib is None:
        raise UserError("quantize needs --model (the converted fp32 model) and --calib (a .bin or image folder)")
    r = _recipe(
        recipe,
        **{
            "quantization.engine": engine,
            "quantization.format": quant_format,
            "quantization.per_channel": per_channel,
            "calibration.samples": samples,
            "calibration.seed": seed,
            "quantization.recovery.enabled": recover,
        },
    )
    res = build_int8(
        model, calib, out, input_spec=r.model.input, calibration=r.calibration, quantization=r.quantization, recipe=r, progress=_progress(quiet)
    )
    lines = [f"wrote {res.output} ({res.engine}, {res.format}) in {res.seconds:.1f} s, peak {res.peak_rss_mb:.0f} MB"]
    for kind in ("int8", "fp32"):
        counts = res.op_counts.get(kind, {})
        if counts:
            lines.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if res.weights.get("reduce_range"):
        dw = res.weights.get("depthwise_8bit", 0)
        lines.append("weights: 7-bit (reduce_range)" + (f", 8-bit in {dw} depthwise conv(s)" if dw else ""))
    lines.append(f"calibration: {res.calibration['samples']} images (seed {res.calibration['seed']}) from {res.calibration['source']}")
    lines.append(f"manifest: {res.manifest}")
    lines += [f"warning: {w}" for w in res.warnings]
    lines += recovery_summary(res.recovery)
    _emit(res, json_out, lines)


@app.command()
@stage_command
def verify(
    recipe: RecipeOpt = None,
    fp32: Annotated[Optional[Path], typer.Option(help="The fp32 model.")] = None,
    int8: Annotated[Optional[Path], typer.Option(help="The int8 model.")] = None,
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

    r = _recipe(
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
        cache_dir=cache_dir, progress=_progress(quiet),
    )
    if report is not None:
        write_reports(res, report)
    _emit(res, json_out, summary_lines(res))
    if not res.passed:
        raise GateFailed(res.gate["reasons"])


@app.command()
@stage_command
def run(
    recipe: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--recipe", "-r",
            help="YAML build recipe [recipes/int8.yaml]; give it several times, or a quoted glob ('recipes/*.yaml'), "
            "to build several in turn with the same caches (exit 0: all passed, 1: a gate failed, 2: an error).",
        ),
    ] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Artifact root [artifacts/].")] = None,
    offline: Annotated[bool, typer.Option(help="Use only cached downloads.")] = False,
    cache: Annotated[Path, typer.Option(help="Download cache (as `qpipe download --dest`).")] = DEFAULT_CACHE,
    embeddings: Annotated[Path, typer.Option(help="Cache of fp32 embeddings (as `qpipe verify --cache-dir`).")] = Path("calibration") / "embeddings",
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Gate: largest accuracy drop in points [recipe gate.max_accuracy_drop].")] = None,
    min_speedup: Annotated[Optional[float], typer.Option(help="Gate: smallest speedup [recipe gate.min_speedup].")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Verify on the first N pairs only: a quick subset gate [recipe verify.pairs].")] = None,
    lock_timeout: Annotated[float, typer.Option(help="Seconds to wait for another run building the same recipe.")] = 3600.0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download, convert, quantize and verify into artifacts/<name>/<date>-<hash>/; exit code as verify."""
    from pipeline.build.run import combined_exit_code, expand_recipe_paths, reproduce_command, run_many
    from pipeline.build.run import run as run_build

    overrides = {"gate.max_accuracy_drop": max_accuracy_drop, "gate.min_speedup": min_speedup, "verify.pairs": pairs}
    # A --min-speedup given here applies on every CPU, in place of a per-class table.
    table = {"gate.min_speedup_by_class": {} if min_speedup is not None else None}
    paths = expand_recipe_paths(recipe or [Path("recipes/int8.yaml")])
    jobs = [(str(p), _recipe(p, **overrides, **table), reproduce_command(str(p), overrides)) for p in paths]
    kwargs = dict(workdir=workdir, offline=offline, progress=_progress(quiet), cache_dir=cache, embeddings_dir=embeddings, lock_timeout=lock_timeout)
    if len(jobs) == 1:
        res = run_build(jobs[0][1], command=jobs[0][2], **kwargs)
        _emit(res, json_out, _run_lines(res))
        if not res.passed:
            raise GateFailed(list(res.gate.get("reasons") or ["gate failed"]))
        return

    def report(o: Any) -> None:
        if not json_out:
            typer.echo(f"== {o.path} ==")
            typer.echo("\n".join(_run_lines(o.result)) if o.result else "stopped: error (below)")
        if o.error:
            _err(f"{o.path}: {o.error}")
        elif not o.result.passed:
            for reason in o.result.gate.get("reasons") or ["gate failed"]:
                typer.echo(f"qpipe: gate failed: {o.result.recipe}: {reason}", err=True)

    outcomes = run_many(jobs, on_outcome=report, **kwargs)
    if json_out:
        typer.echo(json.dumps({"exit_code": combined_exit_code(outcomes), "recipes": [o.to_dict() for o in outcomes]}, indent=2, default=str))
    else:
        typer.echo("== summary ==")
        for o in outcomes:
            verdict = "error" if o.result is None else ("passed" if o.result.passed else "gate FAILED")
            typer.echo(f"{o.path}: {verdict}" + (f" ({o.result.directory})" if o.result else ""))
    code = combined_exit_code(outcomes)
    if code:
        raise typer.Exit(code=code)


def _run_lines(res: Any) -> list[str]:
    lines = [f"{name}: reused (inputs unchanged)" if st.reused else f"{name}: done in {st.wall_s:.1f} s" for name, st in res.stages.items()]
    lines += [f"artifact: {res.directory}", f"model card: {res.model_card}", f"manifest: {res.manifest}"]
    lines.append(f"gate: {'passed' if res.passed else 'FAILED'}" + (f"; latest -> {res.latest}" if res.latest else ""))
    lines += [f"warning: {w}" for w in res.warnings]
    return lines


@app.command()
@stage_command
def index(
    dirs: Annotated[list[Path], typer.Argument(help="Build directories, or folders holding them (artifact roots, downloaded CI artifacts).")],
    out: Annotated[Optional[Path], typer.Option(help="Where index.json and index.md go [the first DIR; its parent when DIR is a build].")] = None,
    check_same_int8: Annotated[
        bool, typer.Option("--check-same-int8", help="Exit 1 when builds of one recipe report different int8.onnx sha256, naming them.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """One table of recipe x target (accuracy, speedup, CPU class, verdict, int8 sha256) from the builds' manifests."""
    from pipeline.build.index import render_markdown, run_index

    idx, j, m, mismatches = run_index(dirs, out, check_same_int8=check_same_int8)
    if json_out:
        typer.echo(json.dumps(idx, indent=2, sort_keys=True))
    else:
        typer.echo(render_markdown(idx), nl=False)
        typer.echo(f"wrote {j} and {m}")
    for line in mismatches:
        _err(line)
    if mismatches:
        raise typer.Exit(code=1)


@app.command()
@stage_command
def diagnose(
    recipe: RecipeOpt = None,
    fp32: Annotated[Optional[Path], typer.Option(help="The converted fp32 model.")] = None,
    int8: Annotated[Optional[Path], typer.Option(help="An int8 model to examine (optional).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration faces (.bin or folder).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Directory for diagnose.json and diagnose.md.")] = None,
    samples: Annotated[
        Optional[int], typer.Option(help="Faces the sensitivity is measured on [recipe quantization.recovery.sensitivity_samples].")
    ] = None,
    both: Annotated[
        bool, typer.Option("--both/--alone-only", help="Also measure each node left fp32 with all others int8 (about twice the time).")
    ] = True,
    top: Annotated[int, typer.Option(help="Sensitivity rows printed (the report has every node).")] = 10,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Layer-wise quantization sensitivity and static findings (dead channels, zero scales, outliers)."""
    from pipeline.accuracy.diagnose import diagnose as run_diagnose

    if fp32 is None:
        raise UserError("diagnose needs --fp32 (the converted fp32 model)")
    r = _recipe(recipe, **{"quantization.recovery.sensitivity_samples": samples})
    if calib is None and recipe is not None:
        from pipeline.stages.download import local_data_file

        calib = local_data_file(r, DEFAULT_CACHE)
    if calib is None:
        raise UserError("diagnose needs calibration faces: --calib FILE.bin or an image folder")
    res = run_diagnose(
        fp32, calib=calib, input_spec=r.model.input, calibration=r.calibration, quantization=r.quantization, int8=int8,
        both=both, report_dir=report, progress=_progress(quiet),
    )
    lines = res.summary(top)
    if res.report_md is not None:
        lines.append(f"report: {res.report_md} and {res.report_json}")
    _emit(res, json_out, lines)


@manifest_app.command("verify")
@stage_command
def manifest_verify(
    directory: Annotated[Path, typer.Argument(help="Artifact directory with manifest.json.")],
    allow_extra: Annotated[bool, typer.Option(help="Do not count files that the manifest does not list.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash every file the manifest lists; exit 1 on any difference, 2 when the manifest is missing or invalid."""
    from pipeline.build.manifest import verify_manifest

    check = verify_manifest(directory, allow_extra=allow_extra)
    lines = check.problems() + [f"{'OK' if check.ok else 'FAILED'}: {check.checked} files checked in {check.directory}"]
    _emit(check, json_out, lines)
    if not check.ok:
        raise typer.Exit(code=1)


@app.command()
@stage_command
def embed(
    images: Annotated[list[Path], typer.Argument(help="Photos or folders of photos (faces are detected and aligned).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 or int8 model.")],
    recipe: RecipeOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write embeddings to this .npy (+ .json index beside it) instead of printing.")] = None,
    select: Annotated[str, typer.Option(help="Face to use when a photo shows several: largest or center.")] = "largest",
    flip: Annotated[
        Optional[bool], typer.Option("--flip/--no-flip", help="Sum with the mirror image's embedding, as verify does (default: recipe verify.flip, true).")
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Detect, align and embed photos; L2-normalised embeddings."""
    from pipeline.photos.embed import embed as run_embed

    r = _recipe(recipe, **{"verify.flip": flip})
    res = run_embed(images, model=model, input_spec=r.model.input, select=select, flip=r.verify.flip, out=out, progress=_progress(quiet))
    if res.out is not None:
        lines = [f"wrote {res.out} ({len(res.images)} x {res.dim} float32, L2-normalised) and index {res.index}"]
    else:
        lines = [f"{p}\t" + " ".join(f"{v:.6f}" for v in e) for p, e in zip(res.images, res.embeddings)]
    _emit(res, json_out, lines)


@app.command()
@stage_command
def compare(
    a: Annotated[Path, typer.Argument(help="First photo.")],
    b: Annotated[Path, typer.Argument(help="Second photo.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 or int8 model.")],
    threshold: Annotated[Optional[float], typer.Option(help="Cosine similarity above which the faces are the same person.")] = None,
    report: Annotated[
        Optional[Path], typer.Option(help="A verify report (dir or report.json): its mean best threshold (squared L2) converted to cosine.")
    ] = None,
    select: Annotated[str, typer.Option(help="Face to use when a photo shows several: largest or center.")] = "largest",
    flip: Annotated[
        Optional[bool], typer.Option("--flip/--no-flip", help="Sum with the mirror image's embedding, as verify does (default: as the report's protocol did, else recipe verify.flip).")
    ] = None,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cosine similarity of two faces and a same/different verdict."""
    from pipeline.photos.compare import compare as run_compare

    r = _recipe(recipe)
    if flip is None and report is None and recipe is not None:
        flip = r.verify.flip
    # flip None with a report: compare uses the protocol the report's threshold was found with.
    res = run_compare(a, b, model=model, input_spec=r.model.input, threshold=threshold, report=report, select=select, flip=flip)
    lines = [
        f"{res.verdict}: cosine {res.cosine:.4f} {'>' if res.same else '<='} threshold {res.threshold_cosine:.4f} "
        f"(squared L2 {res.distance:.4f} vs {res.threshold_distance:.4f}; threshold from {res.threshold_source})"
    ]
    lines += [f"note: {n}" for n in res.notes]
    _emit(res, json_out, lines)


@app.command("pack-bin")
@stage_command
def pack_bin(
    images: Annotated[Path, typer.Option(help="Folder of photos: LFW layout Name/Name_0001.jpg, or one sub-folder per person.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="insightface .bin to write.")],
    pairs: Annotated[Optional[Path], typer.Option(help="LFW pairs.txt naming the pairs.")] = None,
    identities: Annotated[bool, typer.Option("--identities", help="Draw same/different pairs from the sub-folders (one per person) instead of --pairs.")] = False,
    num_pairs: Annotated[int, typer.Option(help="With --identities: number of pairs, half same, half different.")] = 600,
    seed: Annotated[int, typer.Option(help="With --identities: seed for drawing the pairs.")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when a photo cannot be read or shows no face (default: list and skip it).")] = False,
    select: Annotated[str, typer.Option(help="Face to use when a photo shows several: largest or center.")] = "largest",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Detect, align and pack your own photos into an insightface .bin for quantize --calib and verify --data."""
    from pipeline.photos.pack import pack_bin as run_pack

    res = run_pack(
        images, out, pairs=pairs, identities=identities, num_pairs=num_pairs, seed=seed, strict=strict, select=select, progress=_progress(quiet)
    )
    lines = [f"wrote {res.out}: {res.pairs} pairs ({res.same} same, {res.different} different) from {res.photos} photos; sha256={res.sha256}"]
    if res.skipped:
        lines.append(f"skipped {len(res.skipped)} photo(s) and {res.dropped_pairs} pair(s) naming them:")
        lines += [f"  {s['path']}: {s['reason']}" for s in res.skipped]
    _emit(res, json_out, lines)


@app.command("recipe-doc")
def recipe_doc() -> None:
    """Print every recipe key with its type, default and description (Markdown)."""
    from pipeline.recipe import schema_markdown

    typer.echo(schema_markdown(), nl=False)


def _sigterm(signum: int, frame: Any) -> None:
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so atomic writes clean up their temporary files.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    app()


if __name__ == "__main__":
    main()
