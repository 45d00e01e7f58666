"""Writing exit packages atomically, so a crash at any step leaves the previous one loadable.

``write_package`` builds a package in a temporary sibling directory, fsyncs it and
renames (or exchanges) it into place; ``update_manifest``, ``set_thresholds`` and
``set_temperatures`` rewrite only ``manifest.json`` by temporary file and ``os.replace``; ``pack_package`` writes a
verified package as one archive file.  Nothing is written that the reader would refuse.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _leftovers as leftovers
from .._archive import archive_bytes
from .._atomic import default_mode, exchange_paths, fsync_dir, output_errors, write_bytes_atomically
from ..errors import ManifestSchemaError, MissingFileError, OutputError, PackageError
from ._files import check_file_name, sha256_file
from ._parse import parse_manifest
from ._read import _verify_files, load_package, read_manifest
from ._spec import DISABLED_EXITS_VERSION, FORMAT_NAME, MANIFEST_NAME, TEMPERATURE_VERSION, Package


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest: two-space indented JSON, key order kept, newline."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_package(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    files: Mapping[str, str | os.PathLike[str]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a package atomically: build it in a temporary sibling, then rename into place.

    ``files`` maps plain file names to source paths; their sha256 and size are added to
    the manifest's ``files`` table.  If anything fails, a previous package at ``path``
    is left untouched.  Only an exit package is ever replaced (``check_replaceable``): anything
    else at ``path`` is an ``OutputError``, as is a package when ``overwrite`` is False.
    Returns the package path.
    """
    dest = Path(path)
    with output_errors(dest):
        return _write_package(dest, manifest, files, overwrite)


def _listing(folder: Path, limit: int = 6) -> str:
    try:
        names = sorted(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in folder.iterdir())
    except OSError as exc:
        return f"its contents cannot be listed: {exc.strerror or exc}"
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" … ({len(names)} entries)" if len(names) > limit else "")


def _why_not_ours(dest: Path) -> str | None:
    """Why ``dest`` (which exists) is not an exit package edgeexit may replace; None when it is one.

    Ours means: a real folder (not a link) whose ``manifest.json`` reads as JSON and says
    ``"format": "edgeexit"``.  Hashes, files and schema are not checked, so a damaged package
    can still be replaced."""
    if dest.is_symlink():
        return f"it is a symbolic link to {os.readlink(dest)}; to replace that package, write to its own path"
    if not dest.is_dir():
        return "it is a file, not a folder"
    try:
        _, manifest = read_manifest(dest)
    except PackageError as exc:
        if (dest / MANIFEST_NAME).is_file():
            return f"{_listing(dest)}; its {MANIFEST_NAME} does not read as an edgeexit manifest ({exc})"
        return _listing(dest)
    fmt = manifest.get("format") if isinstance(manifest, Mapping) else None
    if fmt != FORMAT_NAME:
        return f"{_listing(dest)}; its {MANIFEST_NAME} is not ours: its format is {fmt!r}, not {FORMAT_NAME!r}"
    return None


def check_replaceable(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse, before any work, a destination a package writer must not replace (``OutputError``).

    Nothing at ``path``: fine.  An exit package (its manifest says ``"format": "edgeexit"``, even
    if the package is damaged): fine with ``overwrite``, else refused.  Anything else (a file, a
    link, a folder without our manifest, such as a web app with a ``manifest.json`` of its own)
    is refused even with ``overwrite``: edgeexit never deletes what it did not write.  Every
    writer of packages calls this, first before its work and again in ``write_package``.

    Example:
        >>> check_replaceable("lenet.eexit", overwrite=True)                 # doctest: +SKIP
    """
    dest = Path(path)
    if not dest.exists() and not dest.is_symlink():
        return dest
    why = _why_not_ours(dest)
    if why is not None:
        raise OutputError(f"{dest} exists and is not an exit package; refusing to replace it ({why}). edgeexit "
                          "replaces only exit packages: choose another path or remove it")
    if not overwrite:
        raise OutputError(f"{dest} already exists; pass overwrite=True (CLI: --force) to replace it")
    return dest


def _write_package(dest: Path, manifest: Mapping[str, Any], files: Mapping[str, str | os.PathLike[str]],
                   overwrite: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(dest, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{leftovers.tag()}-", dir=dest.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        table: dict[str, dict[str, Any]] = {}
        for name, src in files.items():
            check_file_name(name, tmp)
            if not Path(src).is_file():
                raise MissingFileError(f"cannot write {dest}: its file {name!r} should come from {src}, which does "
                                       "not exist (the export that made it failed or was cleaned up)")
            target = tmp / name
            shutil.copyfile(src, target)
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
            table[name] = {"sha256": sha256_file(target), "size": target.stat().st_size}
        full = dict(manifest)
        full["files"] = table
        parse_manifest(full, tmp)  # never write a manifest this module would refuse to read
        _write_bytes_synced(tmp / MANIFEST_NAME, manifest_bytes(full))
        fsync_dir(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _swap_into_place(tmp: Path, dest: Path) -> None:
    # A directory cannot be replaced by one rename.  Where the OS can exchange two paths in one
    # step (Linux renameat2), the new package and the old one swap places and the old one, now
    # at the temporary name, is deleted: there is no moment without a package at ``dest``.
    # Elsewhere the old one is moved aside first; a crash between the two renames leaves it
    # under .NAME.old-PID-*, which the next load of ``dest`` puts back (``leftovers.recover``).
    if dest.exists() and exchange_paths(tmp, dest):
        fsync_dir(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        leftovers.collect_siblings(dest)
        return
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{leftovers.tag()}-", dir=dest.parent))
        old.rmdir()
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    leftovers.collect_siblings(dest)


def set_thresholds(path: str | os.PathLike[str], thresholds: Sequence[float | None]) -> Package:
    """Write one threshold per early exit into a package's manifest (atomically); None disables that exit."""
    values = [None if t is None else float(t) for t in thresholds]

    def change(manifest: dict[str, Any]) -> None:
        early = [s for s in manifest["stages"][:-1] if s.get("exit") is not None]
        if len(early) != len(values):
            raise ManifestSchemaError(
                f"{len(values)} threshold(s) given but the package has {len(early)} early exit(s)"
            )
        for stage, t in zip(early, values):
            stage["exit"]["threshold"] = t
        if any(t is None for t in values):
            manifest["format_version"] = max(manifest["format_version"], DISABLED_EXITS_VERSION)

    return update_manifest(path, change)


def set_temperatures(path: str | os.PathLike[str], temperatures: Sequence[float | None]) -> Package:
    """Write one temperature per exit, the final exit's included, into a package's manifest (atomically).

    Each exit's logits are divided by its temperature before a policy scores them (format
    version 9); 1.0 or None leaves them as they are and removes the exit's ``temperature`` key.
    A temperature other than 1 raises ``format_version`` to 9.  A compiled graph built with
    other temperatures is stale afterwards (the runtime runs the stage loop): rebuild it with
    ``edgeexit compile PACKAGE``.

    Example:
        >>> set_temperatures("lenet.eexit", [1.7, 1.2])                 # doctest: +SKIP
    """
    values = []
    for e, t in enumerate(temperatures):
        ok = t is None or (isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and t > 0)
        if not ok:
            raise ManifestSchemaError(f"temperature {e} is {t!r}; give a positive finite number (1.0 or None: "
                                      "the exit's logits are scored as they are)")
        values.append(1.0 if t is None else float(t))

    def change(manifest: dict[str, Any]) -> None:
        exits = [s["exit"] for s in manifest["stages"] if s.get("exit") is not None]
        if len(exits) != len(values):
            raise ManifestSchemaError(
                f"{len(values)} temperature(s) given but the package has {len(exits)} exit(s); give one per exit, "
                "the final exit's included"
            )
        for spec, t in zip(exits, values):
            if t == 1.0:
                spec.pop("temperature", None)
            else:
                spec["temperature"] = t
        if any(t != 1.0 for t in values):
            manifest["format_version"] = max(manifest["format_version"], TEMPERATURE_VERSION)

    return update_manifest(path, change)


def update_manifest(path: str | os.PathLike[str], change: Callable[[dict[str, Any]], None]) -> Package:
    """Apply ``change`` to a verified package's manifest and rewrite it atomically.

    The new manifest is validated before it replaces the old one (temp file +
    ``os.replace``), so a failure leaves the previous manifest in place.
    """
    package = load_package(path)
    manifest = json.loads(json.dumps(package.manifest))
    change(manifest)
    _verify_files(package.root, parse_manifest(manifest, package.root).files, verify_hashes=True)
    write_bytes_atomically(package.root / MANIFEST_NAME, manifest_bytes(manifest))
    leftovers.collect_files(package.root)
    return load_package(package.root)


def pack_package(path: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Pack a verified package directory into one file (``NAME.eexit.zip``), written atomically.

    ``ExitSession`` and ``load_package`` take the file or its bytes, for apps that ship the
    model inside their bundle.

    Example:
        >>> pack_package("lenet.eexit", "lenet.eexit.zip")            # doctest: +SKIP
        >>> ExitSession(open("lenet.eexit.zip", "rb").read())          # doctest: +SKIP
    """
    package = load_package(path, keep_bytes=True)
    assert package.blobs is not None
    manifest = (package.root / MANIFEST_NAME).read_bytes()
    data = archive_bytes(manifest, {name: package.blobs[name] for name in package.files})
    load_package(data)   # never write an archive this module would refuse to read
    write_bytes_atomically(output, data)
    leftovers.collect_replacements(Path(output))   # what killed packs of the same file left
    return Path(output)
