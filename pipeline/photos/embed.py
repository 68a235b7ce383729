"""Using a built model on photos: embed faces, compare two faces, pack your own photos into a ``.bin``.

Every photo goes through the same path as the model card's inference recipe:
MTCNN detection and landmarks, a similarity warp onto the ArcFace template
(:mod:`pipeline.photos.detect`), the recipe's preprocessing (:func:`pipeline.data.preprocess.preprocess`),
the network, L2 normalisation. With ``flip`` the embedding is the normalised sum
of the image's and its mirror's, as the verification protocol computes it, so
a threshold found by ``qpipe verify`` applies unchanged.

Thresholds: verify reports the best threshold as a squared L2 distance ``d``
between unit vectors, and "same" means ``d < t``. Since ``d = 2 - 2 cos``, that
is ``cos > 1 - t / 2``; :func:`distance_to_cosine` and :func:`cosine_to_distance`
are the one place that conversion lives.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.photos.detect import MTCNN, SELECT_CHOICES, AlignedFace, NoFaceError, Select, default_detector, detect_and_align
from pipeline.core.files import atomic_path, atomic_write_json, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JPEG_QUALITY = 95  # the .bin convention: BGR JPEGs written by cv2.imencode at quality 95
EMBED_BATCH = 16


# --- thresholds -------------------------------------------------------------------------------


def distance_to_cosine(distance: float) -> float:
    """Squared L2 distance between unit vectors -> cosine similarity (d = 2 - 2 cos)."""
    return 1.0 - float(distance) / 2.0


def cosine_to_distance(cosine: float) -> float:
    """Cosine similarity -> squared L2 distance between unit vectors."""
    return 2.0 - 2.0 * float(cosine)


def _check_select(select: str) -> Select:
    if select not in SELECT_CHOICES:
        raise UserError(f"unknown face selection {select!r}; use one of: {', '.join(SELECT_CHOICES)}")
    return select  # type: ignore[return-value]


# --- the model ------------------------------------------------------------------------------------


class FaceEmbedder:
    """An embedding model with the recipe's preprocessing: aligned crops in, unit vectors out."""

    def __init__(self, model: Path, input_spec: "InputSpec", *, flip: bool = False, threads: int | None = None) -> None:
        from pipeline.eval.embeddings import open_model

        self.path = Path(model)
        self.spec = input_spec
        self.flip = flip
        # Checked before any photo is read: a wrong model must not surface as "no face found" or mid-batch.
        self.model = open_model(model, input_spec, threads=threads)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB crops -> (N, D) float64 unit embeddings."""
        from pipeline.eval.embeddings import embed_images

        if len(crops) == 0:
            return np.empty((0, 0))
        out, finite = embed_images(self.model, crops, self.spec, flip=self.flip, batch=EMBED_BATCH)
        if not np.all(finite) or not np.all(np.isfinite(out)):
            raise UserError(f"model {self.path} produced NaN or infinite embeddings")
        return out


# --- embed ----------------------------------------------------------------------------------------


def expand_photos(paths: Iterable[Path]) -> list[Path]:
    """The given photos, with any folder replaced by the photos inside it (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise UserError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise UserError("no photos given")
    return out


@dataclass
class EmbedResult:
    """Embeddings of the face chosen in each photo, row i for ``images[i]``."""

    images: list[Path]
    faces: list[AlignedFace] = field(repr=False)
    embeddings: np.ndarray = field(repr=False)
    model: Path
    model_sha256: str
    select: str
    flip: bool
    out: Path | None
    index: Path | None
    seconds: float

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def index_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "model_sha256": self.model_sha256,
            "select": self.select,
            "flip": self.flip,
            "dim": self.dim,
            "embeddings": str(self.out) if self.out else None,
            "images": [{"row": i, **f.to_dict()} for i, f in enumerate(self.faces)],
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.index_dict()
        d.update({"index": str(self.index) if self.index else None, "seconds": round(self.seconds, 3)})
        if self.out is None:
            # Nothing was written: the vectors themselves are the result.
            for row, e in zip(d["images"], self.embeddings):
                row["embedding"] = [float(v) for v in e]
        return d


def _detect_all(
    images: Sequence[Path], select: Select, detector: MTCNN, progress: Progress, what: str = "detecting faces"
) -> list[AlignedFace]:
    faces = []
    with progress.task(what, total=len(images), unit="img") as t:
        for p in images:
            faces.append(detect_and_align(p, select=select, detector=detector))
            t.advance(1)
    return faces


def embed(
    images: Sequence[Path],
    *,
    model: Path,
    input_spec: "InputSpec",
    select: str = "largest",
    flip: bool = False,
    out: Path | None = None,
    detector: MTCNN | None = None,
    progress: Progress | None = None,
) -> EmbedResult:
    """Detect, align and embed one face per photo.

    ``select`` picks the face when a photo shows several (``largest`` box or the
    one nearest the ``center``); a photo without a face or that cannot be read is
    a UserError naming it. With ``out`` (a ``.npy``) the (N, D) float32 matrix is
    written there and a JSON index (photo, row, box, landmarks, model) beside it
    as ``<out>.json``; without it the vectors are only returned.
    """
    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    select = _check_select(select)
    if out is not None and Path(out).suffix.lower() != ".npy":
        raise UserError(f"--out must be a .npy file, got {out}")
    photos = expand_photos(images)
    embedder = FaceEmbedder(model, input_spec, flip=flip)
    faces = _detect_all(photos, select, detector or default_detector(), progress)
    crops = np.stack([f.crop for f in faces])
    with progress.task("embedding", total=len(crops), unit="img") as t:
        emb = embedder(crops)
        t.advance(len(crops))
    index = None
    result = EmbedResult(
        images=photos,
        faces=faces,
        embeddings=emb,
        model=Path(model),
        model_sha256=sha256_file(model),
        select=select,
        flip=flip,
        out=Path(out) if out is not None else None,
        index=None,
        seconds=0.0,
    )
    if out is not None:
        out = Path(out)
        index = out.with_suffix(".json")
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, emb.astype(np.float32))
            # Inside: if the index cannot be written the .npy is not renamed either (no vectors without their index).
            atomic_write_json(index, result.index_dict())
        result.index = index
    result.seconds = time.perf_counter() - t0
    return result


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
    select = _check_select(select)
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


# --- pack-bin -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """A pair of photos by person and number (LFW's ``Name/Name_0001.jpg``) or by path."""

    a: Path
    b: Path
    same: bool


def _lfw_file(images_dir: Path, name: str, number: int) -> Path:
    base = images_dir / name / f"{name}_{number:04d}"
    for suffix in PHOTO_SUFFIXES:
        cand = base.with_name(base.name + suffix)
        if cand.exists():
            return cand
    return base.with_name(base.name + ".jpg")


def parse_pairs(pairs: Path, images_dir: Path) -> list[PairSpec]:
    """Read an LFW ``pairs.txt``: a header ``folds<TAB>n`` (folds x (n same + n different) lines) or ``n``
    (n same + n different), then ``name i j`` (same person) or ``name1 i name2 j`` (different people)."""
    p = Path(pairs)
    if not p.is_file():
        raise UserError(f"pairs file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read pairs file {p}: {e}") from None
    rows = [(n, line.split()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise UserError(f"pairs file {p} is empty")
    (_, header), body = rows[0], rows[1:]
    try:
        counts = [int(x) for x in header]
    except ValueError:
        counts = []
    if len(counts) not in (1, 2) or min(counts) <= 0:
        raise UserError(f"{p}:1: expected a header 'folds<TAB>pairs_per_fold' or 'pairs', got {' '.join(header)!r}")
    expected = 2 * counts[0] * counts[1] if len(counts) == 2 else 2 * counts[0]
    if len(body) != expected:
        raise UserError(f"{p}: the header promises {expected} pair lines but the file has {len(body)}")
    out = []
    for n, parts in body:
        try:
            if len(parts) == 3:
                name, i, j = parts[0], int(parts[1]), int(parts[2])
                out.append(PairSpec(_lfw_file(images_dir, name, i), _lfw_file(images_dir, name, j), True))
            elif len(parts) == 4:
                n1, i, n2, j = parts[0], int(parts[1]), parts[2], int(parts[3])
                out.append(PairSpec(_lfw_file(images_dir, n1, i), _lfw_file(images_dir, n2, j), False))
            else:
                raise ValueError
        except ValueError:
            raise UserError(
                f"{p}:{n}: expected 'name i j' (same person) or 'name1 i name2 j' (different people), got {' '.join(parts)!r}"
            ) from None
    return out


def list_identities(images_dir: Path) -> dict[str, list[Path]]:
    """Folder-per-person layout: {person: sorted photos}, people without photos left out."""
    people: dict[str, list[Path]] = {}
    for d in sorted(x for x in images_dir.iterdir() if x.is_dir()):
        photos = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        if photos:
            people[d.name] = photos
    return people


def draw_pairs(people: dict[str, list[Path]], num_pairs: int, seed: int) -> list[PairSpec]:
    """``num_pairs`` distinct pairs, half same-person and half different-person, drawn by ``seed``.

    Same and different pairs alternate, so any contiguous fold of the
    verification protocol holds both kinds. Fewer same pairs than asked (few
    photos per person) lowers the different pairs to the same number.
    """
    if num_pairs < 2:
        raise UserError(f"--num-pairs must be at least 2, got {num_pairs}")
    names = sorted(people)
    sizes = [len(people[n]) for n in names]
    total_same = sum(s * (s - 1) // 2 for s in sizes)
    if len(names) < 2 or total_same == 0:
        raise UserError(
            "--identities needs at least two people (sub-folders) and at least one person with two photos with a face; "
            f"found {len(names)} people and {total_same} possible same-person pairs"
        )
    rng = random.Random(seed)
    n_same = min(num_pairs // 2, total_same)
    n_diff = num_pairs - n_same if n_same == num_pairs // 2 else n_same

    if n_same == total_same:
        same = [(n, i, j) for n, s in zip(names, sizes) for i in range(s) for j in range(i + 1, s)]
        rng.shuffle(same)
    else:
        weights = [s * (s - 1) // 2 for s in sizes]
        chosen: set[tuple[str, int, int]] = set()
        while len(chosen) < n_same:
            n = rng.choices(names, weights=weights)[0]
            i, j = sorted(rng.sample(range(len(people[n])), 2))
            chosen.add((n, i, j))
        same = sorted(chosen)
        rng.shuffle(same)

    total = sum(sizes)
    total_diff = (total * total - sum(s * s for s in sizes)) // 2
    n_diff = min(n_diff, total_diff)
    flat = [(n, k) for n, s in zip(names, sizes) for k in range(s)]
    diff_set: set[tuple[tuple[str, int], tuple[str, int]]] = set()
    diff: list[tuple[tuple[str, int], tuple[str, int]]] = []
    while len(diff) < n_diff:
        x, y = rng.sample(flat, 2)
        if x[0] == y[0]:
            continue
        key = (min(x, y), max(x, y))
        if key in diff_set:
            continue
        diff_set.add(key)
        diff.append((x, y))

    out: list[PairSpec] = []
    for k in range(max(len(same), len(diff))):
        if k < len(same):
            n, i, j = same[k]
            out.append(PairSpec(people[n][i], people[n][j], True))
        if k < len(diff):
            (n1, i), (n2, j) = diff[k]
            out.append(PairSpec(people[n1][i], people[n2][j], False))
    return out


def encode_crop(crop_rgb: np.ndarray) -> bytes:
    """The .bin convention: a BGR JPEG at quality 95 written by OpenCV."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop_rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a face crop as JPEG")
    return buf.tobytes()


@dataclass
class PackResult:
    """What ``pack_bin`` wrote and what it left out."""

    out: Path
    sha256: str
    pairs: int
    same: int
    different: int
    photos: int  # distinct photos packed
    skipped: list[dict[str, str]]  # photos left out: {"path", "reason"}
    dropped_pairs: int  # pairs that named a skipped photo
    source: str
    select: str
    seed: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "sha256": self.sha256,
            "pairs": self.pairs,
            "same": self.same,
            "different": self.different,
            "photos": self.photos,
            "skipped": self.skipped,
            "dropped_pairs": self.dropped_pairs,
            "source": self.source,
            "select": self.select,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
        }


def _align_photos(
    photos: Sequence[Path], select: Select, detector: MTCNN, progress: Progress
) -> tuple[dict[Path, bytes], list[dict[str, str]]]:
    """Encoded aligned crops of every photo with a face, and the photos left out with the reason."""
    crops: dict[Path, bytes] = {}
    skipped: list[dict[str, str]] = []
    with progress.task("detecting and aligning faces", total=len(photos), unit="img") as t:
        for p in photos:
            try:
                crops[p] = encode_crop(detect_and_align(p, select=select, detector=detector).crop)
            except NoFaceError:
                skipped.append({"path": str(p), "reason": "no face found"})
            except UserError as e:
                skipped.append({"path": str(p), "reason": e.message})
            t.advance(1)
    return crops, skipped


def pack_bin(
    images_dir: Path,
    out: Path,
    *,
    pairs: Path | None = None,
    identities: bool = False,
    num_pairs: int = 600,
    seed: int = 0,
    strict: bool = False,
    select: str = "largest",
    detector: MTCNN | None = None,
    progress: Progress | None = None,
) -> PackResult:
    """Detect, align and pack photos into an insightface ``.bin`` (images 2k, 2k+1 = pair k).

    The pairs come from an LFW-format ``pairs`` file (photos ``Name/Name_0001.jpg``
    under ``images_dir``) or, with ``identities``, are drawn by ``seed`` from a
    folder-per-person layout (``num_pairs``, half same, half different, from the
    photos that have a face). A photo that cannot be read or shows no face is
    listed in the result and left out with its pairs; with ``strict`` it fails the run.
    """
    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    select = _check_select(select)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(f"images folder not found: {images_dir}")
    if (pairs is None) == (not identities):
        raise UserError("pack-bin needs exactly one of --pairs pairs.txt or --identities")
    detector = detector or default_detector()

    if pairs is not None:
        specs = parse_pairs(pairs, images_dir)
        photos = list(dict.fromkeys(x for s in specs for x in (s.a, s.b)))
        crops, skipped = _align_photos(photos, select, detector, progress)
        source = f"pairs file {pairs}"
    else:
        people = list_identities(images_dir)
        if not people:
            raise UserError(f"--identities expects one sub-folder of photos per person in {images_dir}; found none")
        photos = [p for ps in people.values() for p in ps]
        crops, skipped = _align_photos(photos, select, detector, progress)
        usable = {n: [p for p in ps if p in crops] for n, ps in people.items()}
        specs = draw_pairs({n: ps for n, ps in usable.items() if ps}, num_pairs, seed)
        source = f"identities in {images_dir} (seed {seed})"

    if skipped and strict:
        listed = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise UserError(f"{len(skipped)} photo(s) cannot be packed (--strict): {listed}{more}")
    for s in skipped:
        progress.log(f"skipped {s['path']}: {s['reason']}")

    kept = [s for s in specs if s.a in crops and s.b in crops]
    dropped = len(specs) - len(kept)
    if not kept:
        raise UserError(f"no pair left to pack: {len(skipped)} of {len(photos)} photos have no usable face")
    if dropped:
        progress.log(f"dropped {dropped} pair(s) that name a skipped photo")
    images = [crops[x] for s in kept for x in (s.a, s.b)]
    issame = [s.same for s in kept]

    from pipeline.data.bins import write_bin

    write_bin(out, images, issame)
    n_same = sum(issame)
    return PackResult(
        out=Path(out),
        sha256=sha256_file(out),
        pairs=len(kept),
        same=n_same,
        different=len(kept) - n_same,
        photos=len({x for s in kept for x in (s.a, s.b)}),
        skipped=skipped,
        dropped_pairs=dropped,
        source=source,
        select=select,
        seed=seed if identities else None,
        seconds=time.perf_counter() - t0,
    )
