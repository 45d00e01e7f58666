"""Exits on a network we did not write: cut its ``torch.fx`` graph at named layers, add heads.

``attach_exits(model, at=["layer1", "layer2"], example_inputs=...)`` traces the unmodified
model with ``torch.fx.symbolic_trace`` semantics and returns an ``EarlyExitModel`` whose
stages are slices of that graph and whose exits are heads sized by a dry run; it exports
with ``export_package`` like any other.

How a cut is made (DESIGN.md §11):

- A layer is a module qualified name as ``model.named_modules()`` gives it.  The tracer
  records what each module call returned and the last graph node that existed when it
  returned; the cut goes right after that node, and the returned value is what the exit
  head reads.  This holds whether fx keeps the module as one ``call_module`` node (torch.nn
  layers) or traces through it into functional calls (a residual block, a ``Sequential``).
  A module called more than once is cut after its last call.
- The stage between two cuts is an ``fx.GraphModule`` of the nodes in between.  Its input
  (and the previous stage's output) is the carry: every value made before the cut that a
  node after it reads (skip connections, concatenations, model inputs read again, a skip
  that spans several cuts, which each stage in between passes on), the cut layer's output
  first, the rest in graph order.  Values that carry no batch axis are recomputed after the
  cut instead of carried: parameters and buffers (``get_attr``), non-tensor values such as
  ``x.shape[0]`` (from the carried tensors they read), and tensors that no model input
  reaches (constants, position ids).
- Why fx and not ``torch.export``: fx keeps the user's modules as the graph's submodules, so
  a stage calls the very ``Conv2d`` objects of the model (parameters shared, not copied: a
  backbone trained later is what exports), keeps the module names the cuts are given in, and
  replays the model's own Python-level ops, which keeps the final exit bit-for-bit the
  model's output.  ``torch.export`` functionalises and decomposes into aten ops, lifting
  parameters to inputs.
- The graph is traced with the model in eval mode (restored afterwards): Python branches on
  ``self.training`` inside traced-through modules take their eval side; torch.nn layers
  (BatchNorm, Dropout) still follow their own mode when the stages run.

What cannot be cut (a ``ModelSpecError`` naming the layer and why): a layer fx cannot see
(inside a torch.nn layer that fx keeps whole, or never called in ``forward``), a layer whose
output is not a tensor with the batch on axis 0, a cut after which nothing is computed, two
cuts at the same point of the graph, and any model fx cannot trace (data-dependent Python
control flow).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from .._names import did_you_mean, nearest
from ..errors import ModelSpecError
from .model import EarlyExitModel

TOKEN_POOLING = ("mean", "first")


@dataclass(frozen=True)
class CutPoint:
    """A layer the model can be cut after (what ``cuttable_layers`` lists, for a dry run).

    Attributes:
        name: the module's qualified name, as ``model.named_modules()`` gives it.
        kind: the module's class name (``"Conv2d"``, ``"Sequential"``, ``"BasicBlock"``).
        shape: its output's shape on the example inputs (batch first).
        dtype: its output's dtype (``"float32"``).
        order: the index, in the traced graph, of the last node the layer produced: cuts run
            in this order, and layers with the same order end at the same point (a block that
            ends a ``Sequential``): cut at one of them.
        carried: how many tensors a single cut there passes to the next stage (its output,
            plus skip connections and inputs still needed after it).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    order: int
    carried: int


class _ExitOnFirst(nn.Module):
    """An exit: the head applied to the first carry tensor (the cut layer's output) only."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *carry: Tensor) -> Tensor:
        return self.head(carry[0])  # type: ignore[no-any-return]


class TokenPool(nn.Module):
    """(batch, tokens, dim) -> (batch, dim): the mean over tokens, or the first (class) token."""

    def __init__(self, token: str = "mean") -> None:
        super().__init__()
        if token not in TOKEN_POOLING:
            raise ModelSpecError(f"token={token!r} is not one of {', '.join(TOKEN_POOLING)}")
        self.token = token

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1) if self.token == "mean" else x[:, 0]

    def extra_repr(self) -> str:
        return f"token={self.token!r}"


# --- tracing ----------------------------------------------------------------------------------


class _RecordingTracer(fx.Tracer):
    """fx's default tracer that also records, per module, what its last call returned and the
    last graph node that existed when it returned (where a cut after it goes)."""

    def __init__(self) -> None:
        super().__init__()
        self.returned: dict[str, tuple[Any, fx.Node]] = {}
        self.leaves: set[str] = set()

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            self.leaves.add(name)
        self.returned[name] = (out, next(reversed(self.graph.nodes)))
        return out


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block, each one's own mode restored after it."""
    modes = {m: m.training for root in modules for m in root.modules()}
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass
class _Traced:
    """The traced graph of a model, with what the dry run saw at each node."""

    model: nn.Module
    graph: fx.Graph
    nodes: list[fx.Node]                 # in graph order, without the output node
    position: dict[fx.Node, int]
    inputs: list[fx.Node]                # the placeholders fed by example_inputs, in their order
    returned: dict[str, tuple[Any, fx.Node]]
    leaves: set[str]
    seen: dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]         # shape, dtype; None: not a tensor
    seen_grown: dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]   # the same at batch + 1
    from_inputs: set[fx.Node]            # nodes some model input reaches
    batch: int
    output: fx.Node
    example: tuple[Tensor, ...]

    def batched(self, node: fx.Node) -> bool:
        """Whether the node is a tensor whose axis 0 is the batch (it follows the batch size)."""
        small, large = self.seen.get(node), self.seen_grown.get(node)
        return (node in self.from_inputs and small is not None and large is not None and len(small[0]) >= 1
                and small[0][0] == self.batch and large[0][0] == self.batch + 1)

    def recomputed(self, node: fx.Node) -> bool:
        """Whether a later stage recomputes the node rather than receiving it in the carry."""
        return node.op == "get_attr" or self.seen.get(node) is None or node not in self.from_inputs


def _example_tuple(model: nn.Module, example_inputs: Mapping[str, Tensor] | Sequence[Tensor],
                   params: list[str]) -> tuple[list[str], list[str], tuple[Tensor, ...]]:
    """The input names, the forward parameters they feed and the example tensors, in the
    order of ``example_inputs`` (the order stage 0 and ``export_package`` take them in)."""
    if isinstance(example_inputs, Mapping):
        names, values = [str(n) for n in example_inputs], list(example_inputs.values())
        by_name = all(n in params for n in names)   # else fed positionally, as export_package feeds them
        fed = names if by_name else params[:len(values)]
    elif isinstance(example_inputs, (tuple, list)):
        values = list(example_inputs)
        names = fed = params[:len(values)]
    else:
        raise ModelSpecError(f"example_inputs must be a dict {{name: tensor}} or a tuple of tensors, got "
                             f"{type(example_inputs).__name__}")
    if not values:
        raise ModelSpecError("example_inputs is empty; give one example batch per input of forward")
    if len(values) > len(params):
        raise ModelSpecError(f"{type(model).__name__}.forward takes {params}, but example_inputs gives "
                             f"{len(values)} tensors")
    for name, t in zip(names, values):
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise ModelSpecError(f"example input {name!r} must be a tensor with the batch on axis 0, got "
                                 f"{type(t).__name__ if not isinstance(t, Tensor) else 'a 0-d tensor'}")
    if len({t.shape[0] for t in values}) != 1:
        raise ModelSpecError(f"example inputs {names} have different batch sizes {[t.shape[0] for t in values]}")
    return names, fed, tuple(v.detach() for v in values)


def _trace(model: nn.Module, example_inputs: Mapping[str, Tensor] | Sequence[Tensor]) -> _Traced:
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    what = type(model).__name__
    signature = inspect.signature(model.forward)
    params = [p.name for p in signature.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    _, fed, example = _example_tuple(model, example_inputs, params)
    concrete: dict[str, Any] = {}   # inputs left to their defaults: specialised by fx, then folded in
    for p in params:
        if p not in fed:
            default = signature.parameters[p].default
            if default is inspect.Parameter.empty:
                raise ModelSpecError(f"{what}.forward needs {p!r}, which example_inputs does not give; "
                                     f"give every input without a default ({params})")
            concrete[p] = default
    tracer = _RecordingTracer()
    with _eval_mode(model):
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as exc:   # TraceError, or whatever a Python-level use of a traced value raises
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelSpecError(
                f"torch.fx cannot trace {what}: {reason}. A cut needs the whole forward as one graph; "
                "data-dependent Python control flow (an `if` on a tensor, a loop over its values) stops it. "
                "Move that code into a function decorated with torch.fx.wrap, or attach exits to a submodule "
                "that traces, or cut elsewhere."
            ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_param = dict(zip(params, placeholders))
    for param, value in concrete.items():   # a default becomes a constant: stages read only real inputs
        _fold_constant(graph, by_param[param], value)
    inputs = [by_param[p] for p in fed]
    nodes = [n for n in graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(result, fx.Node):
        raise ModelSpecError(
            f"{what} returns {'a dict' if isinstance(result, dict) else type(result).__name__}; exits need a "
            "model that returns its logits as one (batch, classes) tensor. Wrap it: a module whose forward "
            "returns model(x)['logits'] (or model(x)[0]), and attach exits to the wrapper."
        )
    from_inputs: set[fx.Node] = set()
    for n in nodes:
        if n in inputs or any(a in from_inputs for a in n.all_input_nodes):
            from_inputs.add(n)
    module = fx.GraphModule(model, graph)
    order = [inputs.index(n) for n in graph.nodes if n.op == "placeholder"]   # forward's order

    def dry_run(tensors: tuple[Tensor, ...]) -> dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]:
        return _dry_run(module, tuple(tensors[i] for i in order))

    seen = dry_run(example)
    grown = dry_run(tuple(torch.cat([t, t[:1]]) for t in example))
    traced = _Traced(model, graph, nodes, position, inputs, tracer.returned, tracer.leaves, seen, grown,
                     from_inputs, example[0].shape[0], result, example)
    out = seen.get(result)
    if out is None or len(out[0]) != 2 or not out[1].is_floating_point or not traced.batched(result):
        got = "a non-tensor value" if out is None else f"shape {out[0]} and dtype {out[1]}"
        raise ModelSpecError(f"{what} returns {got}; exits need a model whose output is its logits, a floating "
                             "point tensor of shape (batch, classes). Wrap it in a module that returns them.")
    return traced


def _fold_constant(graph: fx.Graph, node: fx.Node, value: Any) -> None:
    """Every use of ``node`` replaced by ``value``; then ``node`` removed."""
    def swap(a: fx.Node) -> Any:
        return value if a is node else a

    for user in list(node.users):
        user.args = fx.map_arg(user.args, swap)  # type: ignore[assignment]
        user.kwargs = fx.map_arg(user.kwargs, swap)  # type: ignore[assignment]
    graph.erase_node(node)


def _dry_run(module: fx.GraphModule, args: tuple[Tensor, ...]
             ) -> dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]:
    """Shape and dtype of every node's value (None: not a tensor), in eval mode, without grad."""
    seen: dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            seen[n] = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else None
            return value

    with _eval_mode(module), torch.no_grad():
        _Recorder(module).run(*args)
    return seen


# --- cut points -------------------------------------------------------------------------------


def _cut_node(traced: _Traced, name: str) -> tuple[fx.Node, int]:
    """The value a cut at ``name`` hands to its exit, and the position of the cut."""
    model = traced.model
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        near = nearest(name, [n for n in modules if n])
        raise ModelSpecError(f"{type(model).__name__} has no layer {name!r}.{did_you_mean(name, near[:1])} "
                             f"Layers, nearest first: {', '.join(near[:8])}")
    if name not in traced.returned:
        inside = [leaf for leaf in traced.leaves if name.startswith(leaf + ".")]
        why = (f"it is inside {inside[0]!r} ({type(modules[inside[0]]).__name__}), which fx keeps as one op; "
               f"cut at {inside[0]!r} instead" if inside else "it is never called in forward")
        raise ModelSpecError(f"cannot cut at {name!r}: {why}")
    value, last = traced.returned[name]
    if not isinstance(value, fx.Proxy) or not traced.batched(value.node):
        shape = traced.seen.get(value.node) if isinstance(value, fx.Proxy) else None
        got = (f"a {type(value).__name__}" if not isinstance(value, fx.Proxy) else
               "a non-tensor value" if shape is None else f"a tensor of shape {shape[0]} without a batch axis 0")
        raise ModelSpecError(f"cannot cut at {name!r}: it returns {got}; an exit reads one tensor with the batch "
                             "on axis 0. Cut at a layer inside it or after it.")
    position = traced.position[last]
    if traced.position[traced.output] <= position:
        raise ModelSpecError(f"cannot cut at {name!r}: nothing is computed after it (the model's output is ready by "
                             "then); the last exit is the model's own output, cut at an earlier layer")
    return value.node, position


def _carries(traced: _Traced, names: Sequence[str], cuts: Sequence[tuple[fx.Node, int]]) -> list[list[fx.Node]]:
    """What each stage but the last hands on: its cut's output first, then every value made up
    to its cut that a later stage reads (recomputable values resolved to what they read)."""
    bounds = [p for _, p in cuts]
    starts = [0, *(p + 1 for p in bounds)]
    stage_of = {n: sum(traced.position[n] > p for p in bounds) for n in traced.nodes}
    wanted: list[set[fx.Node]] = [set() for _ in cuts]   # wanted[k]: made by cut k, read after it

    def need(node: fx.Node, reader: int) -> None:
        if traced.position[node] >= starts[reader]:
            return
        if traced.recomputed(node):
            for a in node.all_input_nodes:
                need(a, reader)
            return
        for k in range(stage_of[node], reader):
            wanted[k].add(node)

    for n in traced.nodes:
        for a in n.all_input_nodes:
            need(a, stage_of[n])
    need(traced.output, len(cuts))   # the last stage returns the model's output
    for k, (cut, _) in enumerate(cuts):
        need(cut, k)                 # stage k hands its cut's output to its exit
    carries = []
    for k, (cut, _) in enumerate(cuts):
        rest = sorted(wanted[k] - {cut}, key=traced.position.__getitem__)
        for n in rest:
            if not traced.batched(n):
                seen = traced.seen.get(n)
                raise ModelSpecError(
                    f"cannot cut at {names[k]!r}: the value {n.name!r} (shape {seen[0] if seen else '?'}), made "
                    "before the cut and read after it, has no batch axis 0 (it mixes the samples of a batch), so it "
                    "cannot be carried per sample; cut before it is made or after it is last read"
                )
        carries.append([cut, *rest])
    return carries


def _stage(traced: _Traced, owned: Sequence[fx.Node], reads: Sequence[fx.Node], gives: Sequence[fx.Node] | fx.Node,
           k: int) -> fx.GraphModule:
    """The GraphModule of one stage: ``reads`` in, ``owned`` nodes run, ``gives`` out."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in reads:
        env[n] = graph.placeholder(n.name)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:   # made before this stage and recomputed here (carried values are in env)
            if not traced.recomputed(a):
                raise AssertionError(f"stage {k} reads {a.name}, which is neither carried nor recomputable")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in owned:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lookup)
    graph.output(lookup(gives) if isinstance(gives, fx.Node) else tuple(lookup(g) for g in gives))
    graph.lint()
    return fx.GraphModule(traced.model, graph, class_name=f"Stage{k}")


# --- heads ------------------------------------------------------------------------------------


def _auto_head(name: str, shape: tuple[int, ...], dtype: torch.dtype, classes: int, token: str) -> nn.Module:
    if not dtype.is_floating_point:
        raise ModelSpecError(f"the output of {name!r} has dtype {dtype}; an automatic head needs a floating point "
                             "feature; pass heads={...} with your own head for it")
    if len(shape) == 4:
        head: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[1], classes))
    elif len(shape) == 3:
        head = nn.Sequential(TokenPool(token), nn.Linear(shape[2], classes))
    elif len(shape) == 2:
        head = nn.Linear(shape[1], classes)
    else:
        raise ModelSpecError(f"the output of {name!r} has shape {shape}; automatic heads handle (B, C, H, W) feature "
                             "maps, (B, T, D) tokens and (B, D) vectors; pass heads={name: module} for this one")
    return head.to(dtype=dtype)


def _heads(traced: _Traced, names: Sequence[str], cuts: Sequence[tuple[fx.Node, int]],
           heads: str | Mapping[str, nn.Module], classes: int, token: str) -> list[nn.Module]:
    if isinstance(heads, str):
        if heads != "auto":
            raise ModelSpecError(f"heads={heads!r}: pass 'auto' or a dict {{layer: head module}}")
        out = []
        for name, (node, _) in zip(names, cuts):
            shape, dtype = traced.seen[node]  # type: ignore[misc]   # a cut's value is a tensor
            out.append(_auto_head(name, shape, dtype, classes, token).to(traced.example[0].device))
        return out
    if not isinstance(heads, Mapping):
        raise ModelSpecError(f"heads must be 'auto' or a dict {{layer: head module}}, got {type(heads).__name__}")
    missing = [n for n in names if n not in heads]
    extra = [n for n in heads if n not in names]
    if missing or extra:
        raise ModelSpecError(f"heads must name every cut and nothing else: missing {missing}, not cut {extra}")
    for name in names:
        if not isinstance(heads[name], nn.Module):
            raise ModelSpecError(f"the head for {name!r} must be a torch.nn.Module, got {type(heads[name]).__name__}")
    return [heads[n] for n in names]


def _check_exits(model: EarlyExitModel, traced: _Traced, names: Sequence[str], classes: int) -> None:
    """Every exit answers (batch, classes) on the example."""
    with _eval_mode(model), torch.no_grad():
        carry: Any = traced.example
        for k, stage in enumerate(model.stages):
            carry = stage(*carry)
            carry = carry if isinstance(carry, tuple) else (carry,)
            if k == len(names):
                break
            head = model.exit_at(k)
            assert head is not None
            try:
                logits = head(*carry)
            except Exception as exc:
                raise ModelSpecError(f"the head for {names[k]!r} fails on its input of shape "
                                     f"{tuple(carry[0].shape)}: {exc}") from None
            if not isinstance(logits, Tensor) or tuple(logits.shape) != (traced.batch, classes):
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ModelSpecError(f"the head for {names[k]!r} returns {got} on an input of shape "
                                     f"{tuple(carry[0].shape)}; it must return (batch, classes) = "
                                     f"{(traced.batch, classes)}")


# --- the API ----------------------------------------------------------------------------------


def attach_exits(
    model: nn.Module,
    at: Sequence[str],
    *,
    example_inputs: Mapping[str, Tensor] | tuple[Tensor, ...],
    heads: str | Mapping[str, nn.Module] = "auto",
    classes: int | None = None,
    token: str = "mean",
) -> EarlyExitModel:
    """Cut an unmodified network after the named layers and put an exit head at each cut.

    The model is traced, not changed: the stages call its own submodules (parameters shared,
    so training the backbone later changes what exports, and a stage's train/eval mode is the
    model's), and the final exit is the model's own output, bit for bit.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace and that returns its logits as one
            (batch, classes) tensor (wrap a model that returns a dict or tuple).
        at: layer names as ``model.named_modules()`` gives them (``"layer2"``, ``"features.3"``,
            ``"blocks.5"``); the cut goes right after the layer's (last) call.  Sorted into
            execution order; each at most once.
        example_inputs: one example batch per input of ``forward``: ``{name: tensor}`` (names as
            ``forward``'s parameters, or any names given in its order) or a tuple.  Used for a dry
            run that sizes the heads; the same dict serves ``export_package``.
        heads: ``"auto"`` (a (B, C, H, W) map: average pool + Linear; (B, T, D) tokens: pool
            the tokens, see ``token``, + Linear; (B, D): Linear), or ``{layer: module}`` with one
            head per cut, each mapping that layer's output to (batch, classes).
        classes: the heads' output width; default the model's output width.
        token: how an automatic head pools tokens: ``"mean"``, or ``"first"`` for a class token.

    Returns:
        An ``EarlyExitModel`` with one stage per cut plus the rest of the network; exit k is
        the head on cut k's layer output, the last exit is the model's output.

    Raises:
        ModelSpecError: a layer that does not exist (the nearest names listed), that cannot be
            cut (why is said), a model fx cannot trace, or heads that do not fit.

    Example:
        >>> exits = attach_exits(resnet, ["layer1", "layer2", "layer3"],
        ...                      example_inputs={"image": x})              # doctest: +SKIP
        >>> export_package(exits, {"image": x}, "resnet.eexit")            # doctest: +SKIP
    """
    if isinstance(at, str) or not isinstance(at, Sequence) or not at or not all(isinstance(a, str) for a in at):
        raise ModelSpecError(f"at must be a non-empty list of layer names, got {at!r}")
    repeated = sorted({a for a in at if list(at).count(a) > 1})
    if repeated:
        raise ModelSpecError(f"at names {repeated} more than once; cut after each layer once")
    if token not in TOKEN_POOLING:
        raise ModelSpecError(f"token={token!r} is not one of {', '.join(TOKEN_POOLING)}")
    traced = _trace(model, example_inputs)
    found = sorted(((name, *_cut_node(traced, name)) for name in at), key=lambda c: (c[2], at.index(c[0])))
    for (a, _, pa), (b, _, pb) in itertools.pairwise(found):
        if pa == pb:
            raise ModelSpecError(f"cuts at {a!r} and {b!r} fall at the same point of the graph (one ends where the "
                                 "other does); keep one of them")
    names = [name for name, _, _ in found]
    cuts = [(node, position) for _, node, position in found]
    width = traced.seen[traced.output][0][1]  # type: ignore[index]   # checked by _trace
    if classes is None:
        classes = width
    elif isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ModelSpecError(f"classes must be a positive integer, got {classes!r}")
    elif classes != width:
        raise ModelSpecError(f"classes={classes}, but the model's output has {width} classes; the final exit is the "
                             "model's output, so every exit answers that many")
    carries = _carries(traced, names, cuts)
    bounds = [-1, *(p for _, p in cuts), len(traced.nodes) - 1]
    stages = []
    for k in range(len(cuts) + 1):
        owned = traced.nodes[bounds[k] + 1: bounds[k + 1] + 1]
        reads = traced.inputs if k == 0 else carries[k - 1]
        gives: Sequence[fx.Node] | fx.Node = carries[k] if k < len(cuts) else traced.output
        stages.append(_stage(traced, owned, reads, gives, k))
    head_modules = _heads(traced, names, cuts, heads, classes, token)
    exits = [_ExitOnFirst(h) for h in head_modules] + [_ExitOnFirst(nn.Identity())]
    result = EarlyExitModel(stages=stages, exits=exits)
    _check_exits(result, traced, names, classes)
    shared = set(model.modules())
    for m in result.modules():   # the new modules take the model's mode; the model's own keep theirs
        if m not in shared:
            m.training = model.training
    return result


def cuttable_layers(model: nn.Module, example_inputs: Mapping[str, Tensor] | tuple[Tensor, ...]) -> list[CutPoint]:
    """Every layer ``attach_exits`` can cut after, in execution order (for a dry run).

    Example:
        >>> for cut in cuttable_layers(resnet, {"image": x}):                # doctest: +SKIP
        ...     print(cut.order, cut.name, cut.kind, cut.shape, cut.carried)
    """
    traced = _trace(model, example_inputs)
    modules = dict(model.named_modules())
    points = []
    for name in traced.returned:
        if not name:
            continue
        try:
            node, position = _cut_node(traced, name)
            carried = len(_carries(traced, [name], [(node, position)])[0])
        except ModelSpecError:
            continue
        shape, dtype = traced.seen[node]  # type: ignore[misc]   # a cut's value is a tensor
        points.append(CutPoint(name, type(modules[name]).__name__, shape, str(dtype).removeprefix("torch."),
                               position, carried))
    return sorted(points, key=lambda p: (p.order, p.name.count("."), p.name))
