"""A package packed into one file (``NAME.eexit.zip``): for apps that ship models inside their
bundle and load them from memory.

The archive is a plain zip (stored, not compressed) holding ``manifest.json`` and the files it
lists, each directly at the top (no folders).  Reading refuses anything a directory package
would refuse (unsafe names, missing files, wrong sizes or hashes) plus what only a zip can
carry: folders, duplicate names, a member larger than ``MAX_MEMBER_BYTES`` (zip bombs) and
encryption.  Stdlib only.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

from ._manifest_json import MAX_MANIFEST_BYTES, decode_manifest
from .errors import ArchiveError

ARCHIVE_SUFFIX = ".eexit.zip"
MANIFEST_NAME = "manifest.json"
MAX_MEMBER_BYTES = 4 << 30          # per file, uncompressed
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same package packs to the same bytes


def is_archive(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def read_archive(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every member's bytes, checked for what a zip can smuggle in."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ArchiveError(f"{where} is not a zip archive ({exc}); pack a package with `edgeexit pack`") from None
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        if info.is_dir() or "/" in name or "\\" in name or name in ("", ".", "..") or ":" in name:
            raise ArchiveError(f"{where} holds {name!r}: packed packages hold plain file names only, no folders")
        if name in members:
            raise ArchiveError(f"{where} holds {name!r} twice; a packed package names each file once")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{where}: {name!r} is encrypted; packed packages are not")
        limit = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_MEMBER_BYTES
        if info.file_size > limit:
            raise ArchiveError(f"{where}: {name!r} unpacks to {info.file_size:,} bytes, over the {limit:,} allowed")
        members[name] = info
    if MANIFEST_NAME not in members:
        raise ArchiveError(f"{where} has no {MANIFEST_NAME}; it is not a packed exit package")
    manifest = decode_manifest(_read(archive, members[MANIFEST_NAME]), f"{where}: {MANIFEST_NAME}")
    blobs = {name: _read(archive, info) for name, info in members.items() if name != MANIFEST_NAME}
    return manifest, blobs


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size + 1)   # never more than the header promised, plus one to notice
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
        raise ArchiveError(f"{info.filename!r} cannot be unpacked ({exc}); the archive is damaged, or packed "
                           "with a method other than stored or deflate") from None
    if len(data) != info.file_size:
        raise ArchiveError(f"{info.filename!r} unpacks to another size than its zip header says; the archive is "
                           "damaged or forged")
    return data


def archive_bytes(manifest_bytes: bytes, files: Mapping[str, bytes]) -> bytes:
    """The zip of a package: ``manifest.json`` first, then the files in the manifest's order."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in [(MANIFEST_NAME, manifest_bytes), *files.items()]:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()
