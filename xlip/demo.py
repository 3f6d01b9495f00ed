"""`xlip demo`: synthetic corpus → WordPiece tokenizer → XLIP pre-training → zero-shot table."""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

import yaml

from xlip.config import from_dict, merge

DEMO_SIZES = {"full": (20000, 1000), "quick": (1500, 300)}


def demo_config(out: Path, overrides: list[str], quick: bool = False):
    data = yaml.safe_load(resources.files("xlip").joinpath("configs/demo.yaml").read_text())
    for src in data["data"]["sources"]:
        src["manifest"] = str(out / src["manifest"])
    data["data"]["eval_manifest"] = str(out / data["data"]["eval_manifest"])
    data["train"]["out_dir"] = str(out)
    data["text"]["tokenizer"] = str(out / "tokenizer")
    if quick:
        data["train"].update(steps=30, warmup_steps=5, log_every=5, ckpt_every=30)
        data["data"]["batch_size"] = 32
    return from_dict(merge(data, overrides))


def prepare_demo_data(out: Path, quick: bool = False) -> Path:
    """The demo's synthetic corpus under ``out/data`` (kept when it is already there) and a
    WordPiece tokenizer under ``out/tokenizer``. Returns the manifest."""
    from xlip.data.manifest import load_manifest
    from xlip.data.synthetic import synthesize
    from xlip.text.sections import select_text
    from xlip.text.tokenizer import train_wordpiece

    n_train, n_test = DEMO_SIZES["quick" if quick else "full"]
    manifest = out / "data" / "manifest.csv"
    stamp = out / "data" / "demo.json"
    want = {"n_train": n_train, "n_test": n_test, "seed": 0}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        print(f"[1/4] synthesising {n_train} training + {n_test} test studies → {manifest}")
        synthesize(out / "data", n_train=n_train, n_test=n_test, seed=0, workers=2,
                   progress=True)
        stamp.write_text(json.dumps(want))
        shutil.rmtree(out / "tokenizer", ignore_errors=True)  # its vocabulary was the old corpus's
    else:
        print(f"[1/4] synthetic corpus already at {manifest}")
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        print("[2/4] training a WordPiece tokenizer on the training reports")
        # whole reports (findings + impression) whatever data.text_policy trains on: the
        # vocabulary then also covers the negated phrasing of prompts ("No pleural effusion.")
        texts = [select_text(r.text, "findings_impression")
                 for r in load_manifest(manifest, verify_images=False)
                 if r.text and r.split == "train"]
        train_wordpiece(texts, out / "tokenizer", vocab_size=2000)
    else:
        print(f"[2/4] tokenizer already at {out / 'tokenizer'}")
    return manifest


def run_demo(out: Path, overrides: list[str] | None = None, quick: bool = False) -> dict:
    from xlip.api import XLIP
    from xlip.eval.zeroshot import (ZeroShotOptions, evaluate_zeroshot, markdown_table,
                                    write_results)
    from xlip.train.loop import pretrain

    cfg = demo_config(out, overrides or [], quick)  # validate before any work
    t0 = time.perf_counter()
    manifest = prepare_demo_data(out, quick)
    print(f"[3/4] pre-training XLIP for {cfg.train.steps} steps (batch {cfg.data.batch_size})")
    pretrain(cfg)
    print("[4/4] zero-shot classification on the held-out test split")
    model = XLIP.from_pretrained(out)
    result = evaluate_zeroshot(model.model, model.tokenizer, model.cfg,
                               ZeroShotOptions(manifest, "test", tuple(cfg.eval.findings)))
    result["text_policy"] = cfg.data.text_policy
    result["wall_s"] = time.perf_counter() - t0
    write_results(result, out)
    print(markdown_table(result))
    if model.model.mae_decoder is not None:
        figures = demo_figures(model, manifest, out / "visualize")
        print("AttMIM figures (scores, mask, reconstruction, phrase attention): "
              + " ".join(str(p) for p in figures))
    print(f"demo finished in {result['wall_s'] / 60:.1f} min; outputs in {out}")
    return result


def demo_figures(model, manifest: Path, out: Path, k: int = 3) -> list[Path]:
    """`xlip visualize` for ``k`` test images with findings; the phrase drawn is the first
    finding of each image's labels."""
    from xlip.eval.visualize import figure, pick_examples
    from xlip.text.prompts import finding_phrase

    paths = []
    for i, rec in enumerate(pick_examples(manifest, "test", k)):
        finding = next(f for f in rec.labels if f != "No Finding")
        paths.append(figure(model.model, model.tokenizer, model.cfg, rec.image, rec,
                            finding_phrase(finding, article=False), i,
                            out / f"{i:02d}_{Path(rec.image).stem}.png"))
    return paths
