"""The int8 step: quantize as the recipe says, recover accuracy when the recipe asks, then write the manifest once.

``qpipe quantize`` and the quantize stage of ``qpipe run`` both call
:func:`build_int8`. The quantize stage writes the recipe's int8 model and
returns what its manifest records; with ``quantization.recovery.enabled``,
accuracy recovery starts from that model and may put another candidate at
``out`` (a repaired fp32 model, nodes back in fp32); with
``quantization.placement.enabled``, speed-aware placement then times that model
against variants with node groups in fp32 and may put the fastest within the
accuracy target there. The one ``manifest.json`` beside ``out`` then describes
whichever model is there (its ``placement`` section: where each node ended up and why).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.accuracy.placement import place
from pipeline.accuracy.recover import check_recovery, recover
from pipeline.build.manifest import MANIFEST_NAME, write_quantize_manifest
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.stage import QuantizeResult, quantize

if TYPE_CHECKING:
    from pipeline.core.progress import Progress


def build_int8(
    job: Int8Job,
    *,
    report_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    write_manifest: bool = True,
    progress: "Progress | None" = None,
) -> QuantizeResult:
    """Quantize ``job.model`` to ``job.out``, recovering accuracy when ``job.quantization.recovery.enabled``; ``manifest.json`` beside it.

    ``job.quantization.recovery`` switches recovery on and sets its target
    (:func:`pipeline.accuracy.recover.recover`), ``job.quantization.placement`` speed-aware
    placement (:func:`pipeline.accuracy.placement.place`); ``job.eval_data`` feeds INC's
    tuning and scores their candidates.

    Args:
        job: what to quantize and how (:class:`~pipeline.stages.quantize.job.Int8Job`).
        report_dir: where recovery writes recovery.json/.md and diagnose.json/.md; default beside ``job.out``.
        cache_dir: fp32 embedding cache recovery and placement share with ``qpipe verify``, or None.
        write_manifest: False for a caller that records the manifest itself
            (:func:`pipeline.build.manifest.quantize_manifest` of the result): nothing is written beside ``job.out``.
        progress: progress bars and notes.

    Returns the quantize result of the model at ``job.out``: its ``recovery`` holds the
    manifest's recovery section when recovery ran, its ``manifest`` the manifest's path.
    """
    recovering = job.quantization.recovery.enabled
    placing = job.quantization.placement.enabled
    if recovering or (placing and not job.pairs.is_dir()):
        # Before quantizing: a recovery (or a placement's accuracy target) that cannot work must not
        # leave an int8 model without its manifest.
        check_recovery(job)

    def manifest_first(body: dict) -> None:
        # Without recovery the manifest goes in before the model it describes replaces the old one.
        write_quantize_manifest(job.out, body)

    res = quantize(job, before_publish=manifest_first if write_manifest and not (recovering or placing) else None, progress=progress)
    if not recovering and not placing:
        return dataclasses.replace(res, manifest=job.out.parent / MANIFEST_NAME if write_manifest else None)
    if recovering:
        res = recover(job, first=res, report_dir=report_dir, cache_dir=cache_dir, progress=progress).quantize
    if placing:
        res, _ = place(job, base=res, cache_dir=cache_dir, progress=progress)
    if not write_manifest:
        return res
    manifest = write_quantize_manifest(res.output, res.manifest_body(), recovery=res.recovery, placement=res.placement)
    return dataclasses.replace(res, manifest=manifest)
