"""What the recipe's quantization settings mean: the one place that interprets them.

The engines (``inc``, ``ort``) configure themselves from a :class:`QuantScheme`,
and the accuracy tools (diagnose, recovery) simulate the same scheme, so a
setting such as ``reduce_range`` or ``calibration_method`` has exactly one
meaning in the whole package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from pipeline.stages.prelu import DEFAULT_FORM as PRELU_INT8_FORM

if TYPE_CHECKING:
    from pipeline.recipe import QuantizationSection

# INC's names for the recipe's calibration methods and formats.
INC_ALGORITHMS = {"minmax": "minmax", "entropy": "kl", "percentile": "percentile"}
INC_FORMATS = {"QOperator": "default", "QDQ": "QDQ"}
# onnxruntime's names (members of onnxruntime.quantization.CalibrationMethod) for the recipe's calibration methods.
ORT_CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# Half the int8 weight range: full 8 bits, or 7 bits (reduce_range).
FULL_HALF_LEVELS = 127
REDUCED_HALF_LEVELS = 64


@dataclass(frozen=True)
class QuantScheme:
    """How an engine maps float ranges to integers for the recipe's settings.

    ``activation_levels``: uint8 asymmetric activations, scale = (max - min) / levels.
    ``weight_half_levels``: int8 symmetric weights, scale = |w|max / half_levels
    (64 with ``reduce_range``: 7-bit weights, so that AVX2's u8 x s8 pair sums in
    int16 cannot saturate). ``depthwise_half_levels``: depthwise convolutions'
    weights when they differ (their kernel accumulates in int32 and cannot
    saturate, so they keep 8 bits unless ``reduce_range_depthwise``).
    ``bias_overflow``: what an int32 bias that does not fit becomes: ``wrap``
    (numpy astype, INC) or ``clip`` (onnxruntime). ``clip_bound_lost``: an engine
    that narrows activations to 127 levels but clamps a fused Clip at uint8 255,
    so Clip(0, 6) passes values up to about 12 (INC's own ``reduce_range``, which
    the quantize stage does not use). ``calibration``: the activation range
    estimator as simulated (entropy is simulated as minmax). ``calibration_method``:
    the recipe's estimator as the engines run it (minmax, entropy, percentile).
    ``prelu_form``: the form PRelu nodes are rewritten into before quantizing
    (:mod:`~pipeline.stages.prelu`), or None when they stay fp32 PRelu.
    """

    engine: str
    activation_levels: int
    weight_half_levels: int
    per_channel: bool
    bias_overflow: str
    clip_bound_lost: bool = False
    depthwise_half_levels: int | None = None
    calibration: str = "minmax"
    calibration_method: str = "minmax"
    prelu_form: str | None = None

    @classmethod
    def from_section(cls, q: "QuantizationSection") -> "QuantScheme":
        """The conventions the quantize stage applies for these recipe settings."""
        reduce = bool(q.reduce_range)
        half = REDUCED_HALF_LEVELS if reduce else FULL_HALF_LEVELS
        depthwise = FULL_HALF_LEVELS if split_depthwise(q) else None
        calib = q.calibration_method if q.calibration_method == "percentile" else "minmax"
        overflow = "wrap" if q.engine == "inc" else "clip"
        # reduce_range narrows the weights only, for both engines: activations keep 255 levels.
        return cls(
            q.engine, 255, half, effective_per_channel(q), overflow, depthwise_half_levels=depthwise, calibration=calib,
            calibration_method=q.calibration_method, prelu_form=PRELU_INT8_FORM if q.prelu == "rewrite" else None,
        )

    def weight_levels(self, depthwise: bool) -> int:
        return self.depthwise_half_levels if depthwise and self.depthwise_half_levels else self.weight_half_levels

    # --- what one engine run is told -------------------------------------------------
    #
    # An engine quantizes every weight to one range. A scheme whose depthwise convolutions keep
    # more bits than the others is made of two runs (see depthwise.py): ``uniform(weight_levels(True))``
    # donates the depthwise weights to ``uniform(weight_levels(False))``.

    def uniform(self, half_levels: int) -> "QuantScheme":
        """The same scheme with every weight, depthwise or not, at ``half_levels``."""
        if half_levels not in (FULL_HALF_LEVELS, REDUCED_HALF_LEVELS):
            raise ValueError(f"the engines quantize weights to 8 or 7 bits, not to half-range {half_levels}")
        return replace(self, weight_half_levels=half_levels, depthwise_half_levels=None)

    @property
    def engine_reduce_range(self) -> bool:
        """The engines' own ``reduce_range`` flag for this scheme's (non-depthwise) weights.

        Both engines read it as 7-bit weights; INC would narrow the activations as
        well, which :func:`~pipeline.stages.quantize.inc_patches.full_range_activations` undoes.
        """
        return self.weight_half_levels == REDUCED_HALF_LEVELS

    @property
    def histogram_calibration(self) -> bool:
        """Whether calibration builds histograms (entropy, percentile), which hold activations in memory."""
        return self.calibration_method != "minmax"

    @property
    def inc_algorithm(self) -> str:
        return INC_ALGORITHMS[self.calibration_method]

    @property
    def ort_calibration_method(self) -> str:
        """The name of the ``onnxruntime.quantization.CalibrationMethod`` member."""
        return ORT_CALIBRATION_METHODS[self.calibration_method]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_per_channel(q: "QuantizationSection") -> bool:
    """Per-channel weight scales: the recipe's choice, else the engine's default (INC per-channel, onnxruntime per-tensor)."""
    return bool(q.per_channel) if q.per_channel is not None else q.engine == "inc"


def split_depthwise(q: "QuantizationSection") -> bool:
    """Whether depthwise convolutions get 8-bit weights while the others get 7-bit (reduce_range)."""
    return bool(q.reduce_range) and not q.reduce_range_depthwise
