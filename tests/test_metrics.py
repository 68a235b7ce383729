"""The verification protocol: a hand-computed case and insightface's own code on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval import protocol as metrics

# --- a hand-computed case -----------------------------------------------------
#
# 20 pairs, 10 folds of 2: fold k holds pair 2k (same) and pair 2k+1 (different).
# Same pairs are at distance 0.505, except fold 3's (1.205, a hard positive);
# different pairs at 1.4055, except fold 7's (0.8055, a hard negative).
#
# Accuracy, training on the other nine folds ("same" iff dist < t):
# * fold 3 held out: training is separable for t in (0.505, 0.8055]; first grid t = 0.51.
#   Test: the 1.205 same pair is rejected, the different pair rejected -> 1/2.
# * fold 7 held out: training is separable for t in (1.205, 1.4055]; first grid t = 1.21.
#   Test: same accepted, the 0.8055 different pair accepted -> 1/2.
# * any other fold: 17/18 at best, first reached in (0.505, 0.8055] -> t = 0.51; test 2/2.
# -> mean 0.9, population std sqrt((8 * 0.1^2 + 2 * 0.4^2) / 10) = 0.2; mean threshold
#    (9 * 0.51 + 1.21) / 10 = 0.58.
#
# VAL at FAR 1e-3 over the 0.001 grid: training FAR is 0 up to t = 0.805 and 1/9 from
# t = 0.806 when the hard negative is in training (every fold but 7), so the threshold is
# 0.805 + 0.001 * (1e-3 / (1/9)) = 0.805009; with fold 7 held out, training FAR jumps from 0
# to 9/9 after t = 1.405, so the threshold is 1.405 + 0.001 * 1e-3 = 1.405001.
# TAR per fold: 1 except fold 3 (its 1.205 same pair is above 0.805009) -> mean 0.9, std 0.3.
# FAR per fold: 0 except fold 7 (its 0.8055 pair is below 1.405001) -> mean 0.1.
# ROC AUC: P(d_same < d_diff) = (9 * 10 + 1 * 9) / 100 = 0.99.


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    dist = np.empty(20)
    issame = np.zeros(20, dtype=bool)
    issame[0::2] = True
    dist[0::2] = 0.505
    dist[1::2] = 1.4055
    dist[2 * 3] = 1.205
    dist[2 * 7 + 1] = 0.8055
    return dist, issame


def test_protocol_reproduces_hand_computed_fold_accuracies_and_thresholds():
    dist, issame = _hand_case()
    acc, best = metrics.fold_accuracies(dist, issame, folds=10)
    np.testing.assert_array_equal(acc, [1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1])
    np.testing.assert_allclose(best, [0.51] * 7 + [1.21] + [0.51] * 2)

    m = metrics.evaluate_distances(dist, issame, folds=10)
    assert m.accuracy == pytest.approx(90.0)
    assert m.accuracy_std == pytest.approx(20.0)
    assert m.threshold_mean == pytest.approx(0.58)
    assert m.pairs == 20


def test_val_reproduces_hand_computed_interpolated_thresholds():
    dist, issame = _hand_case()
    val, far, thr = metrics.fold_val(dist, issame, folds=10)
    np.testing.assert_allclose(thr, [0.805009] * 7 + [1.405001] + [0.805009] * 2, atol=1e-9)
    np.testing.assert_array_equal(val, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(far, [0] * 7 + [1] + [0] * 2)
    m = metrics.evaluate_distances(dist, issame)
    assert m.tar_at_far == pytest.approx(90.0)
    assert m.tar_at_far_std == pytest.approx(30.0)
    assert m.far == pytest.approx(0.1)


def test_roc_auc_matches_hand_computed_probability():
    dist, issame = _hand_case()
    fpr, tpr, auc = metrics.roc_curve(dist, issame)
    assert auc == pytest.approx(0.99)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_threshold_ties_pick_the_first_best_threshold():
    # Separable everywhere between 0.3 and 0.9: every threshold in (0.3, 0.9] is best; take 0.31.
    dist = np.array([0.3, 0.9] * 10)
    issame = np.array([True, False] * 10)
    _, best = metrics.fold_accuracies(dist, issame)
    np.testing.assert_allclose(best, 0.31)


def test_distance_equal_to_threshold_counts_as_different():
    # insightface predicts "same" with np.less: a distance exactly on a threshold is not below it.
    t = metrics.ACCURACY_THRESHOLDS
    dist = np.array([t[50], t[50]])
    assert metrics.accuracy_curve(dist, np.array([True, True]), t[50:52]).tolist() == [0, 2]


def test_kfold_is_contiguous_without_shuffle_and_longer_folds_first():
    folds = metrics.kfold(23, 10)
    sizes = [len(test) for _, test in folds]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate([test for _, test in folds]), np.arange(23))
    for train, test in folds:
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(23))
        assert np.all(np.diff(test) == 1)
    with pytest.raises(ValueError):
        metrics.kfold(9, 10)


def test_kfold_matches_scikit_learn_when_installed():
    sk = pytest.importorskip("sklearn.model_selection")
    for n in (20, 23, 600, 613):
        ours = metrics.kfold(n, 10)
        for (tr, te), (str_, ste) in zip(ours, sk.KFold(n_splits=10, shuffle=False).split(np.arange(n))):
            assert np.array_equal(tr, str_) and np.array_equal(te, ste)


def test_flip_sum_normalises_the_sum_and_keeps_zero_rows():
    e = np.array([[3.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    f = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    out = metrics.flip_sum(e, f)
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 0.0]])
    assert out.dtype == np.float64
    np.testing.assert_allclose(metrics.flip_sum(np.array([[0.0, 2.0]]), None), [[0.0, 1.0]])


def test_subset_of_pairs_uses_folds_over_the_subset():
    dist, issame = _hand_case()
    m = metrics.evaluate_distances(dist[:12], issame[:12], folds=10)
    assert m.pairs == 12 and len(m.fold_accuracies) == 10


def test_undefined_figures_become_null_in_json_not_nan():
    # All-same data: FAR and AUC are undefined.
    m = metrics.evaluate_distances(np.linspace(0.1, 1.0, 20), np.ones(20, dtype=bool))
    d = m.to_dict()
    assert d["roc_auc"] is None and d["far"] is None
    assert d["accuracy"] is not None and d["tar_at_far"] is not None


# --- insightface verification.py, transcribed (calculate_roc / calculate_val) -----------
# KFold from scratch (contiguous, no shuffle); scipy's old interp1d(kind='slinear') is the
# degree-1 B-spline with knots [x0, x, x_last] it built, evaluated by scipy itself.


def _ref_kfold(n, n_splits):
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    current = 0
    indices = np.arange(n)
    for size in sizes:
        test = indices[current : current + size]
        train = np.concatenate([indices[:current], indices[current + size :]])
        yield train, test
        current += size


def _ref_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def _ref_calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    accuracy = np.zeros((nrof_folds))
    best = np.zeros((nrof_folds))
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    for fold_idx, (train_set, test_set) in enumerate(_ref_kfold(nrof_pairs, nrof_folds)):
        acc_train = np.zeros((nrof_thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _ref_calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        best[fold_idx] = thresholds[best_threshold_index]
        _, _, accuracy[fold_idx] = _ref_calculate_accuracy(thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
    return accuracy, best


def _ref_old_interp1d_slinear(x, y):
    from scipy.interpolate import BSpline

    ind = np.argsort(x, kind="mergesort")
    x = np.asarray(x, dtype=float)[ind]
    y = np.asarray(y, dtype=float)[ind]
    return BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)


def _ref_calculate_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)


def _ref_calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    for fold_idx, (train_set, test_set) in enumerate(_ref_kfold(nrof_pairs, nrof_folds)):
        far_train = np.zeros(nrof_thresholds)
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = _ref_calculate_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            threshold = _ref_old_interp1d_slinear(far_train, thresholds)(far_target)
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = _ref_calculate_val_far(threshold, dist[test_set], actual_issame[test_set])
    return val, far


def _random_pairs(n_pairs, seed, dim=32, noise=0.9):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n_pairs, dim)), rng.normal(size=(n_pairs, dim)))
    e = metrics.flip_sum(np.stack([a, b], 1).reshape(-1, dim), None)
    return e[0::2], e[1::2], issame


@pytest.mark.parametrize("n_pairs,seed", [(600, 0), (613, 1), (240, 2)])
def test_accuracy_equals_insightface_calculate_roc_on_random_embeddings(n_pairs, seed):
    e1, e2, issame = _random_pairs(n_pairs, seed)
    ref_acc, ref_best = _ref_calculate_roc(np.arange(0, 4, 0.01), e1, e2, issame)
    m = metrics.evaluate(e1, e2, issame)
    assert 60 < m.accuracy < 99.9  # a non-trivial case, so thresholds matter
    np.testing.assert_array_equal(m.fold_accuracies, ref_acc * 100.0)
    np.testing.assert_array_equal(m.best_thresholds, ref_best)
    assert m.accuracy == pytest.approx(np.mean(ref_acc) * 100, abs=1e-12)
    assert m.accuracy_std == pytest.approx(np.std(ref_acc) * 100, abs=1e-12)


@pytest.mark.parametrize("n_pairs,seed", [(1800, 3), (1213, 4)])
def test_val_equals_insightface_calculate_val_on_random_embeddings(n_pairs, seed):
    pytest.importorskip("scipy")
    e1, e2, issame = _random_pairs(n_pairs, seed, noise=1.2)
    ref_val, ref_far = _ref_calculate_val(np.arange(0, 4, 0.001), e1, e2, issame, 1e-3)
    val, far, _ = metrics.fold_val(metrics.squared_l2(e1, e2), issame)
    np.testing.assert_allclose(val, ref_val, rtol=0, atol=1e-12)
    np.testing.assert_allclose(far, ref_far, rtol=0, atol=1e-12)
    assert 0 < np.mean(ref_val) < 1  # the interpolated threshold really separates something


def test_slinear_interpolation_matches_old_scipy_on_step_functions():
    pytest.importorskip("scipy")
    x = np.array([0, 0, 0, 0.1, 0.1, 0.3, 0.3, 0.3, 1.0, 1.0])
    y = np.arange(x.size) * 0.5
    spline = _ref_old_interp1d_slinear(x, y)
    for u in (0.0, 0.001, 0.05, 0.1, 0.2, 0.3, 0.65, 0.999):
        assert metrics._interp_slinear(x, y, u) == pytest.approx(float(spline(u)), abs=1e-12), u


def test_auc_matches_scikit_learn_when_installed():
    skm = pytest.importorskip("sklearn.metrics")
    e1, e2, issame = _random_pairs(500, 5)
    dist = metrics.squared_l2(e1, e2)
    dist = np.round(dist, 2)  # ties, which the curve must handle as one point
    _, _, auc = metrics.roc_curve(dist, issame)
    assert auc == pytest.approx(skm.roc_auc_score(issame, -dist), abs=1e-12)
    assert not math.isnan(auc)


def test_cosine_rows_zero_and_non_finite_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    cos = metrics.cosine_rows(a, b)
    np.testing.assert_allclose(cos[[0, 1, 2, 4]], [1.0, 1.0, 0.0, -1.0])
    assert np.isnan(cos[3]) and not cos[3] >= -1.0  # NaN fails any threshold
