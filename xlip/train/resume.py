"""What a resumed run may change: the config of ``--resume`` against the checkpoint's own.

A resumed run restores the optimizer and the scheduler as they were, so a changed ``train.lr``
would be recorded in ``config.yaml`` but never used, and a changed model width would fail deep in
``load_state_dict``. Instead: changes on ``SAFE_CHANGES`` apply as given; changes to the model's
shape are refused; every other change is refused unless ``--resume-override`` is given, and then
it is applied truly (the optimizer's hyper-parameters and the schedule follow the new config).
"""

from __future__ import annotations

from typing import Any

import torch

from xlip.config import Config, ConfigError

# nothing the weights, the optimizer state or the batches drawn so far depend on
SAFE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.threads",
                "train.out_dir", "train.report_to", "train.compile", "train.tf32",
                "vision.grad_checkpointing", "text.grad_checkpointing", "data.num_workers",
                "data.verify_images", "data.eval_manifest", "data.eval_split", "eval.")
# the parameters' names and shapes: no override can carry a checkpoint across these
# (mim.target: the MAE decoder's output is pixels or encoder features)
SHAPE_KEYS = ("vision.", "text.", "model.", "mim.target")
NOT_SHAPE = ("vision.attn_impl", "vision.pretrained", "vision.grad_checkpointing",
             "text.attn_impl", "text.dropout", "text.grad_checkpointing",
             "text.pretrained", "text.tokenizer", "model.init_temperature",
             "model.max_logit_scale")  # a moved tokenizer: its vocabulary size is checked


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint value, new value)}`` for every key that differs, the sizes of
    a decoder neither config builds left out (:meth:`~xlip.config.Config.inert_keys`)."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    inert = old.inert_keys() & new.inert_keys()
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in inert}


def _on(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def check_resume(old: Config, new: Config, checkpoint: str, override: bool) -> list[str]:
    """Refuse changes a resume cannot honour; return the changed keys that will apply."""
    changes = config_changes(old, new)
    if new.data.normalize == "dataset" and "data.pixel_std" in changes and not new.data.pixel_std:
        changes.pop("data.pixel_std")  # measured at the start: the checkpoint's values are kept
        changes.pop("data.pixel_mean", None)
    shown = lambda keys: ", ".join(f"{k}: {changes[k][0]!r} → {changes[k][1]!r}" for k in keys)
    shape = [k for k in changes if _on(k, SHAPE_KEYS) and not _on(k, NOT_SHAPE)]
    if old.decoders() != new.decoders():  # a policy switched on or off adds or drops a decoder
        shape += [k for k in ("mim.policy", "mlm.policy") if k in changes]
    if shape:
        raise ConfigError(f"--resume {checkpoint}: the model was trained with other settings of "
                          f"{shown(shape)}; these change its parameters, so the checkpoint "
                          "cannot continue under them. Resume without these overrides, or "
                          "start a new run (another train.out_dir)")
    other = [k for k in changes if not _on(k, SAFE_CHANGES)]
    if other and not override:
        raise ConfigError(f"--resume {checkpoint}: the checkpoint was trained with other "
                          f"settings of {shown(other)}. Resume with the checkpoint's values "
                          "(leave these overrides out), or pass --resume-override to apply the "
                          "new ones from this step on")
    return list(changes)


def apply_optimizer_settings(opt: torch.optim.Optimizer,
                             sched: torch.optim.lr_scheduler.LambdaLR, cfg: Config) -> None:
    """After loading their states: lr, betas, eps and weight decay as ``cfg`` says, and the
    current lr recomputed from the new schedule at the restored step."""
    tr = cfg.train
    for i, group in enumerate(opt.param_groups):
        group["initial_lr"] = tr.lr
        group["betas"] = tuple(tr.betas)
        group["eps"] = tr.adam_eps
        group["weight_decay"] = tr.weight_decay if i == 0 else 0.0  # as in loop.param_groups
    sched.base_lrs = [tr.lr] * len(opt.param_groups)
    for group, lam in zip(opt.param_groups, sched.lr_lambdas):
        group["lr"] = tr.lr * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
