"""Dataset adapters: a dataset as downloaded → an ``xlip`` manifest (``xlip data prepare``).

Each adapter writes ``OUT_DIR/manifest.csv`` (canonical label names, ``patient_id``,
``study_id``, ``view``, ``split``, ``source``, plus ``negative_labels`` / ``uncertain_labels`` /
``labels_raw``), ``OUT_DIR/rejects.csv`` (every dropped row: the file, its 1-based data row, and
why) and ``OUT_DIR/summary.json``. Outputs are written whole and atomically in a fixed order, so
running an adapter again gives the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xlip.data.adapters.binary import prepare_covidx, prepare_siim_png, prepare_tbx11k
from xlip.data.adapters.common import (
    AdapterError, Collector, Summary, parse_fractions, write_outputs,
)
from xlip.data.adapters.images import (
    prepare_chexpert, prepare_covid, prepare_generic, prepare_nih, prepare_rsna, prepare_siim,
    prepare_vindr,
)
from xlip.data.adapters.labels import UNCERTAIN_POLICIES
from xlip.data.adapters.reports import prepare_iu, prepare_mimic
from xlip.text.sections import TEXT_POLICIES

__all__ = ["ADAPTERS", "AdapterError", "PrepareOptions", "Summary", "prepare"]

ADAPTERS: dict[str, Callable[[Path, "PrepareOptions", Collector], None]] = {
    "mimic-cxr": prepare_mimic,
    "chexpert": prepare_chexpert,
    "nih-cxr14": prepare_nih,
    "rsna-pneumonia": prepare_rsna,
    "siim-pneumothorax": prepare_siim,
    "siim-pneumothorax-png": prepare_siim_png,
    "covid-collection": prepare_covid,
    "iu-xray": prepare_iu,
    "vindr-cxr": prepare_vindr,
    "covidx": prepare_covidx,
    "tbx11k": prepare_tbx11k,
    "generic": prepare_generic,
}


@dataclass
class PrepareOptions:
    """What ``xlip data prepare`` can be told (each adapter reads the options it needs)."""

    views: str = "frontal"  # comma list of frontal, PA, AP, LATERAL, unknown, all
    split_fractions: str = "valid=0.1,test=0.1"  # patient-level split where none is official
    seed: int = 0
    uncertain: str = "ignore"  # CheXpert-style -1: ignore | positive | negative
    reports: str = ""  # MIMIC-CXR: folder holding files/pXX/... report .txt files
    reports_only: bool = False  # IU X-ray: one text-only row per report, no images
    labels: str = "mesh"  # IU X-ray: mesh (the indexers' problems) | ner (from the report)
    text_policy: str = "findings_impression"  # reports with nothing in these sections: rejected
    rad_vote: str = "majority"  # VinDr-CXR: majority | any
    csv: str = ""  # generic
    map: str = ""  # generic: FIELD=COLUMN,...
    label_sep: str = ";"  # generic
    verify: str = "decode"  # decode | exists | none
    workers: int = 0  # image checks in parallel (0: one per CPU)
    absolute_paths: bool = False
    progress: bool = False  # a progress bar while images are decoded

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise AdapterError(f"--uncertain {self.uncertain!r}: use one of {UNCERTAIN_POLICIES}")
        if self.labels not in ("mesh", "ner"):
            raise AdapterError(f"--labels {self.labels!r}: use mesh or ner")
        if self.rad_vote not in ("majority", "any"):
            raise AdapterError(f"--rad-vote {self.rad_vote!r}: use majority or any")
        self.fractions()
        if self.text_policy not in TEXT_POLICIES:
            raise AdapterError(f"--text-policy {self.text_policy!r}: use one of {TEXT_POLICIES}")

    def fractions(self) -> dict[str, float]:
        return parse_fractions(self.split_fractions)


def prepare(dataset: str, raw_dir: str | Path, out_dir: str | Path,
            options: PrepareOptions | None = None) -> Summary:
    """Convert ``raw_dir`` (the dataset as downloaded) into ``out_dir/manifest.csv``.

    Raises:
        AdapterError: an unknown dataset name, a missing raw folder or label file, a label file
            without the expected columns, or a bad option; the message says the fix.
    """
    if dataset not in ADAPTERS:
        raise AdapterError(f"unknown dataset {dataset!r}; adapters: {', '.join(ADAPTERS)}")
    raw = Path(raw_dir)
    if not raw.exists():
        raise AdapterError(f"{dataset}: raw folder {raw} does not exist")
    out = Path(out_dir)
    if out.resolve() == raw.resolve():
        raise AdapterError("--out must not be the raw dataset folder")
    opt = options or PrepareOptions()
    col = Collector(dataset)
    ADAPTERS[dataset](raw, opt, col)
    return write_outputs(col, out, verify=opt.verify, workers=opt.workers,
                         absolute_paths=opt.absolute_paths, progress=opt.progress)
