import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from xlip.eval.metrics import (best_f1_threshold, bootstrap_ci, bootstrap_mean_ci, f1_acc,
                               multiclass_metrics)


def naive_bootstrap(y, s, n, seed, alpha=0.05):
    """The percentile bootstrap of the mean AUC over columns, written out plainly."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        cols = []
        for j in range(y.shape[1]):
            if len(set(y[idx, j])) < 2:
                break
            cols.append(roc_auc_score(y[idx, j], s[idx, j]))
        else:
            vals.append(sum(cols) / len(cols))
    return np.quantile(vals, alpha / 2), np.quantile(vals, 1 - alpha / 2)


def test_bootstrap_cis_match_a_naive_loop_and_hold_the_estimate():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < [0.1, 0.3, 0.5]).astype(int)  # a rare column: skipped resamples
    s = y + rng.normal(0, 1.0, y.shape)
    lo, hi = bootstrap_mean_ci(y, s, n=100, seed=4)
    assert (lo, hi) == naive_bootstrap(y, s, 100, 4)
    mean = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)])
    assert lo < mean < hi and hi - lo > 0.02
    # one finding: the same procedure on one column
    assert bootstrap_ci(y[:, 1], s[:, 1], n=100, seed=2) == naive_bootstrap(y[:, 1:2], s[:, 1:2],
                                                                           100, 2)
    assert np.isnan(bootstrap_ci(np.zeros(10), np.arange(10.0), n=5)).all()  # one class only


def brute_force_threshold(y, prob):
    """Every distinct score as a threshold, F1 of ``prob >= t`` counted one by one; the best
    F1, ties to the highest threshold."""
    best = None
    for t in sorted(set(prob.tolist())):
        pred = prob >= t
        tp = int(np.sum(pred & (y == 1)))
        f1 = 2 * tp / (2 * tp + int(np.sum(pred & (y == 0))) + int(np.sum(~pred & (y == 1))))
        if best is None or f1 >= best[0]:
            best = (f1, t)
    return best[1]


def test_best_f1_threshold_is_the_brute_force_maximiser():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(5, 60))
        y = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(int)
        y[0] = 1
        prob = (y * rng.uniform(0, 0.5) + rng.random(n)).round(1 if trial % 2 else 6)  # ties
        t = best_f1_threshold(y, prob)
        assert t == brute_force_threshold(y, prob)
        assert f1_acc(y, prob, t)[0] == max(f1_score(y, prob >= s) for s in set(prob.tolist()))
    assert best_f1_threshold(np.array([0, 1, 1]), np.array([0.9, 0.2, 0.1])) == 0.1  # all in
    with pytest.raises(ValueError, match="no positive"):
        best_f1_threshold(np.zeros(4), np.arange(4.0))


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 80)
    logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = multiclass_metrics(y, prob, n_boot=50)
    assert m["accuracy"] == accuracy_score(y, prob.argmax(1))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr",
                                                         average="macro"), abs=1e-12)
    assert m["auc"] == [roc_auc_score(y == c, prob[:, c]) for c in range(4)]
    assert m["confusion"] == confusion_matrix(y, prob.argmax(1)).tolist()
    assert m["auc_ci95"][2] == list(bootstrap_ci(y == 2, prob[:, 2], n=50, seed=2))
    lo, hi = m["macro_auc_ci95"]
    assert lo < m["macro_auc"] < hi


def test_bootstrap_cis_narrow_with_more_samples():
    """The same score distribution at 50, 200 and 800 images: each CI holds its estimate and
    narrows as 1/sqrt(n), a quarter of the width at 16 times the images (measured 0.20)."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 200, 800):
        y = (rng.random((n, 2)) < [0.2, 0.4]).astype(int)
        s = y + rng.normal(0, 1.2, y.shape)
        lo, hi = bootstrap_mean_ci(y, s, n=300, seed=0)
        assert lo < np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)]) < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert 0.12 < widths[2] / widths[0] < 0.45, widths  # sqrt(50 / 800) = 0.25
