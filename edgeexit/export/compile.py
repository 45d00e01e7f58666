"""Compiled exits: the whole early-exit model as one ONNX graph that decides its exits in-graph.

The stage graphs of a package are spliced into one graph, each prefixed so names stay
unique.  After each early exit the policy score is computed with ONNX ops in float64
(as ``edgeexit.policies`` does in numpy, on the logits divided by the exit's temperature
where it is not 1), the rows that did not pass are gathered, and an ``If`` runs the rest
of the model on those rows only; their results are scattered back in input order::

    inputs, thresholds -> segment 0 -> logits0 -> score0 -> pass0 ?
        If(any row left): gather the rows left -> segment 1 -> ... -> ScatterND back
        else:             logits0, exit 0, score0

A *segment* is the run of stages up to and including the next stage with an exit.  Each
segment's nodes and weights live inside the branch that runs it (weights read from an
outer scope make onnxruntime much slower there).  At batch 1 the same graph is a chain
of ``If`` nodes: one ``session.run`` with no Python between stages.

Graph inputs: the package's inputs plus ``thresholds`` (float64, one per early exit): a
plain required input, so calibration never rewrites the graph.  Outputs: ``logits``
(batch, classes), ``exit_index`` (int64, batch), ``score`` (float64, batch).  A NaN score
compares false, so it never exits, as in the runtime.

This module needs onnx and onnxruntime, never torch.

Why one file of ~670 lines: splicing the stages, scoring in-graph and nesting the ``If``
branches are one recursive build (``_Compiler.emit``) over one naming state; the checks
against the stage loop belong with it.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import _leftovers as leftovers
from .._atomic import write_bytes_atomically
from ..errors import CompileError
from ..package import (
    COMPILED_OUTPUTS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Package,
    load_package,
    sha256_file,
    update_manifest,
)
from ..policies import always_threshold, get_policy, never_threshold

COMPILED_FILE = "compiled.onnx"
# a recompile writes the other name, so the manifest switches files in one atomic replace
COMPILED_FILE_NEXT = "compiled-next.onnx"
THRESHOLDS_INPUT = "thresholds"
IN_GRAPH_POLICIES = ("confidence", "entropy", "margin", "gate")
MIN_OPSET = 13   # Softmax over one axis, ReduceSum with axes as an input
_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE,
          "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int8": TensorProto.INT8,
          "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}
_FLOAT_LOGITS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# Multiplying p = 0 by this stays 0 where log p is -inf (a -inf logit); numpy's policy
# skips such terms the same way.
_LOWEST = float(np.finfo(np.float64).min)


@dataclass(frozen=True)
class GraphNames:
    """The compiled graph's own input and output names (model inputs keep theirs)."""

    thresholds: str
    outputs: tuple[str, str, str]   # logits, exit_index, score


def graph_names(package: Package) -> GraphNames:
    """``thresholds``, ``logits``, ``exit_index``, ``score``, or ``edgeexit_…`` where a model
    input already has the name."""
    taken = {i.name for i in package.inputs}

    def free(name: str) -> str:
        candidate, k = name, 1
        while candidate in taken:
            candidate = f"edgeexit_{name}" + (f"_{k}" if k > 1 else "")
            k += 1
        taken.add(candidate)
        return candidate

    thresholds = free(THRESHOLDS_INPUT)
    logits, exit_index, score = (free(n) for n in COMPILED_OUTPUTS)
    return GraphNames(thresholds, (logits, exit_index, score))


def compile_blocker(package: Package) -> str | None:
    """Why ``package`` cannot be compiled with its current policies, or None when it can."""
    if len(package.exit_stages) < 2:
        return "it has no early exit (run full.onnx or the last stage instead)"
    out_of_graph = sorted({p for p in package.policies if p not in IN_GRAPH_POLICIES})
    if out_of_graph:
        return (f"policy {', '.join(out_of_graph)} has no in-graph form (compiled policies: "
                f"{', '.join(IN_GRAPH_POLICIES)}); the stage loop runs it")
    return None


# --- names and nodes ---------------------------------------------------------------


class _Names:
    """Unique value names across the whole compiled model (ONNX forbids shadowing in subgraphs)."""

    def __init__(self, taken: Sequence[str]) -> None:
        self._taken = set(taken)
        self._count = 0

    def new(self, hint: str) -> str:
        self._count += 1
        name = f"ee/{hint}_{self._count}"
        while name in self._taken:
            self._count += 1
            name = f"ee/{hint}_{self._count}"
        self._taken.add(name)
        return name

    def claim(self, names: Sequence[str]) -> None:
        clash = self._taken.intersection(names)
        if clash:
            raise CompileError(f"value names {sorted(clash)[:5]} occur twice while splicing the stage graphs")
        self._taken.update(names)


@dataclass
class _Scope:
    """One graph body (the main graph or an ``If`` branch) being filled."""

    names: _Names
    opset: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, outputs: int = 1,
           **attrs: Any) -> list[str]:
        outs = [self.names.new(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def one(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        return self.op(op_type, inputs, hint, **attrs)[0]

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.names.new(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def reduce(self, op_type: str, x: str, hint: str, axis: int = 1) -> str:
        """Reduce over ``axis``, dropping it (axes as attribute or input, by opset)."""
        takes_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if takes_input:
            return self.one(op_type, [x, self.const(np.array([axis], np.int64), f"axis{axis}")], hint, keepdims=0)
        return self.one(op_type, [x], hint, axes=[axis], keepdims=0)

    def graph(self, name: str, outputs: Sequence[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, [], list(outputs), initializer=self.initializers,
                                 value_info=self.value_info)


# --- splicing stage graphs -------------------------------------------------------


def _rename_graph(graph: onnx.GraphProto, rename: Callable[[str], str]) -> None:
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        vi.name = rename(vi.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = rename(sparse.values.name)
        sparse.indices.name = rename(sparse.indices.name)
    for node in graph.node:
        _rename_node(node, rename)


def _rename_node(node: onnx.NodeProto, rename: Callable[[str], str]) -> None:
    node.input[:] = [rename(n) if n else n for n in node.input]
    node.output[:] = [rename(n) if n else n for n in node.output]
    if node.name:
        node.name = rename(node.name)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            _rename_graph(attr.g, rename)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _rename_graph(g, rename)


def _splice(scope: _Scope, model: onnx.ModelProto, prefix: str, feeds: Mapping[str, str]) -> dict[str, str]:
    """Add a stage graph's nodes and weights to ``scope``, reading ``feeds`` for its inputs.

    Returns the scope name of each of the stage graph's outputs.
    """
    graph = copy.deepcopy(model.graph)
    # an initializer may also be listed as a graph input (an overridable default): it is a weight
    inputs = {vi.name for vi in graph.input} - {i.name for i in graph.initializer}

    def rename(name: str) -> str:
        return feeds[name] if name in inputs else prefix + name

    defined = [prefix + i.name for i in graph.initializer] + [
        prefix + o for n in graph.node for o in n.output if o]
    scope.names.claim(defined)
    outputs = [o.name for o in graph.output]
    _rename_graph(graph, rename)
    scope.nodes.extend(graph.node)
    scope.initializers.extend(graph.initializer)
    scope.value_info.extend(vi for vi in graph.value_info)
    if graph.sparse_initializer:
        raise CompileError(f"stage graph {prefix.rstrip('/')} has sparse initializers, which the compiler "
                           "does not splice; export it with dense weights")
    return {o: rename(o) for o in outputs}


# --- policy scores and decisions ----------------------------------------------------


def _score(scope: _Scope, logits: str, policy: str, classes: int | None, temperature: float = 1.0) -> str:
    """float64 score per row, as ``edgeexit.policies`` computes it; ``logits`` is what the policy
    reads (the gate policy: the exit's (batch, 1) gate signal).  Logits are divided by the exit's
    ``temperature`` in float64 first, as the runtime divides them (format version 9)."""
    z = scope.one("Cast", [logits], "z64", to=TensorProto.DOUBLE)
    if policy == "gate":
        return scope.one("Reshape", [z, scope.const(np.array([-1], np.int64), "flat")], "gate")
    if temperature != 1.0:
        z = scope.one("Div", [z, scope.const(np.array(temperature, np.float64), "temperature")], "z_scaled")
    p = scope.one("Softmax", [z], "p", axis=1)
    if policy == "confidence":
        return scope.reduce("ReduceMax", p, "confidence")
    if policy == "entropy":
        log_p = scope.one("LogSoftmax", [z], "log_p", axis=1)
        safe = scope.one("Max", [log_p, scope.const(np.array(_LOWEST), "lowest")], "log_p_safe")
        plogp = scope.one("Mul", [p, safe], "plogp")
        return scope.one("Neg", [scope.reduce("ReduceSum", plogp, "neg_entropy")], "entropy")
    if policy == "margin":
        if classes is not None and classes < 2:
            raise CompileError("policy 'margin' needs at least 2 classes; the logits have 1")
        top = scope.op("TopK", [p, scope.const(np.array([2], np.int64), "k2")], "top2", outputs=2, axis=1)[0]
        diff = scope.one("Mul", [top, scope.const(np.array([1.0, -1.0]), "plus_minus")], "top2_signed")
        return scope.reduce("ReduceSum", diff, "margin")
    raise CompileError(f"policy {policy!r} has no in-graph form; compiled policies: {', '.join(IN_GRAPH_POLICIES)}")


def _split_thresholds(scope: _Scope, thresholds: str, count: int) -> list[str]:
    """One shape-[1] tensor per early exit, split off the thresholds input once."""
    if count == 1:
        return [thresholds]
    attrs = {"num_outputs": count} if scope.opset >= 18 else {}
    return scope.op("Split", [thresholds], "threshold", outputs=count, axis=0, **attrs)


def _passes(scope: _Scope, score: str, policy: str, threshold: str, exit_number: int) -> str:
    """Boolean per row: the score passes this exit's threshold (a NaN score never does)."""
    op = "GreaterOrEqual" if get_policy(policy).direction == "higher" else "Less"
    return scope.one(op, [score, threshold], f"pass{exit_number}")


# --- the graph -------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    stages: tuple[int, ...]   # stage indices, the last one with the exit
    exit_number: int
    keep_after: tuple[str, ...]   # tensors (model names) a later segment still reads


def _segments(package: Package) -> list[_Segment]:
    segments, current = [], []
    exit_stages = package.exit_stages
    available = {i.name for i in package.inputs}
    for k, spec in enumerate(package.stages):
        current.append(k)
        available.update(spec.carry)
        if spec.exit is not None:
            later = set().union(*(s.inputs for s in package.stages[k + 1:]))
            segments.append(_Segment(tuple(current), exit_stages.index(k), tuple(sorted(later & available))))
            current = []
    return segments


@dataclass
class _Compiler:
    package: Package
    models: list[onnx.ModelProto]
    names: _Names
    opset: int
    logits_type: int
    classes: int | None
    thresholds: list[str] = field(default_factory=list)   # one value name per early exit

    def emit(self, scope: _Scope, segments: list[_Segment], tensors: dict[str, str],
             public: Sequence[str] | None = None, need_exit: bool = True) -> tuple[str, str, str]:
        """Nodes that run ``segments`` on the rows in ``tensors``; returns (logits, exit_index, score).

        ``public``: names for the three results (the graph outputs, at the top level).
        ``need_exit``: False when the caller knows the exit (the last segment's rows all
        leave at the final exit); the exit index comes back as "".
        Every node on the path of a sample that leaves at the first exit costs about half
        a microsecond at batch 1, so that path is kept short.
        """
        seg, rest = segments[0], segments[1:]
        tensors = dict(tensors)
        logits = scored = policy = ""
        temperature = 1.0
        for k in seg.stages:
            spec = self.package.stages[k]
            outs = _splice(scope, self.models[k], f"s{k}/", {n: tensors[n] for n in spec.inputs})
            tensors.update({c: outs[c] for c in spec.carry})
            if spec.exit is not None:
                logits = outs[spec.exit.logits]
                policy = spec.exit.policy
                scored = outs[spec.exit.output(get_policy(policy).reads) or ""]   # the manifest has it (load checks)
                temperature = spec.exit.temperature
        # from the exit's own outputs (and temperature), as the stage loop
        score = _score(scope, scored, policy, self.classes, temperature)
        if self._elem_type(seg.stages[-1]) != self.logits_type:  # returned in the widest exit dtype, as the stage loop
            logits = scope.one("Cast", [logits], f"logits{seg.exit_number}_cast", to=self.logits_type)
        if not rest and not need_exit:
            return logits, "", score
        if not rest:
            shape = scope.one("Shape", [score], "rows")
            exit_index = scope.one("ConstantOfShape", [shape], f"exit{seg.exit_number}",
                                   value=numpy_helper.from_array(np.array([seg.exit_number], np.int64)))
            if public:
                scope.nodes.extend(helper.make_node("Identity", [v], [p], name=f"ee/output_{p}")
                                   for v, p in zip((logits, exit_index, score), public))
                return public[0], public[1], public[2]
            return logits, exit_index, score

        threshold = self.thresholds[seg.exit_number]
        left = scope.one("Not", [_passes(scope, score, policy, threshold, seg.exit_number)], "left")
        rows = scope.one("NonZero", [left], "rows_left")                      # (1, m)
        any_left = scope.one("Cast", [scope.one("Size", [rows], "count_left")], "any_left", to=TensorProto.BOOL)

        def exits_here(body: _Scope) -> str:
            """This exit's number for every row (rows that go on are overwritten by the scatter)."""
            if seg.exit_number == 0:    # one node: 0 where a row passed
                return body.one("Cast", [left], "exit0", to=TensorProto.INT64)
            return body.one("ConstantOfShape", [body.one("Shape", [score], "rows")], f"exit{seg.exit_number}",
                            value=numpy_helper.from_array(np.array([seg.exit_number], np.int64)))

        branch = _Scope(self.names, self.opset)
        flat = branch.one("Reshape", [rows, branch.const(np.array([-1], np.int64), "flat")], "rows_flat")
        column = branch.one("Transpose", [rows], "rows_column", perm=[1, 0])   # (m, 1) for ScatterND
        kept = {n: branch.one("Gather", [tensors[n], flat], "kept", axis=0) for n in seg.keep_after}
        final_next = len(rest) == 1    # every row left here leaves at the final exit, number j + 1
        sub_logits, sub_exit, sub_score = self.emit(branch, rest, kept, need_exit=not final_next)
        merged = [branch.one("ScatterND", [full, column, part], f"merged_{what}")
                  for what, full, part in (("logits", logits, sub_logits), ("score", score, sub_score))]
        if final_next:                 # j where a row passed, j + 1 where it went on: no scatter
            went_on = branch.one("Cast", [left], "went_on", to=TensorProto.INT64)
            merged_exit = went_on if seg.exit_number == 0 else branch.one(
                "Add", [went_on, branch.const(np.array(seg.exit_number, np.int64), "exit_base")], "merged_exit")
        else:
            merged_exit = branch.one("ScatterND", [exits_here(branch), column, sub_exit], "merged_exit")
        merged.insert(1, merged_exit)
        done = _Scope(self.names, self.opset)
        kept_as_is = [done.one("Identity", [logits], "exited_all"), exits_here(done),
                      done.one("Identity", [score], "exited_all")]
        results = list(public) if public else [self.names.new(f"after_exit{seg.exit_number}") for _ in range(3)]
        scope.nodes.append(helper.make_node(
            "If", [any_left], results, name=self.names.new(f"if_rows_left_after_exit{seg.exit_number}"),
            then_branch=branch.graph(f"rows_left_after_exit{seg.exit_number}", self._infos(merged)),
            else_branch=done.graph(f"none_left_after_exit{seg.exit_number}", self._infos(kept_as_is))))
        return results[0], results[1], results[2]

    def _elem_type(self, k: int) -> int:
        spec = self.package.stages[k]
        assert spec.exit is not None
        for out in self.models[k].graph.output:
            if out.name == spec.exit.logits:
                return int(out.type.tensor_type.elem_type)
        raise CompileError(f"stage {spec.name!r} has no output {spec.exit.logits!r}")

    def _infos(self, names: Sequence[str]) -> list[onnx.ValueInfoProto]:
        types = (self.logits_type, TensorProto.INT64, TensorProto.DOUBLE)
        return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]


def _opsets(models: Sequence[onnx.ModelProto]) -> tuple[list[onnx.OperatorSetIdProto], int]:
    versions: dict[str, set[int]] = {}
    for m in models:
        for imp in m.opset_import:
            versions.setdefault(imp.domain if imp.domain != "ai.onnx" else "", set()).add(imp.version)
    default = versions.get("", set())
    if len(default) > 1:
        raise CompileError(f"the stage graphs use different ONNX opsets {sorted(default)}; re-export them with one")
    opset = max(default, default=MIN_OPSET)
    if opset < MIN_OPSET:
        raise CompileError(f"the stage graphs use opset {opset}; compiling needs opset >= {MIN_OPSET}. Re-export.")
    imports = [helper.make_opsetid(d, max(v)) for d, v in sorted(versions.items())]
    if "" not in versions:
        imports.insert(0, helper.make_opsetid("", opset))
    return imports, opset


_TensorKey = tuple[int, tuple[int, ...], bytes]


def _tensor_key(tensor: onnx.TensorProto) -> _TensorKey | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return None
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest()


def _share_in_branches(graph_nodes: Iterable[onnx.NodeProto], visible: Mapping[_TensorKey, str]) -> None:
    """Inside every If/Loop body: a weight equal to one an enclosing graph holds is dropped, and the
    body's nodes (nested bodies too) read the enclosing one, unless the body defines that name itself."""
    for node in graph_nodes:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                local = {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
                rename: dict[str, str] = {}
                keep, inner = [], dict(visible)
                for tensor in sub.initializer:
                    key = _tensor_key(tensor)
                    if key is not None and key in visible and visible[key] not in local:
                        rename[tensor.name] = visible[key]
                    else:
                        keep.append(tensor)
                        if key is not None:
                            inner.setdefault(key, tensor.name)
                del sub.initializer[:]
                sub.initializer.extend(keep)
                if rename:
                    _rename_inputs(sub.node, rename)
                _share_in_branches(sub.node, inner)


def _rename_inputs(graph_nodes: Iterable[onnx.NodeProto], rename: Mapping[str, str]) -> None:
    for node in graph_nodes:
        node.input[:] = [rename.get(n, n) for n in node.input]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(sub.node, rename)


def _share_identical_initializers(initializers: Sequence[onnx.TensorProto], nodes: Sequence[onnx.NodeProto]
                                  ) -> list[onnx.TensorProto]:
    """One copy of each distinct weight.  Stages of a model that shares weights across layers (ALBERT)
    each hold their own copy, and the compiled graph holds every stage, the later ones inside If
    branches (which read names of the graphs around them): a weight equal to one kept already is
    dropped and its readers renamed."""
    kept: dict[_TensorKey, str] = {}
    rename: dict[str, str] = {}
    out = []
    for tensor in initializers:
        key = _tensor_key(tensor)
        if key is not None and key in kept:
            rename[tensor.name] = kept[key]
            continue
        if key is not None:
            kept[key] = tensor.name
        out.append(tensor)
    if rename:
        _rename_inputs(nodes, rename)
    _share_in_branches(nodes, kept)
    return out


def build_compiled_model(package: Package) -> onnx.ModelProto:
    """The compiled graph of ``package`` (checked with ``onnx.checker``, full check).

    Raises:
        CompileError: a policy without an in-graph form, no early exit, mixed opsets, or
            logits that are not a float (batch, classes) tensor.
    """
    blocker = compile_blocker(package)
    if blocker:
        raise CompileError(f"{package.root} cannot be compiled: {blocker}")
    models = [onnx.load(str(package.file_path(s.file))) for s in package.stages]
    imports, opset = _opsets(models)
    first = package.stages[package.exit_stages[0]]
    assert first.exit is not None
    logits_info = next((o for o in models[package.exit_stages[0]].graph.output if o.name == first.exit.logits), None)
    if logits_info is None:
        raise CompileError(f"stage {first.name!r} has no output {first.exit.logits!r}")
    ttype = logits_info.type.tensor_type
    dims = ttype.shape.dim
    if ttype.elem_type not in _FLOAT_LOGITS or len(dims) != 2:
        raise CompileError(f"exit logits {first.exit.logits!r} must be a float tensor (batch, classes) to compile")
    classes = dims[1].dim_value if dims[1].HasField("dim_value") else None
    widest = _widest_logits_type(package, models)   # returned in the widest exit dtype, as the stage loop

    io = graph_names(package)
    inputs = [helper.make_tensor_value_info(i.name, _DTYPE[i.dtype], list(i.shape)) for i in package.inputs]
    num_early = len(package.exit_stages) - 1
    inputs.append(helper.make_tensor_value_info(io.thresholds, TensorProto.DOUBLE, [num_early]))
    names = _Names([i.name for i in inputs])
    main = _Scope(names, opset)
    compiler = _Compiler(package, models, names, opset, widest, classes,
                         _split_thresholds(main, io.thresholds, num_early))
    names.claim(io.outputs)
    compiler.emit(main, _segments(package), {i.name: i.name for i in package.inputs}, public=io.outputs)
    shapes = (["batch", classes if classes else "classes"], ["batch"], ["batch"])
    types = (widest, TensorProto.INT64, TensorProto.DOUBLE)
    outputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(io.outputs, types, shapes)]
    initializers = _share_identical_initializers(main.initializers, main.nodes)
    graph = helper.make_graph(main.nodes, f"{package.name}_compiled", inputs, outputs,
                              initializer=initializers, value_info=main.value_info)
    functions = _functions(models)
    model = helper.make_model(graph, opset_imports=imports, functions=functions,
                              producer_name="edgeexit", doc_string=(
                                  "Early-exit model compiled by edgeexit: feed the inputs and thresholds "
                                  "(float64, one per early exit); outputs logits, exit_index, score."))
    model.ir_version = max(m.ir_version for m in models)
    onnx.helper.set_model_props(model, {
        "edgeexit.kind": "compiled exits", "edgeexit.model": package.name,
        "edgeexit.policies": ",".join(package.policies), "edgeexit.exits": str(len(package.exit_stages)),
        "edgeexit.thresholds": f"input {io.thresholds} (float64, {num_early}: one per early exit)",
        **({"edgeexit.temperatures": ",".join(repr(t) for t in package.temperatures)}
           if any(t != 1.0 for t in package.temperatures) else {}),
    })
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise CompileError(f"onnx.checker refused the compiled graph of {package.root}: {exc}") from exc
    return model


def _functions(models: Sequence[onnx.ModelProto]) -> list[onnx.FunctionProto]:
    seen: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for m in models:
        for f in m.functions:
            key = (f.domain, f.name, getattr(f, "overload", ""))
            if key in seen and seen[key].SerializeToString() != f.SerializeToString():
                raise CompileError(f"two stage graphs define different local functions named {f.domain}:{f.name}")
            seen[key] = f
    return list(seen.values())


def fed_thresholds(policies: Sequence[str], thresholds: Sequence[float | None]) -> list[float]:
    """Thresholds as the graph takes them: a disabled exit (None) gets one no score passes."""
    return [never_threshold(get_policy(p)) if t is None else t for p, t in zip(policies, thresholds)]


def bake_thresholds(model: onnx.ModelProto, thresholds: Sequence[float],
                    name: str = THRESHOLDS_INPUT) -> onnx.ModelProto:
    """A copy of a compiled model whose thresholds input ``name`` is a constant instead."""
    baked = copy.deepcopy(model)
    kept = [i for i in baked.graph.input if i.name != name]
    if len(kept) == len(baked.graph.input):
        raise CompileError(f"the model has no {name!r} input to bake")
    del baked.graph.input[:]
    baked.graph.input.extend(kept)
    baked.graph.initializer.append(
        numpy_helper.from_array(np.asarray(thresholds, dtype=np.float64), name))
    props = {p.key: p.value for p in baked.metadata_props}
    props["edgeexit.thresholds"] = "baked: " + ",".join(repr(float(t)) for t in thresholds)
    onnx.helper.set_model_props(baked, props)
    return baked


# --- packages ----------------------------------------------------------------------


def compiled_entry(package: Package, file: str = COMPILED_FILE) -> dict[str, Any]:
    """The manifest's ``compiled`` object for a graph built from ``package``'s stage files now."""
    io = graph_names(package)
    entry: dict[str, Any] = {
        "file": file,
        "inputs": [i.name for i in package.inputs],
        "thresholds": io.thresholds,
        "policies": list(package.policies),
        "outputs": dict(zip(COMPILED_OUTPUTS, io.outputs)),
        "sources": {s.file: sha256_file(package.file_path(s.file)) for s in package.stages},
    }
    if any(t != 1.0 for t in package.temperatures):   # a version-9 field, written only when it says something
        entry["temperatures"] = list(package.temperatures)
    return entry


def _file_users(package: Package, *, recompiling: bool) -> dict[str, str]:
    """What each file name of the package is used for (but the compiled graph, when ``recompiling``)."""
    users = {MANIFEST_NAME: "the manifest"}
    for stage in package.stages:
        users.setdefault(stage.file, f"the graph of stage {stage.name!r}")
    if package.full_model is not None:
        users.setdefault(package.full_model.file, "the full model")
    if package.text is not None:
        users.setdefault(package.text.tokenizer, "the tokenizer")
    compiled = package.compiled.file if package.compiled is not None else None
    if compiled is not None and not recompiling:
        users.setdefault(compiled, "its compiled graph")
    for name in package.files:
        if name != compiled:
            users.setdefault(name, "a file listed in the manifest's files table")
    return users


def _refuse_taken(package: Package, name: str, hint: str, *, recompiling: bool) -> None:
    """A compiled graph must never be written over a file the package uses for something else."""
    user = _file_users(package, recompiling=recompiling).get(name)
    if user is not None:
        raise CompileError(f"cannot compile {package.root}: the compiled graph would be written as {name!r}, which "
                           f"the package already uses for {user}; nothing was written. {hint}")



def _widest_logits_type(package: Package, models: list[onnx.ModelProto]) -> int:
    """The ONNX element type of the widest exit logits (float16 < float32 < float64): the stage
    loop answers every exit in it, so the compiled graph rounds no exit's logits either."""
    widest: np.dtype[Any] | None = None
    for k in package.exit_stages:
        spec = package.stages[k].exit
        assert spec is not None
        out = next((o for o in models[k].graph.output if o.name == spec.logits), None)
        if out is None or out.type.tensor_type.elem_type not in _FLOAT_LOGITS:
            raise CompileError(f"exit logits {spec.logits!r} must be a float tensor (batch, classes) to compile")
        dtype = helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)
        widest = dtype if widest is None else np.result_type(widest, dtype)
    assert widest is not None
    return int(helper.np_dtype_to_tensor_dtype(widest))


def compile_package(
    path: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    bake: bool = False,
    check_samples: int = 7,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Compile a package's stages into one graph: into the package, or to a standalone file.

    Into the package, the graph is written under a name the manifest does not list yet
    (``compiled.onnx``, or ``compiled-next.onnx`` when recompiling), then ``manifest.json``
    is replaced atomically to list it; the stage graphs and any other file stay untouched.
    A name the package already uses for another file (a stage graph called ``compiled.onnx``),
    or an ``output`` that is one of the package's files, is a ``CompileError`` before anything
    is written.

    Args:
        path: the exit package.
        output: write the compiled graph to this ``.onnx`` file instead of adding
            ``compiled.onnx`` to the package (the package is then only read).
        bake: with ``output``, store the package's thresholds as constants instead of a
            ``thresholds`` input (a single-file model for apps that never change them).
        check_samples: random samples on which the compiled graph must agree with the
            stage loop before anything is written (0: skip the check).
        log: where progress lines go (None: silent).

    Returns:
        The package path, or ``output``.

    Example:
        >>> compile_package("lenet.eexit")                                  # doctest: +SKIP
        >>> compile_package("lenet.eexit", output="lenet.onnx", bake=True)  # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    package = load_package(Path(path).resolve())   # through a link: compile the package it points to
    if bake and output is None:
        raise CompileError("bake=True (--bake-thresholds) needs output=FILE.onnx: a package keeps its thresholds "
                           "in the manifest only, so calibration never rewrites the graph")
    previous = package.compiled.file if package.compiled is not None else None
    file = COMPILED_FILE_NEXT if previous == COMPILED_FILE else COMPILED_FILE
    if output is None:
        _refuse_taken(package, file, "Rename that file (and its entries in the manifest), or write the compiled "
                                     "graph to a file of its own: output=FILE.onnx (CLI: -o FILE.onnx)",
                      recompiling=True)
    elif Path(output).resolve().parent == package.root.resolve():
        _refuse_taken(package, Path(output).name, "Write it to another name (-o FILE.onnx).", recompiling=False)
    model = build_compiled_model(package)
    data = model.SerializeToString()
    io = graph_names(package)
    if check_samples:
        check_against_stage_loop(package, data, check_samples)
    if output is not None:
        if bake:
            data = bake_thresholds(model, fed_thresholds(package.policies, package.thresholds),
                                   io.thresholds).SerializeToString()
        write_bytes_atomically(output, data)
        leftovers.collect_replacements(Path(output))   # what killed writes of this file left
        say(f"wrote {output} ({len(data):,} bytes; thresholds "
            f"{'baked in: ' + str(package.thresholds) if bake else 'as the input ' + repr(io.thresholds)})")
        return Path(output)
    write_bytes_atomically(package.file_path(file), data)   # not listed yet: no reader opens it
    entry = compiled_entry(package, file)
    digest = hashlib.sha256(data).hexdigest()

    def change(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = max(int(manifest["format_version"]), FORMAT_VERSION)
        manifest["files"].pop(previous, None)
        manifest["files"][file] = {"sha256": digest, "size": len(data)}
        manifest["compiled"] = entry

    try:
        update_manifest(package.root, change)
    except BaseException:
        package.file_path(file).unlink(missing_ok=True)
        raise
    if previous is not None and previous != file:
        package.file_path(previous).unlink(missing_ok=True)
    sizes = sum(package.files[s.file]["size"] for s in package.stages)
    say(f"compiled {len(package.stages)} stage graph(s) ({sizes:,} bytes) into {package.file_path(file)} "
        f"({len(data):,} bytes), policies {package.policies}")
    return package.root


def check_against_stage_loop(package: Package, compiled: bytes, samples: int, seed: int = 0) -> None:
    """Run the compiled graph and the stage loop on random inputs; raise if they disagree.

    Thresholds are the package's, then "never exit" and "always exit", so every branch runs.
    """
    import onnxruntime as ort

    from ..runtime import ExitSession
    from ..runtime._inputs import synthetic_inputs

    feeds = synthetic_inputs(package.inputs, samples, seed)
    thresholds_input = graph_names(package).thresholds
    stages = ExitSession(package.root, engine="stages")
    graph = ort.InferenceSession(compiled, providers=["CPUExecutionProvider"])
    early = package.policies[:-1]
    always = [always_threshold(get_policy(p)) for p in early]
    for thresholds in (package.thresholds, [None] * len(early), always):
        want = stages.run(feeds, thresholds=thresholds)
        fed = np.asarray(fed_thresholds(package.policies, thresholds), np.float64)
        logits, exit_index, _ = graph.run(None, {**feeds, thresholds_input: fed})
        if not np.array_equal(exit_index, want.exit_index) or not np.allclose(logits, want.logits, atol=1e-5):
            raise CompileError(
                f"the compiled graph disagrees with the stage loop at thresholds {thresholds}: exits "
                f"{exit_index.tolist()} vs {want.exit_index.tolist()}; this is a bug in the compiler, please report it"
            )
