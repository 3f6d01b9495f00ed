"""Losses as modules over the model's output dict.

Each loss returns a per-sample vector (for per-source logging) and a scalar. The composite
:class:`XLIPLoss` returns ``{"cl_loss", "mim_loss", "mlm_loss"}`` (weighted) for the trainer
to sum, plus ``*_per_sample`` tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xlip.config import Config
from xlip.model.vision import patchify


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient of the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def mean_over_ranks(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` with ``count`` averaged over ranks: once DDP averages the ranks'
    gradients, the loss is the mean over every element of the global batch, however many fall
    on each rank (a per-rank mean would weight a rank's few masked tokens like another's many)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return total / count.clamp(min=1)


def contrastive_targets(key: Tensor, all_key: Tensor, labels: Tensor | None = None,
                        all_labels: Tensor | None = None) -> Tensor:
    """(B, G) target distributions over the gathered columns.

    Columns whose ``text_key`` equals the row's are positives (weight 1). With ``labels``
    (multi-hot findings, all zeros for rows without labels), every column whose findings
    overlap the row's is a positive too, weighted by the cosine of the two label vectors
    (MedCLIP's semantic matching): a report and a prompt of the same findings are not negatives.
    """
    weight = (key[:, None] == all_key[None, :]).float()  # (B, G)
    if labels is not None:
        a, b = F.normalize(labels.float(), dim=1), F.normalize(all_labels.float(), dim=1)
        weight = torch.maximum(weight, a @ b.t())  # unlabelled rows are zero vectors: cos 0
    return weight / weight.sum(dim=1, keepdim=True)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with multi-positive (or soft) targets.

    Samples whose texts are identical (``text_key`` equal) are positives of each other; the
    target row is uniform over the positives, or weighted by label agreement when ``labels``
    are given (:func:`contrastive_targets`). Embeddings are gathered across ranks, so the
    negatives are the global batch (all ranks must use the same local batch size).
    """

    def forward(self, image: Tensor, text: Tensor, logit_scale: Tensor, text_key: Tensor,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """image, text: (B, E) L2-normalised; text_key: (B,) int64; labels: (B, F) multi-hot
        or None. Returns (scalar, (B,))."""
        all_img, all_txt = gather_with_grad(image), gather_with_grad(text)  # (G, E)
        all_key = gather_with_grad(text_key)
        all_labels = gather_with_grad(labels) if labels is not None else None
        # fp32 even under bf16 autocast (which would run these matmuls in bf16: at logit scale
        # 100 its ~4e-3 cosine error is ~0.4 in the logits)
        with torch.autocast(image.device.type, enabled=False):
            target = contrastive_targets(text_key, all_key, labels, all_labels)  # (B, G)
            logits_i2t = logit_scale.float() * image.float() @ all_txt.float().t()  # (B, G)
            logits_t2i = logit_scale.float() * text.float() @ all_img.float().t()  # (B, G)
            loss_i = -(target * F.log_softmax(logits_i2t, dim=1)).sum(dim=1)
            loss_t = -(target * F.log_softmax(logits_t2i, dim=1)).sum(dim=1)
        per = 0.5 * (loss_i + loss_t)  # (B,)
        return per.mean(), per


class MIMLoss(nn.Module):
    """MSE on masked patches, target pixels normalised per patch (MAE ``norm_pix_loss``)."""

    def __init__(self, patch_size: int, norm_pix: bool = True) -> None:
        super().__init__()
        self.p, self.norm_pix = patch_size, norm_pix

    def target(self, images: Tensor) -> Tensor:
        t = patchify(images, self.p).flatten(2).float()  # (B, N, C·p·p)
        if self.norm_pix:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward(self, pred: Tensor, images: Tensor, mask: Tensor,
                features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pred: (B, N, C·p·p), or (B, N, D) with ``features``; images: (B, C, H, W); mask:
        (B, N) 1 = masked. features: (B, N, D) teacher patch tokens (``mim.target=features``),
        compared after a LayerNorm without affine parameters, instead of the pixels."""
        if features is None:
            target = self.target(images)
        else:
            target = F.layer_norm(features.float(), features.shape[-1:])
        err = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
        per = (err * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return mean_over_ranks((err * mask).sum(), mask.sum().float()), per


class MLMLoss(nn.Module):
    """Cross-entropy on masked positions only (labels -100 elsewhere)."""

    def forward(self, logits: Tensor, labels: Tensor, rows: Tensor,
                batch: int) -> tuple[Tensor, Tensor]:
        """logits: (M, V) at the M labelled positions; labels: (M,); rows: (M,) sample index."""
        ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (M,)
        per = torch.zeros(batch, device=ce.device).index_add_(0, rows, ce)
        count = torch.zeros(batch, device=ce.device).index_add_(0, rows, torch.ones_like(ce))
        # the count made on the device (a tensor of a Python number is a blocking copy)
        n = torch.full((), float(ce.numel()), dtype=ce.dtype, device=ce.device)
        return mean_over_ranks(ce.sum(), n), per / count.clamp(min=1)


def loss_terms(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weighted terms of an :class:`XLIPLoss` output (keys ending in ``_loss``); the other
    keys (``*_per_sample``) are diagnostics."""
    return {k: v for k, v in losses.items() if k.endswith("_loss")}


def total_loss(losses: dict[str, Tensor]) -> Tensor | float:
    """The objective a step minimises: the sum of :func:`loss_terms` (0 when there is none)."""
    return sum(loss_terms(losses).values())


class XLIPLoss(nn.Module):
    """L = w_cl·CL + w_mim·MIM + w_mlm·MLM over the model's output dict (:func:`total_loss`)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.w = cfg.loss
        self.cl = ContrastiveLoss()
        self.mim = MIMLoss(cfg.vision.patch_size, cfg.mim.norm_pix)
        self.mlm = MLMLoss()

    def forward(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if "image_embed" in out and self.w.w_cl > 0:
            loss, per = self.cl(out["image_embed"], out["text_embed"], out["logit_scale"],
                                out["cl_text_key"], out.get("cl_labels"))
            losses["cl_loss"], losses["cl_per_sample"] = self.w.w_cl * loss, per
        if "mim_pred" in out:
            loss, per = self.mim(out["mim_pred"], out["mim_images"], out["mim_mask"],
                                 out.get("mim_target"))
            losses["mim_loss"], losses["mim_per_sample"] = self.w.w_mim * loss, per
        if "mlm_logits" in out:
            loss, per = self.mlm(out["mlm_logits"], out["mlm_labels"], out["mlm_rows"],
                                 out["mlm_batch"])
            losses["mlm_loss"], losses["mlm_per_sample"] = self.w.w_mlm * loss, per
        return losses
