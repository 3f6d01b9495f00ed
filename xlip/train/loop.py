"""Pre-training: data, model, AdamW with warmup + cosine, DDP, crash-safe checkpoints with exact
resume, metrics (``train.report_to``), a divergence guard and a progress bar around the steps of
:class:`xlip.optim.TrainSteps` (bf16 autocast, accumulation, clipping, non-finite abort), which
fine-tuning runs too."""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from xlip.config import Config, ConfigError, load_config, save_config
from xlip.data.collate import Collator
from xlip.data.dataset import MixedDataset
from xlip.data.images import dataset_stats
from xlip.data.sampler import MixedBatchSampler
from xlip.data.stream import ShardStream, streamed
from xlip.files import exclusive, writable_dir
from xlip.losses import XLIPLoss
from xlip.model.weights import load_weights, save_text_files, save_weights
from xlip.model.xlip import XLIPModel
# NonFiniteLossError, lr_lambda and param_groups are also imported from here (ablate, tests)
from xlip.optim import (NonFiniteLossError, TrainSteps, adamw, lr_lambda,  # noqa: F401
                        param_groups)
from xlip.precision import set_tf32
from xlip.text.tokenizer import load_tokenizer
from xlip.train.checkpoint import (gather_rng_states, load_state, point_latest_at,
                                   resolve_checkpoint, restore_rng, save_checkpoint)
from xlip.train.distributed import (DistInfo, any_rank, barrier, init_distributed,
                                    launch_from_env, reduce_sums, sync_batchnorm,
                                    wrap_for_training)
from xlip.train.resume import apply_optimizer_settings, check_resume
from xlip.train.tracking import Tracker, check_reporters


def tokenizer_dir(cfg: Config) -> str:
    path = cfg.text.tokenizer or cfg.text.pretrained
    if not path:
        raise ConfigError("no tokenizer: set text.tokenizer (train one with `xlip tokenizer "
                          "train`) or text.pretrained (a local HF model dir)")
    return path


class MetricLog:
    """Averages loss terms between log lines, per term and per data source, over all ranks.

    The keys are fixed up front (every term × every source), so that all ranks reduce the same
    list in one call whatever their batches held; terms no rank saw are left out of the row.
    Between log lines the sums stay on the training device (0-d tensors, per-source sums as
    one (S, 2) table per term, S the number of sources): adding to them never makes the host
    wait for the GPU. :meth:`flush` reduces and reads them, at log steps only.
    """

    def __init__(self, names: list[str], terms: Sequence[str]) -> None:
        self.names = names
        self.keys = sorted([f"{t}_loss" for t in terms] +
                           [f"{t}_loss/{n}" for t in terms for n in names] +
                           ["guide_fallback", "samples"])
        self.reset()

    def reset(self) -> None:
        # key → float or 0-d device tensor
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, float | torch.Tensor] = defaultdict(float)
        self.by_source: dict[str, torch.Tensor] = {}  # term → (S, 2) (sum, count) per source
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
            batch: dict[str, torch.Tensor]) -> None:
        self.sums["samples"] += int(batch["has_image"].shape[0])
        self.counts["samples"] = 1.0  # one per rank: the reduced count is the world size
        if "mim_guide_fallback" in out:
            self.sums["guide_fallback"] += out["mim_guide_fallback"].detach().double().sum()
            self.counts["guide_fallback"] += len(out["mim_guide_fallback"])
        for key, value in losses.items():
            if key.endswith("_loss"):
                self.sums[key] += value.detach().double()
                self.counts[key] += 1
            elif key.endswith("_per_sample"):
                self._add_by_source(key[: -len("_per_sample")], value.detach(), out,
                                    batch["source"])

    def _add_by_source(self, term: str, value: torch.Tensor, out: dict[str, torch.Tensor],
                       source: torch.Tensor) -> None:
        """Per-source sums of a per-sample loss: an index_add over the sources' ids (S fixed),
        so no shape depends on the data."""
        rows = out[f"{term}_rows"]  # (n,) the batch rows of ``value``
        if term == "mlm":  # value (B,) is over all rows: keep the rows with scored tokens
            weight = torch.zeros_like(value, dtype=torch.float64).index_add_(
                0, rows, torch.ones_like(rows, dtype=torch.float64)).clamp(max=1)  # (B,)
            value = torch.where(weight > 0, value.double(), 0.0)
            src = source
        else:
            weight = torch.ones_like(value, dtype=torch.float64)  # (n,)
            src = source[rows]
        if term not in self.by_source:
            self.by_source[term] = torch.zeros(len(self.names), 2, dtype=torch.float64,
                                               device=value.device)
        self.by_source[term].index_add_(0, src, torch.stack([value.double(), weight], 1))

    def flush(self, device: torch.device) -> dict[str, float]:
        """Means over every rank's steps and rows; ``samples_per_s`` summed over ranks."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        sums, counts = dict(self.sums), dict(self.counts)
        for term, table in self.by_source.items():
            for s, name in enumerate(self.names):
                sums[f"{term}_loss/{name}"], counts[f"{term}_loss/{name}"] = table[s]
        reduced = reduce_sums(sums, counts, self.keys, device)
        samples = reduced.pop("samples")[0]
        row = {k: s / c for k, (s, c) in reduced.items() if c > 0}
        row["samples_per_s"] = samples / elapsed
        self.reset()
        return row


def build_loader(cfg: Config, dataset: MixedDataset | ShardStream, collate: Collator,
                 start_step: int, info: DistInfo, position: dict | None = None) -> DataLoader:
    """The batches of steps ``start_step`` … ``train.steps - 1`` of this rank, made by
    ``collate``; ``position``: a checkpoint's stream position, checked against the run
    (streamed sources)."""
    tr = cfg.train
    if isinstance(dataset, ShardStream):
        dataset.start, dataset.stop = start_step * tr.grad_accum, tr.steps * tr.grad_accum
        if position is not None:
            dataset.check_position(position, dataset.start)
        return DataLoader(dataset, batch_size=None, collate_fn=collate,
                          num_workers=cfg.data.num_workers, persistent_workers=False,
                          prefetch_factor=4 if cfg.data.num_workers else None,
                          pin_memory=info.device.type == "cuda")
    sampler = MixedBatchSampler([len(r) for r in dataset.records],
                                [s.weight for s in cfg.data.sources], cfg.data.batch_size,
                                seed=tr.seed, start_step=start_step * tr.grad_accum,
                                steps=tr.steps * tr.grad_accum, rank=info.rank,
                                world_size=info.world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=cfg.data.num_workers, persistent_workers=False,
                      prefetch_factor=4 if cfg.data.num_workers else None,
                      # page-locked batches: the step's non_blocking copies overlap the GPU
                      pin_memory=info.device.type == "cuda")


def pretrain(cfg: Config, resume: str | None = None, progress: bool = True,
             resume_override: bool = False) -> Path:
    """Pre-train XLIP as ``cfg`` says; returns the run folder.

    ``resume``: 'latest' or a checkpoint folder. A config that differs from the checkpoint's
    is refused (naming the keys) unless the change is safe or ``resume_override`` is set.
    While it trains, the run folder is locked (``RUN/.lock``, held by rank 0): a second
    training into the same folder stops at once instead of overwriting this one's files."""
    if launch_from_env(os.environ).rank != 0:  # rank 0 holds the lock for the whole job
        return _pretrain(cfg, resume, progress, resume_override)
    out_dir = writable_dir(cfg.train.out_dir, "train.out_dir")
    with exclusive(out_dir / ".lock", f"train.out_dir {out_dir}",
                   "wait for it to finish, or give another train.out_dir"):
        return _pretrain(cfg, resume, progress, resume_override, out_dir)


def _pretrain(cfg: Config, resume: str | None, progress: bool, resume_override: bool,
              out_dir: Path | None = None) -> Path:
    """``out_dir``: train.out_dir, already checked writable (rank 0); None: check it here."""
    cfg.validate()  # a config changed after construction
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name at least one manifest to train on")
    info = init_distributed()
    tr = cfg.train
    set_tf32(tr.tf32, info.device)
    if tr.threads:
        torch.set_num_threads(tr.threads)
    # denormal floats (tiny Adam second moments, small grads) run ~100x slower on x86 CPUs
    torch.set_flush_denormal(True)
    torch.manual_seed(tr.seed + info.rank)
    random.seed(tr.seed + info.rank)
    out_dir = out_dir or writable_dir(tr.out_dir, "train.out_dir")
    ck, state = None, None
    if resume:  # every file of the checkpoint checked before the data is loaded
        ck = resolve_checkpoint(out_dir, resume)
        state = load_state(ck)
        old = load_config(ck / "config.yaml", saved=True)
        changed = check_resume(old, cfg, resume, resume_override)
        if cfg.data.normalize == "dataset" and not cfg.data.pixel_std:
            cfg.data.pixel_mean, cfg.data.pixel_std = old.data.pixel_mean, old.data.pixel_std
        if changed and info.is_main:
            print(f"resuming {ck.name} with changed settings: {', '.join(changed)}",
                  file=sys.stderr)
    check_reporters(tr.report_to)  # a missing package: now, not after the data is loaded
    tok_src = tokenizer_dir(cfg)
    tok = load_tokenizer(tok_src)
    dataset = (ShardStream(cfg, info.rank, info.world_size, progress=progress and info.is_main)
               if streamed(cfg) else MixedDataset(cfg, train=True, rejects_dir=out_dir))
    if cfg.data.normalize == "dataset" and not cfg.data.pixel_std:
        # measured once (the same draw on every rank) and saved with the config for evaluation
        cfg.data.pixel_mean, cfg.data.pixel_std = dataset_stats(
            dataset.image_paths(), cfg.vision.image_size, seed=tr.seed)
    collate = Collator(cfg, tok, train=True, findings=dataset.findings())
    model = sync_batchnorm(XLIPModel(cfg, len(tok)).to(info.device), info)
    opt, sched = adamw(model, cfg)
    start = 0
    if ck is not None and state is not None:
        load_weights(model, ck / "model.safetensors")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        apply_optimizer_settings(opt, sched, cfg)
        start = int(state["step"])
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")
        save_text_files(model, tok, out_dir)
        # a model from an earlier finish would sit beside a config it was not trained under
        # (a resumed run that then stops early); the checkpoints keep its weights
        (out_dir / "model.safetensors").unlink(missing_ok=True)
    aux_steps = cfg.loss.aux_steps(tr.steps)  # steps 0 … aux_steps - 1 run MIM and MLM
    # after them the decoders get no gradient: DDP must be told that some parameters go unused
    net = wrap_for_training(model, info, tr.compile, unused=aux_steps < tr.steps)
    criterion = XLIPLoss(cfg)
    loader = build_loader(cfg, dataset, collate, start, info,
                          state.get("stream_position") if state else None)
    terms = [t for t, on in (("cl", cfg.loss.w_cl > 0), ("mim", cfg.mim.policy != "none"),
                             ("mlm", cfg.mlm.policy != "none")) if on]
    log = MetricLog(dataset.names, terms)
    tracker = Tracker(out_dir, tr.report_to, start, info.is_main)  # drops rows after ``start``
    if ck is not None and info.is_main:  # a resume from an earlier step rewinds the run
        point_latest_at(out_dir, ck)
    guard = DivergenceGuard(tr.diverge_factor,
                            float(state.get("guard_best", math.inf)) if state else math.inf)
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=tr.steps, initial=start, desc="pretrain", dynamic_ncols=True,
                   file=sys.stderr)
    model.train()
    batches = iter(loader)  # draws a base seed from the global RNG: before restoring it
    if state is not None:
        note = restore_rng(state, info.rank, info.world_size)
        if note and info.is_main:
            print(f"resuming {ck}: {note}", file=sys.stderr)
    t_start = time.perf_counter()

    def forward(batch: dict[str, torch.Tensor], step: int, micro: int):
        gen = torch.Generator(device=info.device).manual_seed(
            tr.seed * 1_000_003 + (step * tr.grad_accum + micro) * 7 + info.rank)
        out = net(batch, generator=gen, aux=step < aux_steps)
        return criterion(out, batch), out

    def after_step(done: int, grad_norm: torch.Tensor) -> None:
        if done % tr.log_every == 0 or done == tr.steps:
            row = log.flush(info.device)
            row.update(step=done, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                       logit_scale=float(model.scale().detach()),
                       elapsed_s=time.perf_counter() - t_start)
            guard.check(row, out_dir)  # same row on every rank: all stop together
            tracker.log(row)
            if bar is not None:  # rank 0's only
                bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in row.items()
                                 if k.endswith("_loss")} | {"sps": f"{row['samples_per_s']:.0f}"})
        if done % tr.ckpt_every == 0 or done == tr.steps:
            rng = gather_rng_states()  # every rank's generators: all ranks take part
            if info.is_main:
                save_checkpoint(out_dir, done, model, cfg,
                                {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "guard_best": guard.best,
                                 **({"stream_position": dataset.position(done * tr.grad_accum)}
                                    if isinstance(dataset, ShardStream) else {})}, rng=rng)

    TrainSteps(model, opt, sched, forward, info.device, tr.precision, tr.grad_accum,
               tr.clip_grad, on_micro=log.add, after_update=model.clamp_logit_scale,
               on_step=after_step, diverged=lambda what: diverged(what, out_dir),
               any_rank=any_rank).run(batches, start, tr.steps, bar)
    if bar is not None:
        bar.close()
    tracker.close()
    if info.is_main:
        save_weights(model, out_dir / "model.safetensors")
    barrier()
    return out_dir


def diverged(what: str, out_dir: Path) -> str:
    """The message of a diverged run: what happened, what is kept, and the fix."""
    pointer = out_dir / "checkpoints" / "latest"
    kept = (f"the last checkpoint, {out_dir / 'checkpoints' / pointer.read_text().strip()}, is "
            "kept" if pointer.is_file() else "no checkpoint was written before it")
    return (f"training diverged: {what}; no model.safetensors was written and {kept}. Lower "
            "train.lr, raise train.warmup_steps, keep train.clip_grad > 0, or try "
            "train.precision=fp32; then resume with --resume latest --resume-override "
            "train.lr=... or start again")


class DivergenceGuard:
    """Stops a run whose loss (the sum of its logged terms) grows past ``factor`` times the
    lowest value logged so far (at least ``floor``: a loss near 0 may move by more than the
    factor without diverging); 0 switches it off. ``best`` is saved with each checkpoint."""

    floor = 0.01

    def __init__(self, factor: float, best: float = math.inf) -> None:
        self.factor, self.best = factor, best

    def check(self, row: dict[str, float], out_dir: Path) -> None:
        total = sum(v for k, v in row.items() if k.endswith("_loss") and "/" not in k)
        if self.factor and total > self.factor * max(self.best, self.floor):
            raise NonFiniteLossError(diverged(
                f"the loss rose to {total:.4g} at step {row['step']}, over "
                f"train.diverge_factor={self.factor:g} times its lowest logged value "
                f"{self.best:.4g}", out_dir))
        self.best = min(self.best, total)
