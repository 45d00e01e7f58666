"""Replace a file atomically: write a temporary sibling, fsync it, then ``os.replace``.

A crash at any point leaves either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _process_umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def default_mode(directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give under the umask: mkstemp/mkdtemp give 0600/0700,
    which would leave a package unreadable to a service running as another user."""
    return (0o777 if directory else 0o666) & ~_UMASK


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.chmod(tmp, default_mode(directory=False))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
    return dest


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    return replace_atomically(path, lambda f: f.write(data))
