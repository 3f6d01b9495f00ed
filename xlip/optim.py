"""The optimisation shared by pre-training and fine-tuning: one loop of steps, no second copy.

- :func:`param_groups`: AdamW without weight decay for norms, biases, position and class
  embeddings and other 1-D parameters; :func:`lr_lambda`: linear warm-up, then cosine decay to
  ``train.min_lr_ratio``; :func:`adamw`: both, as ``cfg.train`` says.
- :class:`TrainSteps`: the steps themselves (gradient accumulation, bf16 autocast, a stop on a
  non-finite loss or gradient norm before the update, gradient clipping, optimizer and scheduler
  steps, the progress bar), with hooks for what each caller adds: :func:`xlip.train.loop.pretrain`
  logs metrics, guards against divergence and writes checkpoints after each step;
  :func:`xlip.eval.finetune.finetune` validates every K steps and stops early.

This module sits below both ``xlip.eval`` and ``xlip.train``: fine-tuning is an evaluation
protocol, and evaluation never imports the trainer (its data loading, checkpoints and DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from xlip.config import Config
from xlip.errors import XlipError
from xlip.losses import loss_terms, total_loss
from xlip.precision import autocast

Batch = dict[str, Any]  # tensors (moved to the device) and other values
Outputs = dict[str, Any]


class NonFiniteLossError(XlipError, RuntimeError):
    """Training diverged: a loss or the gradient norm is NaN or infinite, or (pre-training) the
    loss grew past ``train.diverge_factor`` times its lowest logged value. No final model is
    written."""


NO_DECAY = ("pos_embed", "cls_token", "mask_token", "position_embeddings", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay for norms, biases, position/class embeddings and other 1-D params."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    tr = cfg.train

    def f(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        t = (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)
        return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def adamw(model: nn.Module, cfg: Config, lr_scale: Mapping[str, float] | None = None
          ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its warm-up + cosine schedule (``cfg.train``: lr,
    betas, eps, weight decay, steps, warm-up, lowest lr). ``lr_scale``: {submodule name:
    multiplier of ``train.lr``}, in groups of their own (fine-tuning's new head: {"head": 10})."""
    tr = cfg.train
    groups = param_groups(model, tr.weight_decay)
    for name, scale in (lr_scale or {}).items():
        sub = model.get_submodule(name)
        moved = {id(p) for p in sub.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in moved]
        groups += [dict(g, lr=tr.lr * scale) for g in param_groups(sub, tr.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.adam_eps,
                            fused=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _alone(flags: Tensor) -> Tensor:
    return flags


def _no_fix(what: str) -> str:
    return f"training diverged: {what}"


@dataclass
class TrainSteps:
    """Optimisation steps over a stream of batches; the callers' extras are hooks.

    A step: ``grad_accum`` times [next batch → device → ``forward(batch, step, micro)`` under
    autocast → the sum of the ``*_loss`` terms → backward of the sum / ``grad_accum`` →
    ``on_micro``]; the gradient norm clipped to ``clip_grad`` (0: measured, not clipped); every
    loss term and the gradient norm checked finite on every process (the step's one
    host-device sync, :meth:`check_finite`); optimizer step; ``after_update``; scheduler step;
    gradients cleared; ``on_step(steps done, grad norm)``, which stops the loop by returning
    True; the progress bar moves on. A non-finite loss or gradient norm raises
    :class:`NonFiniteLossError` before the optimizer step, with the message ``diverged(what)``.
    """

    model: nn.Module  # the parameters clipped (the module itself, not its DDP wrapper)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    # (batch, step, micro-batch) → (losses: every "*_loss" term is summed, outputs)
    forward: Callable[[Batch, int, int], tuple[dict[str, Tensor], Outputs]]
    device: torch.device
    precision: str = "auto"  # train.precision: auto | bf16 | fp32
    grad_accum: int = 1
    clip_grad: float = 0.0
    on_micro: Optional[Callable[[dict[str, Tensor], Outputs, Batch], None]] = None
    after_update: Optional[Callable[[], None]] = None  # between optimizer and scheduler step
    on_step: Optional[Callable[[int, Tensor], Optional[bool]]] = None
    diverged: Callable[[str], str] = _no_fix  # the message: what happened, what is kept, fix
    # flags (a device tensor) at their largest over the processes, on the device (DDP: all stop)
    any_rank: Callable[[Tensor], Tensor] = _alone

    def run(self, batches: Iterator[Batch], start: int, steps: int, bar=None) -> int:
        """Steps ``start`` … ``steps - 1``; returns the number of steps done by then (fewer
        when ``on_step`` stops the loop)."""
        done = start
        for step in range(start, steps):
            terms = []  # each micro-batch's loss terms, detached, for the finiteness check
            for micro in range(self.grad_accum):
                batch = to_device(next(batches), self.device)
                with autocast(self.precision, self.device):
                    losses, out = self.forward(batch, step, micro)
                total = total_loss(losses)
                terms.append({k: v.detach() for k, v in loss_terms(losses).items()})
                if torch.is_tensor(total) and total.requires_grad:  # a constant: nothing to learn
                    (total / self.grad_accum).backward()
                if self.on_micro is not None:
                    self.on_micro(losses, out, batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.clip_grad if self.clip_grad > 0 else 1e12)
            self.check_finite(terms, grad_norm, step)  # before the step: weights stay as they were
            self.opt.step()
            if self.after_update is not None:
                self.after_update()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            done = step + 1
            stop = self.on_step(done, grad_norm) if self.on_step is not None else False
            if bar is not None:
                bar.update(1)
            if stop:
                break
        return done

    def check_finite(self, terms: list[dict[str, Tensor]], grad_norm: Tensor, step: int) -> None:
        """Stop on a NaN or infinite loss term (``terms``: one dict per micro-batch) or gradient
        norm, on every process together (a process's MIM or MLM term may be non-finite on its
        own rows only).

        The step's one host-device sync: the checks make one flag on the device (2: a loss
        term is non-finite, 1: only the gradient norm is, 0: all is well), reduced over the
        processes there (``any_rank``) and read once. The values named in the message are
        read only once the flag is set."""
        # on the training device: with no gradient anywhere, clip_grad_norm_ returns a CPU
        # zero, and NCCL refuses CPU tensors
        values = [v.float().to(self.device) for t in terms for v in t.values()]
        loss_bad = (~torch.isfinite(torch.stack(values)).all() if values
                    else torch.zeros((), dtype=torch.bool, device=self.device))
        flag = (2.0 * loss_bad.float()
                + (~torch.isfinite(grad_norm.to(self.device))).float())
        code = self.any_rank(flag.reshape(1)).item()
        if code >= 2:
            bad = next(({k: float(v) for k, v in t.items() if not math.isfinite(float(v))}
                        for t in terms if not all(math.isfinite(float(v)) for v in t.values())),
                       {})
            what = f"{bad}" if bad else "on another process"
            raise NonFiniteLossError(self.diverged(f"non-finite loss at step {step + 1}: {what}"))
        if code:
            raise NonFiniteLossError(self.diverged(f"the gradient norm is {float(grad_norm)} "
                                                   f"at step {step + 1}"))
