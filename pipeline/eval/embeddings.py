"""Face images in, protocol embeddings out: the one batched embedding runner.

Images (N x H x W x 3 uint8 RGB) are preprocessed as the recipe's input spec
says (:func:`pipeline.data.preprocess.preprocess`), run through the model in
batches it accepts (:meth:`pipeline.runtime.session.OnnxModel.run`: a fixed
batch of 1 is run one image at a time, a dynamic batch ``batch`` images at a
time) and, with ``flip``, summed with the embeddings of their mirror images
before L2 normalisation, as insightface does. Verification pairs are embedded
chunk by chunk, so a whole set never exists as float32 at once; an image that
appears in several pairs (its encoded bytes repeat) is embedded once. The
result can be cached on disk (one ``.npz`` per model x data x preprocessing x
flip x pairs), so a second int8 candidate only pays for its own forward passes.

Most exported face models have a fixed batch of 1, which would mean one
forward pass per image. Such a model is embedded through a dynamic-batch copy
made in memory (:func:`pipeline.runtime.graph.make_batch_dynamic`), once the
copy is shown to give the single runs' embeddings on the first images; the
model file, and so the cache key, stay the user's.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import onnx

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, require_file, sha256_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.data.preprocess import preprocess
from pipeline.eval.protocol import cosine_rows, flip_sum
from pipeline.recipe import InputSpec
from pipeline.runtime.graph import load_model, make_batch_dynamic
from pipeline.runtime.session import ModelSource, OnnxModel

# Bump when the cached array's meaning changes, so old cache files are not reused.
CACHE_FORMAT = 1
# Images decoded and preprocessed at once: bounds memory, independent of the model's batch.
DECODE_CHUNK = 256
# Two graphs meant to compute the same function must agree to this cosine on every checked embedding: convert's
# equivalence gate (convert.min_cosine's default), quantize's int8-form rewrites, the batched copy of a batch-1 model.
SAME_FUNCTION_MIN_COSINE = 0.99999
BATCH_COPY_MIN_COSINE = SAME_FUNCTION_MIN_COSINE


class PairImages(Protocol):
    """What :func:`embed_pairs_with_info` reads: images 2k and 2k+1 are pair k (a VerificationBin or a view of one).

    The embedding cache also needs the data's identity, ``sha256()``, which a view need not have;
    ``encoded(i)`` (an image's file bytes), where a source has it, lets a repeated image be embedded once.
    """

    path: Path
    num_pairs: int

    def decode_many(self, idx: Sequence[int]) -> np.ndarray: ...


# --- opening a model ------------------------------------------------------------------------------


def check_input(model: OnnxModel, spec: InputSpec) -> None:
    """The model's input must take what the recipe's preprocessing makes: 3 channels of ``spec.size``."""
    c, h, w = model.input_shape[1:]
    if (isinstance(h, int) and h > 0 and h != spec.size[0]) or (isinstance(w, int) and w > 0 and w != spec.size[1]):
        raise UserError(
            f"{model.what} takes {h}x{w} images but model.input.size is {spec.size[0]}x{spec.size[1]}",
            hint="set model.input.size in the recipe",
        )
    if isinstance(c, int) and c > 0 and c != 3:
        raise UserError(f"{model.what} input has {c} channels; face models take 3 (RGB or BGR)")


def open_model(model: ModelSource, spec: InputSpec, *, threads: int | None = None, what: str | None = None) -> OnnxModel:
    """A session for ``model`` with the recipe's input/output names, its input checked against ``spec``."""
    m = OnnxModel(model, threads=threads, input_name=spec.name, output_name=spec.output, what=what)
    check_input(m, spec)
    return m


# --- images -----------------------------------------------------------------------------------------


def raw_embeddings(model: OnnxModel, images: np.ndarray, spec: InputSpec, *, flip: bool = False, batch: int = 16) -> np.ndarray:
    """The model's outputs (N, dim) for uint8 RGB ``images`` (mirrored with ``flip``), unnormalised."""
    out = model.run(preprocess(images, spec, flip=flip), batch)
    if out.ndim < 2 and len(images):
        raise UserError(f"{model.what} output {model.output_name!r} has shape {out.shape}; expected (batch, embedding)")
    return out.reshape(len(images), -1)


def embed_images(
    model: OnnxModel, images: np.ndarray, spec: InputSpec, *, flip: bool = True, batch: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Protocol embeddings of ``images``: (N, dim) float64 unit rows, and which rows' raw outputs were all finite.

    With ``flip`` each row is the normalised sum of the image's and its mirror's
    embeddings (summed in float64, as insightface's embedding buffers are).
    """
    e = raw_embeddings(model, images, spec, flip=False, batch=batch)
    finite = np.all(np.isfinite(e), axis=1)
    f = None
    if flip:
        f = raw_embeddings(model, images, spec, flip=True, batch=batch)
        finite &= np.all(np.isfinite(f), axis=1)
    return flip_sum(e, f), finite


def batched_copy(model: OnnxModel, source: ModelSource | None = None) -> OnnxModel | None:
    """A dynamic-batch session of ``model`` (fixed batch 1), made in memory; None when its graph cannot take one.

    ``source``: the model's ModelProto or bytes when ``model`` was not opened from a file.
    The copy is unchecked; :func:`batch_runner` checks it against single runs.
    """
    if model.dynamic_batch or model.fixed_batch != 1:
        return None
    try:
        if model.path is not None:
            proto = load_model(model.path, model.what)
        elif isinstance(source, onnx.ModelProto):
            proto = onnx.ModelProto()
            proto.CopyFrom(source)
        elif isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source))
        else:
            return None
        # Tensors shape inference cannot follow (com.microsoft int8 ops) may carry the batch too: the copy is checked.
        make_batch_dynamic(proto, model.input_name, unknown_carries_batch=True)
        copy = OnnxModel(proto, threads=model.threads, input_name=model.input_name, output_name=model.output_name, what=model.what, quiet=True)
    except UserError:
        return None
    return copy if copy.dynamic_batch else None


def batch_runner(
    model: OnnxModel, images: np.ndarray, spec: InputSpec, *, batch: int, source: ModelSource | None = None, progress: Progress | None = None
) -> OnnxModel:
    """The session to embed with: a checked dynamic-batch copy of a batch-1 ``model``, else ``model`` itself.

    The copy is used only if, on ``images`` (the first batch to embed, as uint8
    RGB), each of its embeddings keeps a cosine of at least
    :data:`BATCH_COPY_MIN_COSINE` to the single run's; otherwise the model is run
    one image at a time, and ``progress`` says why.
    """
    progress = progress or NULL_PROGRESS
    if batch <= 1 or model.dynamic_batch or model.fixed_batch != 1 or not len(images):
        return model
    copy = batched_copy(model, source)
    if copy is None:
        progress.log(f"note: {model.what} has a fixed batch of 1 that cannot be made dynamic; embedding one image per pass")
        return model
    check = images[: max(2, batch)]
    single = raw_embeddings(model, check, spec, batch=1)
    try:
        batched = raw_embeddings(copy, check, spec, batch=batch)
    except UserError as e:
        progress.log(f"note: a batched copy of {model.what} does not run ({e}); embedding one image per pass")
        return model
    same = agreement(single, batched)
    if not same.holds(BATCH_COPY_MIN_COSINE):
        progress.log(
            f"note: a batched copy of {model.what} does not reproduce its single-image embeddings "
            f"(worst cosine {same.worst:.6f} < {BATCH_COPY_MIN_COSINE}); embedding one image per pass"
        )
        return model
    return copy


# --- one model against another --------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate model's embeddings follow a reference model's on the same inputs."""

    cosines: np.ndarray  # one per input row; NaN where an output is not finite, 0 when the shapes differ
    max_abs: float  # largest absolute difference of the raw outputs (inf when the shapes differ)

    @property
    def worst(self) -> float:
        """The lowest cosine (NaN if any output was not finite)."""
        return float(np.min(self.cosines)) if self.cosines.size and not np.isnan(self.cosines).any() else float("nan")

    def holds(self, min_cosine: float) -> bool:
        return bool(self.cosines.size) and bool(np.all(self.cosines >= min_cosine))


def embed_each(model: OnnxModel, inputs: np.ndarray, advance: Callable[[int], None] | None = None) -> np.ndarray:
    """Raw outputs of ``model`` for already preprocessed ``inputs``, one row per run (N x D).

    One input per run, so a model exported for a batch of 1 runs as exported and
    no batching takes part in a comparison of two models. ``advance(1)`` is called after each run.
    """
    outs = []
    for i in range(len(inputs)):
        outs.append(model.run(inputs[i : i + 1]).reshape(1, -1))
        if advance is not None:
            advance(1)
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), np.float32)


def agreement(want: np.ndarray, got: np.ndarray) -> Agreement:
    """Row-by-row cosines and the largest absolute difference of two models' outputs on the same inputs."""
    want = np.asarray(want).reshape(len(want), -1)
    got = np.asarray(got).reshape(len(got), -1)
    if want.shape != got.shape:
        return Agreement(cosines=np.zeros(len(want)), max_abs=float("inf"))
    diff = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
    return Agreement(cosines=cosine_rows(want, got), max_abs=diff)


# --- verification pairs ----------------------------------------------------------------------------


@dataclass
class EmbedInfo:
    """How :func:`embed_pairs_with_info` got its embeddings."""

    cached: bool
    seconds: float
    nonfinite: int  # rows whose raw output was not finite
    cache_file: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_key(*, model_sha256: str, data_sha256: str, input_spec: InputSpec, flip: bool, pairs: int) -> str:
    """sha256 naming the fp32 embeddings of one model x data x preprocessing x flip x pairs."""
    from pipeline.core import environment as envinfo

    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "model": model_sha256,
            "data": data_sha256,
            "input": input_spec.model_dump(mode="json"),
            "flip": bool(flip),
            "pairs": int(pairs),
            # Another onnxruntime may round differently; its embeddings are not these.
            "onnxruntime": envinfo.package_version("onnxruntime"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"emb-{key[:40]}.npz"


def _load_cache(path: Path, key: str, rows: int, progress: Progress) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            emb = np.array(z["embeddings"], dtype=np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        progress.log(f"warning: ignoring unreadable embedding cache {path}: {e}")
        return None
    if emb.ndim != 2 or emb.shape[0] != rows:
        progress.log(f"warning: ignoring embedding cache {path}: shape {emb.shape}, expected {rows} rows")
        return None
    return emb


def _save_cache(path: Path, key: str, emb: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), embeddings=emb)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def distinct_images(source: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows to embed among the first ``rows`` images, and for each row the position of its embedding among them.

    A verification set repeats images across pairs (LFW's 12,000 rows hold 7,701
    distinct faces): a row whose encoded bytes equal an earlier row's decodes to
    the same pixels, so it takes that row's embedding instead of another forward
    pass. A source that cannot give its encoded bytes (``encoded(i)``) has every row embedded.
    """
    encoded = getattr(source, "encoded", None)
    if encoded is None:
        every = np.arange(rows)
        return every, every
    first: dict[bytes, int] = {}
    distinct: list[int] = []
    copy_of = np.empty(rows, dtype=np.int64)
    for i in range(rows):
        digest = hashlib.blake2b(encoded(i), digest_size=16).digest()
        if digest not in first:
            first[digest] = len(distinct)
            distinct.append(i)
        copy_of[i] = first[digest]
    return np.asarray(distinct, dtype=np.int64), copy_of


def embed_pairs_with_info(
    model: ModelSource | OnnxModel,
    source: PairImages,
    *,
    input_spec: InputSpec,
    flip: bool = True,
    batch: int = 16,
    pairs: int | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    label: str = "",
    runner: Callable[[], OnnxModel] | None = None,
    model_sha256: str | None = None,
) -> tuple[np.ndarray, EmbedInfo]:
    """Protocol embeddings of the first ``pairs`` pairs' images (2 x pairs rows, float64), and how they were got.

    Row 2k / 2k+1 is pair k's first / second face (:func:`embed_images`); rows of one repeated
    image share its one embedding (:func:`distinct_images`).
    ``model``: a model file, a ModelProto or its bytes, or an open :class:`OnnxModel`.
    ``batch``: images per forward pass when the model's batch is dynamic; a model
    with a fixed batch of 1 is run through a checked dynamic-batch copy
    (:func:`batch_runner`), other fixed batches are honoured. With ``cache_dir`` (a model file, or ``model_sha256``
    given) the result is read from / written to an ``.npz`` keyed by :func:`cache_key`;
    on a hit the model is not run at all. ``runner``: returns an already-open session
    for ``model``, called only on a cache miss (default: open one with ``threads``).
    A result with non-finite rows is never cached.
    """
    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    n = source.num_pairs if pairs is None else min(int(pairs), source.num_pairs)
    if n <= 0:
        raise UserError(f"verify.pairs must be positive, got {pairs}")
    rows = 2 * n
    if isinstance(model, OnnxModel):
        name = model.path.name if model.path is not None else "model"
    elif isinstance(model, (str, Path)):
        model = require_file(model, "model")
        name = model.name
    else:
        name = "model"
    file = key = None
    if cache_dir is not None:
        sha = model_sha256
        if sha is None and isinstance(model, Path):
            sha = sha256_file(model)
        elif sha is None and isinstance(model, OnnxModel) and model.path is not None:
            sha = sha256_file(model.path)
        if sha is not None:
            key = cache_key(model_sha256=sha, data_sha256=source.sha256(), input_spec=input_spec, flip=flip, pairs=n)  # type: ignore[attr-defined]
            file = cache_file(cache_dir, key)
            hit = _load_cache(file, key, rows, progress)
            if hit is not None:
                bad = int(np.sum(~np.all(np.isfinite(hit), axis=1)))
                return hit, EmbedInfo(cached=True, seconds=time.perf_counter() - t0, nonfinite=bad, cache_file=str(file))

    if runner is not None:
        session = runner()
    elif isinstance(model, OnnxModel):
        session = model
    else:
        session = open_model(model, input_spec, threads=threads)
    views = 2 if flip else 1
    distinct, copy_of = distinct_images(source, rows)
    parts: list[np.ndarray] = []
    finite_parts: list[np.ndarray] = []
    with progress.task(f"embedding {label or name}", total=len(distinct) * views, unit="img") as task:
        for start in range(0, len(distinct), DECODE_CHUNK):
            idx = distinct[start : start + DECODE_CHUNK]
            imgs = source.decode_many(idx)
            if start == 0:
                session = batch_runner(
                    session, imgs, input_spec, batch=batch, source=model if isinstance(model, (onnx.ModelProto, bytes, bytearray)) else None, progress=progress
                )
            emb, finite = embed_images(session, imgs, input_spec, flip=flip, batch=batch)
            task.advance(len(idx) * views)
            parts.append(emb)
            finite_parts.append(finite)
    emb = np.concatenate(parts)[copy_of]
    nonfinite = int(np.sum(~np.concatenate(finite_parts)[copy_of]))
    if file is not None and key is not None and nonfinite == 0:
        _save_cache(file, key, emb)
    return emb, EmbedInfo(cached=False, seconds=time.perf_counter() - t0, nonfinite=nonfinite, cache_file=str(file) if file else None)
