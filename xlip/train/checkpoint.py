"""Checkpoints: ``model.safetensors`` + ``config.yaml`` + ``state.pt`` in one folder, written
atomically (a temporary folder renamed into place), with a ``latest`` pointer file. Weight files
on their own: :mod:`xlip.model.weights`."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from xlip.config import Config, save_config
from xlip.files import write_atomic


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, cfg: Config,
                    train_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXXX`` atomically and point ``latest`` at it."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    torch.save({**train_state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(out_dir: Path, resume: str) -> Path:
    """``latest`` → the folder named by ``out_dir/checkpoints/latest``; else a folder path."""
    if resume == "latest":
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint under {out_dir}/checkpoints")
        return out_dir / "checkpoints" / pointer.read_text().strip()
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: no state.pt in {path}")
    return path


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
