"""ROC curves of zero-shot scores as one PNG: a panel per prompt set, a curve per finding (or, for
multi-class, per class against the rest), the AUC in the legend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from xlip.files import atomic_path


@dataclass(frozen=True)
class Curve:
    """One ROC curve: ``y`` (n,) in {0, 1}, ``score`` (n,) higher meaning positive."""

    name: str
    y: np.ndarray
    score: np.ndarray
    auc: float


@dataclass(frozen=True)
class Panel:
    title: str
    curves: Sequence[Curve]


def roc_figure(panels: Sequence[Panel], path: str | Path, title: str = "") -> Path:
    """Write the panels side by side to ``path`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for c in panel.curves:
            fpr, tpr, _ = roc_curve(c.y, c.score)
            ax.plot(fpr, tpr, lw=1.3, label=f"{c.name} ({c.auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
               ylabel="true positive rate", title=panel.title, aspect="equal")
        ax.legend(fontsize=7, loc="lower right", title="AUC", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
