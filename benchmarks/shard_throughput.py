"""Image loading from raw files versus tar shards (``xlip data shard``), side by side in one run.

Images per second for ONE worker process (the data loader's workers scale it), on a real image
set (default: ``../shared/data/nih_cxr14_starter``; ``XLIP_SHARED_DATA`` moves ``../shared/data``):

    raw decode    load_image + resize (shorter side --size) + uint8: what sharding does once
    raw train     prepare_image(raw file, --image-size): what the training loader does per draw
    shard train   read the shard member + PNG decode + the same transform (resize, normalise)
    write_shards  sharding end to end, 1 worker: decode, resize, PNG encode, tar write

The ratio ``shard train / raw train`` is the speed-up of the training loader from sharding. Every
path is timed ``--repeat`` times, interleaved, after one warm-up pass (files in the page cache);
the best pass counts. ``--dicom N`` adds a second table for N rows of a real 1024 px DICOM.

Streaming (``--stream-rows N``, 0 skips it): does the streaming loader keep up with training?
On a synthetic corpus of N training studies (128 px, as ``xlip demo``), sharded, at the demo
config (``xlip/configs/demo.yaml``: batch 64, 64 px, hybrid stem, AttMIM + EntMLM), in one run:

    loader        ShardStream + Collator through a DataLoader with --stream-workers workers
                  (shard reads, PNG decode, augmentation, prompts, NER guide, MLM masking)
    step          one optimisation step (forward, loss, backward, AdamW) on a collated batch
    step + loader the steps fed by that loader, and the share of time spent waiting for it

samples/s of each, side by side; ``loader / step`` >= 1 means the loader keeps up (given cores
for its workers besides the step's). ``--stream-preset base`` runs the same at the sizes of
``xlip bench --preset base`` (ViT-B/16 at 224 px, BERT-base, the default decoders, batch 8,
64 tokens) over the same shards (stored at 256 px, decoded and resized to 224 per draw).

    python benchmarks/shard_throughput.py [--manifest PATH] [--size 256] [--image-size 224]
        [--limit N] [--repeat 3] [--dicom 20] [--stream-rows 512] [--stream-workers 1]
        [--stream-batches 10] [--steps 4] [--stream-preset demo|base] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from xlip.data.images import load_image, normalize, prepare_image, resize  # noqa: E402
from xlip.data.manifest import Record, load_manifest, write_manifest  # noqa: E402
from xlip.data.shards import shard_pixels, write_shards  # noqa: E402
from xlip.data.storage import read_shard_member  # noqa: E402
from xlip.data.stream import ShardStream  # noqa: E402

SHARED_DATA = Path(os.environ.get("XLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_MANIFEST = SHARED_DATA / "nih_cxr14_starter" / "manifest.csv"
DEFAULT_DICOM = SHARED_DATA / "formats" / "dicom" / "siim_sample.dcm"


def raw_decode(path: str, size: int) -> np.ndarray:
    return shard_pixels(load_image(path), size)


def shard_train(path: str, image_size: int) -> torch.Tensor:
    """prepare_image(path, image_size) for a shard member, spelled out (no loader patch needed)."""
    with Image.open(io.BytesIO(read_shard_member(path))) as im:
        arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = resize(arr, image_size)
    return torch.from_numpy(np.ascontiguousarray(normalize(arr), dtype=np.float32))[None]


def subset_manifest(records: list[Record], path: Path) -> Path:
    """The records as a manifest with absolute image paths."""
    write_manifest(path, [{"image": r.image, "text": r.text, "labels": "; ".join(r.labels),
                           "split": r.split, "source": r.source} for r in records])
    return path


def measure(records: list[Record], size: int, image_size: int, repeat: int, tmp: Path) -> dict:
    """images/s per worker of each path, on these records (image rows)."""
    manifest = subset_manifest(records, tmp / "bench.csv")
    raw_decode(records[0].image, size)  # lazy imports (pydicom) out of the timing
    start = time.perf_counter()
    summary = write_shards(manifest, tmp / "shards", size=size, shard_rows=1000, workers=1,
                           progress=False, overwrite=True)
    shard_s = time.perf_counter() - start
    shard_paths = _member_paths(summary.manifest)
    raw_paths = [r.image for r in records]
    assert len(shard_paths) == len(raw_paths), summary.describe()
    paths = {
        "raw decode": lambda: [raw_decode(p, size) for p in raw_paths],
        "raw train": lambda: [prepare_image(p, image_size) for p in raw_paths],
        "shard train": lambda: [shard_train(p, image_size) for p in shard_paths],
    }
    for run in paths.values():  # warm-up: page cache, lazy imports, the shard index
        run()
    best = {name: float("inf") for name in paths}
    for _ in range(repeat):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    n = len(raw_paths)
    diff = torch.stack([(prepare_image(a, image_size) - shard_train(b, image_size)).abs()
                        for a, b in list(zip(raw_paths, shard_paths))[:20]])  # (n, 1, S, S)
    raw_bytes = sum(os.path.getsize(p) for p in raw_paths)
    shard_bytes = sum(p.stat().st_size for p in (tmp / "shards").glob("shard-*.tar"))
    return {"images": n, "per_worker_images_per_s": {**{k: n / v for k, v in best.items()},
                                                     "write_shards": n / shard_s},
            "ratio_shard_to_raw_train": best["raw train"] / best["shard train"],
            "tensor_diff_first_20": {"max": float(diff.max()), "mean": float(diff.mean())},
            "kib_per_image": {"raw": raw_bytes / n / 1024, "shard": shard_bytes / n / 1024}}


def _member_paths(manifest: Path) -> list[str]:
    """Absolute shard-member paths of a shard manifest (read as CSV: no loader patch needed)."""
    with manifest.open(newline="") as fh:
        return [str(manifest.parent / r["image"]) for r in csv.DictReader(fh) if r["image"]]


def table(title: str, res: dict, size: int, image_size: int) -> str:
    r = res["per_worker_images_per_s"]
    rows = [("raw decode", f"raw: load_image + resize to {size} (shorter side) + uint8"),
            ("raw train", f"raw: prepare_image at {image_size} px (training load today)"),
            ("shard train", f"shard: read member + PNG decode + same transform at {image_size} px"),
            ("write_shards", "write_shards, 1 worker (decode, resize, PNG encode, tar)")]
    lines = [f"### {title}: {res['images']} images", "",
             "| path | images/s per worker | ms/image |", "|---|---|---|"]
    lines += [f"| {label} | {r[k]:.0f} | {1000 / r[k]:.2f} |" for k, label in rows]
    kib = res["kib_per_image"]
    lines += ["", f"shard / raw training-load ratio: **{res['ratio_shard_to_raw_train']:.2f}x**; "
              f"|raw - shard| training tensors (first 20 images, unit-variance scale): "
              f"max {res['tensor_diff_first_20']['max']:.2g}, "
              f"mean {res['tensor_diff_first_20']['mean']:.2g}; "
              f"KiB per image: raw {kib['raw']:.1f}, shard {kib['shard']:.1f}"]
    return "\n".join(lines)


def demo_stream_config(tmp: Path, rows: int, workers: int):
    """The demo config over shards of a fresh synthetic corpus of ``rows`` training studies,
    and its tokenizer."""
    from xlip.data.synthetic import synthesize
    from xlip.demo import demo_config
    from xlip.text.sections import select_text
    from xlip.text.tokenizer import load_tokenizer, train_wordpiece

    manifest = synthesize(tmp / "data", n_train=rows, n_test=8, seed=0, workers=2)
    texts = [select_text(r.text, "findings_impression")
             for r in load_manifest(manifest, verify_images=False) if r.text]
    train_wordpiece(texts, tmp / "tokenizer", vocab_size=2000)
    write_shards(manifest, tmp / "shards", size=256, shard_rows=100, workers=2, progress=False)
    cfg = demo_config(tmp, [f"data.num_workers={workers}"])
    for src in cfg.data.sources:
        src.manifest, src.shards = "", str(tmp / "shards")
    return cfg.validate(), load_tokenizer(str(tmp / "tokenizer"))


def at_preset(cfg, preset: str):
    """``cfg`` with the model sizes, batch and text length of an ``xlip bench`` preset (the
    demo's own sizes for ``demo``)."""
    if preset == "demo":
        return cfg
    from xlip.bench import PRESETS
    from xlip.config import Config, from_dict

    pre, d, default = PRESETS[preset], cfg.to_dict(), Config().to_dict()
    for section in ("vision", "text", "model"):  # the preset on the defaults, not the demo's
        d[section] = {**default[section], **pre.config.get(section, {})}
    d["data"]["batch_size"], d["text"]["max_length"] = pre.batch, pre.length
    return from_dict(d).validate()


def measure_stream(rows: int, workers: int, batches: int, steps: int, tmp: Path,
                   preset: str = "demo") -> dict:
    """samples/s of the streaming loader, of the training step, and of the two together."""
    from torch.utils.data import DataLoader

    from xlip.data.collate import Collator
    from xlip.losses import XLIPLoss
    from xlip.model.xlip import XLIPModel
    from xlip.optim import TrainSteps, adamw
    from xlip.precision import resolve_precision

    cfg, tok = demo_stream_config(tmp, rows, workers)
    cfg = at_preset(cfg, preset)
    B = cfg.data.batch_size

    def loader(n: int):
        stream = ShardStream(cfg, stop=n)
        collate = Collator(cfg, tok, train=True, findings=stream.findings())
        return iter(DataLoader(stream, batch_size=None, collate_fn=collate, num_workers=workers,
                               prefetch_factor=4 if workers else None))

    batches_it = loader(batches + 1)
    first = next(batches_it)  # worker start-up and shard indexing out of the timing
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_it)
    loader_s = time.perf_counter() - start

    torch.manual_seed(0)
    model = XLIPModel(cfg, len(tok))
    opt, sched = adamw(model, cfg)
    criterion = XLIPLoss(cfg)

    def forward(batch, step, micro):
        out = model(batch, generator=torch.Generator().manual_seed(step))
        return criterion(out, batch), out

    waited = [0.0]

    def timed(it):
        while True:
            t = time.perf_counter()
            batch = next(it)
            waited[0] += time.perf_counter() - t
            yield batch

    train = TrainSteps(model, opt, sched, forward, torch.device("cpu"), cfg.train.precision,
                       clip_grad=cfg.train.clip_grad)
    train.run(iter([first] * 2), 0, 2)  # warm-up
    start = time.perf_counter()
    train.run(iter([first] * steps), 2, 2 + steps)
    step_s = time.perf_counter() - start
    fed = loader(steps + 1)
    next(fed)
    waited[0] = 0.0
    start = time.perf_counter()
    train.run(timed(fed), 2 + steps, 2 + 2 * steps)
    both_s = time.perf_counter() - start
    loader_sps, step_sps = batches * B / loader_s, steps * B / step_s
    return {"preset": preset, "rows": rows, "batch_size": B,
            "image_size": cfg.vision.image_size,
            "precision": resolve_precision(cfg.train.precision, torch.device("cpu")),
            "workers": workers, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "loader_batches": batches, "steps": steps,
            "samples_per_s": {"loader": loader_sps, "step": step_sps,
                              "step_fed_by_loader": steps * B / both_s},
            "loader_over_step": loader_sps / step_sps,
            "loader_wait_share": waited[0] / both_s}


def _sps(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def stream_table(res: dict) -> str:
    r = res["samples_per_s"]
    w = res["workers"]
    what = ("demo config" if res.get("preset", "demo") == "demo"
            else f"`xlip bench` preset {res['preset']}")
    lines = [f"### streaming loader vs training step: {what}, batch {res['batch_size']}, "
             f"{res['image_size']} px, {res['precision']}, {res['cpu_count']} CPU cores", "",
             "| what | samples/s |", "|---|---|",
             f"| loader: ShardStream + Collator, {w} DataLoader worker{'s' * (w != 1)} | "
             f"{_sps(r['loader'])} |",
             f"| training step ({res['torch_threads']} torch threads), batch repeated | "
             f"{_sps(r['step'])} |",
             f"| training steps fed by the loader | {_sps(r['step_fed_by_loader'])} |", "",
             f"loader / step: **{res['loader_over_step']:.2f}x**; time the fed steps waited "
             f"for the loader: {100 * res['loader_wait_share']:.0f} %"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--size", type=int, default=256, help="shorter side stored in the shards")
    ap.add_argument("--image-size", type=int, default=224, help="the training image size")
    ap.add_argument("--limit", type=int, default=0, help="use the first N image rows (0: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dicom", type=int, default=20,
                    help=f"also time N rows of {DEFAULT_DICOM.name} (0: skip)")
    ap.add_argument("--stream-rows", type=int, default=512,
                    help="streaming table: synthetic training studies (0: skip)")
    ap.add_argument("--stream-workers", type=int, default=1,
                    help="DataLoader workers of the streaming loader (the demo's 1)")
    ap.add_argument("--stream-batches", type=int, default=10, help="loader batches timed")
    ap.add_argument("--steps", type=int, default=4, help="training steps timed")
    ap.add_argument("--stream-preset", choices=("demo", "base"), default="demo",
                    help="model sizes of the streaming table: the demo's, or xlip bench's base")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    raw = Path(args.manifest).is_file()
    if not raw:
        print(f"{args.manifest} not found (the shared image set; set XLIP_SHARED_DATA or pass "
              "--manifest): raw / shard tables skipped", file=sys.stderr)
        if not args.stream_rows:
            return 2
    threads = torch.get_num_threads()
    results, stream = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        if args.stream_rows:
            stream = measure_stream(args.stream_rows, args.stream_workers, args.stream_batches,
                                    args.steps, Path(tmp) / "stream", args.stream_preset)
        torch.set_num_threads(1)  # one data-loader worker
        records = [r for r in load_manifest(args.manifest, verify_images=False, skip_bad=True)
                   if r.image] if raw else []
        records = records[:args.limit or None]
        if raw:
            results[Path(args.manifest).parent.name] = measure(
                records, args.size, args.image_size, args.repeat, Path(tmp))
        if raw and args.dicom:
            if not DEFAULT_DICOM.is_file():
                print(f"{DEFAULT_DICOM} not found: DICOM table skipped", file=sys.stderr)
            else:
                dcm = [Record(i + 1, str(DEFAULT_DICOM), "", ("No Finding",), "train", "", "",
                              "", "dicom") for i in range(args.dicom)]
                results[DEFAULT_DICOM.name] = measure(dcm, args.size, args.image_size,
                                                      args.repeat, Path(tmp))
    torch.set_num_threads(threads)
    for title, res in results.items():
        print(table(title, res, args.size, args.image_size) + "\n")
    if stream is not None:
        results["stream"] = stream
        print(stream_table(stream) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
