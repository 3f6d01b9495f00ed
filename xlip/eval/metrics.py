"""Classification metrics with bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score


def auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score))


def bootstrap_ci(y: np.ndarray, score: np.ndarray, n: int = 200, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (resamples that lack a class are skipped)."""
    return bootstrap_mean_ci(np.asarray(y)[:, None], np.asarray(score)[:, None], n, seed, alpha)


def bootstrap_mean_ci(y: np.ndarray, score: np.ndarray, n: int = 200, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean AUC over columns (findings), resampling images
    jointly: y, score (n_images, F). Resamples in which a column lacks a class are skipped."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        yy, ss = y[idx], score[idx]
        if (yy.min(axis=0) == yy.max(axis=0)).any():
            continue
        vals.append(np.mean([roc_auc_score(yy[:, j], ss[:, j]) for j in range(y.shape[1])]))
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def auc_table(findings: list[str], y: np.ndarray, score: np.ndarray, y_train: np.ndarray,
              n_boot: int) -> tuple[dict[str, dict], list[float]]:
    """The test table of a trained classifier (linear probe, fine-tuning): per finding its AUC
    with a bootstrap 95 % CI (seed: the finding's column), test positives / n and training
    positives; and the 95 % CI of the mean AUC. y, score (n_test, F); y_train (n_train, F).
    ``n_boot`` 0: no bootstrap (each CI is the AUC itself, the mean's NaN)."""
    per = {}
    for j, f in enumerate(findings):
        a = auc(y[:, j], score[:, j])
        ci = bootstrap_ci(y[:, j], score[:, j], n=n_boot, seed=j) if n_boot else (a, a)
        per[f] = {"auc": a, "auc_ci95": list(ci), "positives": int(y[:, j].sum()),
                  "n": len(y), "train_positives": int(y_train[:, j].sum())}
    mean_ci = bootstrap_mean_ci(y, score, n=n_boot) if n_boot else (float("nan"),) * 2
    return per, list(mean_ci)


def f1_acc(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    pred = prob >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    return f1, float(np.mean(pred == (y == 1)))


def best_f1_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold ``t`` whose calls ``prob >= t`` have the highest F1, ``t`` ranging over the
    distinct values of ``prob`` (ties: the highest such ``t``, the fewest positive calls).
    ``y`` (n,) in {0, 1} must hold a positive (else every F1 is 0)."""
    y, prob = np.asarray(y).astype(bool), np.asarray(prob, dtype=np.float64)
    if not y.any():
        raise ValueError("best_f1_threshold: no positive row, F1 is 0 at every threshold")
    order = np.argsort(-prob, kind="stable")
    p, t = prob[order], y[order]  # scores descending
    last = np.r_[p[1:] != p[:-1], True]  # the last row of each run of equal scores
    tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]  # calls at t = p[last], descending
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))  # > 0 denominators: y has a positive
    return float(p[last][np.argmax(f1)])  # argmax: the first, i.e. highest, of tied maxima


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, n_boot: int = 200) -> dict:
    """Multi-class scores of ``y`` (n,) class indices against ``prob`` (n, C) (rows summing to
    1): ``accuracy`` of the argmax; one-vs-rest ``auc`` per class with bootstrap 95% CIs
    (``auc_ci95``, seed = class index); ``macro_auc`` (their mean, as sklearn's
    ``roc_auc_score(multi_class="ovr", average="macro")``) with a joint bootstrap CI;
    ``confusion`` (C, C) counts, rows the true class, columns the predicted one. Every class
    needs a row (and so each has positives and negatives)."""
    y, prob = np.asarray(y), np.asarray(prob)
    n_classes = prob.shape[1]
    onehot = np.eye(n_classes, dtype=int)[y]  # (n, C)
    per = [auc(onehot[:, c], prob[:, c]) for c in range(n_classes)]
    cis = [bootstrap_ci(onehot[:, c], prob[:, c], n=n_boot, seed=c) if n_boot else (a, a)
           for c, a in enumerate(per)]
    pred = prob.argmax(axis=1)
    return {"accuracy": float(np.mean(pred == y)), "auc": per, "auc_ci95": [list(c) for c in cis],
            "macro_auc": float(np.mean(per)),
            "macro_auc_ci95": list(bootstrap_mean_ci(onehot, prob, n=n_boot) if n_boot
                                   else (float("nan"),) * 2),
            "confusion": confusion_matrix(y, pred, labels=list(range(n_classes))).tolist()}
