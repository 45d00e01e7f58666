"""Tensors on the wire: raw bytes behind a small JSON header.  numpy only, so a device can use it.

A message is::

    4 bytes    the header's length H, unsigned little-endian
    H bytes    the header, UTF-8 JSON: {"tensors": [{"name": ..., "dtype": ..., "shape": [...]}, ...],
               "meta": {...}}   (meta: a flat object of strings, numbers, booleans and null)
    then       each tensor's bytes in header order: C order, little-endian, nothing between them

Nothing is ever unpickled: a dtype outside ``DTYPES`` is refused, and ``decode`` checks the
header's size and nesting, every name, dtype and shape, that the byte counts add up to the
body exactly, and the body's size against ``max_bytes`` before it looks at any tensor.  Every
refusal is a ``WireFormatError`` (an ``InputError``) whose message says what was wrong;
``MessageTooLargeError`` for a body over the limit.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import MessageTooLargeError, WireFormatError

# the only dtypes a message may hold (the package format's input dtypes)
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
CONTENT_TYPE = "application/x-edgeexit-tensors"
MAX_BYTES = 64 * 1024 * 1024      # default body limit: 64 MiB
MAX_HEADER_BYTES = 64 * 1024      # the JSON header
MAX_TENSORS = 64
MAX_RANK = 8
MAX_NAME = 256
_PREFIX = struct.Struct("<I")


def encode(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """One message holding ``tensors`` (in mapping order) and ``meta``."""
    specs, parts = [], []
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype = array.dtype.name
        if dtype not in DTYPES:
            raise WireFormatError(f"tensor {name!r} has dtype {dtype}, which a message cannot hold (allowed: "
                                  f"{', '.join(DTYPES)})")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        specs.append({"name": str(name), "dtype": dtype, "shape": [int(d) for d in array.shape]})
        parts.append(little.tobytes())
    header = json.dumps({"tensors": specs, "meta": dict(meta or {})}, separators=(",", ":"),
                        allow_nan=False).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise WireFormatError(f"the message header would be {len(header)} bytes, over {MAX_HEADER_BYTES}")
    return b"".join([_PREFIX.pack(len(header)), header, *parts])


def decode(body: bytes | bytearray | memoryview, *, max_bytes: int = MAX_BYTES
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, meta)`` of a message; the arrays are read-only views of ``body`` (copies where a
    view would not be aligned for its dtype)."""
    view = memoryview(body).cast("B")
    if len(view) > max_bytes:
        raise MessageTooLargeError(f"the message is {len(view)} bytes, over the limit of {max_bytes}")
    if len(view) < _PREFIX.size:
        raise WireFormatError(f"the message is {len(view)} bytes, shorter than its 4-byte header length")
    (size,) = _PREFIX.unpack_from(view, 0)
    if size > MAX_HEADER_BYTES:
        raise WireFormatError(f"the header claims {size} bytes, over the limit of {MAX_HEADER_BYTES}")
    start = _PREFIX.size + size
    if start > len(view):
        raise WireFormatError(f"the message ends inside its header ({len(view)} bytes, header needs {start})")
    try:
        header = json.loads(bytes(view[_PREFIX.size:start]).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireFormatError(f"the header is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or set(header) - {"tensors", "meta"} or not isinstance(header.get("tensors"),
                                                                                           list):
        raise WireFormatError('the header must be an object {"tensors": [...], "meta": {...}} and nothing else')
    meta = header.get("meta", {})
    if not isinstance(meta, dict) or any(isinstance(v, (dict, list)) for v in meta.values()):
        raise WireFormatError("the header's meta must be a flat object (strings, numbers, booleans, null)")
    specs = header["tensors"]
    if len(specs) > MAX_TENSORS:
        raise WireFormatError(f"the message holds {len(specs)} tensors, over the limit of {MAX_TENSORS}")
    tensors: dict[str, np.ndarray] = {}
    offset = start
    for i, spec in enumerate(specs):
        name, dtype, shape = _spec(i, spec)
        if name in tensors:
            raise WireFormatError(f"tensor {name!r} appears twice in the message")
        count = math.prod(shape)
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(view):
            raise WireFormatError(f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes, the message has "
                                  f"{len(view) - offset} left: it was cut short")
        array = np.frombuffer(view, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset)
        if dtype == "bool" and array.size and view[offset:offset + nbytes].tobytes().translate(None, b"\x00\x01"):
            raise WireFormatError(f"tensor {name!r} is bool but holds bytes other than 0 and 1")
        tensors[name] = (array if array.flags.aligned else array.copy()).reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise WireFormatError(f"the message has {len(view) - offset} bytes after its last tensor; the header and "
                              "the body do not agree")
    return tensors, meta


def _spec(i: int, spec: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise WireFormatError(f"tensor #{i} of the header must be exactly {{\"name\", \"dtype\", \"shape\"}}")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise WireFormatError(f"tensor #{i}: its name must be a string of 1 to {MAX_NAME} characters")
    if dtype not in DTYPES:
        raise WireFormatError(f"tensor {name!r}: dtype {dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            type(d) is int and 0 <= d < 2**31 for d in shape):
        raise WireFormatError(f"tensor {name!r}: shape {shape!r} must be a list of at most {MAX_RANK} integers "
                              "from 0 to 2**31 - 1")
    return name, dtype, tuple(shape)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in one object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")
