"""Stable hashes for seeds, splits and keys (Python's ``hash()`` is salted per process)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_int(text: str) -> int:
    """Stable 63-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def hash_unit(text: str) -> float:
    """A stable number in [0, 1) for ``text``: patient-level splits and subsets draw by it."""
    return hash_int(text) / 2.0 ** 63


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
