"""Fine-tuning (``xlip eval finetune``): the whole image encoder and a linear head trained on the
labels, the sibling of the linear probe (:mod:`xlip.eval.probe`) on the same rows.

The image encoder of an XLIP model (``model.vision``, its pooled features) gets a linear head with
one sigmoid output per finding (multi-label, binary cross-entropy), and both are trained on the
training images: the probe's rows (:func:`xlip.eval.probe.split_rows`: patient-disjoint
training, validation and test rows, ``fraction`` of the training patients), AdamW with warm-up
+ cosine decay, and the light augmentation that pre-training uses (random resized crop and
intensity jitter of :func:`xlip.data.images.prepare_image`) when the model's ``data.augment`` is
on. The steps are :class:`xlip.optim.TrainSteps`, the loop that pre-training runs.

Every ``eval_every`` steps (and after the last) the validation mean AUC is measured; after
``patience`` measurements without improvement training stops. The best-validation weights are
restored, and only then are the test images read and scored, once: per finding the AUC with a
bootstrap 95 % CI. ``init="random"`` fine-tunes the same architecture untrained (the
no-pre-training row).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xlip.config import Config
from xlip.data.images import prepare_image
from xlip.data.manifest import Record
from xlip.errors import InputError
from xlip.eval import FINETUNE_STEPS
from xlip.eval.metrics import auc, auc_table
from xlip.eval.probe import (ProbeOptions, decode_images, finding_table, labels, pooled_features,
                             split_rows, usable_findings)
from xlip.eval.zeroshot import default_findings
from xlip.files import write_atomic
from xlip.model.weights import save_weights
from xlip.optim import TrainSteps, adamw
from xlip.precision import resolve_precision

WARMUP_SHARE = 0.1  # of the steps: linear warm-up, then cosine decay


@dataclass(frozen=True)
class FinetuneOptions(ProbeOptions):
    """The probe's rows (manifest, splits, fraction, init, findings, seed) and the training."""

    steps: int = FINETUNE_STEPS
    lr: float = 3e-4
    head_lr_scale: float = 10.0  # the new head learns at this multiple of lr
    batch_size: int = 32
    eval_every: int = 25  # steps between validation measurements
    patience: int = 4  # measurements without improvement before stopping

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag, value, what in (("--steps", self.steps, "optimisation step (e.g. 300)"),
                                  ("--batch-size", self.batch_size, "image per batch (e.g. 32)"),
                                  ("--eval-every", self.eval_every, "step between validation "
                                                                    "measurements (e.g. 25)"),
                                  ("--patience", self.patience, "validation measurement "
                                   "without improvement before stopping (e.g. 4)")):
            if value < 1:
                raise InputError(f"{flag} {value}: give at least 1 {what}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr {self.lr}: give a positive learning rate, e.g. 3e-4")
        if not (math.isfinite(self.head_lr_scale) and self.head_lr_scale > 0):
            raise InputError(f"--head-lr-scale {self.head_lr_scale}: give a positive "
                             "multiple of --lr for the new head, e.g. 10")

    def warmup_steps(self) -> int:
        return int(self.steps * WARMUP_SHARE)


class Classifier(nn.Module):
    """An image encoder and a linear head: (B, C, H, W) images → (B, F) logits."""

    def __init__(self, vision: nn.Module, n_out: int) -> None:
        super().__init__()
        self.vision = vision
        self.head = nn.Linear(vision.width, n_out)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision(images)["pooled"])  # (B, D) → (B, F)


class EarlyStopping:
    """Keeps the weights of the best validation score; :meth:`update` says when to stop:
    after ``patience`` measurements in a row without a higher score."""

    def __init__(self, patience: int) -> None:
        self.patience, self.bad = patience, 0
        self.best, self.best_step = -math.inf, 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: float, step: int, module: nn.Module) -> bool:
        if score > self.best:
            self.best, self.best_step, self.bad = score, step, 0
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def schedule_config(cfg: Config, opt: FinetuneOptions) -> Config:
    """The model's config with fine-tuning's schedule: the model's AdamW betas, eps, weight
    decay, gradient clipping, lowest-lr ratio and precision; ``opt``'s steps, lr and seed; a
    warm-up of :data:`WARMUP_SHARE` of the steps."""
    tr = dataclasses.replace(cfg.train, steps=opt.steps, lr=opt.lr, seed=opt.seed,
                             warmup_steps=opt.warmup_steps(), grad_accum=1)
    return dataclasses.replace(cfg, train=tr)


def train_batches(paths: Sequence[str], y: np.ndarray, cfg: Config, batch_size: int,
                  rng: random.Random, augment: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: ``images`` (B, 1, S, S), augmented when ``augment``, and ``labels``
    (B, F) float, the images in a new random order each epoch."""
    n, order = len(paths), []
    b = min(batch_size, n)
    while True:
        while len(order) < b:
            order += rng.sample(range(n), n)
        idx, order = order[:b], order[b:]
        x = torch.stack([prepare_image(paths[i], cfg.vision.image_size,
                                       rng if augment else None, cfg.pixel_stats())
                         for i in idx])
        yield {"images": x, "labels": torch.from_numpy(y[idx]).float()}


# validation images are decoded once and kept (fp32, as decoded) when they fit in this many
# bytes, else decoded again at every validation check
VAL_CACHE_BYTES = 2 << 30


def validation_images(paths: Sequence[str], cfg: Config) -> Sequence[str] | torch.Tensor:
    """The validation images decoded once when they fit :data:`VAL_CACHE_BYTES`, else their
    paths."""
    if len(paths) * cfg.vision.image_size ** 2 * 4 > VAL_CACHE_BYTES:
        return paths
    return decode_images(paths, cfg)


@torch.no_grad()
def scores(net: Classifier, images: Sequence[str] | torch.Tensor, cfg: Config) -> np.ndarray:
    """(n, F) logits of image files (or decoded images), in evaluation mode (the probe's
    feature pass, then the head); the module's mode is restored."""
    mode = net.training
    feats = torch.from_numpy(pooled_features(net, images, cfg))  # (n, D)
    device = next(net.parameters()).device
    out = net.head(feats.to(device)).float().cpu().numpy()
    net.train(mode)
    return out


def validation_auc(net: Classifier, images: Sequence[str] | torch.Tensor, y: np.ndarray,
                   cfg: Config) -> float:
    """The mean AUC over the head's findings on the validation images."""
    s = scores(net, images, cfg)
    return float(np.mean([auc(y[:, j], s[:, j]) for j in range(y.shape[1])]))


def finetune(model, cfg: Config, opt: FinetuneOptions, weights: Path | None = None,
             progress: bool = False, bootstrap: int | None = None) -> dict[str, Any]:
    """Fine-tune and test on the rows of :func:`xlip.eval.probe.split_rows`; returns the
    result dict written to ``finetune.json`` (``weights``: where the best encoder + head go).

    The findings are those asked for or, by default, every one with positive and negative
    images in the full training rows, the validation and the test rows (as the probe's, so
    that the rows of a table compare); a finding asked for without both is refused."""
    full, val, test, how = split_rows(dataclasses.replace(opt, fraction=1.0))
    train = split_rows(opt)[0] if opt.fraction < 1.0 else full
    if not train:
        raise InputError(f"--fraction {opt.fraction:g} keeps none of the {len(full)} training "
                         f"images of {opt.manifest} split {opt.split!r} (patients drawn with "
                         f"--seed {opt.seed}): use a larger --fraction")
    if not val:
        raise InputError(f"no validation images ({how}) to stop early on: give a --val-split "
                         "with image rows, or a manifest with more training patients")
    parts = {f"training ({opt.manifest} split {opt.split!r})": full,
             f"validation ({how})": val,
             f"test ({opt.test_manifest or opt.manifest} split {opt.test_split!r})": test}
    available = usable_findings(default_findings(test), *parts.values())
    for f in opt.findings:
        for name, rows in parts.items():
            pos = sum(f in r.labels for r in rows)
            if not 0 < pos < len(rows):
                raise InputError(
                    f"--findings {f!r}: {'none' if pos == 0 else 'all'} of the {len(rows)} "
                    f"{name} images are labelled {f}; give findings with positive and negative "
                    f"images in training, validation and test ({', '.join(available) or 'none'})"
                    " or other splits")
    findings = list(opt.findings) or available
    if not findings:
        raise InputError(f"no finding has positive and negative images in each of training "
                         f"({len(full)} images), validation ({len(val)}) and test "
                         f"({len(test)}): choose other splits")
    skipped = [f for f in default_findings(test) if f not in findings] if not opt.findings else []
    result = fit_finetune(model, cfg, dataclasses.replace(opt, findings=tuple(findings)), train,
                          val, test, how, cfg.eval.bootstrap if bootstrap is None else bootstrap,
                          weights, progress)
    result["skipped_findings"] = skipped
    return result


def fit_finetune(model, cfg: Config, opt: FinetuneOptions, train: list[Record],
                 val: list[Record], test: list[Record], how: str, n_boot: int,
                 weights: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune on given rows, stop on validation, test once (the benchmark lists call this
    directly). A finding with one class only among these training rows (a small fraction)
    cannot be learnt: it scores a constant (AUC 0.5), as in the probe, and is listed in
    ``no_training_class``."""
    t0 = time.perf_counter()
    asked = list(opt.findings) or default_findings(test)
    findings = usable_findings(asked, [], val, test)
    if not findings:
        raise InputError(f"no finding has positive and negative images in both validation "
                         f"({len(val)} images) and test ({len(test)}): choose other splits")
    ytr, yva, yte = (labels(x, findings) for x in (train, val, test))
    learnt = [j for j in range(len(findings)) if 0 < ytr[:, j].sum() < len(ytr)]
    if not learnt:
        raise InputError(f"no finding has positive and negative images among the {len(train)} "
                         "training images: use a larger --fraction or other splits")
    net, run = train_classifier(model, cfg, opt, [r.image for r in train], ytr[:, learnt],
                                [r.image for r in val], yva[:, learnt], progress)
    score = np.zeros(yte.shape, dtype=np.float32)  # (n_test, F): constants where not learnt
    score[:, learnt] = scores(net, [r.image for r in test], cfg)  # the one look at the test
    per, mean_ci = auc_table(findings, yte, score, ytr, n_boot)
    if weights is not None:
        save_weights(net, weights)
    tr = schedule_config(cfg, opt).train
    return {
        "protocol": "finetune", "mean_auc": float(np.mean([p["auc"] for p in per.values()])),
        "mean_auc_ci95": mean_ci, "per_finding": per, "fraction": opt.fraction,
        "init": opt.init, **run, "steps": opt.steps, "lr": opt.lr,
        "head_lr_scale": opt.head_lr_scale,
        "batch_size": min(opt.batch_size, len(train)), "eval_every": opt.eval_every,
        "patience": opt.patience, "warmup_steps": tr.warmup_steps,
        "min_lr_ratio": tr.min_lr_ratio, "weight_decay": tr.weight_decay,
        "betas": list(tr.betas), "adam_eps": tr.adam_eps, "clip_grad": tr.clip_grad,
        "precision": resolve_precision(tr.precision, next(net.parameters()).device),
        "augment": bool(cfg.data.augment),
        "head_findings": [findings[j] for j in learnt],
        "weights": weights.name if weights is not None else None,
        "validation": how, "skipped_findings": [f for f in asked if f not in findings],
        "no_training_class": [f for j, f in enumerate(findings) if j not in learnt],
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
        "manifest": str(opt.manifest), "test_manifest": str(opt.test_manifest or opt.manifest),
        "split": opt.split, "val_split": opt.val_split, "test_split": opt.test_split,
        "seed": opt.seed, "wall_s": time.perf_counter() - t0}


def train_classifier(model, cfg: Config, opt: FinetuneOptions, train: Sequence[str],
                     ytr: np.ndarray, val: Sequence[str], yva: np.ndarray, progress: bool
                     ) -> tuple[Classifier, dict[str, Any]]:
    """A copy of ``model.vision`` with a new head, trained with early stopping; returns it with
    the best-validation weights restored, and the run's record (steps done, best step, the
    validation curve)."""
    device = next(model.parameters()).device
    torch.set_flush_denormal(True)  # tiny Adam moments run ~100x slower as denormals on x86
    torch.manual_seed(opt.seed)  # the head's initialisation
    net = Classifier(copy.deepcopy(model.vision), ytr.shape[1]).to(device)
    val_images = validation_images(val, cfg)  # decoded once, not at every check
    fcfg = schedule_config(cfg, opt)
    optimizer, sched = adamw(net, fcfg, {"head": opt.head_lr_scale})
    stopper, curve, loss_sum = EarlyStopping(opt.patience), [], [0.0, 0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=opt.steps, desc=f"finetune ({opt.init})", dynamic_ncols=True,
                   file=sys.stderr)

    def forward(batch: dict[str, torch.Tensor], step: int, micro: int):
        logits = net(batch["images"])  # (B, F)
        return {"bce_loss": F.binary_cross_entropy_with_logits(logits.float(),
                                                               batch["labels"])}, {}

    def add_loss(losses: dict[str, torch.Tensor], out: dict, batch: dict) -> None:
        loss_sum[0] = loss_sum[0] + losses["bce_loss"].detach()  # on the device: read at checks
        loss_sum[1] += 1

    def validate(done: int, grad_norm: torch.Tensor) -> bool:
        if done % opt.eval_every and done != opt.steps:
            return False
        score = validation_auc(net, val_images, yva, cfg)
        curve.append({"step": done, "val_mean_auc": score,
                      "train_loss": float(loss_sum[0]) / max(loss_sum[1], 1),
                      "lr": sched.get_last_lr()[0]})
        loss_sum[:] = [0.0, 0]
        stop = stopper.update(score, done, net)
        if bar is not None:
            bar.set_postfix({"val_auc": f"{score:.3f}", "best": f"{stopper.best:.3f}"})
        return stop

    def diverged(what: str) -> str:
        return (f"fine-tuning diverged: {what}; nothing was written. Lower --lr (it was "
                f"{opt.lr:g}) or raise --batch-size")

    net.train()
    batches = train_batches(train, ytr, cfg, opt.batch_size, random.Random(opt.seed),
                            cfg.data.augment)
    steps = TrainSteps(net, optimizer, sched, forward, device, fcfg.train.precision, 1,
                       fcfg.train.clip_grad, on_micro=add_loss, on_step=validate,
                       diverged=diverged)
    done = steps.run(batches, 0, opt.steps, bar)
    if bar is not None:
        bar.close()
    stopper.restore(net)
    net.eval()
    return net, {"steps_done": done, "stopped_early": done < opt.steps,
                 "best_step": stopper.best_step, "best_val_mean_auc": stopper.best,
                 "validation_curve": curve}


def markdown(result: dict[str, Any]) -> str:
    r = result
    stop = (f"stopped at step {r['steps_done']} of {r['steps']}, after {r['patience']} "
            "validation measurements without improvement" if r["stopped_early"]
            else f"all {r['steps']} steps")
    lines = [f"# Fine-tuning ({r['init']} encoder, {r['fraction']:g} of the training labels)",
             "",
             f"The whole image encoder and a linear head (one sigmoid output per finding, "
             f"binary cross-entropy), AdamW (lr {r['lr']:g}, the head's "
             f"{r['head_lr_scale']:g} times that, {r['warmup_steps']} warm-up steps "
             f"then cosine decay, batch {r['batch_size']}, weight decay {r['weight_decay']:g}, "
             f"augmentation {'on' if r['augment'] else 'off'}, {r['precision']}): {stop}. "
             f"Validation mean AUC every {r['eval_every']} steps on {r['validation']}; the best "
             f"(step {r['best_step']}, {r['best_val_mean_auc']:.3f}) was restored and tested "
             f"once. {r['n_train']} training, {r['n_val']} validation and {r['n_test']} test "
             f"images ({r['test_manifest']} split `{r['test_split']}`).", ""]
    lines += finding_table(r, "training, validation or test")
    lines += ["", "| step | validation mean AUC | training loss | lr |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['val_mean_auc']:.3f} | {c['train_loss']:.4f} | "
              f"{c['lr']:.2e} |" for c in r["validation_curve"]]
    return "\n".join(lines) + "\n"


def write_finetune(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    js, md = out_dir / "finetune.json", out_dir / "finetune.md"
    write_atomic(js, json.dumps(result, indent=2) + "\n")
    write_atomic(md, markdown(result))
    return js, md
