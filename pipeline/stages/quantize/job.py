"""What one int8 build is asked to do: the files and the recipe sections every step of it reads.

The quantize stage, accuracy recovery, speed-aware placement and the build's int8
step all take an :class:`Int8Job`. Recovery and placement quantize candidates as
copies of the job with another fp32 model, output or quantization section
(:meth:`Int8Job.with_quantization`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.recipe import CalibrationSection, InputSpec, QuantizationSection, Recipe


@dataclass(frozen=True)
class Int8Job:
    """The inputs of one int8 build.

    Attributes:
        model: the converted fp32 ONNX model (opset 10+, initializers not listed as inputs).
        calib: calibration images: an insightface ``.bin`` or a folder of aligned faces.
        out: the int8 model to write (atomically).
        input_spec: how images become the model input (recipe ``model.input``).
        calibration: sample count, seed, batch and flip (recipe ``calibration``).
        quantization: engine, format, per-channel, exclusions, pass-through options (recipe
            ``quantization``); its ``recovery`` section switches accuracy recovery on and sets its
            target, its ``placement`` section speed-aware placement.
        recipe: the full recipe: recorded resolved in the manifest body with its hash (without
            it, the three sections above and their hash); recovery and placement read its gate's
            default target, its verification protocol and ``convert.min_cosine`` (defaults without it).
        source_model: the original (pre-conversion) model, hashed into the manifest body when given.
        eval_data: verification pairs (``.bin``) for INC's accuracy-aware tuning and for scoring
            recovery's and placement's candidates; default: ``calib`` (see :attr:`pairs`).
    """

    model: Path
    calib: Path
    out: Path
    input_spec: "InputSpec"
    calibration: "CalibrationSection"
    quantization: "QuantizationSection"
    recipe: "Recipe | None" = None
    source_model: Path | None = None
    eval_data: Path | None = None

    def __post_init__(self) -> None:
        # Callers hand in str or Path; every step reads Paths.
        for name in ("model", "calib", "out", "source_model", "eval_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @classmethod
    def from_recipe(
        cls,
        recipe: "Recipe",
        *,
        model: str | Path,
        calib: str | Path,
        out: str | Path,
        source_model: str | Path | None = None,
        eval_data: str | Path | None = None,
    ) -> "Int8Job":
        """The job the recipe describes for these files: its input, calibration and quantization sections."""
        return cls(
            model=model, calib=calib, out=out, input_spec=recipe.model.input, calibration=recipe.calibration,
            quantization=recipe.quantization, recipe=recipe, source_model=source_model, eval_data=eval_data,
        )

    @property
    def pairs(self) -> Path:
        """What scores accuracy: ``eval_data``, else ``calib`` (an image folder there cannot)."""
        return self.eval_data if self.eval_data is not None else self.calib

    def with_quantization(self, quantization: "QuantizationSection", **changes: Any) -> "Int8Job":
        """A copy with other quantization settings (the recorded recipe follows them) and ``changes`` to other fields."""
        recipe = self.recipe.model_copy(update={"quantization": quantization}) if self.recipe is not None else None
        return dataclasses.replace(self, quantization=quantization, recipe=recipe, **changes)
