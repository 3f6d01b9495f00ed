"""Report -> label columns for a CSV of reports (``xlip text label``).

Every input row is copied to the output with three columns added: ``labels`` (findings the NER
finds present), ``negative_labels`` (explicitly absent) and ``uncertain_labels`` (hedged), each a
``;``-separated list of canonical names (:mod:`xlip.text.labels`) in canonical order. The text the
NER reads is chosen by a text policy (:func:`xlip.text.sections.select_text`), so an indication
such as "rule out pneumonia" does not become a label. A row whose selected text is empty keeps
empty label columns and is also listed, with its row number (1 = first data row) and reason,
in ``<out>.rejects.csv``: no row is dropped.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from xlip.errors import InputError, MissingFileError
from xlip.files import not_utf8
from xlip.text.ner import label_sets
from xlip.text.sections import TEXT_POLICIES, select_text

__all__ = ["LABEL_COLUMNS", "LabelSummary", "label_csv"]

LABEL_COLUMNS: tuple[str, ...] = ("labels", "negative_labels", "uncertain_labels")


@dataclass
class LabelSummary:
    rows: int = 0
    labelled: int = 0
    empty: int = 0
    rejects: Path | None = None
    present: Counter = field(default_factory=Counter)  # finding -> rows where present

    def describe(self) -> str:
        lines = [f"{self.rows} rows: {self.labelled} labelled, {self.empty} with empty text"]
        if self.rejects is not None:
            lines.append(f"rows with empty text (kept, unlabelled) listed in {self.rejects}")
        top = ", ".join(f"{f} {n}" for f, n in self.present.most_common())
        lines.append(f"present: {top or 'none'}")
        return "\n".join(lines)


def label_csv(src: str | Path, out: str | Path, text_column: str = "text",
              text_policy: str = "findings_impression", prefix: str = "") -> LabelSummary:
    """Label every report of ``src`` and write all rows, with the label columns, to ``out``.

    Args:
        src: a CSV with a header row.
        out: the CSV to write (its parent folder is created).
        text_column: the column that holds the report.
        text_policy: which sections the NER reads (one of ``TEXT_POLICIES``).
        prefix: prepended to the added column names, for inputs that already have a ``labels``
            column (e.g. ``prefix="ner_"`` gives ``ner_labels``, ...).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: an unknown text policy, a missing text column, an empty file, or an added
            column name that the input already has; each message says the fix.
    """
    src, out = Path(src), Path(out)
    if text_policy not in TEXT_POLICIES:
        raise InputError(f"unknown text policy {text_policy!r}; choose one of "
                         f"{', '.join(TEXT_POLICIES)}")
    if not src.is_file():
        raise MissingFileError(f"{src}: no such CSV file")
    if src.resolve() == out.resolve():
        raise InputError(f"{out}: the output must not overwrite the input; choose another --out")
    try:
        with src.open(newline="", encoding="utf-8-sig") as fh:  # a BOM is not part of a name
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise InputError(not_utf8(src, err)) from None
    if not header:
        raise InputError(f"{src}: empty file (no header row)")
    if text_column not in header:
        raise InputError(f"{src}: no column {text_column!r}; columns are {', '.join(header)}. "
                         "Fix: pass --text-column with the column that holds the report")
    added = [prefix + c for c in LABEL_COLUMNS]
    clash = [c for c in added if c in header]
    if clash:
        raise InputError(f"{src} already has column(s) {', '.join(clash)}; pass --prefix "
                         "(e.g. --prefix ner_) to add the NER labels under other names")

    summary, rejects = LabelSummary(rows=len(rows)), []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header + added)
        writer.writeheader()
        for i, row in enumerate(rows, start=1):  # data rows; reports may span several lines
            raw = row.get(text_column) or ""
            text = select_text(raw, text_policy)
            sets: tuple[tuple[str, ...], ...] = ((), (), ())
            if text.strip():
                sets = label_sets(text)
                summary.labelled += 1
                summary.present.update(sets[0])
            else:
                summary.empty += 1
                reason = ("empty report" if not raw.strip()
                          else f"no text in the sections read by text policy {text_policy!r}")
                rejects.append({**row, "row": i, "reason": reason})
            writer.writerow({**row, **{c: ";".join(s) for c, s in zip(added, sets)}})
    rejects_path = out.with_name(out.stem + ".rejects.csv")
    rejects_path.unlink(missing_ok=True)  # none from an earlier run may linger
    if rejects:
        summary.rejects = rejects_path
        columns = ["row", "reason"] + [c for c in header if c not in ("row", "reason")]
        with rejects_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rejects)
    return summary
