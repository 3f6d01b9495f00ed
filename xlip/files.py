"""Files xlip writes: atomically, with normal permissions, into folders checked up front.

Atomic writes: a reader, or the rerun of an interrupted command, finds the old file or the new
one, never half of one. The temporary file is ``<name>.tmp`` beside the target (one file system,
so ``os.replace`` is atomic); an error while writing leaves it behind for the next run to
overwrite or remove. Output folders are checked before any work is done, so that a command never
computes for an hour and then fails on a folder it cannot write.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from xlip.errors import XlipError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: rw for the owner, r for others under the usual umask 022 (some writers create 0600 files)
FILE_MODE = 0o666 & ~_umask()


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
    os.chmod(tmp, FILE_MODE)
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


def not_utf8(path: str | Path, err: UnicodeDecodeError, line: int | None = None) -> str:
    """The message for a file that is not UTF-8: where, the first bad byte, the fix."""
    where = f"{path} line {line}" if line else str(path)
    return (f"{where}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save it as UTF-8 "
            '(Excel: "CSV UTF-8"), e.g. iconv -f cp1252 -t utf-8')


def writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it.

    ``what`` names the flag or key the path came from (``--out``, ``train.out_dir``)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise XlipError(f"{what} {p}: is an existing file, not a folder; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".xlip_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):  # a file where a parent folder should be
        raise XlipError(f"{what} {p}: a part of this path is a file, not a folder; give "
                        "another path") from None
    except OSError as err:
        raise XlipError(f"{what} {p}: cannot write there ({err.strerror or err}); give a "
                        "folder you can write to") from None
    return p


def writable_file(path: str | Path, what: str) -> Path:
    """The folder of an output file must be writable, and the path must not be a folder."""
    p = Path(path)
    if p.is_dir():
        raise XlipError(f"{what} {p}: is a folder; give a file path")
    writable_dir(p.parent, what)
    if p.exists() and not os.access(p, os.W_OK):
        raise XlipError(f"{what} {p}: the file exists and cannot be overwritten; give another "
                        "path")
    return p


@contextmanager
def exclusive(path: str | Path, what: str, fix: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created, with its folders) while the block
    runs, so that two processes never write one run at once: a second one gets an
    :class:`XlipError` naming ``what``, the holder's pid and ``fix``; with ``wait``, it says
    on stderr that it waits for that pid and takes the lock when it is free. An advisory
    ``flock``: the system drops it when the holder exits, however it exits, so no stale lock
    is left; the file stays. Where there is no ``fcntl`` (Windows), or the file system refuses locks
    (some cluster mounts), the block runs unguarded (the latter with a note on stderr)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms xlip is tested on
        yield
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+") as f:
        locked = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            if not wait:
                raise XlipError(f"{what}: in use by another xlip process (pid {pid}); {fix}"
                                ) from None
            print(f"note: {what}: in use by another xlip process (pid {pid}); waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock (e.g. Lustre mounted noflock)
            print(f"note: {p}: cannot lock here ({err.strerror or err}); {what} runs "
                  "unguarded against a second process", file=sys.stderr)
            locked = False
        try:
            if locked:
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
            yield
        finally:
            if locked:  # explicitly: forked loader workers share this open file and its lock
                fcntl.flock(f, fcntl.LOCK_UN)
