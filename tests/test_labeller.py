"""`xlip text label`: NER label columns added to a CSV of reports, nothing dropped."""

from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_DATA
from xlip.cli import main
from xlip.text.labeller import label_csv

IU_REPORTS = SHARED_DATA / "iu_reports" / "reports.csv"

REPORTS = [
    ("r1", "INDICATION: rule out pneumonia.\nFINDINGS: Small left pleural effusion. No "
           "pneumothorax.\nIMPRESSION: Possible left lower lobe pneumonia."),
    ("r2", "FINDINGS: The lungs are clear. Heart size is normal. Right PICC line in place."),
    ("r3", ""),
    ("r4", "INDICATION: chest pain."),
]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _read(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_label_columns_for_every_row(tmp_path):
    src = _write(tmp_path / "in.csv", ["uid", "report"], [list(r) for r in REPORTS])
    summary = label_csv(src, tmp_path / "out" / "labelled.csv", text_column="report")
    rows = _read(tmp_path / "out" / "labelled.csv")
    assert [r["uid"] for r in rows] == ["r1", "r2", "r3", "r4"]  # every row kept, in order
    assert rows[0]["report"] == REPORTS[0][1]  # input columns copied unchanged
    r1, r2 = rows[0], rows[1]
    assert r1["labels"] == "Pleural Effusion"  # the indication's "pneumonia" is not read
    assert r1["negative_labels"] == "No Finding;Pneumothorax"  # canonical order
    assert r1["uncertain_labels"] == "Pneumonia"
    assert r2["labels"] == "No Finding;Support Devices"
    assert set(r2["negative_labels"].split(";")) == {"Cardiomegaly", "Lung Opacity"}
    assert all(rows[i][c] == "" for i in (2, 3)
               for c in ("labels", "negative_labels", "uncertain_labels"))
    assert (summary.rows, summary.labelled, summary.empty) == (4, 2, 2)
    rejects = _read(summary.rejects)
    assert [(r["row"], r["uid"]) for r in rejects] == [("3", "r3"), ("4", "r4")]
    assert rejects[0]["reason"] == "empty report"
    assert "text policy 'findings_impression'" in rejects[1]["reason"]
    # re-run on clean input: the old rejects file does not linger
    label_csv(_write(tmp_path / "in.csv", ["uid", "report"], [list(REPORTS[1])]),
              tmp_path / "out" / "labelled.csv", text_column="report")
    assert not summary.rejects.exists()


def test_bad_input_is_refused_with_the_fix(tmp_path):
    src = _write(tmp_path / "in.csv", ["uid", "text", "labels"], [["a", "No effusion.", "x"]])
    with pytest.raises(ValueError, match=r"no column 'report'; columns are uid, text, labels"):
        label_csv(src, tmp_path / "o.csv", text_column="report")
    with pytest.raises(ValueError, match="already has column.*labels.*--prefix"):
        label_csv(src, tmp_path / "o.csv")
    with pytest.raises(ValueError, match="unknown text policy 'all'"):
        label_csv(src, tmp_path / "o.csv", text_policy="all", prefix="ner_")
    with pytest.raises(ValueError, match="must not overwrite the input"):
        label_csv(src, src, prefix="ner_")
    with pytest.raises(FileNotFoundError, match="no such CSV"):
        label_csv(tmp_path / "missing.csv", tmp_path / "o.csv")
    label_csv(src, tmp_path / "o.csv", prefix="ner_")
    row = _read(tmp_path / "o.csv")[0]
    assert row["labels"] == "x" and row["ner_negative_labels"] == "Pleural Effusion"


def test_cli(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("\ufefftext\nModerate cardiomegaly.\n\"\"\n", encoding="utf-8")  # with a BOM
    out = tmp_path / "out.csv"
    assert main(["text", "label", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 rows: 1 labelled, 1 with empty text" in printed and "Cardiomegaly 1" in printed
    assert _read(out)[0]["labels"] == "Cardiomegaly"
    assert main(["text", "label", str(src), "--out", str(out), "--text-column", "body"]) == 2
    assert "no column 'body'" in capsys.readouterr().err


@pytest.mark.skipif(not IU_REPORTS.is_file(),
                    reason=f"needs {IU_REPORTS} (../shared/data, or set XLIP_SHARED_DATA)")
def test_iu_reports_macro_f1(tmp_path, capsys):
    """The benchmark on 3,108 real IU reports against their MeSH problem terms."""
    result = tmp_path / "iu.json"
    bench = runpy.run_path(str(ROOT / "benchmarks" / "iu_labeller.py"))
    assert bench["main"](["--reports", str(IU_REPORTS), "--out", str(result)]) == 0
    figures = json.loads(result.read_text())
    assert figures["reports"] == 3108
    assert len(figures["per_finding"]) >= 10
    assert figures["macro_f1"] >= 0.85, figures["macro_f1"]
