"""Masking as pure functions.

Image side (MAE convention): ``mask`` (B, N) is 0 for kept, 1 for removed patches; ``keep_ids``
(B, K) lists kept patches in ascending grid order; ``restore_ids`` (B, N) puts the sequence
``cat(kept, removed)`` back into grid order: ``gather(cat(kept, removed), 1, restore_ids)``.

Text side: word-level selection for EntMLM / BERT MLM and the 80/10/10 token replacement.
"""

from __future__ import annotations

import random
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
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """MAE masking: a uniformly random ``ratio`` of patches removed per sample."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    n_keep = num_patches - num_masked(num_patches, ratio)
    return _ids_from_order(noise.argsort(dim=1), n_keep)


def attention_masking(scores: Tensor, ratio: float, high_share: float,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AttMIM selection from patch scores (B, N).

    ``round(N·ratio)`` patches are masked: ``round(masked·high_share)`` drawn uniformly from
    the top half of patches by score, the rest uniformly from the bottom half. Ties in score
    are broken at random (an all-equal map, e.g. an empty guide, masks like random masking).
    """
    B, N = scores.shape
    n_mask = num_masked(N, ratio)
    n_top = (N + 1) // 2
    n_high = min(int(round(n_mask * high_share)), n_top)
    n_low = n_mask - n_high
    if n_low > N - n_top:  # bottom half too small: take the rest from the top half
        n_high, n_low = n_mask - (N - n_top), N - n_top
    # rank by score in a random patch order, so that ties fall at random
    shuffle = torch.rand(B, N, generator=generator, device=scores.device).argsort(dim=1)
    by_score = torch.argsort(scores.float().gather(1, shuffle), dim=1, descending=True,
                             stable=True)
    rank = shuffle.gather(1, by_score)  # (B, N) patch ids, best first
    in_top = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    in_top.scatter_(1, rank[:, :n_top], True)
    noise = torch.rand(B, N, generator=generator, device=scores.device)
    # sort key: top-half patches first (in random order), then bottom-half ones
    order = torch.argsort(noise + (~in_top).float() * 2.0, dim=1)  # (B, N)
    top_part, low_part = order[:, :n_top], order[:, n_top:]
    masked = torch.cat([top_part[:, :n_high], low_part[:, :n_low]], dim=1)
    kept = torch.cat([top_part[:, n_high:], low_part[:, n_low:]], dim=1)
    return _ids_from_order(torch.cat([kept, masked], dim=1), N - n_mask)


# ---------------------------------------------------------------------------------------------
# text


def select_mlm_words(words: Sequence[int], entity_words: Sequence[int], policy: str,
                     max_ratio: float, min_ratio: float, rng: random.Random) -> list[int]:
    """Words to mask, sorted, out of the candidate ``words`` (e.g. non-punctuation words).

    ``entity``: whole entity words first (random order), capped at ``max_ratio`` of the words,
    then topped up with random non-entity words to ``min_ratio``. ``random``: a random
    ``min_ratio`` share of the words (BERT). At least one word when there is any.
    """
    words = list(words)
    if not words:
        return []
    floor = max(1, int(round(len(words) * min_ratio)))
    if policy == "random":
        return sorted(rng.sample(words, floor))
    if policy != "entity":
        raise ValueError(f"unknown MLM policy {policy!r}")
    cap = max(1, int(len(words) * max_ratio))
    pool = set(words)
    ents = sorted(set(w for w in entity_words if w in pool))
    rng.shuffle(ents)
    chosen = ents[:cap]
    if len(chosen) < floor:
        taken = set(chosen)
        rest = [w for w in words if w not in taken]
        chosen += rng.sample(rest, min(len(rest), floor - len(chosen)))
    return sorted(chosen)


def mask_tokens(input_ids: list[int], token_words: list[int | None], words: Sequence[int],
                mask_id: int, vocab_size: int, special_ids: set[int],
                rng: random.Random) -> tuple[list[int], list[int]]:
    """BERT 80/10/10 replacement of every token of the chosen words.

    token_words[i] is the word index of token i (None for special tokens). Returns
    (masked input ids, labels) with label -100 at every position not chosen.
    """
    chosen = set(words)
    ids, labels = list(input_ids), [-100] * len(input_ids)
    for i, w in enumerate(token_words):
        if w is None or w not in chosen or input_ids[i] in special_ids:
            continue
        labels[i] = input_ids[i]
        r = rng.random()
        if r < 0.8:
            ids[i] = mask_id
        elif r < 0.9:
            ids[i] = rng.randrange(vocab_size)
    return ids, labels
