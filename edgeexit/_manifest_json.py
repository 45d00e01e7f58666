"""Decoding ``manifest.json`` with bounds: a hostile manifest gets a ``ManifestParseError``.

Python's ``json`` alone lets a manifest exhaust the interpreter: 100,000 nested brackets
raise ``RecursionError``, a 100,000-digit number ``ValueError``, ``1e400`` becomes ``inf``,
``NaN`` loads but cannot be written back, and a duplicated key silently takes the last
value.  Here each of those is refused, naming what and where.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ManifestParseError

MAX_MANIFEST_BYTES = 16 << 20   # a real manifest is a few KB; its calibration history grows slowly
MAX_DEPTH = 32                  # a real manifest nests 6 deep
MAX_NUMBER_CHARS = 40           # a float64 in full needs 24 characters, an int64 20


class _Refused(Exception):
    pass


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"an integer of {len(text)} digits (at most {MAX_NUMBER_CHARS})")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number written with {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text} (beyond float64: it would load as {value})")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} (not JSON: NaN and Infinity cannot be written back)")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} twice in one object (which one holds is ambiguous)")
        out[key] = value
    return out


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings, found without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def decode_manifest(data: bytes, where: str) -> Any:
    """The JSON value in ``data`` (a manifest's bytes), or ``ManifestParseError`` saying why not."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestParseError(
            f"{where} is {len(data):,} bytes, over the {MAX_MANIFEST_BYTES:,} a manifest may have; it is not an "
            "edgeexit manifest (or its calibration history needs pruning: re-export the package)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestParseError(f"{where} is not UTF-8 text ({exc}); the file is corrupted. Re-export the "
                                 "package.") from None
    deepest = _depth(text)
    if deepest > MAX_DEPTH:
        raise ManifestParseError(
            f"{where} nests {deepest} levels deep, over the {MAX_DEPTH} allowed; it is not an edgeexit manifest")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except _Refused as exc:
        raise ManifestParseError(f"{where} holds {exc}; the manifest was damaged or tampered with. Re-export the "
                                 "package.") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ManifestParseError(f"{where} is not valid JSON ({exc}); the file is corrupted. Re-export the "
                                 "package.") from None
