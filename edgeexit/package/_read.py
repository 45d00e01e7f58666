"""Reading an exit package, verified before anything is built from it.

``load_package`` takes a package directory, a packed package file or its bytes, parses
the manifest and checks every listed file: present, a regular file inside the package,
and its size and sha256 as recorded.  With ``keep_bytes`` (always for a packed package)
the verified bytes are kept, so the bytes that were hashed are the bytes that run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import _leftovers as leftovers
from .._archive import is_archive, read_archive
from .._manifest_json import MAX_MANIFEST_BYTES, decode_manifest
from ..errors import FileIntegrityError, MissingFileError, PackageNotFoundError, UnsafePathError
from ._files import _verify_bytes, check_file_name, sha256_file
from ._parse import _schema, parse_manifest
from ._spec import MANIFEST_NAME, Package


def _read_verified(root: Path, files: Mapping[str, Any], blobs: Mapping[str, bytes] | None,
                   verify_hashes: bool) -> dict[str, bytes]:
    """Every listed file's bytes, read once and checked (from ``blobs`` for an archive, else from disk)."""
    out = {}
    for name, meta in files.items():
        check_file_name(name, root, on_disk=blobs is None)
        _schema(isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str)
                and type(meta.get("size")) is int, f"files[{name!r}]",
                "an object with sha256 (string) and size (integer)", meta)
        if blobs is not None:
            if name not in blobs:
                raise MissingFileError(f"packed package {root} lists {name!r} but does not hold it; pack it again")
            data = blobs[name]
        else:
            _verify_files(root, {name: meta}, verify_hashes=False)   # present, regular, not a link
            with open(root / name, "rb") as f:
                data = f.read(meta["size"] + 1)
        _verify_bytes(root, name, meta, data, verify_hashes)
        out[name] = data
    return out


def _verify_files(root: Path, files: Mapping[str, Any], verify_hashes: bool) -> None:
    for name, meta in files.items():
        check_file_name(name, root)
        _schema(isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str)
                and type(meta.get("size")) is int, f"files[{name!r}]",
                "an object with sha256 (string) and size (integer)", meta)
        path = root / name
        if not path.exists():
            raise MissingFileError(
                f"package {root} lists {name!r} but the file is missing; the package was copied "
                "incompletely. Copy the whole directory again or re-export it."
            )
        if not path.is_file():
            raise UnsafePathError(f"package entry {name!r} in {root} is not a regular file")
        size = path.stat().st_size
        if size != meta["size"]:
            raise FileIntegrityError(
                f"{name!r} in {root} is {size} bytes but the manifest says {meta['size']}; the file "
                "was truncated or replaced. Copy the package again or re-export it."
            )
        if verify_hashes:
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise FileIntegrityError(
                    f"{name!r} in {root} has sha256 {digest[:16]}… but the manifest says "
                    f"{meta['sha256'][:16]}…; the file was modified or corrupted. Copy the package "
                    "again or re-export it."
                )


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
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
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink() or not mpath.is_file():
        raise PackageNotFoundError(
            f"{root} has no {MANIFEST_NAME} (or it is not a regular file); this directory is not an "
            "exit package. Export one with `edgeexit export`."
        )
    with open(mpath, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    return root, decode_manifest(data, str(mpath))


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
    root, manifest = read_manifest(path)
    package = parse_manifest(manifest, root)
    if not keep_bytes:
        _verify_files(root, package.files, verify_hashes)
        return package
    return replace(package, blobs=_read_verified(root, package.files, None, verify_hashes))


def _load_packed(data: bytes, where: Path, verify_hashes: bool) -> Package:
    manifest, members = read_archive(data, str(where))
    package = parse_manifest(manifest, where)
    return replace(package, blobs=_read_verified(where, package.files, members, verify_hashes))
