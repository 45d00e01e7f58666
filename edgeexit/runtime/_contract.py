"""The stage graphs must fit the manifest and each other, checked once when a session is built.

Names alone are not enough: a carry of another dtype or width than the next stage reads,
logits of rank 1 or 3, zero classes, string or bool logits, or a batch axis fixed to 1 would
fail at run time inside onnxruntime or numpy, or (bool logits at exit 0) silently corrupt the
logits of later exits in a batch.  ``check_stage_graphs`` compares every stage's inputs and
outputs (name, element type, rank, static dims, batch axis) with the package inputs, with the
stage that produced each carry, and the logits of every exit with each other.  It returns
what the runtime needs from the logits: the dtype every path returns (the widest of the exits',
so no exit's logits are rounded to another's) and the class count each exit must produce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GraphMismatchError
from ..package import InputSpec, Package, Seq2SeqSpec

_LOGIT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")
_NUMPY_TYPE = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
               "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)", "int8": "tensor(int8)",
               "uint8": "tensor(uint8)", "uint16": "tensor(uint16)", "bool": "tensor(bool)"}
# onnxruntime's Python binding has no numpy type for bfloat16: such logits fail when they run
LOGITS_DTYPE: dict[str, np.dtype[Any]] = {"tensor(float)": np.dtype(np.float32),
                                          "tensor(double)": np.dtype(np.float64),
                                          "tensor(float16)": np.dtype(np.float16)}


@dataclass(frozen=True)
class ExitLogits:
    """What the exits' logits are, as the graphs declare them.

    ``dtype``: the dtype ``run`` returns on every path: the widest of the exits' (numpy's
    ``result_type``), so a later exit's float32 logits are never rounded into exit 0's float16.
    ``classes``: the class count every exit must answer over, where a graph or the labels
    tell it (None: no graph fixes it and the manifest has no labels).
    ``unknown``: the exits whose graph leaves the class axis symbolic: their width is checked
    each time they run, against ``classes``.
    """

    dtypes: tuple[np.dtype[Any], ...]
    dtype: np.dtype[Any]
    classes: int | None
    unknown: tuple[int, ...]


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _fail(stage: str, file: str, what: str) -> GraphMismatchError:
    return GraphMismatchError(f"stage {stage!r} ({file}): {what}; the manifest and the graphs do not belong "
                              "together (edited, or from different exports). Re-export the package.")


def _same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Same rank, and every dim both fix is the same (symbolic dims match anything)."""
    return len(a) == len(b) and all(_static(x) is None or _static(y) is None or x == y for x, y in zip(a, b))


def check_stage_graphs(package: Package, sessions: Sequence[Any]) -> ExitLogits:
    """Raise GraphMismatchError naming the stage, tensor and mismatch, or say what the logits are."""
    known: dict[str, tuple[str, list[Any], str]] = {}   # tensor -> (type, shape, who made it)
    for model_input in package.inputs:
        known[model_input.name] = (_NUMPY_TYPE.get(model_input.dtype, model_input.dtype), list(model_input.shape),
                                   "the package input")
    classes: tuple[int | None, str] | None = None
    dtypes: list[np.dtype[Any]] = []
    unknown: list[int] = []
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
            if count is None:
                unknown.append(len(dtypes))
            dtypes.append(LOGITS_DTYPE.get(arg.type, np.dtype(np.float32)))
            for signal, name in spec.exit.signals.items():
                arg = graph_outputs[name]
                shape = list(arg.shape)
                if arg.type not in _LOGIT_TYPES or len(shape) != 2 or _static(shape[0]) is not None \
                        or _static(shape[1]) != 1:
                    raise _fail(spec.name, spec.file, f"exit signal {signal!r} ({name!r}) is {arg.type} {shape}; a "
                                "signal is floating point of shape (batch, 1) with a symbolic batch axis")
    count = classes[0] if classes is not None else None
    if count is not None and package.labels and len(package.labels) != count:
        raise GraphMismatchError(f"{package.root}: the exits have {count} classes but the manifest lists "
                                 f"{len(package.labels)} labels; re-export the package")
    if count is None and package.labels:
        count = len(package.labels)
    return ExitLogits(tuple(dtypes), np.result_type(*dtypes) if dtypes else np.dtype(np.float32), count,
                      tuple(unknown))


def check_full_model(package: Package, session: Any, exits: ExitLogits) -> None:
    """``full.onnx`` answers for the package when every exit is disabled: its logits must be what the
    exits' are (floating point, (batch, classes), the same class count), or GraphMismatchError."""
    full = package.full_model
    assert full is not None
    outputs = {a.name: a for a in session.get_outputs()}
    inputs = sorted(a.name for a in session.get_inputs())
    if full.logits not in outputs or inputs != sorted(full.inputs):
        raise GraphMismatchError(
            f"the full model {full.file} has inputs {inputs} and outputs {sorted(outputs)}, but the manifest says "
            f"inputs {list(full.inputs)} and logits {full.logits!r}; re-export the package")
    arg = outputs[full.logits]
    shape = list(arg.shape)
    count = _static(shape[1]) if len(shape) == 2 else None
    if arg.type not in LOGITS_DTYPE or len(shape) != 2 or _static(shape[0]) is not None or shape[1] == 0 or (
            count is not None and exits.classes is not None and count != exits.classes):
        raise GraphMismatchError(
            f"the full model {full.file} answers {arg.type} {shape}, but the exits answer {exits.dtype} (batch, "
            f"{exits.classes if exits.classes is not None else 'classes'}); the manifest and full.onnx do not belong "
            "together. Re-export the package.")


# --- seq2seq packages -------------------------------------------------------------------------------

_F, _I64, _F64 = "tensor(float)", "tensor(int64)", "tensor(double)"
_Arg = tuple[str, list[Any]]   # (element type, dims: an int where the manifest fixes it, None where free)


def check_seq2seq_graphs(s: Seq2SeqSpec, inputs: Sequence[InputSpec], first: Mapping[str, Any], encoder: Sequence[Any],
                         decoder: Sequence[Any], decoder_kv: Sequence[Any], encoder_exits: Mapping[str, Any],
                         decoder_steps: Mapping[str, Any]) -> None:
    """The seq2seq graphs the runtime built fit the manifest (FORMAT.md 3.5), else GraphMismatchError.

    Input names, output names in order (the generation loop unpacks them by position), element
    types, ranks, and every dim the manifest fixes where the graph fixes it too: the hidden
    width, the vocabulary (the head's logits), the cache's heads and head_dim, the modalities'
    token counts.  A manifest whose vocabulary or width is off by one would otherwise fail in
    the middle of ``generate``.  ``inputs``: the package's, or none (then the modality inputs'
    names alone are checked).
    """
    width, heads, head_dim, vocab = s.width, s.heads, s.head_dim, len(s.vocab)
    manifest = f"width {width}, heads {heads}, head_dim {head_dim}, a vocabulary of {vocab}"
    hidden: _Arg = (_F, [None, None, width])
    cache: _Arg = (_F, [None, heads, None, head_dim])
    bias: _Arg = (_F, [None, 1, 1, None])
    ids: _Arg = (_I64, [None, 1])
    model = {i.name: (_NUMPY_TYPE.get(i.dtype, i.dtype), [d if isinstance(d, int) else None for d in i.shape])
             for i in inputs}
    model.update({m["input"]: ("", []) for m in s.modalities if m["input"] not in model})   # "": not checked
    step_in = {"past_key": cache, "past_value": cache, "self_bias": bias, "memory": hidden, "memory_bias": bias}
    step_out = [("key", cache), ("value", cache), ("logits", (_F, [None, None, vocab]))]
    graphs: list[tuple[str, str, Any, dict[str, _Arg], list[tuple[str, _Arg]]]] = []
    for m in s.modalities:
        own: _Arg = (_F, [None, m.get("tokens") if isinstance(m.get("tokens"), int) else None, width])
        graphs.append((f"encoder layer 0 ({m['name']})", m["first"], first[m["name"]],
                       {m["input"]: model[m["input"]], "bias": bias},
                       [("hidden", own), ("hidden_out", own), ("memory", own)]))
    for k, (file, session) in enumerate(zip(s.encoder, encoder)):
        graphs.append((f"encoder layer {k}", file, session, {"hidden": hidden, "bias": bias},
                       [("hidden_out", hidden), ("memory", hidden)]))
    for k, (files, step, kv) in enumerate(zip(s.decoder, decoder, decoder_kv)):
        if k == 0:
            graphs.append(("decoder layer 0", files["step"], step, {"token": ids, "position": ids, **step_in},
                           [("hidden", hidden), ("hidden_out", hidden), *step_out]))
        else:
            graphs.append((f"decoder layer {k}", files["step"], step, {"hidden": hidden, **step_in},
                           [("hidden_out", hidden), *step_out]))
        graphs.append((f"decoder layer {k} key/value", files["kv"], kv, {"hidden": hidden},
                       [("key", cache), ("value", cache)]))
    tokens = [t for m in s.modalities for t in (m.get("tokens"),) if isinstance(t, int)]
    joined = sum(tokens) if len(tokens) == len(s.modalities) else None
    for mode, session in encoder_exits.items():
        fed = 1 if mode == "joint" else len(s.modalities)
        graphs.append((f"the encoder with in-graph exits ({mode})", (s.encoder_exits or {})[mode], session,
                       {**{m["input"]: model[m["input"]] for m in s.modalities}, "thresholds": (_F64, [fed])},
                       [("memory", (_F, [None, joined, width])),
                        *((f"{m['name']}_layers", (_I64, [None])) for m in s.modalities)]))
    layers = range(len(s.decoder))
    for mode, session in decoder_steps.items():
        graphs.append((f"the decoder step with in-graph exits (kv={mode})", (s.decoder_steps or {})[mode], session,
                       {"token": ids, "position": ids, "memory": hidden, "memory_bias": bias,
                        "threshold": (_F64, [1]), **{f"past_{w}_{k}": cache for k in layers for w in ("key", "value")}},
                       [("logits", (_F, [None, None, vocab])), ("exit", (_I64, [None])),
                        *((f"present_{w}_{k}", cache) for k in layers for w in ("key", "value"))]))
    for what, file, session, feeds, reads in graphs:
        _check_seq2seq_graph(what, file, session, feeds, reads, manifest)


def _check_seq2seq_graph(what: str, file: str, session: Any, inputs: dict[str, _Arg],
                         outputs: list[tuple[str, _Arg]], manifest: str) -> None:
    def fail(detail: str) -> GraphMismatchError:
        return GraphMismatchError(f"{what} ({file}): {detail}; the manifest and the graphs do not belong together "
                                  "(edited, or from different exports). Re-export the package.")

    graph_in = {a.name: a for a in session.get_inputs()}
    graph_out = list(session.get_outputs())
    if sorted(graph_in) != sorted(inputs) or [a.name for a in graph_out] != [name for name, _ in outputs]:
        raise fail(f"the graph has inputs {sorted(graph_in)} and outputs {[a.name for a in graph_out]}, the "
                   f"runtime feeds {sorted(inputs)} and reads {[name for name, _ in outputs]} in this order")
    for kind, args, wanted in (("input", [graph_in[n] for n in inputs], list(inputs.values())),
                               ("output", graph_out, [arg for _, arg in outputs])):
        for arg, (want_type, dims) in zip(args, wanted):
            shape = list(arg.shape)
            if not want_type:
                continue
            if arg.type != want_type or len(shape) != len(dims) or any(
                    d is not None and _static(g) is not None and g != d for g, d in zip(shape, dims)):
                want = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
                raise fail(f"{kind} {arg.name!r} is {arg.type} {shape}, but the manifest's {manifest} make it "
                           f"{want_type} {want}")
