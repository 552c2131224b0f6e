"""Atomic, durable file writes for every artifact a run leaves behind.

A reader (an auditor, a resumed run, a restarted client) must see either the old file
or the new one, never a torn write: the bytes go to a temporary file in the same
directory, are fsynced, and are renamed over the target.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Fsync a directory, so a file just created in it survives a crash (POSIX; a no-op
    on Windows, which cannot open a directory)."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
