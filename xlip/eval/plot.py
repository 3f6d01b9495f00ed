"""`xlip plot`: the training curves of a run (``metrics.jsonl``) as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from xlip.errors import InputError, MissingFileError


def read_metrics(run: Path) -> list[dict[str, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: give a pre-training run folder")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {i}: not valid JSON ({err})") from None
    if not rows:
        raise InputError(f"{path} is empty: the run logged no step yet")
    return rows


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Every loss term (solid) and its per-source parts (dashed), the learning rate, the
    gradient norm and the logit scale against the step; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    terms = sorted({k for r in rows for k in r if k.endswith("_loss")})
    fig, axes = plt.subplots(1, len(terms) + 1, figsize=(4.2 * (len(terms) + 1), 3.4))
    for ax, term in zip(axes, terms):
        for key in sorted({k for r in rows for k in r if k == term or k.startswith(term + "/")}):
            xs = [s for s, r in zip(steps, rows) if key in r]
            ax.plot(xs, [r[key] for r in rows if key in r], "-" if key == term else "--",
                    label=key.split("/", 1)[1] if "/" in key else "all", lw=1.4)
        ax.set_title(term.replace("_", " "))
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for key in ("lr", "grad_norm", "logit_scale"):
        if any(key in r for r in rows):
            vals = [r[key] for r in rows if key in r]
            top = max(vals) or 1.0
            ax.plot([s for s, r in zip(steps, rows) if key in r], [v / top for v in vals],
                    label=f"{key} (max {top:.3g})", lw=1.2)
    ax.set_title("schedule (each over its max)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.suptitle(str(run), fontsize=8)
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
