"""Decoders: the MAE pixel decoder that cross-attends to text, and the multimodal MLM decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xlip.model.layers import FusionBlock, init_weights, sincos_2d


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens + positions → per-patch pixels (or, with
    ``mim.target=features``, per-patch encoder features), cross-attending to text.

    Args:
        enc_dim: ViT width. text_dim: text hidden size. width/depth/heads: decoder size.
        num_patches: N. patch_pixels: the output per patch: C·p·p, or the ViT width.
    """

    def __init__(self, enc_dim: int, text_dim: int, width: int, depth: int, heads: int,
                 num_patches: int, patch_pixels: int) -> None:
        super().__init__()
        grid = int(round(num_patches ** 0.5))
        self.embed = nn.Linear(enc_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(sincos_2d(width, grid)[None])  # (1, N, W)
        self.blocks = nn.ModuleList(
            FusionBlock(width, heads, context_dim=text_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_pixels)
        for m in (self.embed, self.blocks, self.norm, self.pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, restore_ids: Tensor, text: Tensor,
                text_mask: Tensor) -> Tensor:
        """visible: (B, K, D) encoder tokens in keep order; restore_ids: (B, N);
        text: (B, L, H) guiding token states; text_mask: (B, L) bool. Returns (B, N, C·p·p)
        (or (B, N, D) with mim.target=features)."""
        x = self.embed(visible)  # (B, K, W)
        B, K, W = x.shape
        N = restore_ids.shape[1]
        x = torch.cat([x, self.mask_token.expand(B, N - K, W).to(x.dtype)], dim=1)  # (B, N, W)
        x = torch.gather(x, 1, restore_ids[:, :, None].expand(-1, -1, W))  # grid order
        x = x + self.pos_embed
        # a sample whose guiding mask is empty attends to nothing: open all its tokens instead
        text_mask = text_mask | ~text_mask.any(dim=1, keepdim=True)
        for blk in self.blocks:
            x = blk(x, text, context_mask=text_mask)
        return self.pred(self.norm(x))


class MultimodalDecoder(nn.Module):
    """Text tokens: self-attention, cross-attention to image patch tokens, MLP; then MLM head.

    The first block's cross-attention also scores patches for AttMIM (:meth:`patch_scores`).
    """

    def __init__(self, text_dim: int, image_dim: int, depth: int, heads: int,
                 vocab_size: int) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, text_dim)
        self.blocks = nn.ModuleList(
            FusionBlock(text_dim, heads, context_dim=text_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(text_dim, eps=1e-12)
        self.head = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(),
                                  nn.LayerNorm(text_dim, eps=1e-12),
                                  nn.Linear(text_dim, vocab_size))
        self.apply(init_weights)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor,
                gate: Tensor | None = None) -> Tensor:
        """text: (B, L, H); text_mask: (B, L) bool; image: (B, N, D). Returns (B, L, H)."""
        ctx = self.image_proj(image)  # (B, N, H)
        x = text
        for blk in self.blocks:
            x = blk(x, ctx, key_mask=text_mask, gate=gate)
        return self.norm(x)

    def logits(self, states: Tensor) -> Tensor:
        return self.head(states)

    @torch.no_grad()
    def patch_scores(self, text: Tensor, text_mask: Tensor, guide_mask: Tensor,
                     image: Tensor) -> Tensor:
        """AttMIM scores: for each guiding token t and patch p, a[t,p] = softmax_p(q_t·k_p/√d)
        (averaged over heads), summed over guiding tokens.

        The queries are exactly those the first cross-attention layer sees in :meth:`forward`
        (the text after block 0's self-attention residual and ``norm_x``); everything runs in
        fp32, also under bf16 autocast. text: (B, L, H) unmasked text states; text_mask: (B, L)
        bool padding mask; guide_mask: (B, L) bool; image: (B, N, D) full patch tokens → (B, N).
        """
        blk = self.blocks[0]
        with torch.autocast(text.device.type, enabled=False):
            text, image = text.float(), image.float()
            x = text + blk.attn(blk.norm1(text), text_mask)  # (B, L, H)
            a = blk.cross.attention_map(blk.norm_x(x), self.image_proj(image))  # (B, L, N)
        return (a * guide_mask[:, :, None].float()).sum(dim=1)
