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

from pipeline.errors import GateFailed, UserError

app = typer.Typer(
    name="qpipe",
    help="Turn an ArcFace-style ONNX face model into a verified int8 artifact: "
    "download, convert, quantize, verify; `qpipe run` chains them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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
    from pipeline.progress import RichProgress

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
    offline: Annotated[bool, typer.Option(help="Use only the cache; fail if a file is not there.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch the model and the evaluation data, trying mirrors in order, verifying sha256, into a cache."""
    from pipeline.download import download as run_download

    r = _recipe(recipe)
    res = run_download(r, dest, offline=offline, progress=_progress(quiet))
    lines = []
    for f in (res.model, res.data):
        if f is not None:
            how = "cached" if f.cached else f"from {f.source}"
            lines.append(f"{f.kind}: {f.path} sha256={f.sha256} ({how})")
    lines += [f"warning: {w}" for w in res.warnings]
    _emit(res, json_out, lines)


@app.command()
@stage_command
def convert(
    model: Annotated[Path, typer.Option("--model", "-m", help="Source ONNX model (e.g. opset 8).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Converted model to write.")],
    opset: Annotated[Optional[int], typer.Option(help="Target opset [recipe convert.opset, default 11].")] = None,
    data: Annotated[Optional[Path], typer.Option(help="insightface .bin: real faces for the equivalence gate (else seeded random images).")] = None,
    dynamic_batch: Annotated[
        Optional[bool], typer.Option("--dynamic-batch/--static-batch", help="Make the batch dimension symbolic [recipe convert.dynamic_batch].")
    ] = None,
    samples: Annotated[Optional[int], typer.Option(help="Inputs in the equivalence gate [recipe convert.check_samples].")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Gate: worst embedding cosine allowed [recipe convert.min_cosine].")] = None,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to a newer opset with onnx.version_converter, repair old exports, and prove equivalence."""
    from pipeline.convert import convert as run_convert

    r = _recipe(
        recipe,
        **{"convert.opset": opset, "convert.dynamic_batch": dynamic_batch, "convert.check_samples": samples, "convert.min_cosine": min_cosine},
    )
    c = r.convert
    res = run_convert(
        model,
        out,
        opset=c.opset,
        dynamic_batch=c.dynamic_batch if (dynamic_batch is not None or recipe is not None) else False,
        data=data,
        input_spec=r.model.input,
        samples=c.check_samples,
        min_cosine=c.min_cosine,
        progress=_progress(quiet),
    )
    lines = [f"wrote {res.output} (opset {res.opset_from} -> {res.opset_to}, ir_version {res.ir_version})"]
    lines += [f"repaired: {x}" for x in res.repairs]
    lines.append(
        f"equivalence: worst cosine {res.worst_cosine:.7f}, max abs diff {res.max_abs_diff:.3g} over {res.samples} {res.sample_source}"
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
    from pipeline.synth import synth_model as run_synth

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
    from pipeline.quantize import quantize as run_quantize

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
    res = run_quantize(
        model, calib, out, input_spec=r.model.input, calibration=r.calibration, quantization=r.quantization, recipe=r, progress=_progress(quiet)
    )
    lines = [f"wrote {res.output} ({res.engine}, {res.format}) in {res.seconds:.1f} s, peak {res.peak_rss_mb:.0f} MB"]
    for kind in ("int8", "fp32"):
        counts = res.op_counts.get(kind, {})
        if counts:
            lines.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append(f"manifest: {res.manifest}")
    lines += [f"warning: {w}" for w in res.warnings]
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
    raise UserError("verify is not available yet")


@app.command()
@stage_command
def run(
    recipe: RecipeOpt = Path("recipes/int8.yaml"),
    workdir: Annotated[Optional[Path], typer.Option(help="Artifact root [artifacts/].")] = None,
    offline: Annotated[bool, typer.Option(help="Use only cached downloads.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download, convert, quantize and verify into artifacts/<name>/<date>-<hash>/; exit code as verify."""
    raise UserError("run is not available yet")


@app.command()
@stage_command
def diagnose(
    recipe: RecipeOpt = None,
    fp32: Annotated[Optional[Path], typer.Option(help="The converted fp32 model.")] = None,
    int8: Annotated[Optional[Path], typer.Option(help="An int8 model to examine (optional).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration faces (.bin or folder).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Directory for diagnose.json and diagnose.md.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Layer-wise quantization sensitivity and static findings (dead channels, zero scales, outliers)."""
    raise UserError("diagnose is not available yet")


@manifest_app.command("verify")
@stage_command
def manifest_verify(
    directory: Annotated[Path, typer.Argument(help="Artifact directory with manifest.json.")],
    json_out: JsonOpt = False,
) -> None:
    """Re-hash every file the manifest lists; exit 1 on any difference."""
    raise UserError("manifest verify is not available yet")


@app.command()
@stage_command
def embed(
    images: Annotated[list[Path], typer.Argument(help="Photos (faces are detected and aligned).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 or int8 model.")],
    recipe: RecipeOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Write embeddings to this .npy (+ .json index) instead of printing.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Detect, align and embed photos; L2-normalised embeddings."""
    raise UserError("embed is not available yet")


@app.command()
@stage_command
def compare(
    a: Annotated[Path, typer.Argument(help="First photo.")],
    b: Annotated[Path, typer.Argument(help="Second photo.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 or int8 model.")],
    threshold: Annotated[Optional[float], typer.Option(help="Cosine similarity threshold for 'same'.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="A verify report (dir or report.json) to take the threshold from.")] = None,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cosine similarity of two faces and a same/different verdict."""
    raise UserError("compare is not available yet")


@app.command("pack-bin")
@stage_command
def pack_bin(
    images: Annotated[Path, typer.Option(help="Folder of photos, one sub-folder per person.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="insightface .bin to write.")],
    pairs: Annotated[Optional[Path], typer.Option(help="LFW pairs.txt naming the pairs.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Detect, align and pack your own photos into an insightface .bin for quantize --calib and verify --data."""
    raise UserError("pack-bin is not available yet")


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
