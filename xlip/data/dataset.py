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
