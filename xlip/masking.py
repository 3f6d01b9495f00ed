"""Masking as pure functions.

Image side (MAE convention): ``mask`` (B, N) is 0 for kept, 1 for removed patches; ``keep_ids``
(B, K) lists kept patches in ascending grid order; ``restore_ids`` (B, N) puts the sequence
``cat(kept, removed)`` back into grid order: ``gather(cat(kept, removed), 1, restore_ids)``.

Text side: word-level selection for EntMLM / BERT MLM and the 80/10/10 token replacement, over
whole batches: ``(B, W)`` word and ``(B, L)`` token tensors, random numbers drawn per row from
the sample's seed (:func:`seeded_uniform`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _ids_from_order(order: Tensor, num_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """order: (B, N) a permutation per row whose first ``num_keep`` entries are kept."""
    B, N = order.shape
    keep_ids = order[:, :num_keep].sort(dim=1).values  # (B, K)
    drop_ids = order[:, num_keep:].sort(dim=1).values  # (B, N-K)
    full = torch.cat([keep_ids, drop_ids], dim=1)
    restore_ids = full.argsort(dim=1)
    mask = torch.ones(B, N, device=order.device)
    mask.scatter_(1, keep_ids, 0.0)
    return keep_ids, mask, restore_ids


def num_masked(num_patches: int, ratio: float) -> int:
    return min(num_patches - 1, max(1, int(round(num_patches * ratio))))


def random_masking(batch: int, num_patches: int, ratio: float,
                   generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu",
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE masking: a uniformly random ``ratio`` of patches removed per sample; ``noise``
    (batch, num_patches) uniform numbers to rank the patches by (else drawn here)."""
    if noise is None:
        noise = torch.rand(batch, num_patches, generator=generator, device=device)
    n_keep = num_patches - num_masked(num_patches, ratio)
    return _ids_from_order(noise.argsort(dim=1), n_keep)


def attention_masking(scores: Tensor, ratio: float, high_share: float,
                      generator: torch.Generator | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AttMIM selection from patch scores (B, N).

    ``round(N·ratio)`` patches are masked: ``round(masked·high_share)`` drawn uniformly from
    the top half of patches by score, the rest uniformly from the bottom half. Ties in score
    are broken at random (an all-equal map, e.g. an empty guide, masks like random masking).
    ``noise``: (B, 2, N) uniform numbers for the tie-break and the draws (else drawn here).
    """
    B, N = scores.shape
    n_mask = num_masked(N, ratio)
    n_top = (N + 1) // 2
    n_high = min(int(round(n_mask * high_share)), n_top)
    n_low = n_mask - n_high
    if n_low > N - n_top:  # bottom half too small: take the rest from the top half
        n_high, n_low = n_mask - (N - n_top), N - n_top
    # rank by score in a random patch order, so that ties fall at random
    if noise is None:
        noise = torch.rand(B, 2, N, generator=generator, device=scores.device)
    shuffle = noise[:, 0].argsort(dim=1)
    by_score = torch.argsort(scores.float().gather(1, shuffle), dim=1, descending=True,
                             stable=True)
    rank = shuffle.gather(1, by_score)  # (B, N) patch ids, best first
    in_top = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    in_top.scatter_(1, rank[:, :n_top], True)
    # sort key: top-half patches first (in random order), then bottom-half ones
    order = torch.argsort(noise[:, 1] + (~in_top).float() * 2.0, dim=1)  # (B, N)
    top_part, low_part = order[:, :n_top], order[:, n_top:]
    masked = torch.cat([top_part[:, :n_high], low_part[:, :n_low]], dim=1)
    kept = torch.cat([top_part[:, n_high:], low_part[:, n_low:]], dim=1)
    return _ids_from_order(torch.cat([kept, masked], dim=1), N - n_mask)


# ---------------------------------------------------------------------------------------------
# text


_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                0x94D049BB133111EB))


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (products wrap modulo 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def seeded_uniform(seeds: Sequence[int], n: int, stream: int) -> Tensor:
    """(B, n) float64 numbers in [0, 1): entry (b, i) a hash of (seeds[b], stream, i).

    A counter-based generator: row b depends only on its own seed, never on the other rows or
    on ``n`` (a longer row extends a shorter one), and the whole batch is drawn in a few tensor
    ops. Different ``stream`` values give independent numbers from one seed.
    """
    seed = torch.tensor([_signed(int(s) ^ (stream * 0xD1B54A32D192ED03)) for s in seeds],
                        dtype=torch.long)
    x = _mix(_mix(seed)[:, None] + torch.arange(1, n + 1, dtype=torch.long) * _GOLDEN)
    return _shr(x, 11).double() / float(1 << 53)  # the top 53 bits


def select_mlm_words(scores: Tensor, candidate: Tensor, entity: Tensor, policy: str,
                     max_ratio: float, min_ratio: float) -> Tensor:
    """Words to mask per row: (B, W) bool, out of the ``candidate`` words (B, W) bool (e.g.
    non-punctuation words; False also for word slots a row does not have).

    scores (B, W) in [0, 1) order the words at random (lowest first). ``entity``: the entity
    words (B, W) bool first, lowest score first, capped at ``max_ratio`` of the row's candidate
    words (``int(n·max_ratio)``, at least 1), then topped up with the lowest-scored non-entity
    candidates to ``min_ratio`` (``round(n·min_ratio)``, at least 1). ``random``: the
    ``min_ratio`` share of lowest-scored candidates (BERT). At least one word when a row has a
    candidate.
    """
    if policy not in ("entity", "random"):
        raise ValueError(f"unknown MLM policy {policy!r}")
    entity = entity & candidate if policy == "entity" else torch.zeros_like(candidate)
    n = candidate.sum(dim=1, dtype=torch.float64)  # (B,)
    floor = torch.round(n * min_ratio).clamp(min=1).long()
    floor = torch.where(n > 0, floor, 0)
    cap = torch.floor(n * max_ratio).clamp(min=1).long()
    # entity words first, then the other candidates, the other word slots last; by score
    key = scores + 2.0 * (~entity).double() + 4.0 * (~candidate).double()
    order = key.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(
        key.shape[1], device=key.device).expand_as(order))  # (B, W) place of each word
    n_ent = entity.sum(dim=1)
    take = torch.minimum(n_ent, cap)  # entity words taken
    top_up = (floor - take).clamp(min=0)  # then this many other candidates
    chosen_ent = entity & (rank < take[:, None])
    chosen_rest = candidate & ~entity & (rank - n_ent[:, None] < top_up[:, None])
    return chosen_ent | chosen_rest


def mask_tokens(input_ids: Tensor, chosen: Tensor, draw: Tensor, random_ids: Tensor,
                mask_id: int) -> tuple[Tensor, Tensor]:
    """BERT 80/10/10 replacement of the ``chosen`` tokens (B, L) bool.

    draw (B, L) in [0, 1): below 0.8 the token becomes ``mask_id``, from 0.8 to 0.9 it becomes
    ``random_ids`` (B, L), above it stays. Returns (masked input ids, labels) (B, L), the label
    -100 at every position not chosen.
    """
    labels = torch.where(chosen, input_ids, -100)
    ids = torch.where(chosen & (draw < 0.8), mask_id, input_ids)
    ids = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, ids)
    return ids, labels


def mlm_positions(labels: Tensor) -> Tensor:
    """(Bm, L) MLM labels (-100: not scored) → (M,) the flat indices (row · L + token) of the
    scored positions, row by row. Its length M depends on the labels: found on a GPU, the host
    would wait for it, so the collator computes it on the CPU (the batch's ``mlm_positions``)."""
    return torch.nonzero(labels.flatten() != -100).squeeze(1)
