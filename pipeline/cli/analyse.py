"""The analysis command: diagnose.

Each parses its options, calls one function of a lower layer, prints the typed result
and leaves the exit code to :func:`pipeline.cli.common.stage_command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import DEFAULT_CACHE, JsonOpt, QuietOpt, RecipeOpt, emit, progress_bars, recipe_with, stage_command
from pipeline.core.errors import UserError


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
    r = recipe_with(recipe, **{"quantization.recovery.sensitivity_samples": samples})
    if calib is None and recipe is not None:
        from pipeline.stages.download import local_data_file

        calib = local_data_file(r, DEFAULT_CACHE)
    if calib is None:
        raise UserError("diagnose needs calibration faces: --calib FILE.bin or an image folder")
    res = run_diagnose(
        fp32, calib=calib, input_spec=r.model.input, calibration=r.calibration, quantization=r.quantization, int8=int8,
        both=both, report_dir=report, progress=progress_bars(quiet),
    )
    lines = res.summary(top)
    if res.report_md is not None:
        lines.append(f"report: {res.report_md} and {res.report_json}")
    emit(res, json_out, lines)
