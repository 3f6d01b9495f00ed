"""Linear probe: how well a frozen image encoder's features separate the findings.

The protocol of MGCA, MRM and BenchX: the pre-trained image encoder is frozen, its pooled
features are computed once per image, and one L2-regularised logistic regression per finding
(multi-label) is trained on them. The regularisation strength is chosen on a validation split,
never on the test split; the test AUC per finding comes with a bootstrap 95 % CI.
``init="random"`` probes the same architecture untrained: the no-pre-training row every table
needs beside the pre-trained one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from xlip.config import Config
from xlip.data.images import prepare_image
from xlip.data.manifest import Record
from xlip.data.splits import (HELD_OUT_VAL, check_fraction, check_split_file, check_subset,
                              hold_out, nested_fractions, patient_key)
from xlip.errors import InputError
from xlip.eval.metrics import auc, auc_table
from xlip.eval.zeroshot import default_findings, image_rows, of_split
from xlip.precision import autocast

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # inverse L2 strength


@dataclass(frozen=True)
class ProbeOptions:
    """What :func:`linear_probe` trains and tests on."""

    manifest: str | Path  # training (and validation) rows
    test_manifest: str | Path | None = None  # default: ``manifest``
    split: str = "train"
    val_split: str = "valid"
    test_split: str = "test"
    fraction: float = 1.0  # share of the training patients used (xlip.data.splits' selection)
    init: str = "pretrained"  # pretrained | random (the same architecture, untrained)
    findings: tuple[str, ...] = ()  # empty: every finding with both classes in the test split
    seed: int = 0  # of the training fraction and the held-out validation patients

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if self.init not in ("pretrained", "random"):
            raise InputError(f"--init {self.init!r}: choose pretrained or random")


def decode_images(paths: Sequence[str], cfg: Config) -> torch.Tensor:
    """(n, 1, S, S) the evaluation view of image files (no augmentation)."""
    return torch.stack([prepare_image(p, cfg.vision.image_size, stats=cfg.pixel_stats())
                        for p in paths])


@torch.no_grad()
def pooled_features(model, images: Sequence[str] | torch.Tensor, cfg: Config,
                    batch_size: int = 128, progress: str = "") -> np.ndarray:
    """(n, width) pooled image-encoder features (before the contrastive projection) of image
    files or of images :func:`decode_images` decoded; ``progress``: the label of a progress bar
    on stderr (none when empty)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with tqdm(total=len(images), desc=progress, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = (chunk if isinstance(chunk, torch.Tensor)
                 else decode_images(chunk, cfg)).to(device)
            with autocast(cfg.train.precision, device):
                out.append(model.vision(x)["pooled"].float().cpu())
            bar.update(len(x))
    return torch.cat(out).numpy()


def split_rows(opt: ProbeOptions) -> tuple[list[Record], list[Record], list[Record], str]:
    """Training, validation and test rows (images with labels), and how validation was made.

    ``opt.fraction`` < 1 keeps that share of the training patients, selected as ``xlip data
    split`` selects them (:func:`xlip.data.splits.nested_fractions`). A manifest written by
    ``xlip data split`` whose content has changed since is refused."""
    rows = image_rows(opt.manifest)
    test_manifest = opt.test_manifest or opt.manifest
    test_rows = rows if test_manifest == opt.manifest else image_rows(test_manifest)
    split_hashes(opt)  # refuses a changed split file
    train = of_split(rows, opt.split, opt.manifest)
    val = [r for r in rows if r.split == opt.val_split]
    how = f"split {opt.val_split!r} of {opt.manifest}"
    if not val:  # no validation rows: hold out training patients
        train, val = hold_out(train, opt.seed)
        how = (f"{HELD_OUT_VAL:.0%} of the training patients (seed {opt.seed}), as {opt.manifest} "
               f"has no {opt.val_split!r} rows")
    if opt.fraction < 1.0:
        patients = len({patient_key(r) for r in train})
        keep = nested_fractions(train, [opt.fraction], opt.seed)[opt.fraction]
        train = [train[i] for i in keep]
        check_subset(opt.fraction, train, patients)
    test = of_split(test_rows, opt.test_split, test_manifest)
    check_disjoint({"training": train, "validation": val, "test": test})
    return train, val, test, how


def split_hashes(opt: ProbeOptions) -> dict[str, str]:
    """``split_sha256`` and ``test_split_sha256``: the manifests' content hashes (the recorded
    ones for split files, which are refused when changed)."""
    return {"split_sha256": check_split_file(opt.manifest),
            "test_split_sha256": check_split_file(opt.test_manifest or opt.manifest)}


def check_disjoint(parts: dict[str, list[Record]]) -> None:
    """No image and no patient in two of training, validation and test: C chosen on rows that
    are also tested on (or trained on) would be a leak."""
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            images = {r.image for r in parts[a]} & {r.image for r in parts[b]}
            patients = ({r.patient_id for r in parts[a] if r.patient_id}
                        & {r.patient_id for r in parts[b] if r.patient_id})
            if images or patients:
                what = (f"{len(images)} images (e.g. {sorted(images)[0]})" if images else
                        f"{len(patients)} patients (e.g. {sorted(patients)[0]})")
                raise InputError(f"the probe's {a} and {b} rows share {what}: choose splits "
                                 "that are patient-disjoint (--split, --val-split, --test-split)")


def usable_findings(findings: Sequence[str], *parts: list[Record]) -> list[str]:
    """The findings with positive and negative images in every non-empty part."""
    return [f for f in findings
            if all(0 < sum(f in r.labels for r in rows) < len(rows) for rows in parts if rows)]


def labels(records: Sequence[Record], findings: Sequence[str]) -> np.ndarray:
    return np.array([[f in r.labels for f in findings] for r in records], dtype=int)


def linear_probe(model, cfg: Config, opt: ProbeOptions, bootstrap: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Fit and test the probe; returns the result dict written to ``probe.json``."""
    return linear_probes(model, cfg, opt, [opt.fraction], bootstrap, progress)[opt.fraction]


def linear_probes(model, cfg: Config, opt: ProbeOptions, fractions: Sequence[float],
                  bootstrap: int | None = None, progress: bool = False
                  ) -> dict[float, dict[str, Any]]:
    """One probe per label fraction (``opt.fraction`` aside), on features computed once. The
    validation and test rows are the same for every fraction. A fraction too small to hold
    both classes of any finding gives ``{"error": why}``; when every fraction does, this
    raises."""
    t0 = time.perf_counter()
    train, val, test, how = split_rows(dataclasses.replace(opt, fraction=1.0))
    # one finding set for every fraction (those with both classes in the full training,
    # validation and test rows), so that the fractions' mean AUCs are comparable
    findings = usable_findings(list(opt.findings) or default_findings(test), train, val, test)
    if not findings:
        raise InputError(f"no finding has positive and negative images in each of training "
                         f"({len(train)} images), validation ({len(val)}) and test "
                         f"({len(test)}): choose other splits")
    opt = dataclasses.replace(opt, findings=tuple(findings))
    hashes = split_hashes(opt)
    chosen = nested_fractions(train, fractions, opt.seed)
    patients = len({patient_key(r) for r in train})
    feats = [pooled_features(model, [r.image for r in rows], cfg,
                             progress=f"features {name}" if progress else "")
             for name, rows in (("train", train), ("valid", val), ("test", test))]
    out = {}
    for fraction in fractions:
        keep = chosen[fraction]
        sub = dataclasses.replace(opt, fraction=fraction)
        try:
            check_subset(fraction, [train[i] for i in keep], patients)
            out[fraction] = fit_probe(sub, [train[i] for i in keep], val, test,
                                      feats[0][keep], feats[1], feats[2], how,
                                      cfg.eval.bootstrap if bootstrap is None else bootstrap)
            out[fraction].update(hashes)
        except InputError as err:
            if len(fractions) == 1:
                raise
            out[fraction] = {"error": str(err), "fraction": fraction}
        out[fraction]["wall_s"] = time.perf_counter() - t0
    if all("error" in r for r in out.values()):
        raise InputError(next(iter(out.values()))["error"])
    return out


def fit_probe(opt: ProbeOptions, train: list[Record], val: list[Record], test: list[Record],
              ftr: np.ndarray, fva: np.ndarray, fte: np.ndarray, how: str, n_boot: int
              ) -> dict[str, Any]:
    """The logistic regressions on given features: C chosen on validation, tested on test.

    A finding without both classes among these training rows (a small fraction) cannot be
    learnt: it scores a constant (AUC 0.5) and is listed in ``no_training_class``."""
    asked = list(opt.findings) or default_findings(test)
    findings = usable_findings(asked, [], val, test)
    skipped = [f for f in asked if f not in findings]
    if not findings:
        raise InputError(f"no finding has positive and negative images in both validation "
                         f"({len(val)} images) and test ({len(test)}): choose other splits")
    ytr, yva, yte = (labels(x, findings) for x in (train, val, test))
    if not any(0 < ytr[:, j].sum() < len(ytr) for j in range(len(findings))):
        raise InputError(f"no finding has positive and negative images among the {len(train)} "
                         "training images: use a larger --fraction or other splits")
    constant = [f for j, f in enumerate(findings) if not 0 < ytr[:, j].sum() < len(ytr)]
    scaler = StandardScaler().fit(ftr)
    xtr, xva, xte = (scaler.transform(f) for f in (ftr, fva, fte))

    class Constant:  # the model of a finding with one class in training
        def decision_function(self, x: np.ndarray) -> np.ndarray:
            return np.zeros(len(x))

    def fit(c: float, j: int):
        if findings[j] in constant:
            return Constant()
        return LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr[:, j])

    val_auc = {c: float(np.mean([auc(yva[:, j], fit(c, j).decision_function(xva))
                                 for j in range(len(findings))])) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (val_auc[c], -c))  # ties: the stronger regularisation
    score = np.stack([fit(best, j).decision_function(xte) for j in range(len(findings))], 1)
    per, mean_ci = auc_table(findings, yte, score, ytr, n_boot)
    return {"protocol": "linear_probe", "mean_auc": float(np.mean([p["auc"] for p in
                                                                    per.values()])),
            "mean_auc_ci95": mean_ci, "per_finding": per, "fraction": opt.fraction,
            "init": opt.init, "C": best, "val_mean_auc_by_C": {str(c): v for c, v in
                                                              val_auc.items()},
            "validation": how, "skipped_findings": skipped, "no_training_class": constant,
            "n_train": len(train), "n_val": len(val), "n_test": len(test),
            "features": int(xtr.shape[1]), "manifest": str(opt.manifest),
            "test_manifest": str(opt.test_manifest or opt.manifest), "split": opt.split,
            "test_split": opt.test_split, "seed": opt.seed}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Linear probe ({result['init']} encoder, {result['fraction']:g} of the training "
             f"labels)", "",
             f"Frozen pooled image features ({result['features']} dims), one logistic "
             f"regression per finding, C = {result['C']:g} chosen on validation "
             f"({result['validation']}); {result['n_train']} training, {result['n_val']} "
             f"validation and {result['n_test']} test images ({result['test_manifest']} split "
             f"`{result['test_split']}`).", ""]
    if "split_sha256" in result:  # linear_probes' results (fit_probe alone has no manifests)
        lines += [f"Manifest sha256 `{result['split_sha256'][:12]}…`, test manifest "
                  f"`{result['test_split_sha256'][:12]}…` (full hashes in probe.json).", ""]
    lines += finding_table(result, "validation or test")
    return "\n".join(lines) + "\n"


def finding_table(result: dict[str, Any], missing_in: str) -> list[str]:
    """The per-finding test AUC table of a probe or fine-tuning result, and the findings left
    out (a class missing in ``missing_in``) or scored as chance."""
    lines = ["| finding | AUC | 95% CI | test positives / n | training positives |",
             "|---|---|---|---|---|"]
    for f, d in result["per_finding"].items():
        lo, hi = d["auc_ci95"]
        lines.append(f"| {f} | {d['auc']:.3f} | {lo:.3f}–{hi:.3f} | {d['positives']} / "
                     f"{d['n']} | {d['train_positives']} |")
    lo, hi = result["mean_auc_ci95"]
    lines.append(f"| **mean** | **{result['mean_auc']:.3f}** | {lo:.3f}–{hi:.3f} | | |")
    if result["skipped_findings"]:
        lines += ["", f"Left out (a class missing in {missing_in}): "
                  + ", ".join(result["skipped_findings"])]
    if result["no_training_class"]:
        lines += ["", "Scored as chance (AUC 0.5: one class only among the training images): "
                  + ", ".join(result["no_training_class"])]
    return lines


def write_probe(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "probe.json", out_dir / "probe.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(result))
    return js, md
