import torch

from xlip.masking import (attention_masking, mask_tokens, num_masked, random_masking,
                          seeded_uniform, select_mlm_words)


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


def words_of(chosen):
    return set(torch.nonzero(chosen).flatten().tolist())


def select(scores, entity_words, policy="entity", n=20, candidate=None):
    cand = torch.ones(1, n, dtype=torch.bool) if candidate is None else candidate[None]
    ent = torch.zeros(1, n, dtype=torch.bool)
    ent[0, list(entity_words)] = True
    return select_mlm_words(scores[None], cand, ent, policy, 0.5, 0.15)[0]


def test_entity_words_first_then_floor():
    scores = seeded_uniform([0], 20, 1)[0]
    chosen = select(scores, [3, 4, 10])
    assert words_of(chosen) == {3, 4, 10}  # floor round(20*.15)=3
    chosen = select(scores, [3])
    assert 3 in words_of(chosen) and chosen.sum() == 3  # topped up with random words
    many = list(range(15))
    chosen = select(scores, many)
    assert chosen.sum() == 10 and words_of(chosen) <= set(many)  # capped at half the words


def test_mlm_word_selection_follows_the_scores():
    """Hand-made scores: capped entity words are the lowest-scored ones, the top-up takes the
    lowest-scored other candidates, and slots that are no candidate are never taken."""
    scores = torch.tensor([.9, .1, .5, .3, .8, .2, .7, .6, .4, .05], dtype=torch.float64)
    # 10 candidates: cap int(10*.5)=5 of the 7 entity words, lowest scores first
    chosen = select(scores, [0, 2, 3, 4, 6, 7, 8], n=10)
    assert words_of(chosen) == {3, 8, 2, 7, 6}
    # one entity word, floor round(10*.15)=2: word 0 plus the lowest-scored other word, 9
    assert words_of(select(scores, [0], n=10)) == {0, 9}
    # word 9 is no candidate (punctuation): never chosen, not counted in the ratios
    cand = torch.ones(10, dtype=torch.bool)
    cand[9] = False
    assert words_of(select(scores, [0, 9], n=10, candidate=cand)) == {0}
    assert words_of(select(scores, [], "random", n=10, candidate=cand)) == {1}
    assert words_of(select(scores, [], n=10, candidate=torch.zeros(10, dtype=bool))) == set()


def test_random_policy_ratio():
    scores = seeded_uniform([0], 40, 1)[0]
    chosen = select(scores, [1, 2], "random", n=40)
    assert chosen.sum() == 6
    assert words_of(chosen) == set(scores.argsort()[:6].tolist())


def test_seeded_uniform_rows_depend_on_their_own_seed_only():
    u = seeded_uniform([7, 8, 7], 50, stream=1)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(seeded_uniform([8], 20, stream=1)[0], u[1, :20])  # longer rows extend
    assert not torch.equal(seeded_uniform([7], 50, stream=2)[0], u[0])  # streams differ
    big = seeded_uniform([2 ** 63 - 1, 0], 20000, stream=3)
    assert abs(big.mean() - 0.5) < 0.01 and abs((big < 0.1).double().mean() - 0.1) < 0.01


def test_mask_tokens_labels_only_on_chosen_words():
    ids = torch.tensor([[101, 7, 8, 9, 10, 102, 0]])
    chosen = torch.tensor([[False, True, True, False, False, False, False]])
    draw = torch.tensor([[0.0, 0.5, 0.85, 0.95, 0.1, 0.1, 0.1]])
    masked, labels = mask_tokens(ids, chosen, draw, torch.full_like(ids, 33), mask_id=4)
    assert labels.tolist() == [[-100, 7, 8, -100, -100, -100, -100]]
    assert masked.tolist() == [[101, 4, 33, 9, 10, 102, 0]]


def test_mask_tokens_80_10_10():
    n = 20000
    ids = torch.full((1, n), 5)
    draw = seeded_uniform([0], n, 2)
    masked, labels = mask_tokens(ids, torch.ones(1, n, dtype=torch.bool), draw,
                                 (seeded_uniform([0], n, 3) * 1000).long(), 4)
    frac_mask = (masked == 4).double().mean()
    frac_same = (masked == 5).double().mean()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02
    assert (labels == 5).all()


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
