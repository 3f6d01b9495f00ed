"""The training step with the clean texts' BERT pass in length groups (what the collator gives
since 2026-12-04: short reports and long label prompts each padded to their own longest)
against the same batches in one call padded to the batch's longest text, side by side in one
process, for CLIP and for the demo's XLIP.

The batches are the demo's (its config and synthetic corpus, built into ``--demo-dir`` when
missing). Each batch runs once grouped and once in one call, in alternating order, on one
model and optimizer (:func:`mlm_length_cut.time_side_by_side`). Reports per variant the median
seconds per step of each, their ratio, each one's FLOPs per step (``xlip.flops``) and the
groups' mean lengths.

    python benchmarks/text_length_groups.py --demo-dir runs/demo \
        --out benchmarks/results/text_length_groups.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlm_length_cut import demo_batches, time_side_by_side  # noqa: E402

VARIANTS = {"clip": ["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0"],
            "xlip": []}


def one_call(batch: dict) -> dict:
    """``batch`` without its length groups: one BERT call over the clean texts."""
    return {k: v for k, v in batch.items() if k not in ("clean_rows", "clean_groups")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", default="runs/demo", help="the demo's corpus and tokenizer")
    ap.add_argument("--batches", type=int, default=26)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    res = {"threads": args.threads}
    for name, overrides in VARIANTS.items():
        cfg, tok, batches = demo_batches(args.demo_dir, args.batches, overrides)
        res[name] = time_side_by_side(cfg, len(tok), batches,
                                      {"grouped": lambda b: b, "one_call": one_call},
                                      args.warmup)
        groups = [b["clean_groups"] for b in batches if "clean_groups" in b]
        res[name]["grouped_batches"] = len(groups)
        res[name]["padded_length"] = statistics.fmean(b["input_ids"].shape[1] for b in batches)
        res[name]["group_lengths"] = [statistics.fmean(g[i][1] for g in groups)
                                      for i in range(2)] if groups else []
        res[name]["group_rows"] = [statistics.fmean(g[i][0] for g in groups)
                                   for i in range(2)] if groups else []
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
