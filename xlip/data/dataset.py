"""Training data: per-source datasets of :class:`~xlip.data.collate.Sample` rows.

A *source* is the rows of one kind (paired / image-only / text-only) from one manifest, drawn
into every batch with a configured weight (:mod:`xlip.data.sampler`); :mod:`xlip.data.collate`
turns the samples into a batch.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

from torch.utils.data import Dataset

from xlip.config import Config, SourceConfig
from xlip.data.collate import Sample
from xlip.data.images import prepare_image
from xlip.data.manifest import ManifestError, Record, load_manifest
from xlip.text.sections import select_text


def source_records(src: SourceConfig, cfg: Config, manifests: dict[str, list[Record]],
                   rejects_dir: Path | None = None) -> list[Record]:
    """Rows of ``src.kind`` and ``src.split`` from its manifest (manifests cached by path)."""
    key = str(Path(src.manifest).resolve())
    if key not in manifests:
        rejects = (rejects_dir / f"{Path(src.manifest).stem}.rejects.csv") if rejects_dir else None
        manifests[key] = load_manifest(src.manifest, verify_images=cfg.data.verify_images,
                                       rejects=rejects, skip_bad=cfg.data.skip_bad)
    rows, unlabelled, empty = usable_rows(src, cfg, manifests[key])
    report_left_out(src, cfg, len(rows), unlabelled, [r.row for r in empty[:8]], len(empty))
    return rows


def usable_rows(src: SourceConfig, cfg: Config,
                rows: list[Record]) -> tuple[list[Record], int, list[Record]]:
    """The rows of ``src.kind`` and ``src.split`` that train: (kept, image-only rows left out for
    having only negative labels, report rows with no text in the sections data.text_policy
    reads). The one rule for map-style sources and streamed shards (:mod:`xlip.data.stream`)."""
    rows = [r for r in rows if r.split == src.split and r.kind == src.kind]
    if src.kind == "image_only":
        # a label prompt needs a present finding (or No Finding): rows known only by what they
        # lack (an RSNA / SIIM negative) cannot say what the image shows
        kept = [r for r in rows if r.labels]
        return kept, len(rows) - len(kept), []
    # reports must have text in the sections training reads: found now, not mid-run
    empty = [r for r in rows if not select_text(r.text, cfg.data.text_policy).strip()]
    dropped = {id(r) for r in empty}
    return [r for r in rows if id(r) not in dropped], 0, empty


def report_left_out(src: SourceConfig, cfg: Config, kept: int, unlabelled: int,
                    empty_head: list[int], empty: int) -> None:
    """Warn about (or, without data.skip_bad, refuse) the rows :func:`usable_rows` left out;
    refuse a source with no rows. ``empty_head``: the first few rows without text."""
    where = src.manifest or src.shards
    if unlabelled:
        warnings.warn(f"{where}: {unlabelled} image-only rows of split {src.split!r} "
                      "have only negative labels and make no label prompt; left out of "
                      f"source {src.name or src.kind}", stacklevel=3)
    if empty:
        head = ", ".join(str(r) for r in empty_head)
        msg = (f"{where}: {empty} {src.kind} rows of split {src.split!r} have no "
               f"text in the sections data.text_policy={cfg.data.text_policy} reads "
               f"(rows {head}{', ...' if empty > len(empty_head) else ''})")
        if not cfg.data.skip_bad:
            raise ManifestError(msg + ". Choose another data.text_policy, remove the rows, "
                                "or set data.skip_bad=true to train without them.")
        warnings.warn(msg + "; left out (data.skip_bad=true)", stacklevel=3)
    if not kept:
        raise ManifestError(f"{where}: no {src.kind} rows in split {src.split!r} "
                            f"(data source {src.name or src.kind})")


def make_sample(cfg: Config, train: bool, source: int, kind: str, rec: Record, other: Record,
                seed: int) -> Sample:
    """Row ``rec`` of source number ``source`` as a :class:`Sample`: its image loaded (augmented
    when ``train`` and data.augment, from ``seed``), the sections of ``other``'s report (``rec``
    itself unless data.shuffle_pairs) that training reads."""
    rng = random.Random(seed)
    image = None
    if rec.image:
        image = prepare_image(rec.image, cfg.vision.image_size,
                              rng if (train and cfg.data.augment) else None, cfg.pixel_stats())
    text = select_text(other.text, cfg.data.text_policy) if other.text else ""
    if rec.kind != "image_only" and not text.strip():
        raise ManifestError(f"{rec.source} row {rec.row}: report is empty after section "
                            f"selection (data.text_policy={cfg.data.text_policy})")
    mlm_text = ""
    if other.text and cfg.mlm.text_policy not in ("", cfg.data.text_policy):
        mlm_text = select_text(other.text, cfg.mlm.text_policy)
    return Sample(source, kind, text, other.labels, image, seed, mlm_text)


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
        return make_sample(self.cfg, self.train, s, self.sources[s].kind, rec, other, seed)
