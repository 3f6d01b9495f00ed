"""Checkpoints: ``model.safetensors`` + ``config.yaml`` + ``state.pt`` in one folder, written
atomically (a temporary folder renamed into place), with a ``latest`` pointer file. Weight files
on their own: :mod:`xlip.model.weights`."""

from __future__ import annotations

import os
import pickle
import random
import zipfile
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from xlip.config import Config, save_config
from xlip.errors import InputError, MissingFileError
from xlip.files import FILE_MODE, write_atomic


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
    os.chmod(tmp / "model.safetensors", FILE_MODE)  # safetensors writes 0600
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
            raise MissingFileError(f"--resume latest: no checkpoint under {out_dir}/checkpoints")
        return out_dir / "checkpoints" / pointer.read_text().strip()
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise MissingFileError(f"--resume {resume}: no state.pt in {path}")
    return path


def load_state(path: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder: tensors and plain values only (a file holding
    other pickled objects is refused: unpickling them can run code)."""
    file = path / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never do that
        raise InputError(f"{file} holds pickled Python objects besides tensors and plain "
                         "values; xlip does not load those (unpickling can run code). Resume "
                         "from a checkpoint xlip wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{file}: not a readable training state ({type(err).__name__}: "
                         f"{str(err)[:160]}); the file is damaged or incomplete: resume from "
                         "another checkpoint") from None
