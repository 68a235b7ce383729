"""The build commands: run (several recipes too), index, manifest verify, recipe-doc.

Each parses its options, calls one function of a lower layer, prints the typed result
and leaves the exit code to :func:`pipeline.cli.common.stage_command`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli.common import DEFAULT_CACHE, JsonOpt, QuietOpt, emit, error_line, progress_bars, recipe_with, stage_command
from pipeline.core.errors import GateFailed


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
    jobs = [(str(p), recipe_with(p, **overrides, **table), reproduce_command(str(p), overrides)) for p in paths]
    kwargs = dict(workdir=workdir, offline=offline, progress=progress_bars(quiet), cache_dir=cache, embeddings_dir=embeddings, lock_timeout=lock_timeout)
    if len(jobs) == 1:
        res = run_build(jobs[0][1], command=jobs[0][2], **kwargs)
        emit(res, json_out, _run_lines(res))
        if not res.passed:
            raise GateFailed(list(res.gate.get("reasons") or ["gate failed"]))
        return

    def report(o: Any) -> None:
        if not json_out:
            typer.echo(f"== {o.path} ==")
            typer.echo("\n".join(_run_lines(o.result)) if o.result else "stopped: error (below)")
        if o.error:
            error_line(f"{o.path}: {o.error}")
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
        error_line(line)
    if mismatches:
        raise typer.Exit(code=1)


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
    emit(check, json_out, lines)
    if not check.ok:
        raise typer.Exit(code=1)


def recipe_doc() -> None:
    """Print every recipe key with its type, default and description (Markdown)."""
    from pipeline.recipe import schema_markdown

    typer.echo(schema_markdown(), nl=False)
