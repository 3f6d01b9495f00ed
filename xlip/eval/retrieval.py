"""Image–report retrieval: Recall@K and median rank, both directions, over held-out pairs.

Each image's target is its own report, read as training reads it (``data.text_policy``).
Identical reports count as one target, as in the contrastive loss: image→text ranks among the
distinct reports, and text→image counts a report as found at the rank of the first of its
images. A tie with the target counts against it (the rank is 1 + the number of candidates
scoring at least as high), so a model that scores everything alike gets no credit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from xlip.config import Config
from xlip.data.manifest import ManifestError, load_manifest
from xlip.eval.zeroshot import encode_images
from xlip.text.sections import select_text

KS = (1, 5, 10)


def ranks(sim: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (1 = first) of the targets: ``sim`` (images, texts), ``target[i]`` the text of
    image i. Returns (image→text rank per image, text→image rank per text: its best image)."""
    n_img, n_txt = sim.shape
    own = sim[np.arange(n_img), target]
    i2t = (sim >= own[:, None]).sum(1)  # the target itself, and every text scoring as high
    t2i = np.empty(n_txt, dtype=int)
    for j in range(n_txt):
        col, pos = sim[:, j], target == j
        best = col[pos].max()
        # candidates at least as high as the best positive: all negatives >= it, plus itself
        t2i[j] = 1 + int((col[~pos] >= best).sum())
    return i2t, t2i


def summary(r: np.ndarray) -> dict[str, float]:
    out = {f"R@{k}": float(np.mean(r <= k)) for k in KS}
    out["median_rank"] = float(np.median(r))
    return out


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], max_length: int,
                 batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        out.append(model.encode_text(enc["input_ids"], enc["attention_mask"]).float())
    return torch.cat(out)


def evaluate_retrieval(model, tokenizer, cfg: Config, manifest: str | Path,
                       split: str = "test", progress: bool = False) -> dict[str, Any]:
    """Retrieval between the paired rows of ``split`` (an image and a report each)."""
    t0 = time.perf_counter()
    model.eval()
    rows = [(r, select_text(r.text, cfg.data.text_policy))
            for r in load_manifest(manifest, verify_images=False)
            if r.split == split and r.image and r.text]
    rows = [(r, t) for r, t in rows if t.strip()]
    if len(rows) < 2:
        raise ManifestError(f"{manifest}: split {split!r} has {len(rows)} rows with an image "
                            f"and a report ({cfg.data.text_policy}); retrieval needs at least 2")
    texts = list(dict.fromkeys(t for _, t in rows))  # distinct reports, first-seen order
    index = {t: j for j, t in enumerate(texts)}
    target = np.array([index[t] for _, t in rows])
    img = encode_images(model, [r.image for r, _ in rows], cfg.vision.image_size,
                        cfg.eval.batch_size, cfg.pixel_stats(), cfg.train.precision,
                        progress=f"encoding {split}" if progress else "")
    txt = encode_texts(model, tokenizer, texts, cfg.text.max_length)
    sim = (img.float() @ txt.to(img.device).T).cpu().numpy()
    i2t, t2i = ranks(sim, target)
    return {"protocol": "retrieval", "image_to_text": summary(i2t),
            "text_to_image": summary(t2i), "n_images": len(rows), "n_reports": len(texts),
            "manifest": str(manifest), "split": split, "text_policy": cfg.data.text_policy,
            "chance_R@1": {"image_to_text": 1 / len(texts), "text_to_image": 1 / len(rows)},
            "wall_s": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Image–report retrieval", "",
             f"{result['manifest']} split `{result['split']}`: {result['n_images']} images, "
             f"{result['n_reports']} distinct reports ({result['text_policy']}); identical "
             "reports are one target.", "",
             "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
    for name in ("image_to_text", "text_to_image"):
        r = result[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['R@1']:.3f} | {r['R@5']:.3f} | "
                     f"{r['R@10']:.3f} | {r['median_rank']:g} |")
    return "\n".join(lines) + "\n"


def write_retrieval(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    js, md = out_dir / "retrieval.json", out_dir / "retrieval.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(result))
    return js, md
