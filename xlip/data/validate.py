"""`xlip data validate`: check manifests before training, and say what to fix.

Problems stop training or bias its evaluation (exit status 1 unless ``--warn-only``); warnings
do not. Every issue names the manifest, the 1-based data rows (the header is row 0) and the fix.

==================  ========  ===============================================================
check               severity  what
==================  ========  ===============================================================
manifest            problem   the file cannot be read, or has neither an image nor a text column
unusable row        problem   neither image nor text; an image without report or labels
unknown label       problem   a ``labels`` / ``negative_labels`` name outside the vocabulary
empty text          problem   a report that is empty after section selection (``text_policy``)
image               problem   missing, empty, not an image, corrupt (every image is decoded)
small image         warning   shorter side below ``min_side`` pixels
duplicate path      warn/prob the same file in several rows (a problem across train and held-out)
duplicate content   warn/prob identical bytes under several paths (likewise)
patient overlap     problem   a patient in training rows and held-out rows (another split, --eval)
no patient_id       warning   rows whose patient overlap cannot be checked
==================  ========  ===============================================================

Patient IDs are compared within one source (the ``source`` column; rows without one match any
source): dataset A's patient 75 is not dataset B's patient 75.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from xlip.data.images import image_problem, image_size
from xlip.data.manifest import COLUMNS, ManifestError, read_rows, row_kind, unusable
from xlip.data.storage import image_exists, read_shard_member, split_shard_path
from xlip.errors import InputError
from xlip.text.labels import UnknownLabelError, canonical_label
from xlip.text.sections import select_text

__all__ = ["Issue", "Report", "exit_code", "validate"]

LABEL_COLUMNS = ("labels", "negative_labels")
TRAIN = "split 'train'"  # the partition that must not share patients or images


@dataclass(frozen=True)
class Issue:
    """One finding of a check; ``rows`` are (manifest, 1-based data row), () for a whole file."""

    check: str
    message: str
    fix: str
    rows: tuple[tuple[str, int], ...] = ()
    manifest: str = ""  # for whole-file issues

    @property
    def where(self) -> str:
        """``a.csv rows 3, 7; b.csv row 2``."""
        if not self.rows:
            return self.manifest
        by_file: dict[str, list[int]] = defaultdict(list)
        for m, r in self.rows:
            by_file[m].append(r)
        parts = []
        for m, rs in by_file.items():
            shown = ", ".join(map(str, rs[:8])) + (f", ... ({len(rs)} rows)" if len(rs) > 8 else "")
            parts.append(f"{m} row{'s' if len(rs) > 1 else ''} {shown}")
        return "; ".join(parts)

    def line(self) -> str:
        return f"{self.where}: {self.message}" + (f". Fix: {self.fix}" if self.fix else "")


@dataclass
class Report:
    """What :func:`validate` found. ``ok`` when there are no problems (warnings allowed)."""

    manifests: list[str]
    eval_manifests: list[str]
    rows: dict[str, int] = field(default_factory=dict)  # manifest → data rows
    images_checked: bool = True
    images: int = 0  # distinct image files referenced
    problems: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    # {"width": [min, median, max], "height": [...]} over the images that decode
    image_sizes: dict[str, list[float]] = field(default_factory=dict)
    unknown_labels: dict[str, int] = field(default_factory=dict)  # name → rows
    kinds: dict[str, int] = field(default_factory=dict)  # paired / image_only / text_only rows

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, Counter]:
        """Issues per check: ``{"problems": Counter, "warnings": Counter}``."""
        return {"problems": Counter(i.check for i in self.problems),
                "warnings": Counter(i.check for i in self.warnings)}

    def to_dict(self) -> dict:
        def issues(items: list[Issue]) -> list[dict]:
            return [{**asdict(i), "rows": [list(r) for r in i.rows], "where": i.where}
                    for i in items]
        return {"ok": self.ok, "manifests": self.manifests, "eval_manifests": self.eval_manifests,
                "rows": self.rows, "images_checked": self.images_checked, "images": self.images,
                "kinds": self.kinds, "image_sizes": self.image_sizes,
                "unknown_labels": self.unknown_labels,
                "counts": {k: dict(v) for k, v in self.counts().items()},
                "problems": issues(self.problems), "warnings": issues(self.warnings)}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        return path

    def describe(self, examples: int = 5, full_list: str | Path | None = None) -> str:
        """A plain-text report: counts per check, the first ``examples`` issues of each check,
        where the full list is (``full_list``: the JSON written by :meth:`write_json`)."""
        n_rows = sum(self.rows.values())
        images = (f"{self.images} images decoded" if self.images_checked
                  else f"{self.images} images not opened (--no-images: existence only)")
        lines = [f"validated {len(self.manifests)} manifest(s)"
                 + (f" and {len(self.eval_manifests)} --eval manifest(s)"
                    if self.eval_manifests else "") + f": {n_rows} rows, {images}"]
        lines += [f"  {m}: {n} rows" + (" (--eval)" if m in self.eval_manifests else "")
                  for m, n in self.rows.items()]
        if self.kinds:
            lines.append("rows by kind: " + ", ".join(
                f"{self.kinds.get(k, 0)} {k.replace('_', '-')}"
                for k in ("paired", "image_only", "text_only")))
        if self.image_sizes:
            w, h = self.image_sizes["width"], self.image_sizes["height"]
            lines.append(f"image size min / median / max: width {w[0]:g} / {w[1]:g} / {w[2]:g},"
                         f" height {h[0]:g} / {h[1]:g} / {h[2]:g} px")
        if self.unknown_labels:
            lines.append("unknown label names (rows): " + ", ".join(
                f"{k} ({n})" for k, n in sorted(self.unknown_labels.items(),
                                                key=lambda kv: (-kv[1], kv[0]))))
        for title, items in (("problems", self.problems), ("warnings", self.warnings)):
            lines.append(f"{title}: {len(items)}" if items else f"{title}: none")
            by_check: dict[str, list[Issue]] = defaultdict(list)
            for i in items:
                by_check[i.check].append(i)
            for check, found in by_check.items():
                fixes = {i.fix for i in found}
                if len(found) > 1 and len(fixes) == 1:  # one fix: said once, not per row
                    lines.append(f"  {check}: {len(found)}; fix: {fixes.pop()}")
                    lines += [f"    - {i.where}: {i.message}" for i in found[:examples]]
                else:
                    lines.append(f"  {check}: {len(found)}")
                    lines += [f"    - {i.line()}" for i in found[:examples]]
                if len(found) > examples:
                    lines.append(f"    ... and {len(found) - examples} more")
        if self.problems or self.warnings:
            lines.append(f"full list: {full_list}" if full_list
                         else "full list: rerun with --report FILE.json")
        lines.append("result: " + ("OK" if self.ok else
                                   f"{len(self.problems)} problem(s): fix them before training"))
        return "\n".join(lines)


def exit_code(report: Report, warn_only: bool = False) -> int:
    """The exit status of ``xlip data validate``: 1 when there are problems, unless warn_only."""
    return 0 if report.ok or warn_only else 1


@dataclass(frozen=True)
class _Row:
    manifest: str  # as given on the command line
    row: int  # 1-based data row
    image: str  # as written in the manifest ("" when none)
    path: str  # absolute image path ("" when none)
    part: str  # "split 'name'" (training manifests; blank = train) or "--eval" (every eval row)
    patient: str
    source: str

    @property
    def at(self) -> tuple[str, int]:
        return self.manifest, self.row


@dataclass
class _Checker:
    text_policy: str
    min_side: int
    report: Report
    rows: list[_Row] = field(default_factory=list)
    unknown: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)

    def problem(self, check: str, message: str, fix: str, rows=(), manifest: str = "") -> None:
        self.report.problems.append(Issue(check, message, fix, tuple(sorted(rows)), manifest))

    def warning(self, check: str, message: str, fix: str, rows=(), manifest: str = "") -> None:
        self.report.warnings.append(Issue(check, message, fix, tuple(sorted(rows)), manifest))

    def read(self, manifest: str | Path, is_eval: bool) -> None:
        """Row checks of one manifest; its rows are kept for the cross-row checks."""
        name = str(manifest)
        try:
            raw = read_rows(Path(manifest))
        except (ManifestError, OSError, UnicodeDecodeError) as err:
            self.problem("manifest", str(err), "give a readable CSV or JSONL manifest",
                         manifest=name)
            return
        self.report.rows[name] = len(raw)
        if raw and "image" not in raw[0] and "text" not in raw[0]:
            self.problem("manifest", "neither an 'image' (or 'image_path') nor a 'text' column",
                         f"name the columns {', '.join(COLUMNS)}", manifest=name)
            return
        no_patient = 0
        base = Path(manifest).parent
        for i, r in enumerate(raw, start=1):
            image, text = r.get("image", "").strip(), r.get("text", "").strip()
            at = [(name, i)]
            labelled = self.labels(r, at)
            reason = unusable(image, text, labelled)
            if reason:
                fix = ("fill in the image path or the report, or delete the row" if not image
                       else "add labels or the report, or delete the row")
                self.problem("unusable row", reason, fix, at)
            else:
                self.kinds[row_kind(image, text)] += 1
            if text and not select_text(text, self.text_policy).strip():
                self.problem("empty text", f"report is empty after section selection "
                             f"(text_policy={self.text_policy}): no findings or impression",
                             "give the row its findings / impression, clear the text (an image "
                             "row with labels is then image-only), or delete the row", at)
            patient = r.get("patient_id", "").strip()
            no_patient += not patient
            split = r.get("split", "").strip() or "train"
            self.rows.append(_Row(name, i, image, str((base / image).resolve()) if image else "",
                                  "--eval" if is_eval else f"split {split!r}", patient,
                                  r.get("source", "").strip()))
        if no_patient:
            what = ("no patient_id column" if raw and "patient_id" not in raw[0]
                    else f"{no_patient} of {len(raw)} rows have no patient_id")
            self.warning("no patient_id", f"{what}: patient overlap between splits and with "
                         "--eval sets cannot be checked for them",
                         "fill in patient_id (the dataset's patient identifier)", manifest=name)

    def labels(self, r: dict[str, str], at: list[tuple[str, int]]) -> bool:
        """Unknown label names of the row → problems; whether it has any label."""
        names = [(col, part.strip()) for col in LABEL_COLUMNS
                 for part in r.get(col, "").split(";") if part.strip()]
        for col, name in names:
            try:
                canonical_label(name)
            except UnknownLabelError as err:
                self.unknown[name] += 1
                message, _, fix = str(err).partition(". Fix: ")
                self.problem("unknown label", f"{message} (column {col})",
                             fix or "write a canonical name", at)
        return bool(names)

    def images(self, check_images: bool, workers: int) -> None:
        paths = sorted({r.path for r in self.rows if r.path})
        self.report.images, self.report.images_checked = len(paths), check_images
        inspect = _inspect if check_images else _exists
        with ThreadPoolExecutor(max(1, workers)) as pool:
            info = dict(zip(paths, pool.map(inspect, paths)))
        by_path: dict[str, list[_Row]] = defaultdict(list)
        for r in self.rows:
            if r.path:
                by_path[r.path].append(r)
        for r in self.rows:
            reason = info[r.path][0] if r.path else ""
            if reason:
                fix = ("correct the path (relative to the manifest) or delete the row"
                       if reason == "missing image file" else "replace the file or delete the row")
                self.problem("image", f"{r.image}: {reason}", fix, [r.at])
        sizes = {p: s for p, (_, s, _) in info.items() if s}
        if sizes:
            ws, hs = [w for w, _ in sizes.values()], [h for _, h in sizes.values()]
            self.report.image_sizes = {"width": [min(ws), statistics.median(ws), max(ws)],
                                       "height": [min(hs), statistics.median(hs), max(hs)]}
        for p, (w, h) in sizes.items():
            if min(w, h) < self.min_side:
                self.warning("small image", f"{by_path[p][0].image} is {w}x{h} px (shorter side "
                             f"below {self.min_side})", "use a larger export of the image if "
                             "there is one; training upsamples it", [r.at for r in by_path[p]])
        for p, rows in by_path.items():
            if len(rows) > 1:
                self.duplicate("duplicate path", f"{rows[0].image} is listed in {len(rows)} rows",
                               rows)
        by_digest: dict[str, list[str]] = defaultdict(list)
        for p, (_, _, digest) in info.items():
            if digest:
                by_digest[digest].append(p)
        for same in by_digest.values():
            if len(same) > 1:
                rows = [r for p in same for r in by_path[p]]
                self.duplicate("duplicate content", f"{len(same)} files with identical bytes: "
                               + ", ".join(by_path[p][0].image for p in same[:4])
                               + (" ..." if len(same) > 4 else ""), rows)

    def duplicate(self, check: str, message: str, rows: list[_Row]) -> None:
        parts = sorted({r.part for r in rows})
        if _leak(parts):
            self.problem(check, f"{message}, in {' and '.join(parts)} (a leak)",
                         "keep the image in one split only: delete the other rows",
                         [r.at for r in rows])
        else:
            self.warning(check, message, "delete the extra rows unless the repetition is "
                         "intended (it weights the image more)", [r.at for r in rows])

    def patients(self) -> None:
        by_patient: dict[str, list[_Row]] = defaultdict(list)
        for r in self.rows:
            if r.patient:
                by_patient[r.patient].append(r)
        for patient, rows in by_patient.items():
            sources = sorted({r.source for r in rows if r.source}) or [""]
            for source in sources:  # rows without a source match every source
                group = [r for r in rows if r.source in ("", source)]
                parts = sorted({r.part for r in group})
                if not _leak(parts):
                    continue
                fix = ("split by patient, not by image: move this patient's rows into one split"
                       if "--eval" not in parts else "delete this patient's rows from the "
                       "training manifest (or from the --eval set)")
                self.problem("patient overlap", f"patient {patient!r} is in "
                             f"{' and '.join(parts)}" + (f" (source {source})" if source else ""),
                             fix, [r.at for r in group])
                break


def _leak(parts: list[str]) -> bool:
    """Training rows together with held-out rows (another split, or an --eval set)."""
    return TRAIN in parts and len(parts) > 1


def _inspect(path: str) -> tuple[str, tuple[int, int] | None, str]:
    """(problem, (width, height), content digest) of one image; decodes it once."""
    problem = image_problem(path)
    if problem:
        return problem, None, ""
    if split_shard_path(path):  # a member of a tar shard (xlip data shard)
        data = read_shard_member(path)
        with Image.open(io.BytesIO(data)) as im:
            return "", im.size, hashlib.sha1(data).hexdigest()
    return "", image_size(path), hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _exists(path: str) -> tuple[str, None, str]:
    return ("" if image_exists(path) else "missing image file"), None, ""


def validate(manifests: Sequence[str | Path], eval_manifests: Sequence[str | Path] = (), *,
             check_images: bool = True, workers: int = 0, min_side: int = 224,
             text_policy: str = "findings_impression") -> Report:
    """Check training manifests (and evaluation sets they must not leak into).

    Args:
        manifests: training manifests (CSV or JSONL); their splits are checked against each other.
        eval_manifests: evaluation sets; every row counts as evaluation, whatever its split.
        check_images: decode every image, read its size and hash its bytes (False: only check
            that the file exists; sizes and identical-content duplicates are then not checked).
        workers: image checks in parallel threads (0: one per CPU, at most 8).
        min_side: images whose shorter side is below this many pixels are warned about.
        text_policy: the section selection training uses (``data.text_policy``).

    Returns:
        The report; nothing is raised for bad data (bad arguments raise InputError).
    """
    if not manifests:
        raise InputError("validate needs at least one training manifest")
    select_text("", text_policy)  # raises ValueError naming the valid policies
    report = Report([str(m) for m in manifests], [str(m) for m in eval_manifests])
    checker = _Checker(text_policy, min_side, report)
    for m in manifests:
        checker.read(m, is_eval=False)
    for m in eval_manifests:
        checker.read(m, is_eval=True)
    checker.images(check_images, workers or min(8, os.cpu_count() or 1))
    checker.patients()
    report.unknown_labels, report.kinds = dict(checker.unknown), dict(checker.kinds)
    return report
