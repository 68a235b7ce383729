"""``qpipe pack-bin``: your own photos, detected and aligned, packed into an insightface ``.bin``."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.photos.detect import MTCNN, PHOTO_SUFFIXES, NoFaceError, Select, check_select, default_detector, detect_and_align

JPEG_QUALITY = 95  # the .bin convention: BGR JPEGs written by cv2.imencode at quality 95


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
    select = check_select(select)
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
