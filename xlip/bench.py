"""`xlip bench`: side-by-side ratios of training-step variants, measured in one run.

Each variant trains the same model on the same random batch; the report gives seconds per step
and the ratio to the first variant. Wall-clock figures belong here, never in tests.
``train.precision`` means what it means in training (``auto`` included; see
:mod:`xlip.precision`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from xlip.config import Config, from_dict, merge
from xlip.losses import XLIPLoss
from xlip.model.xlip import XLIPModel
from xlip.precision import autocast, resolve_precision
from xlip.text.labels import CANONICAL_FINDINGS

CPU = torch.device("cpu")  # the bench runs on CPU
VARIANTS = {
    "attention": [["vision.attn_impl=explicit"], ["vision.attn_impl=sdpa"]],
    "precision": [["train.precision=fp32"], ["train.precision=bf16"]],
    "tasks": [[], ["mim.policy=random"], ["mim.policy=none", "loss.w_mim=0"],
              ["mim.policy=none", "loss.w_mim=0", "mlm.policy=none", "loss.w_mlm=0"]],
}


def synthetic_batch(cfg: Config, batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:length // 4] = ids[:, 1:length // 4]
    s = cfg.vision.image_size
    return {"images": torch.randn(batch, cfg.vision.in_chans, s, s, generator=g),
            "has_image": torch.ones(batch, dtype=torch.bool), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "text_key": torch.arange(batch),
            "guide_mask": torch.ones_like(ids, dtype=torch.bool),
            "guide_fallback": torch.zeros(batch, dtype=torch.bool),
            "labels": torch.zeros(batch, len(CANONICAL_FINDINGS)),
            "source": torch.zeros(batch, dtype=torch.long), "mlm_rows": torch.arange(batch),
            "mlm_input_ids": ids, "mlm_attention_mask": torch.ones_like(ids),
            "mlm_labels": labels}


def time_steps(cfg: Config, batch: dict, steps: int, warmup: int = 1) -> float:
    torch.manual_seed(0)
    model = XLIPModel(cfg, 2000)
    crit = XLIPLoss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with autocast(cfg.train.precision, CPU):
            losses = crit(model(batch), batch)
        sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


def run_bench(base: dict, group: str, batch_size: int, steps: int, length: int = 64,
              out: Path | None = None) -> list[dict]:
    torch.set_flush_denormal(True)
    rows = []
    for overrides in VARIANTS[group]:
        cfg = from_dict(merge(base, overrides))
        batch = synthetic_batch(cfg, batch_size, length, 2000)
        sec = time_steps(cfg, batch, steps)
        rows.append({"variant": " ".join(overrides) or "default",
                     "precision": resolve_precision(cfg.train.precision, CPU), "s_per_step": sec,
                     "samples_per_s": batch_size / sec})
    for r in rows:
        r["ratio_to_first"] = r["s_per_step"] / rows[0]["s_per_step"]
    if out:
        out.write_text(json.dumps(rows, indent=2))
    return rows
