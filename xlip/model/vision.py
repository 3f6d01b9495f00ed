"""Vision Transformer in plain PyTorch with a visible-only (MAE) forward.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.attn.qkv`` ...) so ViT/DeiT/MAE weights saved from timm load from a
local file with :func:`load_timm_weights`.

Patch embeddings (``vision.stem``):

- ``linear``: one p×p projection per patch (timm's ``patch_embed.proj``, loads ViT/MAE weights).
- ``conv``: a small convolutional stem applied to each patch on its own.
- ``hybrid``: a convolutional network with BatchNorm over the whole image, down to the patch
  grid (a hybrid ViT, as ViT-R50). Its receptive field crosses patch borders; trained from
  scratch it learns much faster than the per-patch stems (figures in the README, "Config").

A masked patch never leaks into a visible one: ``linear`` and ``conv`` cut the patches out
before embedding; ``hybrid`` blanks the masked patches' pixels before the stem sees the image,
and normalises them with the BatchNorm running statistics of whole images.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xlip.config import VisionConfig
from xlip.errors import InputError, MissingFileError
from xlip.model.layers import Block, init_weights, sincos_2d


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, H, W) → (B, N, C, p, p) with N = (H/p)·(W/p), row-major over the grid."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C, p, p)


def unpatchify(patches: Tensor, p: int, channels: int = 1) -> Tensor:
    """(B, N, C·p·p) → (B, C, H, W) for a square grid."""
    B, N, _ = patches.shape
    g = int(round(N ** 0.5))
    x = patches.reshape(B, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, g * p, g * p)


def he_init_convs(module: nn.Module) -> None:
    """GELU-aware He init of every convolution (keeps activation variance ~1), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def stem_convs(stem: str, patch: int, in_chans: int, dim: int) -> list[tuple[int, int, int, int]]:
    """The convolutions of a ``conv`` or ``hybrid`` stem, in order, as (in channels, out
    channels, kernel, stride); the last is the 1×1 projection to ``dim``. ``conv`` runs on one
    p×p patch (kernel = stride), ``hybrid`` on the whole image (3×3, padding 1). The stems are
    built from this list and :mod:`xlip.flops` counts them from it."""
    convs: list[tuple[int, int, int, int]] = []
    if stem == "conv":  # 4×4/s4 → 2×2/s2 → ... inside the patch
        ch, size, width = in_chans, patch // 4, dim // 4
        convs.append((ch, width, 4, 4))
        ch = width
        while size > 1:
            nxt = min(ch * 2, dim)
            convs.append((ch, nxt, 2, 2))
            ch, size = nxt, size // 2
    elif stem == "hybrid":  # log2(p) stages of [3×3/s2, 3×3], widths doubling up to dim
        stages = patch.bit_length() - 1
        ch = in_chans
        for i in range(stages):
            w = max(16, dim >> (stages - 1 - i))
            convs += [(ch, w, 3, 2), (w, w, 3, 1)]
            ch = w
    else:
        raise ValueError(f"stem {stem!r} has no convolution list (linear: one p×p projection)")
    return convs + [(ch, dim, 1, 1)]


class PatchEmbed(nn.Module):
    """Embeds patches one at a time: (M, C, p, p) → (M, D).

    ``linear``: one p×p convolution with stride p (timm's ``patch_embed.proj``).
    ``conv``: 4×4/s4 → 2×2/s2 → ... → projection, non-overlapping kernels inside the patch.
    """

    def __init__(self, patch: int, in_chans: int, dim: int, stem: str = "linear") -> None:
        super().__init__()
        self.stem_kind = stem
        if stem == "linear":
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
            return
        *convs, (ch, _, _, _) = stem_convs("conv", patch, in_chans, dim)
        layers: list[nn.Module] = []
        for cin, cout, k, stride in convs:
            layers += [nn.Conv2d(cin, cout, kernel_size=k, stride=stride), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch, dim, kernel_size=1)
        he_init_convs(self)

    def forward(self, patches: Tensor) -> Tensor:
        x = self.stem(patches) if self.stem_kind == "conv" else patches
        return self.proj(x).flatten(1)  # (M, D)


class HybridStem(nn.Module):
    """Whole-image convolutional stem: log2(p) stages of [3×3 conv stride 2 → BN → GELU →
    3×3 conv → BN → GELU], widths doubling up to ``dim``, then a 1×1 projection.
    (B, C, H, W) → (B, N, D) tokens on the (H/p)×(W/p) patch grid, row-major."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        *convs, (ch, _, _, _) = stem_convs("hybrid", patch, in_chans, dim)
        layers: list[nn.Module] = []
        for cin, cout, k, stride in convs:
            layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch, dim, kernel_size=1)
        he_init_convs(self)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)  # (B, N, D)


@contextlib.contextmanager
def running_bn_stats(module: nn.Module):
    """BatchNorm layers normalise with their running statistics (those of whole images) and
    leave them unchanged: the masked-image pass then embeds a visible patch as the full pass
    does, and neither its blanked pixels nor the other images of the batch shift what
    evaluation uses. (Normalising with the blanked batch's own statistics gave the visible
    pass features of another distribution: 0.855 vs 0.863 zero-shot mean AUC, seeds 0 and 1 of
    the demo ablation.)"""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


def take_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(B, N, D) tokens → (B, K, D): the tokens at (B, K) patch indices, in that order."""
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


def blank_patches(images: Tensor, keep_ids: Tensor, p: int) -> Tensor:
    """Zero every pixel outside the kept patches (images are normalised to zero mean)."""
    B, _, H, W = images.shape
    keep = images.new_zeros(B, (H // p) * (W // p)).scatter_(1, keep_ids, 1.0)  # (B, N)
    return images * unpatchify(keep[:, :, None].expand(-1, -1, p * p), p)  # (B, 1, H, W)


class VisionTransformer(nn.Module):
    """ViT with CLS token; ``forward(images, keep_ids)`` encodes all or only the kept patches.

    Returns a dict: ``cls`` (B, D), ``pooled`` (B, D) — the CLS state or the mean of the
    patch tokens (``vision.pool``) — and ``tokens`` (B, K, D) — the final-normed patch tokens in
    the order of ``keep_ids`` (all N patches in grid order when ``keep_ids`` is None).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width, depth, heads = cfg.resolved()
        self.cfg, self.width = cfg, width
        self.patch_size, self.grid = cfg.patch_size, cfg.grid
        self.num_patches = cfg.grid ** 2
        if cfg.stem == "hybrid":
            self.patch_embed = HybridStem(cfg.patch_size, cfg.in_chans, width)
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, width, cfg.stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, cfg.mlp_ratio, cfg.attn_impl) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)
        if cfg.stem == "linear":  # as MAE: xavier on the flattened patch projection
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        with torch.no_grad():
            self.pos_embed[0, 1:] = sincos_2d(width, cfg.grid)
        nn.init.normal_(self.cls_token, std=0.02)

    @torch.no_grad()
    def track_stem_stats(self, images: Tensor) -> None:
        """Update the hybrid stem's BatchNorm running statistics with whole images (for a
        training step that encodes only visible patches, whose blanked images must not set
        what evaluation normalises with). No-op for the per-patch stems."""
        if isinstance(self.patch_embed, HybridStem):
            self.patch_embed(images)

    def embed(self, images: Tensor, keep_ids: Tensor | None = None) -> Tensor:
        """Patch embeddings of all patches, or only of ``keep_ids`` (B, K): (B, K, D)."""
        B = images.shape[0]
        if isinstance(self.patch_embed, HybridStem):
            if keep_ids is None:
                return self.patch_embed(images)
            with running_bn_stats(self.patch_embed):
                x = self.patch_embed(blank_patches(images, keep_ids, self.patch_size))
            return take_tokens(x, keep_ids)
        patches = patchify(images, self.patch_size)  # (B, N, C, p, p)
        if keep_ids is not None:
            idx = keep_ids[:, :, None, None, None].expand(-1, -1, *patches.shape[2:])
            patches = torch.gather(patches, 1, idx)  # (B, K, C, p, p)
        return self.patch_embed(patches.flatten(0, 1)).reshape(B, patches.shape[1], -1)

    def forward(self, images: Tensor, keep_ids: Tensor | None = None) -> dict[str, Tensor]:
        B = images.shape[0]
        pos = self.pos_embed[:, 1:].expand(B, -1, -1)  # (B, N, D)
        if keep_ids is not None:
            pos = take_tokens(pos, keep_ids)
        x = self.embed(images, keep_ids) + pos  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
        ckpt = self.cfg.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:  # checkpointed: activations recomputed in the backward pass
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        x = self.norm(x)
        tokens = x[:, 1:]
        pooled = x[:, 0] if self.cfg.pool == "cls" else tokens.mean(dim=1)
        return {"cls": x[:, 0], "pooled": pooled, "tokens": tokens}


def load_timm_weights(model: VisionTransformer, path: str | Path) -> list[str]:
    """Load a timm-named ViT state dict from a local file into ``model``.

    RGB patch embeddings are summed to one channel, position tables are resized bicubically to
    the model's grid, the classification head is dropped. Returns the keys the file did not
    provide (the model keeps its initialisation there). Shape mismatches raise.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"vision.pretrained: {path} does not exist; give a local "
                                "timm ViT state dict (.safetensors, .pth or .bin)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_"))}
    own = model.state_dict()
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != model.cfg.in_chans:
        if model.cfg.in_chans != 1:
            raise InputError(f"{path}: patch embedding has {w.shape[1]} channels, model "
                             f"{model.cfg.in_chans}")
        state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape:
        state["pos_embed"] = _resize_pos_embed(pe, model.grid)
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise InputError(f"{path}: shapes do not match the configured ViT "
                         f"(check vision.preset / patch_size): {'; '.join(bad[:5])}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise InputError(f"{path}: keys not in an xlip ViT: {unexpected[:8]} — is this a "
                         "timm VisionTransformer state dict?")
    missing = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    return missing


def _resize_pos_embed(pe: Tensor, grid: int) -> Tensor:
    cls, table = pe[:, :1], pe[:, 1:]  # (1, 1, D), (1, g*g, D)
    old = int(round(table.shape[1] ** 0.5))
    table = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
