"""A corpus on disk (PNGs, ``manifest.csv``, ``synth.json``) and a labelled contact sheet."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
from pathlib import Path

import numpy as np

from xlip.data.manifest import COLUMNS
from xlip.data.synthetic.config import NO_FINDING, SYNTH_FINDINGS, SynthConfig
from xlip.data.synthetic.render import render_study
from xlip.data.synthetic.reports import write_report
from xlip.errors import InputError

SPLITS = {"train": 0, "test": 1}


def study(seed: int, split: str, index: int,
          cfg: SynthConfig) -> tuple[np.ndarray, dict[str, dict], str]:
    """Image, findings and report of sample ``index`` of ``split``; depends only on these."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    image, findings = render_study(rng, cfg)
    return image, findings, write_report(findings, rng)


def synthesize(out_dir, *, n_train: int, n_test: int, seed: int = 0,
               cfg: SynthConfig | None = None, image_only_fraction: float = 0.25,
               text_only_fraction: float = 0.1, workers: int = 1, progress: bool = False) -> Path:
    """Write a synthetic corpus: PNGs, ``manifest.csv`` and ``synth.json``; returns the manifest.

    Training rows are split into image-only (image + labels), text-only (report + labels) and
    paired rows by the two fractions; test rows are all paired. Every byte depends only on
    ``(seed, split, index)`` and the config, not on ``workers``.
    """
    cfg = cfg or SynthConfig()
    if n_train < 0 or n_test < 0:
        raise InputError(f"synthesize: n_train={n_train} and n_test={n_test} must be >= 0")
    if (image_only_fraction < 0 or text_only_fraction < 0
            or image_only_fraction + text_only_fraction > 1):
        raise InputError(f"synthesize: image_only_fraction={image_only_fraction} and "
                         f"text_only_fraction={text_only_fraction} "
                         "must be >= 0 and sum to at most 1")
    out = Path(out_dir)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    kinds = _train_kinds(n_train, image_only_fraction, text_only_fraction, seed)
    jobs = [(str(out), cfg, seed, "train", i, k) for i, k in enumerate(kinds)]
    jobs += [(str(out), cfg, seed, "test", i, "paired") for i in range(n_test)]
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            rows_iter = pool.imap(_make_row, jobs, chunksize=32)
            rows = list(_progress(rows_iter, len(jobs), progress))
    else:
        rows = list(_progress(map(_make_row, jobs), len(jobs), progress))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "generator": "xlip.data.synthetic",
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_only_fraction": image_only_fraction,
        "text_only_fraction": text_only_fraction,
        "config": cfg.to_dict(),
        "findings": list(SYNTH_FINDINGS),
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return manifest


def _train_kinds(n: int, image_only: float, text_only: float, seed: int) -> list[str]:
    kinds = np.array(["paired"] * n, dtype=object)
    n_img, n_txt = int(round(n * image_only)), int(round(n * text_only))
    perm = np.random.default_rng([seed, 7, n]).permutation(n)
    kinds[perm[:n_img]] = "image_only"
    kinds[perm[n_img : n_img + n_txt]] = "text_only"
    return list(kinds)


def _make_row(job: tuple) -> dict[str, str]:
    from PIL import Image

    out_dir, cfg, seed, split, index, kind = job
    image, findings, report = study(seed, split, index, cfg)
    rel = ""
    if kind != "text_only":
        rel = f"images/{split}/{index:06d}.png"
        Image.fromarray(image).save(Path(out_dir) / rel)
    patient = f"syn{seed}-{split}-{index:06d}"
    return {"image": rel, "text": "" if kind == "image_only" else report,
            "labels": _labels(findings), "split": split, "patient_id": patient,
            "study_id": f"{patient}-s1", "view": "PA", "source": "synthetic"}


def _labels(findings: dict[str, dict]) -> str:
    return ";".join(f for f in SYNTH_FINDINGS if f in findings) or NO_FINDING


def _progress(it, total: int, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthesize", unit="img")


def montage(out_png, *, seed: int = 0, cfg: SynthConfig | None = None, per_finding: int = 4,
            scale: int = 2) -> Path:
    """A labelled contact sheet: one row per finding (that finding alone, ``per_finding``
    examples) and a row of normal studies. Names and attributes go in the margins only."""
    from PIL import Image, ImageDraw, ImageFont

    cfg = cfg or SynthConfig()
    tile = cfg.size * scale
    margin, caption = 150, 16
    rows = [*SYNTH_FINDINGS, NO_FINDING]
    sheet = Image.new("L", (margin + per_finding * (tile + 4), len(rows) * (tile + caption + 4)),
                      255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for r, name in enumerate(rows):
        force = {f: f == name for f in SYNTH_FINDINGS}
        row_cfg = dataclasses.replace(cfg, force=force)
        top = r * (tile + caption + 4)
        draw.text((6, top + tile // 2 - 8), name, fill=0, font=font)
        for j in range(per_finding):
            image, findings = render_study(np.random.default_rng([seed, 100 + r, j]), row_cfg)
            left = margin + j * (tile + 4)
            sheet.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (left, top))
            if name in findings:
                text = _caption(name, findings[name])
            else:
                text = "normal" if name == NO_FINDING else "(not placed)"
            draw.text((left + 2, top + tile + 1), text, fill=0, font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _caption(name: str, attrs: dict) -> str:
    if name == "Support Devices":
        short = {"endotracheal tube": "ETT", "nasogastric tube": "NGT",
                 "central venous catheter": "CVC", "pacemaker": "PM"}
        return " ".join(short[d] for d in attrs["devices"])
    keys = ("laterality", "zone", "size", "severity", "pattern", "diameter_px")
    return " ".join(str(attrs[k]) for k in keys if k in attrs)
