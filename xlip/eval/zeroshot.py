"""Zero-shot classification with the prompt lists of a named prompt set (:mod:`xlip.text.prompts`).

Multi-label (the default): per finding a positive and a negative prompt list; an image's score is
the softmax probability of the positive list over the pair. AUC with bootstrap 95% CIs; F1 and
ACC at a threshold fixed at 0.5, or chosen per finding to maximise F1 on a validation split
(never on the split tested). Multi-class: each class is the mean embedding of its positive
prompts, softmax over the classes, on the rows whose labels hold exactly one class; accuracy,
one-vs-rest AUC per class and their mean (macro), confusion matrix. ``prompt_set="all"`` scores
every set on the same image embeddings and tabulates how much the AUCs move between sets.
"""

from __future__ import annotations

import difflib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tqdm import tqdm

from xlip.config import Config, ConfigError
from xlip.data.images import prepare_image
from xlip.data.manifest import ManifestError, Record, load_manifest
from xlip.errors import InputError
from xlip.eval.metrics import (auc, best_f1_threshold, bootstrap_ci, bootstrap_mean_ci, f1_acc,
                               multiclass_metrics)
from xlip.eval.roc import Curve, Panel, roc_figure
from xlip.files import write_atomic
from xlip.precision import autocast
from xlip.text.prompts import DEFAULT_PROMPT_SET, PROMPT_SETS, zeroshot_prompts

MODES = ("multilabel", "multiclass")
ALL_SETS = "all"  # prompt_set: every set of PROMPT_SETS
FIXED_THRESHOLD = 0.5


@torch.no_grad()
def class_embeddings(model, tokenizer, findings: Sequence[str], max_length: int,
                     prompt_set: str = DEFAULT_PROMPT_SET
                     ) -> tuple[torch.Tensor, dict[str, dict[str, list[str]]]]:
    """(F, 2, E): for each finding the mean unit embedding of its positive and negative prompts
    (of ``prompt_set``); and the prompts, ``{finding: {"positive": [...], "negative": [...]}}``."""
    device = next(model.parameters()).device
    out, used = [], {}
    for f in findings:
        pos, neg = zeroshot_prompts(f, prompt_set)
        used[f] = {"positive": list(pos), "negative": list(neg)}
        pair = []
        for prompts in (pos, neg):
            enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            e = model.encode_text(enc["input_ids"], enc["attention_mask"]).mean(dim=0)
            pair.append(F.normalize(e, dim=-1))
        out.append(torch.stack(pair))
    return torch.stack(out), used


@torch.no_grad()
def encode_images(model, paths: Sequence[str], size: int, batch_size: int = 128,
                  stats: tuple[float, float] | None = None,
                  precision: str = "auto", progress: str = "") -> torch.Tensor:
    """(B, E) embeddings of image files; ``stats``: the model's dataset normalisation;
    ``precision``: the model's ``train.precision`` (auto | bf16 | fp32); ``progress``: the
    label of a progress bar on stderr (none when empty)."""
    device = next(model.parameters()).device
    embs = []
    with tqdm(total=len(paths), desc=progress, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(paths), batch_size):
            x = torch.stack([prepare_image(p, size, stats=stats)
                             for p in paths[i:i + batch_size]]).to(device)
            embs.append(encode_tensor(model, x, precision))
            bar.update(len(x))
    return torch.cat(embs)


@torch.no_grad()
def encode_tensor(model, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """(B, E) fp32 embeddings of normalised images, under bf16 autocast where ``precision``
    (the model's ``train.precision``) chooses it, as in training."""
    with autocast(precision, images.device):
        return model.encode_image(images).float()


def positive_probability(image_emb: torch.Tensor, class_emb: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """(B, E) × (F, 2, E) → (B, F): softmax over [positive, negative] of scaled cosines."""
    logits = scale * torch.einsum("be,fke->bfk", image_emb.float(), class_emb.float())
    return logits.softmax(dim=-1)[..., 0]


def class_probability(image_emb: torch.Tensor, class_emb: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """(B, E) × (C, 2, E) → (B, C): softmax over the classes of the scaled cosines with each
    class's positive prompt embedding (the negatives play no part)."""
    logits = scale * image_emb.float() @ class_emb[:, 0].float().T  # (B, C)
    return logits.softmax(dim=-1)


def eval_records(manifest: str | Path, split: str) -> list[Record]:
    """The rows of ``split`` with an image and labels."""
    return of_split(image_rows(manifest), split, manifest)


def image_rows(manifest: str | Path) -> list[Record]:
    """The rows of a manifest with an image and labels (what zero-shot and probes score)."""
    return [r for r in load_manifest(manifest, verify_images=False) if r.image and r.labels]


def of_split(rows: list[Record], split: str, manifest: str | Path) -> list[Record]:
    out = [r for r in rows if r.split == split]
    if not out:
        raise ManifestError(f"{manifest}: no rows with image and labels in split {split!r}; "
                            f"its splits are {', '.join(sorted({r.split for r in rows}))}")
    return out


def default_findings(records: Sequence[Record]) -> list[str]:
    """Labels (other than No Finding) with at least one positive and one negative image."""
    names = sorted({lab for r in records for lab in r.labels} - {"No Finding"})
    return [f for f in names if 0 < sum(f in r.labels for r in records) < len(records)]


@dataclass(frozen=True)
class ZeroShotOptions:
    """What :func:`evaluate_zeroshot` evaluates on, and how."""

    manifest: str | Path
    split: str = "test"
    findings: tuple[str, ...] = ()  # empty: every label with positive and negative images
    prompt_set: str = DEFAULT_PROMPT_SET  # a name of PROMPT_SETS, or "all"
    mode: str = "multilabel"  # multilabel | multiclass (classes = findings, at least two)
    val_split: str | None = None  # thresholds chosen on this split; None: the fixed 0.5

    def __post_init__(self) -> None:
        if self.prompt_set not in (*PROMPT_SETS, ALL_SETS):
            raise ConfigError(f"--prompts {self.prompt_set!r}: unknown prompt set; choose one "
                              f"of {', '.join([*PROMPT_SETS, ALL_SETS])}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: unknown; choose one of {', '.join(MODES)}")
        if self.val_split is not None and self.val_split == self.split:
            raise ConfigError(f"--val-split {self.val_split!r} is the split tested (--split): "
                              "thresholds chosen on the test rows would flatter F1 and ACC; "
                              "give another split (e.g. --val-split valid) or leave it out "
                              f"for the fixed {FIXED_THRESHOLD}")
        if self.mode == "multiclass":
            if len(set(self.findings)) < 2 or len(set(self.findings)) < len(self.findings):
                raise ConfigError("--mode multiclass needs --findings with at least two "
                                  "different classes, e.g. --findings Cardiomegaly Edema "
                                  f"'No Finding' (got {list(self.findings)})")
            if self.val_split is not None:
                raise ConfigError("--val-split applies to --mode multilabel: multi-class "
                                  "predicts the most probable class, with no threshold")

    def prompt_sets(self) -> list[str]:
        return list(PROMPT_SETS) if self.prompt_set == ALL_SETS else [self.prompt_set]

    @classmethod
    def from_config(cls, cfg: Config, manifest: str | Path | None = None,
                    split: str | None = None, findings: Sequence[str] | None = None,
                    **how) -> "ZeroShotOptions":
        """The model's own settings (``data.eval_manifest``, ``data.eval_split``,
        ``eval.findings``), each replaced where given; ``how``: ``prompt_set``, ``mode``,
        ``val_split``."""
        return cls(manifest or cfg.data.eval_manifest, split or cfg.data.eval_split,
                   tuple(findings or cfg.eval.findings), **how)


@dataclass(frozen=True)
class Scored:
    """One prompt set's result (what ``zeroshot.json`` holds) and its ROC curves."""

    result: dict
    curves: list[Curve]


@dataclass(frozen=True)
class _Rows:
    """Rows of a split with their image embeddings ``emb`` (n, E)."""

    split: str
    records: list[Record]
    emb: torch.Tensor


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, cfg: Config, options: ZeroShotOptions,
                      progress: bool = False) -> dict:
    """The result of ``options.prompt_set`` (one set; for ``all`` see :func:`run_zeroshot`);
    image size, normalisation, text length and bootstrap size come from the model's ``cfg``."""
    if options.prompt_set == ALL_SETS:
        raise ConfigError("evaluate_zeroshot scores one prompt set: call run_zeroshot for "
                          f"prompt_set={ALL_SETS!r}")
    return run_zeroshot(model, tokenizer, cfg, options, progress)[0].result


@torch.no_grad()
def run_zeroshot(model, tokenizer, cfg: Config, options: ZeroShotOptions,
                 progress: bool = False) -> list[Scored]:
    """Every prompt set of ``options`` scored on the same image embeddings, in order."""
    model.eval()
    manifest, split = options.manifest, options.split
    records = eval_records(manifest, split)
    findings = list(options.findings) or default_findings(records)
    check_findings(findings, records, manifest, split)
    left_out = None
    if options.mode == "multiclass":
        records, left_out = single_class_rows(records, findings, manifest, split)
    val = None
    if options.val_split is not None:  # checked before any image is encoded
        val_records = eval_records(manifest, options.val_split)
        check_validation(val_records, records, findings, manifest, options.val_split)
        val = _encode(model, cfg, options.val_split, val_records, progress)
    test = _encode(model, cfg, split, records, progress)
    out = []
    for name in options.prompt_sets():
        if options.mode == "multiclass":
            scored = _multiclass(model, tokenizer, cfg, test, findings, name, left_out)
        else:
            scored = _multilabel(model, tokenizer, cfg, test, val, findings, name)
        scored.result.update({"protocol": "zeroshot", "mode": options.mode, "prompt_set": name,
                              "manifest": str(manifest), "split": split})
        out.append(scored)
    return out


def _encode(model, cfg: Config, split: str, records: list[Record], progress: bool) -> _Rows:
    return _Rows(split, records, encode_images(
        model, [r.image for r in records], cfg.vision.image_size, cfg.eval.batch_size,
        cfg.pixel_stats(), cfg.train.precision, f"encoding {split}" if progress else ""))


def check_findings(findings: Sequence[str], records: Sequence[Record], manifest: str | Path,
                   split: str) -> None:
    """Every finding must occur in the rows' labels (a misspelt one gets a suggestion)."""
    present = sorted({f for r in records for f in r.labels})
    unknown = [f for f in findings if f not in present]
    if unknown:
        hints = []
        for f in unknown:
            close = difflib.get_close_matches(f.lower(), [p.lower() for p in present], n=2,
                                              cutoff=0.6)
            names = [p for p in present if p.lower() in close]
            hints.append(f"{f!r}" + (f" (did you mean {' or '.join(names)}?)" if names else ""))
        raise InputError(f"eval.findings: {', '.join(hints)} never occur in {manifest} split "
                         f"{split!r}; its findings are {', '.join(present)}")


def single_class_rows(records: Sequence[Record], classes: Sequence[str], manifest: str | Path,
                      split: str) -> tuple[list[Record], dict[str, int]]:
    """The rows whose labels hold exactly one of ``classes``, and the count of the others
    (``{"count", "no_class", "several_classes"}``). Every class needs a row."""
    keep, none, several = [], 0, 0
    for r in records:
        hits = sum(c in r.labels for c in classes)
        none += hits == 0
        several += hits > 1
        if hits == 1:
            keep.append(r)
    empty = [c for c in classes if not any(c in r.labels for r in keep)]
    if empty:
        raise InputError(f"--mode multiclass: no image of {manifest} split {split!r} has "
                         f"{' or '.join(map(repr, empty))} as its only class of "
                         f"{', '.join(classes)}; drop it from --findings")
    return keep, {"count": none + several, "no_class": none, "several_classes": several}


def check_validation(val: Sequence[Record], test: Sequence[Record], findings: Sequence[str],
                     manifest: str | Path, val_split: str) -> None:
    """Validation rows must share no image or patient with the test rows, and hold a positive
    of every finding (F1 is 0 at every threshold without one)."""
    images = {r.image for r in val} & {r.image for r in test}
    patients = ({r.patient_id for r in val if r.patient_id}
                & {r.patient_id for r in test if r.patient_id})
    if images or patients:
        what = (f"{len(images)} images (e.g. {sorted(images)[0]})" if images else
                f"{len(patients)} patients (e.g. {sorted(patients)[0]})")
        raise InputError(f"{manifest}: validation split {val_split!r} and the test rows share "
                         f"{what}; thresholds must be chosen on other patients: give a "
                         "patient-disjoint --val-split")
    lacking = [f for f in findings if not any(f in r.labels for r in val)]
    if lacking:
        raise InputError(f"{manifest} split {val_split!r}: no positive image of "
                         f"{', '.join(lacking)}, so no F1 threshold can be chosen; give a "
                         "larger --val-split or leave those out of --findings")


def _multilabel(model, tokenizer, cfg: Config, test: _Rows, val: _Rows | None,
                findings: list[str], prompt_set: str) -> Scored:
    cls, prompts = class_embeddings(model, tokenizer, findings, cfg.text.max_length, prompt_set)
    cls, scale = cls.to(test.emb.device), float(model.scale())
    prob = positive_probability(test.emb, cls, scale).cpu().numpy()  # (n, F)
    if val is None:
        thresholds = {f: FIXED_THRESHOLD for f in findings}
        source = f"fixed {FIXED_THRESHOLD}"
    else:
        vprob = positive_probability(val.emb, cls, scale).cpu().numpy()
        vy = labels_of(val.records, findings)
        thresholds = {f: best_f1_threshold(vy[:, j], vprob[:, j]) for j, f in enumerate(findings)}
        source = f"validation split {val.split!r} ({len(val.records)} images)"
    ys = labels_of(test.records, findings)
    result = multilabel_scores(ys, prob, findings, cfg.eval.bootstrap, thresholds)
    result.update({"n_images": len(test.records), "prompts": prompts,
                   "threshold": {"source": source, "values": thresholds}})
    curves = [Curve(f, ys[:, j], prob[:, j], result["per_finding"][f])
              for j, f in enumerate(findings)]
    return Scored(result, curves)


def _multiclass(model, tokenizer, cfg: Config, test: _Rows, classes: list[str], prompt_set: str,
                left_out: dict[str, int]) -> Scored:
    cls, prompts = class_embeddings(model, tokenizer, classes, cfg.text.max_length, prompt_set)
    prob = class_probability(test.emb, cls.to(test.emb.device),
                             float(model.scale())).cpu().numpy()  # (n, C)
    y = np.array([next(i for i, c in enumerate(classes) if c in r.labels)
                  for r in test.records])  # (n,) the row's one class
    m = multiclass_metrics(y, prob, cfg.eval.bootstrap)
    details = {c: {"auc": m["auc"][i], "auc_ci95": m["auc_ci95"][i], "n": int(np.sum(y == i))}
               for i, c in enumerate(classes)}
    result = {"mean_auc": m["macro_auc"], "mean_auc_ci95": m["macro_auc_ci95"],
              "accuracy": m["accuracy"], "per_finding": dict(zip(classes, m["auc"])),
              "details": details, "classes": classes,
              "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                                   "counts": m["confusion"]},
              "n_images": len(test.records), "left_out": left_out,
              "prompts": {c: {"positive": p["positive"]} for c, p in prompts.items()},
              "threshold": {"source": "none: the most probable class (argmax)", "values": {}}}
    curves = [Curve(c, (y == i).astype(int), prob[:, i], m["auc"][i])
              for i, c in enumerate(classes)]
    return Scored(result, curves)


def labels_of(records: Sequence[Record], findings: Sequence[str]) -> np.ndarray:
    """(n, F) 1 where a row's labels hold the finding, else 0."""
    return np.array([[f in r.labels for f in findings] for r in records], dtype=int)


@torch.no_grad()
def score_records(model, tokenizer, cfg: Config, records: Sequence[Record],
                  findings: Sequence[str]) -> dict:
    """Zero-shot AUC, F1 and ACC (at 0.5) per finding on given image rows, with the default
    prompt set: a row is positive for a finding when its ``labels`` hold it, else negative
    (each finding needs both classes)."""
    model.eval()
    img = encode_images(model, [r.image for r in records], cfg.vision.image_size,
                        cfg.eval.batch_size, cfg.pixel_stats(), cfg.train.precision)
    cls, prompts = class_embeddings(model, tokenizer, findings, cfg.text.max_length)
    prob = positive_probability(img, cls.to(img.device), float(model.scale())).cpu().numpy()
    result = multilabel_scores(labels_of(records, findings), prob, findings, cfg.eval.bootstrap,
                               {f: FIXED_THRESHOLD for f in findings})
    return {**result, "n_images": len(records), "prompts": prompts}


def multilabel_scores(ys: np.ndarray, prob: np.ndarray, findings: Sequence[str], bootstrap: int,
                      thresholds: dict[str, float]) -> dict:
    """AUC with a bootstrap CI (seed = the finding's index), F1 and ACC at ``thresholds`` per
    finding of ``ys``, ``prob`` (n, F); the mean AUC with a joint bootstrap CI."""
    per, details = {}, {}
    for j, f in enumerate(findings):
        y = ys[:, j]
        a = auc(y, prob[:, j])
        lo, hi = bootstrap_ci(y, prob[:, j], n=bootstrap, seed=j) if bootstrap else (a, a)
        f1, acc = f1_acc(y, prob[:, j], thresholds[f])
        per[f] = a
        details[f] = {"auc": a, "auc_ci95": [lo, hi], "f1": f1, "acc": acc,
                      "positives": int(y.sum()), "n": int(len(y))}
    mean_ci = bootstrap_mean_ci(ys, prob, n=bootstrap) if bootstrap else (float("nan"),) * 2
    return {"mean_auc": float(np.mean(list(per.values()))), "mean_auc_ci95": list(mean_ci),
            "per_finding": per, "details": details}


def prompt_sensitivity(results: Sequence[dict]) -> dict:
    """How much each AUC moves between prompt sets: ``sensitivity`` holds per finding the AUC
    under each set, their mean, sd (n − 1) and max − min; ``mean_auc_by_set`` the mean AUC of
    each set; ``results`` every set's full result. ``results``: one per set, same rows."""
    sets = [r["prompt_set"] for r in results]
    table = {}
    for f in results[0]["per_finding"]:
        aucs = [r["per_finding"][f] for r in results]
        table[f] = {"auc": dict(zip(sets, aucs)), "mean": statistics.fmean(aucs),
                    "sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                    "range": max(aucs) - min(aucs)}
    first = results[0]
    return {"protocol": "zeroshot", "mode": first["mode"], "prompt_sets": sets,
            **{k: first[k] for k in ("model", "text_policy") if k in first},
            "manifest": first["manifest"], "split": first["split"],
            "n_images": first["n_images"], "threshold_source": first["threshold"]["source"],
            "mean_auc_by_set": {r["prompt_set"]: r["mean_auc"] for r in results},
            "sensitivity": table, "results": {r["prompt_set"]: r for r in results}}


def markdown_table(result: dict) -> str:
    """The per-finding table (multi-label); with a threshold column where thresholds were
    chosen on validation."""
    chosen = "values" in result.get("threshold", {}) and not result["threshold"][
        "source"].startswith("fixed")
    t_head, t_rule = (" threshold |", "---|") if chosen else ("", "")
    lines = [f"| finding | AUC | 95% CI | F1 | ACC |{t_head} positives / n |",
             f"|---|---|---|---|---|{t_rule}---|"]
    for f, d in result["details"].items():
        lo, hi = d["auc_ci95"]
        t = f" {result['threshold']['values'][f]:.3f} |" if chosen else ""
        lines.append(f"| {f} | {d['auc']:.3f} | {lo:.3f}–{hi:.3f} | {d['f1']:.3f} | "
                     f"{d['acc']:.3f} |{t} {d['positives']} / {d['n']} |")
    lo, hi = result.get("mean_auc_ci95", (float("nan"),) * 2)
    lines.append(f"| **mean** | **{result['mean_auc']:.3f}** | {lo:.3f}–{hi:.3f} | | |"
                 f"{' |' if chosen else ''} |")
    return "\n".join(lines) + "\n"


def multiclass_markdown(result: dict) -> str:
    """Accuracy, macro AUC, the per-class AUCs and the confusion matrix."""
    classes = result["classes"]
    lo, hi = result["mean_auc_ci95"]
    lines = [f"Accuracy (argmax) **{result['accuracy']:.3f}**; macro AUC (one-vs-rest) "
             f"**{result['mean_auc']:.3f}** (95% CI {lo:.3f}–{hi:.3f}).", "",
             "| class | AUC (one-vs-rest) | 95% CI | images |", "|---|---|---|---|"]
    for c, d in result["details"].items():
        lines.append(f"| {c} | {d['auc']:.3f} | {d['auc_ci95'][0]:.3f}–{d['auc_ci95'][1]:.3f} "
                     f"| {d['n']} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted class):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for c, row in zip(classes, result["confusion_matrix"]["counts"]):
        lines.append(f"| {c} | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


def result_markdown(result: dict) -> str:
    """``zeroshot.md``: where, which prompts, the threshold rule, then the tables."""
    what = (f"{result['manifest']} split `{result['split']}`, {result['n_images']} images")
    if result.get("mode") == "multiclass":
        lo = result["left_out"]
        what += (f" (those whose labels hold exactly one of the classes; {lo['count']} left "
                 f"out: {lo['no_class']} with none, {lo['several_classes']} with several)")
    lines = ["# Zero-shot classification", "", what]
    if "prompt_set" in result:
        lines += ["", f"Mode `{result['mode']}`, prompt set `{result['prompt_set']}` "
                  "(prompts in zeroshot.json)."]
    if result.get("mode") == "multiclass":
        return "\n".join(lines) + "\n\n" + multiclass_markdown(result)
    if "threshold" in result:
        source = result["threshold"]["source"]
        lines += ["", f"F1 and ACC at the fixed threshold {FIXED_THRESHOLD} on the "
                  "positive-prompt probability." if source.startswith("fixed") else
                  f"F1 and ACC at each finding's threshold that maximises F1 on the {source}; "
                  "the test split chose nothing."]
    return "\n".join(lines) + "\n\n" + markdown_table(result)


def write_results(result: dict, out_dir: Path, name: str = "zeroshot") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_atomic(js, json.dumps(result, indent=2) + "\n")
    write_atomic(md, result_markdown(result))
    return js, md


def sensitivity_markdown(table: dict) -> str:
    """``zeroshot_prompts.md``: one AUC column per prompt set, then mean, sd and max − min."""
    sets = table["prompt_sets"]
    lines = ["# Zero-shot prompt sensitivity", "",
             f"{table['manifest']} split `{table['split']}`, {table['n_images']} images, mode "
             f"`{table['mode']}`; AUC per prompt set, and its mean, sd (n − 1) and max − min "
             f"across the {len(sets)} sets. F1/ACC thresholds: {table['threshold_source']}.", "",
             "| finding | " + " | ".join(sets) + " | mean | sd | max − min |",
             "|---|" + "---|" * (len(sets) + 3)]
    for f, row in table["sensitivity"].items():
        lines.append(f"| {f} | " + " | ".join(f"{row['auc'][s]:.3f}" for s in sets)
                     + f" | {row['mean']:.3f} | {row['sd']:.3f} | {row['range']:.3f} |")
    means = [table["mean_auc_by_set"][s] for s in sets]
    lines.append("| **mean AUC** | " + " | ".join(f"**{m:.3f}**" for m in means)
                 + f" | {statistics.fmean(means):.3f} | "
                 f"{statistics.stdev(means) if len(means) > 1 else 0.0:.3f} | "
                 f"{max(means) - min(means):.3f} |")
    lines += ["", "Prompt sets:", ""]
    lines += [f"- `{s}`: {PROMPT_SETS[s].description}" for s in sets]
    for s in sets:
        res = table["results"][s]
        body = (multiclass_markdown(res) if res["mode"] == "multiclass"
                else markdown_table(res))
        lines += ["", f"## `{s}`", "", body.rstrip()]
    return "\n".join(lines) + "\n"


def write_zeroshot(scored: Sequence[Scored], out_dir: Path, plots: bool = True) -> list[Path]:
    """One set: ``zeroshot.json/.md`` (+ ``zeroshot_roc.png``); several: the sensitivity table
    ``zeroshot_prompts.json/.md`` holding every set's result (+ ``zeroshot_prompts_roc.png``,
    a panel per set). Returns the paths written."""
    first = scored[0].result
    title = f"{first['manifest']} split {first['split']}, {first['n_images']} images"
    how = "one class against the rest" if first["mode"] == "multiclass" else "per finding"
    panels = [Panel(f"{s.result['prompt_set']}: {how}", s.curves) for s in scored]
    if len(scored) == 1:
        paths = list(write_results(first, out_dir))
        png = out_dir / "zeroshot_roc.png"
    else:
        table = prompt_sensitivity([s.result for s in scored])
        js, md = out_dir / "zeroshot_prompts.json", out_dir / "zeroshot_prompts.md"
        write_atomic(js, json.dumps(table, indent=2) + "\n")
        write_atomic(md, sensitivity_markdown(table))
        paths, png = [js, md], out_dir / "zeroshot_prompts_roc.png"
    if plots:
        paths.append(roc_figure(panels, png, title))
    return paths
