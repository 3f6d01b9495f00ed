"""`xlip ablate`: pre-train variants of one config side by side and evaluate each.

Every variant trains on the same data with the same seeds, and either the same number of steps
(``equal="steps"``), the same wall-clock budget (``equal="time"``: each variant's seconds per
step are measured first, in the same run, and its steps set to fill the reference variant's
budget) or the same compute (``equal="flops"``: each variant's FLOPs per step counted
analytically by :mod:`xlip.flops` on its own first batches, so the budget is the same on any
machine and under any load). Each (variant, seed) run lives in ``OUT/runs/VARIANT/seedS/``
and is skipped when its ``result.json`` exists, so an interrupted ablation resumes.
``OUT/ablation.json`` and ``OUT/ablation.md`` summarise: mean ± sd over seeds of the
zero-shot mean AUC, each seed's 95 % CI, per-finding AUCs, seconds per step and wall time,
and those of the evaluations asked for (linear probe, fine-tuning, retrieval), which are added
to finished runs without training them again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from xlip.config import (Config, ConfigError, drop_unused_options, from_dict, merge,
                         parse_override)
from xlip.errors import InputError
from xlip.eval import FINETUNE_STEPS
from xlip.files import exclusive

CLIP = ["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0"]

#: name: (overrides, description). ``*-no_prompts`` also drop the image-only sources, and
#: variants without MLM drop text-only sources (they train nothing else).
VARIANTS: dict[str, tuple[list[str], str]] = {
    "clip": (CLIP, "contrastive only"),
    "clip-no_prompts": (CLIP, "plain CLIP: image-report pairs only, no label prompts"),
    "clip+random_mim": (["mim.policy=random", "mlm.policy=none", "loss.w_mlm=0"],
                        "CL + MAE-style random masking"),
    "clip+entmlm": (["mim.policy=none", "loss.w_mim=0", "mlm.policy=entity"],
                    "CL + entity MLM"),
    "xlip_random_mim": (["mim.policy=random", "mlm.policy=entity"],
                        "CL + EntMLM + random masking"),
    "xlip": (["mim.policy=attention", "mlm.policy=entity"],
             "CL + EntMLM + AttMIM (the scorer trained by MLM)"),
    "xlip_feat": (["mim.policy=attention", "mlm.policy=entity", "mim.target=features"],
                  "XLIP whose MAE decoder predicts the full pass's patch tokens, not pixels"),
    "xlip_tokens": (["mim.policy=attention", "mlm.policy=entity", "mim.mask_at=tokens"],
                    "XLIP masking the full pass's patch tokens (the paper's wording), not the "
                    "image: no second encoder pass"),
    "xlip_lean": (["mim.policy=attention", "mlm.policy=entity", "mim.mask_at=tokens",
                   "model.mae_decoder_width=64"],
                  "XLIP's cheaper step: AttMIM on the full pass's tokens, a 64-wide MAE "
                  "decoder (the demo config's since 2026-12-04: 1.40× CLIP's FLOPs)"),
    "xlip_image": (["mim.policy=attention", "mlm.policy=entity", "mim.mask_at=image",
                    "model.mae_decoder_width=128"],
                   "XLIP masking the image (a second, visible-patch encoder pass) with a "
                   "128-wide MAE decoder: the demo's step until 2026-12-04 (2.34× CLIP's "
                   "FLOPs there)"),
    "xlip_dec2": (["mim.policy=attention", "mlm.policy=entity", "model.mae_decoder_depth=2"],
                  "XLIP with a 2-block MAE decoder (the demo's; DESIGN.md's default 4)"),
    "xlip_dec1": (["mim.policy=attention", "mlm.policy=entity", "model.mae_decoder_depth=1"],
                  "XLIP with a 1-block MAE decoder (the demo's until 2026-12-04)"),
    "xlip_random_mlm": (["mim.policy=attention", "mlm.policy=random"],
                        "CL + BERT-style random MLM + AttMIM"),
    "xlip-no_prompts": (["mim.policy=attention", "mlm.policy=entity"],
                        "XLIP without the image-only (label prompt) rows"),
    # fast mode masks the image (a config that masks tokens, like the demo's, is set back)
    "xlip_fast": (["mim.policy=attention", "mlm.policy=entity", "train.mode=fast",
                   "mim.mask_at=image"],
                  "XLIP, FLIP-style step: one visible-patch pass with gradients"),
    "xlip_fast_random": (["mim.policy=random", "mlm.policy=entity", "train.mode=fast",
                          "mim.mask_at=image"],
                         "FLIP-style step with random masking: no full-image pass at all"),
    "xlip_lite": (["mim.policy=attention", "mlm.policy=entity", "mim.row_fraction=0.25",
                   "mlm.row_fraction=0.25"],
                  "XLIP with AttMIM and EntMLM on a random quarter of the rows (cheaper step)"),
    "xlip_early": (["mim.policy=attention", "mlm.policy=entity", "loss.aux_until=0.25"],
                   "XLIP with AttMIM and EntMLM on the first quarter of the steps, CL only "
                   "after"),
}
#: not run by default: plain CLIP (the baseline without XLIP's label prompts), the cheaper
#: steps that lost (README), the decoder depths (in the demo config, 2 blocks, ``xlip_dec2``
#: is ``xlip`` itself) and the demo's earlier step. Of the others, those that a config
#: already makes ``xlip`` (``xlip_tokens`` and ``xlip_lean`` in the demo's) are left out of a
#: default run (:func:`distinct_variants`)
DEFAULT_VARIANTS = [v for v in VARIANTS
                    if v not in ("clip-no_prompts", "xlip_fast_random", "xlip_lite",
                                 "xlip_dec1", "xlip_dec2", "xlip_early", "xlip_image")]
#: zeroshot: zero-shot AUC on data.eval_manifest; attmim: on a synthetic corpus, the share of
#: lesion patches that AttMIM masks (xlip.eval.attmim)
EVALUATIONS = ("zeroshot", "attmim", "probe", "finetune", "retrieval")
PROBE_FRACTIONS = (1.0, 0.1, 0.01)  # label fractions of the probe (features computed once)
FINETUNE_FRACTIONS = PROBE_FRACTIONS  # label fractions of fine-tuning (one training each)
SMALL_FINDINGS = ("Nodule", "Pneumothorax")
BASELINE = "clip"


@dataclass
class AblationSpec:
    """What to run. ``base``: the config as a plain dict (paths resolved); ``variants``:
    name → overrides; ``equal``: steps | time | flops; ``reference``: the variant whose step
    count sets the time or FLOP budget."""

    base: dict[str, Any]
    out: Path
    variants: dict[str, list[str]]
    seeds: list[int] = field(default_factory=lambda: [0])
    equal: str = "steps"
    reference: str = "xlip"
    budget_s: float = 0.0  # equal=time: seconds per run; 0: the reference's steps × s/step
    steps: int = 0  # steps per run (equal=steps) or of the reference; 0: the config's
    calibrate_steps: int = 30
    calibrate_s: float = 10.0  # equal=time: measure at least this long (longer runs if needed)
    evaluations: list[str] = field(default_factory=lambda: ["zeroshot"])
    finetune_steps: int = FINETUNE_STEPS  # evaluation "finetune": xlip eval finetune --steps

    def overrides(self, name: str) -> list[str]:
        """A variant's overrides; the reference's built-in ones when it is not run itself. An
        empty list is the base config, not a missing entry."""
        if name in self.variants:
            return self.variants[name]
        return variant_overrides([name])[name]


def variant_overrides(names: Sequence[str], defined: Sequence[str] = (),
                      add_defined: bool = True) -> dict[str, list[str]]:
    """Names from :data:`VARIANTS` or ``defined`` (``NAME=key=value,key=value``).
    ``add_defined``: defined variants not in ``names`` are added (the default list plus your
    own); otherwise ``names`` is the whole list, and a definition left out of it is an error."""
    custom = {}
    for text in defined:
        name, _, rest = text.partition("=")
        if not name or not rest:
            raise ConfigError(f"--define {text!r} must look like NAME=section.key=value,...")
        # a comma starts a new override only before "key=": values may hold commas
        custom[name] = [x.strip() for x in re.split(r",(?=\s*[\w.]+=)", rest) if x.strip()]
    out = {}
    for name in names:
        if name in custom:
            out[name] = custom[name]
        elif name in VARIANTS:
            out[name] = list(VARIANTS[name][0])
        else:
            raise ConfigError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} "
                              "(or define one with --define NAME=key=value,...)")
    for name in custom:
        if name not in out and not add_defined:
            raise ConfigError(f"--define {name}: {name} is not in --variants; add it there "
                              "or leave the --define out")
        out.setdefault(name, custom[name])
    return out


#: what the ablation itself sets for every run: a variant that set them would be overridden
SET_BY_ABLATION = {"train.steps": "--steps N or --equal time|flops",
                   "train.seed": "--seeds", "train.out_dir": "--out"}


def distinct_variants(base: dict[str, Any], variants: dict[str, list[str]]
                      ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``variants`` less those whose config under ``base`` is an earlier one's (a default list
    on a config that already sets what a variant changes would train the same runs twice);
    returns (kept, {left out: the kept variant it equals})."""
    kept: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    same: dict[str, str] = {}
    for name, overrides in variants.items():
        digest = config_digest(variant_config(base, name, overrides, 0, Path("."), 1))
        if digest in seen:
            same[name] = seen[digest]
            continue
        seen[digest] = name
        kept[name] = overrides
    return kept, same


def variant_config(base: dict[str, Any], name: str, overrides: list[str], seed: int,
                   out_dir: Path, steps: int | None = None) -> Config:
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key in SET_BY_ABLATION:
            raise ConfigError(f"variant {name}: {key} is set by the ablation for every run; "
                              f"leave it out of the variant and use {SET_BY_ABLATION[key]}")
    data = drop_unused_options(
        merge(base, overrides + [f"train.seed={seed}", f"train.out_dir={out_dir}"]))
    drop = {"image_only"} if name.endswith("no_prompts") else set()
    if data.get("mlm", {}).get("policy") == "none":  # text-only reports only train EntMLM
        drop.add("text_only")
        data["mlm"]["text_only"] = False
    data["data"]["sources"] = [s for s in data["data"]["sources"]
                               if s.get("kind", "paired") not in drop]
    if not data["data"]["sources"]:
        raise ConfigError(f"variant {name}: leaves no data.sources (it drops the "
                          f"{' and '.join(sorted(drop))} rows); leave it out of --variants")
    if steps is not None:
        tr = data["train"]
        if steps < tr.get("steps", steps):  # e.g. a 30-step calibration run
            tr["warmup_steps"] = min(tr.get("warmup_steps", 50), max(1, steps // 10))
        tr["steps"] = steps
        tr["ckpt_every"] = steps
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"variant {name}: {err}") from None


def config_digest(cfg: Config) -> str:
    """A run's identity for resuming: its whole config, the output folder left out."""
    data = cfg.to_dict()
    data["train"].pop("out_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def same_config(run: Path, cfg: Config) -> bool:
    """Whether a finished run's ``config.yaml`` is ``cfg``, keys added to xlip since the run
    (absent from its file, at their default in ``cfg``) aside: a new setting must not make every
    finished run of an ablation count as changed. Nor do the sizes of a decoder neither builds
    (:meth:`~xlip.config.Config.inert_keys`: a CLIP run does not change with the demo's MAE
    decoder width)."""
    from xlip.train.resume import flatten

    try:
        old = flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return False
    new, default = flatten(cfg.to_dict()), flatten(Config().to_dict())
    inert = cfg.inert_keys()  # the policies must match, so these are inert in the run too
    for key in set(old) | set(new):
        if key in ("train.out_dir", "data.pixel_mean", "data.pixel_std") or key in inert:
            continue
        if key not in old:
            if new[key] != default.get(key):
                return False
        elif old[key] != new.get(key):  # to_dict writes tuples as lists, as YAML reads them
            return False
    return True


def timed_window(run: Path, skip_first: int = 1) -> tuple[float, int]:
    """Seconds and steps between the first and the last log line of ``metrics.jsonl`` (the
    first interval holds start-up work and is left out; with one line, from the start)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if len(rows) <= skip_first:
        return rows[-1]["elapsed_s"], rows[-1]["step"]
    a, b = rows[skip_first - 1], rows[-1]
    return b["elapsed_s"] - a["elapsed_s"], b["step"] - a["step"]


def seconds_per_step(run: Path, skip_first: int = 1) -> float:
    """Mean seconds per step over :func:`timed_window`."""
    seconds, steps = timed_window(run, skip_first)
    return seconds / steps


def run_ablation(spec: AblationSpec, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every (variant, seed) not done yet; write the summary."""
    for name in spec.evaluations:
        if name not in EVALUATIONS:
            raise ConfigError(f"unknown evaluation {name!r}; available: "
                              f"{', '.join(EVALUATIONS)}")
    if not spec.base.get("data", {}).get("eval_manifest"):
        raise ConfigError("the ablation config has no data.eval_manifest to evaluate on: set it "
                          "in the config or pass data.eval_manifest=FILE")
    spec.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in spec.variants.items():  # every variant validates before any work
        variant_config(spec.base, name, overrides, spec.seeds[0], spec.out / "check")
    if spec.finetune_steps < 1:
        raise ConfigError(f"--finetune-steps {spec.finetune_steps}: give at least 1 step, "
                          "e.g. 300")
    if {"probe", "finetune"} & set(spec.evaluations):  # their splits, before hours of training
        from xlip.eval.probe import ProbeOptions, split_rows

        data = spec.base["data"]
        split_rows(ProbeOptions(data["eval_manifest"], test_split=data.get("eval_split", "test")))
    flops = flops_per_step(spec) if spec.equal == "flops" else None
    steps = step_budget(spec, log, flops)
    total = len(spec.variants) * len(spec.seeds)
    k = 0
    for name, overrides in spec.variants.items():
        for seed in spec.seeds:
            k += 1
            run = spec.out / "runs" / name / f"seed{seed}"
            cfg = variant_config(spec.base, name, overrides, seed, run, steps.get(name))
            # one process per run: a second invocation on the same --out (lanes side by side)
            # would delete this run's folder under it and retrain it
            with exclusive(spec.out / ".locks" / f"{name}.seed{seed}.lock", str(run),
                           "wait for it to finish, or run other seeds or variants, or give "
                           "another --out"):
                run_one(spec, name, overrides, seed, cfg, f"[{k}/{total}] {name} seed {seed}",
                        progress, log)
    summary = summarise(spec, steps, flops)
    (spec.out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (spec.out / "ablation.md").write_text(markdown(summary))
    return summary


def run_one(spec: AblationSpec, name: str, overrides: list[str], seed: int, cfg: Config,
            label: str, progress: bool, log: Callable[[str], None]) -> None:
    """Train and evaluate one variant and seed into ``cfg.train.out_dir`` and write its
    ``result.json``; a finished run is skipped, or only gets the evaluations it lacks."""
    from xlip.train.loop import NonFiniteLossError, pretrain

    run, digest = Path(cfg.train.out_dir), config_digest(cfg)
    if (run / "result.json").is_file():
        done = json.loads((run / "result.json").read_text())
        if done.get("config_digest", digest) != digest and not same_config(run, cfg):
            raise ConfigError(
                f"{run}: finished under another config than this ablation's (changed "
                f"overrides, steps or base config); use a new --out or delete the run")
        missing = [e for e in spec.evaluations if e not in done and e != "attmim"
                   and "failed" not in done]
        if "finetune" in done and done["finetune"]["steps"] != spec.finetune_steps:
            missing.append("finetune")  # fine-tuned for another budget: again
        if missing:  # an evaluation added since (e.g. the probe): the model is kept
            log(f"{label}: trained; evaluating {', '.join(missing)}")
            done.update(evaluate_run(run, missing, spec.finetune_steps))
            (run / "result.json").write_text(json.dumps(done, indent=2))
        else:
            log(f"{label}: done already")
        return
    result: dict[str, Any] = {}
    if (run / "model.safetensors").is_file() and same_config(run, cfg):
        # trained, but its evaluation failed or was interrupted: evaluate only
        log(f"{label}: trained already; evaluating")
        rows = (run / "metrics.jsonl").read_text().splitlines()
        wall = json.loads(rows[-1])["elapsed_s"] if rows else float("nan")
    else:
        log(f"{label}: {cfg.train.steps} steps → {run}")
        if run.exists():
            shutil.rmtree(run)
        t0 = time.perf_counter()
        try:
            pretrain(cfg, progress=progress)
        except NonFiniteLossError as err:  # one diverged run does not stop the others
            result["failed"] = str(err)
            log(f"    failed: {err}")
        wall = time.perf_counter() - t0
    if "failed" not in result:
        result.update(evaluate_run(run, spec.evaluations, spec.finetune_steps),
                      s_per_step=seconds_per_step(run))
        log(f"    zero-shot mean AUC {result['zeroshot']['mean_auc']:.3f} "
            f"({wall / 60:.1f} min)")
    result.update(variant=name, seed=seed, steps=cfg.train.steps, wall_s=wall,
                  overrides=overrides, config_digest=digest)
    run.mkdir(parents=True, exist_ok=True)
    (run / "result.json").write_text(json.dumps(result, indent=2))


CALIBRATION_SEED = 0
EQUAL = ("steps", "time", "flops")
FLOP_BATCHES = 8  # equal=flops: a variant's FLOPs per step are the mean over its first batches


def calibrate(cfg: Config, run: Path, min_seconds: float, log: Callable[[str], None]) -> float:
    """Seconds per step of ``cfg`` (``train.steps`` short), measured after its first third of
    steps. Where the measured steps took less than ``min_seconds`` (a GPU runs the demo's 30
    steps in about 2 s, and there the early steps of one run were far slower than the later
    ones: warm-up whose cause was not measured), the run is made again, long enough to measure
    ``min_seconds``."""
    from xlip.train.loop import pretrain

    def timed(steps: int) -> tuple[float, int]:
        shutil.rmtree(run, ignore_errors=True)
        cfg.train.steps, cfg.train.log_every = steps, max(1, steps // 3)
        log(f"calibrating {run.name}: {steps} steps")
        pretrain(cfg, progress=False)
        window = timed_window(run)
        shutil.rmtree(run, ignore_errors=True)
        return window

    first = cfg.train.steps
    seconds, steps = timed(first)
    if seconds < min_seconds:  # mostly warm-up: once more, long enough
        seconds, steps = timed(min(20 * first, math.ceil(first * min_seconds
                                                         / max(seconds, 1e-3) * 1.1)))
    return seconds / steps


def step_budget(spec: AblationSpec, log: Callable[[str], None],
                flops: dict[str, float] | None = None) -> dict[str, int]:
    """Steps per variant: the config's for equal steps; for equal time, the budget divided by
    each variant's seconds per step, measured by short runs (cached in calibration.json); for
    equal FLOPs, divided by each variant's FLOPs per step (``flops``, else counted here)."""
    base_steps = spec.steps or int(spec.base.get("train", {}).get("steps", 1000))
    if spec.equal == "steps":
        return {name: base_steps for name in spec.variants}
    if spec.equal not in EQUAL:
        raise ConfigError(f"--equal {spec.equal!r}: choose one of {', '.join(EQUAL)}")
    if spec.equal == "flops":
        flops = flops or flops_per_step(spec)
        budget = base_steps * flops[spec.reference]
        out = {name: max(1, round(budget / flops[name])) for name in spec.variants}
        log("equal FLOPs: " + ", ".join(f"{n} {s} steps ({flops[n] / 1e9:.2f} GFLOP/step)"
                                        for n, s in out.items())
            + f"; budget {budget / 1e12:.2f} TFLOP")
        return out
    # one calibration at a time: an invocation started beside another (one seed each) waits
    # for the other's measurement and reuses it, instead of timing the same variant at the
    # same moment (each slowing the other) or stopping at its run folder's lock
    with exclusive(spec.out / ".locks" / "calibration.lock", f"calibration in {spec.out}",
                   "", wait=True):
        sec = calibrated_seconds(spec, log)
    budget = spec.budget_s or base_steps * sec[spec.reference]
    out = {name: max(1, round(budget / sec[name])) for name in spec.variants}
    log("equal time: " + ", ".join(f"{n} {s} steps ({sec[n]:.3f} s/step)"
                                   for n, s in out.items()) + f"; budget {budget:.0f} s")
    return out


def calibrated_seconds(spec: AblationSpec, log: Callable[[str], None]) -> dict[str, float]:
    """Seconds per step of each variant (and the reference), from ``OUT/calibration.json``
    where it holds a measurement under the same config, else measured and added there."""
    path = spec.out / "calibration.json"
    cal = json.loads(path.read_text()) if path.is_file() else {}
    names = list(spec.variants)
    if not spec.budget_s and spec.reference not in names:
        names.append(spec.reference)
    sec: dict[str, float] = {}

    def measured(key: str, cfg: Config) -> float:
        run = cfg.train.out_dir = str(spec.out / "calibration" / key)
        digest = config_digest(cfg)
        entry = cal.get(key)
        if isinstance(entry, dict) and entry.get("config_digest") == digest:
            return entry["s_per_step"]  # measured before under this very config
        cal[key] = {"s_per_step": calibrate(cfg, Path(run), spec.calibrate_s, log),
                    "config_digest": digest}
        path.write_text(json.dumps(cal, indent=2))
        return cal[key]["s_per_step"]

    for name in names:
        overrides = spec.overrides(name)
        # always seed 0: the seeds of one ablation, run by separate invocations (one seed
        # each, side by side), then share one measurement, so every seed gets the same steps
        cfg = variant_config(spec.base, name, overrides, CALIBRATION_SEED,
                             spec.out / "calibration" / name, spec.calibrate_steps)
        share = cfg.loss.aux_until
        if share >= 1.0:
            sec[name] = measured(name, cfg)
            continue
        # loss.aux_until < 1: the steps with MIM and MLM and the CL-only ones after them are
        # timed apart (a short run would time mostly one kind) and weighted by their shares
        parts = {}
        for phase, until in (("aux", 1.0), ("cl", 1e-9)):  # 1e-9: no step runs MIM or MLM
            c = copy.deepcopy(cfg)
            c.loss.aux_until = until
            parts[phase] = measured(f"{name}.{phase}", c)
        sec[name] = share * parts["aux"] + (1 - share) * parts["cl"]
    return sec


def flops_per_step(spec: AblationSpec) -> dict[str, float]:
    """FLOPs of one training step (forward and backward, :func:`xlip.flops.step_flops`) of each
    variant and of the reference: the mean over the first :data:`FLOP_BATCHES` batches that the
    variant's own loader gives with seed 0 (its rows with an image, padded text length, MLM
    rows and masked tokens are the data's), times ``train.grad_accum`` (a step's batches).
    With ``loss.aux_until`` < 1, the mean over the run: that share of steps with MIM and MLM,
    the rest CL only. Counted, not timed: the same on every machine."""
    from xlip.data.collate import Collator
    from xlip.data.dataset import MixedDataset
    from xlip.data.stream import ShardStream, streamed
    from xlip.flops import batch_shape, step_flops
    from xlip.text.tokenizer import load_tokenizer
    from xlip.train.distributed import DistInfo
    from xlip.train.loop import build_loader, tokenizer_dir

    names = list(spec.variants)
    if spec.budget_s:
        raise ConfigError("--budget-s sets a wall-clock budget: use it with --equal time, not "
                          "--equal flops")
    if spec.reference not in names:
        names.append(spec.reference)
    out: dict[str, float] = {}
    tok = None
    for name in names:
        overrides = spec.overrides(name)
        cfg = variant_config(spec.base, name, overrides, CALIBRATION_SEED,
                             spec.out / "calibration" / name, FLOP_BATCHES)
        if cfg.mim.row_fraction < 1.0 or cfg.mlm.row_fraction < 1.0:
            raise ConfigError(f"variant {name}: --equal flops counts whole-batch MIM and MLM "
                              "only (mim.row_fraction and mlm.row_fraction 1); compare it with "
                              "--equal time")
        cfg.data.num_workers = 0
        tok = tok or load_tokenizer(tokenizer_dir(cfg))
        dataset = ShardStream(cfg, 0, 1, progress=False) if streamed(cfg) else MixedDataset(
            cfg, train=True)
        collate = Collator(cfg, tok, train=True, findings=dataset.findings())
        # loss.aux_until < 1: that share of the steps with MIM and MLM, the rest CL only
        share = cfg.loss.aux_until
        counts = [share * step_flops(cfg, shape).total
                  + (1 - share) * step_flops(cfg, shape, aux=False).total
                  for shape in (batch_shape(batch, len(tok))
                                for batch in build_loader(cfg, dataset, collate, 0, DistInfo()))]
        out[name] = statistics.fmean(counts) * cfg.train.grad_accum  # per batch → per step
    return out


def evaluate_run(run: Path, evaluations: Sequence[str], finetune_steps: int) -> dict[str, Any]:
    """The ``evaluations`` of one finished run (checked by :func:`run_ablation` before any
    training: known names, a ``data.eval_manifest``). The probe and fine-tuning draw their
    label fractions' patients with the run's seed, so variants of one seed share their rows."""
    from xlip.api import XLIP
    from xlip.eval.attmim import lesion_mask_share
    from xlip.eval.finetune import FinetuneOptions, finetune
    from xlip.eval.probe import ProbeOptions, linear_probes
    from xlip.eval.retrieval import evaluate_retrieval
    from xlip.eval.zeroshot import ZeroShotOptions, evaluate_zeroshot

    model = XLIP.from_pretrained(run)
    cfg = model.cfg
    out: dict[str, Any] = {}
    for name in evaluations:
        if name == "zeroshot":
            res = evaluate_zeroshot(model.model, model.tokenizer, cfg,
                                    ZeroShotOptions.from_config(cfg))
            out["zeroshot"] = {k: res[k] for k in ("mean_auc", "mean_auc_ci95", "per_finding",
                                                   "n_images", "split")}
        elif name == "attmim" and cfg.mim.policy == "attention":  # synthetic corpus only
            out["attmim"] = lesion_mask_share(model.model, model.tokenizer, cfg,
                                              cfg.data.eval_manifest, cfg.data.eval_split)
        elif name == "probe":  # train rows of the evaluation manifest, its test split
            res = linear_probes(model.model, cfg, ProbeOptions(
                cfg.data.eval_manifest, test_split=cfg.data.eval_split, seed=cfg.train.seed),
                PROBE_FRACTIONS)
            if "error" in res[1.0]:
                raise InputError(f"{run}: linear probe: {res[1.0]['error']}")
            out["probe"] = _by_fraction(res, ("mean_auc", "mean_auc_ci95", "C", "n_train",
                                              "validation"), ("mean_auc", "n_train", "C"))
        elif name == "finetune":  # the whole encoder and a head, once per label fraction
            res = {fr: finetune(model.model, cfg, FinetuneOptions(
                cfg.data.eval_manifest, test_split=cfg.data.eval_split, seed=cfg.train.seed,
                fraction=fr, steps=finetune_steps)) for fr in FINETUNE_FRACTIONS}
            out["finetune"] = _by_fraction(
                res, ("mean_auc", "mean_auc_ci95", "n_train", "steps", "validation"),
                ("mean_auc", "n_train", "steps_done", "best_step", "best_val_mean_auc", "wall_s"))
        elif name == "retrieval":
            res = evaluate_retrieval(model.model, model.tokenizer, cfg, cfg.data.eval_manifest,
                                     cfg.data.eval_split)
            out["retrieval"] = {k: res[k] for k in ("image_to_text", "text_to_image",
                                                    "n_images", "n_reports")}
    return out


def _by_fraction(res: dict[float, dict[str, Any]], keys: Sequence[str],
                 fraction_keys: Sequence[str]) -> dict[str, Any]:
    """A probe's or fine-tuning's results per label fraction, as ``result.json`` keeps them:
    ``keys`` and the per-finding AUCs of all labels (fraction 1), ``fraction_keys`` (or the
    error) of each fraction."""
    full = res[1.0]
    return {**{k: full[k] for k in keys},
            "per_finding": {f: d["auc"] for f, d in full["per_finding"].items()},
            "fractions": {f"{fr:g}": ({"error": r["error"]} if "error" in r else
                                      {k: r[k] for k in fraction_keys})
                          for fr, r in res.items()}}


def summarise(spec: AblationSpec, steps: dict[str, int],
              flops: dict[str, float] | None = None) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    for name, overrides in spec.variants.items():
        results = []
        for seed in spec.seeds:
            path = spec.out / "runs" / name / f"seed{seed}" / "result.json"
            if path.is_file():
                r = json.loads(path.read_text())
                if "failed" in r:
                    failed.append({"variant": name, "seed": seed, "error": r["failed"]})
                else:
                    results.append(r)
        if not results:
            continue
        aucs = [r["zeroshot"]["mean_auc"] for r in results]
        findings = list(results[0]["zeroshot"]["per_finding"])
        variants[name] = {
            "mean_auc": statistics.fmean(aucs),
            "sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "seeds": [{"seed": r["seed"], "mean_auc": r["zeroshot"]["mean_auc"],
                       "ci95": r["zeroshot"]["mean_auc_ci95"], "steps": r["steps"],
                       "s_per_step": r["s_per_step"], "wall_s": r["wall_s"]} for r in results],
            "per_finding": {f: statistics.fmean(r["zeroshot"]["per_finding"][f]
                                                for r in results) for f in findings},
            "s_per_step": statistics.fmean(r["s_per_step"] for r in results),
            "lesion_mask_share": (statistics.fmean(r["attmim"]["masked_share"]
                                                   for r in results)
                                  if all("attmim" in r for r in results) else None),
            "probe": _fractions_summary(results, "probe"),
            "finetune": _fractions_summary(results, "finetune"),
            "retrieval": ({d: {m: statistics.fmean(r["retrieval"][d][m] for r in results)
                               for m in results[0]["retrieval"][d]}
                           for d in ("image_to_text", "text_to_image")}
                          if all("retrieval" in r for r in results) else None),
            "wall_s": statistics.fmean(r["wall_s"] for r in results),
            "steps": results[0]["steps"],  # per seed in "seeds" (equal-time budgets may differ)
            "overrides": overrides,
            "description": VARIANTS.get(name, ([], "custom"))[1],
        }
    if BASELINE in variants:  # paired by seed: seed-to-seed noise cancels in part
        base = {s["seed"]: s["mean_auc"] for s in variants[BASELINE]["seeds"]}
        for v in variants.values():
            diffs = [s["mean_auc"] - base[s["seed"]] for s in v["seeds"] if s["seed"] in base]
            v["vs_clip"] = {"mean": statistics.fmean(diffs) if diffs else None,
                            "ahead": sum(d > 0 for d in diffs), "seeds": len(diffs)}
    return {"variants": variants,
            "failed": failed,
            "config": spec.base,
            "budget": {"equal": spec.equal, "steps": steps,
                       "reference": spec.reference if spec.equal != "steps" else None,
                       "budget_s": spec.budget_s or None,
                       "flops_per_step": flops},
            "seeds": spec.seeds,
            "evaluations": spec.evaluations}


def _fractions_summary(results: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Linear-probe or fine-tuning (``key``) mean AUC over seeds, per label fraction, when
    every seed has one."""
    if not results or not all(key in r for r in results):
        return None
    aucs = [r[key]["mean_auc"] for r in results]
    fractions = {}
    for fr in results[0][key].get("fractions", {}):
        if all("mean_auc" in r[key].get("fractions", {}).get(fr, {}) for r in results):
            v = [r[key]["fractions"][fr]["mean_auc"] for r in results]
            fractions[fr] = {"mean_auc": statistics.fmean(v),
                             "sd": statistics.stdev(v) if len(v) > 1 else 0.0}
    return {"mean_auc": statistics.fmean(aucs),
            "sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "seeds": {str(r["seed"]): r[key]["mean_auc"] for r in results},
            "fractions": fractions,
            **({"steps": results[0][key]["steps"]} if "steps" in results[0][key] else {})}


def markdown(summary: dict[str, Any]) -> str:
    v = summary["variants"]
    budget = summary["budget"]
    small = [f for f in SMALL_FINDINGS if v and f in next(iter(v.values()))["per_finding"]]
    seeds = ", ".join(map(str, summary["seeds"]))
    lesions = any(r.get("lesion_mask_share") is not None for r in v.values())
    retrieval = any(r.get("retrieval") for r in v.values())
    paired = any("vs_clip" in r for r in v.values())
    # label-fraction columns: key → fractions present ("1" only for a summary without them)
    columns = {key: sorted({f for r in v.values() if r.get(key)
                            for f in r[key].get("fractions", {})}, key=lambda f: -float(f))
               or ["1"] for key in ("probe", "finetune") if any(r.get(key) for r in v.values())}
    n_fraction_cols = sum(len(fr) for fr in columns.values())
    lines = [f"# Ablation: equal {budget['equal']}, seeds {seeds}", "",
             "Zero-shot mean AUC over findings: mean ± sd over seeds; per seed (sN: seed N) "
             "the AUC and its bootstrap 95 % CI." +
             (" Lesion masked: the share of nodule/mass patches that AttMIM masks (random "
              "masking would mask the mask ratio; variants without AttMIM show –)."
              if lesions else "") +
             (" Δ clip: the mean over seeds of (variant − clip) on the same seed, and on how "
              "many seeds the variant is ahead." if paired else "") +
             (" Probe: linear-probe mean AUC (one logistic regression per finding on the "
              "frozen image features; training rows of the evaluation manifest, or the share of "
              "their patients given in %; C chosen on held-out validation patients), mean ± sd "
              "over seeds." if "probe" in columns else "") +
             (" Fine-tune: the whole image encoder and a linear head trained on the same rows "
              "(`xlip eval finetune`, " + _finetune_steps(v) + " steps at most, stopped on the "
              "validation patients' mean AUC), test mean AUC, mean ± sd over seeds."
              if "finetune" in columns else "") +
             (" i→t / t→i R@5: image-to-report and report-to-image Recall@5 on the evaluation "
              "split (identical reports one target), mean over seeds." if retrieval else "") +
             (" Equal FLOPs: each variant's steps × its FLOPs per step (forward and backward, "
              "`xlip.flops`, the mean over its first batches) equal the reference's (" +
              ", ".join(f"{n} {f / 1e9:.1f} G" for n, f in budget["flops_per_step"].items()) +
              ")." if budget.get("flops_per_step") else ""), "",
             "| variant | steps | mean AUC | " + ("Δ clip (ahead) | " if paired else "") +
             "".join(f"{'fine-tune' if key == 'finetune' else key} {float(f) * 100:g} % | "
                     for key, fr in columns.items() for f in fr) +
             "per seed (95 % CI) | " +
             " | ".join(small) + (" | " if small else "") +
             ("lesion masked | " if lesions else "") +
             ("i→t R@5 | t→i R@5 | " if retrieval else "") + "s/step | wall min |",
             "|---|---|---|---|" + "---|" * (len(small) + lesions + paired + n_fraction_cols +
                                             2 * retrieval) + "---|---|"]
    for name, r in v.items():
        per_seed = "; ".join(f"s{s['seed']} {s['mean_auc']:.3f} ({_ci(s['ci95'])})"
                             for s in r["seeds"])
        sd = f"± {r['sd']:.3f}" if len(r["seeds"]) > 1 else "(1 seed)"
        smalls = "".join(f" {r['per_finding'][f]:.3f} |" for f in small)
        if lesions:
            share = r.get("lesion_mask_share")
            smalls += f" {share:.2f} |" if share is not None else " – |"
        if retrieval:
            ret = r.get("retrieval")
            smalls += (f" {ret['image_to_text']['R@5']:.3f} | {ret['text_to_image']['R@5']:.3f} |"
                       if ret else " – | – |")
        delta = ""
        if paired:
            d = r.get("vs_clip")
            delta = (f" {d['mean']:+.3f} ({d['ahead']}/{d['seeds']}) |"
                     if d and d["mean"] is not None and name != BASELINE else " – |")
        for key, fr in columns.items():
            pr = r.get(key)
            for f in fr:
                x = (pr.get("fractions") or {"1": pr}).get(f) if pr else None
                delta += (f" {x['mean_auc']:.3f}" + (f" ± {x['sd']:.3f}" if len(r["seeds"]) > 1
                                                      else "") + " |") if x else " – |"
        lo, hi = min(x["steps"] for x in r["seeds"]), max(x["steps"] for x in r["seeds"])
        steps = str(lo) if lo == hi else f"{lo}–{hi}"
        lines.append(f"| {name} | {steps} | **{r['mean_auc']:.3f}** {sd} |"
                     f"{delta} {per_seed} |{smalls} {r['s_per_step']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} |")
    if v:
        findings = list(next(iter(v.values()))["per_finding"])
        lines += ["", "Per finding (mean over seeds):", "",
                  "| variant | " + " | ".join(findings) + " |",
                  "|---|" + "---|" * len(findings)]
        for name, r in v.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['per_finding'][f]:.3f}"
                                                   for f in findings) + " |")
    for f in summary.get("failed", []):
        lines += ["", f"Failed (left out above): {f['variant']} seed {f['seed']}: {f['error']}"]
    if v:
        lines += ["", "Variants:", ""]
        lines += [f"- `{name}`: {r['description']} (`{' '.join(r['overrides']) or '-'}`)"
                  for name, r in v.items()]
    return "\n".join(lines) + "\n"


def _finetune_steps(variants: dict[str, Any]) -> str:
    """The fine-tuning step budget(s) of a summary's variants, e.g. "300"."""
    return "/".join(sorted({str(r["finetune"]["steps"]) for r in variants.values()
                            if r.get("finetune")}, key=int))


def _ci(ci: Sequence[float]) -> str:
    lo, hi = ci
    return "–" if math.isnan(lo) else f"{lo:.3f}–{hi:.3f}"
