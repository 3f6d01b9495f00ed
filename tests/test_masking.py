import random

import torch

from xlip.masking import (attention_masking, mask_tokens, num_masked, random_masking,
                          select_mlm_words)


def check_ids(keep, mask, restore, N):
    B, K = keep.shape
    assert mask.shape == (B, N)
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - K)))
    for b in range(B):
        kept = set(keep[b].tolist())
        assert kept == {i for i in range(N) if mask[b, i] == 0}
        dropped = sorted(set(range(N)) - kept)
        full = torch.tensor(sorted(kept) + dropped)
        assert torch.equal(full[restore[b]], torch.arange(N))


def test_random_masking_ratio_and_ids():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(5, 64, 0.75, g)
    assert keep.shape == (5, 16)
    check_ids(keep, mask, restore, 64)
    # different samples get different masks
    assert not torch.equal(mask[0], mask[1])


def test_attention_masking_exact_patches_top_share_one():
    # 8 patches, scores descending by index 7..0 → top half = {7, 6, 5, 4}
    scores = torch.arange(8.0)[None]
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        keep, mask, restore = attention_masking(scores, ratio=0.5, high_share=1.0, generator=g)
        assert set(torch.nonzero(mask[0]).flatten().tolist()) == {4, 5, 6, 7}
        check_ids(keep, mask, restore, 8)


def test_attention_masking_high_share_split():
    # 16 patches with hand-made scores; top half by score is a fixed known set
    scores = torch.tensor([[9, 1, 8, 2, 7, 3, 6, 4, 5, 0, 15, 14, 13, 12, 11, 10]], dtype=torch.float)
    top = set(torch.argsort(scores[0], descending=True)[:8].tolist())
    assert top == {10, 11, 12, 13, 14, 15, 0, 2}
    seen_high = set()
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        keep, mask, _ = attention_masking(scores, ratio=0.5, high_share=0.75, generator=g)
        masked = set(torch.nonzero(mask[0]).flatten().tolist())
        assert len(masked) == 8
        assert len(masked & top) == 6  # round(8 * 0.75) from the top half
        assert len(masked - top) == 2
        seen_high |= masked & top
    assert seen_high == top  # random within the top half, not a fixed top-k


def test_attention_masking_batch_independent_rows():
    scores = torch.stack([torch.arange(16.0), torch.arange(16.0).flip(0)])
    keep, mask, restore = attention_masking(scores, 0.25, 1.0, torch.Generator().manual_seed(1))
    assert set(torch.nonzero(mask[0]).flatten().tolist()) <= set(range(8, 16))
    assert set(torch.nonzero(mask[1]).flatten().tolist()) <= set(range(0, 8))
    check_ids(keep, mask, restore, 16)


def test_num_masked_bounds():
    assert num_masked(64, 0.5) == 32
    assert num_masked(4, 0.99) == 3 and num_masked(4, 0.01) == 1


def test_entity_words_first_then_floor():
    rng = random.Random(0)
    words = list(range(20))
    chosen = select_mlm_words(words, [3, 4, 10], "entity", 0.5, 0.15, rng)
    assert {3, 4, 10} <= set(chosen) and len(chosen) == 3  # floor round(20*.15)=3
    chosen = select_mlm_words(words, [3], "entity", 0.5, 0.15, random.Random(1))
    assert 3 in chosen and len(chosen) == 3  # topped up with random words
    many = list(range(15))
    chosen = select_mlm_words(words, many, "entity", 0.5, 0.15, random.Random(2))
    assert len(chosen) == 10 and set(chosen) <= set(many)  # capped at half the words


def test_random_policy_ratio():
    chosen = select_mlm_words(list(range(40)), [1, 2], "random", 0.5, 0.15, random.Random(0))
    assert len(chosen) == 6


def test_mask_tokens_labels_only_on_chosen_words():
    ids = [101, 7, 8, 9, 10, 102, 0]
    token_words = [None, 0, 0, 1, 2, None, None]
    masked, labels = mask_tokens(ids, token_words, [0], mask_id=4, vocab_size=50,
                                 special_ids={0, 101, 102}, rng=random.Random(0))
    assert labels == [-100, 7, 8, -100, -100, -100, -100]
    assert masked[3:] == ids[3:] and masked[0] == 101


def test_mask_tokens_80_10_10():
    rng = random.Random(0)
    n = 20000
    ids = [5] * n
    masked, labels = mask_tokens(ids, list(range(n)), range(n), 4, 1000, set(), rng)
    frac_mask = sum(m == 4 for m in masked) / n
    frac_same = sum(m == 5 for m in masked) / n
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02
    assert all(lab == 5 for lab in labels)


def test_attention_masking_breaks_ties_at_random():
    """An all-equal score map (e.g. an empty guide) masks every region equally often: the
    top rows of the image are not preferred."""
    N, draws = 64, 400
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(N)
    for _ in range(draws // 8):
        _, mask, _ = attention_masking(torch.ones(8, N), 0.5, 0.75, g)
        counts += mask.sum(0)
    share = counts / draws  # per patch: how often it was masked
    quarter = share.reshape(4, 16).mean(dim=1)  # four horizontal bands of the 8x8 grid
    assert torch.allclose(quarter, torch.full((4,), 0.5), atol=0.04), quarter
    assert share.min() > 0.35 and share.max() < 0.65
    # partial ties: the tied patches share the top-half slots evenly
    scores = torch.zeros(1, 8)
    scores[0, 7] = 1.0  # one clear winner, seven tied for the remaining three top slots
    hits = torch.zeros(8)
    for seed in range(300):
        _, mask, _ = attention_masking(scores, 0.5, 0.999, torch.Generator().manual_seed(seed))
        hits += mask[0]
    assert hits[7] == 300 and (hits[:7] / 300 - 3 / 7).abs().max() < 0.1
