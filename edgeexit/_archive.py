"""A package packed into one file (``NAME.eexit.zip``): for apps that ship models inside their
bundle and load them from memory.

The archive is a plain zip (stored, not compressed) holding ``manifest.json`` and the files it
lists, each directly at the top (no folders).  Reading refuses anything a directory package
would refuse (unsafe names, missing files, wrong sizes or hashes) plus what only a zip can
carry: folders, duplicate names, a member larger than ``MAX_MEMBER_BYTES`` (zip bombs) and
encryption.  Memory stays bounded by what the manifest declares: only ``manifest.json`` and the
members its ``files`` table lists are ever unpacked, each streamed in chunks (hashed on the way)
and never past its declared size, so the total is at most the manifest plus the sum of the
declared sizes however the other members compress.  Stdlib only.
"""

from __future__ import annotations

import hashlib
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
_CHUNK = 1 << 20                    # unpacked and hashed this much at a time
try:   # zipfile unpacks LZMA members with the lzma module, which a Python build may lack
    import lzma
    _CODEC_ERRORS: tuple[type[Exception], ...] = (lzma.LZMAError,)
except ImportError:  # pragma: no cover - lzma is part of CPython's usual builds
    _CODEC_ERRORS = ()
# what unpacking a damaged or foreign member raises: bz2's "Invalid data stream" is an OSError, an
# encrypted member a RuntimeError, an unknown method NotImplementedError
_UNPACK_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                                               ValueError, RuntimeError, OSError, *_CODEC_ERRORS)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same package packs to the same bytes


def is_archive(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


class PackedPackage:
    """A packed package whose zip directory was checked and whose manifest was read; its other
    members stay packed until ``read`` asks for one by name and declared size."""

    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        try:
            self._archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError) as exc:   # also: a zip version > 6.3
            raise ArchiveError(f"{where} is not a zip archive it can read ({exc}); pack a package with "
                               "`edgeexit pack`") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._archive.infolist():   # the directory only: nothing is unpacked here
            name = info.filename   # checked before is_dir(), which fails on a name zipfile cut to "" at a NUL
            if name in ("", ".", "..") or info.is_dir() or "/" in name or "\\" in name or ":" in name:
                raise ArchiveError(f"{where} holds {name!r}: packed packages hold plain file names only, no folders")
            if name in self._members:
                raise ArchiveError(f"{where} holds {name!r} twice; a packed package names each file once")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"{where}: {name!r} is encrypted; packed packages are not")
            limit = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_MEMBER_BYTES
            if info.file_size > limit:
                raise ArchiveError(f"{where}: {name!r} unpacks to {info.file_size:,} bytes, over the {limit:,} allowed")
            self._members[name] = info
        if MANIFEST_NAME not in self._members:
            raise ArchiveError(f"{where} has no {MANIFEST_NAME}; it is not a packed exit package")
        info = self._members[MANIFEST_NAME]
        text, _ = self._unpack(info, info.file_size, hashed=False)
        self.manifest: dict[str, Any] = decode_manifest(text, f"{where}: {MANIFEST_NAME}")

    def size(self, name: str) -> int | None:
        """The unpacked size the zip directory gives for ``name``; None if the archive does not hold it."""
        info = self._members.get(name) if name != MANIFEST_NAME else None
        return None if info is None else info.file_size

    def read(self, name: str, size: int, hashed: bool = True) -> tuple[bytes, str | None]:
        """The bytes of member ``name``, unpacked only if the zip directory gives it ``size`` bytes and
        never past that, with their SHA-256 (hex) when ``hashed``."""
        info = self._members[name]
        if info.file_size != size:
            raise ArchiveError(f"{self.where}: {name!r} unpacks to {info.file_size:,} bytes but the manifest says "
                               f"{size:,}; the archive is damaged or forged")
        return self._unpack(info, size, hashed)

    def _unpack(self, info: zipfile.ZipInfo, size: int, hashed: bool) -> tuple[bytes, str | None]:
        digest = hashlib.sha256() if hashed else None
        chunks, total = [], 0
        try:
            with self._archive.open(info) as member:
                while total <= size:                       # one byte past the size is enough to notice
                    chunk = member.read(min(_CHUNK, size + 1 - total))
                    if not chunk:
                        break
                    total += len(chunk)
                    chunks.append(chunk)
                    if digest is not None:
                        digest.update(chunk)
        except _UNPACK_ERRORS as exc:
            raise ArchiveError(f"{info.filename!r} cannot be unpacked ({exc}); the archive is damaged, or packed "
                               "with a method other than stored or deflate") from None
        if total != size:
            raise ArchiveError(f"{info.filename!r} unpacks to another size than its zip header says; the archive is "
                               "damaged or forged")
        return b"".join(chunks), None if digest is None else digest.hexdigest()


def archive_bytes(manifest_bytes: bytes, files: Mapping[str, bytes]) -> bytes:
    """The zip of a package: ``manifest.json`` first, then the files in the manifest's order."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in [(MANIFEST_NAME, manifest_bytes), *files.items()]:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()
