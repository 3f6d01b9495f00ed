import csv
import random
import shutil

import pytest
import torch

from tests.conftest import build_corpus, tiny_config
from xlip.data.collate import Collator, Sample
from xlip.data.dataset import MixedDataset
from xlip.data.manifest import ManifestError, load_manifest
from xlip.data.sampler import MixedBatchSampler, quotas
from xlip.text.ner import extract_entities
from xlip.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 80, 20, seed=3, size=32,
                        vocab_size=500)


def data_cfg(manifest, tok, **mlm):
    return tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.75},
                          {"manifest": str(manifest), "kind": "image_only", "weight": 0.25}],
              "batch_size": 8, "num_workers": 0},
        text={"tokenizer": str(tok), "max_length": 96}, mlm=mlm)


def collate_batch(cfg, tok, step=0):
    ds = MixedDataset(cfg)
    sampler = MixedBatchSampler([len(r) for r in ds.records], [0.75, 0.25], 8, seed=0,
                                start_step=step, steps=step + 1)
    items = next(iter(sampler))
    samples = [ds[i] for i in items]
    return samples, Collator(cfg, tok, findings=ds.findings())(samples)


def test_entity_mlm_masks_whole_entity_words_only(corpus):
    manifest, tokdir = corpus
    tok = load_tokenizer(tokdir)
    cfg = data_cfg(manifest, tokdir)
    samples, batch = collate_batch(cfg, tok)
    rows = batch["mlm_rows"].tolist()
    assert rows == [i for i, s in enumerate(samples) if s.kind == "paired"]
    enc = tok([samples[r].text for r in rows], padding="longest", truncation=True,
              max_length=96, return_offsets_mapping=True)
    for j, r in enumerate(rows):
        text = samples[r].text
        ids, labels = batch["input_ids"][r], batch["mlm_labels"][j]
        masked = labels != -100
        assert masked.any()
        assert torch.equal(labels[masked], ids[masked])  # labels are the original tokens
        assert not masked[batch["attention_mask"][r] == 0].any()  # never padding
        assert not masked[0]  # never [CLS]
        # unmasked positions keep their token
        assert torch.equal(batch["mlm_input_ids"][j][~masked], ids[~masked])
        words = enc.word_ids(j)
        spans = [(e.start, e.end) for e in extract_entities(text)]
        by_word = {}
        for t, w in enumerate(words):
            if w is not None:
                by_word.setdefault(w, []).append(t)
        n_words = 0
        for w, toks in by_word.items():
            a, z = enc["offset_mapping"][j][toks[0]][0], enc["offset_mapping"][j][toks[-1]][1]
            if not any(c.isalnum() for c in text[a:z]):
                continue
            n_words += 1
            states = {bool(masked[t]) for t in toks}
            assert len(states) == 1, "a word is masked whole or not at all"
        masked_words = [w for w, toks in by_word.items() if masked[toks[0]]]
        entity_words = [w for w, toks in by_word.items()
                        if any(x < enc["offset_mapping"][j][toks[-1]][1] and
                               enc["offset_mapping"][j][toks[0]][0] < y for x, y in spans)]
        ent_masked = [w for w in masked_words if w in entity_words]
        # entity words go first: all masked words are entities unless there were too few
        if len(entity_words) >= max(1, round(0.15 * n_words)):
            assert ent_masked == masked_words
        assert len(masked_words) <= max(1, int(0.5 * n_words)) or len(ent_masked) < len(masked_words)


def guide_words(tok, batch, row):
    ids = batch["input_ids"][row][batch["guide_mask"][row]]
    return tok.decode(ids.tolist()).split()


def content_mask(tok, batch, row):
    ids = batch["input_ids"][row]
    return (batch["attention_mask"][row].bool() & (ids != tok.cls_token_id)
            & (ids != tok.sep_token_id))


def test_guide_mask_present_findings_only(corpus):
    """Guides are the present/uncertain findings (and their location words) of reports and
    prompts alike; rows with nothing present fall back to every content token and say so."""
    manifest, tokdir = corpus
    tok = load_tokenizer(tokdir)
    for step in range(3):
        samples, batch = collate_batch(data_cfg(manifest, tokdir), tok, step)
        for i, s in enumerate(samples):
            content = content_mask(tok, batch, i)
            guide = batch["guide_mask"][i]
            assert not (guide & ~content).any()
            has_present = any(e.assertion != "absent" and e.type in ("finding", "device")
                              for e in extract_entities(batch_text(tok, batch, i)))
            assert bool(batch["guide_fallback"][i]) == (not has_present)
            if batch["guide_fallback"][i]:
                assert torch.equal(guide, content)
            else:
                assert 0 < guide.sum() < content.sum()


def batch_text(tok, batch, row):
    return tok.decode(batch["input_ids"][row].tolist(), skip_special_tokens=True)


def test_guide_mask_skips_negated_findings(corpus):
    _, tokdir = corpus
    tok = load_tokenizer(tokdir)
    cfg = data_cfg(corpus[0], tokdir)
    text = "No pleural effusion. Large right pneumothorax."
    paired = Sample(0, "paired", text, ("Pneumothorax",), torch.zeros(1, 32, 32), 1)
    normal = Sample(0, "paired", "The lungs are clear. No pneumothorax.", ("No Finding",),
                    torch.zeros(1, 32, 32), 2)
    batch = Collator(cfg, tok, findings=["Pneumothorax", "Pleural Effusion"])([paired, normal])
    assert guide_words(tok, batch, 0) == ["large", "right", "pneumothorax"]
    assert batch["guide_fallback"].tolist() == [False, True]
    assert torch.equal(batch["guide_mask"][1], content_mask(tok, batch, 1))
    # a prompt's negated findings and template words do not guide either
    prompt = Sample(1, "image_only", "", ("Nodule",), torch.zeros(1, 32, 32), 3)
    cfg.data.prompt_negatives = 2
    coll = Collator(cfg, tok, findings=["Nodule", "Pneumothorax", "Edema"])
    batch = coll([prompt])
    text = coll.text_for(prompt, random.Random(prompt.seed ^ 0x5EED))[0]
    assert "no" in text.lower()  # the prompt negates two findings
    assert guide_words(tok, batch, 0) == ["nodule"]


def test_training_prompts_with_equal_findings_share_text_key(corpus):
    """Training draws random templates and negatives: equal present-finding sets must still
    be contrastive positives (the same key), and different sets must not."""
    manifest, tokdir = corpus
    tok = load_tokenizer(tokdir)
    cfg = data_cfg(manifest, tokdir)
    cfg.data.prompt_negatives = 4
    ds = MixedDataset(cfg)
    coll = Collator(cfg, tok, train=True, findings=ds.findings())
    img_only = [ds[(ds.offsets[1] + i, 1000 + i)] for i in range(len(ds.records[1]))] * 2
    batch = coll(img_only)
    texts = [batch_text(tok, batch, i) for i in range(len(img_only))]
    present = [frozenset(s.labels) - {"No Finding"} for s in img_only]
    differ = 0
    for a in range(len(img_only)):
        for b in range(len(img_only)):
            same = bool(batch["text_key"][a] == batch["text_key"][b])
            assert same == (present[a] == present[b])
            differ += same and texts[a] != texts[b]
    assert differ > 0  # the wording did differ between positives
    # a report never shares a key with a prompt of the same findings
    samples, batch = collate_batch(cfg, tok)
    report_keys = {int(k) for k, s in zip(batch["text_key"], samples) if s.kind == "paired"}
    prompt_keys = {int(k) for k, s in zip(batch["text_key"], samples) if s.kind != "paired"}
    assert not report_keys & prompt_keys


def test_sampler_quotas_determinism_and_ranks():
    assert quotas([0.75, 0.25], 64) == [48, 16]
    assert quotas([1, 1, 1], 10) == [4, 3, 3]
    assert quotas([0.99, 0.01], 8) == [7, 1]
    s = MixedBatchSampler([10, 7], [0.75, 0.25], 8, seed=1, steps=5)
    batches = list(s)
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    assert sum(i < 10 for i, _ in batches[0]) == 6
    # resume: the sampler started at step 3 yields the same batches
    assert list(MixedBatchSampler([10, 7], [0.75, 0.25], 8, seed=1, start_step=3, steps=5)) == batches[3:]
    # each epoch of a source visits every row once
    first = [i for b in batches[:5] for i, _ in b if i < 10][:10]
    assert sorted(first) == list(range(10))
    # two ranks draw the rows (and per-draw seeds) of the one-process run with twice the batch,
    # each rank with the same composition (6 + 2 rows), so gathered CL rows have equal counts
    one = list(MixedBatchSampler([10, 7], [0.75, 0.25], 16, seed=1, steps=3))
    r0 = list(MixedBatchSampler([10, 7], [0.75, 0.25], 8, seed=1, steps=3, rank=0, world_size=2))
    r1 = list(MixedBatchSampler([10, 7], [0.75, 0.25], 8, seed=1, steps=3, rank=1, world_size=2))
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(b) for b in one]
    assert all(sum(i < 10 for i, _ in b) == 6 for b in r0 + r1)


def _rewrite(manifest, dst, edit):
    rows = list(csv.DictReader(open(manifest)))
    edit(rows)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_missing_and_corrupt_images_are_refused_with_rejects(corpus, tmp_path):
    manifest, _ = corpus
    shutil.copytree(manifest.parent / "images", tmp_path / "images")
    (tmp_path / "images" / "train" / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")

    def edit(rows):
        rows[2]["image"] = "images/train/does_not_exist.png"
        rows[1]["image"] = "images/train/000001.png"
        rows[1]["text"] = rows[1]["text"] or "No acute cardiopulmonary abnormality."
        rows[4]["labels"] = "Cardiomegally"

    bad = tmp_path / "manifest.csv"
    _rewrite(manifest, bad, edit)
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    msg = str(err.value)
    assert "3 of" in msg and "row 3" in msg and "missing image file" in msg
    assert "row 2" in msg and "unreadable image" in msg
    assert "row 5" in msg and "Cardiomegally" in msg and "Cardiomegaly" in msg
    rejects = list(csv.DictReader(open(tmp_path / "manifest.rejects.csv")))
    assert [r["row"] for r in rejects] == ["2", "3", "5"]
    kept = load_manifest(bad, skip_bad=True)
    assert len(kept) == len(load_manifest(manifest)) - 3


def test_image_without_text_or_labels_rejected(corpus, tmp_path):
    manifest, _ = corpus
    shutil.copytree(manifest.parent / "images", tmp_path / "images")

    def edit(rows):
        rows[0]["text"], rows[0]["labels"] = "", ""

    _rewrite(manifest, tmp_path / "m.csv", edit)
    with pytest.raises(ManifestError, match="row 1.*needs labels"):
        load_manifest(tmp_path / "m.csv")


def test_tokenizer_dir_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory .* does not exist.*xlip tokenizer train"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_trained_tokenizer_roundtrip(corpus):
    tok = load_tokenizer(corpus[1])
    enc = tok("Small left pleural effusion.")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "small left pleural effusion."


def test_negative_only_rows_load_but_make_no_prompt(corpus, tmp_path):
    """An SIIM / RSNA negative (labels empty, negative_labels set) is a valid manifest row (a
    negative for evaluation) but cannot make a label prompt: the image-only source leaves it out,
    with a warning that counts it."""
    manifest, tok = corpus
    shutil.copytree(manifest.parent / "images", tmp_path / "images")
    image_only = [r for r in load_manifest(manifest) if r.kind == "image_only"
                  and r.split == "train"]

    def edit(rows):
        for r in rows:
            r["negative_labels"] = ""
        for r in rows:
            if not r["text"] and r["split"] == "train":
                r["labels"], r["negative_labels"] = "", "Pneumothorax"
                break

    _rewrite(manifest, tmp_path / "m.csv", edit)
    records = load_manifest(tmp_path / "m.csv")
    negative = [r for r in records if r.negatives]
    assert len(negative) == 1 and negative[0].labels == () and negative[0].kind == "image_only"
    with pytest.warns(UserWarning, match="1 image-only rows .* only negative labels"):
        ds = MixedDataset(data_cfg(tmp_path / "m.csv", tok))
    assert len(ds.records[1]) == len(image_only) - 1
    assert all(r.labels for r in ds.records[1])


def test_reports_without_the_trained_sections_are_found_before_training(corpus, tmp_path):
    manifest, tok = corpus
    shutil.copytree(manifest.parent / "images", tmp_path / "images")

    def edit(rows):
        paired = [r for r in rows if r["text"] and r["image"] and r["split"] == "train"]
        paired[1]["text"] = "INDICATION: Cough. COMPARISON: None."

    _rewrite(manifest, tmp_path / "m.csv", edit)
    cfg = data_cfg(tmp_path / "m.csv", tok)
    with pytest.raises(ManifestError, match="1 paired rows .* no text in the sections "
                                            "data.text_policy=findings_impression"):
        MixedDataset(cfg)
    cfg.data.skip_bad = True
    with pytest.warns(UserWarning, match="left out"):
        ds = MixedDataset(cfg)
    assert all("INDICATION" not in r.text for r in ds.records[0])


def test_mlm_can_read_other_sections_than_cl(corpus):
    """mlm.text_policy=findings_impression with data.text_policy=impression: CL and AttMIM
    read the impression, EntMLM masks words of the whole report."""
    manifest, tokdir = corpus
    tok = load_tokenizer(tokdir)
    cfg = data_cfg(manifest, tokdir)
    cfg.data.text_policy = "impression"
    cfg.mlm.text_policy = "findings_impression"
    samples, batch = collate_batch(cfg, tok)
    rows = batch["mlm_rows"].tolist()
    assert rows == [i for i, s in enumerate(samples) if s.kind == "paired"]
    assert batch["mlm_input_ids"].shape[1] == batch["input_ids"].shape[1]
    for j, r in enumerate(rows):
        s = samples[r]
        assert s.text and s.text in s.mlm_text  # the impression, inside the whole report
        clean = tok.decode(batch["input_ids"][r], skip_special_tokens=True)
        labels = batch["mlm_labels"][j]
        original = batch["mlm_input_ids"][j].clone()
        original[labels != -100] = labels[labels != -100]
        full = tok.decode(original, skip_special_tokens=True)
        assert clean == tok.decode(tok(s.text)["input_ids"], skip_special_tokens=True)
        assert full == tok.decode(tok(s.mlm_text)["input_ids"], skip_special_tokens=True)
        assert len(full) > len(clean)  # the findings section comes along


def test_mlm_row_fraction_draws_a_share_of_the_eligible_rows(corpus):
    manifest, tokdir = corpus
    tok = load_tokenizer(tokdir)
    half = data_cfg(manifest, tokdir, row_fraction=0.5)
    taken = eligible = 0
    for step in range(12):
        samples, batch = collate_batch(half, tok, step=step)
        paired = {i for i, s in enumerate(samples) if s.kind == "paired"}
        rows = batch["mlm_rows"].tolist()
        assert set(rows) <= paired
        assert len(batch["mlm_input_ids"]) == len(rows) == len(batch["mlm_labels"])
        taken, eligible = taken + len(rows), eligible + len(paired)
        again = Collator(half, tok, findings=MixedDataset(half).findings())(samples)
        assert again["mlm_rows"].tolist() == rows  # drawn from the samples' own seeds
    assert 0.3 < taken / eligible < 0.7
    _, batch = collate_batch(data_cfg(manifest, tokdir), tok)
    assert len(batch["mlm_rows"]) == 6  # fraction 1: every paired row (6 of 8 here)
    # a tiny fraction still gives one row (a DDP rank without one would leave the decoder idle)
    for step in range(4):
        _, batch = collate_batch(data_cfg(manifest, tokdir, row_fraction=0.01), tok, step=step)
        assert len(batch["mlm_rows"]) == 1
