"""Face images from files: the safe ``.bin`` reader and writer, and image folders.

An insightface ``.bin`` is a pickle of ``(list of encoded images, bools)``,
often written by Python 2. A pickle can run arbitrary code, and these files
come from the internet, so :func:`read_bin` uses an unpickler that resolves no
global except a handful of stand-ins for what a numpy *bool* array pickle
references. The stand-ins build nothing themselves: they only collect the
array's bytes, which are turned into an array after the pickle has been
checked. No numpy, builtins or other code is reachable from the file.

Images stay encoded in memory (12,000 LFW JPEGs are ~60 MB) and are decoded in
chunks on demand, so the whole set never exists as float32 at once.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_bytes, require_file, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DECODE_CHUNK = 512


# --- the restricted unpickler -------------------------------------------------


class _NdarrayToken:
    """Stands in for ``numpy.ndarray``: only usable as ``_reconstruct``'s first argument, never callable."""

    __slots__ = ()  # no __dict__: a pickle's BUILD cannot set attributes on the shared token

    def __repr__(self) -> str:
        return "<numpy.ndarray stand-in>"


_NDARRAY = _NdarrayToken()

_BOOL_CODES = {"b1", "?", "bool"}


def _text(v: Any) -> Any:
    # Python 2 pickles loaded with encoding='bytes' give str fields as bytes.
    return v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else v


class _BoolDtype:
    """Stands in for ``numpy.dtype('b1')``; its pickled state must be a plain bool's."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5:
            raise pickle.UnpicklingError("numpy dtype state is not a plain bool dtype")
        # (version, byteorder, subarray, names, fields, ...): a bool has no structure.
        if _text(state[1]) not in ("|", "=", "<", ">") or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("numpy dtype state is not a plain bool dtype")


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> _BoolDtype:
    if _text(obj) not in _BOOL_CODES:
        raise UserError(f"refused numpy dtype {_text(obj)!r}: only bool arrays are allowed in a .bin")
    return _BoolDtype()


def _bool_array(shape: Any, dtype: Any, data: Any) -> np.ndarray:
    if not isinstance(dtype, _BoolDtype):
        raise pickle.UnpicklingError("numpy array without a bool dtype")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"numpy array with an invalid shape {shape!r}")
    if isinstance(data, str):  # Python 2 str data loaded with encoding='latin1'
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy bool array whose data is not bytes")
    if len(data) != math.prod(shape):
        raise pickle.UnpicklingError(f"numpy bool array of shape {shape} with {len(data)} data bytes")
    return (np.frombuffer(bytes(data), dtype=np.uint8) != 0).reshape(shape)


class _ArrayBuilder:
    """What ``_reconstruct`` returns: collects the state, becomes an array in :meth:`array`."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("numpy array state has an unexpected form")
        if len(state) == 5:
            state = state[1:]
        shape, dtype, _fortran, data = state
        self.value = _bool_array(shape, dtype, data)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayBuilder:
    if subtype is not _NDARRAY:
        raise UserError("refused numpy _reconstruct of something other than numpy.ndarray in a .bin")
    return _ArrayBuilder()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    return _bool_array(tuple(shape), dtype, buf)


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Python 3 writes bytes in protocols 0-2 as _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or _text(encoding) not in ("latin1", "latin-1"):
        raise UserError("refused _codecs.encode call other than latin1 bytes in a .bin")
    return obj.encode("latin-1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2 pickles
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"refused to load {module}.{name} from the pickle: a .bin may only hold encoded images "
                "and bools (it could run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UserError("refused a persistent id in the pickle: a .bin may only hold encoded images and bools")


def _safe_unpickle(data: bytes, where: Path) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UserError as e:
        raise UserError(f"{where}: {e.message}") from None
    except EOFError:
        raise UserError(f"{where}: the pickle is truncated (the file ends early)") from None
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "truncated" in msg:
            raise UserError(f"{where}: the pickle is truncated (the file ends early)") from None
        if "invalid load key" in msg or "unsupported pickle protocol" in msg:
            raise UserError(f"{where}: not a pickle ({msg}); expected an insightface .bin") from None
        raise UserError(f"{where}: corrupt pickle: {msg}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError, RecursionError, OverflowError) as e:
        raise UserError(f"{where}: corrupt pickle: {type(e).__name__}: {e}") from None


def _issame_array(obj: Any, where: Path) -> np.ndarray:
    if isinstance(obj, _ArrayBuilder):
        obj = obj.value
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.bool_ or obj.ndim != 1:
            raise UserError(f"{where}: the pair labels must be a 1-D bool array, got shape {obj.shape}")
        return obj.copy()
    if not isinstance(obj, (list, tuple)):
        raise UserError(f"{where}: the pair labels must be a list of bools, got {type(obj).__name__}")
    for i, v in enumerate(obj):
        # 0/1 ints are accepted: some writers store labels as ints.
        if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))):
            raise UserError(f"{where}: pair label {i} is {type(v).__name__} {v!r}, expected a bool")
    return np.array([bool(v) for v in obj], dtype=bool)


def _parse_structure(obj: Any, where: Path) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        got = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise UserError(f"{where}: wrong structure: expected (list of encoded images, list of pair labels), got {got}")
    images, labels = obj
    if isinstance(images, _ArrayBuilder) or not isinstance(images, (list, tuple)):
        raise UserError(f"{where}: wrong structure: the first item must be a list of encoded images, got {type(images).__name__}")
    for i, b in enumerate(images):
        if not isinstance(b, (bytes, bytearray)):
            raise UserError(f"{where}: image {i} is {type(b).__name__}, expected encoded image bytes")
    issame = _issame_array(labels, where)
    if len(images) != 2 * len(issame):
        raise UserError(
            f"{where}: {len(images)} images for {len(issame)} pairs; an insightface .bin holds exactly two images per pair"
        )
    if not images:
        raise UserError(f"{where}: the .bin holds no images")
    return [bytes(b) for b in images], issame


# --- decoding ------------------------------------------------------------------


def _decode_bytes(data: bytes) -> np.ndarray | None:
    import cv2  # OpenCV: the .bin JPEGs were written by cv2.imencode, in BGR

    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        return None
    return np.ascontiguousarray(img[:, :, ::-1])


class _EncodedImages:
    """Encoded images decoded on demand into HxWx3 uint8 RGB; subclasses supply the bytes."""

    path: Path
    num_images: int

    def encoded(self, i: int) -> bytes:
        raise NotImplementedError

    def _name(self, i: int) -> str:
        return f"image {i}"

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.num_images:
            raise IndexError(f"image index {i} out of range 0..{self.num_images - 1}")
        return i

    def _decode_unchecked(self, i: int) -> np.ndarray:
        img = _decode_bytes(self.encoded(self._check_index(i)))
        if img is None:
            raise UserError(f"{self.path}: {self._name(i)} does not decode as an image (corrupt or not a JPEG/PNG)")
        return img

    @cached_property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the first image; every other image must match it."""
        h, w = self._decode_unchecked(0).shape[:2]
        return (int(h), int(w))

    def decode(self, i: int) -> np.ndarray:
        img = self._decode_unchecked(i)
        if img.shape[:2] != self.image_size:
            h, w = self.image_size
            raise UserError(
                f"{self.path}: {self._name(i)} is {img.shape[0]}x{img.shape[1]} but the first image is {h}x{w}; "
                "all images must have the same size"
            )
        return img

    def decode_many(self, idx: Sequence[int]) -> np.ndarray:
        h, w = self.image_size
        out = np.empty((len(idx), h, w, 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.decode(i)
        return out

    def iter_chunks(self, idx: Sequence[int] | None = None, chunk: int = DECODE_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, NxHxWx3 uint8 RGB) in chunks, so memory stays bounded."""
        idx = np.arange(self.num_images) if idx is None else np.asarray(idx, dtype=np.int64)
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            yield part, self.decode_many(part)

    def validate(self, progress: Progress | None = None, chunk: int = DECODE_CHUNK) -> None:
        """Decode every image (in chunks): a UserError names the first that is corrupt or of another size."""
        progress = progress or NULL_PROGRESS
        with progress.task(f"checking {self.path.name}", total=self.num_images, unit="img") as t:
            for part, _ in self.iter_chunks(chunk=chunk):
                t.advance(len(part))

    def sha256(self) -> str:
        raise NotImplementedError


class VerificationBin(_EncodedImages):
    """An insightface verification ``.bin``: images 2k and 2k+1 form pair k, ``issame[k]`` its label."""

    def __init__(self, path: Path, images: list[bytes], issame: np.ndarray) -> None:
        self.path = Path(path)
        self._images = images
        self.issame = issame
        self.num_pairs = int(len(issame))
        self.num_images = len(images)

    def encoded(self, i: int) -> bytes:
        return self._images[self._check_index(i)]

    @cached_property
    def _sha256(self) -> str:
        return sha256_file(self.path)

    def sha256(self) -> str:
        return self._sha256

    def __repr__(self) -> str:
        return f"VerificationBin({str(self.path)!r}, pairs={self.num_pairs})"


def read_bin(path: str | os.PathLike[str], *, validate: bool = False, progress: Progress | None = None) -> VerificationBin:
    """Read an insightface ``.bin`` safely; images stay encoded until decoded.

    With ``validate=True`` every image is decoded once (in chunks) to find
    corrupt entries and size mismatches up front.
    """
    p = require_file(path, "image set (.bin)")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None
    images, issame = _parse_structure(_safe_unpickle(data, p), p)
    vb = VerificationBin(p, images, issame)
    # Decode the first image now: a file of non-images fails here, not deep inside a stage.
    _ = vb.image_size
    if validate:
        vb.validate(progress)
    return vb


def write_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write an insightface-format ``.bin`` (protocol 4 pickle of two lists) atomically."""
    images = [bytes(b) for b in images]
    labels = [bool(v) for v in issame]
    if len(images) != 2 * len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} pairs: a .bin holds two images per pair")
    return atomic_write_bytes(path, pickle.dumps((images, labels), protocol=4))


class ImageFolder(_EncodedImages):
    """A folder of aligned face images (recursive, sorted by relative path) as a calibration source."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"image folder not found: {self.path}")
        self.files = sorted(
            (f for f in self.path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda f: f.relative_to(self.path).as_posix(),
        )
        if not self.files:
            raise UserError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        self.num_images = len(self.files)

    def _name(self, i: int) -> str:
        return f"image {i} ({self.files[i].relative_to(self.path).as_posix()})"

    def encoded(self, i: int) -> bytes:
        f = self.files[self._check_index(i)]
        try:
            return f.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}") from None

    @cached_property
    def _sha256(self) -> str:
        # A folder's identity: every file's relative path and content.
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.relative_to(self.path).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()

    def sha256(self) -> str:
        return self._sha256

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.path)!r}, images={self.num_images})"


def open_images(path: str | os.PathLike[str], *, validate: bool = False, progress: Progress | None = None) -> VerificationBin | ImageFolder:
    """A ``.bin`` file or a folder of images."""
    p = Path(path)
    if p.is_dir():
        folder = ImageFolder(p)
        _ = folder.image_size
        if validate:
            folder.validate(progress)
        return folder
    return read_bin(p, validate=validate, progress=progress)
