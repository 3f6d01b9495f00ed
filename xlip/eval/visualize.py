"""What AttMIM sees: per image, the patch scores its report (or label prompt) gives, the mask
drawn from them, the MAE reconstruction, and the text-to-patch attention of a phrase.

The scores are the model's own (:meth:`MultimodalDecoder.patch_scores`, the first cross-attention
layer of the multimodal decoder over the unmasked text); the mask is drawn exactly as in
training (``mim.ratio``, ``mim.high_share``, a fixed seed); the reconstruction shows visible
patches as they are and masked ones as the decoder predicts them, each predicted patch mapped
back from its normalised pixels with the true patch's mean and spread (as MAE's figures do).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from xlip.config import Config
from xlip.data.collate import Collator, Sample
from xlip.data.images import prepare_image
from xlip.data.manifest import Record, load_manifest
from xlip.errors import XlipError
from xlip.masking import attention_masking, random_masking
from xlip.model.vision import patchify, unpatchify
from xlip.text.sections import select_text


class VisualizeError(XlipError, ValueError):
    """A model or input that cannot be visualised as asked."""


@dataclass
class Views:
    """Everything one figure shows; maps are (grid, grid) arrays, images (H, W)."""

    image: np.ndarray
    text: str  # the report or prompt that guided the masking
    guide_words: list[str]
    fallback: bool  # no finding present: every content token guided
    scores: np.ndarray | None
    mask: np.ndarray  # 1 = masked patch
    reconstruction: np.ndarray | None
    phrase: str
    phrase_map: np.ndarray | None


def guide_text(record: Record | None, cfg: Config) -> tuple[str, str, tuple[str, ...]]:
    """(kind, report text, labels) of a manifest row; an image outside the manifest is
    image-only with no labels (its prompt is the no-finding sentence)."""
    if record is None:
        return "image_only", "", ()
    if record.kind == "paired":
        return "paired", select_text(record.text, cfg.data.text_policy), record.labels
    return "image_only", "", record.labels


@torch.no_grad()
def compute_views(model, tokenizer, cfg: Config, image_path: str, record: Record | None,
                  phrase: str = "", seed: int = 0) -> Views:
    if model.mae_decoder is None:
        raise VisualizeError("this model was trained without MIM (mim.policy=none): it has no "
                             "mask or reconstruction to show")
    if phrase and model.mm_decoder is None:
        raise VisualizeError(f"--text {phrase!r}: this model has no multimodal decoder "
                             "(mlm.policy=none), so no text-to-patch attention to show")
    model.eval()
    image = prepare_image(image_path, cfg.vision.image_size, stats=cfg.pixel_stats())
    kind, text, labels = guide_text(record, cfg)
    sample = Sample(0, kind, text, labels, image, seed)
    batch = Collator(cfg, tokenizer, train=False)([sample])
    images = batch["images"]
    txt = model.text(batch["input_ids"], batch["attention_mask"])
    gen = torch.Generator().manual_seed(seed)
    scores = None
    # the full pass: AttMIM's scores, the phrase map, or MIM's kept tokens (mim.mask_at=tokens)
    need_full = cfg.mim.policy == "attention" or phrase or cfg.mim.mask_at == "tokens"
    full = model.vision(images) if need_full else None
    if cfg.mim.policy == "attention":
        scores = model.mm_decoder.patch_scores(txt["tokens"], batch["attention_mask"].bool(),
                                               batch["guide_mask"], full["tokens"])
        keep, mask, restore = attention_masking(scores, cfg.mim.ratio, cfg.mim.high_share, gen)
    else:
        keep, mask, restore = random_masking(1, model.vision.num_patches, cfg.mim.ratio, gen)
    recon = None  # mim.target=features predicts encoder features: no pixels to show
    if cfg.mim.target == "pixels":
        visible = model.mim_visible(images, keep, full)["tokens"]
        pred = model.mae_decoder(visible, restore, txt["tokens"], batch["guide_mask"])  # (1,N,P)
        recon = reconstruction(images, pred.float(), mask, cfg.vision.patch_size)
    words = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["guide_mask"][0]])
    phrase_map = None
    if phrase and model.mm_decoder is not None:
        enc = tokenizer([phrase], truncation=True, max_length=cfg.text.max_length,
                        return_tensors="pt")
        special = torch.tensor([[i in tokenizer.all_special_ids for i in enc["input_ids"][0]]])
        ptxt = model.text(enc["input_ids"], enc["attention_mask"])["tokens"]
        phrase_map = grid(model.mm_decoder.patch_scores(
            ptxt, enc["attention_mask"].bool(), ~special, full["tokens"]), cfg)
    g = cfg.vision.grid
    return Views(image=image[0].numpy(), text=tokenizer.decode(batch["input_ids"][0],
                                                               skip_special_tokens=True),
                 guide_words=words, fallback=bool(batch["guide_fallback"][0]),
                 scores=None if scores is None else grid(scores, cfg),
                 mask=mask[0].reshape(g, g).numpy(), reconstruction=recon,
                 phrase=phrase, phrase_map=phrase_map)


def grid(scores: torch.Tensor, cfg: Config) -> np.ndarray:
    g = cfg.vision.grid
    return scores[0].float().reshape(g, g).cpu().numpy()


def reconstruction(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                   p: int) -> np.ndarray:
    """Visible patches from the image, masked ones from ``pred`` (normalised per patch, mapped
    back with the true patch's mean and std). Returns (H, W)."""
    true = patchify(images, p).flatten(2).float()  # (1, N, P)
    mean, std = true.mean(-1, keepdim=True), (true.var(-1, keepdim=True) + 1e-6).sqrt()
    out = torch.where(mask[:, :, None].bool(), pred * std + mean, true)
    return unpatchify(out, p)[0, 0].numpy()


def render(views: Views, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", views.image, None)]
    if views.scores is not None:
        panels.append(("AttMIM scores", views.image, views.scores))
    masked = np.kron(views.mask, np.ones((views.image.shape[0] // views.mask.shape[0],) * 2))
    panels.append(("mask (dark = masked)", np.where(masked > 0, views.image.min(),
                                                    views.image), None))
    if views.reconstruction is not None:
        panels.append(("reconstruction", views.reconstruction, None))
    if views.phrase_map is not None:
        panels.append((f"\u201c{views.phrase}\u201d", views.image, views.phrase_map))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.6))
    lo, hi = np.percentile(views.image, [1, 99])
    for ax, (name, img, heat) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        if heat is not None:
            h, w = img.shape
            ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, w, h, 0),
                      interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    guide = " ".join(views.guide_words) + (" (no finding present: all words)"
                                           if views.fallback else "")
    text = views.text if len(views.text) < 150 else views.text[:147] + "..."
    fig.suptitle(f"{title}\n{text}\nguide: {guide}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def visualize(model, tokenizer, cfg: Config, images: Sequence[str], out: Path,
              manifest: str | Path | None = None, phrase: str = "", seed: int = 0) -> list[Path]:
    """One PNG per image in ``out``. With ``manifest``, an image's row there gives the report
    (or, for an image-only row, the label prompt) that guides the masking."""
    rows: dict[str, Record] = {}
    if manifest:
        rows = {str(Path(r.image).resolve()): r
                for r in load_manifest(manifest, verify_images=False) if r.image}
    paths = []
    for i, image in enumerate(images):
        # a shard member (shard-000001.tar#000042.png) is looked for as its tar
        if not (Path(image).is_file() or Path(str(image).split("#", 1)[0]).is_file()):
            raise VisualizeError(f"{image}: no such image file")
        record = rows.get(str(Path(image).resolve()))
        paths.append(figure(model, tokenizer, cfg, str(image), record, phrase, seed + i,
                            out / f"{i:02d}_{Path(image).stem}.png"))
    return paths


def figure(model, tokenizer, cfg: Config, image: str, record: Record | None, phrase: str,
           seed: int, path: Path) -> Path:
    """One image's PNG at ``path``."""
    views = compute_views(model, tokenizer, cfg, image, record, phrase, seed)
    labels = ", ".join(record.labels) if record else "not in the manifest"
    return render(views, path, f"{Path(image).name}: {labels}")


def pick_examples(manifest: str | Path, split: str, k: int = 3,
                  seed: int = 0) -> list[Record]:
    """``k`` paired rows of ``split`` with at least one finding, drawn with ``seed``."""
    rows = [r for r in load_manifest(manifest, verify_images=False)
            if r.split == split and r.kind == "paired" and set(r.labels) - {"No Finding"}]
    return random.Random(seed).sample(rows, min(k, len(rows)))
