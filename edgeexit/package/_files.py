"""Checks on one file of an exit package, whatever reads it.

A file name must be a plain name inside the package directory (no subfolders, ``..``,
absolute paths or symbolic links), an ONNX graph must hold all its tensor data itself
(no external data), and a file's bytes must have the size and sha256 the manifest
records.  ``Package``, the manifest parser and the verified readers all use these.
``PackageDir`` opens a package directory once and reads every file relative to it, so a
load sees one version of a package even while a writer swaps another one into its place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import FileIntegrityError, MissingFileError, UnsafePathError

# Reading relative to one open directory needs dir_fd, O_DIRECTORY and O_NOFOLLOW (Linux, macOS, BSDs);
# elsewhere (Windows) files are opened by path, and ``PackageDir.swapped`` still tells a replaced package.
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW")
# O_NONBLOCK: opening a FIFO planted in a package returns at once (and fstat refuses it) instead of hanging
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def check_file_name(name: Any, root: Path, on_disk: bool = True) -> None:
    """Refuse names that could point outside the package directory."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"package file name {name!r} is not a non-empty string")
    if (
        os.path.isabs(name)
        or name.startswith(("/", "\\"))
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or ":" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise UnsafePathError(
            f"package file {name[:80]!r} is not a plain file name inside {root}: absolute paths, "
            "subfolders, '..', NUL bytes and names over 255 bytes are refused so a package cannot read files "
            "outside itself. "
            "Re-export the package so every file lies directly in its directory."
        )
    if on_disk and (root / name).is_symlink():
        raise _link_refused(name, root)


def _link_refused(name: str, root: Path) -> UnsafePathError:
    return UnsafePathError(
        f"package file {name!r} in {root} is a symbolic link; links are refused because they "
        "can point outside the package. Replace it with the real file (cp -L) and re-verify."
    )


def refuse_external_data(data: bytes, name: str, root: Path) -> None:
    """A package's ONNX graphs hold every byte themselves: onnxruntime would read a tensor's
    external file relative to the model (or, for bytes, to the current directory), unhashed."""
    from .._onnx_scan import ScanError, external_locations

    try:
        outside = external_locations(data)
    except ScanError as exc:
        raise FileIntegrityError(f"{name!r} in {root} is not a well-formed ONNX file ({exc}); re-export the "
                                 "package") from None
    if outside:
        raise UnsafePathError(
            f"{name!r} in {root} keeps tensor data in other file(s) {sorted(set(outside))[:5]}, which no hash in the "
            "manifest covers and which could be any file the process can read; packages refuse external data. "
            "Re-export, or save the graph with onnx.save(model, path, save_as_external_data=False)"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_size(root: Path, name: str, meta: Mapping[str, Any], size: int) -> None:
    if size != meta["size"]:
        raise FileIntegrityError(
            f"{name!r} in {root} is {size} bytes but the manifest says {meta['size']}; the file "
            "was truncated or replaced. Copy the package again or re-export it."
        )


def check_sha256(root: Path, name: str, meta: Mapping[str, Any], digest: str) -> None:
    if digest != meta["sha256"]:
        raise FileIntegrityError(
            f"{name!r} in {root} has sha256 {digest[:16]}… but the manifest says {meta['sha256'][:16]}…; the "
            "file was modified or corrupted. Copy the package again or re-export it."
        )


def _verify_bytes(root: Path, name: str, meta: Mapping[str, Any], data: bytes, verify_hashes: bool,
                  digest: str | None = None) -> None:
    """``data`` has the manifest's size and (with ``verify_hashes``) sha256; ``digest``: already computed."""
    check_size(root, name, meta, len(data))
    if verify_hashes:
        check_sha256(root, name, meta, digest or hashlib.sha256(data).hexdigest())


class PackageDir:
    """A package directory opened once (``O_DIRECTORY``), its files opened relative to it
    (``O_NOFOLLOW``): a new version renamed onto the path mid-load cannot mix into what is read.

    Example:
        >>> with PackageDir(Path("lenet.eexit")) as directory:      # doctest: +SKIP
        ...     data = directory.read("stage0.onnx", 1 << 20)
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY) if _DIR_FD else None
        st = os.fstat(self._fd) if self._fd is not None else os.stat(root)
        self._identity = (st.st_dev, st.st_ino)

    def __enter__(self) -> PackageDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def swapped(self) -> bool:
        """Whether the path now names another directory than the one opened (a new version was published)."""
        try:
            st = os.stat(self.root)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def open(self, name: str) -> int:
        """A read-only descriptor of the regular file ``name`` in this directory; links are refused, not followed."""
        if self._fd is None:
            check_file_name(name, self.root)   # no O_NOFOLLOW here: refuse a link by looking first
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=self._fd) if self._fd is not None else \
                os.open(self.root / name, _OPEN_FLAGS)
        except FileNotFoundError:
            raise MissingFileError(
                f"package {self.root} lists {name!r} but the file is missing; the package was copied "
                "incompletely. Copy the whole directory again or re-export it."
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):    # what O_NOFOLLOW gives for a link (EMLINK: BSDs)
                raise _link_refused(name, self.root) from None
            raise FileIntegrityError(f"{name!r} in {self.root} cannot be read ({exc.strerror or exc}); copy the "
                                     "package again or re-export it") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"package entry {name!r} in {self.root} is not a regular file")
        return fd

    def read(self, name: str, limit: int) -> bytes:
        """At most ``limit`` + 1 bytes of ``name`` (one past the limit is enough to notice a longer file)."""
        with os.fdopen(self.open(name), "rb") as f:
            return f.read(limit + 1)

    def measure(self, name: str, hashed: bool) -> tuple[int, str | None]:
        """The size of ``name`` and, when ``hashed``, its sha256 (streamed, never held whole)."""
        with os.fdopen(self.open(name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not hashed:
                return size, None
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return size, h.hexdigest()
