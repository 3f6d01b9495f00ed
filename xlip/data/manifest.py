"""Manifests: one row per sample (``image``, ``text``, ``labels``, ``split``, ``patient_id``,
``study_id``, ``view``, ``source``), CSV or JSONL. Image paths are relative to the manifest.

Loading validates every row. Rows that cannot be used are written to a rejects CSV with the
reason; by default loading then stops with an error naming the file, the rows and the fix.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from xlip.data.images import image_problem
from xlip.data.storage import image_exists
from xlip.errors import XlipError
from xlip.text.labels import UnknownLabelError, parse_labels

COLUMNS = ("image", "text", "labels", "split", "patient_id", "study_id", "view", "source")


class ManifestError(XlipError, ValueError):
    """A manifest that cannot be used as it is."""


@dataclass(frozen=True)
class Record:
    row: int  # 1-based data row in the manifest file (the header is row 0)
    image: str  # absolute path, "" when the row has no image
    text: str
    labels: tuple[str, ...]
    split: str
    patient_id: str
    study_id: str
    view: str
    source: str
    negatives: tuple[str, ...] = ()  # findings known to be absent (``negative_labels``)

    @property
    def kind(self) -> str:
        if self.image and self.text.strip():
            return "paired"
        return "image_only" if self.image else "text_only"


def read_rows(path: Path) -> list[dict[str, str]]:
    """Every data row of a CSV / JSONL manifest as strings (``image_path`` read as ``image``)."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows: list[dict[str, str]] = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append({k: "" if v is None else str(v)
                                 for k, v in json.loads(line).items()})
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path} line {i}: not valid JSON ({err})") from None
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ManifestError(f"manifest {path} is empty")
            rows = [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
    if rows and "image" not in rows[0] and "image_path" in rows[0]:  # the ../shared/data spelling
        for r in rows:
            r["image"] = r.pop("image_path")
    return rows


def load_manifest(path: str | Path, *, verify_images: bool = True,
                  rejects: str | Path | None = None, skip_bad: bool = False) -> list[Record]:
    """Read and validate a manifest.

    Args:
        verify_images: decode every image once (catches corrupt files before training).
        rejects: where to write rejected rows with reasons (default: next to the manifest,
            ``<name>.rejects.csv``), written only when there are rejects.
        skip_bad: drop rejected rows (they are still written to ``rejects``) instead of
            raising ManifestError.
    """
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    missing = [c for c in ("image", "text") if c not in rows[0]]
    if len(missing) == 2:
        raise ManifestError(f"manifest {path} has neither an 'image' nor a 'text' column; "
                            f"expected columns: {', '.join(COLUMNS)}")
    records, bad = [], []
    for i, r in enumerate(rows, start=1):
        image = r.get("image", "").strip()
        text = r.get("text", "").strip()
        where = f"{path} row {i}"
        reason = ""
        try:
            labels = parse_labels(r.get("labels", ""), where=where)
            negatives = parse_labels(r.get("negative_labels", ""), where=where)
        except UnknownLabelError as err:
            labels, negatives, reason = (), (), f"unknown label: {err}"
        abs_image = str((path.parent / image).resolve()) if image else ""
        if not reason and not image and not text:
            reason = "neither image nor text"
        if not reason and image and not text and not labels and not negatives:
            reason = "image without report or labels (an image-only row needs labels)"
        if not reason and image:
            reason = image_problem(abs_image) if verify_images else (
                "" if image_exists(abs_image) else "missing image file")
        if reason:
            bad.append({"row": i, "image": image, "reason": reason})
            continue
        records.append(Record(i, abs_image, text, labels, r.get("split", "").strip() or "train",
                              r.get("patient_id", ""), r.get("study_id", ""),
                              r.get("view", ""), r.get("source", "") or path.stem, negatives))
    if bad:
        out = Path(rejects) if rejects else path.with_name(path.stem + ".rejects.csv")
        try:
            write_rejects(out, bad)
            where_written = f"all {len(bad)} written to {out}"
        except OSError:
            where_written = f"could not write {out}"
        head = "; ".join(f"row {b['row']} ({b['image'] or 'no image'}): {b['reason']}"
                         for b in bad[:5])
        msg = (f"{path}: {len(bad)} of {len(rows)} rows rejected ({where_written}): {head}")
        if not skip_bad:
            raise ManifestError(msg + ". Fix or remove those rows, or load with skip_bad "
                                "(data.skip_bad=true) to train without them.")
    return records


def reason_kind(reason: str) -> str:
    """'unreadable image (OSError: ...)' / 'unknown label: ...' → 'unreadable image' /
    'unknown label': what summaries count rejects by."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def write_rejects(path: Path, bad: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "image", "reason"])
        w.writeheader()
        w.writerows(bad)


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
