"""Atomic file writes: write a temporary sibling, then rename it over the target.

A reader, or the rerun of an interrupted command, finds the old file or the new one, never half of
one. The temporary file is ``<name>.tmp`` beside the target (one file system, so ``os.replace`` is
atomic); an error while writing leaves it behind for the next run to overwrite or remove.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temporary_path(path: str | Path) -> Path:
    """``<path>.tmp``: where :func:`atomic_path` has the new content written."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A path to write ``path``'s new content to; renamed onto ``path`` when the block ends
    without an error (for writers that take a path, such as safetensors)."""
    tmp = temporary_path(path)
    yield tmp
    os.replace(tmp, path)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = False,
                **kwargs) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, atomically. ``fsync``: force the bytes to disk
    before the rename (files that a resumed run trusts)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Write ``data`` (bytes, or text in the locale's encoding) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as fh:
        fh.write(data)
