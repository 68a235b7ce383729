"""``qpipe compare``: are the faces in two photos the same person, at the threshold verify found?

Thresholds: verify reports the best threshold as a squared L2 distance ``d``
between unit vectors, and "same" means ``d < t``. Since ``d = 2 - 2 cos``, that
is ``cos > 1 - t / 2``; :func:`distance_to_cosine` and :func:`cosine_to_distance`
are the one place that conversion lives.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.photos.detect import MTCNN, AlignedFace, check_select, default_detector, detect_and_align
from pipeline.photos.embed import FaceEmbedder

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec


# --- thresholds -------------------------------------------------------------------------------


def distance_to_cosine(distance: float) -> float:
    """Squared L2 distance between unit vectors -> cosine similarity (d = 2 - 2 cos)."""
    return 1.0 - float(distance) / 2.0


def cosine_to_distance(cosine: float) -> float:
    """Cosine similarity -> squared L2 distance between unit vectors."""
    return 2.0 - 2.0 * float(cosine)


# --- compare --------------------------------------------------------------------------------------


@dataclass
class ReportThreshold:
    distance: float  # squared L2 between unit embeddings; "same" when below
    source: str  # where it came from, for the user
    flip: bool | None  # the protocol the report used (verify.flip), when it says


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def threshold_from_report(report: Path, *, model: Path | None = None) -> ReportThreshold:
    """The mean best verification threshold (squared L2) from a ``qpipe verify`` report directory or report.json.

    The threshold of the model being compared is used when the report names it
    (by sha256 or path); otherwise the int8 model's, else the fp32 model's. The
    first data set of the report is used, as in the report's summary.
    """
    p = Path(report)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise UserError(f"verify report not found: {p}", hint="pass the directory given to `qpipe verify --report`, or its report.json")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read verify report {p}: {e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"verify report {p} is not a JSON object")
    data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    kind = _report_model_kind(doc, model)
    order = ([kind] if kind else []) + [k for k in ("int8", "fp32") if k != kind]
    for k in order:
        for set_name, per_model in data.items():
            metrics = per_model.get(k) if isinstance(per_model, dict) else None
            t = _finite(metrics.get("threshold_mean")) if isinstance(metrics, dict) else None
            if t is not None:
                how = "the compared model" if k == kind else "the compared model is not in the report"
                return ReportThreshold(t, f"{p}: {set_name} {k} mean best threshold ({how})", _report_flip(doc))
    raise UserError(f"verify report {p} holds no threshold (expected data.<set>.fp32/int8.threshold_mean)")


def _report_flip(doc: dict[str, Any]) -> bool | None:
    v = doc.get("settings", {}).get("verify", {}).get("flip") if isinstance(doc.get("settings"), dict) else None
    return v if isinstance(v, bool) else None


def _report_model_kind(doc: dict[str, Any], model: Path | None) -> str | None:
    """'fp32' or 'int8' when the report's summary for that model names ``model`` (sha256 or path)."""
    if model is None or not Path(model).is_file():
        return None
    digest = sha256_file(model)
    resolved = Path(model).resolve()
    for kind in ("int8", "fp32"):
        m = doc.get(kind)
        if not isinstance(m, dict):
            continue
        if m.get("sha256") == digest:
            return kind
        if isinstance(m.get("path"), str) and Path(m["path"]).resolve() == resolved:
            return kind
    return None


@dataclass
class CompareResult:
    a: Path
    b: Path
    cosine: float
    distance: float  # squared L2 between the unit embeddings
    threshold_cosine: float
    threshold_distance: float
    threshold_source: str
    same: bool
    face_a: AlignedFace = field(repr=False)
    face_b: AlignedFace = field(repr=False)
    model: Path
    flip: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "same" if self.same else "different"

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": str(self.a),
            "b": str(self.b),
            "cosine": round(self.cosine, 6),
            "distance": round(self.distance, 6),
            "threshold_cosine": round(self.threshold_cosine, 6),
            "threshold_distance": round(self.threshold_distance, 6),
            "threshold_source": self.threshold_source,
            "verdict": self.verdict,
            "same": self.same,
            "model": str(self.model),
            "flip": self.flip,
            "face_a": self.face_a.to_dict(),
            "face_b": self.face_b.to_dict(),
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def compare(
    a: Path,
    b: Path,
    *,
    model: Path,
    input_spec: "InputSpec",
    threshold: float | None = None,
    report: Path | None = None,
    select: str = "largest",
    flip: bool | None = None,
    detector: MTCNN | None = None,
    embedder: FaceEmbedder | None = None,
) -> CompareResult:
    """Cosine similarity of the faces in two photos and a same/different verdict.

    ``threshold`` is a cosine similarity ("same" when the cosine is above it);
    otherwise the mean best threshold of a verify ``report`` is used, converted
    from squared L2 distance. ``flip`` (sum with the mirror image's embedding)
    defaults to what the report's protocol used, else True (verify's default),
    so that a threshold from verify means the same thing here.
    """
    t0 = time.perf_counter()
    select = check_select(select)
    notes: list[str] = []
    report_flip = None
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise UserError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
        thr_cos, source = float(threshold), "--threshold"
    elif report is not None:
        rt = threshold_from_report(report, model=model)
        thr_cos, source, report_flip = distance_to_cosine(rt.distance), rt.source, rt.flip
    else:
        raise UserError(
            "compare needs a threshold: pass --threshold COSINE (a cosine similarity in [-1, 1] above which the faces count "
            "as the same person), or --report DIR naming the output of `qpipe verify --report DIR` to use the mean best "
            "threshold verification found"
        )
    if flip is None:
        flip = report_flip if report_flip is not None else True
    elif report_flip is not None and flip != report_flip:
        notes.append(f"the report's threshold was found with flip={report_flip} but this comparison uses flip={flip}")
    if embedder is None:
        embedder = FaceEmbedder(model, input_spec, flip=flip)
    detector = detector or default_detector()
    fa = detect_and_align(a, select=select, detector=detector)
    fb = detect_and_align(b, select=select, detector=detector)
    e = embedder(np.stack([fa.crop, fb.crop]))
    cos = float(np.clip(np.dot(e[0], e[1]), -1.0, 1.0))
    return CompareResult(
        a=Path(a),
        b=Path(b),
        cosine=cos,
        distance=cosine_to_distance(cos),
        threshold_cosine=thr_cos,
        threshold_distance=cosine_to_distance(thr_cos),
        threshold_source=source,
        same=cos > thr_cos,
        face_a=fa,
        face_b=fb,
        model=Path(model),
        flip=embedder.flip,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
