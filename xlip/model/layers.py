"""Transformer building blocks shared by the ViT, the MAE decoder and the multimodal decoder.

Attention has two paths: an explicit matmul-softmax-matmul (fast backward on CPU, and the
only one that can return attention maps) and ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
           impl: str = "explicit") -> Tensor:
    """Multi-head attention core.

    Args:
        q: (B, H, Lq, d); k, v: (B, H, Lk, d).
        key_mask: (B, Lk) bool, True where a key may be attended to.
        impl: ``explicit`` or ``sdpa``.
    Returns: (B, H, Lq, d).
    """
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, Lk)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Self-attention with a fused qkv projection (timm's parameter names: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, impl: str = "explicit") -> None:
        super().__init__()
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], key_mask, self.impl)  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys/values from ``context`` (separate q/k/v projections)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 impl: str = "explicit") -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.heads, self.impl = heads, impl
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, d)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        out = attend(self.split(self.q(x)), self.split(self.k(context)),
                     self.split(self.v(context)), context_mask, self.impl)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))

    def attention_map(self, x: Tensor, context: Tensor) -> Tensor:
        """softmax over context of q·k/sqrt(d), averaged over heads: (B, Lq, Lk)."""
        q, k = self.split(self.q(x)), self.split(self.k(context))
        a = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        return a.float().softmax(dim=-1).mean(dim=1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0,
                 impl: str = "explicit") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class FusionBlock(nn.Module):
    """Self-attention, cross-attention to another modality, MLP (all pre-norm).

    ``gate`` (B,) scales the cross-attention residual per sample, so samples without the other
    modality (text-only reports) skip it.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: float = 4.0,
                 impl: str = "explicit") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, impl)
        self.norm_x = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, heads, context_dim, impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None,
                context_mask: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        c = self.cross(self.norm_x(x), context, context_mask)
        if gate is not None:
            c = c * gate[:, None, None].to(c.dtype)
        x = x + c
        return x + self.mlp(self.norm2(x))


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position table (grid*grid, dim), as in MAE."""
    assert dim % 4 == 0, "position embedding dim must be divisible by 4"
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    out = [torch.sin(xs.reshape(-1, 1) * omega), torch.cos(xs.reshape(-1, 1) * omega),
           torch.sin(ys.reshape(-1, 1) * omega), torch.cos(ys.reshape(-1, 1) * omega)]
    return torch.cat(out, dim=1).float()  # (grid*grid, dim)


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
