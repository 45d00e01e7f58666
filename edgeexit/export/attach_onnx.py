"""Exits on a model held only as ``model.onnx``: cut its graph at named tensors, train a head per cut.

The path of docs/DESIGN.md §11 for an ONNX graph, where the backbone never exists in torch:

1. **cut** (``cut_onnx``): stage k holds the nodes needed for the tensor at cut k that no
   earlier stage computed; the last stage computes the model's output.  After each cut the
   *carry* is the cut tensor (first) plus every tensor computed so far, or model input, that a
   later stage reads, so a skip connection may span any number of cuts.  A tensor a later
   stage reads that has no batch axis (a shape, a constant) is recomputed there from carried
   tensors instead of carried: the runtime drops the rows of samples that exited from every
   carry, and a shape computed for the full batch would be wrong for the rest.  Which
   tensors have the batch on axis 0 is found by running the model at two batch sizes.
2. **record** (``record_cut_features``): the cut tensors of every sample, stage by stage in
   onnxruntime.
3. **attach** (``attach_onnx_exits``): a head per cut sized by the recorded shape (4-D:
   global average pool; 3-D: a mean over tokens, masked by the attention-mask input where the
   model has one; 2-D: nothing), then a linear layer to the model's classes, trained in torch
   on the recorded features; each head is exported with ``torch.onnx.export`` and spliced into
   its stage graph, which then also outputs that exit's logits.  ``full.onnx`` is the
   original file, byte for byte.

Why one file of ~1,000 lines: the three steps share the analysed graph (``_Graph``: producers,
probe shapes, batch axes) and the stage records; the heads' training and splicing (~170 lines,
``CutHead`` to ``_splice``) is the part that could move out once a second backbone format needs it.

Example:
    >>> attach_onnx_exits("model.onnx", ["/layer2/Relu_output_0", "/layer3/Relu_output_0"],
    ...                   {"input": x}, y, "model.eexit")                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import nn

from .. import __version__
from .. import _leftovers as leftovers
from .._names import nearest
from .._onnx_scan import ScanError, external_locations
from ..errors import ExportError, ExportValidationError, ModelSpecError
from ..package import DTYPES, FORMAT_NAME, FORMAT_VERSION, Package, check_replaceable, load_package, write_package
from ..policies import check_thresholds, get_policy
from .exporter import _carry_name, _compiled_in, _logits_name

PROBE_BATCHES = (2, 3)   # two sizes: a tensor whose axis 0 follows both is batch-major
PROBE_TOKENS = 16        # a symbolic non-batch axis in made-up probe inputs
VALIDATION_SAMPLES = 64
HEADS = ("linear", "avgpool", "mean", "masked_mean", "first_token")
_HEAD_RANK = {"linear": 2, "avgpool": 4, "mean": 3, "masked_mean": 3, "first_token": 3}
_MATMUL_OPS = ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul")
_CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


@dataclass(frozen=True)
class OnnxStage:
    """One stage graph of a cut model (no exit head yet).

    ``model`` reads ``inputs`` (model inputs for stage 0, the previous ``carry`` after) and
    outputs ``carry`` (empty for the last stage, which outputs ``logits``, the model's own
    output under a new name).  ``sources[i]`` is the original name of ``carry[i]``;
    ``carry[0]`` is the tensor at this stage's cut, ``cut``.  An early stage's ``logits`` is
    the name its exit head's output gets once one is attached.
    """

    model: onnx.ModelProto
    inputs: tuple[str, ...]
    carry: tuple[str, ...]
    sources: tuple[str, ...]
    cut: str | None
    logits: str
    flops: int   # estimated per sample (a multiply-add counts 2), the stage's own nodes


@dataclass(frozen=True)
class OnnxCut:
    """A model cut into stages at named tensors (``cut_onnx``).

    ``at`` holds the cut tensors in execution order, ``feature_shapes[k]`` the shape of cut
    k without the batch axis as the probe saw it, ``classes`` the width of the model's
    output ``output``, ``inputs`` the model inputs as manifest entries.
    """

    source: bytes
    stages: tuple[OnnxStage, ...]
    at: tuple[str, ...]
    feature_shapes: tuple[tuple[int, ...], ...]
    output: str
    classes: int
    inputs: tuple[dict[str, Any], ...]
    opset: int
    flops: int   # estimated per sample, the whole original model


# --- reading the graph ------------------------------------------------------------------


def _load(model: str | os.PathLike[str] | onnx.ModelProto | bytes) -> tuple[onnx.ModelProto, bytes]:
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
    elif isinstance(model, bytes):
        data = model
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelSpecError(f"{path} is not a file; give the path of a model.onnx (or an onnx.ModelProto)")
        data = path.read_bytes()
    try:
        outside = external_locations(data)
    except ScanError as exc:
        raise ModelSpecError(f"the model is not a well-formed ONNX file: {exc}") from None
    if outside:
        raise ModelSpecError(f"the model keeps tensors in external files {sorted(set(outside))}; an exit package "
                             "holds every byte itself: re-save it with onnx.save_model(model, path, "
                             "save_as_external_data=False) (models under 2 GB)")
    return onnx.load_from_string(data), data


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes (its implicit inputs)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            read |= _outer_names(sub)
        defined.update(node.output)
    return read - defined


def _defined_inside(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a subgraph (and the subgraphs in it) defines."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
        for sub in _subgraphs(node):
            names |= _defined_inside(sub)
    return names


@dataclass
class _Graph:
    """The top-level graph as a dependency structure, plus what the probe run saw."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    reads: list[list[str]]          # per node: inputs and implicit subgraph inputs
    producer: dict[str, int]
    inits: set[str]
    inputs: list[str]               # model inputs (graph inputs that are not initializers)
    output: str
    shapes: dict[int, dict[str, tuple[int, ...]]]    # probe batch -> tensor -> shape
    dtypes: dict[str, np.dtype[Any]]
    inferred: dict[str, onnx.TypeProto]
    specs: list[dict[str, Any]]     # the model inputs as manifest entries
    init_dims: dict[str, tuple[int, ...]]

    def batch_major(self, name: str) -> bool:
        return all(len(s.get(name, ())) >= 1 and s[name][0] == b for b, s in self.shapes.items())

    def ancestors(self, targets: Iterable[str]) -> set[int]:
        seen: set[int] = set()
        stack = [self.producer[t] for t in targets if t in self.producer]
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(self.producer[t] for t in self.reads[i] if t in self.producer)
        return seen


def _analyse(model: onnx.ModelProto, logits: str | None, example: Mapping[str, np.ndarray] | None) -> _Graph:
    graph = model.graph
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = [i.name for i in graph.input if i.name not in inits]
    outputs = [o.name for o in graph.output]
    if logits is None:
        if len(outputs) != 1:
            raise ModelSpecError(f"the model has {len(outputs)} outputs {outputs}; name the one holding the class "
                                 "logits with logits=NAME")
        logits = outputs[0]
    elif logits not in outputs:
        raise ModelSpecError(f"logits={logits!r} is not an output of the model; outputs: {outputs}."
                             + _nearest(logits, outputs))
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    reads: list[list[str]] = []
    for i, node in enumerate(nodes):
        deps = [n for n in node.input if n]
        for sub in _subgraphs(node):
            deps.extend(sorted(_outer_names(sub)))
        for t in deps:
            if t not in producer and t not in inits and t not in inputs:
                raise ModelSpecError(f"node {node.name or node.op_type!r} reads {t!r} before any node computes it: "
                                     "the graph is not topologically sorted (re-save it with onnx, or export again)")
        reads.append(deps)
        producer.update(dict.fromkeys((o for o in node.output if o), i))
    specs = _input_specs(model)
    try:
        inferred_model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        inferred = {v.name: v.type for v in inferred_model.graph.value_info}
    except Exception:   # shape inference is only a hint for the stage graphs' declared shapes
        inferred = {}
    inferred.update({v.name: v.type for v in graph.input})
    inferred.update({v.name: v.type for v in graph.output})
    shapes, dtypes = _probe(model, inputs, example)
    init_dims = {t.name: tuple(t.dims) for t in graph.initializer}
    return _Graph(model, nodes, reads, producer, inits, inputs, logits, shapes, dtypes, inferred, specs, init_dims)


def _nearest(name: str, choices: Sequence[str], n: int = 5) -> str:
    near = nearest(name, choices, n, cutoff=0.5)
    return f" Nearest names: {near}." if near else ""


def _probe_inputs(model: onnx.ModelProto, names: Sequence[str], batch: int,
                  example: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if example is not None:
        n = len(next(iter(example.values())))
        rows = np.arange(batch) % n
        return {k: np.asarray(example[k])[rows] for k in names}
    gen = np.random.default_rng(0)
    specs = {i.name: i for i in model.graph.input}
    feeds = {}
    for name in names:
        tensor = specs[name].type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = [batch] + [d.dim_value if d.HasField("dim_value") else PROBE_TOKENS for d in tensor.shape.dim[1:]]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = gen.standard_normal(shape).astype(dtype)
        else:   # token ids 0 are valid everywhere; a mask of ones attends everywhere
            feeds[name] = np.full(shape, 1 if "mask" in name.lower() else 0, dtype=dtype)
    return feeds


def _probe(model: onnx.ModelProto, inputs: Sequence[str], example: Mapping[str, np.ndarray] | None
           ) -> tuple[dict[int, dict[str, tuple[int, ...]]], dict[str, np.dtype[Any]]]:
    """Shapes and dtypes of every top-level tensor, from runs at the two probe batch sizes."""
    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and o not in present]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelSpecError(f"onnxruntime cannot load the model: {exc}") from None
    out_names = [o.name for o in session.get_outputs()]
    shapes: dict[int, dict[str, tuple[int, ...]]] = {}
    dtypes: dict[str, np.dtype[Any]] = {}
    for batch in PROBE_BATCHES:
        feeds = _probe_inputs(model, inputs, batch, example)
        try:
            results = session.run(out_names, feeds)
        except Exception as exc:
            how = "your example inputs" if example is not None else "made-up inputs (pass example={name: array})"
            raise ModelSpecError(f"onnxruntime cannot run the model at batch {batch} on {how}: {exc}. A model "
                                 "exported for a fixed batch fails here: re-export it with a dynamic batch "
                                 "axis") from None
        seen = {n: np.asarray(v) for n, v in zip(out_names, results) if isinstance(v, np.ndarray)}
        seen.update(feeds)
        shapes[batch] = {n: v.shape for n, v in seen.items()}
        dtypes.update({n: v.dtype for n, v in seen.items()})
    return shapes, dtypes


# --- cutting ----------------------------------------------------------------------------


def _order_cuts(g: _Graph, at: Sequence[str]) -> list[str]:
    if isinstance(at, str) or not at:
        raise ModelSpecError(f"at must be a non-empty list of tensor names, got {at!r}")
    names = [str(a) for a in at]
    if len(set(names)) != len(names):
        raise ModelSpecError(f"at names a tensor twice: {names}")
    inner = {t: node.name or node.op_type for node in g.nodes for sub in _subgraphs(node)
             for t in _defined_inside(sub)}
    candidates = [o for n in g.nodes for o in n.output if o]
    for name in names:
        if name in g.inits:
            raise ModelSpecError(f"cut {name!r} is an initializer (a weight), not a tensor the model computes; cut "
                                 "at a node output")
        if name in g.inputs:
            raise ModelSpecError(f"cut {name!r} is a model input; cut at a tensor a node computes from it")
        if name in inner:
            raise ModelSpecError(f"cut {name!r} lies inside a subgraph of node {inner[name]!r} (If/Loop/Scan); cut "
                                 "at a tensor of the main graph")
        if name not in g.producer:
            raise ModelSpecError(f"no node of the model outputs a tensor named {name!r}; a cut is a node output."
                                 + _nearest(name, candidates))
        if name == g.output:
            raise ModelSpecError(f"cut {name!r} is the model's output: the final exit is there already")
        if g.producer[name] not in g.ancestors([g.output]):
            raise ModelSpecError(f"cut {name!r} does not feed the model's output {g.output!r}; an exit there would "
                                 "save nothing")
    ancestors = {n: g.ancestors([n]) for n in names}
    ordered = sorted(names, key=lambda n: len(ancestors[n]))
    for a, b in itertools.pairwise(ordered):
        if g.producer[a] not in ancestors[b]:
            raise ModelSpecError(f"cuts {a!r} and {b!r} lie on parallel branches: neither is computed from the other, "
                                 "so no stage order has one before the other. Cut at tensors one after another "
                                 "(e.g. after the branches join), or drop one of them")
    for name in ordered:
        if not g.batch_major(name):
            seen = {b: s.get(name) for b, s in g.shapes.items()}
            raise ModelSpecError(f"cut {name!r} has shapes {seen} at batches {PROBE_BATCHES}: its axis 0 is not the "
                                 "batch, and an exit needs one row per sample; cut at another tensor")
        if g.dtypes[name] != np.float32:
            raise ModelSpecError(f"cut {name!r} is {g.dtypes[name]}; exit heads read float32 tensors")
    return ordered


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"edgeexit{i}_{base}"
    taken.add(name)
    return name


def _node_flops(g: _Graph, i: int, batch: int) -> int:
    node, shapes = g.nodes[i], g.shapes[batch]

    def shape(name: str) -> tuple[int, ...]:
        return tuple(shapes[name]) if name in shapes else g.init_dims.get(name, ())

    out = int(np.prod(shape(node.output[0]))) if node.output and node.output[0] in shapes else 0
    if node.op_type in _MATMUL_OPS and node.input:
        a = shape(node.input[0])
        trans = any(at.name == "transA" and at.i for at in node.attribute)
        k = (a[-2] if trans else a[-1]) if len(a) >= 2 else (a[0] if a else 1)
        return 2 * out * k
    if node.op_type in _CONV_OPS and len(node.input) > 1:
        w = shape(node.input[3 if node.op_type == "QLinearConv" else 1])
        return 2 * out * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose" and len(node.input) > 1:
        return 2 * int(np.prod(shape(node.input[0]))) * int(np.prod(shape(node.input[1])[1:]))
    return out


def _per_sample_flops(g: _Graph, nodes: Iterable[int]) -> int:
    """FLOPs that grow with the batch, per sample: the difference between the two probe runs."""
    small, large = PROBE_BATCHES
    nodes = list(nodes)
    grow = sum(_node_flops(g, i, large) for i in nodes) - sum(_node_flops(g, i, small) for i in nodes)
    return max(0, round(grow / (large - small)))


def _value_info(g: _Graph, source: str, name: str) -> onnx.ValueInfoProto:
    """A stage input or output: the probe's dtype and rank, axis 0 the batch, other axes as the
    model's shape inference knows them (unknown otherwise)."""
    rank = len(g.shapes[PROBE_BATCHES[0]][source])
    hint = g.inferred.get(source)
    dims: list[int | str | None] = [None] * rank
    if hint is not None and hint.HasField("tensor_type") and len(hint.tensor_type.shape.dim) == rank:
        for a, d in enumerate(hint.tensor_type.shape.dim):
            dims[a] = d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
    dims = ["batch", *dims[1:]] if rank else dims
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(g.dtypes[source]), dims)


def _stage_model(g: _Graph, k: int, node_ids: Iterable[int], inputs: Sequence[tuple[str, str]],
                 outputs: Sequence[tuple[str, str]], taken: set[str]) -> onnx.ModelProto:
    """Stage graph: ``inputs``/``outputs`` are (graph name, original tensor name) pairs."""
    nodes: list[onnx.NodeProto] = []
    graph_inputs: list[onnx.ValueInfoProto] = []
    originals = {i.name: i for i in g.model.graph.input}
    for name, source in inputs:
        if name == source:     # a model input of stage 0, as the model declares it
            graph_inputs.append(copy.deepcopy(originals[name]))
        else:
            graph_inputs.append(_value_info(g, source, name))
            nodes.append(helper.make_node("Identity", [name], [source], name=_fresh(f"edgeexit/in{k}/{source}", taken)))
    nodes.extend(copy.deepcopy(g.nodes[i]) for i in sorted(node_ids))
    for name, source in outputs:
        nodes.append(helper.make_node("Identity", [source], [name], name=_fresh(f"edgeexit/out{k}/{source}", taken)))
    used: set[str] = set()
    for node in nodes:
        used.update(node.input)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
    produced = {o for n in nodes for o in n.output}
    graph = helper.make_graph(
        nodes, f"stage{k}", graph_inputs, [_value_info(g, source, name) for name, source in outputs],
        initializer=[copy.deepcopy(t) for t in g.model.graph.initializer if t.name in used],
        sparse_initializer=[copy.deepcopy(t) for t in g.model.graph.sparse_initializer if t.values.name in used],
        value_info=[copy.deepcopy(v) for v in g.model.graph.value_info if v.name in produced],
    )
    model = helper.make_model(graph, opset_imports=g.model.opset_import, functions=g.model.functions,
                              producer_name="edgeexit", producer_version=__version__)
    model.ir_version = g.model.ir_version
    return model


def _check_stage(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker refused {what}: {exc}") from exc


def onnx_input_names(model: str | os.PathLike[str] | onnx.ModelProto) -> list[str]:
    """The model's inputs (graph inputs that are not initializers), in order: the names an ``.npz``
    of training data must use."""
    proto, _ = _load(model)
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def cuttable_tensors(model: str | os.PathLike[str] | onnx.ModelProto,
                     example: Mapping[str, np.ndarray] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors a cut can be made at, in graph order: node outputs of the top-level graph with a
    batch axis first, float32, that the model's output depends on; each with the op that makes it
    and its shape on a probe batch of 2 (for ``attach --dry-run``)."""
    proto, _ = _load(model)
    g = _analyse(proto, None, example)
    needed = g.ancestors([g.output])
    found = []
    for i, node in enumerate(g.nodes):
        if i not in needed:
            continue
        for name in node.output:
            if name and name != g.output and g.batch_major(name) and g.dtypes.get(name) == np.dtype(np.float32):
                found.append((name, node.op_type, g.shapes[min(g.shapes)][name]))
    return found


def cut_onnx(model: str | os.PathLike[str] | onnx.ModelProto, at: Sequence[str], *,
             keep: Mapping[int, Sequence[str]] | None = None, logits: str | None = None,
             example: Mapping[str, np.ndarray] | None = None) -> OnnxCut:
    """Cut an ONNX model into stage graphs at the tensors named in ``at``.

    Args:
        model: a ``model.onnx`` path or an ``onnx.ModelProto``: a classifier whose output is
            (batch, classes), with a symbolic batch axis on every input.
        at: node output names, one per early exit, in any order; they must follow one
            another (a cut on a branch parallel to another cut's is refused).
        keep: ``{k: [model input, ...]}``: inputs stage k must be able to read besides what
            its nodes read (an exit head's attention mask), carried through to it.
        logits: the output holding the class logits, where the model has several.
        example: ``{input: array}`` to probe the model with (default: made-up inputs, with
            symbolic non-batch axes of 16).

    Returns:
        an ``OnnxCut``: stage k outputs its carry, the tensor at cut k first; the last stage
        outputs the model's output as ``logits{K}``.

    Raises:
        ModelSpecError: a cut that is not a node output (the nearest names are listed), an
            initializer, a model input, inside an If/Loop subgraph, or on a parallel branch.

    Example:
        >>> cut = cut_onnx("resnet.onnx", ["/layer2/Relu_output_0"])          # doctest: +SKIP
        >>> [s.carry for s in cut.stages]                                       # doctest: +SKIP
    """
    proto, data = _load(model)
    if example is not None:
        example, _ = _check_feeds(_input_specs(proto), example)
    g = _analyse(proto, logits, example)
    return _cut(g, data, _order_cuts(g, at), keep or {})


def _cut(g: _Graph, data: bytes, cuts: list[str], keep: Mapping[int, Sequence[str]]) -> OnnxCut:
    out_shape = [s[g.output] for s in g.shapes.values()]
    if any(len(s) != 2 or s[0] != b for s, b in zip(out_shape, g.shapes)) or out_shape[0][1] != out_shape[1][1] \
            or not np.issubdtype(g.dtypes[g.output], np.floating):
        raise ModelSpecError(f"the model's output {g.output!r} has shapes {out_shape} ({g.dtypes[g.output]}) at "
                             f"batches {PROBE_BATCHES}; exits need a classifier whose output is float logits of shape "
                             "(batch, classes)")
    classes = out_shape[0][1]
    for k, names in keep.items():
        bad = [n for n in names if n not in g.inputs]
        if bad or not 0 <= k < len(cuts):
            raise ModelSpecError(f"keep[{k}] = {list(names)}: keep names model inputs {g.inputs} of stages "
                                 f"0 to {len(cuts) - 1}")
    # stage k: the nodes the tensor at cut k needs that no earlier stage computed
    stages: list[set[int]] = []
    done: set[int] = set()
    for target in [*cuts, g.output]:
        stages.append(g.ancestors([target]) - done)
        done |= stages[-1]
    # a tensor without a batch axis is recomputed where it is read, never carried
    for k in range(1, len(stages)):
        todo = list(stages[k])
        while todo:
            i = todo.pop()
            for t in g.reads[i]:
                j = g.producer.get(t)
                if j is not None and j not in stages[k] and not g.batch_major(t):
                    stages[k].add(j)
                    todo.append(j)
    home: dict[str, int] = {}
    for k, ids in enumerate(stages):
        for i in ids:
            for t in g.nodes[i].output:
                home.setdefault(t, k)
    needs: list[set[str]] = []
    for k, ids in enumerate(stages):
        produced = {o for i in ids for o in g.nodes[i].output}
        needs.append({t for i in ids for t in g.reads[i] if t not in produced and t not in g.inits}
                     | set(keep.get(k, ())))

    def order(t: str) -> tuple[int, int]:
        return (0, g.inputs.index(t)) if t in g.inputs else (1, g.producer[t])

    taken = {o for n in g.nodes for o in n.output} | set(g.inputs) | g.inits | {n.name for n in g.nodes}
    carries: list[list[str]] = []
    for k, cut in enumerate(cuts):
        later = set().union(*needs[k + 1:])
        rest = sorted((t for t in later if t != cut and (t in g.inputs or home.get(t, len(stages)) <= k)), key=order)
        carries.append([cut, *rest])
    carry_names = [[_fresh(_carry_name(k, i), taken) for i in range(len(c))] for k, c in enumerate(carries)]
    logits_names = [_fresh(_logits_name(k), taken) for k in range(len(stages))]
    stage0_inputs = [t for t in g.inputs if t in set().union(*needs)]
    out: list[OnnxStage] = []
    for k, ids in enumerate(stages):
        last = k == len(stages) - 1
        inputs = [(t, t) for t in stage0_inputs] if k == 0 else list(zip(carry_names[k - 1], carries[k - 1]))
        outputs = [(logits_names[k], g.output)] if last else list(zip(carry_names[k], carries[k]))
        model = _stage_model(g, k, ids, inputs, outputs, set(taken))
        _check_stage(model, f"stage {k} of the cut model")
        out.append(OnnxStage(model, tuple(n for n, _ in inputs), () if last else tuple(carry_names[k]),
                             () if last else tuple(carries[k]), None if last else cuts[k], logits_names[k],
                             _per_sample_flops(g, ids)))
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxCut(data, tuple(out), tuple(cuts), tuple(tuple(g.shapes[PROBE_BATCHES[0]][c][1:]) for c in cuts),
                   g.output, classes, tuple(g.specs), opset, _per_sample_flops(g, range(len(g.nodes))))


def _input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The model inputs as manifest entries; axis 0 must be symbolic (the batch)."""
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    for spec in model.graph.input:
        if spec.name in inits:
            continue
        if not spec.type.HasField("tensor_type"):
            raise ModelSpecError(f"model input {spec.name!r} is not a tensor; exit packages take tensors")
        tensor = spec.type.tensor_type
        dims = tensor.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            fixed = f"a fixed batch axis of {dims[0].dim_value}" if dims else "no axes"
            raise ModelSpecError(f"model input {spec.name!r} has {fixed}; exits drop the rows of samples that "
                                 "left, so axis 0 of every input must be a symbolic batch axis. Export with a "
                                 "dynamic batch (torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}))")
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        if dtype not in DTYPES:
            raise ModelSpecError(f"model input {spec.name!r} is {dtype}; exit packages support {', '.join(DTYPES)}")
        shape: list[int | str] = ["batch"]
        for a, d in enumerate(dims[1:], 1):
            shape.append(d.dim_value if d.dim_value > 0 else (d.dim_param or f"{spec.name}_{a}"))
        specs.append({"name": spec.name, "dtype": dtype, "shape": shape})
    return specs


# --- recording --------------------------------------------------------------------------


def _sessions(models: Sequence[onnx.ModelProto]) -> list[ort.InferenceSession]:
    return [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in models]


def _run_stages(sessions: Sequence[ort.InferenceSession], stages: Sequence[OnnxStage],
                feeds: Mapping[str, np.ndarray], outputs: Callable[[int], list[str]]) -> list[list[np.ndarray]]:
    tensors = dict(feeds)
    got = []
    for k, (session, stage) in enumerate(zip(sessions, stages)):
        names = outputs(k)
        values = session.run(names, {n: tensors[n] for n in stage.inputs})
        tensors.update(zip(names, values))
        got.append(values)
    return got


def _check_feeds(specs: Sequence[Mapping[str, Any]], inputs: Mapping[str, np.ndarray], minimum: int = 1
                 ) -> tuple[dict[str, np.ndarray], int]:
    """The inputs as arrays, every model input present with its dtype, rank and fixed sizes; their count."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise ModelSpecError("inputs must be a non-empty dict {input name: array}")
    names = [s["name"] for s in specs]
    extra = [n for n in inputs if n not in names]
    if extra:
        raise ModelSpecError(f"inputs names {extra}, which the model does not have; its inputs: {names}."
                             + _nearest(str(extra[0]), names))
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ModelSpecError(f"inputs lacks {missing}; the model reads {names}")
    feeds = {n: np.asarray(inputs[n]) for n in names}
    counts = {n: a.shape[0] if a.ndim else 0 for n, a in feeds.items()}
    for spec in specs:
        a = feeds[spec["name"]]
        if a.dtype.name != spec["dtype"] or a.ndim != len(spec["shape"]) or any(
                isinstance(d, int) and d != size for d, size in zip(spec["shape"], a.shape)):
            raise ModelSpecError(f"input {spec['name']!r} is {a.dtype} of shape {a.shape}; the model takes "
                                 f"{spec['dtype']} of shape {spec['shape']}")
    if len(set(counts.values())) != 1 or min(counts.values()) < minimum:
        raise ModelSpecError(f"inputs need the same number (>= {minimum}) of samples on axis 0, got {counts}")
    return feeds, next(iter(counts.values()))


def record_cut_features(cut: OnnxCut, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """The tensor at each cut for every sample, run with onnxruntime stage by stage.

    Example:
        >>> feats = record_cut_features(cut_onnx("model.onnx", cuts), {"input": x})   # doctest: +SKIP
    """
    feeds, n = _check_feeds(cut.inputs, inputs)
    if batch_size < 1:
        raise ModelSpecError(f"batch_size must be >= 1, got {batch_size}")
    sessions = _sessions([s.model for s in cut.stages[:-1]])
    parts: list[list[np.ndarray]] = [[] for _ in cut.at]
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in feeds.items()}
        for k, values in enumerate(_run_stages(sessions, cut.stages[:-1], batch, lambda k: list(cut.stages[k].carry))):
            parts[k].append(values[0])
    return [np.concatenate(p) for p in parts]


# --- heads ------------------------------------------------------------------------------


class CutHead(nn.Module):
    """An exit head: pool the cut tensor to (batch, features), then a linear layer to the classes.

    ``kind`` is one of ``HEADS``: ``linear`` (a 2-D tensor as it is), ``avgpool`` (global
    average over H, W of a 4-D one), ``mean`` / ``first_token`` (over / the first of the
    tokens of a 3-D one) and ``masked_mean`` (the mean over the tokens whose mask is not 0).
    """

    def __init__(self, kind: str, width: int, classes: int) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ModelSpecError(f"{kind!r} is not a head; heads: {', '.join(HEADS)}." + _nearest(kind, HEADS, 1))
        self.kind = kind
        self.linear = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "avgpool":
            x = x.mean(dim=(2, 3))
        elif self.kind == "mean":
            x = x.mean(dim=1)
        elif self.kind == "first_token":
            x = x[:, 0]
        elif self.kind == "masked_mean":
            if mask is None:
                raise ModelSpecError("a masked_mean head needs the attention mask")
            m = mask.to(x.dtype).unsqueeze(-1)
            x = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return self.linear(x)  # type: ignore[no-any-return]


def train_cut_heads(features: Sequence[np.ndarray], labels: np.ndarray, kinds: Sequence[str], classes: int, *,
                    mask: np.ndarray | None = None, epochs: int = 20, lr: float = 1e-3, seed: int = 0,
                    batch_size: int = 64, log: Callable[[str], None] | None = None) -> list[CutHead]:
    """Train one ``CutHead`` per recorded feature (Adam, cross-entropy), deterministically.

    Head k starts from ``torch.manual_seed(seed + k)`` and shuffles with its own generator,
    inside ``torch.random.fork_rng``: the caller's torch RNG is untouched, and the same
    arguments give the same weights.  ``mask`` (N, tokens) feeds the ``masked_mean`` heads.

    Example:
        >>> heads = train_cut_heads(record_cut_features(cut, x), y, ["avgpool"], cut.classes)  # doctest: +SKIP
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ModelSpecError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    say = log or (lambda _line: None)
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    heads = []
    for k, (kind, feature) in enumerate(zip(kinds, features, strict=True)):
        x = torch.from_numpy(np.ascontiguousarray(feature))
        m = torch.from_numpy(mask) if mask is not None and kind == "masked_mean" else None
        width = feature.shape[1] if kind in ("avgpool", "linear") else feature.shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            head = CutHead(kind, width, classes)
            gen = torch.Generator().manual_seed(seed + k)
            opt = torch.optim.Adam(head.parameters(), lr=lr)
            head.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                    opt.zero_grad()
                    nn.functional.cross_entropy(head(x[idx], None if m is None else m[idx]), y[idx]).backward()
                    opt.step()
        head.eval()
        with torch.no_grad():
            accuracy = float((head(x, m).argmax(1) == y).float().mean())
        say(f"  exit {k}: {kind} + linear {width}->{classes}, training accuracy {accuracy:.3f}")
        heads.append(head)
    return heads


def _head_kinds(heads: str | Sequence[str], shapes: Sequence[tuple[int, ...]], mask: str | None) -> list[str]:
    chosen = [heads] * len(shapes) if isinstance(heads, str) else list(heads)
    if len(chosen) != len(shapes):
        raise ModelSpecError(f"heads lists {len(chosen)} kinds for {len(shapes)} cuts; give one per cut or 'auto'")
    kinds = []
    for k, (kind, shape) in enumerate(zip(chosen, shapes)):
        rank = len(shape) + 1
        if kind == "auto":
            kind = {4: "avgpool", 2: "linear", 3: "masked_mean" if mask else "mean"}.get(rank, "")
            if not kind:
                raise ModelSpecError(f"cut {k} has {rank} axes {('batch', *shape)}; 'auto' heads read 2-D (batch, "
                                     "features), 3-D (batch, tokens, features) or 4-D (batch, C, H, W) tensors")
        if kind not in HEADS:
            raise ModelSpecError(f"heads[{k}] = {kind!r} is not a head; heads: 'auto', {', '.join(HEADS)}."
                                 + _nearest(kind, HEADS, 1))
        if _HEAD_RANK[kind] != rank:
            raise ModelSpecError(f"head {kind!r} reads {_HEAD_RANK[kind]}-D tensors; cut {k} is {rank}-D "
                                 f"{('batch', *shape)}")
        if kind == "masked_mean" and mask is None:
            raise ModelSpecError("head 'masked_mean' needs the attention-mask input: pass mask=INPUT_NAME")
        kinds.append(kind)
    return kinds


def _find_mask(specs: Sequence[Mapping[str, Any]], mask: str | None) -> str | None:
    two_d = [s["name"] for s in specs if len(s["shape"]) == 2]
    if mask == "auto":
        found = [n for n in two_d if "mask" in n.lower()]
        return found[0] if len(found) == 1 else None
    if mask is not None and mask not in two_d:
        raise ModelSpecError(f"mask={mask!r} must name a 2-D (batch, tokens) model input: {two_d}."
                             + _nearest(mask, two_d, 1))
    return mask


def torchscript_to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], names: Sequence[str],
                        outputs: Sequence[str], axes: Mapping[str, Mapping[int, str]], opset: int,
                        what: str) -> onnx.ModelProto:
    """``module`` in eval mode through the TorchScript exporter (opsets 9-20; converted after where
    ``opset`` is outside), as an ``onnx.ModelProto``; a failure is an ``ExportError`` naming ``what``."""
    module.eval()   # the exporter puts a module back in the mode it found it in, children included
    export_opset = min(max(opset, 9), 20)
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-export-{os.getpid()}-") as tmp:
        path = Path(tmp) / "graph.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation and tracer notices
                torch.onnx.export(module, args, str(path), input_names=list(names), output_names=list(outputs),
                                  dynamic_axes={k: dict(v) for k, v in axes.items()}, opset_version=export_opset,
                                  dynamo=False, do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {what}: {str(exc).splitlines()[0][:400]}") from exc
        model = onnx.load(str(path), load_external_data=True)
    return model if export_opset == opset else onnx.version_converter.convert_version(model, opset)


def _export_head(head: CutHead, feature: torch.Tensor, mask: torch.Tensor | None, opset: int) -> onnx.ModelProto:
    names = ["feature"] + (["mask"] if mask is not None else [])
    axes: dict[str, dict[int, str]] = {"feature": {0: "batch"}, "logits": {0: "batch"}}
    if feature.dim() == 3:
        axes["feature"][1] = "tokens"
        if mask is not None:
            axes["mask"] = {0: "batch", 1: "tokens"}
    elif feature.dim() == 4:
        axes["feature"].update({2: "height", 3: "width"})
    args = (feature[:2],) + ((mask[:2],) if mask is not None else ())
    return torchscript_to_onnx(head, args, names, ["logits"], axes, opset, "an exit head")


def _splice(stage: OnnxStage | onnx.ModelProto, head: onnx.ModelProto, prefix: str, feeds: Mapping[str, str],
            logits: str | Mapping[str, str]) -> onnx.ModelProto:
    """``stage``'s graph with ``head`` appended: head input NAME reads ``feeds[NAME]`` (an original tensor
    name inside the stage); its output becomes the stage's new output ``logits``, or, for a head with
    several outputs, head output NAME becomes stage output ``logits[NAME]``."""
    outputs = {"logits": logits} if isinstance(logits, str) else dict(logits)
    head = onnx.compose.add_prefix(head, prefix)
    rename = {prefix + k: v for k, v in feeds.items()} | {prefix + k: v for k, v in outputs.items()}
    model = copy.deepcopy(stage.model if isinstance(stage, OnnxStage) else stage)
    taken = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    clash = taken & ({o for n in head.graph.node for o in n.output} | {t.name for t in head.graph.initializer})
    if clash:
        raise ExportError(f"the exit head's names {sorted(clash)[:3]} clash with the model's")
    for node in head.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    model.graph.node.extend(head.graph.node)
    model.graph.initializer.extend(head.graph.initializer)
    for out in head.graph.output:
        declared = copy.deepcopy(out)
        declared.name = rename[out.name]
        model.graph.output.append(declared)
    domains = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in head.opset_import if o.domain not in domains)
    return model


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer) + \
        sum(int(np.prod(t.values.dims)) for t in model.graph.sparse_initializer)


def _head_flops(kind: str, shape: tuple[int, ...], classes: int) -> int:
    width = shape[0] if kind in ("avgpool", "linear") else shape[-1]
    pool = int(np.prod(shape)) * (2 if kind == "masked_mean" else 1) if kind != "linear" else 0
    return 2 * width * classes + pool


# --- the package ------------------------------------------------------------------------


def attach_onnx_exits(
    model_path: str | os.PathLike[str] | onnx.ModelProto,
    at: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | Sequence[int],
    output: str | os.PathLike[str],
    *,
    heads: str | Sequence[str] = "auto",
    mask: str | None = "auto",
    epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    labels_names: Sequence[str] | None = None,
    policy: str = "entropy",
    thresholds: Sequence[float | None] | None = None,
    name: str | None = None,
    logits: str | None = None,
    compile: bool | None = None,
    batch_size: int = 256,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> Package:
    """Cut ``model_path`` at ``at``, train an exit head per cut on ``inputs``/``labels``, write a package.

    The backbone is never changed: with every exit disabled (the default until ``edgeexit
    calibrate`` picks thresholds) the package answers from ``full.onnx``, the original file.

    Args:
        model_path: ``model.onnx`` (or an ``onnx.ModelProto``), a classifier: output
            (batch, classes), a symbolic batch axis on every input.
        at: the tensors to put exits at (node output names; see ``cut_onnx``).
        inputs: ``{input name: array}``, every model input, one row per training sample.
        labels: the class of each sample, in ``[0, classes)``.
        output: the package directory to write (replaced only with ``overwrite``, when it
            is an exit package).
        heads: ``"auto"`` (4-D: global average pool, 3-D: mean over tokens, masked where the
            model has an attention-mask input, 2-D: none; then a linear layer), one of
            ``HEADS`` for every cut, or one per cut.
        mask: the attention-mask input for 3-D cuts; ``"auto"``: the one 2-D input whose name
            holds "mask", if any.
        epochs, lr, seed: training of the heads (Adam, cross-entropy, batches of 64).
        labels_names: class names for the manifest.
        policy, thresholds: the exit policy and one threshold per early exit (None: disabled).
        compile: add ``compiled.onnx`` as ``export_package`` does (None: when it can).
        atol, rtol: tolerance of the check that each exit's logits in onnxruntime equal the
            torch head on the recorded feature, and the last exit the original model.
        log: where progress and validation lines go (None: silent).

    Example:
        >>> pkg = attach_onnx_exits("model.onnx", ["/layer1/Relu_output_0"], {"input": x}, y,
        ...                         "model.eexit", epochs=10)                   # doctest: +SKIP
        >>> ExitSession(pkg.root).run(x[:8]).exit_index                          # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    check_replaceable(output, overwrite=overwrite)   # before any work: never replaces what is not ours
    pol = get_policy(policy)
    if isinstance(at, str) or not at:
        raise ModelSpecError(f"at must be a non-empty list of tensor names, got {at!r}")
    values = check_thresholds(pol, [None] * len(at) if thresholds is None else thresholds, len(at),
                              allow_disabled=True)
    proto, data = _load(model_path)
    specs = _input_specs(proto)
    feeds, n = _check_feeds(specs, inputs, minimum=2)
    g = _analyse(proto, logits, {k: v[:max(PROBE_BATCHES)] for k, v in feeds.items()})
    cuts = _order_cuts(g, at)
    mask_name = _find_mask(specs, mask)
    shapes = [g.shapes[PROBE_BATCHES[0]][c][1:] for c in cuts]
    kinds = _head_kinds(heads, shapes, mask_name)
    if "masked_mean" not in kinds:
        mask_name = None
    for c, kind, shape in zip(cuts, kinds, shapes):
        if kind == "masked_mean" and mask_name and shape[0] != feeds[mask_name].shape[1]:
            raise ModelSpecError(f"cut {c!r} has {shape[0]} tokens but the mask {mask_name!r} has "
                                 f"{feeds[mask_name].shape[1]}; use heads='mean' or 'first_token' there")
    cut = _cut(g, data, cuts, {k: [mask_name] for k, kind in enumerate(kinds) if kind == "masked_mean" and mask_name})
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= cut.classes:
        raise ModelSpecError(f"labels must be {n} integers in [0, {cut.classes}) (the model's output width), got "
                             f"shape {y.shape} {y.dtype}" + (f" from {y.min()} to {y.max()}" if y.size else ""))
    if labels_names is not None and len(labels_names) != cut.classes:
        raise ModelSpecError(f"labels_names has {len(labels_names)} names for {cut.classes} classes")
    say(f"cut {Path(str(model_path)).name if not isinstance(model_path, onnx.ModelProto) else 'the model'} into "
        f"{len(cut.stages)} stages at {list(cuts)}; carries: {[len(s.carry) for s in cut.stages[:-1]]} tensors")
    features = record_cut_features(cut, feeds, batch_size)
    mask_values = feeds[mask_name] if mask_name else None
    trained = train_cut_heads(features, y, kinds, cut.classes, mask=mask_values, epochs=epochs, lr=lr, seed=seed,
                              log=say)
    x_mask = torch.from_numpy(mask_values) if mask_values is not None else None

    stage_models: list[onnx.ModelProto] = []
    for k, head in enumerate(trained):
        head_mask = x_mask if head.kind == "masked_mean" else None
        head_model = _export_head(head, torch.from_numpy(features[k][:2]),
                                  None if head_mask is None else head_mask[:2], cut.opset)
        wiring = {"feature": cuts[k], **({"mask": mask_name} if head_mask is not None and mask_name else {})}
        spliced = _splice(cut.stages[k], head_model, f"edgeexit_exit{k}/", wiring, cut.stages[k].logits)
        _check_stage(spliced, f"stage {k} with its exit head")
        stage_models.append(spliced)
    stage_models.append(cut.stages[-1].model)
    _validate(cut, stage_models, trained, features, feeds, x_mask, kinds, atol, rtol, say)
    manifest = _manifest(cut, stage_models, kinds, values, pol.name, labels_names, name, model_path,
                         {"samples": n, "epochs": epochs, "lr": lr, "seed": seed})
    return write_cut_package(output, manifest, stage_models, cut.source, compile=compile, overwrite=overwrite,
                             say=say)


def write_cut_package(output: str | os.PathLike[str], manifest: dict[str, Any],
                      stage_models: Sequence[onnx.ModelProto], source: bytes, *, compile: bool | None,
                      overwrite: bool, say: Callable[[str], None],
                      extra_files: Mapping[str, Path] | None = None) -> Package:
    """Write the stage graphs, ``full.onnx`` (``source``, byte for byte), ``extra_files`` (name ->
    file to copy) and, unless ``compile`` is False, ``compiled.onnx`` as one package, atomically."""
    leftovers.collect_work_dirs("export")   # work folders of exports that were killed
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-export-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        files: dict[str, Path] = {}
        for k, stage_model in enumerate(stage_models):
            onnx.save_model(stage_model, str(folder / f"stage{k}.onnx"))
            files[f"stage{k}.onnx"] = folder / f"stage{k}.onnx"
        (folder / "full.onnx").write_bytes(source)
        files["full.onnx"] = folder / "full.onnx"
        for name, src in (extra_files or {}).items():
            (folder / name).write_bytes(Path(src).read_bytes())
            files[name] = folder / name
        if compile is not False:
            manifest, files = _compiled_in(folder, manifest, files, required=bool(compile), final=Path(output),
                                           say=say)
        write_package(output, manifest, files, overwrite=overwrite)
    say(f"wrote {output}")
    return load_package(output)


def _validate(cut: OnnxCut, stage_models: Sequence[onnx.ModelProto], heads: Sequence[CutHead],
              features: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray], mask: torch.Tensor | None,
              kinds: Sequence[str], atol: float, rtol: float, say: Callable[[str], None]) -> None:
    """Each exit in onnxruntime against its torch head on the recorded feature, and the last exit against
    the original model; one line per exit, then one error listing every failure."""
    rows = slice(0, VALIDATION_SAMPLES)
    batch = {k: v[rows] for k, v in feeds.items()}
    names = [cut.stages[k].logits for k in range(len(cut.stages))]
    got = _run_stages(_sessions(stage_models), cut.stages, batch,
                      lambda k: [*cut.stages[k].carry, names[k]])
    full = ort.InferenceSession(cut.source, providers=["CPUExecutionProvider"])
    expected: list[np.ndarray] = []
    with torch.no_grad():
        for k, head in enumerate(heads):
            m = mask[rows] if mask is not None and kinds[k] == "masked_mean" else None
            expected.append(head(torch.from_numpy(features[k][rows]), m).numpy())
    expected.append(full.run([cut.output], batch)[0])
    failures = []
    say(f"validating onnxruntime on {len(next(iter(batch.values())))} samples:")
    for k, (values, ref) in enumerate(zip(got, expected)):
        diff = float(np.max(np.abs(values[-1].astype(np.float64) - ref))) if ref.size else 0.0
        bound = atol + rtol * float(np.max(np.abs(ref)) if ref.size else 0.0)
        what = "the original model" if k == len(got) - 1 else "torch head on the recorded feature"
        ok = values[-1].shape == ref.shape and diff <= bound
        say(f"  stage{k:<4} {names[k]:<10} max |onnxruntime - {what}| = {diff:.2e}  (tolerance {bound:.1e})  "
            f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"stage{k}/{names[k]}: {diff:.3e} > {bound:.1e}")
    if failures:
        raise ExportValidationError(f"{len(failures)} exit(s) differ beyond tolerance: {'; '.join(failures)}")


def _manifest(cut: OnnxCut, stage_models: Sequence[onnx.ModelProto], kinds: Sequence[str],
              thresholds: Sequence[float | None], policy: str, labels_names: Sequence[str] | None, name: str | None,
              model_path: Any, trained: Mapping[str, Any]) -> dict[str, Any]:
    stages = []
    last = len(cut.stages) - 1
    for k, (stage, model) in enumerate(zip(cut.stages, stage_models)):
        exit_flops = _head_flops(kinds[k], cut.feature_shapes[k], cut.classes) if k < last else 0
        stages.append({
            "name": f"stage{k}",
            "file": f"stage{k}.onnx",
            "inputs": list(stage.inputs),
            "carry": list(stage.carry),
            "exit": {"logits": cut.stages[k].logits, "policy": policy,
                     "threshold": None if k == last else thresholds[k]},
            "cost": {"params": _params(model), "flops": stage.flops + exit_flops, "exit_flops": exit_flops},
        })
    source = onnx.load_from_string(cut.source)
    default_name = "model" if isinstance(model_path, onnx.ModelProto) else Path(str(model_path)).stem
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "classifier",
        "name": name or default_name,
        "inputs": [dict(s) for s in cut.inputs],
        "labels": [str(v) for v in labels_names] if labels_names is not None else None,
        "stages": stages,
        "full_model": {"file": "full.onnx", "inputs": [s["name"] for s in cut.inputs], "logits": cut.output,
                       "cost": {"params": _params(source), "flops": cut.flops}},
        "preprocessing": None,
        "producer": {
            "edgeexit": __version__, "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "opset": cut.opset, "exporter": "torchscript",
            "backbone": {"producer": f"{source.producer_name} {source.producer_version}".strip(),
                         "sha256": hashlib.sha256(cut.source).hexdigest()},
        },
        "attach": {"source": "onnx", "cuts": list(cut.at), "heads": list(kinds), **trained},
    }
