"""Reading an exit package, verified before anything is built from it.

``load_package`` takes a package directory, a packed package file or its bytes, parses
the manifest and checks every listed file: present, a regular file inside the package,
and its size and sha256 as recorded.  With ``keep_bytes`` (always for a packed package)
the verified bytes are kept, so the bytes that were hashed are the bytes that run.

A directory is opened once and the manifest and every file are read relative to it, so a
load that races ``write_package`` (which exchanges the new version with the old one) sees
one whole version.  The old version is deleted right after the exchange: a load that loses
its files that way sees the path now names another directory and starts again on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import _leftovers as leftovers
from .._archive import PackedPackage, is_archive
from .._manifest_json import MAX_MANIFEST_BYTES, decode_manifest
from ..errors import MissingFileError, PackageError, PackageNotFoundError, UnsafePathError
from ._files import PackageDir, _verify_bytes, check_file_name, check_sha256, check_size
from ._parse import _schema, parse_manifest
from ._spec import MANIFEST_NAME, Package

# How often a load starts again when a new version replaced the package under it.  Each start
# needs a publish to land mid-load to fail, so more than a couple means a writer in a tight loop.
_LOAD_ATTEMPTS = 8


def _check_entry(name: Any, meta: Any, root: Path) -> None:
    check_file_name(name, root, on_disk=False)   # links are refused when opened (O_NOFOLLOW)
    _schema(isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str)
            and type(meta.get("size")) is int, f"files[{name!r}]",
            "an object with sha256 (string) and size (integer)", meta)


def _read_verified(root: Path, files: Mapping[str, Any], source: PackageDir | PackedPackage,
                   verify_hashes: bool) -> dict[str, bytes]:
    """Every listed file's bytes, read once and checked (from the archive, or the open directory)."""
    out = {}
    for name, meta in files.items():
        _check_entry(name, meta, root)
        digest = None
        if isinstance(source, PackedPackage):
            size = source.size(name)
            if size is None:
                raise MissingFileError(f"packed package {root} lists {name!r} but does not hold it; pack it again")
            check_size(root, name, meta, size)            # before anything is unpacked
            data, digest = source.read(name, size, hashed=verify_hashes)
        else:
            data = source.read(name, meta["size"])
        _verify_bytes(root, name, meta, data, verify_hashes, digest)
        out[name] = data
    return out


def _verify_files(root: Path, files: Mapping[str, Any], verify_hashes: bool,
                  directory: PackageDir | None = None) -> None:
    """Every listed file present, regular, of its size and (with ``verify_hashes``) sha256."""
    if directory is None:
        with PackageDir(root) as opened:
            return _verify_files(root, files, verify_hashes, opened)
    for name, meta in files.items():
        _check_entry(name, meta, root)
        size, digest = directory.measure(name, verify_hashes)
        check_size(root, name, meta, size)
        if digest is not None:
            check_sha256(root, name, meta, digest)
    return None


def _package_dir(path: str | os.PathLike[str]) -> PackageDir:
    root = Path(path)
    if not root.exists() and not leftovers.recover(root):
        raise PackageNotFoundError(
            f"no exit package at {root}; export one with `edgeexit export` or check the path"
        )
    if not root.is_dir():
        raise PackageNotFoundError(
            f"{root} is a file, but an exit package is a directory holding {MANIFEST_NAME} and the "
            "stage graphs; pass the directory"
        )
    try:
        return PackageDir(root)
    except FileNotFoundError:
        raise PackageNotFoundError(f"no exit package at {root} (it was moved away while loading); check the path"
                                   ) from None


def _manifest(directory: PackageDir) -> dict[str, Any]:
    try:
        data = directory.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except (MissingFileError, UnsafePathError):
        raise PackageNotFoundError(
            f"{directory.root} has no {MANIFEST_NAME} (or it is not a regular file); this directory is not an "
            "exit package. Export one with `edgeexit export`."
        ) from None
    return decode_manifest(data, str(directory.root / MANIFEST_NAME))


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    with _package_dir(path) as directory:
        return directory.root, _manifest(directory)


def load_package(path: str | os.PathLike[str] | bytes, *, verify_hashes: bool = True,
                 keep_bytes: bool = False) -> Package:
    """Read and verify an exit package; raises a ``PackageError`` subclass on any defect.

    Args:
        path: the package directory, a packed package file (``NAME.eexit.zip``, see
            ``pack_package``) or the bytes of one.
        verify_hashes: check every file's sha256 (sizes are always checked).
        keep_bytes: read every file once, verify those bytes and keep them in
            ``Package.blobs`` (always so for a packed package), so that whoever builds
            sessions from them runs exactly what was verified.

    Example:
        >>> pkg = load_package("lenet.eexit")          # doctest: +SKIP
        >>> [s.name for s in pkg.stages]               # doctest: +SKIP
        ['stage0', 'stage1']
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        return _load_packed(bytes(path), Path("<package in memory>"), verify_hashes)
    if Path(path).is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if is_archive(head):
            return _load_packed(Path(path).read_bytes(), Path(path), verify_hashes)
    attempt = 1
    while True:
        with _package_dir(path) as directory:
            try:
                package = parse_manifest(_manifest(directory), directory.root)
                if not keep_bytes:
                    _verify_files(directory.root, package.files, verify_hashes, directory)
                    return package
                return replace(package, blobs=_read_verified(directory.root, package.files, directory,
                                                             verify_hashes))
            except PackageError:
                if attempt == _LOAD_ATTEMPTS or not directory.swapped():
                    raise
        attempt += 1


def _load_packed(data: bytes, where: Path, verify_hashes: bool) -> Package:
    archive = PackedPackage(data, str(where))      # checks the zip directory, reads only the manifest
    package = parse_manifest(archive.manifest, where)
    return replace(package, blobs=_read_verified(where, package.files, archive, verify_hashes))
