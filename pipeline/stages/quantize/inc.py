"""The ``inc`` engine: Intel Neural Compressor 3.7's ``quantization.fit`` with a ``PostTrainingQuantConfig``.

INC's default for ``reduce_range`` depends on the CPU (7-bit weights unless the
CPU has VNNI), which would make the bytes machine-dependent, so the config always
carries the scheme's explicit value; :mod:`~pipeline.stages.quantize.inc_patches`
makes it mean what it means in onnxruntime (7-bit weights, 8-bit activations).
INC's scratch files go to the stage's work directory, not the current one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from pipeline.core.errors import UserError
from pipeline.core.progress import Progress
from pipeline.data.bins import VerificationBin
from pipeline.data.calibration import CalibrationData
from pipeline.stages.quantize import inc_patches
from pipeline.stages.quantize.checks import ModelFacts
from pipeline.stages.quantize.engine import Engine, EngineRun, quiet_libraries
from pipeline.stages.quantize.scheme import INC_FORMATS, QuantScheme
from pipeline.stages.quantize.tuning import pair_accuracy

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec, QuantizationSection


class CountingLoader:
    """Wraps CalibrationData for INC, advancing a progress bar per batch."""

    def __init__(self, data: CalibrationData, task: Any) -> None:
        self.data = data
        self.batch_size = data.batch_size
        self._task = task

    def __iter__(self):
        for item in self.data:
            yield item
            self._task.advance(len(next(iter(item[0].values()))))

    def __len__(self) -> int:
        return len(self.data)

    def reused(self, images: int) -> None:
        """The calibration ranges came from an earlier run on the same data (see inc_patches.shared_calibration)."""
        self._task.update(completed=images)


# Weighted op types whose weight granularity per_channel switches (INC's capability names).
INC_WEIGHTED = ("Conv", "FusedConv", "MatMul", "Gemm")


def inc_static_op_types() -> set[str]:
    """Every op type INC's ONNX Runtime adaptor can quantize statically (from its capability file)."""
    import neural_compressor.adaptor as adaptor_pkg
    import yaml

    caps = yaml.safe_load((Path(adaptor_pkg.__file__).parent / "onnxrt.yaml").read_text())
    out: set[str] = set()
    for entry in caps:
        static = entry.get("int8", {}).get("static", {})
        out.update(static.keys() if isinstance(static, dict) else [])
    return out


def _inc_recipes(q: "QuantizationSection") -> dict[str, Any]:
    from neural_compressor import PostTrainingQuantConfig

    known = set(PostTrainingQuantConfig().recipes)
    unknown = sorted(set(q.inc_recipes) - known)
    if unknown:
        raise UserError(
            f"invalid recipe: quantization.inc_recipes: unknown key(s) {', '.join(unknown)}; "
            f"INC knows {', '.join(sorted(known))}"
        )
    return dict(q.inc_recipes)


def inc_config(q: "QuantizationSection", scheme: QuantScheme, num_samples: int):
    """INC's PostTrainingQuantConfig for the recipe's settings as ``scheme`` reads them."""
    from neural_compressor import PostTrainingQuantConfig
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    op_type_dict: dict[str, Any] = {}
    if scheme.histogram_calibration:
        for op in inc_static_op_types():
            op_type_dict.setdefault(op, {})["activation"] = {"algorithm": [scheme.inc_algorithm]}
    # Always explicit, so the weights are what the scheme says (INC's own default comes from a
    # capability table per onnxruntime version).
    granularity = "per_channel" if scheme.per_channel else "per_tensor"
    for op in INC_WEIGHTED:
        op_type_dict.setdefault(op, {})["weight"] = {"granularity": [granularity]}
    fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    excluded_types = set(q.op_types_to_exclude)
    if q.op_types_to_quantize is not None:
        excluded_types |= inc_static_op_types() - set(q.op_types_to_quantize)
    for op in excluded_types:
        op_type_dict[op] = fp32
    op_name_dict = {name: fp32 for name in q.nodes_to_exclude} or None

    tuning = q.tuning
    kwargs: dict[str, Any] = {}
    if tuning.enabled:
        kwargs["accuracy_criterion"] = AccuracyCriterion(
            higher_is_better=True, criterion=tuning.criterion, tolerable_loss=tuning.tolerable_loss
        )
        kwargs["tuning_criterion"] = TuningCriterion(strategy="basic", max_trials=tuning.max_trials)
    try:
        return PostTrainingQuantConfig(
            approach="static",
            quant_format=INC_FORMATS[q.format],
            calibration_sampling_size=[num_samples],
            op_type_dict=op_type_dict or None,
            op_name_dict=op_name_dict,
            recipes=_inc_recipes(q),
            reduce_range=scheme.engine_reduce_range,
            # Without eval_func INC does not tune anyway; level 1 keeps it from an "auto" search when it does.
            quant_level=1,
            **kwargs,
        )
    except UserError:
        raise
    except Exception as e:  # INC validates with assert and schema.SchemaError
        raise UserError(f"invalid recipe: quantization settings rejected by Intel Neural Compressor: {e}") from None


def quantize_inc(
    model_path: Path,
    facts: ModelFacts,
    data: CalibrationData,
    q: "QuantizationSection",
    scheme: QuantScheme,
    *,
    work: Path,
    progress: Progress,
    eval_bin: VerificationBin | None,
    spec: "InputSpec",
    label: str = "",
) -> EngineRun:
    """One ``quantization.fit`` (a tuning loop when ``q.tuning`` is enabled) with every weight at ``scheme``'s range."""
    try:
        # Imported before its log is redirected: INC installs its own handler on first import.
        from neural_compressor import quantization as inc_quantization
        from neural_compressor.config import options
    except ImportError as e:
        raise UserError(
            f"Intel Neural Compressor is not importable ({e})", hint="install neural-compressor<=3.7.1 or use quantization.engine: ort"
        ) from None
    with quiet_libraries("neural_compressor") as cap:
        conf = inc_config(q, scheme, data.num_samples)
        eval_func = None
        tuning_log: list[dict[str, Any]] = []
        if q.tuning.enabled:
            if eval_bin is None:
                raise UserError("accuracy-aware tuning needs verification pairs: give a .bin as the calibration set")

            def eval_func(m: Any) -> float:
                proto = m if isinstance(m, onnx.ModelProto) else onnx.load(str(m))
                res = pair_accuracy(proto, eval_bin, spec, pairs=q.tuning.eval_pairs)
                tuning_log.append({"accuracy": res.accuracy, "pairs": res.pairs})
                progress.log(f"tuning trial {len(tuning_log)}: LFW accuracy {res.accuracy:.2f} on {res.pairs} pairs")
                return res.accuracy / 100.0  # INC's tolerable_loss is a fraction

        saved_workspace = options.workspace
        options.workspace = str(work / "nc_workspace")
        try:
            passes = 2 if scheme.histogram_calibration else 1  # see inc_patches.streamed_histograms
            with inc_patches.full_range_activations(), inc_patches.streamed_histograms(), inc_patches.signals_survive(), progress.task(
                f"calibrating (inc{label}{', 2 passes' if passes == 2 else ''})", total=passes * data.num_samples, unit="img"
            ) as t:
                qmodel = inc_quantization.fit(
                    str(model_path), conf, calib_dataloader=CountingLoader(data, t), eval_func=eval_func
                )
        finally:
            options.workspace = saved_workspace
    if qmodel is None:
        errors = cap.messages(logging.ERROR)
        detail = next((m for m in errors if "Unexpected exception" in m), errors[0] if errors else "no quantized model was produced")
        raise UserError(
            f"Intel Neural Compressor could not quantize {model_path}: {detail}",
            hint="try quantization.engine: ort" if not q.tuning.enabled else "loosen quantization.tuning or disable it",
        )
    warnings = [m for m in cap.messages(logging.WARNING) if _interesting_inc_warning(m)]
    tuning = {"trials": tuning_log, "eval_pairs": q.tuning.eval_pairs} if q.tuning.enabled else None
    return EngineRun(qmodel.model, warnings, tuning)


def _interesting_inc_warning(message: str) -> bool:
    # INC warns about optional extras and its own defaults on every run; those are noise here.
    noise = (
        "mpi4py",
        "automatically detected",
        "automatically set",
        "Please note that calibration sampling size",
        "eval_func is not a plain function",
    )
    return not any(n in message for n in noise)


ENGINE = Engine(quantize=quantize_inc, shared_calibration=inc_patches.shared_calibration)
