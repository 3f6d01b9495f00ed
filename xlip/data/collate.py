"""The XLIP collator: samples → a batch dict. It tokenises texts, builds disease-kind prompts for
image-only rows, marks AttMIM guiding tokens and applies EntMLM masking.

The per-text work (NER, which characters are letters or digits) is done once per distinct text
and kept (:class:`TextSpans`, a bounded cache); character spans become token flags, and words
are chosen and masked, with tensor ops over the whole batch."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from xlip.config import Config
from xlip.hashing import hash_int
from xlip.masking import mask_tokens, mlm_positions, seeded_uniform, select_mlm_words
from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.ner import entities_and_guides
from xlip.text.prompts import label_prompt_sentences


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


class TextSpans(NamedTuple):
    """Character spans ``[start, end)`` of one text, what collation needs of it, in one int32
    array (a cache holds many): the AttMIM guiding entities (:func:`guide_entities`), every NER
    entity (EntMLM's entity words), the maximal runs of letters/digits (a word without one is
    not masked)."""

    spans: np.ndarray  # (G + E + A, 2) int32: guide, entity, then letter/digit run spans
    n_guide: int
    n_entities: int

    @property
    def guide(self) -> np.ndarray:
        return self.spans[:self.n_guide]

    @property
    def entities(self) -> np.ndarray:
        return self.spans[self.n_guide:self.n_guide + self.n_entities]

    @property
    def alnum(self) -> np.ndarray:
        return self.spans[self.n_guide + self.n_entities:]


def text_spans(text: str) -> TextSpans:
    """NER and letter/digit runs of ``text`` as :class:`TextSpans`."""
    ents, guides = entities_and_guides(text)
    is_alnum = np.fromiter(map(str.isalnum, text), dtype=bool, count=len(text))
    edges = np.flatnonzero(np.diff(np.concatenate([[False], is_alnum, [False]]).astype(np.int8)))
    spans = [(e.start, e.end) for e in guides + ents] + edges.reshape(-1, 2).tolist()
    return TextSpans(np.array(spans, dtype=np.int32).reshape(-1, 2), len(guides), len(ents))


def joined_spans(parts: Sequence[TextSpans], lengths: Sequence[int]) -> TextSpans:
    """:class:`TextSpans` of ``" ".join(texts)`` from those of each text (``lengths``: their
    lengths), for texts that each end a sentence (label prompts): NER reads sentence by
    sentence, and no letter/digit run crosses the space."""
    if not parts:
        return TextSpans(np.zeros((0, 2), dtype=np.int32), 0, 0)
    starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]], dtype=np.int32)
    blocks = [[x.guide + o for x, o in zip(parts, starts)],
              [x.entities + o for x, o in zip(parts, starts)],
              [x.alnum + o for x, o in zip(parts, starts)]]
    spans = np.concatenate([a for block in blocks for a in block]).reshape(-1, 2)
    return TextSpans(spans.astype(np.int32), sum(x.n_guide for x in parts),
                     sum(x.n_entities for x in parts))


def pad_spans(spans: Sequence[np.ndarray]) -> Tensor:
    """Per-row span arrays (S_b, 2) → (B, S, 2), padded with the empty span (0, 0)."""
    counts = np.array([len(x) for x in spans])
    out = np.zeros((len(spans), max(1, counts.max(initial=0)), 2), dtype=np.int64)
    rows = np.repeat(np.arange(len(spans)), counts)
    cols = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    if counts.sum():
        out[rows, cols] = np.concatenate(spans)
    return torch.from_numpy(out)


def overlaps(offsets: Tensor, spans: Tensor) -> Tensor:
    """(B, L) bool: does token (b, l), characters ``offsets[b, l]`` = [a, z), overlap one of the
    row's ``spans`` (B, S, 2)? The empty span (0, 0) overlaps nothing."""
    a, z = offsets[:, :, None, 0], offsets[:, :, None, 1]  # (B, L, 1)
    x, y = spans[:, None, :, 0], spans[:, None, :, 1]  # (B, 1, S)
    return ((x < z) & (a < y)).any(dim=2)


def word_ids(enc, rows: Sequence[int]) -> Tensor:
    """(R, L) long: the word index of each token of the tokenizer output's ``rows``, -1 for
    special and padding tokens."""
    ids = np.array([enc.word_ids(k) for k in rows], dtype=np.float64)  # None → nan
    return torch.from_numpy(np.nan_to_num(ids, nan=-1.0)).long().reshape(len(rows), -1)


def length_groups(lengths: Sequence[int], min_saving: float = 0.15
                  ) -> tuple[Tensor, tuple[tuple[int, int], ...]] | None:
    """Texts of a batch in up to two groups by token length, each padded to its own longest,
    so that BERT does not run over the padding of short reports up to the longest label prompt
    (the demo's batches: groups of ~38 rows of ~19 tokens and ~26 of ~57). ``lengths``: each row's tokens.

    The groups minimise the padded tokens, rows × length summed over the groups (BERT's cost is
    near linear in the length at these lengths); a split is made only when it saves at least
    ``min_saving`` of one padded call over all rows (each extra call has a fixed cost). Returns
    (the rows' positions, group after group, as a LongTensor; ((rows, length), ...)), or None:
    one call, as before."""
    n = len(lengths)
    if n == 0:
        return None
    order = sorted(range(n), key=lambda j: (lengths[j], j))
    top = lengths[order[-1]]
    best, cut = n * top, n  # cut: the short group is order[:cut]
    for i in range(1, n):
        if lengths[order[i]] != lengths[order[i - 1]]:
            cost = i * lengths[order[i - 1]] + (n - i) * top
            if cost < best:
                best, cut = cost, i
    if cut == n or best > (1 - min_saving) * n * top:
        return None
    short, long = sorted(order[:cut]), sorted(order[cut:])
    return (torch.tensor(short + long, dtype=torch.long),
            ((len(short), lengths[order[cut - 1]]), (len(long), top)))


class Collator:
    """Samples → batch dict for :class:`xlip.model.xlip.XLIP`.

    Keys: ``images`` (Bi, C, H, W) for rows with an image, ``has_image`` (B,), ``input_ids`` /
    ``attention_mask`` (B, L) clean text (report or prompt), ``text_key`` (B,) contrastive
    identity (identical reports, or prompts of the same present findings, share a key),
    ``labels`` (B, F) multi-hot findings (zeros when unknown), ``guide_mask`` (B, L) AttMIM
    guiding tokens, ``guide_fallback`` (B,) rows with no present finding, guided by all their
    content tokens instead, ``mlm_*`` masked reports of the rows in ``mlm_rows``, ``source`` (B,),
    and in training with MIM ``mim_noise`` (Bi, 2, N) the uniform numbers its masks are drawn
    from.

    Randomness comes from each sample's ``seed`` (prompt wording, the MLM row draw, the words
    masked and their replacement, the MIM draws): a row's prompt and masks are the same in any
    batch, so on any rank. The
    :class:`TextSpans` of the last ``cache_size`` distinct texts are kept, about 1.5 KB each
    with the text (reports repeat across epochs; a corpus larger than the cache gains little
    from it); each DataLoader worker holds its own.
    """

    def __init__(self, cfg: Config, tokenizer, train: bool = True,
                 findings: Sequence[str] = (), cache_size: int = 1 << 15) -> None:
        """findings: the label vocabulary that negative prompt sentences are drawn from."""
        self.cfg, self.tok, self.train = cfg, tokenizer, train
        self.findings = [f for f in findings if f != "No Finding"]
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.vocab = len(tokenizer)
        self.cache_size = cache_size
        self._spans: OrderedDict[str, TextSpans] = OrderedDict()

    def spans(self, text: str) -> TextSpans:
        """:func:`text_spans` of ``text``, from the cache when it was seen lately."""
        got = self._spans.get(text)
        if got is None:
            got = self._spans[text] = text_spans(text)
            if len(self._spans) > self.cache_size:
                self._spans.popitem(last=False)
        else:
            self._spans.move_to_end(text)
        return got

    def prompt_spans(self, sentences: Sequence[str]) -> TextSpans:
        """:func:`text_spans` of a label prompt, from its sentences' (cached with the texts:
        the sentence bank is finite, while random templates and negatives make almost every
        whole prompt new)."""
        return joined_spans([self.spans(x) for x in sentences], [len(x) for x in sentences])

    def text_for(self, s: Sample, rng: random.Random) -> tuple[str, list[str] | None]:
        """(text, its sentences when it is a label prompt, else None)."""
        if s.kind == "image_only":
            negatives: list[str] = []
            if self.cfg.data.prompt_negatives and self.train:
                pool = [f for f in self.findings if f not in s.labels]
                negatives = rng.sample(pool, min(len(pool), self.cfg.data.prompt_negatives))
            sentences = label_prompt_sentences(s.labels, rng if self.train else None, negatives)
            return " ".join(sentences), sentences
        return s.text, None

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        cfg = self.cfg
        rngs = [random.Random(s.seed ^ 0x5EED) for s in samples]
        texts, sentences = zip(*(self.text_for(s, r) for s, r in zip(samples, rngs)))
        prompt = [x is not None for x in sentences]
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
                       return_special_tokens_mask=True)
        for key in ("input_ids", "attention_mask", "offset_mapping", "special_tokens_mask"):
            enc[key] = torch.from_numpy(np.array(enc[key], dtype=np.int64))  # faster than pt
        B, L = len(samples), enc["input_ids"].shape[1]
        offsets = enc["offset_mapping"]  # (B + Bm', L, 2) characters of each token
        # word tokens: not [CLS]/[SEP]/padding (the tokens whose word id is not None)
        content = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        spans = [self.spans(t) if x is None else self.prompt_spans(x)
                 for t, x in zip(texts, sentences)]
        guide = content[:B] & overlaps(offsets[:B], pad_spans([x.guide for x in spans]))
        fallback = ~guide.any(dim=1)  # nothing present: every content token guides
        guide = torch.where(fallback[:, None], content[:B], guide)
        mlm_ids, mlm_labels = self.mask_rows(
            enc, [B + j for j in range(len(mlm_rows))] if separate else mlm_rows,
            [spans[b] if not samples[b].mlm_text else self.spans(t)  # a prompt: its spans
             for b, t in zip(mlm_rows, mlm_texts)] if separate else [spans[b] for b in mlm_rows],
            [samples[b].seed for b in mlm_rows], content)
        rows = torch.tensor(mlm_rows, dtype=torch.long)
        has_image = torch.tensor([s.image is not None for s in samples])
        images = [s.image for s in samples if s.image is not None]
        keys = [label_key(s.labels) if p else hash_int("text:" + t)
                for s, t, p in zip(samples, texts, prompt)]
        attention = enc["attention_mask"][:B]
        mlm_mask = enc["attention_mask"][B:] if separate else attention[rows]
        # the masked texts at their own longest length: reports are often far shorter than the
        # label prompts that set L, and EntMLM's BERT pass and decoder then skip the padding
        # (the columns cut are padding in every MLM row: the same masks and labels)
        Lm = int(mlm_mask.sum(1).max()) if len(mlm_rows) else L
        mlm_ids, mlm_labels, mlm_mask = mlm_ids[:, :Lm], mlm_labels[:, :Lm], mlm_mask[:, :Lm]
        batch = {
            "images": torch.stack(images) if images else torch.zeros(0, 1, 1, 1),
            "has_image": has_image,
            "input_ids": enc["input_ids"][:B],
            "attention_mask": attention,
            "text_key": torch.tensor(keys, dtype=torch.long),
            "labels": torch.tensor([label_vector(s.labels) for s in samples]),
            "guide_mask": guide,
            "guide_fallback": fallback,
            "source": torch.tensor([s.source for s in samples]),
            "mlm_rows": rows,
            "mlm_input_ids": mlm_ids,
            "mlm_attention_mask": mlm_mask,
            "mlm_labels": mlm_labels,
            "mlm_positions": mlm_positions(mlm_labels),  # here, not on the device: see its doc
        }
        # the clean texts of the image rows, by length (BERT's pass); not under train.compile,
        # where every new (rows, length) of a group would be one more shape to compile for
        grouped = (length_groups(attention[has_image].sum(1).tolist())
                   if images and not cfg.train.compile else None)
        if grouped is not None:
            batch["clean_rows"], batch["clean_groups"] = grouped
        if self.train and cfg.mim.policy != "none":  # MIM's draws, from each image's seed
            n = cfg.vision.grid ** 2
            seeds = [s.seed for s in samples if s.image is not None]
            batch["mim_noise"] = (seeded_uniform(seeds, 2 * n, 4).float().reshape(-1, 2, n)
                                  if seeds else torch.zeros(0, 2, n))
        return batch

    def mask_rows(self, enc, rows: list[int], spans: list[TextSpans], seeds: list[int],
                  content: Tensor) -> tuple[Tensor, Tensor]:
        """EntMLM on the tokenizer output's ``rows``: (masked ids, labels), each (R, L).

        A word is a run of tokens with one word id; it is a candidate when its characters hold
        a letter or digit, an entity word when they overlap an NER entity. Every token of a
        chosen word is masked (BERT 80/10/10) except special tokens such as [UNK].
        """
        L = enc["input_ids"].shape[1]
        if not rows:
            return torch.zeros(0, L, dtype=torch.long), torch.zeros(0, L, dtype=torch.long)
        cfg, R = self.cfg.mlm, len(rows)
        idx = torch.tensor(rows, dtype=torch.long)
        ids, offsets, valid = enc["input_ids"][idx], enc["offset_mapping"][idx], content[idx]
        word = word_ids(enc, rows)  # (R, L), -1 off words
        valid &= word >= 0
        W = int(word.max()) + 1 if valid.any() else 1
        slot = (torch.arange(R)[:, None] * W + word.clamp(min=0))[valid]  # flat (r, word)

        def per_word(flags: Tensor) -> Tensor:  # token flags (R, L) → any over a word (R, W)
            out = torch.zeros(R * W, dtype=torch.long)
            return out.index_add_(0, slot, flags[valid].long()).reshape(R, W) > 0

        candidate = per_word(overlaps(offsets, pad_spans([x.alnum for x in spans])))
        entity = per_word(overlaps(offsets, pad_spans([x.entities for x in spans])))
        chosen = select_mlm_words(seeded_uniform(seeds, W, 1), candidate, entity, cfg.policy,
                                  cfg.max_ratio, cfg.min_ratio)  # (R, W)
        tokens = valid & chosen.gather(1, word.clamp(min=0)) & ~torch.isin(ids, self.special)
        random_ids = (seeded_uniform(seeds, L, 3) * self.vocab).long()
        return mask_tokens(ids, tokens, seeded_uniform(seeds, L, 2), random_ids,
                           self.tok.mask_token_id)
