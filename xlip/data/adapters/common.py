"""What every dataset adapter shares: finding files, collecting kept and rejected rows, patient
splits, label tables, image checks and writing ``manifest.csv`` / ``rejects.csv`` /
``summary.json``.

An adapter reads a dataset as downloaded and calls :meth:`Collector.keep` for each usable row and
:meth:`Collector.reject` for each row it drops, with a reason. :func:`write_outputs` then checks
the kept images, writes the three files (atomically, in a fixed order, so a re-run gives the same
bytes) and returns a :class:`Summary`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from xlip.data.images import image_problem
from xlip.data.manifest import COLUMNS, reason_kind, row_kind, unusable
from xlip.errors import XlipError
from xlip.files import atomic_open, not_utf8, write_atomic
from xlip.hashing import hash_unit
from xlip.text.labels import CANONICAL_FINDINGS, UnknownLabelError, canonical_label

#: Columns after :data:`xlip.data.manifest.COLUMNS` in every adapter's manifest.
EXTRA_COLUMNS: tuple[str, ...] = ("negative_labels", "uncertain_labels", "labels_raw", "sex", "age")
REJECT_COLUMNS: tuple[str, ...] = ("file", "row", "id", "image", "reason")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
FRONTAL = ("PA", "AP", "FRONTAL")  # FRONTAL: a frontal view not known to be PA or AP


class AdapterError(XlipError, ValueError):
    """A dataset folder that cannot be read as the named dataset."""


# ---------------------------------------------------------------------------------------------
# Finding and reading files


def find_file(root: Path, names: Sequence[str], what: str, required: bool = True) -> Path | None:
    """The first file under ``root`` (searched recursively) named one of ``names``."""
    if root.is_file() and root.name in names:
        return root
    for name in names:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    if required:
        raise AdapterError(f"{what}: none of {', '.join(names)} found under {root}. "
                           "Pass the folder the dataset was downloaded or extracted to.")
    return None


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(1-based data row, row) of a CSV, plain, ``.gz`` or a one-CSV ``.zip``; a file that is not
    UTF-8 raises AdapterError naming it."""
    try:
        yield from _read_csv(path)
    except UnicodeDecodeError as err:
        raise AdapterError(not_utf8(path, err)) from None


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.endswith(".csv")]
            if len(members) != 1:
                raise AdapterError(f"{path}: expected one CSV inside, found {members}")
            text = io.TextIOWrapper(z.open(members[0]), encoding="utf-8-sig", newline="")
            yield from _rows(text)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        yield from _rows(f)


def _rows(f) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(f)
    for i, row in enumerate(reader, start=1):
        yield i, {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}


def require_columns(path: Path, row: Mapping[str, str], columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise AdapterError(f"{path}: missing column(s) {missing}; found {sorted(row)}. "
                           "Is this the right file for this dataset?")


class ImageIndex:
    """Every image file under a folder, found by relative path, by file name or by stem.

    The folder is walked once, at the first lookup that the relative path alone does not answer.
    Lookups by stem let an adapter find ``x.png`` where the label file says ``x.jpeg`` (a set
    converted after download); such matches are counted in ``stem_matches``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None
        self._by_stem: dict[str, list[Path]] = {}
        self.stem_matches = 0

    def _tables(self) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
        if self._by_name is None:
            self._by_name = {}
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    if f.lower().endswith(IMAGE_SUFFIXES):
                        p = Path(dirpath) / f
                        self._by_name.setdefault(f, []).append(p)
                        self._by_stem.setdefault(Path(f).stem, []).append(p)
        return self._by_name, self._by_stem

    def __len__(self) -> int:
        return sum(len(v) for v in self._tables()[0].values())

    def find(self, ref: str) -> Path | None:
        """The file for ``ref`` (a relative path or a file name), or None.

        A ``ref`` with folders matches only files under folders of those names (CheXpert's
        ``patient1/study1/view1_frontal.jpg`` never matches another patient's
        ``view1_frontal.jpg``).
        """
        direct = self.root / ref
        if direct.is_file():
            return direct
        ref_path = Path(ref)
        folders = ref_path.parent.parts
        by_name, by_stem = self._tables()
        for table, key in ((by_name, ref_path.name), (by_stem, _stem(ref_path))):
            hits = [h for h in table.get(key, ())
                    if not folders or h.parent.parts[-len(folders):] == folders]
            if hits:
                self.stem_matches += table is by_stem
                return sorted(hits)[0]
        return None


def _stem(path: Path) -> str:
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


# ---------------------------------------------------------------------------------------------
# Labels, views, splits


def map_labels(names: Iterable[str], table: Mapping[str, Sequence[str]] | None = None,
               where: str = "") -> tuple[list[str], list[str]]:
    """Dataset label names → (canonical findings in canonical order, names outside the vocabulary).

    ``table`` maps a dataset's names (compared case-insensitively) to canonical findings; an
    empty tuple marks a name the adapter documents as outside the vocabulary (kept in
    ``labels_raw``, counted in the summary). Names not in the table go through
    :func:`xlip.text.labels.canonical_label`: an unknown one raises UnknownLabelError.
    """
    table = {k.lower(): v for k, v in (table or {}).items()}
    found, outside = set(), []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name.lower() in table:
            mapped = table[name.lower()]
            if not mapped:
                outside.append(name)
            found.update(mapped)
        else:
            found.add(canonical_label(name, where))
    return [f for f in CANONICAL_FINDINGS if f in found], outside


def normalise_view(view: str) -> str:
    """``PA`` / ``AP`` / ``FRONTAL`` (PA or AP, not said which) / ``LATERAL`` / ``""`` (unknown)
    from a dataset's view spelling."""
    v = view.strip().upper().replace("_", " ")
    if v in ("PA", "POSTEROANTERIOR", "PA ERECT", "FRONTAL PA"):
        return "PA"
    if v.startswith("AP") or v in ("ANTEROPOSTERIOR", "FRONTAL AP"):
        return "AP"
    if v in ("FRONTAL", "PA OR AP", "AP OR PA"):
        return "FRONTAL"
    if v in ("L", "LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LAO", "RAO", "XTABLE LATERAL"):
        return "LATERAL"
    return ""


def parse_views(spec: str) -> set[str]:
    """``--views`` value → allowed views; ``frontal`` = PA, AP and FRONTAL, ``all``, ``unknown``
    for ``""``."""
    allowed: set[str] = set()
    for part in spec.upper().replace(" ", "").split(","):
        if part == "FRONTAL":
            allowed.update(FRONTAL)
        elif part == "ALL":
            allowed.update(FRONTAL + ("LATERAL", ""))
        elif part == "UNKNOWN":
            allowed.add("")
        elif part in ("PA", "AP", "LATERAL"):
            allowed.add(part)
        elif part:
            raise AdapterError(f"--views: unknown view {part!r}; use a comma list of "
                               "frontal, PA, AP, LATERAL, unknown, all")
    return allowed


def view_reason(view: str, allowed: set[str]) -> str:
    """'' when ``view`` passes the filter, else the reject reason."""
    if view in allowed:
        return ""
    if view == "LATERAL":
        return "lateral view filtered"
    if view == "":
        return "view unknown (add 'unknown' to --views to keep)"
    return f"{view} view filtered"


def parse_fractions(spec: str) -> dict[str, float]:
    """``valid=0.1,test=0.1`` → {'valid': .1, 'test': .1, 'train': .8}."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise AdapterError(f"--split-fractions: {part!r} is not NAME=FRACTION") from None
    rest = 1.0 - sum(out.values())
    if rest < -1e-9 or any(v < 0 for v in out.values()):
        raise AdapterError(f"--split-fractions {spec!r}: fractions must be ≥ 0 and sum to ≤ 1")
    out["train"] = out.get("train", 0.0) + max(rest, 0.0)
    return out


def patient_split(patient_id: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """A split drawn from a hash of the patient: all of a patient's rows land in one split."""
    u = hash_unit(f"{seed}/{patient_id}")
    acc = 0.0
    for name in sorted(fractions):
        acc += fractions[name]
        if u < acc:
            return name
    return "train"


def train_or_valid(patient_id: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """'valid' or 'train' for a patient of a dataset's official training part: the ``valid``
    share of ``--split-fractions`` is drawn from it by patient (its official test stays test)."""
    valid = fractions.get("valid", 0.0)
    return patient_split(patient_id, {"valid": valid, "train": 1.0 - valid}, seed)


def normalise_split(split: str) -> str:
    s = split.strip().lower()
    return {"validate": "valid", "validation": "valid", "val": "valid", "dev": "valid"}.get(s, s)


# ---------------------------------------------------------------------------------------------
# Collecting rows


@dataclass
class Collector:
    """Kept rows and rejected rows (each with the file and row it came from)."""

    dataset: str
    rows: list[dict[str, str]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    rows_in: int = 0
    notes: list[str] = field(default_factory=list)
    outside: Counter = field(default_factory=Counter)  # label names outside the vocabulary

    def keep(self, image: Path | None, text: str = "", labels: Sequence[str] = (), *,
             split: str, patient_id: str, study_id: str = "", view: str = "",
             negative: Sequence[str] = (), uncertain: Sequence[str] = (),
             raw: Sequence[str] = (), sex: str = "", age: str = "", origin: str = "",
             id: str = "") -> None:
        """origin / id: 'FILE row N' and the row's id (default: study_id), for a reject found
        later (an unreadable image)."""
        self.rows.append({
            "image": str(image) if image else "", "text": text.strip(),
            "labels": ";".join(labels), "split": split, "patient_id": patient_id,
            "study_id": study_id, "view": view, "source": self.dataset,
            "negative_labels": ";".join(negative), "uncertain_labels": ";".join(uncertain),
            "labels_raw": ";".join(raw), "sex": sex, "age": age, "_origin": origin,
            "_id": id or study_id,
        })

    def reject(self, file: Path | str, row: int | str, reason: str, *, id: str = "",
               image: str | Path = "") -> None:
        self.rejects.append({"file": Path(file).name if file else "", "row": str(row),
                             "id": id, "image": str(image), "reason": reason})


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Summary:
    dataset: str
    out_dir: Path
    rows_in: int
    kept: int
    rejected: Counter  # reason category -> rows
    kinds: Counter
    splits: Counter
    labels: Counter
    outside: Counter
    notes: list[str]

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "rows_in": self.rows_in, "kept": self.kept,
                "rejected": dict(sorted(self.rejected.items())),
                "kinds": dict(sorted(self.kinds.items())),
                "splits": dict(sorted(self.splits.items())),
                "labels": {f: self.labels[f] for f in CANONICAL_FINDINGS if self.labels[f]},
                "outside_vocabulary": dict(sorted(self.outside.items())), "notes": self.notes}

    def describe(self) -> str:
        n_rej = sum(self.rejected.values())
        lines = [f"{self.dataset}: {self.rows_in} rows in, {self.kept} kept, {n_rej} rejected"]
        for reason, n in self.rejected.most_common():
            lines.append(f"  rejected {n:>7}  {reason}")
        if self.kept:
            lines.append("  kinds:  " + ", ".join(f"{k} {n}" for k, n in
                                                  sorted(self.kinds.items())))
            lines.append("  splits: " + ", ".join(f"{k} {n}" for k, n in
                                                  sorted(self.splits.items())))
        top = ", ".join(f"{f} {self.labels[f]}" for f in CANONICAL_FINDINGS if self.labels[f])
        lines.append(f"  labels: {top or 'none'}")
        if self.outside:
            common = self.outside.most_common()
            more = f", … {len(common) - 12} more in summary.json" if len(common) > 12 else ""
            lines.append("  names outside the finding vocabulary (kept in labels_raw only): " +
                         ", ".join(f"{k} {n}" for k, n in common[:12]) + more)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_images(rows: list[dict[str, str]], workers: int, progress: bool = False) -> list[str]:
    """image_problem of each row's image ('' for rows without one), in parallel threads."""
    from tqdm import tqdm

    paths = [r["image"] for r in rows]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = pool.map(lambda p: image_problem(p) if p else "", paths)
        return list(tqdm(done, total=len(paths), desc="decoding images", unit="img",
                         disable=not progress, mininterval=1.0))


def write_outputs(col: Collector, out_dir: Path, *, verify: str = "decode", workers: int = 0,
                  absolute_paths: bool = False, progress: bool = False) -> Summary:
    """Check images (``verify``: decode | exists | none), write the outputs, return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if verify not in ("decode", "exists", "none"):
        raise AdapterError(f"--verify must be decode, exists or none, not {verify!r}")
    rows, first = [], {}
    for r in col.rows:  # a label file listing one image twice (the COVID collection does)
        reason = unusable(r["image"], r["text"], r["labels"], r.get("negative_labels", ""))
        if reason:  # what load_manifest would refuse later
            file, _, row = r["_origin"].rpartition(" row ")
            col.reject(file, row, reason, id=r["_id"], image=r["image"])
            continue
        if r["image"] and r["image"] in first:
            file, _, row = r["_origin"].rpartition(" row ")
            col.reject(file, row, f"duplicate image (the same file as {first[r['image']]})",
                       id=r["_id"], image=r["image"])
            continue
        if r["image"]:
            first[r["image"]] = r["_origin"]
        rows.append(r)
    if verify != "none":
        if verify == "decode":
            problems = check_images(rows, workers or (os.cpu_count() or 1), progress)
        else:
            problems = ["" if not r["image"] or Path(r["image"]).is_file()
                        else "missing image file" for r in rows]
        kept = []
        for r, problem in zip(rows, problems):
            if problem:
                file, _, row = r["_origin"].rpartition(" row ")
                col.reject(file, row, problem, id=r["_id"], image=r["image"])
            else:
                kept.append(r)
        rows = kept
    out_rows = []
    for r in rows:
        r = {k: v for k, v in r.items() if not k.startswith("_")}
        if r["image"] and not absolute_paths:
            r["image"] = os.path.relpath(os.path.abspath(r["image"]), os.path.abspath(out_dir))
        out_rows.append(r)
    _atomic_csv(out_dir / "manifest.csv", COLUMNS + EXTRA_COLUMNS, out_rows)
    _atomic_csv(out_dir / "rejects.csv", REJECT_COLUMNS, col.rejects)
    kinds = Counter(row_kind(r["image"], r["text"]) for r in out_rows)
    summary = Summary(
        dataset=col.dataset, out_dir=out_dir, rows_in=col.rows_in, kept=len(out_rows),
        rejected=Counter(reason_kind(r["reason"]) for r in col.rejects), kinds=kinds,
        splits=Counter(r["split"] for r in out_rows),
        labels=Counter(lab for r in out_rows for lab in r["labels"].split(";") if lab),
        outside=col.outside, notes=col.notes)
    write_atomic(out_dir / "summary.json", json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def _atomic_csv(path: Path, columns: Sequence[str], rows: list[dict[str, str]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def label_error_reason(err: UnknownLabelError) -> str:
    """'unknown label: <the first sentence of the error>'."""
    return "unknown label: " + str(err).split(";")[0].removeprefix("unknown label ")
