"""Where pre-training's metric rows go: ``train.report_to``.

- ``jsonl`` (always on): ``metrics.jsonl``, one JSON row per ``train.log_every`` steps, which
  ``xlip plot`` and ``xlip ablate`` read.
- ``tensorboard`` (``pip install 'xlip[tensorboard]'``): event files under ``RUN/tensorboard/``,
  one scalar per key of the row at its step: every loss term and each term per data source
  (``cl_loss/covid_paired``), ``lr``, ``grad_norm``, ``logit_scale``, ``samples_per_s``
  (throughput over all ranks), ``guide_fallback``, ``elapsed_s``.

Only rank 0 writes. A resumed run first drops what was logged after its checkpoint (the JSONL
rows; TensorBoard's events through ``purge_step``), so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from xlip.config import ConfigError
from xlip.files import write_atomic

REPORTERS = ("jsonl", "tensorboard")


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.report_to includes tensorboard, but the tensorboard package "
                          "is not installed: pip install 'xlip[tensorboard]' (or pip install "
                          "tensorboard), or leave tensorboard out of train.report_to") from None
    return SummaryWriter


def check_reporters(report_to: Sequence[str]) -> None:
    """Raise the ConfigError of a reporter whose package is missing (on every rank, before
    the run loads its data)."""
    if "tensorboard" in report_to:
        summary_writer_class()


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metric rows after ``step`` (all of them for a fresh run), so that a resumed run
    appends without logging a step twice."""
    if not path.exists():
        return
    rows = [x for x in path.read_text().splitlines() if x.strip()]
    kept = [x for x in rows if json.loads(x).get("step", 0) <= step] if step else []
    write_atomic(path, "".join(x + "\n" for x in kept))


class Tracker:
    """The run's metric writers. Build it on every rank (a missing package then stops every
    rank alike); ``write=False`` (ranks other than 0) writes nothing."""

    def __init__(self, out_dir: Path, report_to: Sequence[str], start: int,
                 write: bool) -> None:
        writer_class = summary_writer_class() if "tensorboard" in report_to else None
        self.jsonl = out_dir / "metrics.jsonl" if write else None
        self.tb = None
        if not write:
            return
        keep_metrics_until(self.jsonl, start)  # rows logged after the checkpoint are redone
        if writer_class is not None:
            # events at steps > start (logged after the checkpoint) are dropped when read
            self.tb = writer_class(log_dir=str(out_dir / "tensorboard"),
                                   purge_step=start + 1 if start else None)

    def log(self, row: dict[str, float]) -> None:
        """One row of metrics at ``row['step']``."""
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
