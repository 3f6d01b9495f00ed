"""The collator's batched guide mask and EntMLM masks against a per-row, per-token reference."""

import random

import pytest
import torch

from tests.conftest import tiny_config
from xlip.data.collate import Collator, Sample, length_groups
from xlip.masking import seeded_uniform
from xlip.text.ner import extract_entities, guide_entities
from xlip.text.tokenizer import train_wordpiece

REPORTS = [
    "Large right pneumothorax (apical/lateral). No pleural effusion.",
    "The lungs are clear. No pneumothorax or effusion. Heart size is normal.",
    "Mild cardiomegaly with small bilateral pleural effusions; possible left lower lobe "
    "atelectasis. No pneumothorax.",
    "Right PICC line tip at the cavoatrial junction. Stable 5 mm nodule in the right upper "
    "lobe, unchanged.",
    "Moderate pulmonary edema. Bilateral perihilar opacities, consistent with edema. Small "
    "left pleural effusion. Enlarged cardiac silhouette. Left basilar atelectasis.",
]
FINDINGS = ["Atelectasis", "Cardiomegaly", "Edema", "Nodule", "Pleural Effusion",
            "Pneumothorax"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_wordpiece(REPORTS, tmp_path_factory.mktemp("tok"), vocab_size=300,
                           min_frequency=1)


def samples(separate: bool = False) -> list[Sample]:
    img = torch.zeros(1, 8, 8)
    rows = [
        Sample(0, "paired", REPORTS[0], ("Pneumothorax",), img, 11),
        Sample(0, "paired", REPORTS[1], ("No Finding",), img, 12),  # nothing present: fallback
        Sample(1, "text_only", REPORTS[2], (), None, 13),
        Sample(2, "image_only", "", ("Nodule", "Edema"), img, 14),  # a prompt with negatives
        Sample(2, "image_only", "", ("No Finding",), img, 15),
        # truncated at max_length; "ℵ" is a letter the tokenizer never saw: a [UNK] word
        Sample(0, "paired", " ".join(REPORTS[4:] * 3) + " ℵ-sign.", ("Edema",), img, 16),
        Sample(0, "paired", REPORTS[3] + " Fracture ℵ.", ("Nodule", "Support Devices"), img, 17),
    ]
    if separate:  # mlm.text_policy differs: EntMLM masks other sections of these reports
        rows[0].mlm_text = REPORTS[0] + " " + REPORTS[4]
        rows[6].mlm_text = REPORTS[3]
    return rows


def config(policy="entity"):
    return tiny_config(text={"max_length": 40},
                       data={"prompt_negatives": 2},
                       mlm={"policy": policy, "text_only": True, "prompts": True})


def reference(coll: Collator, rows: list[Sample]) -> dict[str, torch.Tensor]:
    """The batch's guide and MLM keys computed row by row, token by token."""
    cfg, tok = coll.cfg, coll.tok
    texts = [coll.text_for(s, random.Random(s.seed ^ 0x5EED))[0] for s in rows]
    mlm_rows = list(range(len(rows)))  # every row takes part here (text_only, prompts on)
    separate = any(s.mlm_text for s in rows)
    mlm_texts = [s.mlm_text or t for s, t in zip(rows, texts)] if separate else []
    enc = tok(texts + mlm_texts, padding="longest", truncation=True,
              max_length=cfg.text.max_length, return_offsets_mapping=True)
    B, L = len(rows), len(enc["input_ids"][0])
    special = set(tok.all_special_ids)
    guide, fallback = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    for b, text in enumerate(texts):
        spans = [(e.start, e.end) for e in guide_entities(text)]
        for i, (w, (a, z)) in enumerate(zip(enc.word_ids(b), enc["offset_mapping"][b])):
            guide[b, i] = w is not None and any(x < z and a < y for x, y in spans)
        if not guide[b].any():
            fallback[b] = True
            guide[b] = torch.tensor([w is not None for w in enc.word_ids(b)])
    ids_out, labels_out = [], []
    for b in mlm_rows:
        k, text = (B + b, mlm_texts[b]) if separate else (b, texts[b])
        word_ids, offsets = enc.word_ids(k), enc["offset_mapping"][k]
        span: dict[int, list[int]] = {}
        for w, (a, z) in zip(word_ids, offsets):
            if w is not None:
                span.setdefault(w, [a, z])[1] = z
        words = sorted(w for w, (a, z) in span.items() if any(c.isalnum() for c in text[a:z]))
        ents = [(e.start, e.end) for e in extract_entities(text)]
        ent_words = [w for w in words
                     if any(x < span[w][1] and span[w][0] < y for x, y in ents)]
        scores = seeded_uniform([rows[b].seed], max(span) + 1, 1)[0].tolist()
        floor = max(1, round(len(words) * cfg.mlm.min_ratio))
        if cfg.mlm.policy == "random":
            chosen = sorted(words, key=scores.__getitem__)[:floor]
        else:
            chosen = sorted(ent_words, key=scores.__getitem__)[
                :max(1, int(len(words) * cfg.mlm.max_ratio))]
            rest = sorted((w for w in words if w not in chosen), key=scores.__getitem__)
            chosen += rest[:max(0, floor - len(chosen))]
        draw = seeded_uniform([rows[b].seed], L, 2)[0].tolist()
        rand = (seeded_uniform([rows[b].seed], L, 3)[0] * len(tok)).long().tolist()
        ids, labels = list(enc["input_ids"][k]), [-100] * L
        for i, w in enumerate(word_ids):
            if w is None or w not in chosen or ids[i] in special:
                continue
            labels[i] = ids[i]
            if draw[i] < 0.8:
                ids[i] = tok.mask_token_id
            elif draw[i] < 0.9:
                ids[i] = rand[i]
        ids_out.append(ids)
        labels_out.append(labels)
    return {"guide_mask": guide, "guide_fallback": fallback,
            "mlm_input_ids": torch.tensor(ids_out), "mlm_labels": torch.tensor(labels_out)}


@pytest.mark.parametrize("policy,separate", [("entity", False), ("entity", True),
                                             ("random", False)])
def test_batched_masks_equal_the_per_row_reference(tok, policy, separate):
    rows = samples(separate)
    coll = Collator(config(policy), tok, findings=FINDINGS)
    batch = coll(rows)
    want = reference(coll, rows)
    for key, value in want.items():
        assert torch.equal(batch[key], value), key
    # the batch does hold what the reference is meant to test
    assert batch["guide_fallback"].tolist() == [False, True, False, False, True, False, False]
    assert batch["attention_mask"][5].all() and batch["attention_mask"].shape[1] == 40
    unk = batch["input_ids"] == tok.unk_token_id
    assert unk.any() and not (batch["mlm_labels"] != -100)[unk].any()  # [UNK] never a label
    masked = batch["mlm_labels"] != -100
    assert masked.any(dim=1).all()  # at least one word per row
    L = masked.shape[1]  # the scored positions, row by row, as flat indices into (Bm, L)
    assert [(int(p) // L, int(p) % L) for p in batch["mlm_positions"]] == \
        [tuple(x) for x in masked.nonzero().tolist()]
    if policy == "entity":  # the negated "pleural effusion" is masked like any entity
        text = batch["mlm_input_ids"][0][masked[0]]
        assert (text == tok.mask_token_id).any()


def test_masked_texts_are_cut_to_their_own_longest_row(tok):
    """Label prompts (four negated findings) set the clean texts' padded length; the masked
    reports are far shorter and are cut to their longest row: what they would be collated
    without the prompt rows, which is what EntMLM's BERT pass then costs."""
    cfg = tiny_config(text={"max_length": 96}, data={"prompt_negatives": 4},
                      mlm={"policy": "entity"})
    img = torch.zeros(1, 8, 8)
    reports = [Sample(0, "paired", "Small left pneumothorax.", ("Pneumothorax",), img, 21),
               Sample(0, "paired", "Cardiomegaly. No effusion.", ("Cardiomegaly",), img, 22)]
    prompt = Sample(2, "image_only", "", ("Nodule",), img, 23)
    mixed = Collator(cfg, tok, findings=FINDINGS)(reports + [prompt])
    alone = Collator(cfg, tok, findings=FINDINGS)(reports)
    assert mixed["mlm_rows"].tolist() == [0, 1]
    assert mixed["mlm_input_ids"].shape[1] < mixed["input_ids"].shape[1]
    assert mixed["mlm_attention_mask"][:, -1].any()  # no column of padding only is left
    for key in ("mlm_input_ids", "mlm_attention_mask", "mlm_labels", "mlm_positions"):
        assert torch.equal(mixed[key], alone[key]), key


def assert_same_batch(a: dict, b: dict) -> None:
    """Equal keys and values: tensors, and the clean texts' length groups (a tuple)."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


def test_same_seeds_same_batch_in_any_company(tok):
    rows = samples()
    first = Collator(config(), tok, findings=FINDINGS)(rows)
    again = Collator(config(), tok, findings=FINDINGS)(samples())
    assert_same_batch(first, again)
    # a row collated alone gets the masks it got in the batch (padding aside)
    alone = Collator(config(), tok, findings=FINDINGS)([rows[2]])
    L = alone["input_ids"].shape[1]
    for key in ("guide_mask", "mlm_input_ids", "mlm_labels"):
        assert torch.equal(alone[key][0], first[key][2][:L]), key
    # MIM's numbers: one (2, N) draw per image row (row 2 has none), whatever the company
    n = config().vision.grid ** 2
    assert first["mim_noise"].shape == (6, 2, n) and alone["mim_noise"].shape == (0, 2, n)
    solo = Collator(config(), tok, findings=FINDINGS)([rows[3]])["mim_noise"]
    assert torch.equal(solo[0], first["mim_noise"][2])  # rows[3] is the third image row
    assert 0 <= first["mim_noise"].min() and first["mim_noise"].max() < 1
    assert "mim_noise" not in Collator(config(), tok, train=False, findings=FINDINGS)(rows)
    # another seed draws other words
    other = samples()
    for s in other:
        s.seed += 1000
    assert not torch.equal(Collator(config(), tok, findings=FINDINGS)(other)["mlm_labels"],
                           first["mlm_labels"])


def test_text_cache_is_bounded_and_changes_nothing(tok):
    rows = samples()
    coll = Collator(config(), tok, findings=FINDINGS, cache_size=3)
    first = coll(rows)
    assert len(coll._spans) == 3
    assert_same_batch(coll(rows), first)  # some texts from the cache, some again
    assert len(coll._spans) == 3


def test_prompt_spans_from_cached_sentences_equal_those_of_the_whole_prompt():
    """A label prompt's spans are joined from its sentences' (cached: the sentence bank is
    finite). That must equal NER of the whole prompt, for every template of every finding and
    in any sentence order, with the negated sentences the collator appends."""
    from xlip.data.collate import joined_spans, text_spans
    from xlip.text.labels import CANONICAL_FINDINGS
    from xlip.text.prompts import (NEGATIVE_TEMPLATES, NO_FINDING_PROMPTS, POSITIVE_TEMPLATES,
                                   _fill, label_prompt_sentences)

    findings = [f for f in CANONICAL_FINDINGS if f != "No Finding"]
    bank = list(NO_FINDING_PROMPTS) + [_fill(t, f, True) for t in POSITIVE_TEMPLATES
                                       for f in findings]
    bank += [_fill(t, f, False) for t in NEGATIVE_TEMPLATES for f in findings]
    rng = random.Random(0)
    drawn = [label_prompt_sentences(rng.sample(findings, rng.randint(0, 3)), rng)
             for _ in range(200)]
    for sentences in drawn + [rng.sample(bank, rng.randint(1, 6)) for _ in range(500)]:
        whole = text_spans(" ".join(sentences))
        joined = joined_spans([text_spans(x) for x in sentences], [len(x) for x in sentences])
        assert (joined.n_guide, joined.n_entities) == (whole.n_guide, whole.n_entities)
        assert joined.spans.tolist() == whole.spans.tolist(), sentences


def test_prompt_rows_are_collated_as_before(tok):
    """Spans from cached sentences leave a batch of prompt rows as whole-text NER gives it."""
    from xlip.data.collate import text_spans

    rows = [Sample(0, "image_only", "", tuple(random.Random(i).sample(FINDINGS, i % 3)),
                   torch.zeros(1, 8, 8), 100 + i) for i in range(12)]
    cfg = config()
    fast = Collator(cfg, tok, findings=FINDINGS)(rows)
    slow = Collator(cfg, tok, findings=FINDINGS)
    slow.prompt_spans = lambda sentences: text_spans(" ".join(sentences))
    for key, value in slow(rows).items():
        assert torch.equal(value, fast[key]), key


def test_length_groups_split_where_padding_is_saved():
    # 40 reports of ≤ 16 tokens and 24 prompts of ≤ 55: two calls, 40 × 16 + 24 × 55 tokens
    lengths = [12, 16, 14] * 13 + [16] + [55, 50, 47] * 8
    rows, groups = length_groups(lengths)
    assert groups == ((40, 16), (24, 55))
    assert sorted(rows.tolist()) == list(range(64))  # every row once
    short, long = rows[:40].tolist(), rows[40:].tolist()
    assert short == sorted(short) and long == sorted(long)  # batch order within a group
    assert max(lengths[j] for j in short) == 16 and min(lengths[j] for j in long) == 47
    assert length_groups([20] * 8) is None  # one length: one call
    assert length_groups([]) is None
    # a split saving under min_saving of the padded tokens is not worth a second call
    assert length_groups([50] * 15 + [40]) is None  # saves 10 of 800 tokens
    assert length_groups([50] * 15 + [40], min_saving=0.0)[1] == ((1, 40), (15, 50))


def test_collator_groups_the_image_rows_clean_texts_by_length(tok):
    """Each group's length covers each of its rows' tokens, and the groups cover every image
    row once (text-only rows have no clean pass)."""
    rows = samples()
    batch = Collator(config(), tok, findings=FINDINGS)(rows)
    assert "clean_groups" in batch  # the prompts are far longer than the shortest reports
    img = batch["attention_mask"][batch["has_image"]].sum(1)
    order, start = batch["clean_rows"].tolist(), 0
    assert sorted(order) == list(range(int(batch["has_image"].sum())))
    for size, length in batch["clean_groups"]:
        group = order[start:start + size]
        start += size
        assert max(img[j] for j in group) == length
    assert start == len(order)
    compiled = config()
    compiled.train.compile = True  # no groups: each new group shape would compile again
    assert "clean_groups" not in Collator(compiled, tok, findings=FINDINGS)(rows)
