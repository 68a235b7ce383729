"""Post-training static int8 quantization behind one function, two engines.

``engine: inc`` runs Intel Neural Compressor 3.7's ``quantization.fit`` with a
``PostTrainingQuantConfig``; ``engine: ort`` runs onnxruntime's own
``quantize_static`` (after its ``quant_pre_process``), so the pipeline keeps
working without INC's ONNX backend, which later INC releases dropped. Both
engines read the same :class:`~pipeline.data.calibration.CalibrationData`, take their
settings from the recipe's ``quantization`` section as
:class:`~pipeline.stages.quantize.scheme.QuantScheme` reads it, and leave
nothing in the current directory: their scratch files live in a temporary
directory beside the output, removed afterwards.

The stage reads an :class:`~pipeline.stages.quantize.job.Int8Job` (files and
recipe sections) and writes the int8 model atomically at its ``out``. Everything its manifest
records (hashes of the source, converted and int8 models and of the
calibration set, the resolved recipe and its hash, the calibration indices,
library versions, CPU facts, wall time and peak memory) comes back in the
result, :meth:`QuantizeResult.manifest_body`; the build layer writes it.

Both engines are deterministic for the same inputs and recipe (same bytes;
the explicit ``reduce_range`` keeps INC's CPU-dependent default out, see
:mod:`~pipeline.stages.quantize.inc`). The recipe's settings mean the same in
both engines (:mod:`~pipeline.stages.quantize.scheme`): by default 7-bit
weights in the GEMM-based kernels, 8-bit activations, 8-bit depthwise weights
(:mod:`~pipeline.stages.quantize.depthwise`). What each setting costs or gains
on MobileFaceNet is measured in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx

from pipeline.core.environment import PeakMemory, environment
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, require_file, sha256_bytes, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.data.bins import VerificationBin, open_images
from pipeline.data.calibration import CalibrationData
from pipeline.runtime.session import OnnxModel, session
from pipeline.data.preprocess import preprocess
from pipeline.eval.embeddings import SAME_FUNCTION_MIN_COSINE, agreement, embed_each
from pipeline.stages.batchnorm import BatchNormRewrite, rewrite_batchnorm, standalone_batchnorms
from pipeline.stages.prelu import PreluRewrite, count_prelu, rewrite_prelu
from pipeline.stages.quantize import inc, ort
from pipeline.stages.quantize.checks import ModelFacts, check_exclusions, check_format, check_model, load_model
from pipeline.stages.quantize.depthwise import merge_depthwise_weights
from pipeline.stages.quantize.engine import Engine
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.opcounts import count_ops
from pipeline.stages.quantize.scheme import QuantScheme

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection

# The manifest body's schema: the build layer writes the body as manifest.json beside the model.
MANIFEST_SCHEMA = "qpipe.quantize-manifest/1"

ENGINES: dict[str, Engine] = {"inc": inc.ENGINE, "ort": ort.ENGINE}
# Calibration faces run through the model before and after its int8-form rewrites (convert's gate runs 8 too).
FORMS_CHECK_FACES = 8


@dataclass
class QuantizeResult:
    """What ``qpipe quantize`` produced. ``op_counts``: {"int8": {op: n}, "fp32": {op: n}, "quant_dequant": {...}}.

    ``manifest``: where the manifest describing ``output`` was written, set by
    whoever writes it (the stage itself writes none). ``record``: the manifest's
    body, see :meth:`manifest_body`.
    """

    output: Path
    engine: str
    format: str
    op_counts: dict[str, dict[str, int]]
    calibration: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)
    int8_sha256: str = ""
    tuning: dict[str, Any] | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # reduce_range and how many depthwise convs kept 8-bit weights
    # Set when PRelu nodes were rewritten into the int8 form before quantizing: what changed and the check it passed.
    prelu: dict[str, Any] | None = None
    # Set when BatchNormalization nodes no Conv absorbs became 1x1 depthwise Convs: what changed and the same check.
    batchnorm: dict[str, Any] | None = None
    # Set when accuracy recovery ran: what it repaired, kept in fp32, measured.
    recovery: dict[str, Any] | None = None
    # Set when speed-aware placement ran: the candidates it timed and where each node ended up.
    placement: dict[str, Any] | None = None
    manifest: Path | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    def manifest_body(self) -> dict[str, Any]:
        """The body of ``manifest.json`` for this int8 model (a copy: the writer may add to it).

        Keys: schema, stage, engine, format, weights, files (source, converted, int8,
        calibration with sha256), calibration (with the indices), recipe, recipe_sha256,
        op_counts, prelu and batchnorm (the rewrites into int8 forms before quantizing, or None), tuning, warnings,
        environment, timing, created.
        """
        return copy.deepcopy(self.record)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["record"]  # the manifest's business; it would repeat the calibration indices and environment
        manifest = str(self.manifest) if self.manifest is not None else None
        return {"output": str(self.output), "manifest": manifest, **{k: v for k, v in d.items() if k not in ("output", "manifest")}}

    def summary(self) -> list[str]:
        lines = []
        for label, done in (("PRelu", self.prelu), ("BatchNormalization", self.batchnorm)):
            if done:
                lines.append(f"{label}: {done['summary']} (worst cosine {done['worst_cosine']:.7f} over {done['faces']} faces)")
        for kind in ("int8", "fp32"):
            counts = self.op_counts.get(kind, {})
            if counts:
                lines.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return lines


def quantize(
    job: Int8Job,
    *,
    before_publish: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize ``job.model`` to int8 with the recipe's engine and write it atomically at ``job.out``.

    The manifest is not written here: :meth:`QuantizeResult.manifest_body` holds it.
    ``before_publish`` is called with that body once the model is complete but before it
    is renamed to ``job.out``: a caller that writes the manifest there never leaves a new
    model beside an old manifest (a full disk stops the manifest, and the model with it).
    ``job.quantization.recovery`` and ``job.quantization.placement`` are not this function's
    business; ``job.eval_data`` only feeds INC's accuracy-aware tuning. ``progress``: progress bars and notes.
    """
    progress = progress or NULL_PROGRESS
    model_path = require_file(job.model, "fp32 model")
    out = job.out
    if out.exists() and out.is_dir():
        raise UserError(f"--out is a directory, expected a file name: {out}")
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out} would overwrite the input model")
    src_path = require_file(job.source_model, "source model") if job.source_model is not None else None
    input_spec, calibration, q, recipe = job.input_spec, job.calibration, job.quantization, job.recipe
    if q.engine not in ENGINES:
        raise UserError(f"invalid recipe: quantization.engine {q.engine!r}; known engines: {', '.join(ENGINES)}")
    scheme = QuantScheme.from_section(q)

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        proto = load_model(model_path, "fp32 model")
        original = proto.SerializeToString() if _has_int8_forms(proto, scheme, q) else None
        prelu, batchnorm = _express_int8_forms(proto, model_path, scheme, q) if original is not None else (None, None)
        facts = check_model(proto, model_path, input_spec, calibration)
        rewritten = proto.SerializeToString() if prelu is not None or batchnorm is not None else None
        del proto
        warnings = check_exclusions(facts, model_path, q)

        source = open_images(job.calib)
        data = CalibrationData.from_section(source, input_spec, calibration, facts.input_name)
        prelu_record: dict[str, Any] | None = None
        batchnorm_record: dict[str, Any] | None = None
        if rewritten is not None and original is not None:
            faces = preprocess(source.decode_many(data.indices[:FORMS_CHECK_FACES]), input_spec)
            check = {"worst_cosine": _check_int8_forms(original, rewritten, faces, facts, prelu, batchnorm), "faces": len(faces)}
            if prelu is not None:
                prelu_record = {**prelu.to_dict(), "summary": prelu.summary(), **check}
            if batchnorm is not None:
                batchnorm_record = {**batchnorm.to_dict(), "summary": batchnorm.summary(), **check}
        del original
        # Decode the chosen images up front: a corrupt one is then our one-line error naming its
        # index, not an exception inside the engine (INC prints its own traceback for those).
        for start in range(0, len(data.indices), 64):
            source.decode_many(data.indices[start : start + 64])
        if input_spec.cropped_size(*source.image_size) != tuple(input_spec.size):
            warnings.append(
                f"calibration images are {source.image_size[0]}x{source.image_size[1]}, resized to "
                f"{input_spec.size[0]}x{input_spec.size[1]} (model.input.size)"
            )
        eval_bin: VerificationBin | None = None
        if q.engine == "inc" and q.tuning.enabled:
            ev = open_images(job.eval_data) if job.eval_data is not None else source
            if not isinstance(ev, VerificationBin):
                raise UserError("accuracy-aware tuning needs verification pairs (a .bin), not an image folder")
            eval_bin = ev
        check_format(facts, model_path, q, scheme)

        split = scheme.depthwise_half_levels is not None and facts.depthwise
        engine = ENGINES[q.engine]
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".qpipe-quantize-", dir=out.parent))
        common: dict[str, Any] = {"work": work, "progress": progress, "eval_bin": eval_bin, "spec": input_spec}
        engine_input = model_path
        main = scheme.uniform(scheme.weight_levels(depthwise=False))
        weights: dict[str, Any] = {"reduce_range": main.engine_reduce_range, "depthwise_8bit": 0}
        try:
            if rewritten is not None:
                # The engines read a file: the rewritten graph goes to the scratch directory, removed afterwards.
                engine_input = work / "fp32-int8-forms.onnx"
                engine_input.write_bytes(rewritten)
                del rewritten
            if split:
                # The 8-bit run only donates depthwise weights: no tuning there.
                q_donor = q.model_copy(update={"tuning": q.tuning.model_copy(update={"enabled": False})})
                donor = scheme.uniform(scheme.weight_levels(depthwise=True))
                with engine.shared_calibration():
                    full = engine.quantize(engine_input, facts, data, q_donor, donor, label=", 8-bit weights", **common)
                    run = engine.quantize(engine_input, facts, data, q, main, label=", 7-bit weights", **common)
                weights["depthwise_8bit"] = merge_depthwise_weights(run.model, full.model)
                warnings += [w for w in full.warnings if w not in run.warnings]
                del full
                if weights["depthwise_8bit"] == 0:
                    warnings.append("depthwise convolutions could not be given 8-bit weights; all weights are 7-bit")
            else:
                run = engine.quantize(engine_input, facts, data, q, main, **common)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        warnings += run.warnings

        int8_bytes = run.model.SerializeToString()
        _smoke_test(int8_bytes, data, facts)
        op_counts = count_ops(run.model)
        del run.model
        int8_sha = sha256_bytes(int8_bytes)

    seconds = time.perf_counter() - t0
    calib_info = {
        "source": str(source.path),
        "kind": "bin" if isinstance(source, VerificationBin) else "folder",
        "sha256": source.sha256(),
        "images": source.num_images,
        "samples": len(data.indices),
        "seed": calibration.seed,
        "batch": calibration.batch,
        "flip": calibration.flip,
        "indices_sha256": data.indices_sha256,
    }
    settings = recipe.resolved() if recipe is not None else _settings_blob(input_spec, calibration, q)
    settings_sha = recipe.sha256() if recipe is not None else hashlib.sha256(
        json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    record = {
        "schema": MANIFEST_SCHEMA,
        "stage": "quantize",
        "engine": q.engine,
        "format": q.format,
        "weights": weights,
        "files": {
            "source": _file_entry(src_path),
            "converted": _file_entry(model_path),
            "int8": {"path": str(out), "sha256": int8_sha, "size": len(int8_bytes)},
            "calibration": {"path": str(source.path), "sha256": calib_info["sha256"], "kind": calib_info["kind"]},
        },
        "calibration": {**calib_info, "indices": [int(i) for i in data.indices]},
        "recipe": settings,
        "recipe_sha256": settings_sha,
        "op_counts": op_counts,
        "prelu": prelu_record,
        "batchnorm": batchnorm_record,
        "tuning": run.tuning,
        "warnings": warnings,
        "environment": environment(),
        "timing": {"quantize": {"seconds": round(seconds, 3), "peak_rss_mb": round(mem.peak_mb, 1)}},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(out) as tmp:
        tmp.write_bytes(int8_bytes)
        if before_publish is not None:
            before_publish(copy.deepcopy(record))
    del int8_bytes
    for w in warnings:
        progress.log(f"warning: {w}")
    return QuantizeResult(
        output=out,
        engine=q.engine,
        format=q.format,
        op_counts=op_counts,
        calibration=calib_info,
        seconds=seconds,
        peak_rss_mb=mem.peak_mb,
        warnings=warnings,
        int8_sha256=int8_sha,
        tuning=run.tuning,
        weights=weights,
        prelu=prelu_record,
        batchnorm=batchnorm_record,
        record=record,
    )


def _allowed_forms(scheme: QuantScheme, q: "QuantizationSection") -> tuple[bool, bool]:
    """Which int8-form rewrites the recipe allows: (PRelu, BatchNormalization); an excluded op type stays as it is."""
    return scheme.prelu_form is not None and "PRelu" not in q.op_types_to_exclude, "BatchNormalization" not in q.op_types_to_exclude


def _has_int8_forms(model: "onnx.ModelProto", scheme: QuantScheme, q: "QuantizationSection") -> bool:
    """Whether :func:`_express_int8_forms` would have anything to rewrite in ``model``."""
    prelu, batchnorm = _allowed_forms(scheme, q)
    return (prelu and count_prelu(model) > 0) or (batchnorm and bool(standalone_batchnorms(model)))


def _express_int8_forms(
    model: "onnx.ModelProto", path: Path, scheme: QuantScheme, q: "QuantizationSection"
) -> tuple[PreluRewrite | None, BatchNormRewrite | None]:
    """Rewrite, in place, what has no int8 kernel into ops that have one: PRelu, then lone BatchNormalization.

    Each part is None when it changed nothing. A node the recipe keeps in fp32 (by
    name, or its op type among the excluded ones) stays as it is. Weights stored
    outside the model file are read in first: the rewritten copy is written elsewhere.
    """
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    exclude = set(q.nodes_to_exclude)
    allow_prelu, allow_batchnorm = _allowed_forms(scheme, q)
    prelu = rewrite_prelu(model, scheme.prelu_form, exclude=exclude) if allow_prelu else None
    batchnorm = rewrite_batchnorm(model, exclude=exclude) if allow_batchnorm else None
    return (prelu if prelu is not None and prelu.changed else None), (batchnorm if batchnorm is not None and batchnorm.changed else None)


def _check_int8_forms(
    original: bytes, rewritten: bytes, faces: np.ndarray, facts: ModelFacts, prelu: PreluRewrite | None, batchnorm: BatchNormRewrite | None
) -> float:
    """The worst embedding cosine of the rewritten model to the original on ``faces``; a UserError below SAME_FUNCTION_MIN_COSINE."""
    names = {"input_name": facts.input_name, "output_name": facts.output_name}
    want = embed_each(OnnxModel(original, what="fp32 model", **names), faces)
    got = embed_each(OnnxModel(rewritten, what="fp32 model in int8 forms", **names), faces)
    result = agreement(want, got)
    if not result.holds(SAME_FUNCTION_MIN_COSINE):
        what = " and ".join(w for w, done in (("PRelu", prelu), ("BatchNormalization", batchnorm)) if done is not None)
        hints = []
        if prelu is not None:
            hints.append("set quantization.prelu: keep (or pass --prelu keep)")
        if batchnorm is not None:
            hints.append("add BatchNormalization to quantization.op_types_to_exclude")
        raise UserError(
            f"the {what} rewrite changed the embeddings: worst cosine {result.worst:.7f} < {SAME_FUNCTION_MIN_COSINE} "
            f"over {len(faces)} calibration faces; nothing was written",
            hint=" or ".join(hints) + " to quantize them as they are",
        )
    return result.worst


def _file_entry(path: Path | None, sha: str | None = None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(path), "sha256": sha or sha256_file(path), "size": path.stat().st_size if path.is_file() else None}


def _settings_blob(spec: "InputSpec", calibration: "CalibrationSection", quantization: "QuantizationSection") -> dict[str, Any]:
    return {
        "model": {"input": spec.model_dump(mode="json")},
        "calibration": calibration.model_dump(mode="json"),
        "quantization": quantization.model_dump(mode="json"),
    }


def _smoke_test(int8: bytes, data: CalibrationData, facts: ModelFacts) -> None:
    """Run the int8 model once on a calibration batch: a model onnxruntime cannot run is not written."""
    x = next(data.arrays())[:1]
    try:
        y = session(int8, what="quantized model").run([facts.output_name], {facts.input_name: x})[0]
    except UserError as e:
        raise UserError(f"the quantized model does not run in onnxruntime: {e.message}") from None
    except Exception as e:
        raise UserError(f"the quantized model does not run in onnxruntime: {type(e).__name__}: {e}") from None
    if not np.all(np.isfinite(y)):
        raise UserError("the quantized model produces non-finite outputs on a calibration image")
