"""The XLIP training step with EntMLM's masked texts cut to their own longest row (what the
collator gives) against the same batches with them padded to the clean texts' length (what it
gave before 2026-12-04), side by side in one process.

The batches are the demo's (its config and synthetic corpus, built into ``--demo-dir`` when
missing): label prompts with four negated findings set the clean texts' padded length, while
the impressions that EntMLM masks are far shorter. Each batch runs once cut and once padded,
in alternating order, on one model and optimizer; the first ``--warmup`` batches are not timed.
Reports the median seconds per step of each, their ratio, and each one's FLOPs per step
(``xlip.flops``).

    python benchmarks/mlm_length_cut.py --demo-dir runs/demo \
        --out benchmarks/results/mlm_length_cut.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F


def padded(batch: dict) -> dict:
    """``batch`` with its masked texts padded to the clean texts' length (ids 0, labels -100)."""
    from xlip.model.xlip import add_mlm_positions

    pad = batch["input_ids"].shape[1] - batch["mlm_input_ids"].shape[1]
    out = dict(batch)
    out["mlm_input_ids"] = F.pad(batch["mlm_input_ids"], (0, pad))
    out["mlm_attention_mask"] = F.pad(batch["mlm_attention_mask"], (0, pad))
    out["mlm_labels"] = F.pad(batch["mlm_labels"], (0, pad), value=-100)
    return add_mlm_positions(out)


def demo_batches(demo_dir: str, n: int, overrides: Sequence[str] = ()) -> tuple[Any, Any, list]:
    """(config, tokenizer, the first ``n`` training batches) of the demo's config and corpus
    (built into ``demo_dir`` when missing), with ``overrides``."""
    from xlip.data.collate import Collator
    from xlip.data.dataset import MixedDataset
    from xlip.demo import demo_config, prepare_demo_data
    from xlip.text.tokenizer import load_tokenizer
    from xlip.train.distributed import DistInfo
    from xlip.train.loop import build_loader, tokenizer_dir

    out = Path(demo_dir)
    prepare_demo_data(out)
    cfg = demo_config(out, ["data.verify_images=false", "data.num_workers=0", *overrides])
    tok = load_tokenizer(tokenizer_dir(cfg))
    dataset = MixedDataset(cfg, train=True)
    loader = build_loader(cfg, dataset, Collator(cfg, tok, train=True,
                                                 findings=dataset.findings()), 0, DistInfo())
    return cfg, tok, [b for _, b in zip(range(n), loader)]


def time_side_by_side(cfg: Any, vocab: int, batches: list, forms: dict[str, Callable],
                      warmup: int) -> dict[str, Any]:
    """Each batch in each of ``forms`` (name → batch → batch), the order alternating between
    batches, on one model and optimizer; the first ``warmup`` batches are not timed. Returns
    per form the median seconds and the mean FLOPs per step (``xlip.flops``), and the ratio
    of the first form to the second. Steps run under the config's ``train.precision``, as in
    training (bf16 on a CPU with AMX or AVX512-BF16 under ``auto``)."""
    from xlip.flops import batch_shape, step_flops
    from xlip.losses import XLIPLoss, total_loss
    from xlip.model.xlip import XLIPModel
    from xlip.precision import autocast, resolve_precision

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model, crit = XLIPModel(cfg, vocab).train(), XLIPLoss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict) -> float:
        t = time.perf_counter()
        with autocast(cfg.train.precision, cpu):  # as the trainer: bf16 where auto means it
            losses = crit(model(batch, generator=torch.Generator().manual_seed(0)), batch)
        total_loss(losses).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {name: [] for name in forms}
    flops: dict[str, list[int]] = {name: [] for name in forms}
    for i, batch in enumerate(batches):
        pairs = [(name, form(batch)) for name, form in forms.items()]
        for name, b in pairs if i % 2 == 0 else pairs[::-1]:
            flops[name].append(step_flops(cfg, batch_shape(b, vocab)).total)
            dt = step(b)
            if i >= warmup:
                times[name].append(dt)
    res: dict[str, Any] = {name: {"s_per_step": statistics.median(t),
                                  "gflop_per_step": statistics.fmean(flops[name]) / 1e9}
                           for name, t in times.items()}
    first, second = list(forms)[:2]
    res["time_ratio"] = res[first]["s_per_step"] / res[second]["s_per_step"]
    res["flop_ratio"] = res[first]["gflop_per_step"] / res[second]["gflop_per_step"]
    res["timed_batches"] = len(times[first])
    res["precision"] = resolve_precision(cfg.train.precision, cpu)
    return res


def parse_args(doc: str) -> argparse.Namespace:
    """The side-by-side step benchmarks' command line (their docstring's first paragraph as the
    description); sets torch's thread count."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--demo-dir", default="runs/demo", help="the demo's corpus and tokenizer")
    ap.add_argument("--batches", type=int, default=26)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def report(res: dict[str, Any], out: str | None) -> None:
    """Print the figures as JSON, and write them to ``out`` if given."""
    print(json.dumps(res, indent=1))
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    args = parse_args(__doc__)
    cfg, tok, batches = demo_batches(args.demo_dir, args.batches)
    res = time_side_by_side(cfg, len(tok), batches, {"cut": lambda b: b, "padded": padded},
                            args.warmup)
    res["clean_length"] = statistics.fmean(b["input_ids"].shape[1] for b in batches)
    res["masked_length"] = statistics.fmean(b["mlm_input_ids"].shape[1] for b in batches)
    res["threads"] = args.threads
    report(res, args.out)


if __name__ == "__main__":
    main()
