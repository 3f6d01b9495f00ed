import numpy as np
from sklearn.metrics import roc_auc_score

from xlip.eval.metrics import bootstrap_ci, bootstrap_mean_ci


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
