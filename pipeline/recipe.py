"""The recipe: the single home of every build option.

Each option is declared once here, with its type, default and a one-line
description (``Field(description=...)``). The same declaration validates the
YAML, fills in defaults, feeds ``qpipe recipe-doc`` (the README table) and is
what CLI overrides are checked against. A recipe is parsed once into a
:class:`Recipe`; an unknown key or a wrong type is a :class:`UserError` that
names the key and, where the YAML has it, the line.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml  # PyYAML: the YAML parser, with node marks for line numbers in errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError, PrivateAttr, field_validator, model_validator

from pipeline.core.errors import UserError


class _Section(BaseModel):
    # strict: "5" is not 5 and true is not 1; forbid: a misspelt key is an error, not a silent default.
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class InputSpec(_Section):
    """How a face crop becomes the model's input tensor."""

    name: str | None = Field(None, description="Model input name; null: the model's first input.")
    size: list[int] = Field(
        [112, 112],
        description="Model input height and width in pixels (after crop); a face of another size is resized to it "
        "(area interpolation when shrinking, bilinear when enlarging).",
    )
    crop: list[int] = Field(
        [0, 0, 0, 0],
        description="Pixels cut off the top, bottom, left and right of each aligned face (the .bin's images, aligned photos: 112x112) "
        "before any resize; a 112x96 model (SphereFace/CosFace alignment) takes crop [0, 0, 8, 8] with size [112, 96].",
    )
    channels: Literal["RGB", "BGR"] = Field("RGB", description="Channel order the model expects.")
    layout: Literal["NCHW"] = Field("NCHW", description="Tensor layout.")
    scale: Literal["raw", "mean_std"] = Field(
        "raw", description="raw: pixels 0..255 as float (normalisation inside the graph); mean_std: (x - mean) / std."
    )
    mean: list[float] = Field([127.5, 127.5, 127.5], description="Per-channel mean for scale: mean_std (model channel order).")
    std: list[float] = Field([128.0, 128.0, 128.0], description="Per-channel std for scale: mean_std (model channel order).")
    output: str | None = Field(None, description="Embedding output name; null: the model's first output.")

    @field_validator("size")
    @classmethod
    def _two_positive(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or min(v) <= 0:
            raise ValueError("must be [height, width] with two positive integers")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) != 3:
            raise ValueError("must have three values, one per channel")
        return v

    @field_validator("crop")
    @classmethod
    def _four_margins(cls, v: list[int]) -> list[int]:
        if len(v) != 4 or min(v) < 0:
            raise ValueError("must be [top, bottom, left, right] with four pixel counts of 0 or more")
        return v

    def cropped_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of a ``height`` x ``width`` face once ``crop`` is cut off (before the resize to ``size``)."""
        top, bottom, left, right = self.crop
        return height - top - bottom, width - left - right


class Source(_Section):
    """A file fetched by `qpipe download`: mirrors tried in order, pinned by sha256."""

    urls: list[str] = Field(..., description="Mirrors tried in order: https://, http://, file:// or a local path.")
    sha256: str | None = Field(None, description="Expected sha256 (hex); null: record the hash and warn that it is not pinned.")
    member: str | None = Field(None, description="File inside a zip archive to extract (read by HTTP range requests); null: the URL is the file.")
    filename: str | None = Field(None, description="Name in the cache; null: from the URL or member.")

    @field_validator("urls")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one URL or path")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower())):
            raise ValueError("must be 64 hexadecimal characters")
        return v.lower() if v else v


class ModelSource(Source):
    input: InputSpec = Field(default_factory=InputSpec, description="Preprocessing: how images become the model input.")
    license: str | None = Field(None, description="Licence of the model weights (e.g. Apache-2.0), quoted in the model card; null: not stated.")
    description: str | None = Field(None, description="One line on what the model is and where it comes from, for the model card.")


class ConvertSection(_Section):
    opset: int = Field(11, description="Target opset for onnx.version_converter.")
    dynamic_batch: bool = Field(
        True,
        description="Make the batch dimension symbolic (the default for `qpipe convert` and `qpipe run` alike): verification, "
        "calibration and recovery then run batches; false keeps the batch the model was exported with (every stage also runs such a model).",
    )
    check_samples: int = Field(8, description="Images run through source and converted model in the equivalence gate.")
    min_cosine: float = Field(0.99999, description="Equivalence gate: every embedding's cosine to the source must reach this.")
    prelu: Literal["keep", "rewrite"] = Field(
        "rewrite",
        description="rewrite: PRelu(x, a) becomes a*x + Relu(abs(1-a)*x) (sign-flipped where a > 1) as 1x1 depthwise convolutions, "
        "Relu and Add, a depthwise Conv feeding it copied with scaled weights instead, LeakyRelu where a node has one slope: "
        "the same function up to float rounding (the equivalence gate checks it), faster in fp32 and quantizable whole. "
        "keep: PRelu as exported.",
    )


class CalibrationSection(_Section):
    samples: int = Field(200, description="Number of calibration images drawn from the calibration set.")
    seed: int = Field(0, description="Seed for the choice of calibration images (same seed, same images).")
    batch: int = Field(1, description="Calibration batch size (needs a dynamic batch when > 1).")
    flip: bool = Field(False, description="Also feed the horizontal flip of each calibration image.")

    @field_validator("samples", "batch")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v


class TuningSection(_Section):
    enabled: bool = Field(False, description="INC accuracy-aware tuning (engine inc only).")
    criterion: Literal["relative", "absolute"] = Field("absolute", description="How tolerable_loss is measured.")
    tolerable_loss: float = Field(0.001, description="Accuracy loss INC's tuner accepts (fraction).")
    max_trials: int = Field(5, description="Upper bound on INC tuning trials.")
    eval_pairs: int = Field(600, description="LFW pairs (from the start, whole folds) the tuner evaluates on.")


class RecoverySection(_Section):
    enabled: bool = Field(False, description="When int8 misses the target, repair root causes, then fall back sensitive nodes to fp32.")
    max_accuracy_drop: float | None = Field(None, description="Target drop in LFW points; null: gate.max_accuracy_drop.")
    eval_pairs: int = Field(1200, description="Pairs of the evaluation subset used while recovering.")
    max_fp32_nodes: int = Field(10, description="Upper bound on nodes returned to fp32.")
    sensitivity_samples: int = Field(
        64, description="Calibration faces on which each node's quantization error (1 - cosine to fp32) is measured by diagnose and recovery."
    )
    repair: bool = Field(
        True, description="Before any fp32 fallback, try function-preserving repairs (cross-layer equalisation, near-dead channels, per-channel weights, percentile calibration)."
    )
    confirm: bool = Field(
        True, description="Re-check a candidate that meets the target on the evaluation subset on the pairs the verify gate uses (verify.pairs) before stopping."
    )


class PlacementSection(_Section):
    enabled: bool = Field(
        False,
        description="After accuracy is met, time the int8 model against its fp32 and against variants that keep node groups in fp32, "
        "and ship the fastest within the accuracy target. Off by default: each variant is a full quantization (about 1.5-3 minutes "
        "apiece for the PRelu MobileFaceNet-512 on 2 cores, where placement added 5.5 minutes to a 3-minute quantize). Either way, gate.min_speedup_fastest_fp32 fails a build whose int8 "
        "is slower than the fastest fp32.",
    )
    candidates: list[Literal["depthwise_fp32", "depthwise1x1_fp32", "pointwise_only"]] = Field(
        ["depthwise_fp32", "depthwise1x1_fp32", "pointwise_only"],
        description="Variants measured beside the int8 as built: depthwise_fp32 (every depthwise Conv in fp32), depthwise1x1_fp32 "
        "(only 1x1 depthwise Convs, the PRelu rewrite's branches), pointwise_only (every node but pointwise/full Conv, Gemm, MatMul in fp32); "
        "fp32 islands left between them go fp32 too.",
    )
    rounds: int = Field(
        40, description="Interleaved timing rounds (fp32 and every candidate each round, the order reversing every round): about 10 s for four MobileFaceNets."
    )
    runs_per_round: int = Field(5, description="Timed batch-1 runs per model per round; the round's figure is their median.")
    warmup: int = Field(5, description="Untimed runs per model before timing.")
    cosine_tolerance: float = Field(
        0.002,
        description="Without verification pairs (an image folder as calibration set): a candidate is accepted when its mean embedding "
        "cosine to fp32 is at most this below the int8 as built.",
    )

    @field_validator("rounds", "runs_per_round")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v


class QuantizationSection(_Section):
    engine: Literal["inc", "ort"] = Field("inc", description="inc: Intel Neural Compressor 3.7 fit(); ort: onnxruntime quantize_static.")
    approach: Literal["static"] = Field("static", description="Post-training static quantization.")
    format: Literal["QOperator", "QDQ"] = Field("QOperator", description="Quantized graph format.")
    per_channel: bool | None = Field(
        True,
        description="Per-channel weight scales (per-tensor costs depthwise-conv models such as MobileFaceNet several LFW points); "
        "null: the engine's default (inc: per-channel Conv/MatMul, ort: per-tensor).",
    )
    reduce_range: bool = Field(
        True,
        description="7-bit weights for GEMM-based int8 kernels, which saturate on AVX2 CPUs without VNNI; "
        "explicit, so the int8 bytes do not depend on the CPU (INC's own default does).",
    )
    reduce_range_depthwise: bool = Field(
        False,
        description="Also 7-bit weights for depthwise convolutions (their kernel accumulates in int32 and cannot saturate).",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "percentile",
        description="Activation range estimator: percentile (99.999%, both engines) ignores the rare outliers that stretch minmax ranges "
        "(MobileFaceNet, 200 LFW faces: INC 99.53, ort 99.47 vs 99.38-99.40 with minmax); entropy is onnxruntime's KL / INC's kl.",
    )
    prelu: Literal["keep", "rewrite"] = Field(
        "rewrite",
        description="rewrite: PRelu nodes still in the model (convert.prelu: keep, or a model converted elsewhere) are expressed "
        "in the int8 form of convert.prelu (1x1 depthwise convolutions, Relu and Add) before quantizing, checked on calibration "
        "faces to compute the same embeddings, so no PRelu stays fp32 between Dequantize/QuantizeLinear; a PRelu named in "
        "nodes_to_exclude (or PRelu in op_types_to_exclude) stays. keep: PRelu stays fp32.",
    )
    op_types_to_quantize: list[str] | None = Field(None, description="Op types to quantize; null: the engine's default set.")
    op_types_to_exclude: list[str] = Field([], description=(
        "Op types left in fp32. A BatchNormalization no Conv absorbs is otherwise written as a 1x1 depthwise Conv "
        "before quantizing (checked on calibration faces), so int8 keeps no fp32 island for it; BatchNormalization "
        "here (or its name in nodes_to_exclude) leaves it fp32."
    ))
    nodes_to_exclude: list[str] = Field([], description="Node names left in fp32.")
    inc_recipes: dict[str, Any] = Field({}, description="Passed through as PostTrainingQuantConfig(recipes=...).")
    extra_options: dict[str, Any] = Field({}, description="Passed through as onnxruntime quantize_static(extra_options=...).")
    tuning: TuningSection = Field(default_factory=TuningSection, description="INC accuracy-aware tuning.")
    recovery: RecoverySection = Field(default_factory=RecoverySection, description="Accuracy recovery (diagnose, repair, fp32 fallback).")
    placement: PlacementSection = Field(default_factory=PlacementSection, description="Speed-aware placement: which nodes run int8, by measured latency.")


class VerifySection(_Section):
    pairs: int | None = Field(None, description="Use only the first N pairs (a subset gate, reported as such); null: all.")
    folds: int = Field(10, description="Cross-validation folds (insightface: 10, without shuffle).")
    flip: bool = Field(True, description="Sum the embeddings of image and horizontal flip (insightface protocol).")
    batch: int = Field(16, description="Batch size for embedding when the model has a dynamic batch.")
    threads: int | None = Field(None, description="onnxruntime intra-op threads for latency; null: all physical cores.")
    warmup: int = Field(10, description="Warm-up runs per model before timing.")
    rounds: int = Field(40, description="Interleaved timing rounds (fp32 then int8 each round).")
    runs_per_round: int = Field(5, description="Timed batch-1 runs per model per round; the round's figure is their median.")
    throughput_batch: int = Field(16, description="Batch size for the throughput measurement (dynamic-batch models).")


class GateSection(_Section):
    max_accuracy_drop: float = Field(0.1, description="Largest allowed fp32 - int8 LFW accuracy drop, in percentage points.")
    min_speedup: float = Field(1.0, description="Smallest allowed median int8 speedup over fp32 at batch 1 (on every CPU when min_speedup_by_class is null).")
    min_speedup_fastest_fp32: float | None = Field(
        None,
        ge=0,
        description="When verify also times the user's model as given (--baseline; qpipe run does when convert rewrote the graph): "
        "the smallest allowed median int8 speedup over the fastest fp32 qpipe makes of it. null: the speed threshold that applies "
        "(min_speedup or the CPU class's), at most 1.0, so an int8 slower than the fp32 the build could ship instead fails wherever "
        "speed is gated at 1.0 or more; 0 switches the check off.",
    )
    min_speedup_by_class: dict[str, float] | None = Field(
        None,
        description="min_speedup per ISA class of the measuring CPU (amx, avx512_vnni, avx_vnni, avx2): the most capable named class "
        "the CPU has applies; `default`: a CPU in none of them (without it such a CPU is an error, exit 2); null: min_speedup everywhere.",
    )

    @field_validator("min_speedup_by_class")
    @classmethod
    def _known_classes(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        from pipeline.core.environment import DEFAULT_THRESHOLD_KEY, ISA_CLASSES

        unknown = sorted(set(v or {}) - {*ISA_CLASSES, DEFAULT_THRESHOLD_KEY})
        if unknown:
            raise ValueError(f"unknown ISA class {unknown[0]!r}: use {', '.join(ISA_CLASSES)} or {DEFAULT_THRESHOLD_KEY}")
        return v

    @model_validator(mode="after")
    def _one_threshold_per_cpu(self) -> "GateSection":
        # With a table, min_speedup would be silently unused: say where the figure belongs.
        if self.min_speedup_by_class and self.min_speedup != 1.0:
            raise ValueError(
                f"min_speedup {self.min_speedup} is not used when min_speedup_by_class is given: "
                "put it in the table as `default` (the threshold on a CPU in none of the named classes)"
            )
        return self

    def speed_threshold(self, cpu: Any = None) -> Any:
        """The speed threshold for the measuring CPU (``cpu``: a core.environment.CpuClass; default detected)."""
        from pipeline.core.environment import speed_threshold

        return speed_threshold(self.min_speedup, self.min_speedup_by_class, cpu)


class Recipe(_Section):
    name: str = Field(..., description="Artifact name; the directory under artifacts/.")
    model: ModelSource = Field(..., description="The fp32 opset-8 model to download.")
    data: Source | None = Field(None, description="The verification/calibration .bin (or a zip member).")
    convert: ConvertSection = Field(default_factory=ConvertSection, description="Opset conversion.")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection, description="Calibration data.")
    quantization: QuantizationSection = Field(default_factory=QuantizationSection, description="Quantization.")
    verify: VerifySection = Field(default_factory=VerifySection, description="Verification protocol and timing.")
    gate: GateSection = Field(default_factory=GateSection, description="Pass/fail thresholds.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in {".", ".."}:
            raise ValueError("must be a non-empty name without path separators")
        return v

    # Where the recipe file lives: relative local paths in `urls` resolve against it.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    # --- derived values -------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The full recipe with every default filled in, as plain data."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hash of the resolved recipe: the same settings give the same hash."""
        blob = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def recovery_target(self) -> float:
        r = self.quantization.recovery.max_accuracy_drop
        return self.gate.max_accuracy_drop if r is None else r


# --- loading ------------------------------------------------------------------


def _line_index(text: str) -> dict[tuple[Any, ...], int]:
    """Map each key path in the YAML document to its 1-based line number."""
    lines: dict[tuple[Any, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def _format_errors(err: ValidationError, where: str, lines: dict[tuple[Any, ...], int]) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        at = f"{where}:{line}" if line else where
        # reprlib: a wrong value quoted in the one-line message, shortened if it is long.
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {reprlib.repr(e.get('input'))})"
        parts.append(f"{at}: {key}: {msg}{got}")
    return "invalid recipe: " + "; ".join(parts)


# libyaml's safe loader when PyYAML has it: the pure-Python one takes seconds on a few thousand nested
# brackets (a slow-input hazard for recipes from elsewhere); both refuse the same non-safe tags.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A recipe holds a few dozen values; these bounds only stop hostile YAML (alias bombs, runaway nesting).
MAX_NESTING = 32
MAX_VALUES = 10_000


def _check_bounds(data: Any, where: str) -> None:
    """Refuse data nested past MAX_NESTING, containing itself, or expanding past MAX_VALUES values.

    YAML aliases share one object, so a few lines can stand for billions of
    values ("billion laughs") or for a value that contains itself; validating,
    hashing or locating errors in it would exhaust time, memory or the stack.
    """
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(x: Any, depth: int) -> int:
        if not isinstance(x, (dict, list, tuple)):
            return 1
        if depth >= MAX_NESTING:
            raise UserError(f"invalid recipe: {where}: nested more than {MAX_NESTING} levels deep")
        key = id(x)
        if key in walking:
            raise UserError(f"invalid recipe: {where}: a YAML alias refers to a value that contains it")
        if key in sizes:
            return sizes[key]
        walking.add(key)
        n = 1
        for item in [*x.keys(), *x.values()] if isinstance(x, dict) else x:
            n += size(item, depth + 1)
            if n > MAX_VALUES:
                raise UserError(f"invalid recipe: {where}: expands to more than {MAX_VALUES:,} values (through YAML aliases?)")
        walking.discard(key)
        sizes[key] = n
        return n

    size(data, 0)


def parse_recipe(data: Any, where: str = "recipe", lines: dict[tuple[Any, ...], int] | None = None) -> Recipe:
    """Validate already-parsed data into a Recipe, or raise a UserError naming the key."""
    if not isinstance(data, dict):
        raise UserError(f"invalid recipe: {where}: the top level must be a mapping of keys, got {type(data).__name__}")
    _check_bounds(data, where)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, where, lines or {})) from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML recipe file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe not found: {p}")
    if p.is_dir():
        raise UserError(f"recipe is a directory, expected a YAML file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {p}: {e}") from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML in recipe {at}: {problem}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise UserError(f"invalid recipe: {p}: nested more than {MAX_NESTING} levels deep") from None
    if data is None:
        raise UserError(f"recipe is empty: {p}")
    if isinstance(data, dict):
        _check_bounds(data, str(p))  # before _line_index walks the same YAML nodes
    recipe = parse_recipe(data, str(p), _line_index(text))
    recipe._base_dir = p.resolve().parent
    return recipe


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Return a copy with dotted keys replaced (CLI options win over the recipe).

    ``None`` values are skipped, so an option the user did not give leaves the
    recipe's value in place.
    """
    data = recipe.model_dump(mode="python")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    out = parse_recipe(data, "recipe with command-line overrides")
    out._base_dir = recipe.base_dir
    return out


def default_recipe(name: str = "adhoc", model_path: str | None = None) -> Recipe:
    """A recipe with every default, for stages run without --recipe."""
    return Recipe.model_validate({"name": name, "model": {"urls": [model_path or "model.onnx"]}})


def schema_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every option: the README table's source."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for fname, f in model.model_fields.items():
            key = f"{prefix}{fname}"
            ann = f.annotation
            sub = _section_type(ann)
            if sub is not None:
                rows.append((key, "section", "", f.description or ""))
                walk(sub, key + ".")
                continue
            default = "required" if f.is_required() else json.dumps(f.get_default(call_default_factory=True))
            tname = _type_name(ann)
            rows.append((key, tname, default, f.description or ""))

    walk(Recipe, "")
    return rows


def _type_name(ann: Any) -> str:
    args = getattr(ann, "__args__", None)
    if getattr(ann, "__origin__", None) is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if args and type(ann).__name__ in ("UnionType", "_UnionGenericAlias"):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if args:
        return f"{ann.__origin__.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _section_type(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def schema_markdown() -> str:
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, t, d, desc in schema_rows():
        out.append(f"| `{key}` | {t} | {('`' + d + '`') if d else ''} | {desc} |")
    return "\n".join(out) + "\n"
