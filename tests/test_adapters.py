"""Dataset adapters (``xlip data prepare``) on fixtures in each dataset's real format.

The label files are trimmed copies of the real ones in ``../shared/data`` (written to a temp dir by
the tests, never committed), with tiny stand-in images at the paths the datasets use; MIMIC-CXR,
which cannot be shared, is written from its published layout. Each test also plants malformed rows
and checks they land in ``rejects.csv`` with the right reason.
"""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA as SHARED

from xlip.cli import main
from xlip.data.adapters import AdapterError, PrepareOptions, prepare
from xlip.data.adapters.common import map_labels, normalise_view, parse_fractions, patient_split
from xlip.data.adapters.labels import chexpert_labels
from xlip.data.manifest import load_manifest
from xlip.text.labels import UnknownLabelError

FORMATS = SHARED / "formats"
needs_shared = pytest.mark.skipif(
    not FORMATS.is_dir(), reason=f"needs the real label files in {FORMATS} (../shared/data, or "
                                 "set XLIP_SHARED_DATA)")


# ---------------------------------------------------------------------------------------------
# helpers


def image(path: Path, value: int = 100, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(size * size).reshape(size, size) * 7 + value) % 256
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path


def corrupt_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return path


def dicom(path: Path, **tags) -> Path:
    import pydicom

    ds = pydicom.dcmread(str(FORMATS / "dicom" / "siim_sample.dcm"))
    for k, v in tags.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path))
    return path


def head_lines(src: Path, n: int) -> list[str]:
    """The header and the first n data lines of a (gzipped / zipped) real CSV."""
    if src.suffix == ".zip":
        with zipfile.ZipFile(src) as z:
            text = z.read(z.namelist()[0]).decode()
    else:
        with gzip.open(src, "rt") if src.suffix == ".gz" else src.open() as f:
            text = f.read()
    return text.splitlines()[: n + 1]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def reasons(out: Path) -> dict[str, str]:
    """id → reason of every reject."""
    return {r["id"]: r["reason"] for r in rows(out / "rejects.csv")}


def run(dataset: str, raw: Path, out: Path, **opts):
    summary = prepare(dataset, raw, out, PrepareOptions(**opts))
    manifest = rows(out / "manifest.csv")
    # the adapter's output is a valid manifest: loading it rejects nothing
    records = load_manifest(out / "manifest.csv", verify_images=True) if manifest else []
    assert len(records) == len(manifest)
    return summary, manifest


def assert_idempotent(dataset: str, raw: Path, out: Path, **opts) -> None:
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare(dataset, raw, out, PrepareOptions(**opts))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before == after


# ---------------------------------------------------------------------------------------------
# shared pieces


def test_chexpert_values_and_uncertainty_policies():
    row = {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pneumothorax": "0.0", "Fracture": ""}
    assert chexpert_labels(row) == (["Cardiomegaly"], ["Pneumothorax"], ["Edema"])
    assert chexpert_labels(row, "positive") == (["Cardiomegaly", "Edema"], ["Pneumothorax"], [])
    assert chexpert_labels(row, "negative") == (["Cardiomegaly"], ["Edema", "Pneumothorax"], [])
    with pytest.raises(ValueError, match="'2'"):
        chexpert_labels({"Edema": "2"})


def test_label_tables_map_and_unknown_names_raise():
    assert map_labels(["Effusion", "Pleural_Thickening", "No Finding"]) == (
        ["No Finding", "Pleural Effusion", "Pleural Thickening"], [])
    assert map_labels(["Calcification", "Nodule/Mass"],
                      {"Nodule/Mass": ("Lung Lesion",), "Calcification": ()}) == (
        ["Lung Lesion"], ["Calcification"])
    with pytest.raises(UnknownLabelError, match="Pneumonitis.*x.csv row 3"):
        map_labels(["Pneumonitis"], where="x.csv row 3")


def test_views_and_patient_splits():
    assert [normalise_view(v) for v in ("PA", "AP Supine", "L", "LL", "?", "")] == [
        "PA", "AP", "LATERAL", "LATERAL", "", ""]
    fractions = parse_fractions("valid=0.1,test=0.2")
    assert fractions == pytest.approx({"valid": 0.1, "test": 0.2, "train": 0.7})
    splits = [patient_split(str(i), fractions) for i in range(4000)]
    assert splits.count("test") / 4000 == pytest.approx(0.2, abs=0.03)
    assert splits == [patient_split(str(i), fractions) for i in range(4000)]  # deterministic
    with pytest.raises(AdapterError, match="sum"):
        parse_fractions("valid=0.6,test=0.6")


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR (fixture from the published layout)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Clips project over the left lung,
 potentially within the breast. The imaged upper abdomen is unremarkable.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_WET_READ = """ WET READ: ___ ___ ___ 7:45 PM
  Small right pleural effusion, new since ___.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  Dyspnea.

 FINDINGS:  Small right pleural effusion.  Heart size is mildly enlarged.

 IMPRESSION:  Small right pleural effusion.  Mild cardiomegaly.
"""

MIMIC_NO_SECTIONS = """                                 FINAL REPORT
 INDICATION:  ___ year old man with chest pain.

 COMPARISON:  ___.
"""


def _gz_csv(path: Path, header: list[str], data: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(data)
    path.write_bytes(gzip.compress(buf.getvalue().encode()))


def mimic_fixture(raw: Path) -> None:
    # (subject, study, dicom, split, view, report)
    images = [
        ("10000032", "50414267", "02aa804e-bde0afdd", "train", "PA", MIMIC_REPORT),
        ("10000032", "50414267", "174413ec-4ec4c1f7", "train", "LATERAL", None),
        ("10000764", "57375967", "096052b7-d256dc40", "validate", "AP", MIMIC_WET_READ),
        ("10000898", "50771383", "1a7a1d5e-5d4bdb3f", "test", "PA", MIMIC_NO_SECTIONS),
        ("10000935", "51178377", "fcb2a1ee-3a1e3a2c", "train", "PA", "missing"),
        ("10001176", "53186264", "7e0e8c4a-3b6e0f53", "train", "AP", "no image"),
    ]
    _gz_csv(raw / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
            [[d, st, su, sp] for su, st, d, sp, _, _ in images])
    _gz_csv(raw / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
             "ViewPosition", "Rows", "Columns"],
            [[d, su, st, "CHEST (PA AND LAT)", v, "40", "40"] for su, st, d, _, v, _ in images])
    header = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
              "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
              "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
              "Support Devices"]
    labels = {"50414267": {"No Finding": "1.0"},
              "57375967": {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "Edema": "0.0"}}
    _gz_csv(raw / "mimic-cxr-2.0.0-chexpert.csv.gz", header,
            [[su, st] + [labels.get(st, {}).get(h, "") for h in header[2:]]
             for su, st, *_ in images])
    for su, st, d, _, _, report in images:
        folder = raw / "files" / f"p{su[:2]}" / f"p{su}"
        if report != "no image":
            image(folder / f"s{st}" / f"{d}.jpg")
        if report not in (None, "missing", "no image"):
            (folder / f"s{st}.txt").write_text(report)
    no_image = raw / "files" / "p10" / "p10001176"
    no_image.mkdir(parents=True)
    (no_image / "s53186264.txt").write_text(MIMIC_REPORT)


def test_mimic_cxr(tmp_path):
    raw, out = tmp_path / "mimic", tmp_path / "out"
    mimic_fixture(raw)
    summary, manifest = run("mimic-cxr", raw, out)
    assert [r["study_id"] for r in manifest] == ["50414267", "57375967"]
    first, second = manifest
    assert first["split"] == "train" and second["split"] == "valid"  # official split kept
    assert first["patient_id"] == "10000032" and first["view"] == "PA"
    assert first["labels"] == "No Finding" and "nipple shadows" in first["text"]
    assert second["labels"] == "Pleural Effusion" and second["negative_labels"] == "Edema"
    assert second["uncertain_labels"] == "Cardiomegaly"
    assert "WET READ" in second["text"]  # the whole report is kept; sections chosen at load
    why = reasons(out)
    assert why["174413ec-4ec4c1f7"] == "lateral view filtered"
    assert why["1a7a1d5e-5d4bdb3f"].startswith("empty report section")
    assert why["fcb2a1ee-3a1e3a2c"].startswith("missing report file")
    assert why["7e0e8c4a-3b6e0f53"] == "missing image file"
    assert summary.rows_in == 6 and summary.kept == 2
    assert dict(summary.rejected) == {"lateral view filtered": 1, "empty report section": 1,
                                      "missing report file": 1, "missing image file": 1}
    assert_idempotent("mimic-cxr", raw, out)
    # the sections training will read decide what an empty report is
    first_report = raw / "files" / "p10" / "p10000032" / "s50414267.txt"
    first_report.write_text(MIMIC_REPORT.split(" IMPRESSION:")[0])
    _, manifest = run("mimic-cxr", raw, tmp_path / "imp", text_policy="impression")
    assert [r["study_id"] for r in manifest] == ["57375967"]
    assert reasons(tmp_path / "imp")["02aa804e-bde0afdd"] == "empty report section (impression)"
    # U-Ones; laterals kept on request
    _, manifest = run("mimic-cxr", raw, tmp_path / "u1", uncertain="positive", views="all")
    assert len(manifest) == 3
    assert manifest[-1]["labels"] == "Cardiomegaly;Pleural Effusion"


def test_mimic_sections_of_the_kept_text():
    from xlip.text.sections import select_text

    assert select_text(MIMIC_WET_READ, "impression") == (
        "Small right pleural effusion. Mild cardiomegaly.")
    text = select_text(MIMIC_REPORT)
    assert text.startswith("There is no focal consolidation") and "___" not in text
    assert "ascites" not in text  # the indication is not pre-training text


# ---------------------------------------------------------------------------------------------
# CheXpert


@needs_shared
def test_chexpert(tmp_path):
    raw, out = tmp_path / "chexpert", tmp_path / "out"
    lines = head_lines(FORMATS / "chexpert_train.csv.gz", 8)
    lines.append(lines[1].replace("patient00001", "patient99999").replace(",1.0,", ",2.0,", 1))
    root = raw / "CheXpert-v1.0-small"
    root.mkdir(parents=True)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        ref = line.split(",")[0]
        if "patient00003" not in ref:  # patient00003's image is missing
            image(raw / ref)
    corrupt_png(raw / "CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg")
    summary, manifest = run("chexpert", raw, out)
    by_patient = {r["patient_id"]: r for r in manifest}
    assert sorted(by_patient) == ["patient00001", "patient00002", "patient00004"]
    assert by_patient["patient00001"]["labels"] == "No Finding;Support Devices"
    assert by_patient["patient00001"]["negative_labels"] == "Pneumothorax"
    assert by_patient["patient00004"]["view"] == "PA" and by_patient["patient00004"]["age"] == "20"
    two = [r for r in manifest if r["patient_id"] == "patient00002"]
    assert {r["study_id"] for r in two} == {"patient00002/study1", "patient00002/study2"}
    study2 = next(r for r in two if r["study_id"].endswith("study2"))
    assert study2["labels"] == "Lung Opacity;Fracture"
    assert study2["uncertain_labels"] == "Cardiomegaly;Edema;Consolidation;Atelectasis;" \
                                         "Pleural Effusion"
    why = {r["id"].split("/", 1)[-1]: r["reason"] for r in rows(out / "rejects.csv")}
    assert why["train/patient00002/study1/view2_lateral.jpg"] == "lateral view filtered"
    assert why["train/patient00003/study1/view1_frontal.jpg"] == "missing image file"
    assert why["train/patient00005/study1/view1_frontal.jpg"].startswith("unreadable image")
    assert "'2.0' is not 1, 0, -1" in why["train/patient99999/study1/view1_frontal.jpg"]
    assert summary.splits == {"train": 4}
    assert_idempotent("chexpert", raw, out)


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14


@needs_shared
def test_nih_cxr14(tmp_path):
    raw, out = tmp_path / "nih", tmp_path / "out"
    src = SHARED / "nih_cxr14_starter" / "source" / "Data_Entry_2017_v2020.csv.gz"
    lines = head_lines(src, 6)
    lines.append(lines[1].replace("00000001_000.png,Cardiomegaly", "00000099_000.png,Pneumonitis"))
    raw.mkdir()
    (raw / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        name = line.split(",")[0]
        if name != "00000002_000.png":
            image(raw / "images_001" / "images" / name)
    (raw / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n"
                                            "00000003_001.png\n")
    (raw / "test_list.txt").write_text("00000001_002.png\n00000003_000.png\n")
    summary, manifest = run("nih-cxr14", raw, out)
    by_name = {Path(r["image"]).name: r for r in manifest}
    assert by_name["00000001_002.png"]["labels"] == "Cardiomegaly;Pleural Effusion"
    assert by_name["00000001_002.png"]["split"] == "test"
    assert by_name["00000001_002.png"]["labels_raw"] == "Cardiomegaly;Effusion"
    assert by_name["00000001_000.png"]["split"] in ("train", "valid")
    # the official test list is kept; valid patients are drawn from train_val only
    for share, want in (("valid=0", "train"), ("valid=1", "valid")):
        _, carved = run("nih-cxr14", raw, tmp_path / share, split_fractions=share)
        splits = {Path(r["image"]).name: r["split"] for r in carved}
        assert splits["00000001_002.png"] == "test"
        assert splits["00000001_000.png"] == splits["00000003_001.png"] == want
    assert by_name["00000001_000.png"]["patient_id"] == "1"
    why = reasons(out)
    assert why["00000002_000.png"] == "missing image file"
    assert why["00000099_000.png"].startswith("unknown label: 'Pneumonitis'")
    assert summary.rows_in == 7 and summary.kept == 5
    assert_idempotent("nih-cxr14", raw, out)


# ---------------------------------------------------------------------------------------------
# RSNA Pneumonia and SIIM-ACR Pneumothorax (DICOM images)


@needs_shared
def test_rsna_pneumonia(tmp_path):
    raw, out = tmp_path / "rsna", tmp_path / "out"
    lines = head_lines(FORMATS / "kaggle_stage_2_train_labels.csv.zip", 30000)
    pos = [ln for ln in lines if ln.endswith(",1")][:3]  # two boxes of one image + one more
    neg = [ln for ln in lines[1:] if ln.endswith(",0")][:3]
    bad = neg[2].split(",")[0] + ",,,,,yes"
    raw.mkdir()
    (raw / "stage_2_train_labels.csv").write_text("\n".join([lines[0]] + pos + neg + [bad]) +
                                                  "\n")
    ids = list(dict.fromkeys(ln.split(",")[0] for ln in pos + neg))
    assert len(ids) == 5
    (raw / "stage_2_detailed_class_info.csv").write_text(
        "patientId,class\n" + "".join(f"{i},{c}\n" for i, c in zip(
            ids, ["Lung Opacity", "Lung Opacity", "Normal", "No Lung Opacity / Not Normal",
                  "Normal"])))
    for k, i in enumerate(ids[:-1]):
        dicom(raw / "stage_2_train_images" / f"{i}.dcm", PatientID=i,
              ViewPosition="AP" if k != 3 else "LL")
    summary, manifest = run("rsna-pneumonia", raw, out)
    by_id = {r["study_id"]: r for r in manifest}
    assert by_id[ids[0]]["labels"] == "Pneumonia" and by_id[ids[0]]["view"] == "AP"
    assert by_id[ids[2]]["labels"] == "No Finding"
    assert by_id[ids[2]]["negative_labels"] == "Pneumonia"
    why = reasons(out)
    assert why[ids[3]] == "lateral view filtered"
    assert why[ids[4]] == "missing image file"
    assert why[ids[4]] != why.get("")  # the bad Target row is its own reject
    assert any(r["reason"].startswith("bad Target value 'yes'") for r in rows(out / "rejects.csv"))
    assert summary.kept == 3
    assert_idempotent("rsna-pneumonia", raw, out)


@needs_shared
def test_siim_pneumothorax_and_a_truncated_dicom(tmp_path):
    raw, out = tmp_path / "siim", tmp_path / "out"
    lines = head_lines(FORMATS / "siim-pneumothorax-train-rle.csv.gz", 5)
    raw.mkdir()
    (raw / "train-rle.csv").write_text("\n".join(lines) + "\n")
    ids = [ln.split(",")[0] for ln in lines[1:]]
    for k, i in enumerate(ids[:4]):
        p = dicom(raw / "dicom-images-train" / f"1.2.{k}" / f"1.3.{k}" / f"{i}.dcm",
                  PatientID=f"patient-{k % 2}", ViewPosition="PA")
        if k == 3:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    summary, manifest = run("siim-pneumothorax", raw, out)
    by_id = {r["study_id"]: r for r in manifest}
    assert by_id[ids[0]]["labels"] == "" and by_id[ids[0]]["negative_labels"] == "Pneumothorax"
    assert by_id[ids[1]]["labels"] == "Pneumothorax" and by_id[ids[1]]["patient_id"] == "patient-1"
    # both images of patient-0 in one split
    assert by_id[ids[0]]["split"] == by_id[ids[2]]["split"]
    why = reasons(out)
    assert why[ids[4]] == "missing image file"
    assert "unreadable" in why[ids[3]] or "DICOM" in why[ids[3]]
    assert summary.kept == 3
    # a negative-only row is a valid manifest row (evaluation uses it as a negative)
    rec = load_manifest(out / "manifest.csv")
    assert {r.negatives for r in rec} == {("Pneumothorax",), ()}


# ---------------------------------------------------------------------------------------------
# VinDr-CXR


@needs_shared
def test_vindr_cxr_votes(tmp_path):
    raw, out = tmp_path / "vindr", tmp_path / "out"
    lines = head_lines(FORMATS / "vinbigdata-train.csv.gz", 70000)
    header, body = lines[0], lines[1:]
    nodule_id = next(ln.split(",")[0] for ln in body if ",Nodule/Mass," in ln)
    normal_id = next(ln.split(",")[0] for ln in body if ",No finding," in ln)
    keep = [ln for ln in body if ln.split(",")[0] in (nodule_id, normal_id)]
    keep.append("ffffffffffffffffffffffffffffffff,Pneumonitis,99,R1,,,,")
    raw.mkdir()
    (raw / "train.csv").write_text("\n".join([header] + keep) + "\n")
    image(raw / "train" / f"{nodule_id}.png")
    image(raw / "train" / f"{normal_id}.png")
    summary, manifest = run("vindr-cxr", raw, out, rad_vote="any")
    by_id = {r["study_id"]: r for r in manifest}
    assert by_id[normal_id]["labels"] == "No Finding"
    assert "Lung Lesion" in by_id[nodule_id]["labels"].split(";")
    assert reasons(out)["ffffffffffffffffffffffffffffffff"].startswith(
        "unknown label: 'Pneumonitis'")
    # majority: only findings that more than half of the image's radiologists marked
    _, majority = run("vindr-cxr", raw, tmp_path / "maj")
    ann = [ln.split(",") for ln in keep if ln.startswith(nodule_id)]
    raters = {a[3] for a in ann}
    marked = {c for c in {a[1] for a in ann}
              if 2 * len({a[3] for a in ann if a[1] == c}) > len(raters)}
    got = {r["study_id"]: r["labels_raw"] for r in majority}.get(nodule_id, "")
    assert set(filter(None, got.split(";"))) == marked


def test_vindr_cxr_physionet_form(tmp_path):
    """PhysioNet's image_labels_{train,test}.csv: one row per radiologist, 0/1 columns."""
    raw = tmp_path / "vindr"
    (raw / "annotations").mkdir(parents=True)
    cols = ["Aortic enlargement", "Calcification", "Nodule/Mass", "Pleural effusion", "COPD",
            "No finding"]

    def write(name, rows):
        with (raw / "annotations" / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "rad_id"] + cols)
            w.writerows(rows)

    write("image_labels_train.csv", [
        ["a1", "R1", 1, 1, 0, 0, 0, 0], ["a1", "R2", 1, 0, 0, 1, 0, 0],
        ["a1", "R3", 0, 1, 0, 0, 0, 0],  # aortic 2/3, calcification 2/3, effusion 1/3
        ["b2", "R1", 0, 0, 0, 0, 0, 1], ["b2", "R2", 0, 0, 0, 0, 0, 1],
        ["b2", "R3", 0, 0, 0, 0, 0, 1],
        ["c3", "R1", 0, 1, 0, 0, 0, 0], ["c3", "R2", 0, 1, 0, 0, 0, 0],
        ["c3", "R3", 0, 0, 0, 0, 0, 1]])  # only an outside-vocabulary finding agreed
    write("image_labels_test.csv", [["d4", "R8", 0, 0, 1, 0, 1, 0]])
    for name, folder in (("a1", "train"), ("b2", "train"), ("c3", "train"), ("d4", "test")):
        image(raw / folder / f"{name}.png")  # DICOMs converted to PNG keep their stem
    summary, manifest = run("vindr-cxr", raw, tmp_path / "out")
    by_id = {r["study_id"]: r for r in manifest}
    assert by_id["a1"]["labels"] == "Enlarged Cardiomediastinum"
    assert by_id["a1"]["labels_raw"] == "Aortic enlargement;Calcification"
    assert by_id["b2"]["labels"] == "No Finding"
    assert by_id["d4"]["labels"] == "Lung Lesion;Emphysema" and by_id["d4"]["split"] == "test"
    assert by_id["a1"]["split"] == "train"
    assert reasons(tmp_path / "out")["c3"].startswith("no finding reached the --rad-vote")
    assert summary.outside["Calcification"] == 2


# ---------------------------------------------------------------------------------------------
# COVID-19 image data collection


@needs_shared
def test_covid_collection(tmp_path):
    raw, out = tmp_path / "covid", tmp_path / "out"
    src = SHARED / "covid_cxr" / "source" / "metadata.csv"
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        meta = list(reader)
        fields = reader.fieldnames
    pick = [meta[0], meta[1]]
    pick.append(next(r for r in meta if r["modality"] == "CT"))
    pick.append(next(r for r in meta if r["view"] == "L"))
    pick.append(next(r for r in meta if r["finding"] == "No Finding"))
    pick.append(dict(meta[2], filename="unknown-finding.jpg", finding="Pneumonitis"))
    pick.append(dict(meta[3], filename="no-notes.jpg", finding="todo", clinical_notes=""))
    raw.mkdir()
    with (raw / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in fields if c])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k} for r in pick)
    image(raw / "images" / meta[0]["filename"])
    image(raw / "images" / (Path(meta[1]["filename"]).stem + ".png"))  # converted copy
    image(raw / "images" / pick[4]["filename"])
    image(raw / "images" / "no-notes.jpg")
    summary, manifest = run("covid-collection", raw, out)
    assert len(manifest) == 3
    first = manifest[0]
    assert first["labels"] == "Pneumonia;COVID-19" and first["text"].startswith("On January 22")
    assert manifest[1]["image"].endswith(".png")  # found by stem
    assert manifest[2]["labels"] == "No Finding"
    why = {r["image"] or r["id"]: r["reason"] for r in rows(out / "rejects.csv")}
    assert why[pick[2]["filename"]].startswith("not a radiograph")
    assert why[pick[3]["filename"]] == "lateral view filtered"
    assert why["unknown-finding.jpg"].startswith("unknown label: 'Pneumonitis'")
    assert why["no-notes.jpg"] == "no report text and no labels"
    assert summary.rows_in == 7
    assert_idempotent("covid-collection", raw, out)


# ---------------------------------------------------------------------------------------------
# IU X-ray: the original XML and the CSV form


def _iu_xml(uid: int, findings: str, impression: str, major: list[str], images: list[str]) -> str:
    mesh = "".join(f"<major>{m}</major>" for m in major)
    imgs = "".join(f'<parentImage id="{i}"><caption>PA and lateral</caption></parentImage>'
                   for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{uid}"/>'
            f'<MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="INDICATION">Cough XXXX.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f'</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH>{imgs}</eCitation>')


@needs_shared
def test_iu_xray_xml_and_csv(tmp_path):
    raw = tmp_path / "iu"
    raw.mkdir()
    # the real XML archive, trimmed to its first three reports, plus two planted ones
    with tarfile.open(SHARED / "iu_reports" / "source" / "ecgen-radiology-train.tgz") as src, \
            tarfile.open(raw / "ecgen-radiology.tgz", "w:gz") as dst:
        for name in ("ecgen-radiology/1.xml", "ecgen-radiology/10.xml"):
            m = src.getmember(name)
            dst.addfile(m, src.extractfile(m))
        for name, xml in (("ecgen-radiology/9001.xml", _iu_xml(9001, "", "", ["normal"], [])),
                          ("ecgen-radiology/9002.xml", _iu_xml(
                              9002, "Heart is enlarged.", "Cardiomegaly.",
                              ["Cardiomegaly/mild", "Aorta/tortuous"], ["CXR9002_IM-9-1001"]))):
            data = xml.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    proj = head_lines(SHARED / "iu_reports" / "source" / "indiana_projections.csv", 4)
    (raw / "indiana_projections.csv").write_text("\n".join(proj + [
        "9002,9002_IM-9-1001.dcm.png,Frontal"]) + "\n")
    image(raw / "NLMCXR_png" / "CXR1_1_IM-0001-3001.png")
    image(raw / "NLMCXR_png" / "CXR1_1_IM-0001-4001.png")
    image(raw / "NLMCXR_png" / "CXR9002_IM-9-1001.png")
    out = tmp_path / "out"
    summary, manifest = run("iu-xray", raw, out, views="all")
    by_image = {Path(r["image"]).name: r for r in manifest}
    assert set(by_image) == {"CXR1_1_IM-0001-3001.png", "CXR1_1_IM-0001-4001.png",
                             "CXR9002_IM-9-1001.png"}
    assert by_image["CXR1_1_IM-0001-4001.png"]["view"] == "FRONTAL"  # not said if PA or AP
    assert by_image["CXR1_1_IM-0001-3001.png"]["view"] == "LATERAL"
    assert by_image["CXR1_1_IM-0001-4001.png"]["labels"] == "No Finding"
    planted = by_image["CXR9002_IM-9-1001.png"]
    assert planted["labels"] == "Cardiomegaly" and planted["labels_raw"] == "Cardiomegaly;Aorta"
    assert planted["text"].startswith("INDICATION: Cough XXXX.\nFINDINGS: Heart is enlarged.")
    assert summary.outside["Aorta"] == 1
    why = reasons(out)
    assert why["CXR9001"].startswith("empty report section")
    assert set(why) == {"CXR9001", "CXR10"}  # CXR10's images are not in the fixture
    # frontal only (the default)
    _, frontal = run("iu-xray", raw, tmp_path / "frontal")
    assert {Path(r["image"]).name for r in frontal} == {"CXR1_1_IM-0001-4001.png",
                                                        "CXR9002_IM-9-1001.png"}
    # reports only: one text-only row per report, labels from the NER on request
    _, text_rows = run("iu-xray", raw, tmp_path / "text", reports_only=True, labels="ner")
    assert [r["patient_id"] for r in text_rows] == ["CXR1", "CXR10", "CXR9002"]
    assert all(r["image"] == "" for r in text_rows)
    assert text_rows[2]["labels"] == "Cardiomegaly"
    # the CSV form of the same reports
    csv_raw = tmp_path / "iu_csv"
    csv_raw.mkdir()
    rep = head_lines(SHARED / "iu_reports" / "source" / "indiana_reports.csv", 2)
    (csv_raw / "indiana_reports.csv").write_text("\n".join(rep) + "\n")
    (csv_raw / "indiana_projections.csv").write_text("\n".join(proj) + "\n")
    image(csv_raw / "images" / "images_normalized" / "1_IM-0001-4001.dcm.png")
    _, from_csv = run("iu-xray", csv_raw, tmp_path / "csv_out")
    assert len(from_csv) == 1 and from_csv[0]["labels"] == "No Finding"
    assert from_csv[0]["text"].startswith("INDICATION: Positive TB test")


# ---------------------------------------------------------------------------------------------
# The layouts BenchX's lists name: SIIM's PNG release, COVIDx CXR-3/4, TBX11K (Kaggle simplified)


def test_siim_png_release(tmp_path):
    """stage_1_{train,test}_images.csv + png_images/ (and png_masks/ with the same file names)."""
    raw, out = tmp_path / "pneumothorax" / "siim-acr-pneumothorax", tmp_path / "out"
    names = {"train": ["0_train_0_.png", "1_train_1_.png", "2_train_0_.png", "3_train_1_.png",
                       "4_train_0_.png", "5_train_0_.png"],
             "test": ["0_test_1_.png", "1_test_0_.png", "2_test_0_.png"]}
    values = {"train": ["0", "1", "1", "1", "x", "0"], "test": ["1", "0", "0"]}
    raw.mkdir(parents=True)
    for part in ("train", "test"):
        with (raw / f"stage_1_{part}_images.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["new_filename", "ImageId", "has_pneumo"])
            for k, (name, value) in enumerate(zip(names[part], values[part])):
                w.writerow([name, f"1.2.276.0.7230010.3.1.4.{part}.{k}", value])
                if (part, k) != ("train", 5):  # 5_train_0_: listed, image not downloaded
                    image(raw / "png_images" / name, value=k)
                    image(raw / "png_masks" / name, value=255)
    summary, manifest = run("siim-pneumothorax-png", raw.parent, out)
    by_id = {r["study_id"]: r for r in manifest}
    assert set(by_id) == {"0_train_0_", "1_train_1_", "3_train_1_", "0_test_1_", "1_test_0_",
                          "2_test_0_"}
    assert by_id["1_train_1_"]["labels"] == "Pneumothorax"
    assert by_id["1_train_1_"]["negative_labels"] == ""
    assert (by_id["0_train_0_"]["labels"], by_id["0_train_0_"]["negative_labels"]) == (
        "", "Pneumothorax")
    assert {by_id[i]["split"] for i in ("0_test_1_", "1_test_0_", "2_test_0_")} == {"test"}
    assert {r["split"] for r in manifest if "_train_" in r["study_id"]} <= {"train", "valid"}
    assert all(Path(r["image"]).parent.name == "png_images" for r in manifest)
    assert by_id["0_test_1_"]["patient_id"] == "0_test_1_" and by_id["0_test_1_"]["view"] == ""
    why = reasons(out)
    assert why == {"2_train_0_": "has_pneumo 1 disagrees with the file name's _0_",
                   "4_train_0_": "bad has_pneumo value 'x' (expected 0 or 1)",
                   "5_train_0_": "missing image file"}
    assert {r["row"] for r in rows(out / "rejects.csv")} == {"3", "5", "6"}
    assert summary.rows_in == 9 and summary.kept == 6
    assert_idempotent("siim-pneumothorax-png", raw.parent, out)
    # the DICOM adapter, pointed at the PNG release, names the right one
    with pytest.raises(AdapterError, match="siim-pneumothorax-png adapter"):
        prepare("siim-pneumothorax", raw, tmp_path / "o2")
    with pytest.raises(AdapterError, match=r"stage_1_train_images\.csv .*siim-acr-pneumothorax"):
        prepare("siim-pneumothorax-png", raw / "png_images", tmp_path / "o3")


def test_covidx(tmp_path):
    """train.txt / val.txt / test.txt (no header: patient id, file name, class, source) beside
    train/ val/ test/."""
    raw, out = tmp_path / "covidx", tmp_path / "out"
    lines = {
        "train": ["p1 a.png positive rsna", "p1 b.jpg negative rsna",
                  "p2 DX.1.2.840.5.png negative bimcv", "p3 DX.1.2.840.6.png positive bimcv",
                  "p4 c.png COVID-19 cohen", "p5 d.png negative", "", "p6 e.png negative sirm"],
        "val": ["p7 f.png negative ricord"],
        "test": ["p8 g.png positive ricord", "p9 h.jpeg negative rsna"],
    }
    for split, text in lines.items():
        raw.mkdir(exist_ok=True)
        (raw / f"{split}.txt").write_text("\n".join(text) + "\n")
        for ln in text:
            name = ln.split()[1] if ln else ""
            if name and name != "e.png":  # e.png listed, not downloaded
                image(raw / split / name, value=len(name))
    summary, manifest = run("covidx", raw, out)
    by_image = {Path(r["image"]).name: r for r in manifest}
    assert set(by_image) == {"a.png", "b.jpg", "DX.1.2.840.5.png", "DX.1.2.840.6.png", "f.png",
                             "g.png", "h.jpeg"}
    a, b = by_image["a.png"], by_image["b.jpg"]
    assert (a["labels"], a["negative_labels"], a["labels_raw"]) == ("COVID-19", "", "positive")
    assert (b["labels"], b["negative_labels"]) == ("", "COVID-19")
    assert (a["patient_id"], a["study_id"], a["split"]) == ("p1", "train/a", "train")
    assert by_image["f.png"]["split"] == "valid" and by_image["h.jpeg"]["study_id"] == "test/h"
    # BenchX's id form: the file name up to its first dot (two images share train/DX)
    assert by_image["DX.1.2.840.5.png"]["study_id"] == by_image["DX.1.2.840.6.png"]["study_id"] \
        == "train/DX"
    why = {(r["file"], r["row"]): r["reason"] for r in rows(out / "rejects.csv")}
    assert why == {("train.txt", "5"): "unknown class 'COVID-19' (expected positive or negative)",
                   ("train.txt", "6"): "3 fields, expected 4 (patient id, file name, class, "
                                       "source)",
                   ("train.txt", "8"): "missing image file"}
    assert summary.rows_in == 10 and summary.kept == 7
    assert any(n.startswith("1 study id(s) (file name up to the first dot") and "train/DX" in n
               for n in summary.notes)
    assert_idempotent("covidx", raw, out)
    # BenchX's own lists (one id a line) are not COVIDx's label files
    (raw / "train.txt").write_text("train/a.png\ntrain/b.png\n")
    with pytest.raises(AdapterError, match=r"train\.txt line 1: 1 field\(s\), .* 4 "
                                           r"space-separated fields"):
        prepare("covidx", raw, tmp_path / "o2")
    with pytest.raises(AdapterError, match="none of train.txt, val.txt, test.txt"):
        prepare("covidx", raw / "val", tmp_path / "o3")


TBX_HEADER = ["fname", "image_height", "image_width", "source", "bbox", "target", "tb_type",
              "image_type"]
BOX = "{'xmin': 10.0, 'ymin': 12.0, 'width': 20.0, 'height': 18.0}"


def tbx_csv(path: Path, data: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TBX_HEADER)
        w.writerows(data)


def test_tbx11k(tmp_path):
    """data.csv: one row per TB box (an image without boxes: one row), images/<fname>."""
    raw, out = tmp_path / "tbx11k-simplified", tmp_path / "out"
    tbx_csv(raw / "data.csv", [
        ["tb0001.png", 512, 512, "train", BOX, "tb", "active_tb", "tb"],
        ["tb0001.png", 512, 512, "train", BOX, "tb", "latent_tb", "tb"],  # second box
        ["h0001.png", 512, 512, "val", "none", "no_tb", "none", "healthy"],
        ["s0001.png", 512, 512, "train", "none", "no_tb", "none", "sick_but_no_tb"],
        ["tb0002.png", 512, 512, "train", BOX, "tb", "active_tb", "tb"],
        ["tb0002.png", 512, 512, "train", "none", "no_tb", "none", "tb"],  # disagrees
        ["s0002.png", 512, 512, "train", "none", "maybe", "none", "sick_but_no_tb"],
        ["h0002.png", 512, 512, "val", "none", "no_tb", "none", "healthy"],
    ])
    for name in ("tb0001", "h0001", "s0001", "tb0002", "s0002"):  # h0002: not downloaded
        image(raw / "images" / f"{name}.png")
    summary, manifest = run("tbx11k", raw, out)
    by_id = {r["study_id"]: r for r in manifest}
    assert set(by_id) == {"tb0001", "h0001", "s0001"}
    assert (by_id["tb0001"]["labels"], by_id["tb0001"]["negative_labels"]) == (
        "Tuberculosis", "")
    assert (by_id["h0001"]["labels"], by_id["h0001"]["negative_labels"]) == (
        "No Finding", "Tuberculosis")
    assert (by_id["s0001"]["labels"], by_id["s0001"]["negative_labels"]) == (
        "", "Tuberculosis")
    assert [by_id[i]["split"] for i in ("tb0001", "h0001")] == ["train", "valid"]
    assert by_id["s0001"]["labels_raw"] == "sick_but_no_tb"
    assert reasons(out) == {"tb0002": "data.csv rows disagree on target (no_tb, tb)",
                            "s0002": "unknown target value 'maybe' (expected tb or no_tb)",
                            "h0002": "missing image file"}
    assert {r["row"] for r in rows(out / "rejects.csv")} == {"5", "7", "8"}  # first rows
    assert summary.rows_in == 6 and summary.kept == 3
    assert "box rows merged into 6 images" in summary.notes
    assert_idempotent("tbx11k", raw, out)
    (raw / "data.csv").write_text("image,label\nx.png,tb\n")
    with pytest.raises(AdapterError, match=r"data\.csv: missing column\(s\) \['fname', "
                                           r"'target'\]"):
        prepare("tbx11k", raw, tmp_path / "o2")


# ---------------------------------------------------------------------------------------------
# Generic folder + CSV, and the CLI


def test_generic_with_a_column_map(tmp_path):
    raw, out = tmp_path / "site", tmp_path / "out"
    image(raw / "img" / "a.png")
    image(raw / "img" / "b.png")
    corrupt_png(raw / "img" / "c.png")
    image(raw / "img" / "d.png")
    with (raw / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["File", "Report", "Findings", "Patient"])
        w.writerow(["img/a.png", "Heart is enlarged.", "Cardiomegaly|Effusion", "p1"])
        w.writerow(["img/b.png", "", "", "p2"])
        w.writerow(["img/c.png", "Clear lungs.", "No Finding", "p3"])
        w.writerow(["img/d.png", "", "Lung Nodule|Granuloma", "p1"])
        w.writerow(["img/e.png", "Clear.", "No Finding", "p4"])
        w.writerow(["img/a.png", "x", "Pneumonitis", "p1"])
        w.writerow(["img/a.png", "Heart is enlarged.", "Cardiomegaly", "p1"])
    summary, manifest = run("generic", raw, out, csv="labels.csv", label_sep="|",
                            map="image=File,text=Report,labels=Findings,patient_id=Patient")
    assert [r["labels"] for r in manifest] == ["Cardiomegaly;Pleural Effusion", "Nodule"]
    assert manifest[0]["split"] == manifest[1]["split"]  # one patient, one split
    why = {int(r["row"]): r["reason"] for r in rows(out / "rejects.csv")}
    assert why[2] == "image without report or labels (an image-only row needs labels)"
    assert why[3].startswith("unreadable image")
    assert why[5] == "missing image file"
    assert why[6] == "unknown label: 'Pneumonitis' in labels.csv row 6"
    assert why[7] == "duplicate image (the same file as labels.csv row 1)"
    with pytest.raises(AdapterError, match="--map"):
        prepare("generic", raw, tmp_path / "o2", PrepareOptions(csv="labels.csv"))


def test_cli_prepare_prints_the_summary(tmp_path, capsys):
    raw = tmp_path / "mimic"
    mimic_fixture(raw)
    assert main(["data", "prepare", "mimic-cxr", str(raw), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "mimic-cxr: 6 rows in, 2 kept, 4 rejected" in text
    assert "lateral view filtered" in text
    assert main(["data", "prepare", "mimic-cxr", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "prepare", "nih-cxr14", str(raw), "--out", str(tmp_path / "o3")]) == 2
    assert "Data_Entry" in capsys.readouterr().err
