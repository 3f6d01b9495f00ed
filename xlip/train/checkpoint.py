"""Checkpoints: ``model.safetensors`` + ``config.yaml`` + ``state.pt`` in one folder, written
crash-safely, with a ``latest`` pointer file. Weight files on their own: :mod:`xlip.model.weights`.

``state.pt`` holds tensors and plain values only (loaded with ``weights_only=True``): the step
(the batch sampler is a pure function of seed and step, so the step is its position), the
optimizer and scheduler states, the divergence guard's lowest loss, the world size, and every
RNG of every rank (``rng``: one entry per rank: torch CPU, the rank's CUDA device, Python's
``random``, NumPy's global generator). There is no gradient scaler: xlip trains in fp32 or bf16
autocast, never fp16.

Write order (``kill -9`` at any point leaves ``latest`` naming a complete checkpoint):

1. leftover ``.tmp_step_*`` folders of an earlier crash are removed;
2. the files go into ``.tmp_step_N`` and are flushed to disk (fsync);
3. ``.tmp_step_N`` is renamed to ``step_N`` (atomic on one file system);
4. ``latest`` is rewritten atomically to name ``step_N``;
5. only then are older checkpoints pruned (and later ones, left by a run that was resumed from
   an earlier step, removed).

A ``step_N`` that already exists (a run resumed from an earlier step reaches N again) is removed
before the rename, after ``latest`` has been pointed away from it.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn

from xlip.config import Config, save_config
from xlip.errors import InputError, MissingFileError
from xlip.files import FILE_MODE, write_atomic

STEP_DIR = re.compile(r"step_(\d+)")


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and plain values (``weights_only`` loads
    them): torch CPU, the current CUDA device, Python's ``random``, NumPy's global one."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (every rank must call this alike)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())  # in memory, between this run's own processes
    return states


def restore_rng(state: dict[str, Any], rank: int, world_size: int) -> str | None:
    """Set this rank's generators as the checkpoint saved them. Returns a note when the
    checkpoint was written by another number of processes (then the draws are not exact)."""
    saved = state["rng"]
    if isinstance(saved, dict):  # written before per-rank states were saved: rank 0's only
        saved = [saved]
    set_rng_state(saved[rank % len(saved)])
    written = int(state.get("world_size", len(saved)))
    if written != world_size:
        return (f"the checkpoint was written by {written} process(es), this run has "
                f"{world_size}: training continues, but its batches and random draws are not "
                "those of an uninterrupted run")
    return None


def checkpoint_step(path: Path) -> int | None:
    """N of a complete checkpoint folder ``step_N``; None for anything else."""
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``root``, by step."""
    found = ((checkpoint_step(p), p) for p in root.glob("step_*"))
    return sorted((s, p) for s, p in found if s is not None)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, cfg: Config,
                    train_state: dict[str, Any], keep: int = 2,
                    rng: list[dict[str, Any]] | None = None) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXXX`` crash-safely (see the module docstring) and
    point ``latest`` at it. ``rng``: every rank's generators (:func:`gather_rng_states`);
    default: this process's only."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):  # a crash during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    os.chmod(tmp / "model.safetensors", FILE_MODE)  # safetensors writes 0600
    save_config(cfg, tmp / "config.yaml")
    rng = rng if rng is not None else [rng_state()]
    torch.save({**train_state, "step": step, "rng": rng, "world_size": len(rng)},
               tmp / "state.pt")
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # a run resumed from an earlier step: ``latest`` must not name it now
        earlier = [p for s, p in complete_checkpoints(root) if s < step]
        if earlier:
            write_atomic(root / "latest", earlier[-1].name + "\n", fsync=True)
        else:
            (root / "latest").unlink(missing_ok=True)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    write_atomic(root / "latest", final.name + "\n", fsync=True)
    done = complete_checkpoints(root)
    earlier = [p for s, p in done if s < step]
    later = [p for s, p in done if s > step]
    for old in earlier[:max(len(earlier) - (keep - 1), 0)] + later:
        shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest_at(out_dir: Path, checkpoint: Path) -> None:
    """A run resumed from one of its own checkpoints: ``latest`` names that one (an earlier
    step rewinds the run; its later checkpoints go at the next write), so that a crash before
    the next checkpoint resumes from where this run started, as ``metrics.jsonl`` says."""
    root = out_dir / "checkpoints"
    if checkpoint_step(checkpoint) is not None and \
            checkpoint.resolve().parent == root.resolve():
        write_atomic(root / "latest", checkpoint.name + "\n", fsync=True)


def resolve_checkpoint(out_dir: Path, resume: str) -> Path:
    """``latest`` → the folder named by ``out_dir/checkpoints/latest``; else a folder path."""
    if resume == "latest":
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise MissingFileError(f"--resume latest: no checkpoint under {out_dir}/checkpoints")
        path = out_dir / "checkpoints" / pointer.read_text().strip()
        if not (path / "state.pt").is_file():
            raise MissingFileError(f"--resume latest: {pointer} names {path.name}, which holds "
                                   "no state.pt (it was moved or deleted); resume from another "
                                   f"checkpoint folder under {out_dir}/checkpoints")
        return path
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
