"""Find tensors stored outside an ONNX file, without the onnx package (the runtime has none).

An ONNX tensor may keep its bytes in another file (``data_location = EXTERNAL`` with a
``location``).  onnxruntime then reads that file, relative to the model's folder or, for a
model given as bytes, to the current directory: weights no hash covers, or any file the
process can read fed in as a tensor.  A package's graphs must hold every byte themselves, so
this scanner walks the protobuf wire format along every field that can hold a tensor (graph
initializers and sparse initializers, node attributes, subgraphs of If/Loop/Scan at any depth,
local functions' nodes and attribute defaults, training-info graphs) and reports every
external reference.
"""

from __future__ import annotations

# (message kind, field number) -> kind of the embedded message, for every field of onnx.proto that can
# lead to a tensor: ModelProto.graph (7), .training_info (20), .functions (25); TrainingInfoProto's
# initialization (1) and algorithm (2) graphs; GraphProto.node (1), .initializer (5),
# .sparse_initializer (15); FunctionProto.node (7) and .attribute_proto (11, attribute defaults);
# NodeProto.attribute (5); AttributeProto.t (5), .g (6), .tensors (10), .graphs (11),
# .sparse_tensor (22), .sparse_tensors (23); SparseTensorProto.values (1), .indices (2).
_CHILDREN = {
    ("model", 7): "graph", ("model", 20): "training", ("model", 25): "function",
    ("training", 1): "graph", ("training", 2): "graph",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("function", 7): "node", ("function", 11): "attribute",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor", ("attribute", 11): "graph",
    ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
MAX_NESTING = 64


class ScanError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ScanError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, value or (start, end) of a length-delimited field)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ScanError("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise ScanError(f"unsupported wire type {wire}")
        if pos > end:
            raise ScanError("a field runs past the end of its message")


def external_locations(data: bytes) -> list[str]:
    """The ``location`` of every tensor in the model stored outside it ('?' when unnamed)."""
    found: list[str] = []
    stack = [("model", 0, len(data), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ScanError(f"messages nest deeper than {MAX_NESTING}")
        external, location = False, None
        for number, wire, value in _fields(data, start, end):
            if kind == "tensor" and number == _TENSOR_DATA_LOCATION and wire == 0:
                external = external or value == 1
            elif kind == "tensor" and number == _TENSOR_EXTERNAL_DATA and wire == 2:
                external = True
                key = val = None
                for n, w, v in _fields(data, value[0], value[1]):
                    if w == 2 and n in (1, 2):
                        text = data[v[0]:v[1]].decode("utf-8", "replace")
                        key, val = (text, val) if n == 1 else (key, text)
                if key == "location":
                    location = val
            elif wire == 2 and (kind, number) in _CHILDREN:
                stack.append((_CHILDREN[(kind, number)], value[0], value[1], depth + 1))
        if external:
            found.append(location or "?")
    return found
