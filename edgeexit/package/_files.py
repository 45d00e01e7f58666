"""Checks on one file of an exit package, whatever reads it.

A file name must be a plain name inside the package directory (no subfolders, ``..``,
absolute paths or symbolic links), an ONNX graph must hold all its tensor data itself
(no external data), and a file's bytes must have the size and sha256 the manifest
records.  ``Package``, the manifest parser and the verified readers all use these.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FileIntegrityError, UnsafePathError


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
        raise UnsafePathError(
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


def _verify_bytes(root: Path, name: str, meta: Mapping[str, Any], data: bytes, verify_hashes: bool) -> None:
    if len(data) != meta["size"]:
        raise FileIntegrityError(
            f"{name!r} in {root} is {len(data)} bytes but the manifest says {meta['size']}; the file "
            "was truncated or replaced. Copy the package again or re-export it."
        )
    if verify_hashes:
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise FileIntegrityError(
                f"{name!r} in {root} has sha256 {digest[:16]}… but the manifest says {meta['sha256'][:16]}…; the "
                "file was modified or corrupted. Copy the package again or re-export it."
            )
