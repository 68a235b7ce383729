"""Scoring int8 candidates: accuracy on whole folds of verification pairs against fp32 (insightface protocol)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.eval import protocol
from pipeline.eval.embeddings import embed_pairs_with_info

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec


def subset_pairs(num_pairs: int, eval_pairs: int, folds: int) -> int:
    """``eval_pairs`` rounded up to whole folds of the full set (LFW: 600 pairs, 300 same + 300 different)."""
    if eval_pairs <= 0:
        raise UserError(f"quantization.recovery.eval_pairs must be positive, got {eval_pairs}")
    fold = num_pairs // folds
    if fold == 0:
        return num_pairs
    return min(num_pairs, math.ceil(eval_pairs / fold) * fold)


class PairsFrom:
    """The pairs of a verification set from pair ``start`` on, for :func:`pipeline.eval.embeddings.embed_pairs_with_info` (no cache)."""

    def __init__(self, pairs_bin: Any, start: int) -> None:
        self._bin = pairs_bin
        self._offset = 2 * start
        self.num_pairs = pairs_bin.num_pairs - start
        self.num_images = 2 * self.num_pairs
        self.path = pairs_bin.path

    def decode_many(self, idx: Sequence[int]) -> np.ndarray:
        return self._bin.decode_many([int(i) + self._offset for i in idx])

    def encoded(self, i: int) -> bytes:
        return self._bin.encoded(int(i) + self._offset)


class Evaluator:
    """fp32 vs candidate accuracy (insightface protocol) on the first ``pairs`` pairs, and on the first
    ``confirm_pairs`` (the verify gate's set) for candidates that pass there.

    A subset of 1,200 pairs screens candidates cheaply but cannot certify a 0.1-point target: one pair
    is 0.08 points, and a handful of pairs decided differently by the two models moves the figure by
    more than the target. The fp32 embeddings are computed once, for the larger set.
    """

    def __init__(
        self, fp32: Path, pairs_bin: Any, spec: "InputSpec", *, pairs: int, confirm_pairs: int | None = None, folds: int = 10,
        flip: bool = True, batch: int = 16, threads: int | None = None, cache_dir: Path | None = None, progress: Progress | None = None,
    ) -> None:
        self.bin = pairs_bin
        self.spec = spec
        self.pairs = pairs
        self.confirm_pairs = confirm_pairs if confirm_pairs is not None and confirm_pairs > pairs else None
        self.folds = folds
        self.flip = flip
        self.batch = batch
        self.threads = threads
        self.progress = progress or NULL_PROGRESS
        if pairs < folds:
            raise UserError(f"recovery needs at least {folds} verification pairs to score accuracy; {pairs_bin.path} has {pairs}")
        n = self.confirm_pairs or pairs
        # The verify stage's cache key (same model, data, preprocessing, flip and pairs): verify reuses these.
        self.fp32_emb, _ = embed_pairs_with_info(
            fp32, pairs_bin, input_spec=spec, flip=flip, batch=batch, pairs=n, threads=threads, cache_dir=cache_dir, progress=self.progress
        )
        self.fp32 = protocol.evaluate(self.fp32_emb[0 : 2 * pairs : 2], self.fp32_emb[1 : 2 * pairs : 2], pairs_bin.issame[:pairs], folds=folds)
        self.fp32_confirm = (
            protocol.evaluate(self.fp32_emb[0::2], self.fp32_emb[1::2], pairs_bin.issame[:n], folds=folds) if self.confirm_pairs else None
        )
        self._last: tuple[Path, np.ndarray] | None = None  # the last subset embeddings, for a confirmation

    def _embed(self, model: Path, start: int, stop: int) -> np.ndarray:
        view = self.bin if start == 0 else PairsFrom(self.bin, start)
        emb, _ = embed_pairs_with_info(
            model, view, input_spec=self.spec, flip=self.flip, batch=self.batch, pairs=stop - start, threads=self.threads,
            progress=self.progress,
        )
        return emb

    def score(self, model: Path, *, confirm: bool = False) -> dict[str, Any]:
        """Accuracy, drop and embedding cosine to fp32 on the subset (or, with ``confirm``, the gate's set)."""
        n = self.confirm_pairs if confirm and self.confirm_pairs else self.pairs
        ref = self.fp32_confirm if confirm and self.confirm_pairs else self.fp32
        if confirm and self._last is not None and self._last[0] == model:
            # The subset is the gate set's first folds: only the rest is embedded again.
            emb = np.concatenate([self._last[1], self._embed(model, self.pairs, n)])
        else:
            emb = self._embed(model, 0, n)
        self._last = (model, emb[: 2 * self.pairs]) if not confirm else None
        m = protocol.evaluate(emb[0::2], emb[1::2], self.bin.issame[:n], folds=self.folds)
        cos = np.sum(emb * self.fp32_emb[: 2 * n], axis=1)  # both L2-normalised
        cos = np.where(np.isfinite(cos), cos, -1.0)
        return {
            "pairs": n,
            "accuracy": float(m.accuracy),
            "accuracy_std": float(m.accuracy_std),
            "drop": float(ref.accuracy - m.accuracy),
            "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(np.min(cos)),
        }
