"""Report datasets: MIMIC-CXR (images + free-text reports + CheXpert labels) and IU X-ray
(Open-i XML reports or the community CSV form)."""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from xlip.data.adapters.common import (
    AdapterError, Collector, ImageIndex, find_file, map_labels, normalise_split, normalise_view,
    parse_views, patient_split, read_csv, require_columns, view_reason,
)
from xlip.data.adapters.labels import CHEXPERT_COLUMNS, chexpert_labels
from xlip.errors import InputError
from xlip.text.labels import UnknownLabelError, canonical_label
from xlip.text.sections import select_text


def has_report_text(text: str, policy: str = "findings_impression") -> bool:
    """Words in the sections that pre-training reads (``data.text_policy``)."""
    return bool(re.search(r"\w", select_text(text, policy)))


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR


def prepare_mimic(raw: Path, opt, col: Collector) -> None:
    """MIMIC-CXR-JPG: ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` images, the split / metadata /
    CheXpert CSVs, and the MIMIC-CXR reports ``files/pXX/pSUBJECT/sSTUDY.txt`` (under RAW_DIR or
    ``--reports``). One row per image; the official split is kept."""
    split_csv = find_file(raw, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"],
                          "MIMIC-CXR split file")
    meta_csv = find_file(raw, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"],
                         "MIMIC-CXR metadata file")
    chex_csv = find_file(raw, ["mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"],
                         "MIMIC-CXR CheXpert labels", required=False)
    if chex_csv is None:
        col.notes.append("no mimic-cxr-2.0.0-chexpert.csv(.gz): rows carry reports, no labels")
    reports_root = Path(opt.reports) if opt.reports else raw
    allowed = parse_views(opt.views)
    views = {}
    for _, r in read_csv(meta_csv):
        views[r.get("dicom_id", "")] = r.get("ViewPosition", "")
    labels: dict[str, tuple[list[str], list[str], list[str]]] = {}
    if chex_csv is not None:
        for i, r in read_csv(chex_csv):
            require_columns(chex_csv, r, ("subject_id", "study_id") + CHEXPERT_COLUMNS)
            try:
                labels[r["study_id"]] = chexpert_labels(r, opt.uncertain)
            except InputError as err:
                raise AdapterError(f"{chex_csv} row {i}: {err}; fix the value or remove the "
                                   "row") from None
    reports: dict[str, str | None] = {}
    index = ImageIndex(raw)
    for i, r in read_csv(split_csv):
        if i == 1:
            require_columns(split_csv, r, ("dicom_id", "study_id", "subject_id", "split"))
        col.rows_in += 1
        dicom, study, subject = r["dicom_id"], r["study_id"], r["subject_id"]
        where = dict(id=dicom)
        view = normalise_view(views.get(dicom, ""))
        reason = view_reason(view, allowed)
        if reason:
            col.reject(split_csv, i, reason, **where)
            continue
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        image = raw / rel / f"{dicom}.jpg"
        if not image.is_file():
            image = index.find(f"{rel}/{dicom}.jpg")
        if image is None:
            col.reject(split_csv, i, "missing image file", image=rel / f"{dicom}.jpg", **where)
            continue
        if study not in reports:
            reports[study] = _read_report(reports_root, rel.with_suffix(".txt"))
        text = reports[study]
        if text is None:
            col.reject(split_csv, i, f"missing report file ({rel.with_suffix('.txt')})", **where)
            continue
        if not has_report_text(text, opt.text_policy):
            col.reject(split_csv, i, f"empty report section ({opt.text_policy})", **where)
            continue
        pos, neg, unc = labels.get(study, ([], [], []))
        col.keep(image, text, pos, negative=neg, uncertain=unc,
                 split=normalise_split(r["split"]), patient_id=subject, study_id=study,
                 view=view, origin=f"{split_csv.name} row {i}")


def _read_report(root: Path, rel: Path) -> str | None:
    for base in (root, root / "mimic-cxr-reports"):
        p = base / rel
        if p.is_file():
            return p.read_text(errors="replace")
    return None


# ---------------------------------------------------------------------------------------------
# IU X-ray (Open-i)

# IU's MeSH problem list indexes anatomy and descriptors as well as findings ("Lung", "Aorta",
# "Markings"): a term that maps to no canonical finding is kept in labels_raw and counted in the
# summary, not an error. "No Indexing" leaves a report unlabelled.
IU_UNLABELLED = ("no indexing",)


def prepare_iu(raw: Path, opt, col: Collector) -> None:
    """IU X-ray: the Open-i XML reports (``ecgen-radiology/*.xml``, or the ``.tgz`` as
    downloaded) or ``indiana_reports.csv`` + ``indiana_projections.csv``; images from
    ``NLMCXR_png`` / ``images`` anywhere under RAW_DIR. One row per image, or per report with
    ``--reports-only`` (text-only rows)."""
    projections = _iu_projections(raw)
    xml_src = find_file(raw, ["ecgen-radiology.tgz", "ecgen-radiology-train.tgz",
                              "NLMCXR_reports.tgz"], "IU XML", required=False)
    if xml_src is None:  # the archive extracted
        xml_src = next((p for p in sorted(raw.rglob("ecgen-radiology")) if p.is_dir()), None)
    if xml_src is not None:
        reports = list(_iu_xml(xml_src))
    else:
        csv_path = find_file(raw, ["indiana_reports.csv"], "IU reports (XML or indiana_reports.csv)")
        reports = list(_iu_csv(csv_path))
    if not projections and not opt.reports_only:
        col.notes.append("no indiana_projections.csv: image views unknown, kept only if --views "
                         "includes 'unknown'")
    allowed = parse_views(opt.views)
    index = None if opt.reports_only else ImageIndex(raw)
    if index is not None and len(index) == 0:
        col.notes.append(f"no image files under {raw}: for reports without images pass "
                         "--reports-only (text-only rows)")
    fractions = opt.fractions()
    for src_name, i, uid, sections, problems, images in reports:
        col.rows_in += 1
        text = "\n".join(f"{name}: {body}" for name, body in sections.items() if body)
        if not has_report_text(text, opt.text_policy):
            col.reject(src_name, i, f"empty report section ({opt.text_policy})", id=uid)
            continue
        if opt.labels == "ner":
            from xlip.text.ner import label_sets
            pos, neg, unc = (sorted(s) for s in label_sets(select_text(text)))
            raw_terms: list[str] = []
        else:
            pos, raw_terms, neg, unc = _iu_mesh(problems, col), list(problems), [], []
        split = patient_split(uid, fractions, opt.seed)
        if opt.reports_only:
            col.keep(None, text, pos, negative=neg, uncertain=unc, raw=raw_terms, split=split,
                     patient_id=uid, study_id=uid, origin=f"{src_name} row {i}")
            continue
        if not images:
            col.reject(src_name, i, "no image listed for the report", id=uid)
            continue
        for name in images:
            view = normalise_view(projections.get(_iu_image_key(name), ""))
            reason = view_reason(view, allowed)
            path = index.find(name) if not reason else None
            if not reason and path is None:
                reason = "missing image file"
            if reason:
                col.reject(src_name, i, reason, id=uid, image=name)
                continue
            col.keep(path, text, pos, negative=neg, uncertain=unc, raw=raw_terms, split=split,
                     patient_id=uid, study_id=uid, view=view, origin=f"{src_name} row {i}")


def _iu_mesh(problems: list[str], col: Collector) -> list[str]:
    found = set()
    for term in problems:
        if term.lower() in IU_UNLABELLED:
            continue
        try:
            found.add(canonical_label(term))
        except UnknownLabelError:
            col.outside[term] += 1
    pos, _ = map_labels(found)
    return pos


def _iu_image_key(name: str) -> str:
    """'CXR12_IM-0152-1001' / '12_IM-0152-1001.dcm.png' → 'IM-0152-1001'."""
    m = re.search(r"IM-\d+-\d+", name)
    return m.group(0) if m else name


def _iu_projections(raw: Path) -> dict[str, str]:
    path = find_file(raw, ["indiana_projections.csv"], "IU projections", required=False)
    if path is None:
        return {}
    return {_iu_image_key(r.get("filename", "")): r.get("projection", "")
            for _, r in read_csv(path)}


IUReport = tuple[str, int, str, dict[str, str], list[str], list[str]]


def _iu_xml(src: Path) -> Iterator[IUReport]:
    """(file, row, uid, sections, MeSH problems, image names) of each report; an XML file's
    row is 1."""
    if src.is_dir():
        items = ((p.name, p.read_bytes()) for p in sorted(src.glob("*.xml")))
        yield from _iu_xml_items(items)
        return
    with tarfile.open(src) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".xml")),
                         key=lambda m: m.name)
        yield from _iu_xml_items((m.name, tar.extractfile(m).read()) for m in members)


def _iu_xml_items(items) -> Iterator[IUReport]:
    for name, data in items:
        try:
            root = ET.fromstring(data)
        except ET.ParseError as err:
            raise AdapterError(f"IU XML {name}: not valid XML ({err})") from None
        uid_el = root.find("uId")
        uid = uid_el.get("id", "") if uid_el is not None else Path(name).stem
        sections = {el.get("Label", "").upper(): (el.text or "").strip()
                    for el in root.iter("AbstractText")}
        sections = {k: sections.get(k, "") for k in
                    ("INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION")}
        problems = [(el.text or "").split("/")[0].strip() for el in root.iter("major")]
        images = [el.get("id", "") + ".png" for el in root.iter("parentImage")]
        yield Path(name).name, 1, uid, sections, [p for p in problems if p], images


def _iu_csv(path: Path) -> Iterator[IUReport]:
    projections = find_file(path.parent, ["indiana_projections.csv"], "", required=False)
    images: dict[str, list[str]] = {}
    if projections is not None:
        for _, r in read_csv(projections):
            images.setdefault(r.get("uid", ""), []).append(r.get("filename", ""))
    for i, r in read_csv(path):
        if i == 1:
            require_columns(path, r, ("uid", "findings", "impression"))
        sections = {"INDICATION": r.get("indication", ""), "COMPARISON": r.get("comparison", ""),
                    "FINDINGS": r["findings"], "IMPRESSION": r["impression"]}
        problems = [p.strip() for p in r.get("Problems", "").split(";") if p.strip()]
        yield path.name, i, r["uid"], sections, problems, images.get(r["uid"], [])
