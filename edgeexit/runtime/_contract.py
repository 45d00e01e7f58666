"""The stage graphs must fit the manifest and each other, checked once when a session is built.

Names alone are not enough: a carry of another dtype or width than the next stage reads,
logits of rank 1 or 3, zero classes, string or bool logits, or a batch axis fixed to 1 would
fail at run time inside onnxruntime or numpy, or (bool logits at exit 0) silently corrupt the
logits of later exits in a batch.  ``check_stage_graphs`` compares every stage's inputs and
outputs (name, element type, rank, static dims, batch axis) with the package inputs, with the
stage that produced each carry, and the logits of every exit with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import GraphMismatchError
from ..package import Package

_LOGIT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")
_NUMPY_TYPE = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
               "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)", "int8": "tensor(int8)",
               "uint8": "tensor(uint8)", "uint16": "tensor(uint16)", "bool": "tensor(bool)"}


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _fail(stage: str, file: str, what: str) -> GraphMismatchError:
    return GraphMismatchError(f"stage {stage!r} ({file}): {what}; the manifest and the graphs do not belong "
                              "together (edited, or from different exports). Re-export the package.")


def _same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Same rank, and every dim both fix is the same (symbolic dims match anything)."""
    return len(a) == len(b) and all(_static(x) is None or _static(y) is None or x == y for x, y in zip(a, b))


def check_stage_graphs(package: Package, sessions: Sequence[Any]) -> None:
    """Raise GraphMismatchError naming the stage, tensor and mismatch, or return."""
    known: dict[str, tuple[str, list[Any], str]] = {}   # tensor -> (type, shape, who made it)
    for model_input in package.inputs:
        known[model_input.name] = (_NUMPY_TYPE.get(model_input.dtype, model_input.dtype), list(model_input.shape),
                                   "the package input")
    classes: tuple[int | None, str] | None = None
    for spec, session in zip(package.stages, sessions):
        graph_inputs = {a.name: a for a in session.get_inputs()}
        graph_outputs = {a.name: a for a in session.get_outputs()}
        wanted = list(spec.carry) + ([spec.exit.logits, *spec.exit.signals.values()] if spec.exit else [])
        missing = [o for o in wanted if o not in graph_outputs]
        if sorted(graph_inputs) != sorted(spec.inputs) or missing:
            raise _fail(spec.name, spec.file, f"the manifest declares inputs {list(spec.inputs)} and outputs "
                        f"{wanted}, the graph has inputs {sorted(graph_inputs)} and outputs {sorted(graph_outputs)}")
        for name, arg in graph_inputs.items():
            shape = list(arg.shape)
            if not shape or _static(shape[0]) is not None:
                raise _fail(spec.name, spec.file, f"input {name!r} has shape {shape}: its first axis must be a "
                            "symbolic batch axis (a batch fixed to 1 cannot run the batches the runtime sends)")
            if name in known:
                want_type, want_shape, source = known[name]
                if arg.type != want_type or not _same_shape(shape, want_shape):
                    raise _fail(spec.name, spec.file, f"input {name!r} is {arg.type} {shape}, but {source} is "
                                f"{want_type} {want_shape}")
        for name in spec.carry:
            arg = graph_outputs[name]
            shape = list(arg.shape)
            if not shape or _static(shape[0]) is not None:
                raise _fail(spec.name, spec.file, f"carry {name!r} has shape {shape}: its first axis must be the "
                            "symbolic batch axis")
            known[name] = (arg.type, shape, f"stage {spec.name!r}'s output")
        if spec.exit is not None:
            arg = graph_outputs[spec.exit.logits]
            shape = list(arg.shape)
            if arg.type not in _LOGIT_TYPES:
                raise _fail(spec.name, spec.file, f"exit logits {spec.exit.logits!r} are {arg.type}; logits must be "
                            "floating point (float, double, float16 or bfloat16)")
            if len(shape) != 2 or _static(shape[0]) is not None or shape[1] == 0:
                raise _fail(spec.name, spec.file, f"exit logits {spec.exit.logits!r} have shape {shape}; logits are "
                            "2-D (batch, classes) with a symbolic batch axis and at least one class")
            count = _static(shape[1])
            if classes is not None and count is not None and classes[0] is not None and count != classes[0]:
                raise _fail(spec.name, spec.file, f"exit logits {spec.exit.logits!r} have {count} classes, but the "
                            f"exit of {classes[1]} has {classes[0]}; every exit answers over the same classes")
            if classes is None or classes[0] is None:
                classes = (count, f"stage {spec.name!r}")
            for signal, name in spec.exit.signals.items():
                arg = graph_outputs[name]
                shape = list(arg.shape)
                if arg.type not in _LOGIT_TYPES or len(shape) != 2 or _static(shape[0]) is not None \
                        or _static(shape[1]) != 1:
                    raise _fail(spec.name, spec.file, f"exit signal {signal!r} ({name!r}) is {arg.type} {shape}; a "
                                "signal is floating point of shape (batch, 1) with a symbolic batch axis")
    if classes is not None and classes[0] is not None and package.labels and len(package.labels) != classes[0]:
        raise GraphMismatchError(f"{package.root}: the exits have {classes[0]} classes but the manifest lists "
                                 f"{len(package.labels)} labels; re-export the package")
