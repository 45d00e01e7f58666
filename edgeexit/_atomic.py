"""Replace a file atomically: write a temporary sibling, fsync it, then ``os.replace``.

A crash at any point leaves either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import EdgeExitError, OutputError

MAX_NAME_BYTES = 255   # NAME_MAX on Linux and macOS; tempfile siblings add about 20 bytes


def describe_write_failure(exc: OSError, path: str | os.PathLike[str]) -> str:
    """One line for a failed write: which path, what the OS said, what to do."""
    hints = {
        errno.ENOSPC: "the filesystem is full; free some space or write elsewhere",
        errno.EROFS: "the filesystem is mounted read-only; write elsewhere",
        errno.EACCES: "permission denied; write to a folder you may write to",
        errno.EPERM: "permission denied; write to a folder you may write to",
        errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
        errno.ENAMETOOLONG: "the name is too long; use a shorter one",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "the path is a folder; name a file",
    }
    hint = hints.get(exc.errno or 0, "check the path and the filesystem")
    return f"cannot write {path}: {exc.strerror or exc} ({hint}); nothing was replaced"


@contextlib.contextmanager
def output_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an OutputError (typed errors pass through)."""
    try:
        yield
    except EdgeExitError:
        raise
    except OSError as exc:
        raise OutputError(describe_write_failure(exc, path)) from None


def check_output_path(path: str | os.PathLike[str], *, folder: bool = False) -> Path:
    """Fail now, before any work, if ``path`` cannot be written (OutputError says why).

    The parent folder must exist (or be creatable) and be a folder, the name must fit, the
    path must not be an existing folder (unless ``folder``: a package directory), and the
    folder must accept a new file: one is created and removed, which catches a read-only
    or full filesystem and missing permissions as root as well.
    """
    dest = Path(path)
    if len(dest.name.encode("utf-8", "surrogatepass")) + 24 > MAX_NAME_BYTES:
        raise OutputError(f"cannot write {dest}: the name is {len(dest.name)} characters; keep it under "
                          f"{MAX_NAME_BYTES - 24} bytes (a temporary sibling adds a suffix)")
    if dest.is_dir() and not folder:
        raise OutputError(f"cannot write {dest}: it is an existing folder; name a file inside it, e.g. "
                          f"{dest / 'results.csv'}")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {dest}: {parent} is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(describe_write_failure(exc, dest)) from None
    if not parent.is_dir():
        raise OutputError(f"cannot write {dest}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{dest.name[:40]}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(describe_write_failure(exc, dest)) from None
    return dest


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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise OutputError(describe_write_failure(exc, dest)) from None
    try:
        os.chmod(tmp, default_mode(directory=False))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        _remove(tmp)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(describe_write_failure(exc, dest)) from None
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(dest.parent)
    return dest


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    return replace_atomically(path, lambda f: f.write(data))


_RENAME_EXCHANGE = 2   # linux/fs.h


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    OS or filesystem has no such call, so the caller falls back to two renames."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))
