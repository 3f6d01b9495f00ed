"""Checkpoints: ``model.safetensors`` + ``config.yaml`` + ``state.pt`` in one folder, written
atomically (a temporary folder renamed into place), with a ``latest`` pointer file."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from xlip.config import Config, save_config


def save_weights(model: nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the configured model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} — was it "
                         "saved with a different config.yaml?")


def save_text_files(model: nn.Module, tokenizer, path: Path) -> None:
    """The tokenizer and the BERT config, so a folder loads without the original text dir."""
    tokenizer.save_pretrained(str(path / "tokenizer"))
    model.text.bert.config.to_json_file(str(path / "text_config.json"))


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
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
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
