"""`xlip data validate`: each check on small manifests made here, with and without the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA, needs_shared_data, write_dicom
from xlip.data.manifest import write_manifest
from xlip.data.validate import exit_code, validate

REPORT = "FINDINGS: Small left pleural effusion. IMPRESSION: Effusion."


def png(root, name: str, size=(256, 256), seed: int = 0) -> str:
    """A random grayscale PNG (distinct bytes per seed); returns its path relative to root."""
    (root / "img").mkdir(exist_ok=True)
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "img" / name)
    return f"img/{name}"


def row(image: str = "", text: str = REPORT, labels: str = "", split: str = "train",
        patient: str = "", source: str = "") -> dict:
    return {"image": image, "text": text, "labels": labels, "split": split,
            "patient_id": patient, "source": source}


def clean_rows(root, prefix: str = "", split: str = "train", first_seed: int = 0) -> list[dict]:
    """A paired, an image-only and a text-only row, each its own patient."""
    return [
        row(png(root, f"{prefix}a.png", seed=first_seed), REPORT, "Pleural Effusion", split,
            f"{prefix}p1"),
        row(png(root, f"{prefix}b.png", seed=first_seed + 1), "", "Cardiomegaly", split,
            f"{prefix}p2"),
        row("", "FINDINGS: Lungs are clear.", "", split, f"{prefix}p3"),
    ]


def manifest(root, rows: list[dict], name: str = "manifest.csv"):
    write_manifest(root / name, rows)
    return root / name


def checks(items) -> dict[str, list[tuple]]:
    """{check: [rows of each issue]}."""
    out: dict[str, list[tuple]] = {}
    for i in items:
        out.setdefault(i.check, []).append(tuple(r for _, r in i.rows))
    return out


def checks_of(rep, check: str) -> list:
    return [i for i in rep.problems + rep.warnings if i.check == check]


def test_clean_manifests_pass(tmp_path):
    rows = clean_rows(tmp_path) + clean_rows(tmp_path, "t", "test", first_seed=10)
    rep = validate([manifest(tmp_path, rows)], workers=2)
    assert rep.ok and rep.problems == [] and rep.warnings == [], rep.describe()
    assert rep.rows == {str(tmp_path / "manifest.csv"): 6} and rep.images == 4
    assert rep.image_sizes == {"width": [256, 256, 256], "height": [256, 256, 256]}
    assert rep.kinds == {"paired": 2, "image_only": 2, "text_only": 2}
    assert exit_code(rep) == 0 and rep.describe().endswith("result: OK")
    assert "rows by kind: 2 paired, 2 image-only, 2 text-only" in rep.describe()


def test_unreadable_images_are_problems_naming_row_and_reason(tmp_path):
    rows = clean_rows(tmp_path)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    d = write_dicom(tmp_path / "img" / "whole.dcm", np.arange(4096, dtype=np.uint16)
                    .reshape(64, 64)).read_bytes()
    (tmp_path / "img" / "half.dcm").write_bytes(d[: len(d) // 2])
    write_dicom(tmp_path / "img" / "ok.dcm", np.arange(300 * 280, dtype=np.uint16)
                .reshape(300, 280))
    rows += [row(f"img/{n}", labels="Cardiomegaly", patient=f"x{n}") for n in
             ("missing.png", "corrupt.png", "empty.png", "half.dcm", "ok.dcm")]
    rep = validate([manifest(tmp_path, rows)], workers=2)
    found = {i.rows[0][1]: i.message for i in rep.problems}
    assert set(found) == {4, 5, 6, 7} and [i.check for i in rep.problems] == ["image"] * 4
    assert found[4] == "img/missing.png: missing image file"
    assert found[5].startswith("img/corrupt.png: unreadable image (corrupt PNG")
    assert found[6] == "img/empty.png: empty file (0 bytes)"
    assert found[7].startswith("img/half.dcm: unreadable DICOM (")
    assert "delete the row" in rep.problems[0].fix and exit_code(rep) == 1
    assert rep.image_sizes["width"] == [256, 256, 280]  # the DICOM's size from its header
    # --no-images: only existence
    quick = validate([tmp_path / "manifest.csv"], check_images=False)
    assert [i.rows[0][1] for i in quick.problems] == [4] and not quick.image_sizes
    assert "not opened (--no-images" in quick.describe()


def test_small_images_are_warnings(tmp_path):
    rows = clean_rows(tmp_path)
    rows[1]["image"] = png(tmp_path, "small.png", size=(300, 128), seed=5)
    rep = validate([manifest(tmp_path, rows)], min_side=224)
    assert rep.ok and checks(rep.warnings) == {"small image": [(2,)]}
    assert "300x128 px" in rep.warnings[0].message
    assert rep.image_sizes == {"width": [256, 278, 300], "height": [128, 192, 256]}


def test_duplicate_paths_and_contents(tmp_path):
    rows = clean_rows(tmp_path)
    copy = tmp_path / "img" / "copy_of_a.png"
    copy.write_bytes((tmp_path / "img" / "a.png").read_bytes())
    rows += [row(rows[0]["image"], labels="Pleural Effusion", patient="p1"),  # row 4: same path
             row("img/copy_of_a.png", labels="Pleural Effusion", patient="p1")]  # 5: same bytes
    rep = validate([manifest(tmp_path, rows)])
    assert rep.ok  # within the training split: over-weighting, a warning
    assert checks(rep.warnings) == {"duplicate path": [(1, 4)],
                                    "duplicate content": [(1, 4, 5)]}
    # the same picture in train and test is a leak
    rows[4].update(split="test", patient_id="other")
    rep = validate([manifest(tmp_path, rows)])
    assert checks(rep.problems) == {"duplicate content": [(1, 4, 5)]}
    assert "split 'test' and split 'train' (a leak)" in rep.problems[0].message


def test_text_and_label_checks(tmp_path):
    rows = clean_rows(tmp_path) + [
        row("", "", patient="p0"),  # 4: nothing
        row(png(tmp_path, "c.png", seed=7), "", "", patient="p4"),  # 5: image, no text/labels
        row(png(tmp_path, "d.png", seed=8), "", "Cardiomegally;SARS", patient="p5"),  # 6
        row("", "INDICATION: chest pain.", patient="p6"),  # 7: nothing left after selection
        row("", "   ", patient="p7"),  # 8: whitespace only
    ]
    rep = validate([manifest(tmp_path, rows)])
    assert checks(rep.problems) == {"unusable row": [(4,), (5,), (8,)],
                                    "unknown label": [(6,), (6,)], "empty text": [(7,)]}
    unknown = checks_of(rep, "unknown label")
    assert "'Cardiomegally'" in unknown[0].message and "'Cardiomegaly'" in unknown[0].message
    assert "canonical names" in unknown[1].fix
    assert rep.unknown_labels == {"Cardiomegally": 1, "SARS": 1}
    assert "(text_policy=findings_impression)" in checks_of(rep, "empty text")[0].message
    assert rep.warnings == [] and rep.kinds == {"paired": 1, "image_only": 2, "text_only": 2}
    assert validate([tmp_path / "manifest.csv"], text_policy="impression").problems != []
    with pytest.raises(ValueError, match="unknown text policy"):
        validate([tmp_path / "manifest.csv"], text_policy="all")


def test_patient_overlap_between_splits(tmp_path):
    rows = clean_rows(tmp_path) + clean_rows(tmp_path, "t", "test", first_seed=10)
    rows[4]["patient_id"] = "p1"  # test row 5 shares the patient of train row 1
    rows.append(row("", "FINDINGS: Clear.", split="valid", patient="tp3"))  # valid and test: ok
    rows.append(row("", "FINDINGS: Clear.", split="train"))  # 8: no patient_id
    rep = validate([manifest(tmp_path, rows)])
    assert checks(rep.problems) == {"patient overlap": [(1, 5)]}
    assert rep.problems[0].message == "patient 'p1' is in split 'test' and split 'train'"
    assert "split by patient" in rep.problems[0].fix
    assert checks(rep.warnings) == {"no patient_id": [()]}
    assert "1 of 8 rows have no patient_id" in rep.warnings[0].message


def test_patient_leak_into_an_eval_manifest(tmp_path):
    (tmp_path / "ev").mkdir()
    train = manifest(tmp_path, clean_rows(tmp_path), "train.csv")
    ev_rows = clean_rows(tmp_path / "ev", "e", "train", first_seed=20)  # split is ignored
    ev_rows[2]["patient_id"] = "p2"  # an eval patient that is also in training
    ev = manifest(tmp_path / "ev", ev_rows, "eval.csv")
    rep = validate([train], [ev])
    assert len(rep.problems) == 1 and rep.problems[0].check == "patient overlap"
    assert rep.problems[0].rows == ((str(ev), 3), (str(train), 2))
    assert "--eval and split 'train'" in rep.problems[0].message
    assert "from the training manifest" in rep.problems[0].fix
    assert f"{ev} row 3; {train} row 2" in rep.problems[0].where
    assert exit_code(rep) == 1 and exit_code(rep, warn_only=True) == 0
    assert validate([train]).ok and validate([ev]).ok  # each alone is fine
    # patient IDs of two sources are different people; a row without source matches any
    for r in ev_rows:
        r["source"] = "other_dataset"
    manifest(tmp_path / "ev", ev_rows, "eval.csv")
    assert not validate([train], [ev]).ok  # train rows have no source: they match any
    train_rows = clean_rows(tmp_path)
    for r in train_rows:
        r["source"] = "this_dataset"
    manifest(tmp_path, train_rows, "train.csv")
    assert validate([train], [ev]).ok


def test_report_text_and_json(tmp_path):
    rows = clean_rows(tmp_path) + [row("", "", patient=f"q{i}") for i in range(7)]
    rep = validate([manifest(tmp_path, rows)])
    text = rep.describe(examples=5, full_list=tmp_path / "r.json")
    # seven rows with one fix: the fix is said once, five examples, the rest counted
    assert ("problems: 7\n  unusable row: 7; fix: fill in the image path or the report, or "
            "delete the row\n") in text
    assert text.count("neither image nor text") == 5 and "... and 2 more" in text
    assert text.count("fill in the image path") == 1
    assert f"full list: {tmp_path / 'r.json'}" in text
    assert text.endswith("result: 7 problem(s): fix them before training")
    data = json.loads(rep.write_json(tmp_path / "r.json").read_text())
    assert data["ok"] is False and data["counts"]["problems"] == {"unusable row": 7}
    assert data["problems"][0]["rows"] == [[str(tmp_path / "manifest.csv"), 4]]
    assert data["problems"][0]["fix"] and data["problems"][0]["where"].endswith("row 4")
    assert "rerun with --report" in rep.describe()


def test_unreadable_manifest_is_a_problem(tmp_path):
    rep = validate([tmp_path / "nope.csv"])
    assert [i.check for i in rep.problems] == ["manifest"]
    assert "does not exist" in rep.problems[0].message and rep.problems[0].where.endswith(
        "nope.csv")
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    assert "neither an 'image'" in validate([tmp_path / "cols.csv"]).problems[0].message
    with pytest.raises(ValueError, match="at least one"):
        validate([])


@needs_shared_data("nih_cxr14_starter/manifest.csv", "covid_cxr/manifest.csv")
def test_shared_data_manifests():
    nih = SHARED_DATA / "nih_cxr14_starter" / "manifest.csv"
    covid = SHARED_DATA / "covid_cxr" / "manifest.csv"
    rep = validate([nih], workers=2)
    assert rep.ok and rep.images == 493 and rep.image_sizes["width"][0] == 256
    rep = validate([covid], workers=2, check_images=False)
    # pathogen labels (SARS, ARDS, ...) are outside the finding vocabulary: reported, as expected
    assert not rep.ok and set(checks(rep.problems)) == {"unknown label"}
    assert rep.unknown_labels["SARS"] > 0
    # different datasets: their patient numbers are not compared
    assert not [i for i in validate([nih], [covid], check_images=False).problems
                if i.check == "patient overlap"]
