"""Shipped benchmark splits (BenchX): hashes, refusal of a changed list, coverage and the partial
flag on stand-in images named by real ids (each in its dataset's raw layout), the NIH starter
images through the nih-cxr14 definition, RSNA zero-shot and probe, SIIM (PNG release), COVIDx
and TBX11K prepared, selected and scored zero-shot, COVIDx's ambiguous ids, and the listing."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SHARED_DATA, build_corpus, needs_shared_data, tiny_config, \
    write_dicom
from xlip.cli import main
from xlip.data.manifest import load_manifest
from xlip.eval.benchmarks import (
    BENCHMARKS_DIR, BenchmarkError, BenchmarkOptions, get_benchmark, id_key, list_hash,
    load_benchmarks, read_list, select_rows,
)
from xlip.train.loop import pretrain

NIH_START = "nih_cxr14_starter/source/Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step tiny model (32 px images) with a short bootstrap."""
    manifest, tok = build_corpus(tmp_path_factory.mktemp("corpus"), 40, 10, seed=1, size=32,
                                 vocab_size=300)
    cfg = tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired"}], "batch_size": 8,
              "num_workers": 0, "eval_manifest": str(manifest)},
        text={"tokenizer": str(tok), "max_length": 32}, eval={"bootstrap": 5},
        train={"out_dir": str(tmp_path_factory.mktemp("run")), "steps": 2, "warmup_steps": 1,
               "ckpt_every": 2})
    return pretrain(cfg, progress=False)


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path)


def ids(name: str, lst: str, n: int) -> list[str]:
    return read_list(get_benchmark(name), lst)[:n]


def nih_root(tmp: Path) -> tuple[Path, list[str]]:
    """NIH layout: Data_Entry_2017_v2020.csv + images_001/images/<id>.png. Four test ids with
    images, one test id in the label file without its image, one id in no list."""
    test = ids("nih-cxr14", "test", 5)
    findings = ["Cardiomegaly", "No Finding", "Cardiomegaly|Effusion", "Effusion", "Mass"]
    root = tmp / "nih"
    root.mkdir()
    with (root / "Data_Entry_2017_v2020.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                    "Patient Age", "Patient Gender", "View Position"])
        for i, (image, labels) in enumerate(zip(test + ["99999999_000.png"],
                                                findings + ["No Finding"])):
            w.writerow([image, labels, 0, image[:8], 50, "M", "PA"])
            if i != 4:  # test[4]: listed and labelled, image not downloaded
                png(root / "images_001" / "images" / image, i)
    return root, test


def rsna_root(tmp: Path) -> Path:
    """RSNA layout: stage_2_train_labels.csv (one row per box) + stage_2_train_images/*.dcm;
    six ids each of test, val and train_1, alternately positive."""
    root = tmp / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (root / "stage_2_train_labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for lst in ("test", "val", "train_1"):
            for i, pid in enumerate(ids("rsna-pneumonia", lst, 6)):
                box = ["10", "10", "20", "20"] if i % 2 else ["", "", "", ""]
                w.writerow([pid, *box, str(i % 2)])
                write_dicom(root / "stage_2_train_images" / f"{pid}.dcm",
                            rng.integers(0, 255, (40, 40)).astype(np.uint8),
                            PatientID=pid, ViewPosition="PA")
    return root


def siim_root(tmp: Path) -> Path:
    """SIIM PNG release: siim-acr-pneumothorax/stage_1_test_images.csv + png_images/; three
    positive and three negative test ids, and one negative listed whose image is missing."""
    test = read_list(get_benchmark("siim-pneumothorax"), "test")
    chosen = [i for i in test if "_1_" in i[-3:]][:3] + [i for i in test if "_0_" in i[-3:]][:4]
    root = tmp / "siim" / "siim-acr-pneumothorax"
    root.mkdir(parents=True)
    with (root / "stage_1_test_images.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["new_filename", "ImageId", "has_pneumo"])
        for k, stem in enumerate(chosen):
            w.writerow([f"{stem}.png", f"1.2.276.0.{k}", stem[-2]])
            if k != 6:
                png(root / "png_images" / f"{stem}.png", k)
    return root.parent


def covidx_root(tmp: Path) -> Path:
    """COVIDx: test.txt / val.txt (patient id, file name, class, source) + test/ val/. Six test
    ids (one stored under a longer, dotted name, one as .jpg), alternately positive; in val one
    id and two files that both reduce to BenchX's val/CR.png."""
    test = ids("covidx", "test", 6)
    root = tmp / "covidx"
    stems = [Path(i).stem for i in test]
    names = [f"{stems[0]}.dcm.png", f"{stems[1]}.jpg", *[f"{s}.png" for s in stems[2:]]]
    val_names = [Path(ids("covidx", "val", 2)[1]).name, "CR.1.2.840.1.png", "CR.1.2.840.2.png"]
    for split, files in (("test", names), ("val", val_names)):
        (root / split).mkdir(parents=True)
        (root / f"{split}.txt").write_text("".join(
            f"{100 + k} {n} {('negative', 'positive')[k % 2]} ricord\n"
            for k, n in enumerate(files)))
        for k, n in enumerate(files):
            png(root / split / n, k)
    return root


def tbx_root(tmp: Path) -> Path:
    """TBX11K simplified: data.csv (one row per box) + images/; three TB test ids (one with two
    boxes), a healthy and two sick-but-not-TB ones."""
    test = read_list(get_benchmark("tbx11k"), "test")
    tb = [i for i in test if i.startswith("tb")][:3]
    other = [i for i in test if i.startswith("h")][:1] + [i for i in test if
                                                           i.startswith("s")][:2]
    root = tmp / "tbx11k"
    (root / "images").mkdir(parents=True)
    with (root / "data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "image_height", "image_width", "source", "bbox", "target",
                    "tb_type", "image_type"])
        box = "{'xmin': 1.0, 'ymin': 2.0, 'width': 3.0, 'height': 4.0}"
        for k, stem in enumerate(tb + tb[:1] + other):
            positive = stem.startswith("tb")
            w.writerow([f"{stem}.png", 512, 512, "val", box if positive else "none",
                        "tb" if positive else "no_tb", "active_tb" if positive else "none",
                        "tb" if positive else ("healthy" if stem[0] == "h" else
                                               "sick_but_no_tb")])
            png(root / "images" / f"{stem}.png", k)
    return root


BINARY = {"siim-pneumothorax": (siim_root, "siim-pneumothorax-png", "Pneumothorax"),
          "covidx": (covidx_root, "covidx", "COVID-19"),
          "tbx11k": (tbx_root, "tbx11k", "Tuberculosis")}


def test_shipped_lists_match_their_hashes_and_are_package_data():
    benchmarks = load_benchmarks()
    assert {"nih-cxr14", "rsna-pneumonia", "siim-pneumothorax", "covidx", "vindr-cxr",
            "tbx11k", "object-cxr"} == set(benchmarks)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["xlip"]
    for b in benchmarks.values():
        assert set(b.lists) == {"test", "val", "train", "train_10", "train_1"}
        for name, spec in b.lists.items():
            assert list_hash(b.root / spec.file) == spec.sha256, spec.file
            assert len(read_list(b, name)) == spec.ids
            rel = (b.root / spec.file).relative_to(ROOT / "xlip").as_posix()
            assert any(fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
    assert len(read_list(benchmarks["nih-cxr14"], "test")) == 22433
    shipped = {p.relative_to(BENCHMARKS_DIR).as_posix() for p in BENCHMARKS_DIR.rglob("*")
               if p.is_file()}
    assert "benchx/LICENSE" in shipped and not any(".reference" in p for p in shipped)


def test_a_changed_list_is_refused(tmp_path):
    root = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS_DIR, root)
    path = root / "benchx" / "RSNA" / "test.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    path.write_bytes(gzip.compress(("\n".join(lines[1:]) + "\n").encode()))
    bench = get_benchmark("rsna-pneumonia", root)
    with pytest.raises(BenchmarkError, match=r"RSNA/test\.txt\.gz: sha256 .* differs .*restore"):
        read_list(bench, "test")
    with pytest.raises(BenchmarkError, match="sha256"):  # before the data is read
        select_rows(bench, tmp_path / "no-data-needed", ["test"])
    assert read_list(bench, "val")  # the unchanged lists still load


def test_nih_coverage_and_partial_flag_on_stand_in_images(tmp_path, run):
    root, test = nih_root(tmp_path)
    rows, coverage = select_rows(get_benchmark("nih-cxr14"), root, ["test", "val"])
    assert [Path(r.image).name for r in rows["test"]] == test[:4]  # list order, test[4] missing
    assert {r.split for r in rows["test"]} == {"test"} and rows["val"] == []
    cov = coverage["test"]
    assert (cov["found"], cov["listed"]) == (4, 22433)
    assert cov["missing_reasons"] == {"not in the label file": 22428, "missing image file": 1}
    assert cov["missing_examples"][0] == test[4]

    out = tmp_path / "out"
    assert main(["eval", "benchmark", "nih-cxr14", "--model", str(run), "--data-root",
                 str(root), "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert res["partial"] is True and res["protocol"] == "zeroshot"
    assert res["coverage"]["test"]["found"] == 4 and res["n_images"] == 4
    assert set(res["per_finding"]) == {"Cardiomegaly", "Pleural Effusion"}  # both classes
    assert "Hernia" in res["skipped_classes"]
    md = (out / "benchmark.md").read_text()
    assert md.startswith("# Benchmark nih-cxr14, zeroshot (partial: 4 of 22,433 test images)")
    with (out / "benchmark_manifest.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


@needs_shared_data(NIH_START)
def test_nih_starter_images_through_the_benchmark(tmp_path, run, capsys):
    """All 493 starter images are in the published NIH test list."""
    out = tmp_path / "out"
    assert main(["eval", "benchmark", "nih-cxr14", "--model", str(run), "--data-root",
                 str(SHARED_DATA / "nih_cxr14_starter"), "--protocol", "zeroshot",
                 "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert (res["coverage"]["test"]["found"], res["coverage"]["test"]["listed"]) == (493, 22433)
    assert res["partial"] is True and res["n_images"] == 493
    assert len(res["per_finding"]) == 14  # every NIH finding has positives among the 493
    assert "partial: 493 of 22,433 test images" in capsys.readouterr().out


def test_rsna_zeroshot_and_probe_on_stand_in_dicoms(tmp_path, run):
    root = rsna_root(tmp_path)
    zs, pb = tmp_path / "zs", tmp_path / "pb"
    assert main(["eval", "benchmark", "rsna-pneumonia", "--model", str(run), "--data-root",
                 str(root), "--out", str(zs)]) == 0
    res = json.loads((zs / "benchmark.json").read_text())
    assert res["task"] == "binary" and list(res["per_finding"]) == ["Pneumonia"]
    assert res["details"]["Pneumonia"]["positives"] == 3 and res["n_images"] == 6
    assert res["coverage"]["test"]["found"] == 6 and res["partial"] is True

    assert main(["eval", "benchmark", "rsna-pneumonia", "--model", str(run), "--data-root",
                 str(root), "--protocol", "probe", "--fraction", "1", "--out", str(pb)]) == 0
    res = json.loads((pb / "benchmark.json").read_text())
    assert res["protocol"] == "linear_probe" and res["fraction"] == 0.01
    assert (res["n_train"], res["n_val"], res["n_test"]) == (6, 6, 6)
    assert res["split"] == "train_1" and list(res["per_finding"]) == ["Pneumonia"]
    assert {n: (c["found"], c["listed"]) for n, c in res["coverage"].items()} == {
        "test": (6, 4003), "val": (6, 4003), "train_1": (6, 186)}
    assert "(partial: 6 of 4,003 test images)" in (pb / "benchmark.md").read_text()


def test_rsna_finetune_on_stand_in_dicoms(tmp_path, run):
    """--protocol finetune trains on the train_1 list, stops on val, tests on test."""
    root, out = rsna_root(tmp_path), tmp_path / "ft"
    assert main(["eval", "benchmark", "rsna-pneumonia", "--model", str(run), "--data-root",
                 str(root), "--protocol", "finetune", "--fraction", "1", "--init", "random",
                 "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert res["protocol"] == "finetune" and res["fraction"] == 0.01
    assert res["init"] == "random" and res["validation"] == "the published val list"
    assert (res["n_train"], res["n_val"], res["n_test"]) == (6, 6, 6)
    assert res["split"] == "train_1" and list(res["per_finding"]) == ["Pneumonia"]
    assert res["validation_curve"] and 1 <= res["best_step"] <= res["steps_done"] <= 300
    assert (out / "finetune.safetensors").is_file()
    md = (out / "benchmark.md").read_text()
    assert md.startswith("# Benchmark rsna-pneumonia, finetune (partial: 6 of 4,003 test")
    assert "## Fine-tuning (random encoder, 0.01 of the training labels)" in md


def test_probe_and_finetune_take_a_benchmark_as_their_rows(tmp_path, run, capsys):
    """`xlip eval probe|finetune --benchmark NAME --data-root DIR` is `xlip eval benchmark NAME
    --protocol probe|finetune`, fine-tuning with the command's own hyper-parameters."""
    root = rsna_root(tmp_path)
    common = ["--model", str(run), "--data-root", str(root)]
    assert main(["eval", "benchmark", "rsna-pneumonia", *common, "--protocol", "probe",
                 "--fraction", "1", "--out", str(tmp_path / "bm")]) == 0
    assert main(["eval", "probe", "--benchmark", "rsna-pneumonia", *common, "--fraction",
                 "0.01", "--out", str(tmp_path / "pb")]) == 0
    via_bm, via_pb = (json.loads((tmp_path / d / "benchmark.json").read_text())
                      for d in ("bm", "pb"))
    assert via_pb["split"] == "train_1" and via_pb["per_finding"] == via_bm["per_finding"]
    assert main(["eval", "finetune", "--benchmark", "rsna-pneumonia", *common, "--fraction",
                 "0.01", "--steps", "4", "--eval-every", "2", "--quiet", "--out",
                 str(tmp_path / "ft")]) == 0
    ft = json.loads((tmp_path / "ft" / "benchmark.json").read_text())
    assert ft["protocol"] == "finetune" and ft["steps"] == 4 and ft["steps_done"] <= 4
    capsys.readouterr()
    for argv, msg in ((["--manifest", "m.csv"], "drop --manifest"),
                      (["--fraction", "0.5"], "the published lists are 0.01, 0.1 and 1"),
                      (["--test-split", "holdout"], "drop --test-split")):
        assert main(["eval", "probe", "--benchmark", "rsna-pneumonia", *common, *argv]) == 2
        assert msg in capsys.readouterr().err
    assert main(["eval", "probe", "--model", str(run), "--data-root", str(root)]) == 2
    assert "--data-root goes with --benchmark NAME" in capsys.readouterr().err


def test_vindr_coverage_counts_the_adapters_reasons(tmp_path):
    """VinDr layout: annotations/image_labels_test.csv (the consensus row) + test/<id>.dicom.
    An image whose only finding is outside xlip's vocabulary is not found, and says why."""
    root = tmp_path / "vindr"
    test = ids("vindr-cxr", "test", 3)
    for folder in ("annotations", "test"):
        (root / folder).mkdir(parents=True)
    columns = ["Cardiomegaly", "Other lesion", "No finding"]
    with (root / "annotations" / "image_labels_test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "rad_id", *columns])
        for i, iid in enumerate(test):
            w.writerow([iid, "R8", *["1" if j == i else "0" for j in range(3)]])
            write_dicom(root / "test" / f"{iid}.dicom", np.zeros((8, 8), np.uint8))
    rows, coverage = select_rows(get_benchmark("vindr-cxr"), root, ["test"])
    assert [(r.study_id, r.labels) for r in rows["test"]] == [
        (test[0], ("Cardiomegaly",)), (test[2], ("No Finding",))]
    assert coverage["test"]["found"] == 2 and coverage["test"]["missing_reasons"] == {
        "not in the label file": 2997,
        "no finding reached the --rad-vote agreement within the vocabulary": 1}


@pytest.mark.parametrize("name", list(BINARY))
def test_png_benchmarks_prepare_select_and_zeroshot(tmp_path, run, capsys, name):
    """SIIM (PNG release), COVIDx and TBX11K on stand-ins named by real test ids: `xlip data
    prepare`, coverage (found 6 of N, the partial flag) and a zero-shot run through the CLI."""
    make_root, adapter, finding = BINARY[name]
    root = make_root(tmp_path)
    assert main(["data", "prepare", adapter, str(root), "--out", str(tmp_path / "prep")]) == 0
    assert f"{adapter}: " in capsys.readouterr().out
    bench = get_benchmark(name)
    test = read_list(bench, "test")
    keys = {id_key(i) for i in test}
    manifest = load_manifest(tmp_path / "prep" / "manifest.csv")
    assert sum(finding in r.labels for r in manifest if r.study_id in keys) == 3

    rows, coverage = select_rows(bench, root, ["test"])
    found = {r.study_id for r in rows["test"]}
    assert [r.study_id for r in rows["test"]] == [id_key(i) for i in test if id_key(i) in found]
    assert (coverage["test"]["found"], coverage["test"]["listed"]) == (6, len(test))
    missing = dict(coverage["test"]["missing_reasons"])
    if name == "siim-pneumothorax":
        assert missing.pop("missing image file") == 1
    assert missing == {"not in the label file": len(test) - 6 - (name == "siim-pneumothorax")}

    out = tmp_path / "zs"
    assert main(["eval", "benchmark", name, "--model", str(run), "--data-root", str(root),
                 "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert res["task"] == "binary" and list(res["per_finding"]) == [finding]
    assert res["details"][finding]["positives"] == 3 and res["n_images"] == 6
    assert res["partial"] is True and res["coverage"]["test"]["found"] == 6
    assert f"(partial: 6 of {len(test):,} test images)" in (out / "benchmark.md").read_text()


def test_covidx_ids_cut_at_the_first_dot_and_shared_ids(tmp_path):
    """BenchX named a COVIDx image by its file name up to the first dot: a dotted name is found
    by that id, and an id two images share (val/CR.png) is counted ambiguous, not guessed."""
    root = covidx_root(tmp_path)
    rows, coverage = select_rows(get_benchmark("covidx"), root, ["test", "val"])
    test = ids("covidx", "test", 6)
    assert [Path(r.image).name for r in rows["test"][:2]] == [
        f"{Path(test[0]).stem}.dcm.png", f"{Path(test[1]).stem}.jpg"]
    assert [r.study_id for r in rows["test"]] == [id_key(i) for i in test]
    assert [r.split for r in rows["val"]] == ["valid"]
    assert coverage["val"]["missing_reasons"]["ambiguous id (2 images share it)"] == 1
    assert coverage["val"]["listed"] == 8438  # distinct ids of 8,472 lines


def test_refusals_are_one_line_errors(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["eval", "benchmark", *argv, "--model", str(tmp_path / "no-model"),
                     "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err.strip()

    assert "a detection task" in error("object-cxr")
    assert "unknown benchmark 'nih'" in error("nih")
    msg = error("nih-cxr14", "--fraction", "10")
    assert "--fraction applies to --protocol probe and finetune only" in msg and "\n" not in msg
    with pytest.raises(BenchmarkError, match="--fraction 5"):
        BenchmarkOptions("nih-cxr14", tmp_path, "probe", 5)


def test_listing(capsys):
    assert main(["eval", "benchmarks", "--json"]) == 0
    listed = {b["name"]: b for b in json.loads(capsys.readouterr().out)}
    nih = listed["nih-cxr14"]
    assert nih["task"] == "multi-label" and len(nih["classes"]) == 14 and nih["evaluable"]
    assert nih["lists"]["test"]["ids"] == 22433 and nih["lists"]["test"]["hash_ok"]
    assert listed["rsna-pneumonia"]["classes"] == ["Pneumonia"]
    assert [n for n, b in listed.items() if not b["evaluable"]] == ["object-cxr"]
    assert listed["object-cxr"]["unsupported"]
    tbx = listed["tbx11k"]
    assert (tbx["task"], tbx["classes"], tbx["adapter"]) == ("binary", ["Tuberculosis"],
                                                             "tbx11k")
    assert "segmentation" in tbx["note"] and "segmentation" in listed["siim-pneumothorax"][
        "note"]
    assert all(s["hash_ok"] for b in listed.values() for s in b["lists"].values())
    assert main(["eval", "benchmarks"]) == 0
    text = capsys.readouterr().out
    assert "nih-cxr14: NIH ChestX-ray14, multi-label, 14 classes" in text
    assert "download: https://nihcc.app.box.com" in text and "MIT licence" in text
    assert "tbx11k: TBX11K, binary, 1 classes (adapter tbx11k)" in text
    assert "note:     BenchX named each image by its file name up to the first dot" in text
