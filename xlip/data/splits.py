"""Label-fraction subsets of a training split (``xlip data split``): patient-disjoint, stratified
per finding, nested, written once and hashed so that every later evaluation reads the same rows.

**Selection** (``ALGORITHM``). The training patients are put in one order, a function of the
patients' label sets and the seed only (not of the row order, nor of the fractions asked for);
fraction f keeps the first ``round(f × N)`` of the N patients (halves round up), with all their
images. Every subset is therefore a prefix of the next larger one (1 % ⊂ 10 % ⊂ 100 %) and a
patient is wholly in or out. The order:

1. A patient's label set is the union of its images' labels (``No Finding`` counts as one).
2. Rarest finding first: the findings are taken by their number of positive patients (fewest
   first, then by name); for each that no patient placed so far is positive for, the next
   patient is one of its positive patients (the one that step 3 would prefer among them). So the
   first F or fewer patients hold a positive of every finding, and every fraction of at least
   that many patients does.
3. Then greedily: the (k+1)-th patient is one whose label set y minimises
   ``Σ_f (c_f + y_f − (k+1)·p_f)²``, where c counts the positive patients placed so far and p
   is the full training set's positive share per finding: each prefix stays as close to the
   full set's shares as one patient at a time allows (iterative stratification over patients).

Patients with the same label set are interchangeable to steps 2 and 3: among them, and between
label sets of equal cost, the one with the smallest seeded hash of its id (``patient_share``)
goes first, so the seed decides which patients fill the strata.

**Validation.** When the manifest has no rows of the validation split, ``HELD_OUT_VAL`` of the
training patients are held out for it by a seeded hash, before the fractions are drawn from the
rest (the probe's rule, :func:`hold_out`); split files carry them as validation rows.

**Files.** ``DIR/<split>_<percent>pct.csv`` per fraction: the chosen training rows (image and
labels), the held-out validation rows, and every row of the other splits as it was, image paths
relative to DIR; ``splits.json`` (source and its sha256, seed, algorithm, per fraction the file,
its sha256, rows, images, patients and positives per finding) and ``splits.md``.
:func:`check_split_file` refuses a split file whose content no longer has the recorded hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xlip.data.manifest import COLUMNS, Record, load_manifest, read_rows
from xlip.errors import InputError
from xlip.files import writable_dir, write_atomic
from xlip.hashing import file_sha256, hash_unit

ALGORITHM = "stratified-patient-order-v1"  # the module docstring; a new rule gets a new name
FORMAT = "xlip-splits-1"
HELD_OUT_VAL = 0.1  # share of training patients held out when the manifest has no val split
META, README = "splits.json", "splits.md"


def patient_key(r: Record) -> str:
    """The patient of a row: its ``patient_id``, else its image (one image, one patient)."""
    return r.patient_id or r.image


def patient_share(r: Record, seed: int, salt: str) -> float:
    """A stable number in [0, 1) per patient (the image when there is no patient id)."""
    return hash_unit(f"{salt}/{seed}/{patient_key(r)}")


def hold_out(train: list[Record], seed: int) -> tuple[list[Record], list[Record]]:
    """(training, validation): ``HELD_OUT_VAL`` of the patients, drawn by a seeded hash, held out
    for validation (for a manifest without validation rows)."""
    val = [r for r in train if patient_share(r, seed, "val") < HELD_OUT_VAL]
    return [r for r in train if patient_share(r, seed, "val") >= HELD_OUT_VAL], val


def check_fraction(fraction: float, what: str = "--fraction") -> None:
    if not 0.0 < fraction <= 1.0:  # NaN fails too
        raise InputError(f"{what} {fraction}: give a share in (0, 1], e.g. 0.01, 0.1 or 1")


def fraction_size(fraction: float, patients: int) -> int:
    """How many of ``patients`` a fraction keeps: ``round(fraction × patients)``, halves up."""
    return math.floor(fraction * patients + 0.5)


def patient_order(records: Sequence[Record], seed: int, limit: int | None = None,
                  progress: bool = False) -> list[str]:
    """The first ``limit`` (default: all) patients of ``records`` in selection order (the
    module docstring)."""
    label_sets: dict[str, set[str]] = {}
    for r in records:
        label_sets.setdefault(patient_key(r), set()).update(r.labels)
    by_set: dict[tuple[str, ...], list[str]] = {}
    for p, labs in label_sets.items():
        by_set.setdefault(tuple(sorted(labs)), []).append(p)
    sets = sorted(by_set)
    draw = {p: hash_unit(f"fraction/{seed}/{p}") for p in label_sets}
    queues = [sorted(by_set[s], key=lambda p: (draw[p], p)) for s in sets]
    findings = sorted({f for s in sets for f in s})
    y = np.array([[f in s for f in findings] for s in sets], dtype=float)  # (G, F)
    size = np.array([len(q) for q in queues])  # (G,) patients per label set
    positives = y.T @ size  # (F,) positive patients per finding
    share = positives / max(len(label_sets), 1)
    count = np.zeros(len(findings))  # (F,) positive patients placed
    taken = np.zeros(len(sets), dtype=int)  # (G,) patients placed per label set
    head = np.array([draw[q[0]] for q in queues])  # (G,) draw of each set's next patient
    limit = len(label_sets) if limit is None else min(limit, len(label_sets))
    order: list[str] = []

    def pick(allowed: np.ndarray) -> int:
        deficit = (len(order) + 1) * share - count  # (F,)
        cost = np.where(allowed & (taken < size), y @ (1.0 - 2.0 * deficit), np.inf)  # (G,)
        tied = np.flatnonzero(cost <= cost.min() + 1e-9)
        return int(tied[np.argmin(head[tied])])

    def place(g: int) -> None:
        nonlocal count
        order.append(queues[g][taken[g]])
        count = count + y[g]
        taken[g] += 1
        head[g] = draw[queues[g][taken[g]]] if taken[g] < size[g] else np.inf
        bar.update()

    from tqdm import tqdm

    with tqdm(total=limit, desc="split", unit="patient", disable=not progress,
              dynamic_ncols=True) as bar:
        for j in sorted(range(len(findings)), key=lambda j: (positives[j], findings[j])):
            if len(order) < limit and count[j] == 0:  # rarest finding first
                place(pick(y[:, j] > 0))
        everyone = np.ones(len(sets), dtype=bool)
        while len(order) < limit:
            place(pick(everyone))
    return order


def nested_fractions(records: Sequence[Record], fractions: Sequence[float], seed: int,
                     progress: bool = False) -> dict[float, list[int]]:
    """Per fraction, the indices (ascending) of the ``records`` of its patients: the one
    selection of ``xlip data split`` and ``xlip eval probe --fraction``. A subset may be empty
    (:func:`check_subset` says so)."""
    for f in fractions:
        check_fraction(f)
    patients = len({patient_key(r) for r in records})
    sizes = {f: fraction_size(f, patients) for f in fractions}
    partial = [n for f, n in sizes.items() if f < 1.0]
    rank = {p: i for i, p in enumerate(patient_order(records, seed, max(partial), progress))
            } if partial else {}
    return {f: [i for i, r in enumerate(records)
                if f >= 1.0 or rank.get(patient_key(r), patients) < sizes[f]]
            for f in fractions}


def check_subset(fraction: float, rows: Sequence[Record], patients: int,
                 what: str = "--fraction") -> None:
    """Refuse a fraction whose subset (``rows``, of ``patients`` training patients) is empty or
    holds no finding with both classes: nothing can be learnt from it."""
    if not rows:
        least = 0.5 / max(patients, 1)
        raise InputError(f"{what} {fraction:g}: {fraction:g} × {patients} training patients "
                         f"rounds to 0 patients; use a larger fraction (at least {least:.2g})")
    labels = {f for r in rows for f in r.labels} - {"No Finding"}
    if not any(0 < sum(f in r.labels for r in rows) < len(rows) for f in labels):
        raise InputError(f"{what} {fraction:g}: no finding has positive and negative images "
                         f"among its {len(rows)} training images; use a larger fraction")


def file_name(split: str, fraction: float) -> str:
    """``train_1pct.csv`` for split ``train`` and fraction 0.01."""
    return f"{split}_{fraction * 100:g}pct.csv"


def check_split_file(path: str | Path) -> str:
    """The sha256 of a manifest, refusing a split file changed since ``xlip data split``.

    When ``path`` sits beside a ``splits.json`` that lists it, its content must still have the
    recorded sha256 (else InputError naming the file and both hashes); the recorded hash is
    returned. Any other manifest: its own sha256."""
    path = Path(path)
    digest = file_sha256(path)
    meta = path.parent / META
    if not meta.is_file():
        return digest
    try:
        listed = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(listed, dict) or listed.get("format") != FORMAT:
            return digest  # some other tool's splits.json
        recorded = {e["file"]: e["sha256"] for e in listed["fractions"]}.get(path.name)
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{meta}: damaged (not the JSON that xlip data split writes); re-run "
                         "xlip data split into that folder with --force") from None
    if recorded is not None and recorded != digest:
        raise InputError(f"{path}: changed since xlip data split wrote it (sha256 {digest}, "
                         f"recorded in {meta}: {recorded}); re-run xlip data split or restore "
                         "the file")
    return recorded or digest


@dataclass(frozen=True)
class SplitOptions:
    """What :func:`write_splits` writes."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seed: int = 0
    split: str = "train"  # the split the fractions are drawn from
    val_split: str = "valid"  # held out of ``split`` when the manifest has none
    force: bool = False  # replace files of an earlier, different split in the folder
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.fractions:
            raise InputError("--fractions is empty: give shares such as 0.01,0.1,1")
        for f in self.fractions:
            check_fraction(f, "--fractions")
        names = [file_name(self.split, f) for f in self.fractions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"--fractions {','.join(f'{f:g}' for f in self.fractions)}: "
                             f"two of them give the same file {twice[0]}; give each once")
        if self.split == self.val_split:
            raise InputError(f"--split and --val-split are both {self.split!r}; give two "
                             "different splits")


def write_splits(manifest: str | Path, out_dir: str | Path, opt: SplitOptions) -> dict[str, Any]:
    """Write the split files, ``splits.json`` and ``splits.md`` into ``out_dir``; returns what
    ``splits.json`` holds. Files already there with other content are refused unless
    ``opt.force``; identical ones are left as they are."""
    manifest, out = Path(manifest).resolve(), writable_dir(out_dir, "--out").resolve()
    raw = read_rows(manifest)
    records = load_manifest(manifest, verify_images=False)  # raises on any rejected row
    pool = [r for r in records if r.split == opt.split and r.image and r.labels]
    if not pool:
        raise InputError(f"{manifest}: no rows with image and labels in split {opt.split!r}; "
                         f"its splits are {', '.join(sorted({r.split for r in records}))} "
                         "(choose one with --split)")
    held: list[Record] = []
    val = [r for r in records if r.split == opt.val_split and r.image and r.labels]
    if not val:
        pool, held = hold_out(pool, opt.seed)
    patients = len({patient_key(r) for r in pool})
    chosen = nested_fractions(pool, opt.fractions, opt.seed, opt.progress)
    columns = list(COLUMNS) + [c for c in dict.fromkeys(k for row in raw for k in row)
                               if c not in COLUMNS]
    files: dict[str, bytes] = {}
    entries = []
    for f in opt.fractions:
        subset = [pool[i] for i in chosen[f]]
        check_subset(f, subset, patients, "--fractions")
        name = file_name(opt.split, f)
        files[name], rows = _manifest_bytes(records, raw, subset, held, opt, columns, out)
        entries.append({"fraction": f, "file": name,
                        "sha256": hashlib.sha256(files[name]).hexdigest(), "rows": rows,
                        **_counts(subset)})
    meta = {"format": FORMAT, "source": str(manifest), "source_sha256": file_sha256(manifest),
            "seed": opt.seed, "algorithm": ALGORITHM,
            "rounding": "round(fraction × patients), halves up", "split": opt.split,
            "val_split": opt.val_split,
            "validation": (f"held out: {HELD_OUT_VAL:.0%} of the {opt.split!r} patients "
                           f"(seed {opt.seed}), written as split {opt.val_split!r}" if held else
                           f"the source's {opt.val_split!r} rows"),
            "pool": _counts(pool),
            "validation_images": len(held or val),
            "other_splits": {s: sum(r.split == s for r in records)
                             for s in sorted({r.split for r in records} - {opt.split})},
            "fractions": entries}
    files[META] = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    files[README] = markdown(meta).encode("utf-8")
    _write(out, files, manifest, opt.force)
    return meta


def _counts(rows: Sequence[Record]) -> dict[str, Any]:
    """images, patients, and per finding its positive images and positive patients."""
    findings = sorted({f for r in rows for f in r.labels})
    return {"images": len(rows), "patients": len({patient_key(r) for r in rows}),
            "positives": {f: sum(f in r.labels for r in rows) for f in findings},
            "positive_patients": {f: len({patient_key(r) for r in rows if f in r.labels})
                                  for f in findings}}


def _manifest_bytes(records: list[Record], raw: list[dict[str, str]], subset: list[Record],
                    held: list[Record], opt: SplitOptions, columns: list[str],
                    out: Path) -> tuple[bytes, int]:
    """The split file and its number of rows: the chosen and held-out rows of ``opt.split`` (its
    other rows left out) and every row of the other splits, in the source's order, image paths
    relative to ``out``."""
    keep = {r.row: opt.split for r in subset} | {r.row: opt.val_split for r in held}
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    n = 0
    for r in records:  # one per source row: load_manifest refused any rejected row
        if r.split == opt.split and r.row not in keep:
            continue
        row = dict(raw[r.row - 1])
        row["image"] = os.path.relpath(r.image, out) if r.image else ""
        if r.row in keep:
            row["split"] = keep[r.row]
        w.writerow({c: row.get(c, "") for c in columns})
        n += 1
    return buf.getvalue().encode("utf-8"), n


def _write(out: Path, files: dict[str, bytes], source: Path, force: bool) -> None:
    """Write ``files`` into ``out`` atomically (splits.json last); refuse to replace other
    content unless ``force``, which also removes split files of the old splits.json that the new
    one does not list."""
    if any(out / name == source for name in files):
        raise InputError(f"--out {out}: would overwrite the source manifest {source}; write the "
                         "splits to another folder")
    changed = [n for n, data in files.items()
               if (out / n).exists() and (out / n).read_bytes() != data]
    if changed and not force:
        raise InputError(f"--out {out}: holds {changed[0]} from an earlier, different split "
                         f"({len(changed)} file(s) would change); pass --force to replace "
                         "them, or give another --out")
    stale: list[str] = []
    if (out / META).is_file():
        try:
            old = json.loads((out / META).read_text(encoding="utf-8"))
            stale = [e["file"] for e in old.get("fractions", []) if e.get("file") not in files]
        except (ValueError, KeyError, TypeError, AttributeError):
            stale = []  # a damaged splits.json: replaced below, its files left alone
    for name, data in files.items():  # splits.json last: it vouches for the files before it
        if (out / name).is_file() and (out / name).read_bytes() == data:
            continue
        write_atomic(out / name, data)
    for name in stale:
        if Path(name).name == name and (out / name).is_file():
            (out / name).unlink()


def markdown(meta: dict[str, Any]) -> str:
    """``splits.md``: one row per fraction (images, patients, positive images per finding)."""
    findings = list(meta["pool"]["positives"])
    lines = [f"# Label-fraction splits of `{meta['source']}`", "",
             f"Source sha256 `{meta['source_sha256']}`, seed {meta['seed']}, selection "
             f"`{meta['algorithm']}` (patient-disjoint, stratified per finding, nested; "
             f"{meta['rounding']}). Validation ({meta['validation_images']} images): "
             f"{meta['validation']}. Other rows, unchanged in every file: "
             + (", ".join(f"{s} {n}" for s, n in meta["other_splits"].items()) or "none")
             + ".", "",
             "| fraction | file | images | patients | " + " | ".join(findings) + " |",
             "|---" * (4 + len(findings)) + "|"]
    rows = [(f"{e['fraction']:g}", f"`{e['file']}`", e) for e in meta["fractions"]]
    if not any(e["fraction"] == 1.0 for e in meta["fractions"]):
        rows.append(("all", "(not written)", meta["pool"]))
    for frac, name, e in rows:
        lines.append(f"| {frac} | {name} | {e['images']} | {e['patients']} | "
                     + " | ".join(str(e["positives"].get(f, 0)) for f in findings) + " |")
    lines += ["", "Finding columns: positive training images. Each file's sha256 is in "
              "`splits.json`; `xlip eval probe` refuses a file whose content has changed."]
    return "\n".join(lines) + "\n"
