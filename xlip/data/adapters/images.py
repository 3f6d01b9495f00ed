"""Labelled image datasets: CheXpert, NIH ChestX-ray14, RSNA Pneumonia, SIIM-ACR Pneumothorax
(DICOMs + train-rle.csv; the PNG release is in :mod:`.binary`), VinDr-CXR, the COVID-19 image
data collection, and a generic folder + CSV."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from xlip.data.adapters.common import (
    AdapterError, Collector, ImageIndex, find_file, label_error_reason, map_labels,
    normalise_split, normalise_view, parse_views, patient_split, read_csv, require_columns,
    train_or_valid, view_reason,
)
from xlip.data.adapters.labels import (
    CHEXPERT_COLUMNS, COVID_FINDINGS, RSNA_POSITIVE, VINDR_FINDINGS, chexpert_labels,
)
from xlip.data.manifest import unusable
from xlip.text.labels import UnknownLabelError


def dicom_header(path: Path) -> dict[str, str]:
    """PatientID / ViewPosition / PatientSex / PatientAge of a DICOM, without its pixels
    ({} for other files or an unreadable header: the image check then rejects the row)."""
    if path.suffix.lower() not in (".dcm", ".dicom"):
        return {}
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - a broken file is rejected by the image check
        return {}
    return {k: str(getattr(ds, k, "") or "") for k in
            ("PatientID", "ViewPosition", "PatientSex", "PatientAge")}


# ---------------------------------------------------------------------------------------------
# CheXpert


def prepare_chexpert(raw: Path, opt, col: Collector) -> None:
    """CheXpert ``train.csv`` / ``valid.csv`` (``Path`` column relative to the folder above
    ``CheXpert-v1.0[-small]``); 1 / 0 / -1 / blank through the uncertainty policy."""
    found = [(name, find_file(raw, [f"{name}.csv", f"{name}.csv.gz"], "", required=False))
             for name in ("train", "valid", "test")]
    found = [(n, p) for n, p in found if p is not None]
    if not found:
        raise AdapterError(f"CheXpert: no train.csv / valid.csv under {raw}")
    allowed = parse_views(opt.views)
    index = ImageIndex(raw)
    for split, path in found:
        for i, r in read_csv(path):
            if i == 1:
                require_columns(path, r, ("Path",) + CHEXPERT_COLUMNS)
            col.rows_in += 1
            ref = r["Path"]
            parts = Path(ref).parts
            view = ("LATERAL" if r.get("Frontal/Lateral", "").lower() == "lateral" else
                    normalise_view(r.get("AP/PA", "")) or normalise_view(r.get("Frontal/Lateral",
                                                                               "")))
            reason = view_reason(view, allowed)
            if reason:
                col.reject(path, i, reason, id=ref, image=ref)
                continue
            try:
                pos, neg, unc = chexpert_labels(r, opt.uncertain)
            except ValueError as err:
                col.reject(path, i, f"bad label value: {err}", id=ref, image=ref)
                continue
            image = _find(index, raw, ref)
            if image is None:
                col.reject(path, i, "missing image file", id=ref, image=ref)
                continue
            if not (pos or neg):
                col.reject(path, i, "no labels (every finding blank or uncertain)", id=ref,
                           image=ref)
                continue
            patient = next((p for p in parts if p.startswith("patient")), "")
            study = "/".join(parts[-3:-1])
            col.keep(image, "", pos, negative=neg, uncertain=unc, split=split,
                     patient_id=patient, study_id=study, view=view, sex=r.get("Sex", ""),
                     age=r.get("Age", ""), origin=f"{path.name} row {i}", id=ref)


def _find(index: ImageIndex, raw: Path, ref: str) -> Path | None:
    """A dataset path such as ``CheXpert-v1.0-small/train/patient1/study1/view1.jpg``, tried
    under RAW_DIR as it is and without its leading folders."""
    parts = Path(ref).parts
    for k in range(len(parts)):
        p = raw.joinpath(*parts[k:])
        if p.is_file():
            return p
    return index.find(ref)


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def prepare_nih(raw: Path, opt, col: Collector) -> None:
    """NIH ``Data_Entry_2017[_v2020].csv`` + image folders (``images_001/images/...``) +
    ``train_val_list.txt`` / ``test_list.txt`` when present: the official test split, and a
    patient-level ``valid`` share of train_val; else a patient-level split."""
    entry = find_file(raw, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz",
                            "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz"], "NIH Data_Entry CSV")
    official: dict[str, str] = {}
    for split, names in (("train", ("train_val_list.txt", "train_val_list_NIH.txt")),
                         ("test", ("test_list.txt", "test_list_NIH.txt"))):
        path = find_file(raw, list(names), "", required=False)
        if path is not None:
            official.update({n.strip(): split for n in path.read_text().split() if n.strip()})
    if not official:
        col.notes.append("no train_val_list.txt / test_list.txt: patient-level split from "
                         "--split-fractions")
    allowed = parse_views(opt.views)
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for i, r in read_csv(entry):
        if i == 1:
            require_columns(entry, r, ("Image Index", "Finding Labels", "Patient ID"))
        col.rows_in += 1
        name = r["Image Index"]
        view = normalise_view(r.get("View Position", ""))
        reason = view_reason(view, allowed)
        if not reason:
            try:
                pos, outside = map_labels(r["Finding Labels"].split("|"),
                                          where=f"{entry.name} row {i}")
            except UnknownLabelError as err:
                reason = label_error_reason(err)
        image = None if reason else index.find(name)
        if not reason and image is None:
            reason = "missing image file"
        if reason:
            col.reject(entry, i, reason, id=name, image=name)
            continue
        pid = r["Patient ID"]
        split = official.get(name) or patient_split(pid, fractions, opt.seed)
        if official.get(name) == "train":  # validation patients drawn from train_val
            split = train_or_valid(pid, fractions, opt.seed)
        col.keep(image, "", pos, raw=r["Finding Labels"].split("|"), split=split,
                 patient_id=pid, study_id=Path(name).stem, view=view,
                 sex=r.get("Patient Gender", ""), age=r.get("Patient Age", ""),
                 origin=f"{entry.name} row {i}")


# ---------------------------------------------------------------------------------------------
# RSNA Pneumonia Detection and SIIM-ACR Pneumothorax (one label, boxes / masks per image)


def prepare_rsna(raw: Path, opt, col: Collector) -> None:
    """RSNA ``stage_2_train_labels.csv`` (one row per box; ``Target`` 1 = pneumonia opacity) +
    ``stage_2_detailed_class_info.csv`` when present + ``stage_2_train_images/*.dcm``."""
    labels_csv = find_file(raw, ["stage_2_train_labels.csv", "stage_2_train_labels.csv.zip",
                                 "stage_1_train_labels.csv"], "RSNA train labels")
    info_csv = find_file(raw, ["stage_2_detailed_class_info.csv",
                               "stage_1_detailed_class_info.csv"], "", required=False)
    detail = {r["patientId"]: r.get("class", "") for _, r in read_csv(info_csv)} if info_csv \
        else {}
    if not detail:
        col.notes.append("no stage_2_detailed_class_info.csv: negatives are 'no pneumonia' only")
    images: dict[str, tuple[int, bool]] = {}  # id -> (first row, any positive)
    for i, r in read_csv(labels_csv):
        if i == 1:
            require_columns(labels_csv, r, ("patientId", "Target"))
        pid = r["patientId"]
        if r["Target"] not in ("0", "1"):
            col.rows_in += 1
            col.reject(labels_csv, i, f"bad Target value {r['Target']!r} (expected 0 or 1)",
                       id=pid)
            continue
        first, pos = images.get(pid, (i, False))
        images[pid] = (first, pos or r["Target"] == "1")
    col.notes.append(f"box rows merged into {len(images)} images")

    def labels(pid: str, positive: bool) -> tuple[list[str], list[str], list[str]]:
        if positive:
            return list(RSNA_POSITIVE), [], ["Lung Opacity"]
        kind = detail.get(pid, "")
        if kind == "Normal":
            return ["No Finding"], list(RSNA_POSITIVE), [kind]
        return [], list(RSNA_POSITIVE), [kind] if kind else []

    _single_label_images(raw, opt, col, labels_csv, images, labels)


def prepare_siim(raw: Path, opt, col: Collector) -> None:
    """SIIM-ACR ``train-rle.csv`` (``ImageId``, ``EncodedPixels``; -1 = no pneumothorax, one row
    per mask) + the DICOMs (``dicom-images-train/**/<ImageId>.dcm``) or PNG conversions."""
    names = ["train-rle.csv", "train-rle.csv.gz", "stage_2_train.csv",
             "siim-pneumothorax-train-rle.csv.gz"]
    rle = find_file(raw, names, "SIIM train-rle CSV", required=False)
    if rle is None:
        png = find_file(raw, ["stage_1_train_images.csv", "stage_1_test_images.csv"], "",
                        required=False)
        raise AdapterError(f"SIIM train-rle CSV: none of {', '.join(names)} found under {raw}. "
                           + (f"{png.name} is the Kaggle PNG release: use the "
                              "siim-pneumothorax-png adapter" if png else
                              "Pass the folder the dataset was downloaded or extracted to."))
    images: dict[str, tuple[int, bool]] = {}
    for i, r in read_csv(rle):
        if i == 1:
            require_columns(rle, r, ("ImageId", "EncodedPixels"))
        first, pos = images.get(r["ImageId"], (i, False))
        images[r["ImageId"]] = (first, pos or r["EncodedPixels"].strip() not in ("-1", ""))
    col.notes.append(f"mask rows merged into {len(images)} images")

    def labels(_: str, positive: bool) -> tuple[list[str], list[str], list[str]]:
        return (["Pneumothorax"], [], []) if positive else ([], ["Pneumothorax"], [])

    _single_label_images(raw, opt, col, rle, images, labels)


def _single_label_images(raw: Path, opt, col: Collector, src: Path,
                         images: dict[str, tuple[int, bool]], labels) -> None:
    allowed = parse_views(opt.views)
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for image_id, (row, positive) in images.items():
        col.rows_in += 1
        path = index.find(image_id + ".dcm")
        if path is None:
            col.reject(src, row, "missing image file", id=image_id, image=image_id + ".dcm")
            continue
        head = dicom_header(path)
        view = normalise_view(head.get("ViewPosition", ""))
        if path.suffix.lower() in (".dcm", ".dicom") or view:
            reason = view_reason(view, allowed)
            if reason:
                col.reject(src, row, reason, id=image_id, image=path)
                continue
        pos, neg, raw_names = labels(image_id, positive)
        pid = head.get("PatientID") or image_id
        col.keep(path, "", pos, negative=neg, raw=raw_names, split=patient_split(
            pid, fractions, opt.seed), patient_id=pid, study_id=image_id, view=view,
            sex=head.get("PatientSex", ""), age=head.get("PatientAge", ""),
            origin=f"{src.name} row {row}")


# ---------------------------------------------------------------------------------------------
# VinDr-CXR


def prepare_vindr(raw: Path, opt, col: Collector) -> None:
    """VinDr-CXR: PhysioNet ``image_labels_train.csv`` / ``image_labels_test.csv`` (one row per
    radiologist, 0/1 columns) or the Kaggle VinBigData ``train.csv`` (one row per box); a finding
    is present when ``--rad-vote`` radiologists agree (majority by default; the test set's single
    consensus row always counts)."""
    files = [(s, find_file(raw, [f"image_labels_{s}.csv"], "", required=False))
             for s in ("train", "test")]
    files = [(s, p) for s, p in files if p is not None]
    kaggle = None
    if not files:
        kaggle = find_file(raw, ["train.csv", "vinbigdata-train.csv.gz", "train.csv.gz"],
                           "VinDr-CXR labels (image_labels_train.csv or Kaggle train.csv)")
        files = [("", kaggle)]
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for split, path in files:
        votes: dict[str, Counter] = {}
        raters: dict[str, set[str]] = {}
        first: dict[str, int] = {}
        bad: set[str] = set()
        for i, r in read_csv(path):
            if i == 1:
                require_columns(path, r, ("image_id",) + (("class_name",) if kaggle else ()))
            iid = r["image_id"]
            first.setdefault(iid, i)
            raters.setdefault(iid, set()).add(r.get("rad_id", "") or f"row{i}")
            names = ([r["class_name"]] if kaggle else
                     [k for k, v in r.items() if k not in ("image_id", "rad_id") and v == "1"])
            try:
                map_labels(names, VINDR_FINDINGS, where=f"{path.name} row {i}")
            except UnknownLabelError as err:
                if iid not in bad:
                    col.rows_in += 1
                    col.reject(path, i, label_error_reason(err), id=iid)
                bad.add(iid)
                continue
            votes.setdefault(iid, Counter()).update(set(names))
        for iid, counter in votes.items():
            if iid in bad:
                continue
            col.rows_in += 1
            need = 1 if opt.rad_vote == "any" else len(raters[iid]) // 2 + 1
            names = sorted(n for n, k in counter.items() if k >= need)
            pos, outside = map_labels(names, VINDR_FINDINGS)
            col.outside.update(outside)
            if "No Finding" in pos and len(pos) > 1:
                pos.remove("No Finding")
            image = index.find(iid + ".dicom") or index.find(iid + ".dcm")
            if image is None:
                col.reject(path, first[iid], "missing image file", id=iid, image=iid + ".dicom")
                continue
            if not pos:
                col.reject(path, first[iid], "no finding reached the --rad-vote agreement "
                           "within the vocabulary", id=iid, image=image)
                continue
            col.keep(image, "", pos, raw=names,
                     split=split or patient_split(iid, fractions, opt.seed),
                     patient_id=iid, study_id=iid,
                     origin=f"{path.name} row {first[iid]}")
    col.notes.append("VinDr-CXR has no patient ids or views: each image is its own patient; "
                     "view left blank")


# ---------------------------------------------------------------------------------------------
# COVID-19 image data collection (ieee8023)


def prepare_covid(raw: Path, opt, col: Collector) -> None:
    """ieee8023 ``metadata.csv`` + ``images/``: X-rays only, ``clinical_notes`` as the text."""
    meta = find_file(raw, ["metadata.csv"], "COVID collection metadata.csv")
    allowed = parse_views(opt.views)
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for i, r in read_csv(meta):
        if i == 1:
            require_columns(meta, r, ("patientid", "finding", "view", "modality", "filename"))
        col.rows_in += 1
        name = r["filename"]
        if r["modality"].lower() not in ("x-ray", "xray", "cr", "dx"):
            col.reject(meta, i, f"not a radiograph (modality {r['modality']})", id=name)
            continue
        view = normalise_view(r["view"])
        reason = view_reason(view, allowed)
        if reason:
            col.reject(meta, i, reason, id=name, image=name)
            continue
        names = [p for part in r["finding"].split("/") for p in part.split(",")]
        try:
            pos, outside = map_labels(names, COVID_FINDINGS, where=f"{meta.name} row {i}")
        except UnknownLabelError as err:
            col.reject(meta, i, label_error_reason(err), id=name, image=name)
            continue
        if "No Finding" in pos and len(pos) > 1:
            pos.remove("No Finding")
        col.outside.update(o for o in outside if o.lower() != "todo")
        text = r.get("clinical_notes", "")
        if not text.strip() and not pos:
            col.reject(meta, i, "no report text and no labels", id=name, image=name)
            continue
        image = index.find(f"{r.get('folder', 'images')}/{name}")
        if image is None:
            col.reject(meta, i, "missing image file", id=name, image=name)
            continue
        pid = r["patientid"]
        col.keep(image, text, pos, raw=[n.strip() for n in names if n.strip()],
                 split=patient_split(pid, fractions, opt.seed), patient_id=pid,
                 study_id=f"{pid}/{r.get('offset', '')}", view=view, sex=r.get("sex", ""),
                 age=r.get("age", ""), origin=f"{meta.name} row {i}")
    if index.stem_matches:
        col.notes.append(f"{index.stem_matches} images found under another extension (same stem)")


# ---------------------------------------------------------------------------------------------
# Generic: a folder of images + a CSV


GENERIC_FIELDS = ("image", "text", "labels", "split", "patient_id", "study_id", "view")


def parse_mapping(spec: str) -> dict[str, str]:
    """``image=Path,labels=Finding Labels`` → {'image': 'Path', 'labels': 'Finding Labels'}."""
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, column = part.partition("=")
        if not sep or key.strip() not in GENERIC_FIELDS:
            raise AdapterError(f"--map {part!r}: write FIELD=COLUMN with FIELD one of "
                               f"{', '.join(GENERIC_FIELDS)}")
        out[key.strip()] = column.strip()
    return out


def prepare_generic(raw: Path, opt, col: Collector) -> None:
    """Any folder of images + a CSV: ``--csv`` names the CSV (relative to RAW_DIR or absolute),
    ``--map FIELD=COLUMN,...`` its columns (default: the manifest column names), ``--label-sep``
    the separator of the labels column."""
    if not opt.csv:
        raise AdapterError("generic: pass --csv FILE (and --map FIELD=COLUMN,... unless the CSV "
                           f"uses the column names {', '.join(GENERIC_FIELDS)})")
    path = Path(opt.csv) if Path(opt.csv).is_absolute() else raw / opt.csv
    if not path.is_file():
        raise AdapterError(f"generic: --csv {path} does not exist")
    mapping = {f: f for f in GENERIC_FIELDS} | parse_mapping(opt.map or "")
    allowed = parse_views(opt.views) if opt.views != "frontal" or "view" in (opt.map or "") \
        else None
    index = ImageIndex(raw)
    fractions = opt.fractions()
    for i, r in read_csv(path):
        if i == 1:
            present = [f for f in ("image", "text") if mapping[f] in r]
            if not present:
                raise AdapterError(f"{path}: neither the image column {mapping['image']!r} nor "
                                   f"the text column {mapping['text']!r} exists; columns: "
                                   f"{sorted(r)}. Pass --map image=COLUMN,text=COLUMN,...")
        col.rows_in += 1
        get = {f: r.get(mapping[f], "") for f in GENERIC_FIELDS}
        try:
            pos, outside = map_labels(get["labels"].split(opt.label_sep),
                                      where=f"{path.name} row {i}")
        except UnknownLabelError as err:
            col.reject(path, i, label_error_reason(err), id=get["image"], image=get["image"])
            continue
        view = normalise_view(get["view"])
        if allowed is not None and (reason := view_reason(view, allowed)):
            col.reject(path, i, reason, id=get["image"], image=get["image"])
            continue
        image = None
        if get["image"]:
            image = index.find(get["image"])
            if image is None:
                col.reject(path, i, "missing image file", id=get["image"], image=get["image"])
                continue
        if reason := unusable(str(image or ""), get["text"], pos):
            col.reject(path, i, reason, id=get["image"] or str(i), image=get["image"])
            continue
        pid = get["patient_id"]
        split = normalise_split(get["split"]) if get["split"] else (
            patient_split(pid, fractions, opt.seed) if pid else "train")
        col.keep(image, get["text"], pos, split=split, patient_id=pid,
                 study_id=get["study_id"], view=view, origin=f"{path.name} row {i}")
