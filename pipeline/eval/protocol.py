"""The insightface face-verification protocol, as pure numpy (arrays in, numbers out).

This is insightface's ``verification.py`` (``calculate_roc``, ``calculate_val``,
``evaluate``) without image decoding or model calls, and vectorised: a
threshold sweep counts distances below each threshold with ``searchsorted``
instead of a Python loop, which gives the same integer counts as
``np.less(dist, threshold)`` and so the same accuracies, bit for bit.

The protocol, for pairs (a_i, b_i) with labels issame_i:

* embeddings are the L2-normalised sum of the embeddings of the image and its
  horizontal flip (:func:`flip_sum`; the caller runs the model twice);
* distance is the squared L2 distance between the two normalised embeddings;
* 10 folds without shuffling (scikit-learn ``KFold(shuffle=False)``: contiguous
  folds, the first ``n % folds`` one pair longer);
* per fold, the threshold from ``np.arange(0, 4, 0.01)`` with the best
  accuracy on the other nine folds (ties: the first, ``np.argmax``) is scored
  on the held-out fold; "same" means ``dist < threshold``;
* accuracy is the mean over folds and its spread ``np.std`` (population) of the
  fold accuracies;
* VAL: per fold, the threshold where the training FAR reaches 1e-3 is
  interpolated over ``np.arange(0, 4, 0.001)`` (scipy ``interp1d(...,
  kind='slinear')`` as insightface used it), and TAR and FAR are measured on
  the held-out fold.

Units: accuracies and TAR are returned in PERCENT; FAR and ROC AUC as fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float64; all-zero rows stay zero (sklearn ``normalize``)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64).

    Two all-zero rows count as identical (1.0); one zero row against a non-zero one as 0.0.
    NaN or inf anywhere gives NaN, which fails any ``>=`` threshold.
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", a, b) / (na * nb)
    both_zero = (na == 0) & (nb == 0)
    one_zero = (na == 0) ^ (nb == 0)
    cos[both_zero] = 1.0
    cos[one_zero] = 0.0
    cos[~np.isfinite(a).all(axis=1) | ~np.isfinite(b).all(axis=1)] = np.nan
    return cos


def flip_sum(embeddings: np.ndarray, flipped: np.ndarray | None) -> np.ndarray:
    """The protocol's final embedding: L2-normalise(image embedding + flip embedding), float64."""
    e = np.asarray(embeddings, dtype=np.float64)
    if flipped is not None:
        f = np.asarray(flipped, dtype=np.float64)
        if f.shape != e.shape:
            raise ValueError(f"flip embeddings have shape {f.shape}, image embeddings {e.shape}")
        e = e + f
    return l2_normalize(e)


def squared_l2(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance per pair (rows of the two arrays)."""
    e1 = np.asarray(embeddings1, dtype=np.float64)
    e2 = np.asarray(embeddings2, dtype=np.float64)
    if e1.shape != e2.shape or e1.ndim != 2:
        raise ValueError(f"embedding arrays must be 2-D and the same shape, got {e1.shape} and {e2.shape}")
    return np.sum(np.square(e1 - e2), axis=1)


def kfold(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of scikit-learn ``KFold(n_splits=folds, shuffle=False)``."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if n < folds:
        raise ValueError(f"cannot split {n} pairs into {folds} folds")
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    indices = np.arange(n)
    out = []
    start = 0
    for size in sizes:
        test = indices[start : start + size]
        train = np.concatenate([indices[:start], indices[start + size :]])
        out.append((train, test))
        start += size
    return out


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    # For a sorted array, searchsorted(side="left") is the number of values strictly below each
    # threshold, i.e. sum(np.less(values, t)); NaN sorts last and is never below anything.
    return np.searchsorted(sorted_values, thresholds, side="left")


def _counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(true accepts, false accepts, n_same, n_diff) at every threshold."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    return _count_below(same, thresholds), _count_below(diff, thresholds), same.size, diff.size


def accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of correctly classified pairs at each threshold ("same" iff dist < threshold)."""
    ta, fa, _, n_diff = _counts(dist, issame, thresholds)
    return ta + (n_diff - fa)


def fold_accuracies(
    dist: np.ndarray, issame: np.ndarray, *, folds: int = 10, thresholds: np.ndarray = ACCURACY_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """insightface ``calculate_roc``'s accuracy part: (accuracy per fold as a fraction, chosen threshold per fold)."""
    dist, issame = _check(dist, issame)
    acc = np.zeros(folds)
    best = np.zeros(folds)
    for i, (train, test) in enumerate(kfold(dist.size, folds)):
        # Integer counts over the same training set order exactly as insightface's float accuracies,
        # so argmax picks the same (first) best threshold.
        k = int(np.argmax(accuracy_curve(dist[train], issame[train], thresholds)))
        best[i] = thresholds[k]
        correct = accuracy_curve(dist[test], issame[test], thresholds[k : k + 1])[0]
        acc[i] = float(correct) / test.size
    return acc, best


def _interp_slinear(x: np.ndarray, y: np.ndarray, u: float) -> float:
    """``scipy.interpolate.interp1d(x, y, kind='slinear')(u)`` as insightface ran it.

    interp1d sorted x stably and built a degree-1 B-spline with knots
    ``[x0, x..., x_last]`` (``make_interp_spline``'s k=1 shortcut). FAR against
    threshold is a step function with many repeated x values, which current
    scipy refuses ("Expect x to not have duplicates") but older scipy evaluated
    as follows: linear between the last point with x <= u and the point after
    it, extrapolating from the first/last interval, and 0.0 where that last
    interval has zero width (de Boor's recursion skips a zero-width knot span).
    """
    order = np.argsort(x, kind="mergesort")
    x = np.asarray(x, dtype=np.float64)[order]
    y = np.asarray(y, dtype=np.float64)[order]
    i = int(np.searchsorted(x, u, side="right")) - 1
    i = min(max(i, 0), x.size - 2)
    x0, x1 = x[i], x[i + 1]
    if x1 == x0:
        return 0.0
    return float(y[i] + (y[i + 1] - y[i]) * (u - x0) / (x1 - x0))


def fold_val(
    dist: np.ndarray,
    issame: np.ndarray,
    *,
    folds: int = 10,
    far_target: float = FAR_TARGET,
    thresholds: np.ndarray = VAL_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """insightface ``calculate_val`` per fold: (TAR as a fraction, FAR as a fraction, threshold).

    A fold whose test part has no same (or no different) pairs has an undefined
    TAR (FAR): NaN there, where insightface would divide by zero.
    """
    dist, issame = _check(dist, issame)
    val = np.zeros(folds)
    far = np.zeros(folds)
    thr = np.zeros(folds)
    for i, (train, test) in enumerate(kfold(dist.size, folds)):
        _, fa, _, n_diff = _counts(dist[train], issame[train], thresholds)
        far_train = fa / n_diff if n_diff else np.full(thresholds.size, np.nan)
        if np.max(far_train) >= far_target:
            t = _interp_slinear(far_train, thresholds, far_target)
        else:
            t = 0.0
        thr[i] = t
        pred = np.less(dist[test], t)
        same = issame[test]
        n_same_test = int(np.sum(same))
        n_diff_test = int(np.sum(~same))
        val[i] = np.sum(pred & same) / n_same_test if n_same_test else np.nan
        far[i] = np.sum(pred & ~same) / n_diff_test if n_diff_test else np.nan
    return val, far, thr


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The exact ROC over all pairs (score = -distance): (fpr, tpr, AUC), AUC as a fraction.

    One point per distinct distance, starting at (0, 0); AUC by the trapezoid
    rule, which equals the Mann-Whitney probability with ties counted half.
    NaN AUC when one class is absent.
    """
    dist, issame = _check(dist, issame)
    n_same = int(np.sum(issame))
    n_diff = issame.size - n_same
    if n_same == 0 or n_diff == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), math.nan
    order = np.argsort(dist, kind="mergesort")
    d = dist[order]
    s = issame[order]
    tp = np.cumsum(s)
    fp = np.cumsum(~s)
    # Keep only the last index of each run of equal distances: one ROC point per threshold.
    last = np.r_[np.nonzero(np.diff(d))[0], d.size - 1]
    tpr = np.r_[0.0, tp[last] / n_same]
    fpr = np.r_[0.0, fp[last] / n_diff]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return fpr, tpr, auc


def _check(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if dist.size != issame.size:
        raise ValueError(f"{dist.size} distances but {issame.size} labels")
    return dist, issame


def finite_or_none(x: float) -> float | None:
    # JSON has no NaN: an undefined figure becomes null.
    return float(x) if math.isfinite(x) else None


@dataclass
class VerificationMetrics:
    """One model on one data set. Accuracy and TAR in percent; FAR and AUC as fractions."""

    pairs: int
    folds: int
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    best_thresholds: list[float]
    threshold_mean: float
    tar_at_far: float
    tar_at_far_std: float
    far: float
    far_target: float
    roc_auc: float
    roc_fpr: np.ndarray = field(repr=False)
    roc_tpr: np.ndarray = field(repr=False)

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        d = {
            "pairs": self.pairs,
            "folds": self.folds,
            "accuracy": finite_or_none(self.accuracy),
            "accuracy_std": finite_or_none(self.accuracy_std),
            "fold_accuracies": [finite_or_none(a) for a in self.fold_accuracies],
            "best_thresholds": [finite_or_none(t) for t in self.best_thresholds],
            "threshold_mean": finite_or_none(self.threshold_mean),
            "tar_at_far": finite_or_none(self.tar_at_far),
            "tar_at_far_std": finite_or_none(self.tar_at_far_std),
            "far": finite_or_none(self.far),
            "far_target": self.far_target,
            "roc_auc": finite_or_none(self.roc_auc),
        }
        if curves:
            d["roc_fpr"] = [float(v) for v in self.roc_fpr]
            d["roc_tpr"] = [float(v) for v in self.roc_tpr]
        return d


def evaluate_distances(
    dist: np.ndarray, issame: np.ndarray, *, folds: int = 10, far_target: float = FAR_TARGET
) -> VerificationMetrics:
    """All protocol figures from per-pair squared distances."""
    dist, issame = _check(dist, issame)
    acc, best = fold_accuracies(dist, issame, folds=folds)
    val, far, _ = fold_val(dist, issame, folds=folds, far_target=far_target)
    fpr, tpr, auc = roc_curve(dist, issame)
    return VerificationMetrics(
        pairs=int(dist.size),
        folds=folds,
        accuracy=float(np.mean(acc)) * 100.0,
        accuracy_std=float(np.std(acc)) * 100.0,
        fold_accuracies=[float(a) * 100.0 for a in acc],
        best_thresholds=[float(t) for t in best],
        threshold_mean=float(np.mean(best)),
        tar_at_far=float(np.mean(val)) * 100.0,
        tar_at_far_std=float(np.std(val)) * 100.0,
        far=float(np.mean(far)),
        far_target=far_target,
        roc_auc=auc,
        roc_fpr=fpr,
        roc_tpr=tpr,
    )


def evaluate(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, *, folds: int = 10, far_target: float = FAR_TARGET
) -> VerificationMetrics:
    """All protocol figures from the final (flip-summed, normalised) embeddings of each pair's two faces."""
    return evaluate_distances(squared_l2(embeddings1, embeddings2), issame, folds=folds, far_target=far_target)
