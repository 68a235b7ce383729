"""The photo commands: embed, compare, pack-bin.

Each parses its options, calls one function of a lower layer, prints the typed result
and leaves the exit code to :func:`pipeline.cli.common.stage_command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import JsonOpt, QuietOpt, RecipeOpt, emit, progress_bars, recipe_with, stage_command


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

    r = recipe_with(recipe, **{"verify.flip": flip})
    res = run_embed(images, model=model, input_spec=r.model.input, select=select, flip=r.verify.flip, out=out, progress=progress_bars(quiet))
    if res.out is not None:
        lines = [f"wrote {res.out} ({len(res.images)} x {res.dim} float32, L2-normalised) and index {res.index}"]
    else:
        lines = [f"{p}\t" + " ".join(f"{v:.6f}" for v in e) for p, e in zip(res.images, res.embeddings)]
    emit(res, json_out, lines)


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

    r = recipe_with(recipe)
    if flip is None and report is None and recipe is not None:
        flip = r.verify.flip
    # flip None with a report: compare uses the protocol the report's threshold was found with.
    res = run_compare(a, b, model=model, input_spec=r.model.input, threshold=threshold, report=report, select=select, flip=flip)
    lines = [
        f"{res.verdict}: cosine {res.cosine:.4f} {'>' if res.same else '<='} threshold {res.threshold_cosine:.4f} "
        f"(squared L2 {res.distance:.4f} vs {res.threshold_distance:.4f}; threshold from {res.threshold_source})"
    ]
    lines += [f"note: {n}" for n in res.notes]
    emit(res, json_out, lines)


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
        images, out, pairs=pairs, identities=identities, num_pairs=num_pairs, seed=seed, strict=strict, select=select, progress=progress_bars(quiet)
    )
    lines = [f"wrote {res.out}: {res.pairs} pairs ({res.same} same, {res.different} different) from {res.photos} photos; sha256={res.sha256}"]
    if res.skipped:
        lines.append(f"skipped {len(res.skipped)} photo(s) and {res.dropped_pairs} pair(s) naming them:")
        lines += [f"  {s['path']}: {s['reason']}" for s in res.skipped]
    emit(res, json_out, lines)
