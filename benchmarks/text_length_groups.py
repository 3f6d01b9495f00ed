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

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlm_length_cut import demo_batches, parse_args, report, time_side_by_side  # noqa: E402

from xlip.ablate import CLIP  # noqa: E402

VARIANTS = {"clip": CLIP, "xlip": []}


def one_call(batch: dict) -> dict:
    """``batch`` without its length groups: one BERT call over the clean texts."""
    return {k: v for k, v in batch.items() if k not in ("clean_rows", "clean_groups")}


def main() -> None:
    args = parse_args(__doc__)
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
    report(res, args.out)


if __name__ == "__main__":
    main()
