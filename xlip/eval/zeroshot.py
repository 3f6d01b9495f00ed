"""Zero-shot classification: per finding, a positive and a negative prompt set; an image's score
is the softmax probability of the positive set. AUC, F1 and ACC with bootstrap 95% CIs."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xlip.config import Config
from xlip.data.images import prepare_image
from xlip.data.manifest import ManifestError, Record, load_manifest
from xlip.errors import InputError
from xlip.eval.metrics import auc, bootstrap_ci, bootstrap_mean_ci, f1_acc
from xlip.precision import autocast
from xlip.text.prompts import zeroshot_prompts


@torch.no_grad()
def class_embeddings(model, tokenizer, findings: Sequence[str],
                     max_length: int) -> tuple[torch.Tensor, dict[str, dict[str, list[str]]]]:
    """(F, 2, E): for each finding the mean unit embedding of its positive and negative prompts."""
    device = next(model.parameters()).device
    out, used = [], {}
    for f in findings:
        pos, neg = zeroshot_prompts(f)
        used[f] = {"positive": list(pos), "negative": list(neg)}
        pair = []
        for prompts in (pos, neg):
            enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            e = model.encode_text(enc["input_ids"], enc["attention_mask"]).mean(dim=0)
            pair.append(F.normalize(e, dim=-1))
        out.append(torch.stack(pair))
    return torch.stack(out), used


@torch.no_grad()
def encode_images(model, paths: Sequence[str], size: int, batch_size: int = 128,
                  stats: tuple[float, float] | None = None,
                  precision: str = "auto") -> torch.Tensor:
    """(B, E) embeddings of image files; ``stats``: the model's dataset normalisation;
    ``precision``: the model's ``train.precision`` (auto | bf16 | fp32)."""
    device = next(model.parameters()).device
    embs = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([prepare_image(p, size, stats=stats)
                         for p in paths[i:i + batch_size]]).to(device)
        embs.append(encode_tensor(model, x, precision))
    return torch.cat(embs)


@torch.no_grad()
def encode_tensor(model, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """(B, E) fp32 embeddings of normalised images, under bf16 autocast where ``precision``
    (the model's ``train.precision``) chooses it, as in training."""
    with autocast(precision, images.device):
        return model.encode_image(images).float()


def positive_probability(image_emb: torch.Tensor, class_emb: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """(B, E) × (F, 2, E) → (B, F): softmax over [positive, negative] of scaled cosines."""
    logits = scale * torch.einsum("be,fke->bfk", image_emb.float(), class_emb.float())
    return logits.softmax(dim=-1)[..., 0]


def eval_records(manifest: str | Path, split: str) -> list[Record]:
    """The rows of ``split`` with an image and labels."""
    return of_split(image_rows(manifest), split, manifest)


def image_rows(manifest: str | Path) -> list[Record]:
    """The rows of a manifest with an image and labels (what zero-shot and probes score)."""
    return [r for r in load_manifest(manifest, verify_images=False) if r.image and r.labels]


def of_split(rows: list[Record], split: str, manifest: str | Path) -> list[Record]:
    out = [r for r in rows if r.split == split]
    if not out:
        raise ManifestError(f"{manifest}: no rows with image and labels in split {split!r}; "
                            f"its splits are {', '.join(sorted({r.split for r in rows}))}")
    return out


def default_findings(records: Sequence[Record]) -> list[str]:
    """Labels (other than No Finding) with at least one positive and one negative image."""
    names = sorted({lab for r in records for lab in r.labels} - {"No Finding"})
    return [f for f in names if 0 < sum(f in r.labels for r in records) < len(records)]


@dataclass(frozen=True)
class ZeroShotOptions:
    """What :func:`evaluate_zeroshot` evaluates on."""

    manifest: str | Path
    split: str = "test"
    findings: tuple[str, ...] = ()  # empty: every label with positive and negative images

    @classmethod
    def from_config(cls, cfg: Config, manifest: str | Path | None = None,
                    split: str | None = None,
                    findings: Sequence[str] | None = None) -> "ZeroShotOptions":
        """The model's own settings (``data.eval_manifest``, ``data.eval_split``,
        ``eval.findings``), each replaced where given."""
        return cls(manifest or cfg.data.eval_manifest, split or cfg.data.eval_split,
                   tuple(findings or cfg.eval.findings))


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, cfg: Config, options: ZeroShotOptions) -> dict:
    """Zero-shot AUC per finding on the image rows of ``options.split``; image size,
    normalisation, text length and bootstrap size come from the model's ``cfg``."""
    manifest, split = options.manifest, options.split
    records = eval_records(manifest, split)
    findings = list(options.findings) or default_findings(records)
    present = sorted({f for r in records for f in r.labels})
    unknown = [f for f in findings if f not in present]
    if unknown:
        hints = []
        for f in unknown:
            close = difflib.get_close_matches(f.lower(), [p.lower() for p in present], n=2,
                                              cutoff=0.6)
            names = [p for p in present if p.lower() in close]
            hints.append(f"{f!r}" + (f" (did you mean {' or '.join(names)}?)" if names else ""))
        raise InputError(f"eval.findings: {', '.join(hints)} never occur in {manifest} split "
                         f"{split!r}; its findings are {', '.join(present)}")
    result = score_records(model, tokenizer, cfg, records, findings)
    return {**result, "manifest": str(manifest), "split": split}


@torch.no_grad()
def score_records(model, tokenizer, cfg: Config, records: Sequence[Record],
                  findings: Sequence[str]) -> dict:
    """Zero-shot AUC, F1 and ACC per finding on given image rows: a row is positive for a
    finding when its ``labels`` hold it, else negative (each finding needs both classes)."""
    model.eval()
    img = encode_images(model, [r.image for r in records], cfg.vision.image_size,
                        cfg.eval.batch_size, cfg.pixel_stats(), cfg.train.precision)
    cls, prompts = class_embeddings(model, tokenizer, findings, cfg.text.max_length)
    prob = positive_probability(img, cls.to(img.device), float(model.scale())).cpu().numpy()
    per, details, bootstrap = {}, {}, cfg.eval.bootstrap
    ys = np.array([[f in r.labels for f in findings] for r in records], dtype=int)  # (n, F)
    for j, f in enumerate(findings):
        y = ys[:, j]
        a = auc(y, prob[:, j])
        lo, hi = bootstrap_ci(y, prob[:, j], n=bootstrap, seed=j) if bootstrap else (a, a)
        f1, acc = f1_acc(y, prob[:, j])
        per[f] = a
        details[f] = {"auc": a, "auc_ci95": [lo, hi], "f1": f1, "acc": acc,
                      "positives": int(y.sum()), "n": int(len(y))}
    mean_ci = bootstrap_mean_ci(ys, prob, n=bootstrap) if bootstrap else (float("nan"),) * 2
    return {"mean_auc": float(np.mean(list(per.values()))), "mean_auc_ci95": list(mean_ci),
            "per_finding": per, "details": details, "n_images": len(records),
            "prompts": prompts}


def markdown_table(result: dict) -> str:
    lines = ["| finding | AUC | 95% CI | F1 | ACC | positives / n |",
             "|---|---|---|---|---|---|"]
    for f, d in result["details"].items():
        lo, hi = d["auc_ci95"]
        lines.append(f"| {f} | {d['auc']:.3f} | {lo:.3f}–{hi:.3f} | {d['f1']:.3f} | "
                     f"{d['acc']:.3f} | {d['positives']} / {d['n']} |")
    lo, hi = result.get("mean_auc_ci95", (float("nan"),) * 2)
    lines.append(f"| **mean** | **{result['mean_auc']:.3f}** | {lo:.3f}–{hi:.3f} | | | |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, name: str = "zeroshot") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(result, indent=2))
    md.write_text(f"# Zero-shot classification\n\n{result['manifest']} split "
                  f"`{result['split']}`, {result['n_images']} images\n\n" + markdown_table(result))
    return js, md
