"""Where AttMIM masks: on the synthetic corpus, how often the patches of a nodule or a mass are
masked when the image's report guides the masking.

The generator knows each lesion's pixel centre and diameter (``synth.json`` beside the manifest
says how the corpus was drawn), so the lesion's patches are known exactly. With random masking
a lesion patch is masked with probability ``mim.ratio``; a scorer that follows the report's
"nodule in the left mid lung" masks it far more often.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xlip.config import Config
from xlip.data.collate import Collator, Sample
from xlip.data.images import prepare_image
from xlip.data.manifest import Record, load_manifest
from xlip.data.synthetic import SynthConfig, study
from xlip.errors import InputError
from xlip.masking import attention_masking
from xlip.text.sections import select_text

LESIONS = ("Nodule", "Mass")


def lesion_patches(center_px: tuple[float, float], diameter_px: float, source_size: int,
                   image_size: int, patch: int) -> list[int]:
    """Grid indices (row-major) of the patches a circular lesion touches, at the model's size."""
    scale = image_size / source_size
    cx, cy, r = center_px[0] * scale, center_px[1] * scale, diameter_px * scale / 2
    g = image_size // patch
    cells = []
    for i in range(g):
        for j in range(g):
            dx = max(j * patch - cx, 0.0, cx - (j + 1) * patch)
            dy = max(i * patch - cy, 0.0, cy - (i + 1) * patch)
            if dx * dx + dy * dy <= r * r:
                cells.append(i * g + j)
    return cells


@torch.no_grad()
def lesion_mask_share(model, tokenizer, cfg: Config, manifest: str | Path, split: str = "test",
                      limit: int = 100, draws: int = 20) -> dict:
    """Mean share of lesion patches that AttMIM masks, over up to ``limit`` images of ``split``
    with exactly one nodule or mass and ``draws`` masks each, with the mean rank of the lesion
    patches among all patches by score (0 = the top)."""
    meta_path = Path(manifest).parent / "synth.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not a synthetic corpus (the lesion positions "
                                "come from the generator)")
    meta = json.loads(meta_path.read_text())
    synth = SynthConfig(**meta["config"])
    model.eval()
    g, p, size = cfg.vision.grid, cfg.vision.patch_size, cfg.vision.image_size
    shares, ranks, kinds = [], [], []
    for rec in load_manifest(manifest, verify_images=False):
        if len(shares) >= limit:
            break
        if rec.split != split or rec.kind != "paired" or not set(LESIONS) & set(rec.labels):
            continue
        _, findings, _ = study(meta["seed"], split, int(Path(rec.image).stem), synth)
        lesions = [(k, a) for k, a in findings.items() if k in LESIONS]
        if len(lesions) != 1:
            continue
        kind, attrs = lesions[0]
        cells = lesion_patches(attrs["center_px"], attrs["diameter_px"], synth.size, size, p)
        scores = patch_scores_for(model, tokenizer, cfg, rec)
        rank = scores.argsort(descending=True).argsort().float() / (g * g - 1)
        ranks.append(float(rank[cells].mean()))
        masked = [float(attention_masking(scores[None], cfg.mim.ratio, cfg.mim.high_share,
                                          torch.Generator().manual_seed(s))[1][0, cells].mean())
                  for s in range(draws)]
        shares.append(float(np.mean(masked)))
        kinds.append(kind)
    if not shares:
        raise InputError(f"{manifest}: no {split} image with exactly one nodule or mass")
    kinds_arr, shares_arr = np.array(kinds), np.array(shares)
    return {"images": len(shares), "mask_ratio": cfg.mim.ratio,
            "masked_share": float(shares_arr.mean()),
            "per_kind": {k: float(shares_arr[kinds_arr == k].mean())
                         for k in LESIONS if (kinds_arr == k).any()},
            "lesion_rank": float(np.mean(ranks))}


def patch_scores_for(model, tokenizer, cfg: Config, rec: Record) -> torch.Tensor:
    """(N,) AttMIM scores of one paired row, as in training (eval-mode encoders)."""
    image = prepare_image(rec.image, cfg.vision.image_size, stats=cfg.pixel_stats())
    text = select_text(rec.text, cfg.data.text_policy)
    batch = Collator(cfg, tokenizer, train=False)([Sample(0, "paired", text, rec.labels,
                                                          image, 0)])
    txt = model.text(batch["input_ids"], batch["attention_mask"])
    full = model.vision(batch["images"])
    return model.mm_decoder.patch_scores(txt["tokens"], batch["attention_mask"].bool(),
                                         batch["guide_mask"], full["tokens"])[0]
