"""`xlip data split`: label-fraction subsets that are patient-disjoint, patient-complete, nested,
stratified per finding, deterministic and hashed; the probe reads them, selects the same rows
for `--fraction`, and refuses a split file changed since it was written."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import tiny_config
from xlip.cli import main
from xlip.data.manifest import Record, load_manifest
from xlip.data.splits import (SplitOptions, check_split_file, hold_out, nested_fractions,
                              patient_key, patient_order, write_splits)
from xlip.data.synthetic import SYNTH_FINDINGS, SynthConfig, synthesize
from xlip.errors import InputError
from xlip.eval import probe
from xlip.eval.probe import ProbeOptions, split_rows

FRACTIONS = (0.02, 0.1, 0.5, 1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The synthetic corpus, its training rows grouped into patients of 1, 2 or 3 rows."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = synthesize(root, n_train=300, n_test=60, seed=3, cfg=SynthConfig(size=32))
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    sizes, patient, left = itertools.cycle([1, 2, 3]), 0, 0
    for r in rows:
        if r["split"] == "train":
            if not left:
                patient, left = patient + 1, next(sizes)
            r["patient_id"], left = f"p{patient:04d}", left - 1
    out = root / "grouped.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("splits") / "a"
    return write_splits(corpus, out, SplitOptions(FRACTIONS, seed=0)), out


def pool_and_validation(manifest: Path, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """The training rows a split draws from and the held-out validation rows, recomputed."""
    rows = load_manifest(manifest, verify_images=False)
    return hold_out([r for r in rows if r.split == "train" and r.image and r.labels], seed)


def of(rows: list[Record], split: str) -> list[Record]:
    return [r for r in rows if r.split == split]


def test_subsets_are_nested_patient_complete_disjoint_and_sized(corpus, written):
    meta, out = written
    pool, val = pool_and_validation(corpus)
    images_of = defaultdict(set)
    for r in pool:
        images_of[r.patient_id].add(r.image)
    n = len(images_of)
    assert n == meta["pool"]["patients"] and 100 < n < 160
    source = load_manifest(corpus, verify_images=False)
    smaller: set[str] = set()
    for e in meta["fractions"]:
        rows = load_manifest(out / e["file"], verify_images=False)
        train = of(rows, "train")
        patients = {r.patient_id for r in train}
        assert len(patients) == e["patients"] and abs(len(patients) - e["fraction"] * n) <= 0.5
        # patient-complete: a chosen patient brings every one of its training images
        assert {r.image for r in train} == set().union(*(images_of[p] for p in patients))
        assert smaller <= {r.image for r in train}  # nested: 2 % ⊂ 10 % ⊂ 50 % ⊂ 100 %
        smaller = {r.image for r in train}
        # the held-out validation rows and the other splits' rows are in every file, unchanged
        assert [r.image for r in of(rows, "valid")] == [r.image for r in val]
        assert [(r.image, r.text, r.labels, r.patient_id) for r in of(rows, "test")] == \
            [(r.image, r.text, r.labels, r.patient_id) for r in of(source, "test")]
        probe.check_disjoint({"training": train, "validation": of(rows, "valid"),
                              "test": of(rows, "test")})
        assert e["rows"] == len(rows) and e["images"] == len(train)
    assert smaller == {r.image for r in pool}  # 100 %: the whole pool


def test_every_finding_keeps_its_share(corpus, written):
    """Positive patients per finding: recounted from each file (they match splits.json), at
    least one for every finding from 10 % on, and within 1.5 of fraction × the pool's count
    (a patient draw without stratification misses by several at 10 %)."""
    meta, out = written
    full = meta["pool"]["positive_patients"]
    assert len(full) >= 8
    for e in meta["fractions"]:
        train = of(load_manifest(out / e["file"], verify_images=False), "train")
        count = {f: len({r.patient_id for r in train if f in r.labels}) for f in full}
        assert {f: c for f, c in count.items() if c} == e["positive_patients"]
        assert {f: sum(f in r.labels for r in train) for f in full if count[f]} == \
            e["positives"]
        if e["fraction"] >= 0.1:
            assert min(count.values()) >= 1
        share = e["patients"] / meta["pool"]["patients"]
        assert max(abs(count[f] - share * full[f]) for f in full) <= 1.5, (e["file"], count)


def test_the_rarest_finding_comes_first():
    """One Mass patient among 100: any subset of 3 patients or more holds it (a random draw of
    10 % holds it one time in ten), and the patients after it keep the Edema / No Finding shares
    as closely as whole patients can: 5 and 4 in the first 10 (6 and 3 are farther from 5.9 and
    4.0)."""
    labels = ["Mass"] + ["Edema"] * 59 + ["No Finding"] * 40
    records = [Record(i + 1, f"/x/{i}.png", "", (lab,), "train", f"p{i:03d}", "", "", "s")
               for i, lab in enumerate(labels)]
    for seed in range(3):
        chosen = nested_fractions(records, [0.03, 0.1], seed)
        first3 = [records[i].labels[0] for i in chosen[0.03]]
        assert sorted(first3) == ["Edema", "Mass", "No Finding"]
        first10 = [records[i].labels[0] for i in chosen[0.1]]
        assert first10.count("Mass") == 1 and first10.count("Edema") == 5
        assert set(chosen[0.03]) < set(chosen[0.1])
    # the order is one of the patients, not of the rows' order in the file
    assert patient_order(records[::-1], 0) == patient_order(records, 0)


def test_same_seed_same_bytes_other_seed_other_patients(corpus, written, tmp_path):
    meta, out = written
    again = write_splits(corpus, tmp_path / "a", SplitOptions(FRACTIONS, seed=0))
    assert again == meta
    for name in [e["file"] for e in meta["fractions"]] + ["splits.json", "splits.md"]:
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
    other = write_splits(corpus, tmp_path / "b", SplitOptions(FRACTIONS, seed=1))
    for e, o in zip(meta["fractions"], other["fractions"]):
        mine = {r.patient_id for r in of(load_manifest(out / e["file"],
                                                       verify_images=False), "train")}
        theirs = {r.patient_id for r in of(load_manifest(tmp_path / "b" / o["file"],
                                                         verify_images=False), "train")}
        if e["fraction"] < 1.0:
            assert mine != theirs
        assert e["sha256"] != o["sha256"]  # the held-out validation patients differ too


def test_recorded_hash_is_the_files_sha256(written):
    meta, out = written
    assert meta["source_sha256"] == hashlib.sha256(Path(meta["source"]).read_bytes()).hexdigest()
    for e in meta["fractions"]:
        digest = hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()
        assert e["sha256"] == digest == check_split_file(out / e["file"])
    assert json.loads((out / "splits.json").read_text()) == meta
    md = (out / "splits.md").read_text()
    assert "| 0.1 | `train_10pct.csv` |" in md and meta["algorithm"] in md


def label_features(model, paths, cfg, batch_size=128, progress=""):
    """Stand-in pooled features: the labels plus noise seeded by the image path."""
    out = []
    for p in paths:
        rng = np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
        y = np.array([float(f in LABELS[p]) for f in FINDINGS])
        out.append(np.concatenate([y + rng.normal(0, 0.5, len(y)), rng.normal(size=4)]))
    return np.stack(out)


LABELS: dict[str, tuple[str, ...]] = {}
FINDINGS = SYNTH_FINDINGS


@pytest.fixture
def stub_model(corpus, monkeypatch):
    """`xlip eval probe` without a trained model: the features come from the labels."""
    LABELS.update({r.image: r.labels for r in load_manifest(corpus, verify_images=False)})
    cfg = tiny_config(eval={"bootstrap": 0})
    model = SimpleNamespace(model=None, cfg=cfg, untrained=lambda seed: None)
    monkeypatch.setattr("xlip.api.XLIP.from_pretrained", lambda path: model)
    monkeypatch.setattr(probe, "pooled_features", label_features)


def test_the_probe_reads_a_split_file_as_it_selects_a_fraction(corpus, written, stub_model,
                                                               tmp_path):
    meta, out = written
    ten = out / "train_10pct.csv"
    from_file = split_rows(ProbeOptions(ten))
    from_source = split_rows(ProbeOptions(corpus, fraction=0.1))
    for a, b in zip(from_file[:3], from_source[:3]):
        assert [r.image for r in a] == [r.image for r in b]
    assert main(["eval", "probe", "--model", "m", "--manifest", str(ten), "--out",
                 str(tmp_path / "file")]) == 0
    assert main(["eval", "probe", "--model", "m", "--manifest", str(corpus), "--fraction",
                 "0.1", "--out", str(tmp_path / "frac")]) == 0
    res, ref = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("file", "frac"))
    assert res["split_sha256"] == res["test_split_sha256"] == meta["fractions"][1]["sha256"]
    assert ref["split_sha256"] == meta["source_sha256"]
    assert res["n_train"] == ref["n_train"] == meta["fractions"][1]["images"]
    assert res["mean_auc"] == pytest.approx(ref["mean_auc"]) and res["mean_auc"] > 0.7


def test_probe_fractions_too_small_are_recorded_not_fatal(corpus, stub_model):
    """``linear_probes`` (xlip ablate's 100 / 10 / 1 %): a fraction of no patient or of one
    (no finding with both classes) gets its error; the others are scored on the same rows as
    ``--fraction`` alone would give them."""
    pool, _ = pool_and_validation(corpus)
    n = len({patient_key(r) for r in pool})
    empty, one = 0.4 / n, 1.0 / n
    res = probe.linear_probes(None, tiny_config(), ProbeOptions(corpus),
                              [1.0, 0.1, one, empty], bootstrap=0)
    assert "rounds to 0 patients; use a larger fraction" in res[empty]["error"]
    assert "no finding has positive and negative images among its 1 training" in \
        res[one]["error"]
    alone = split_rows(ProbeOptions(corpus, fraction=0.1))[0]
    assert res[0.1]["n_train"] == len(alone) and res[1.0]["n_train"] == len(pool)
    with pytest.raises(InputError, match="rounds to 0 patients"):
        split_rows(ProbeOptions(corpus, fraction=empty))


def test_a_changed_split_file_is_refused(corpus, stub_model, tmp_path, capsys):
    out = tmp_path / "s"
    meta = write_splits(corpus, out, SplitOptions((0.1, 1.0)))
    ten = out / "train_10pct.csv"
    recorded = meta["fractions"][0]["sha256"]
    ten.write_bytes(ten.read_bytes().replace(b"Cardiomegaly", b"Edema", 1))
    now = hashlib.sha256(ten.read_bytes()).hexdigest()
    with pytest.raises(InputError, match=f"sha256 {now}, recorded in .*: {recorded}"):
        split_rows(ProbeOptions(ten))
    capsys.readouterr()
    assert main(["eval", "probe", "--model", "m", "--manifest", str(ten), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ten) in err and recorded in err and now in err
    assert "re-run xlip data split or restore the file" in err
    # the untouched file of the same folder is still accepted
    assert check_split_file(out / "train_100pct.csv") == meta["fractions"][1]["sha256"]


def test_bad_fractions_and_an_occupied_folder_are_refused(corpus, tmp_path, capsys):
    pool, _ = pool_and_validation(corpus)
    n = len({patient_key(r) for r in pool})

    def error(*args: str) -> str:
        capsys.readouterr()
        assert main(["data", "split", str(corpus), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    out = str(tmp_path / "s")
    assert (f"--fractions 0.001: 0.001 × {n} training patients rounds to 0 patients; use a "
            "larger fraction") in error("--fractions", "0.001,1", "--out", out)
    assert "--fractions 1.5: give a share in (0, 1]" in error("--fractions", "1.5", "--out", out)
    assert "--fractions 0.0: give a share in (0, 1]" in error("--fractions", "0,1", "--out", out)
    one = f"{1.0 / n:.6f}"  # a single patient: no finding can have both classes
    assert (f"--fractions {float(one):g}: no finding has positive and negative images among "
            "its") in error("--fractions", one, "--out", out)
    assert not list(Path(out).iterdir())  # nothing written by a refused split
    # an existing split: the same again is fine, a different one needs --force
    assert main(["data", "split", str(corpus), "--quiet", "--fractions", "0.5,1", "--out",
                 out]) == 0
    assert main(["data", "split", str(corpus), "--quiet", "--fractions", "0.5,1", "--out",
                 out]) == 0
    assert "pass --force to replace them, or give another --out" in error(
        "--fractions", "0.25,1", "--out", out)
    assert main(["data", "split", str(corpus), "--quiet", "--fractions", "0.25,1", "--out",
                 out, "--force"]) == 0
    names = sorted(p.name for p in Path(out).iterdir())
    assert names == ["splits.json", "splits.md", "train_100pct.csv", "train_25pct.csv"]
    # a split file that would land on the source manifest itself: refused, even with --force
    src = tmp_path / "src"
    src.mkdir()
    (src / "train_100pct.csv").write_bytes(corpus.read_bytes().replace(
        b"images/", str(corpus.parent).encode() + b"/images/"))
    with pytest.raises(InputError, match="would overwrite the source manifest"):
        write_splits(src / "train_100pct.csv", src, SplitOptions((1.0,), force=True))
