"""Pre-resized uint8 images in WebDataset-style tar shards (``xlip data shard``).

Decoding a full-size radiograph (a 2-3k px DICOM or JPG) costs far more than the training
transform that follows, and training pays it once per epoch. :func:`write_shards` decodes every
image of a manifest once, resizes it so that its *shorter* side is ``size`` (aspect kept, PIL
bilinear with antialiasing; an image already that small keeps its own size: upscaling adds bytes,
not information, and training resizes anyway), rounds to uint8 and stores it as a lossless 8-bit
grayscale PNG (zlib level 1: on 256 px radiographs 3x faster to write than level 6 for 15 % more
bytes, and as fast to read). Layout of the output folder::

    shards.json           the plan: manifest (path, sha256, bytes), size, shard_rows, rows, shards
    shard-000000.tar      000001.png, 000001.json, 000002.png, 000002.json, ...
    shard-000000.json     that shard's output-manifest rows and rejected rows
    manifest.csv          every kept row, image = "shard-000000.tar#000001.png" (written last;
                          every column of the source manifest)
    rejects.csv           row, image, reason of every row left out (header only when none)

A member key is the 1-based manifest data row, zero-padded; ``{key}.json`` holds the row's fields,
its original image path, row and shape, so a shard is a self-describing WebDataset shard. Shard k
holds manifest rows ``k*shard_rows + 1 .. (k+1)*shard_rows`` (text-only and rejected rows have no
members, so shards can be short). Rows that the manifest check rejects and images that fail to
decode are listed in ``rejects.csv`` and left out of ``manifest.csv``; the run goes on.

Resuming: a shard and its ``.json`` are written to ``*.tmp`` and renamed into place, the ``.json``
first, so an interrupted run leaves only complete shards. A rerun with the same plan keeps every
shard whose ``.tar`` exists, removes stale ``*.tmp`` files and rebuilds the rest; a different
plan (another manifest, size or shard_rows) is refused. A rerun assumes the source images have not
changed; only the manifest's bytes are checked. One run per folder at a time.

Reading: an image path ``.../shard-000000.tar#000001.png`` names a shard member; reading it
(``load_image``, the manifest check) is :mod:`xlip.data.storage`'s job, this module only writes.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from xlip.data.images import ImageError, load_image
from xlip.data.manifest import (COLUMNS, Record, load_manifest, read_rows, reason_kind,
                                 write_rejects)
from xlip.errors import InputError, XlipError
from xlip.files import atomic_open, atomic_path, write_atomic
from xlip.hashing import file_sha256

FORMAT = 2  # version of the shard layout, part of the plan
PLAN = "shards.json"


class ShardPlanError(XlipError, ValueError):
    """An output folder that holds the shards of a different plan, or files not made by us."""


@dataclass
class ShardSummary:
    """What :func:`write_shards` did."""

    source: Path  # the manifest that was sharded
    out: Path
    size: int
    rows: int = 0  # data rows of the source manifest
    shards: int = 0
    images: int = 0  # image rows in the output manifest
    text_only: int = 0  # rows kept without an image
    written: int = 0  # images decoded and encoded by this run
    skipped_existing_shards: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason kind -> rows

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    def describe(self) -> str:
        lines = [f"{self.rows} rows of {self.source} → {self.shards} shards in {self.out} "
                 f"(shorter side {self.size} px): {self.images} images, "
                 f"{self.text_only} text-only rows",
                 f"this run: {self.written} images written, {self.skipped_existing_shards} of "
                 f"{self.shards} shards already complete (kept)"]
        n = sum(self.rejected.values())
        if n:
            kinds = ", ".join(f"{k} {c}" for k, c in self.rejected.most_common())
            lines.append(f"rejected: {n} rows ({kinds}), listed in {self.out / 'rejects.csv'}")
        else:
            lines.append("rejected: none")
        return "\n".join(lines)


@dataclass(frozen=True)
class _ShardJob:
    """Everything one worker needs for shard ``index`` (picklable, for spawn)."""

    index: int
    out: str
    manifest_dir: str
    size: int
    key_width: int
    records: tuple[Record, ...]  # rows of this shard that the manifest check kept, row order
    rejects: tuple[dict, ...]  # rows of this shard that it rejected: {row, image, reason}


def shard_pixels(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float in [0, 1] → uint8 (h, w) with min(h, w) = size, aspect kept, never upscaled.

    Raises:
        ImageError: not a single grayscale frame (e.g. an RGB or multi-frame DICOM).
    """
    if arr.ndim != 2 or arr.size == 0:
        raise ImageError(f"pixel array of shape {arr.shape}; expected one grayscale frame (H, W)")
    H, W = arr.shape
    if min(H, W) > size:
        h, w = (size, round(W * size / H)) if H <= W else (round(H * size / W), size)
        img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
        arr = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))  # (h, w)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (h, w) → 8-bit grayscale PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_shards(manifest: str | Path, out_dir: str | Path, size: int = 256,
                 shard_rows: int = 1000, workers: int = 2, progress: bool = True, *,
                 overwrite: bool = False) -> ShardSummary:
    """Decode, resize and store every image of ``manifest`` in tar shards under ``out_dir``.

    Args:
        manifest: a CSV/JSONL manifest (see :mod:`xlip.data.manifest`).
        out_dir: the output folder (created); see the module docstring for its layout.
        size: the shorter side in pixels of the stored images (smaller images keep their size).
        shard_rows: manifest rows per shard.
        workers: processes that write shards in parallel (1: in this process).
        progress: show a progress bar of images.
        overwrite: delete this command's files in ``out_dir`` first, instead of resuming.

    Raises:
        ShardPlanError: ``out_dir`` holds shards of another plan, or files this command would
            replace without a ``shards.json``; or ``out_dir/manifest.csv`` is the source.
        ManifestError: the manifest cannot be read.
    """
    for name, value in (("size", size), ("shard_rows", shard_rows), ("workers", workers)):
        if value < 1:
            raise InputError(f"write_shards: {name}={value} must be >= 1")
    manifest, out = Path(manifest).resolve(), Path(out_dir).resolve()
    if out / "manifest.csv" == manifest:
        raise ShardPlanError(f"--out {out} would replace the source manifest {manifest}; "
                             "write the shards to another folder")
    records, rejects = _load(manifest)
    digest, nbytes = file_sha256(manifest), manifest.stat().st_size
    rows = max([r.row for r in records] + [b["row"] for b in rejects], default=0)
    plan = {"format": FORMAT, "manifest": str(manifest), "manifest_sha256": digest,
            "manifest_bytes": nbytes, "size": size, "shard_rows": shard_rows, "rows": rows,
            "shards": -(-rows // shard_rows)}
    _prepare_out(out, plan, overwrite)

    jobs = _jobs(records, rejects, plan, out, manifest.parent)
    pending = [j for j in jobs if not _complete(out, j.index)]
    summary = ShardSummary(manifest, out, size, rows, plan["shards"],
                           skipped_existing_shards=len(jobs) - len(pending))
    summary.written = _run(pending, workers, progress)
    _finish(out, jobs, summary)
    return summary


def _load(manifest: Path) -> tuple[list[Record], list[dict]]:
    """Rows the manifest check keeps, and those it rejects ({row, image, reason})."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rejects.csv"
        records = load_manifest(manifest, verify_images=False, rejects=path, skip_bad=True)
        rejects = []
        if path.is_file():
            with path.open(newline="") as fh:
                rejects = [{"row": int(b["row"]), "image": b["image"], "reason": b["reason"]}
                           for b in csv.DictReader(fh)]
    return records, rejects


def _ours(name: str) -> bool:
    """Whether a file name is one this command writes (with or without ``.tmp``)."""
    name = name.removesuffix(".tmp")
    return name in (PLAN, "manifest.csv", "rejects.csv") or re.fullmatch(
        r"shard-\d+\.(tar|json)", name) is not None


def _prepare_out(out: Path, plan: dict, overwrite: bool) -> None:
    """Check ``out`` against ``plan`` (or clear it), remove stale temporary files, save the plan."""
    ours = sorted(p for p in out.iterdir() if p.is_file() and _ours(p.name)) if out.is_dir() else []
    if overwrite:
        for p in ours:
            p.unlink()
    elif (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        diff = [f"{k} {old.get(k)!r} → {plan[k]!r}" for k in plan if old.get(k) != plan[k]]
        if diff:
            raise ShardPlanError(f"{out} holds shards of another plan ({'; '.join(diff)}); "
                                 "write to a fresh --out folder, or pass --overwrite to replace "
                                 "them")
    elif ours:
        raise ShardPlanError(f"{out} holds {', '.join(p.name for p in ours[:3])} but no {PLAN}, "
                             "so no shards this command can resume; write to a fresh --out "
                             "folder, or pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for p in ours:
        if p.suffix == ".tmp" and p.exists():  # left by an interrupted run
            p.unlink()
    write_atomic(out / PLAN, (json.dumps(plan, indent=2) + "\n").encode(), fsync=True)


def _jobs(records: list[Record], rejects: list[dict], plan: dict, out: Path,
          manifest_dir: Path) -> list[_ShardJob]:
    n, k = plan["shard_rows"], plan["shards"]
    recs: list[list[Record]] = [[] for _ in range(k)]
    bad: list[list[dict]] = [[] for _ in range(k)]
    for r in records:
        recs[(r.row - 1) // n].append(r)
    for b in rejects:
        bad[(b["row"] - 1) // n].append(b)
    width = max(6, len(str(plan["rows"])))
    return [_ShardJob(i, str(out), str(manifest_dir), plan["size"], width, tuple(recs[i]),
                      tuple(bad[i])) for i in range(k)]


def _complete(out: Path, index: int) -> bool:
    tar = out / shard_name(index)
    return tar.is_file() and tar.with_suffix(".json").is_file()


def _run(jobs: list[_ShardJob], workers: int, progress: bool) -> int:
    """Write the shards of ``jobs``; returns the number of images written."""
    from tqdm import tqdm

    total = sum(1 for j in jobs for r in j.records if r.image)
    with tqdm(total=total, desc="shard", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers == 1 or len(jobs) <= 1:
            return sum(_write_shard(j, lambda: bar.update(1)) for j in jobs)
        ctx = multiprocessing.get_context()
        ticks = ctx.Value("q", 0)
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(ticks,))
        try:
            todo = {pool.submit(_pool_write_shard, j) for j in jobs}
            written = 0
            while todo:
                done, todo = wait(todo, timeout=0.25, return_when=FIRST_COMPLETED)
                written += sum(f.result() for f in done)  # re-raises a worker's error
                bar.update(ticks.value - bar.n)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return written


_TICKS = None  # in a worker process: the shared image counter that drives the progress bar


def _init_worker(ticks) -> None:
    global _TICKS
    _TICKS = ticks


def _tick() -> None:
    with _TICKS.get_lock():
        _TICKS.value += 1


def _pool_write_shard(job: _ShardJob) -> int:
    return _write_shard(job, _tick)


def _write_shard(job: _ShardJob, tick: Callable[[], None]) -> int:
    """Write one shard and its ``.json``; returns the number of images written."""
    name = shard_name(job.index)
    tar_path = Path(job.out) / name
    # the .tar is renamed into place last: a .tar on disk means a complete shard and .json
    with atomic_path(tar_path) as tmp:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                rows, rejects, written = _add_members(tar, job, tick)
            fh.flush()
            os.fsync(fh.fileno())
        rejects.sort(key=lambda b: b["row"])
        side = {"shard": name, "rows": rows, "rejects": rejects}
        write_atomic(tar_path.with_suffix(".json"), json.dumps(side, ensure_ascii=False).encode(),
                     fsync=True)
    return written


def _add_members(tar: tarfile.TarFile, job: _ShardJob,
                 tick: Callable[[], None]) -> tuple[list[dict], list[dict], int]:
    """Add the images of ``job``'s rows to ``tar``: (output-manifest rows, rejected rows,
    images written)."""
    rows: list[dict] = []
    rejects = list(job.rejects)
    written = 0
    for rec in job.records:
        row = _manifest_row(rec)
        if rec.image:
            key = f"{rec.row:0{job.key_width}d}"
            try:
                arr = load_image(rec.image)
                png = encode_png(shard_pixels(arr, job.size))
            except ImageError as err:
                rejects.append({"row": rec.row, "image": _rel(rec.image, job),
                                "reason": err.reason})
                tick()
                continue
            _add(tar, f"{key}.png", png)
            _add(tar, f"{key}.json", _member_json(rec, arr.shape, job))
            row["image"] = f"{shard_name(job.index)}#{key}.png"
            written += 1
            tick()
        rows.append(row)
    return rows, rejects, written


def _manifest_row(rec: Record) -> dict:
    return {"image": "", "text": rec.text, "labels": "; ".join(rec.labels), "split": rec.split,
            "patient_id": rec.patient_id, "study_id": rec.study_id, "view": rec.view,
            "source": rec.source, "negative_labels": "; ".join(rec.negatives), "row": rec.row}


def _member_json(rec: Record, shape: tuple[int, ...], job: _ShardJob) -> bytes:
    meta = {"text": rec.text, "labels": list(rec.labels), "split": rec.split,
            "patient_id": rec.patient_id, "study_id": rec.study_id, "view": rec.view,
            "source": rec.source, "negative_labels": list(rec.negatives),
            "original_image": _rel(rec.image, job),
            "original_row": rec.row, "original_shape": list(shape)}
    return json.dumps(meta, ensure_ascii=False).encode()


def _rel(image: str, job: _ShardJob) -> str:
    """The image path relative to the source manifest, as manifests spell it."""
    return Path(os.path.relpath(image, job.manifest_dir)).as_posix()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # uid, gid, owner names empty/0: the bytes depend on data only
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _finish(out: Path, jobs: list[_ShardJob], summary: ShardSummary) -> None:
    """manifest.csv and rejects.csv from every shard's ``.json``; fills ``summary``."""
    rows, rejects = [], []
    for j in jobs:
        side = json.loads((out / shard_name(j.index)).with_suffix(".json").read_text())
        rows += side["rows"]
        rejects += side["rejects"]
    # the source's other columns (an adapter's uncertain_labels, labels_raw, age, ...) come along
    source = read_rows(summary.source)
    extra = [c for c in source[0] if c not in (*COLUMNS, "negative_labels", "image_path")] \
        if source else []
    for r in rows:
        r.update({c: source[r["row"] - 1].get(c, "") for c in extra})
    summary.images = sum(1 for r in rows if r["image"])
    summary.text_only = len(rows) - summary.images
    summary.rejected = Counter(reason_kind(b["reason"]) for b in rejects)
    write_rejects(out / "rejects.csv", rejects)
    # write_manifest without negative_labels would lose it
    with atomic_open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLUMNS, "negative_labels", *extra],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
