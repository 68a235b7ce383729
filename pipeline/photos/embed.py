"""Embedding faces in photos: the model with the recipe's preprocessing, and ``qpipe embed``.

Every photo goes through the same path as the model card's inference recipe:
MTCNN detection and landmarks, a similarity warp onto the ArcFace template
(:mod:`pipeline.photos.detect`), the recipe's preprocessing and the network
(:mod:`pipeline.eval.embeddings`), L2 normalisation. With ``flip`` the embedding
is the normalised sum of the image's and its mirror's, as the verification
protocol computes it, so a threshold found by ``qpipe verify`` applies unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, atomic_write_json, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.photos.detect import MTCNN, PHOTO_SUFFIXES, AlignedFace, Select, check_select, default_detector, detect_and_align

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec

EMBED_BATCH = 16


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


def detect_all(
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
    select = check_select(select)
    if out is not None and Path(out).suffix.lower() != ".npy":
        raise UserError(f"--out must be a .npy file, got {out}")
    photos = expand_photos(images)
    embedder = FaceEmbedder(model, input_spec, flip=flip)
    faces = detect_all(photos, select, detector or default_detector(), progress)
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
