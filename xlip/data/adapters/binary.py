"""One-finding image datasets in the layouts that BenchX's lists name: the SIIM-ACR Pneumothorax
PNG release, COVIDx CXR-3/4 and TBX11K (Kaggle "tbx11k-simplified").

Each image is positive for its dataset's finding (``labels``) or negative (the finding in
``negative_labels``; plus No Finding where the dataset says the image is normal), as the
``rsna-pneumonia`` adapter does. ``study_id`` is the id BenchX's lists use for the image, so that
:func:`xlip.eval.benchmarks.select_rows` can find it. None of the three has view information:
every image is kept and ``view`` is left blank.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from xlip.data.adapters.common import (
    AdapterError, Collector, ImageIndex, find_file, normalise_split, patient_split, read_csv,
    require_columns, train_or_valid,
)
from xlip.files import not_utf8

NO_VIEWS = "no view information: every image kept, view left blank"


def binary_labels(finding: str, positive: bool, normal: bool = False
                  ) -> tuple[list[str], list[str]]:
    """(labels, negative_labels) of an image of a one-finding dataset: a positive has the finding;
    a negative has it in negative_labels, and No Finding when the dataset calls it normal."""
    if positive:
        return [finding], []
    return (["No Finding"] if normal else []), [finding]


# ---------------------------------------------------------------------------------------------
# SIIM-ACR Pneumothorax, PNG release


#: ``<n>_<part>_<label>_`` : the release's part (train / test) and 1 = pneumothorax, 0 = none.
SIIM_PNG_NAME = re.compile(r"^\d+_(train|test)_([01])_$")


def prepare_siim_png(raw: Path, opt, col: Collector) -> None:
    """SIIM-ACR Pneumothorax as the Kaggle PNG release ("pneumothorax chest x-ray images and
    masks", folder ``siim-acr-pneumothorax``): ``stage_1_train_images.csv`` /
    ``stage_1_test_images.csv`` (``new_filename`` such as ``1898_train_0_.png``, ``has_pneumo``
    1 / 0) + ``png_images/``.

    The file name holds the release's part and the label too (``_1_``: pneumothorax); a row whose
    ``has_pneumo`` disagrees with its name is rejected. The test part is the test split; a
    ``--split-fractions`` valid share of the train part is drawn (BenchX draws its val list from
    the train part as well). The PNGs carry no patient ids: each image is its own patient.
    ``study_id`` is the file stem, the id of BenchX's SIIM lists.
    """
    files = [find_file(raw, [f"stage_1_{part}_images.csv"], "", required=False)
             for part in ("train", "test")]
    files = [p for p in files if p is not None]
    if not files:
        raise AdapterError(f"SIIM PNG release: neither stage_1_train_images.csv nor "
                           f"stage_1_test_images.csv found under {raw}. Pass the folder the "
                           "Kaggle dataset was extracted to (siim-acr-pneumothorax/, holding "
                           "png_images/ and the two CSVs)")
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for path in files:
        for i, r in read_csv(path):
            if i == 1:
                require_columns(path, r, ("new_filename", "has_pneumo"))
            col.rows_in += 1
            name, value = r["new_filename"], r["has_pneumo"]
            stem = Path(name).stem
            match = SIIM_PNG_NAME.match(stem)
            reason = ("" if match else
                      "file name not of the release's form <n>_<train|test>_<0|1>_.png")
            if not reason and value not in ("0", "1"):
                reason = f"bad has_pneumo value {value!r} (expected 0 or 1)"
            if not reason and value != match.group(2):
                reason = f"has_pneumo {value} disagrees with the file name's _{match.group(2)}_"
            image = None if reason else index.find(f"png_images/{name}")
            if not reason and image is None:
                reason = "missing image file"
            if reason:
                col.reject(path, i, reason, id=stem, image=name)
                continue
            part = match.group(1)
            pos, neg = binary_labels("Pneumothorax", value == "1")
            col.keep(image, "", pos, negative=neg, raw=[f"has_pneumo {value}"],
                     split="test" if part == "test" else train_or_valid(stem, fractions,
                                                                         opt.seed),
                     patient_id=stem, study_id=stem, origin=f"{path.name} row {i}")
    col.notes += ["the PNG release has no patient ids: each image is its own patient", NO_VIEWS]


# ---------------------------------------------------------------------------------------------
# COVIDx CXR-3 / CXR-4


COVIDX_FIELDS = "patient id, file name, class, source"
COVIDX_CLASSES = {"positive": True, "negative": False}


def read_fields(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line, space-separated fields) of every non-blank line of a text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise AdapterError(not_utf8(path, err)) from None
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield i, line.split()


def prepare_covidx(raw: Path, opt, col: Collector) -> None:
    """COVIDx CXR-3 / CXR-4 (Kaggle andyczhao/covidx-cxr2): ``train.txt`` / ``val.txt`` /
    ``test.txt``, one image a line without a header: patient id, file name, class (``positive``
    / ``negative`` for COVID-19), source; the images under ``train/`` ``val/`` ``test/``.

    The split is the file's. ``study_id`` is ``<split folder>/<file name up to its first dot>``,
    the form BenchX's COVIDx lists name images by (BenchX saved every image under that name +
    ``.png``, so DICOM-derived names such as ``DX.1.2.840….png`` can share one id; the benchmark
    counts such an id as ambiguous).
    """
    files = [(s, find_file(raw, [f"{s}.txt"], "", required=False)) for s in ("train", "val",
                                                                            "test")]
    files = [(s, p) for s, p in files if p is not None]
    if not files:
        raise AdapterError(f"COVIDx: none of train.txt, val.txt, test.txt found under {raw}. "
                           "Pass the folder COVIDx CXR-3/4 was extracted to (the .txt files "
                           "beside train/ val/ test/)")
    index = ImageIndex(raw)
    for split, path in files:
        for n, (i, fields) in enumerate(read_fields(path)):
            if n == 0 and len(fields) != 4:
                raise AdapterError(f"{path} line {i}: {len(fields)} field(s), but a COVIDx label "
                                   f"file has 4 space-separated fields ({COVIDX_FIELDS}). Is "
                                   "this the right file?")
            col.rows_in += 1
            if len(fields) != 4:
                col.reject(path, i, f"{len(fields)} fields, expected 4 ({COVIDX_FIELDS})",
                           id=fields[0])
                continue
            pid, name, label, _ = fields
            key = f"{split}/{name.split('.')[0]}"
            reason = "" if label.lower() in COVIDX_CLASSES else (
                f"unknown class {label!r} (expected positive or negative)")
            image = None if reason else index.find(f"{split}/{name}")
            if not reason and image is None:
                reason = "missing image file"
            if reason:
                col.reject(path, i, reason, id=key, image=name)
                continue
            pos, neg = binary_labels("COVID-19", COVIDX_CLASSES[label.lower()])
            col.keep(image, "", pos, negative=neg, raw=[label], split=normalise_split(split),
                     patient_id=pid, study_id=key, origin=f"{path.name} row {i}")
    shared = [k for k, n in Counter(r["study_id"] for r in col.rows).items() if n > 1]
    if shared:
        col.notes.append(f"{len(shared)} study id(s) (file name up to the first dot, as BenchX "
                         f"names images) shared by several images, e.g. {shared[0]}: "
                         "`xlip eval benchmark` leaves them out as ambiguous")
    col.notes.append(NO_VIEWS)


# ---------------------------------------------------------------------------------------------
# TBX11K


TBX_TARGETS = {"tb": True, "no_tb": False}


def prepare_tbx11k(raw: Path, opt, col: Collector) -> None:
    """TBX11K as the Kaggle "tbx11k-simplified" release: ``data.csv`` (one row per TB box, one row
    for an image without: ``fname``, ``target`` tb / no_tb, ``image_type`` healthy /
    sick_but_no_tb / tb, ``source`` train / val) + ``images/<fname>``.

    Box rows are merged per image; rows of one image that disagree on ``target`` reject it.
    target tb → Tuberculosis; no_tb → Tuberculosis negative, and No Finding for a ``healthy``
    image. Split: ``source`` (TBX11K's own train / val parts) where it names one, else drawn by
    image from ``--split-fractions``. No patient ids: each image is its own patient.
    ``study_id`` is the file stem (``tb0029``), the id of BenchX's TBX11K lists.
    """
    data = find_file(raw, ["data.csv"], "TBX11K data.csv")
    images: dict[str, tuple[int, dict[str, str], set[str]]] = {}  # fname -> first row, targets
    for i, r in read_csv(data):
        if i == 1:
            require_columns(data, r, ("fname", "target"))
        first, row, targets = images.get(r["fname"], (i, r, set()))
        images[r["fname"]] = (first, row, targets | {r["target"]})
    col.notes.append(f"box rows merged into {len(images)} images")
    index = ImageIndex(raw)
    fractions = opt.fractions()
    drawn = 0
    for name, (i, r, targets) in images.items():
        col.rows_in += 1
        stem = Path(name).stem
        reason = ""
        if len(targets) > 1:
            reason = f"{data.name} rows disagree on target ({', '.join(sorted(targets))})"
        elif (target := next(iter(targets))) not in TBX_TARGETS:
            reason = f"unknown target value {target!r} (expected tb or no_tb)"
        image = None if reason else index.find(f"images/{name}")
        if not reason and image is None:
            reason = "missing image file"
        if reason:
            col.reject(data, i, reason, id=stem, image=name)
            continue
        kind = r.get("image_type", "")
        pos, neg = binary_labels("Tuberculosis", TBX_TARGETS[target], kind == "healthy")
        split = normalise_split(r.get("source", ""))
        if split not in ("train", "valid", "test"):
            split, drawn = patient_split(stem, fractions, opt.seed), drawn + 1
        col.keep(image, "", pos, negative=neg, raw=[kind or target], split=split,
                 patient_id=stem, study_id=stem, origin=f"{data.name} row {i}")
    if drawn:
        col.notes.append(f"{drawn} images without a train / val source: split drawn from "
                         "--split-fractions")
    col.notes += ["TBX11K has no patient ids: each image is its own patient", NO_VIEWS]
