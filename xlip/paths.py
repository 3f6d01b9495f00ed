"""Output folders checked before any work is done, so that a run never computes for an hour and
then fails on a folder it cannot write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from xlip.errors import XlipError


def writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it.

    ``what`` names the flag or key the path came from (``--out``, ``train.out_dir``)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise XlipError(f"{what} {p}: is an existing file, not a folder; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".xlip_write_test_"):
            pass
    except FileExistsError:  # a file where a parent folder should be
        raise XlipError(f"{what} {p}: a part of this path is a file, not a folder; give "
                        "another path") from None
    except OSError as err:
        raise XlipError(f"{what} {p}: cannot write there ({err.strerror or err}); give a "
                        "folder you can write to") from None
    return p


def writable_file(path: str | Path, what: str) -> Path:
    """The folder of an output file must be writable and the path must not be a folder."""
    p = Path(path)
    if p.is_dir():
        raise XlipError(f"{what} {p}: is a folder; give a file path")
    writable_dir(p.parent if str(p.parent) else Path("."), what)
    if p.exists() and not os.access(p, os.W_OK):
        raise XlipError(f"{what} {p}: the file exists and cannot be overwritten; give another "
                        "path")
    return p
