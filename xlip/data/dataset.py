"""Training data: per-source datasets, the mixed-kind batch sampler and the XLIP collator.

A *source* is the rows of one kind (paired / image-only / text-only) from one manifest, drawn
into every batch with a configured weight. The collator tokenises texts, builds disease-kind
prompts for image-only rows, marks AttMIM guiding tokens and applies EntMLM masking.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from xlip.config import Config, SourceConfig
from xlip.data.images import prepare_image
from xlip.data.manifest import ManifestError, Record, load_manifest
from xlip.masking import mask_tokens, select_mlm_words
from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.ner import extract_entities, guide_entities
from xlip.text.prompts import label_prompt
from xlip.text.sections import select_text


@dataclass
class Sample:
    """One row ready for collation."""

    source: int
    kind: str  # paired | image_only | text_only
    text: str  # report section text, or "" for image-only rows (prompt made in collate)
    labels: tuple[str, ...]
    image: Tensor | None  # (C, H, W)
    seed: int  # per-draw seed for prompt/masking randomness
    mlm_text: str = ""  # the sections EntMLM masks when mlm.text_policy differs ("": text)


def source_records(src: SourceConfig, cfg: Config, manifests: dict[str, list[Record]],
                   rejects_dir: Path | None = None) -> list[Record]:
    """Rows of ``src.kind`` and ``src.split`` from its manifest (manifests cached by path)."""
    key = str(Path(src.manifest).resolve())
    if key not in manifests:
        rejects = (rejects_dir / f"{Path(src.manifest).stem}.rejects.csv") if rejects_dir else None
        manifests[key] = load_manifest(src.manifest, verify_images=cfg.data.verify_images,
                                       rejects=rejects, skip_bad=cfg.data.skip_bad)
    rows = [r for r in manifests[key] if r.split == src.split and r.kind == src.kind]
    if src.kind == "image_only":
        # a label prompt needs a present finding (or No Finding): rows known only by what they
        # lack (an RSNA / SIIM negative) cannot say what the image shows
        unlabelled = sum(not r.labels for r in rows)
        if unlabelled:
            warnings.warn(f"{src.manifest}: {unlabelled} image-only rows of split {src.split!r} "
                          "have only negative labels and make no label prompt; left out of "
                          f"source {src.name or src.kind}", stacklevel=2)
        rows = [r for r in rows if r.labels]
    else:  # reports must have text in the sections training reads: found now, not mid-run
        empty = [r for r in rows if not select_text(r.text, cfg.data.text_policy).strip()]
        if empty:
            head = ", ".join(str(r.row) for r in empty[:8])
            msg = (f"{src.manifest}: {len(empty)} {src.kind} rows of split {src.split!r} have no "
                   f"text in the sections data.text_policy={cfg.data.text_policy} reads "
                   f"(rows {head}{', ...' if len(empty) > 8 else ''})")
            if not cfg.data.skip_bad:
                raise ManifestError(msg + ". Choose another data.text_policy, remove the rows, "
                                    "or set data.skip_bad=true to train without them.")
            warnings.warn(msg + "; left out (data.skip_bad=true)", stacklevel=2)
            dropped = {id(r) for r in empty}
            rows = [r for r in rows if id(r) not in dropped]
    if not rows:
        raise ManifestError(f"{src.manifest}: no {src.kind} rows in split {src.split!r} "
                            f"(data source {src.name or src.kind})")
    return rows


class MixedDataset(Dataset):
    """All sources concatenated; index = (source offset + row)."""

    def __init__(self, cfg: Config, train: bool = True, rejects_dir: Path | None = None) -> None:
        self.cfg, self.train = cfg, train
        cache: dict[str, list[Record]] = {}
        self.sources = cfg.data.sources
        self.records = [source_records(s, cfg, cache, rejects_dir) for s in self.sources]
        self.names = [s.name or s.kind for s in self.sources]
        if len(set(self.names)) != len(self.names):
            raise ManifestError(f"data source names repeat: {self.names}; set data.sources[i].name")
        self.offsets = [0]
        for recs in self.records:
            self.offsets.append(self.offsets[-1] + len(recs))
        # control experiment: every row takes the text/labels of another row of its source
        self.partner = [list(range(len(r))) for r in self.records]
        if cfg.data.shuffle_pairs:
            g = random.Random(cfg.train.seed + 7919)
            for p in self.partner:
                g.shuffle(p)

    def __len__(self) -> int:
        return self.offsets[-1]

    def image_paths(self) -> list[str]:
        return [r.image for recs in self.records for r in recs if r.image]

    def findings(self) -> list[str]:
        """Every label that occurs in the training sources, sorted."""
        return sorted({lab for recs in self.records for r in recs for lab in r.labels})

    def locate(self, index: int) -> tuple[int, int]:
        for s in range(len(self.records)):
            if index < self.offsets[s + 1]:
                return s, index - self.offsets[s]
        raise IndexError(index)

    def __getitem__(self, item: tuple[int, int]) -> Sample:
        index, seed = item
        s, i = self.locate(index)
        rec = self.records[s][i]
        other = self.records[s][self.partner[s][i]]
        rng = random.Random(seed)
        image = None
        if rec.image:
            image = prepare_image(rec.image, self.cfg.vision.image_size,
                                  rng if (self.train and self.cfg.data.augment) else None,
                                  self.cfg.pixel_stats())
        text = select_text(other.text, self.cfg.data.text_policy) if other.text else ""
        if rec.kind != "image_only" and not text.strip():
            raise ManifestError(f"{rec.source} row {rec.row}: report is empty after section "
                                f"selection (data.text_policy={self.cfg.data.text_policy})")
        mlm_text = ""
        if other.text and self.cfg.mlm.text_policy not in ("", self.cfg.data.text_policy):
            mlm_text = select_text(other.text, self.cfg.mlm.text_policy)
        return Sample(s, self.sources[s].kind, text, other.labels, image, seed, mlm_text)


class MixedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches with a fixed number of rows from each source, by weight (largest remainder).

    Pure function of (seed, step): the k-th draw from source s is row ``perm_{s,e}[k mod n_s]``
    with epoch e = k // n_s, so resuming needs only the step. DDP-aware: every rank's batch has
    the same composition (``quotas(weights, batch_size)`` rows per source), so the contrastive
    rows that ranks gather have equal counts; rank r of w takes draws
    ``[(step·w + r)·q_s, (step·w + r + 1)·q_s)`` of source s, and the w ranks together draw
    exactly the rows of a one-process batch of w·batch_size when the quotas scale (e.g. equal
    weights).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int,
                 seed: int = 0, start_step: int = 0, steps: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sizes, self.seed = list(sizes), seed
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.start_step, self.steps = start_step, steps
        self.quota = quotas(weights, batch_size)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._perm: dict[tuple[int, int], list[int]] = {}

    def perm(self, s: int, epoch: int) -> list[int]:
        key = (s, epoch)
        if key not in self._perm:
            if len(self._perm) > 4 * len(self.sizes):
                self._perm.clear()
            p = list(range(self.sizes[s]))
            random.Random(hash_int(f"{self.seed}/{s}/{epoch}")).shuffle(p)
            self._perm[key] = p
        return self._perm[key]

    def rank_batch(self, step: int, rank: int) -> list[tuple[int, int]]:
        """(dataset index, per-draw seed) of ``rank``'s rows at ``step``."""
        out = []
        for s, q in enumerate(self.quota):
            n = self.sizes[s]
            first = (step * self.world + rank) * q
            for k in range(first, first + q):
                row = self.perm(s, k // n)[k % n]
                out.append((self.offsets[s] + row, hash_int(f"{self.seed}/{s}/{k}")))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.steps:
            yield self.rank_batch(step, self.rank)
            step += 1

    def __len__(self) -> int:
        return (self.steps or 0) - self.start_step


def quotas(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` by ``weights`` with the largest-remainder method (each ≥ 1 if possible)."""
    w = [x / sum(weights) for x in weights]
    raw = [x * total for x in w]
    q = [int(r) for r in raw]
    for i in sorted(range(len(w)), key=lambda i: raw[i] - q[i], reverse=True)[:total - sum(q)]:
        q[i] += 1
    for i in range(len(q)):  # every source appears in each batch
        if q[i] == 0 and total >= len(q):
            j = max(range(len(q)), key=lambda j: q[j])
            q[i], q[j] = 1, q[j] - 1
    return q


def hash_int(text: str) -> int:
    """Stable 63-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


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
