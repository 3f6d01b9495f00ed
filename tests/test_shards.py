"""Tar shards of pre-resized images: pixels, loading, resuming, rejects, worker invariance."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from xlip.data.dataset import MixedDataset
from xlip.data.images import ImageError, image_problem, load_image
from xlip.data.manifest import load_manifest
from xlip.data.shards import ShardPlanError, write_shards
from xlip.data.storage import image_exists, read_shard_member, split_shard_path
from xlip.data.synthetic import SynthConfig, synthesize


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 synthetic rows (96 px; paired, image-only and text-only)."""
    return synthesize(tmp_path_factory.mktemp("synth"), n_train=24, n_test=6, seed=5,
                      cfg=SynthConfig(size=96))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Odd shapes and depths, a DICOM, and rows that must be rejected."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 150), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 60000, (90, 70)).astype(np.uint16)).save(root / "deep.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "small.png")
    (root / "corrupt.png").write_bytes(b"this is not a PNG")
    (root / "truncated.png").write_bytes((root / "wide.png").read_bytes()[:80])
    dicom = get_testdata_file("CT_small.dcm")  # shipped with pydicom, 128 x 128 16-bit
    shutil.copy(dicom, root / "ct.dcm")
    (root / "truncated.dcm").write_bytes((root / "ct.dcm").read_bytes()[:1500])
    rows = [("wide.png", ""), ("corrupt.png", ""), ("deep.png", ""), ("gone.png", ""),
            ("", "FINDINGS: Normal heart size."), ("small.png", ""), ("truncated.png", ""),
            ("ct.dcm", ""), ("truncated.dcm", ""), ("small.png", "Dragon"),
            ("small.png", "-Pneumothorax")]
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "text", "labels", "split", "negative_labels"])
        for image, extra in rows:
            text = extra if not image else ""
            labels = extra if image and extra else "No Finding"
            negatives = labels[1:] if labels.startswith("-") else ""
            w.writerow([image, text, "" if negatives else labels, "train", negatives])
    return root / "manifest.csv"


def shard(manifest, out, **kw):
    kw.setdefault("workers", 1)
    return write_shards(manifest, out, progress=False, **kw)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def direct_uint8(path, size):
    """Naive reference: decode, resize the shorter side to ``size`` (never up), round."""
    arr = load_image(path)
    H, W = arr.shape
    if min(H, W) > size:
        h, w = (size, round(W * size / H)) if H <= W else (round(H * size / W), size)
        arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
    return np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)


def member_pixels(out, image):
    return np.asarray(Image.open(io.BytesIO(read_shard_member(out / image))))


def member_meta(out, image):
    return json.loads(read_shard_member(out / image.replace(".png", ".json")))


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pixels_equal_the_direct_resize_of_the_original(mixed, tmp_path):
    summary = shard(mixed, tmp_path, size=64, shard_rows=4)
    rows = [r for r in read_csv(tmp_path / "manifest.csv") if r["image"]]
    shapes = {}
    for r in rows:
        meta = member_meta(tmp_path, r["image"])
        got = member_pixels(tmp_path, r["image"])
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, direct_uint8(mixed.parent / meta["original_image"], 64))
        shapes[meta["original_image"]] = got.shape
    # shorter side 64, aspect kept; a 40 px image is not upscaled
    assert shapes == {"wide.png": (64, 96), "deep.png": (82, 64), "small.png": (40, 40),
                      "ct.dcm": (64, 64)}
    assert summary.images == 5 and summary.text_only == 1


def test_shard_manifest_trains_like_the_raw_one(corpus, tmp_path):
    shard(corpus, tmp_path, size=96, shard_rows=8)  # 96 px sources: stored unresized
    raw = load_manifest(corpus)
    sharded = load_manifest(tmp_path / "manifest.csv", verify_images=True)  # decodes members
    fields = ("text", "labels", "split", "patient_id", "study_id", "view", "source", "kind")
    assert [[getattr(r, f) for f in fields] for r in sharded] == \
        [[getattr(r, f) for f in fields] for r in raw]
    assert all(".tar#" in r.image for r in sharded if r.image)

    def images(manifest, augment):
        cfg = tiny_config(data={"sources": [{"manifest": str(manifest), "kind": "paired",
                                             "weight": 1.0}], "augment": augment})
        ds = MixedDataset(cfg, train=True)
        return torch.stack([ds[(i, 100 + i)].image for i in range(len(ds))])

    for augment in (False, True):
        torch.testing.assert_close(images(tmp_path / "manifest.csv", augment),
                                   images(corpus, augment), rtol=0, atol=1e-5)


def test_extra_source_columns_come_along(tmp_path):
    from xlip.data.adapters import PrepareOptions, prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(np.full((40, 50), 90, np.uint8)).save(raw / "a.png")
    (raw / "labels.csv").write_text("image,labels,patient_id\na.png,Effusion,p1\n,x,p2\n")
    prepare("generic", raw, tmp_path / "prep", PrepareOptions(csv="labels.csv"))
    shard(tmp_path / "prep" / "manifest.csv", tmp_path / "out", size=32)
    before = read_csv(tmp_path / "prep" / "manifest.csv")
    after = read_csv(tmp_path / "out" / "manifest.csv")
    assert list(after[0]) == list(before[0])  # same columns, same order
    assert [{k: v for k, v in r.items() if k != "image"} for r in after] == \
        [{k: v for k, v in r.items() if k != "image"} for r in before]


def test_validate_reads_shard_members(corpus, tmp_path):
    from xlip.data.validate import validate

    shard(corpus, tmp_path, size=64, shard_rows=8)
    for check_images in (True, False):
        report = validate([tmp_path / "manifest.csv"], check_images=check_images)
        assert not report.problems, report.describe()
    (tmp_path / "shard-000001.tar").unlink()  # its members are gone
    report = validate([tmp_path / "manifest.csv"], check_images=False)
    assert report.problems and "missing image file" in report.describe()


def test_resized_shards_are_within_uint8_quantisation(corpus, tmp_path):
    shard(corpus, tmp_path, size=64, shard_rows=8)
    for r in load_manifest(tmp_path / "manifest.csv"):
        if r.image:
            meta = member_meta(tmp_path, r.image.rsplit("/", 1)[1])
            src = load_image(corpus.parent / meta["original_image"])
            want = np.asarray(Image.fromarray(src).resize((64, 64), Image.BILINEAR))
            assert np.abs(load_image(r.image) - want).max() <= 0.5 / 255 + 1e-6


def test_rerun_rebuilds_only_the_missing_shard(corpus, tmp_path):
    first = shard(corpus, tmp_path, size=64, shard_rows=8)
    assert first.shards == 4 and first.skipped_existing_shards == 0
    before = files(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    (tmp_path / "shard-000001.tar").unlink()
    (tmp_path / "shard-000002.tar.tmp").write_bytes(b"half a shard")  # an interrupted run

    again = shard(corpus, tmp_path, size=64, shard_rows=8, workers=2)
    assert again.skipped_existing_shards == 3
    assert again.written == sum(r["image"].startswith("shard-000001.tar#")
                                for r in read_csv(tmp_path / "manifest.csv"))
    assert files(tmp_path) == before  # no .tmp left, every byte as before
    for name, ns in stamps.items():
        if not name.startswith("shard-000001."):
            assert (tmp_path / name).stat().st_mtime_ns == ns, name


def test_another_plan_is_refused(corpus, tmp_path):
    shard(corpus, tmp_path, size=64, shard_rows=8)
    with pytest.raises(ShardPlanError, match=r"shard_rows 8 → 10.*--overwrite"):
        shard(corpus, tmp_path, size=64, shard_rows=10)
    with pytest.raises(ShardPlanError, match=r"size 64 → 32"):
        shard(corpus, tmp_path, size=32, shard_rows=8)
    edited = corpus.with_name("edited.csv")
    edited.write_text(corpus.read_text().replace("synthetic", "edited"))
    with pytest.raises(ShardPlanError, match="manifest_sha256"):
        shard(edited, tmp_path, size=64, shard_rows=8)
    summary = shard(corpus, tmp_path, size=64, shard_rows=10, overwrite=True)
    assert summary.shards == 3 and not (tmp_path / "shard-000003.tar").exists()


def test_foreign_files_and_the_source_folder_are_refused(corpus, tmp_path):
    (tmp_path / "manifest.csv").write_text("image,text\n")
    with pytest.raises(ShardPlanError, match="no shards.json"):
        shard(corpus, tmp_path)
    with pytest.raises(ShardPlanError, match="source manifest"):
        shard(corpus, corpus.parent, overwrite=True)


def test_bad_images_are_rejected_with_reasons(mixed, tmp_path):
    summary = shard(mixed, tmp_path, size=64, shard_rows=4, workers=2)
    rejects = {(int(r["row"]), r["image"]): r["reason"] for r in read_csv(tmp_path / "rejects.csv")}
    assert sorted(rejects) == [(2, "corrupt.png"), (4, "gone.png"), (7, "truncated.png"),
                               (9, "truncated.dcm"), (10, "small.png")]
    assert rejects[(4, "gone.png")] == "missing image file"
    assert rejects[(10, "small.png")].startswith("unknown label")
    for row, name in ((2, "corrupt.png"), (7, "truncated.png"), (9, "truncated.dcm")):
        # the reason the manifest check gives when it decodes the image
        assert rejects[(row, name)] == image_problem(str(mixed.parent / name)) != ""
    assert sum(summary.rejected.values()) == 5
    assert summary.rejected["missing image file"] == summary.rejected["unknown label"] == 1
    kept = read_csv(tmp_path / "manifest.csv")
    originals = [member_meta(tmp_path, r["image"])["original_image"] if r["image"] else "-"
                 for r in kept]
    assert originals == ["wide.png", "deep.png", "-", "small.png", "ct.dcm", "small.png"]
    assert kept[2]["text"] == "FINDINGS: Normal heart size." and kept[2]["image"] == ""
    assert member_meta(tmp_path, kept[3]["image"])["original_row"] == 6
    assert [r["image"].split("#")[0] for r in kept if r["image"]] == \
        ["shard-000000.tar"] * 2 + ["shard-000001.tar"] * 2 + ["shard-000002.tar"]
    assert kept[5]["labels"] == "" and kept[5]["negative_labels"] == "Pneumothorax"
    assert member_meta(tmp_path, kept[5]["image"])["negative_labels"] == ["Pneumothorax"]
    assert [r.negatives for r in load_manifest(tmp_path / "manifest.csv")][5] == ("Pneumothorax",)


def test_two_workers_write_the_same_bytes_as_one(corpus, tmp_path):
    one = shard(corpus, tmp_path / "one", size=64, shard_rows=7, workers=1)
    two = shard(corpus, tmp_path / "two", size=64, shard_rows=7, workers=2)
    assert one.written == two.written == one.images
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_member_paths(corpus, tmp_path):
    shard(corpus, tmp_path, size=64, shard_rows=8)
    tar = tmp_path / "shard-000000.tar"
    assert split_shard_path(f"{tar}#000001.png") == (str(tar), "000001.png")
    assert split_shard_path(corpus) is None
    assert image_exists(f"{tar}#000001.png") and image_exists(corpus)
    assert not image_exists(f"{tar}#999999.png")
    assert not image_exists(f"{tmp_path}/shard-000009.tar#000001.png")
    with pytest.raises(FileNotFoundError, match="no member"):
        read_shard_member(f"{tar}#999999.png")
    with pytest.raises(ImageError, match="missing image file"):
        load_image(f"{tar}#999999.png")
    assert read_shard_member(f"{tar}#000001.png")[:8] == b"\x89PNG\r\n\x1a\n"
