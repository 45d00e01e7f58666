"""Temporary names that say who made them, so what a killed writer left behind can be collected.

Every temporary path edgeexit writes carries the writer's process id:

- ``.NAME.tmp-PID-XXXX`` (a package being built next to ``NAME``),
- ``.NAME.old-PID-XXXX`` (the previous package, moved aside while the new one goes in),
- ``.FILE.PID-XXXX.tmp`` (a file being replaced, e.g. ``manifest.json`` inside a package, or
  ``NAME.eexit.zip`` being packed),
- ``edgeexit-export-PID-XXXX`` / ``edgeexit-quantize-PID-XXXX`` / ``edgeexit-fp32-PID-XXXX`` (work
  folders in the temp dir; onnxruntime.quantization's own ``pre.quant.*`` / ``ort.quant.*`` folders
  are made inside the quantize work folder, so they go with it).

A path whose process is gone is litter: the next writer to the same place removes it, and
a reader that finds no package at ``NAME`` but an intact ``.NAME.old-*`` (a writer killed
between its two renames, where no atomic exchange was available) moves it back.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def tag() -> str:
    """The part of a temporary name that identifies this process."""
    return str(os.getpid())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True          # ours: an operation of this process may still be using it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # another user's live process
    except OSError:
        return True
    return True


def _dead_writer(name: str, pattern: str) -> bool:
    m = re.fullmatch(pattern, name)
    return m is not None and not _alive(int(m.group("pid")))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _collect(folder: Path, patterns: list[str]) -> list[str]:
    """Remove the entries of ``folder`` matching one of ``patterns`` whose writer (group ``pid``)
    is gone; returns their names."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        if any(_dead_writer(entry.name, pattern) for pattern in patterns):
            _remove(entry)
            removed.append(entry.name)
    return removed


def collect_siblings(dest: Path) -> list[str]:
    """Remove the temporary siblings of package ``dest`` left by dead writers; returns their names.

    A leftover ``.old-*`` is removed only when ``dest`` exists (else ``recover`` puts it back)."""
    name = re.escape(dest.name)
    patterns = [rf"\.{name}\.tmp-(?P<pid>\d+)-.+"] + ([rf"\.{name}\.old-(?P<pid>\d+)-.+"] if dest.exists() else [])
    return _collect(dest.parent, patterns)


def collect_files(folder: Path) -> list[str]:
    """Remove ``.FILE.PID-XXXX.tmp`` files of dead writers inside ``folder`` (a package)."""
    return _collect(folder, [r"\..+\.(?P<pid>\d+)-[^.]+\.tmp"])


def collect_replacements(path: Path) -> list[str]:
    """Remove the ``.NAME.PID-XXXX.tmp`` files of dead writers of file ``path`` (e.g. a killed pack).

    Only those of ``path``'s own name: the folder may be anyone's, and other files are not ours to judge."""
    return _collect(path.parent, [rf"\.{re.escape(path.name)}\.(?P<pid>\d+)-[^.]+\.tmp"])


def collect_work_dirs(kind: str) -> list[str]:
    """Remove ``edgeexit-KIND-PID-*`` folders of dead processes in the temp dir."""
    return _collect(Path(tempfile.gettempdir()), [rf"edgeexit-{re.escape(kind)}-(?P<pid>\d+)-.+"])


def recover(dest: Path) -> bool:
    """Put back the previous package of a writer killed between its two renames.

    Only when nothing is at ``dest`` and exactly one intact ``.NAME.old-PID-*`` of a dead
    writer holds a manifest; returns whether it did."""
    if dest.exists() or dest.is_symlink():
        return False
    pattern = rf"\.{re.escape(dest.name)}\.old-(?P<pid>\d+)-.+"
    try:
        olds = [e for e in dest.parent.iterdir() if _dead_writer(e.name, pattern) and (e / MANIFEST_NAME).is_file()]
    except OSError:
        return False
    if len(olds) != 1:
        return False
    try:
        os.rename(olds[0], dest)
    except OSError:
        return False
    return True
