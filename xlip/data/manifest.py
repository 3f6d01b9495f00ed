"""Manifests: one row per sample (``image``, ``text``, ``labels``, ``split``, ``patient_id``,
``study_id``, ``view``, ``source``), CSV or JSONL. Image paths are relative to the manifest.

Loading validates every row. Rows that cannot be used are written to a rejects CSV with the
reason; by default loading then stops with an error naming the file, the rows and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from xlip.data.images import image_problem
from xlip.data.storage import image_exists
from xlip.errors import XlipError
from xlip.files import not_utf8
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
        return row_kind(self.image, self.text)


def row_kind(image: str, text: str) -> str:
    """paired | image_only | text_only: the one rule for what a row is (the loader, ``data
    validate`` and ``data prepare`` all count by it)."""
    if image.strip() and text.strip():
        return "paired"
    return "image_only" if image.strip() else "text_only"


def unusable(image: str, text: str, labels, negatives=()) -> str:
    """'' for a row that can train something, else why not: the one rule for rows rejected
    before their image is opened."""
    if not image.strip() and not text.strip():
        return "neither image nor text"
    if image.strip() and not text.strip() and not labels and not negatives:
        return "image without report or labels (an image-only row needs labels)"
    return ""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
SPLIT_NAMES = ("train", "valid", "val", "validate", "test")


def read_rows(path: Path) -> list[dict[str, str]]:
    """Every data row of a CSV / JSONL manifest as strings (``image_path`` read as ``image``).

    UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"). A file that is not UTF-8,
    has no data rows, or holds a quote that swallows the rows after it raises ManifestError
    naming the line."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    text = _decode(path)
    if path.suffix in (".jsonl", ".json"):
        rows: list[dict[str, str]] = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path} line {i}: not valid JSON ({err})") from None
                if not isinstance(item, dict):
                    raise ManifestError(f"{path} line {i}: expected a JSON object per line")
                rows.append({k: "" if v is None else str(v) for k, v in item.items()})
    else:
        rows = _read_csv(path, text)
    if not rows:
        raise ManifestError(f"manifest {path} has no data rows (a header at most); add rows "
                            "or give another manifest")
    if "image" not in rows[0] and "image_path" in rows[0]:  # the ../shared/data spelling
        for r in rows:
            r["image"] = r.pop("image_path")
    return rows


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not part of the first column
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ManifestError(not_utf8(path, err, line)) from None


def _read_csv(path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict[str, str]] = []
    end = 0  # the physical line the previous record ended on
    try:
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"manifest {path} is empty")
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise ManifestError(f"{path}: the header names column(s) {', '.join(twice)} twice; "
                                "rename or remove the duplicates")
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num
            if not values:
                continue
            if end > start:
                _check_swallowed(path, header, values, start, end, len(rows) + 1)
            if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
                raise ManifestError(
                    f"{path} data row {len(rows) + 1} (line {start}): {len(values)} fields for "
                    f"{len(header)} columns, so its values would land in the wrong columns; a "
                    "field with a comma (a report) must be quoted: \"lungs clear, no effusion\"")
            row = dict(zip(header, values))
            for k in header[len(values):]:
                row[k] = ""
            rows.append(row)
    except csv.Error as err:
        start = end + 1
        hint = (f"; most likely a quote opens in data row {len(rows) + 1} (line {start}) and "
                "is never closed, so every line after it was read into one field. Close it, or "
                "write a quote inside a field as \"\"") if "field limit" in str(err) else ""
        raise ManifestError(f"{path} line {reader.line_num}: not a valid CSV row ({err})"
                            f"{hint}") from None
    return rows


def _looks_like_row(line: str, header: list[str]) -> bool:
    """A line that parses as a whole manifest row: one field per column, and an image path
    or a split name where the header has them."""
    try:
        values = next(csv.reader([line]), [])
    except csv.Error:
        return False
    if len(values) != len(header):
        return False
    row = dict(zip(header, values))
    image = (row.get("image") or row.get("image_path") or "").strip().lower()
    return (image.endswith(IMAGE_SUFFIXES) or ".tar#" in image
            or row.get("split", "").strip().lower() in SPLIT_NAMES)


def _check_swallowed(path: Path, header: list[str], values: list[str], start: int, end: int,
                     row: int) -> None:
    """A quoted field may hold line breaks (a multi-line report), but not lines that are
    themselves manifest rows: those were swallowed by a quote that never closed."""
    for col, value in zip(header, values):
        lines = value.split("\n")[1:]
        swallowed = [x for x in lines if _looks_like_row(x.rstrip("\r"), header)]
        if swallowed:
            raise ManifestError(
                f"{path} data row {row} (line {start}): a quote opens in its {col!r} field and "
                f"does not close until line {end}, so {len(swallowed)} line(s) that are rows of "
                f"their own were read into that field (the first: {swallowed[0][:60]!r}). "
                "Remove the stray quote, or write a quote inside a field as \"\"")


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
        reason = reason or unusable(image, text, labels, negatives)
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
