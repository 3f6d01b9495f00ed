"""The XLIP collator: samples → a batch dict. It tokenises texts, builds disease-kind prompts for
image-only rows, marks AttMIM guiding tokens and applies EntMLM masking."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from xlip.config import Config
from xlip.hashing import hash_int
from xlip.masking import mask_tokens, select_mlm_words
from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.ner import extract_entities, guide_entities
from xlip.text.prompts import label_prompt


@dataclass
class Sample:
    """One row ready for collation (what :class:`~xlip.data.dataset.MixedDataset` yields)."""

    source: int
    kind: str  # paired | image_only | text_only
    text: str  # report section text, or "" for image-only rows (prompt made in collate)
    labels: tuple[str, ...]
    image: Tensor | None  # (C, H, W)
    seed: int  # per-draw seed for prompt/masking randomness
    mlm_text: str = ""  # the sections EntMLM masks when mlm.text_policy differs ("": text)


def label_key(labels: Sequence[str]) -> int:
    """Contrastive key of a label prompt: its present findings, whatever the wording drawn.

    Prompts are made from random templates and random negated findings, so two images with the
    same findings get different sentences; keyed on the findings they are positives of each
    other. ``No Finding`` is the empty set (an image labelled ``No Finding`` and one labelled
    nothing else make the same prompt).
    """
    present = sorted(set(labels) - {"No Finding"})
    return hash_int("labels:" + ";".join(present))


def label_vector(labels: Sequence[str]) -> list[float]:
    """Multi-hot over :data:`CANONICAL_FINDINGS` (all zeros: the row has no labels)."""
    have = set(labels)
    return [float(f in have) for f in CANONICAL_FINDINGS]


class Collator:
    """Samples → batch dict for :class:`xlip.model.xlip.XLIP`.

    Keys: ``images`` (Bi, C, H, W) for rows with an image, ``has_image`` (B,), ``input_ids`` /
    ``attention_mask`` (B, L) clean text (report or prompt), ``text_key`` (B,) contrastive
    identity (identical reports, or prompts of the same present findings, share a key),
    ``labels`` (B, F) multi-hot findings (zeros when unknown), ``guide_mask`` (B, L) AttMIM
    guiding tokens, ``guide_fallback`` (B,) rows with no present finding, guided by all their
    content tokens instead, ``mlm_*`` masked reports of the rows in ``mlm_rows``, ``source`` (B,).
    """

    def __init__(self, cfg: Config, tokenizer, train: bool = True,
                 findings: Sequence[str] = ()) -> None:
        """findings: the label vocabulary that negative prompt sentences are drawn from."""
        self.cfg, self.tok, self.train = cfg, tokenizer, train
        self.findings = [f for f in findings if f != "No Finding"]
        self.special = set(tokenizer.all_special_ids)
        self.vocab = len(tokenizer)

    def text_for(self, s: Sample, rng: random.Random) -> tuple[str, bool]:
        """(text, is_prompt)."""
        if s.kind == "image_only":
            negatives: list[str] = []
            if self.cfg.data.prompt_negatives and self.train:
                pool = [f for f in self.findings if f not in s.labels]
                negatives = rng.sample(pool, min(len(pool), self.cfg.data.prompt_negatives))
            return label_prompt(s.labels, rng if self.train else None, negatives), True
        return s.text, False

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        cfg = self.cfg
        rngs = [random.Random(s.seed ^ 0x5EED) for s in samples]
        texts, prompt = zip(*(self.text_for(s, r) for s, r in zip(samples, rngs)))
        in_mlm = [cfg.mlm.policy != "none" and
                  (s.kind == "paired" or (s.kind == "text_only" and cfg.mlm.text_only) or
                   (p and cfg.mlm.prompts)) for s, p in zip(samples, prompt)]
        if self.train and cfg.mlm.row_fraction < 1.0:  # no draw at 1: the same masks as before
            draw = [r.random() for r in rngs]
            eligible = [b for b, m in enumerate(in_mlm) if m]
            in_mlm = [m and d < cfg.mlm.row_fraction for m, d in zip(in_mlm, draw)]
            if eligible and not any(in_mlm):  # at least one row: every rank trains the decoder
                in_mlm[min(eligible, key=draw.__getitem__)] = True
        mlm_rows = [b for b, m in enumerate(in_mlm) if m]
        separate = any(samples[b].mlm_text for b in mlm_rows)  # mlm.text_policy differs
        mlm_texts = [samples[b].mlm_text or texts[b] for b in mlm_rows] if separate else []
        # one tokenizer call: the clean and the MLM texts share one padded length
        enc = self.tok(list(texts) + mlm_texts, padding="longest", truncation=True,
                       max_length=cfg.text.max_length, return_offsets_mapping=True,
                       return_tensors="pt")
        B, L = len(samples), enc["input_ids"].shape[1]
        guide = torch.zeros(B, L, dtype=torch.bool)
        fallback = torch.zeros(B, dtype=torch.bool)
        entities = [extract_entities(t) for t in texts]
        for b, text in enumerate(texts):
            word_ids, offsets = enc.word_ids(b), enc["offset_mapping"][b].tolist()
            spans = [(e.start, e.end) for e in guide_entities(text, entities[b])]
            guide_tok = tokens_in(word_ids, offsets, spans)
            if not any(guide_tok):  # nothing present: every content token guides
                guide_tok = [w is not None for w in word_ids]
                fallback[b] = True
            guide[b] = torch.tensor(guide_tok)
        mlm_ids, mlm_labels, mlm_mask = [], [], []
        for j, b in enumerate(mlm_rows):
            k = B + j if separate else b  # the row of the MLM text in ``enc``
            text = mlm_texts[j] if separate else texts[b]
            ents = extract_entities(text) if separate else entities[b]
            word_ids, offsets = enc.word_ids(k), enc["offset_mapping"][k].tolist()
            words = word_spans(word_ids, offsets, text)
            ent_words = [w for w, (a, z) in words.items()
                         if any(x < z and a < y for x, y in ((e.start, e.end) for e in ents))]
            chosen = select_mlm_words(sorted(words), ent_words, cfg.mlm.policy,
                                      cfg.mlm.max_ratio, cfg.mlm.min_ratio, rngs[b])
            masked, labels = mask_tokens(enc["input_ids"][k].tolist(), word_ids, chosen,
                                         self.tok.mask_token_id, self.vocab, self.special,
                                         rngs[b])
            mlm_ids.append(masked)
            mlm_labels.append(labels)
            mlm_mask.append(enc["attention_mask"][k])
        has_image = torch.tensor([s.image is not None for s in samples])
        images = [s.image for s in samples if s.image is not None]
        keys = [label_key(s.labels) if p else hash_int("text:" + t)
                for s, t, p in zip(samples, texts, prompt)]
        attention = enc["attention_mask"][:B]
        return {
            "images": torch.stack(images) if images else torch.zeros(0, 1, 1, 1),
            "has_image": has_image,
            "input_ids": enc["input_ids"][:B],
            "attention_mask": attention,
            "text_key": torch.tensor(keys, dtype=torch.long),
            "labels": torch.tensor([label_vector(s.labels) for s in samples]),
            "guide_mask": guide & attention.bool(),
            "guide_fallback": fallback,
            "source": torch.tensor([s.source for s in samples]),
            "mlm_rows": torch.tensor(mlm_rows, dtype=torch.long),
            "mlm_input_ids": torch.tensor(mlm_ids, dtype=torch.long).reshape(-1, L),
            "mlm_attention_mask": torch.stack(mlm_mask) if mlm_mask else
            torch.zeros(0, L, dtype=torch.long),
            "mlm_labels": torch.tensor(mlm_labels, dtype=torch.long).reshape(-1, L),
        }


def tokens_in(word_ids: list[int | None], offsets: list[list[int]],
              spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: is it a word token that overlaps one of the character ``spans``?"""
    return [w is not None and any(a < o[1] and o[0] < z for a, z in spans)
            for w, o in zip(word_ids, offsets)]


def word_spans(word_ids: list[int | None], offsets: list[list[int]],
               text: str) -> dict[int, tuple[int, int]]:
    """Character span of each word that contains a letter or digit (punctuation excluded)."""
    spans: dict[int, list[int]] = {}
    for w, (a, z) in zip(word_ids, offsets):
        if w is None:
            continue
        if w in spans:
            spans[w][1] = z
        else:
            spans[w] = [a, z]
    return {w: (a, z) for w, (a, z) in spans.items() if any(c.isalnum() for c in text[a:z])}
