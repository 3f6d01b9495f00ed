"""`xlip demo`: synthetic corpus → WordPiece tokenizer → XLIP pre-training → zero-shot table."""

from __future__ import annotations

import json
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


def run_demo(out: Path, overrides: list[str] | None = None, quick: bool = False) -> dict:
    from xlip.api import XLIP
    from xlip.data.manifest import load_manifest
    from xlip.data.synthetic import synthesize
    from xlip.eval.zeroshot import evaluate_zeroshot, markdown_table, write_results
    from xlip.text.sections import select_text
    from xlip.text.tokenizer import train_wordpiece
    from xlip.train.loop import pretrain

    cfg = demo_config(out, overrides or [], quick)  # validate before any work
    t0 = time.perf_counter()
    n_train, n_test = DEMO_SIZES["quick" if quick else "full"]
    manifest = out / "data" / "manifest.csv"
    stamp = out / "data" / "demo.json"
    want = {"n_train": n_train, "n_test": n_test, "seed": 0}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        print(f"[1/4] synthesising {n_train} training + {n_test} test studies → {manifest}")
        synthesize(out / "data", n_train=n_train, n_test=n_test, seed=0, workers=2,
                   progress=True)
        stamp.write_text(json.dumps(want))
    else:
        print(f"[1/4] synthetic corpus already at {manifest}")
    print("[2/4] training a WordPiece tokenizer on the training reports")
    # whole reports (findings + impression) whatever data.text_policy trains on: the vocabulary
    # then also covers the negated phrasing of prompts ("No pleural effusion.")
    texts = [select_text(r.text, "findings_impression")
             for r in load_manifest(manifest, verify_images=False)
             if r.text and r.split == "train"]
    train_wordpiece(texts, out / "tokenizer", vocab_size=2000)
    print(f"[3/4] pre-training XLIP for {cfg.train.steps} steps (batch {cfg.data.batch_size})")
    pretrain(cfg)
    print("[4/4] zero-shot classification on the held-out test split")
    model = XLIP.from_pretrained(out)
    result = evaluate_zeroshot(model.model, model.tokenizer, model.cfg, manifest, "test",
                               cfg.eval.findings)
    result["text_policy"] = cfg.data.text_policy
    result["wall_s"] = time.perf_counter() - t0
    write_results(result, out)
    print(markdown_table(result))
    print(f"demo finished in {result['wall_s'] / 60:.1f} min; outputs in {out}")
    return result
