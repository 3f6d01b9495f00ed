"""Where image bytes live: plain files, or members of the tar shards ``xlip data shard`` writes.

An image path ``.../shard-000000.tar#000001.png`` names a shard member (see
:mod:`xlip.data.shards` for the layout). :func:`read_shard_member` returns its bytes from a
per-process index of each tar (member → offset, size; about 200 bytes a member; rebuilt when the
tar changes on disk) with one seek and read. ``load_image`` decodes such paths and
:func:`image_exists` lets the manifest check accept them, so the training loader reads raw
manifests and shard manifests alike.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path

SEP = ".tar#"  # "<shard>.tar#<member>" names a member of a shard

_INDEX: dict[str, tuple[tuple[int, int, int], dict[str, tuple[int, int]]]] = {}
"""Per-process cache: tar path → (its (inode, bytes, mtime_ns), {member: (data offset, size)})."""


def split_shard_path(path: str | Path) -> tuple[str, str] | None:
    """``(".../x.tar", "member")`` for ``".../x.tar#member"``, else None."""
    tar, sep, member = str(path).rpartition(SEP)
    return (tar + ".tar", member) if sep and member else None


def _tar_index(tar: str) -> dict[str, tuple[int, int]]:
    st = os.stat(tar)  # FileNotFoundError for a missing shard
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _INDEX.get(tar)
    if hit is None or hit[0] != stamp:
        with tarfile.open(tar, "r:") as t:
            members = {m.name: (m.offset_data, m.size) for m in t if m.isfile()}
        hit = _INDEX[tar] = (stamp, members)
    return hit[1]


_HOLDERS: Counter[str] = Counter()
"""Per-process count of the readers (stream sources) that hold each tar's index."""


def _forget_parents_holds() -> None:
    """In a forked child (a DataLoader worker): the parent's readers do not run here, so their
    holds must not keep this process's copies of the indexes alive once its own readers let go."""
    _HOLDERS.clear()


if hasattr(os, "register_at_fork"):  # POSIX; spawned children start with empty caches anyway
    os.register_at_fork(after_in_child=_forget_parents_holds)


def hold_shard(tar: str | Path) -> None:
    """A reader starts on ``tar``: its member index stays cached until every holder let go."""
    _HOLDERS[str(tar)] += 1


def forget_shard(tar: str | Path) -> None:
    """A reader is done with ``tar``: the last holder to let go drops its member index from
    this process's cache (two sources on one shard folder keep it while either still reads;
    a later read rebuilds it)."""
    tar = str(tar)
    if tar not in _HOLDERS:  # never held: nobody else's hold to take away
        return
    _HOLDERS[tar] -= 1
    if _HOLDERS[tar] <= 0:
        del _HOLDERS[tar]
        _INDEX.pop(tar, None)


def read_shard_member(path: str | Path) -> bytes:
    """The bytes of member ``m`` of ``x.tar`` for ``path = "x.tar#m"``.

    Raises:
        FileNotFoundError: the tar does not exist or has no such member.
        ValueError: ``path`` does not name a shard member.
    """
    parts = split_shard_path(path)
    if parts is None:
        raise ValueError(f"{path} does not name a shard member (<shard>.tar#<member>)")
    tar, member = parts
    try:
        offset, size = _tar_index(tar)[member]
    except KeyError:
        raise FileNotFoundError(f"shard {tar} has no member {member!r}") from None
    with open(tar, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"shard {tar} ends inside member {member!r}; rebuild it")
    return data


def image_exists(path: str | Path) -> bool:
    """Whether ``path`` is a file, or a ``x.tar#member`` whose shard holds that member."""
    parts = split_shard_path(path)
    if parts is None:
        return Path(path).is_file()
    try:
        return parts[1] in _tar_index(parts[0])
    except (OSError, tarfile.TarError):
        return False
