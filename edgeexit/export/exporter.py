"""Export an ``EarlyExitModel`` to an exit package: one ONNX graph per stage, checked twice.

Every stage graph is checked with ``onnx.checker`` (full check) and then run in
onnxruntime against torch on fresh inputs of two batch sizes; one line per output
reports the largest difference, and a single ``ExportValidationError`` lists every
output above tolerance.  Nothing is written to ``path`` until all of that passed.

Why one file of ~620 lines: it is one loop over the stages (trace, export, check, compare,
write) whose steps share the traced carries; the model contract is in ``model.py`` and the
cost estimates in ``_costs.py``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .. import __version__
from .. import _leftovers as leftovers
from ..errors import CompileError, ExportError, ExportValidationError, ModelSpecError
from ..package import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    SIGNALS_VERSION,
    TEXT_VERSION,
    Package,
    check_replaceable,
    load_package,
    read_manifest,
    write_package,
)
from ..policies import check_thresholds, get_policy
from ._costs import FlopCounter, count_parameters
from .compile import compile_blocker, compile_package
from .model import EarlyExitModel, as_tuple

DEFAULT_OPSET = 18
VALIDATION_BATCHES = (3, 5)
TOKENIZER_FILE = "tokenizer.json"
# how far each named dynamic axis grows to find the axes that follow it: distinct primes, so
# an axis that follows a named one at another rate (stride 2, twice the tokens) is not credited
# to the wrong name or taken for fixed; the validation then runs at both lengths
_GROWTH = (7, 11, 13, 17, 19, 23)


@dataclass(frozen=True)
class _Graph:
    """One graph to export: a module, its input/output names and example arguments."""

    name: str
    file: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple[torch.Tensor, ...]


class _StageGraph(nn.Module):
    def __init__(self, stage: nn.Module, head: nn.Module | None, emit_carry: bool) -> None:
        super().__init__()
        self.stage, self.head, self.emit_carry = stage, head, emit_carry

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        carry = as_tuple(self.stage(*args))
        outs = list(carry) if self.emit_carry else []
        if self.head is not None:
            outs.extend(_exit_outputs(self.head(*carry)))
        return tuple(outs)


def _exit_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """An exit head's result as (logits, *signals)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _FullGraph(nn.Module):
    """The model without early exits: the stages the final exit depends on, then the final exit."""

    def __init__(self, model: EarlyExitModel) -> None:
        super().__init__()
        self.model = model
        path, k = [], model.num_stages - 1
        while True:
            path.append(k)
            source = model.reads[k]
            if source == "inputs":
                break
            k = source  # type: ignore[assignment]
        self.path = path[::-1]
        head = model.exit_at(model.num_stages - 1)
        assert head is not None  # EarlyExitModel guarantees the final exit
        self.head: nn.Module = head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        carries: list[tuple[torch.Tensor, ...]] = [()] * self.model.num_stages
        for k in self.path:
            carries[k] = as_tuple(self.model.stages[k](*self.model.stage_args(k, inputs, carries)))
        return _exit_outputs(self.head(*carries[-1]))[0]


def _carry_name(stage: int, i: int) -> str:
    return f"carry{stage}_{i}"


def _logits_name(stage: int) -> str:
    return f"logits{stage}"


def _exit_names(stage: int, signals: Sequence[str]) -> list[str]:
    """The graph outputs of stage ``stage``'s exit: its logits, then each signal."""
    return [_logits_name(stage), *(f"{signal}{stage}" for signal in signals)]


def _check_exit_outputs(out: Any, signals: Sequence[str], stage: int) -> None:
    outs = _exit_outputs(out)
    if len(outs) != 1 + len(signals) or not all(isinstance(t, torch.Tensor) for t in outs):
        wanted = (f"the tuple (logits, {', '.join(signals)}), as the model's signals say" if signals else
                  "its logits (build the model with EarlyExitModel(signals=...) for heads that return signals too)")
        raise ModelSpecError(f"the exit of stage {stage} returned {len(outs)} value(s); an exit returns {wanted}")
    for name, t in zip(signals, outs[1:]):
        if t.dim() != 2 or t.shape[1] != 1 or not t.is_floating_point():
            raise ModelSpecError(f"signal {name!r} of the exit of stage {stage} has shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype}; a signal is a float tensor of shape (batch, 1)")


def _dtype_name(t: torch.Tensor) -> str:
    """numpy's name for a tensor's dtype (torch.float32 -> "float32"; same spelling for bfloat16)."""
    return str(t.dtype).removeprefix("torch.")


def _check_inputs(example_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ModelSpecError("example_inputs must be a non-empty dict {input_name: tensor}")
    out = {}
    for name, t in example_inputs.items():
        if not isinstance(t, torch.Tensor):
            raise ModelSpecError(f"example input {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if _dtype_name(t) not in DTYPES:
            raise ModelSpecError(
                f"example input {name!r} has dtype {t.dtype}; exit packages support {', '.join(DTYPES)}"
            )
        if t.dim() == 0 or t.shape[0] < 2:
            raise ModelSpecError(
                f"example input {name!r} has shape {tuple(t.shape)}; give a batch of at least 2 samples "
                "on axis 0 so the exported batch axis stays dynamic"
            )
        out[name] = t.detach()
    return out


def _symbolic_shape(t: torch.Tensor, axes: Mapping[int, str]) -> list[int | str]:
    return ["batch", *(axes.get(i, d) for i, d in enumerate(t.shape[1:], 1))]


def _check_text(text: Mapping[str, Any] | None, examples: Mapping[str, torch.Tensor],
                axes: Mapping[str, Mapping[int, str]]) -> tuple[dict[str, Any] | None, Path | None]:
    """The manifest's ``text`` object and the tokenizer file to copy in, checked (the tokenizer
    is loaded and tried on a text here, not on a device)."""
    if not text:
        return None, None
    tokenizer = Path(text.get("tokenizer", ""))
    if not tokenizer.is_file():
        raise ModelSpecError(f"text['tokenizer'] must be a tokenizers JSON file; {tokenizer} is not a file")
    numbers = {key: text.get(key, default) for key, default in (("max_tokens", 0), ("pad_id", 0))}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "max_tokens" else 0):
            raise ModelSpecError(f"text[{key!r}] must be a {'positive' if key == 'max_tokens' else 'non-negative'} "
                                 f"integer, got {value!r}")
    entry: dict[str, Any] = {"tokenizer": TOKENIZER_FILE, "ids": text.get("ids"), "mask": text.get("mask"),
                             **numbers}
    if entry["mask"] is not None and entry["mask"] == entry["ids"]:
        raise ModelSpecError("text['mask'] must name another input than text['ids'] (or be None)")
    for key in ("ids", "mask"):
        name = entry[key]
        if (name is not None or key == "ids") and (name not in examples or examples[name].dtype not in
                                                   (torch.int64, torch.int32) or examples[name].dim() != 2):
            raise ModelSpecError(f"text[{key!r}] must name a 2-D integer input ({list(examples)}), got {name!r}")
    for key in ("ids", "mask"):
        if entry[key] is not None and 1 not in axes.get(entry[key], {}):
            raise ModelSpecError(f"text[{key!r}] input {entry[key]!r} needs a dynamic token axis: a tokenizer pads a "
                                 "batch to its longest text. Pass dynamic_axes={"
                                 + repr(entry[key]) + ": {1: 'tokens'}}")
    from ..runtime._text import encode_batch, load_tokenizer_bytes

    try:
        encode_batch(load_tokenizer_bytes(tokenizer.read_bytes(), entry["max_tokens"]), ["a test"], entry["pad_id"])
    except Exception as exc:
        raise ModelSpecError(f"text['tokenizer'] {tokenizer} does not tokenize a test text: {exc}") from None
    return entry, tokenizer


def _check_dynamic_axes(dynamic_axes: Mapping[str, Mapping[int, str]] | None, examples: Mapping[str, torch.Tensor],
                        dynamo: bool) -> dict[str, dict[int, str]]:
    """The named dynamic axes of the model inputs, checked against the examples."""
    if not dynamic_axes:
        return {}
    if dynamo:
        raise ModelSpecError("dynamic_axes works with the TorchScript exporter (dynamo=False); the dynamo "
                             "exporter keeps only the batch axis dynamic here")
    out: dict[str, dict[int, str]] = {}
    for name, axes in dynamic_axes.items():
        if name not in examples:
            raise ModelSpecError(f"dynamic_axes names {name!r}, which is not an input; inputs: {list(examples)}")
        t = examples[name]
        for axis, label in axes.items():
            if not isinstance(axis, int) or not 1 <= axis < t.dim():
                raise ModelSpecError(f"dynamic_axes[{name!r}]: axis {axis!r} must be from 1 to {t.dim() - 1} (axis 0 "
                                     "is the batch, always dynamic)")
            if not isinstance(label, str) or not label.isidentifier() or label == "batch":
                raise ModelSpecError(f"dynamic_axes[{name!r}][{axis}]: name an axis with an identifier other than "
                                     f"'batch', got {label!r}")
        out[name] = dict(axes)
    if len({label for a in out.values() for label in a.values()}) > len(_GROWTH):
        raise ModelSpecError(f"dynamic_axes names more than {len(_GROWTH)} distinct axes; share names between inputs")
    return out


def _grown(examples: Mapping[str, torch.Tensor], axes: Mapping[str, Mapping[int, str]]) -> dict[str, torch.Tensor]:
    """The examples with every named dynamic axis longer: the k-th distinct name by _GROWTH[k]
    positions (the last position repeated), so each axis a carry inherits can be told apart."""
    labels = sorted({label for a in axes.values() for label in a.values()})
    grow = {label: _GROWTH[k] for k, label in enumerate(labels)}
    out = {}
    for name, t in examples.items():
        for axis, label in axes.get(name, {}).items():
            last = t.narrow(axis, t.shape[axis] - 1, 1)
            t = torch.cat([t, *([last] * grow[label])], dim=axis)
        out[name] = t
    return out


def _inherited_axes(small: Sequence[torch.Tensor], large: Sequence[torch.Tensor], names: Sequence[str],
                    axes: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, str]]:
    """Which axes of the outputs ``names`` follow a named input axis (their size changed with it)."""
    labels = sorted({label for a in axes.values() for label in a.values()})
    by_growth = {_GROWTH[k]: label for k, label in enumerate(labels)}
    found: dict[str, dict[int, str]] = {}
    for name, a, b in zip(names, small, large):
        for axis in range(1, min(a.dim(), b.dim())):
            change = b.shape[axis] - a.shape[axis]
            if change:
                if change not in by_growth:
                    raise ModelSpecError(f"output {name!r} axis {axis} changes by {change} when the dynamic input "
                                         "axes grow; an axis must follow exactly one named input axis")
                found.setdefault(name, {})[axis] = by_growth[change]
    return found


def _fresh_like(t: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    shape = (batch, *t.shape[1:])
    if t.is_floating_point():
        scale = float(t.float().std()) or 1.0
        centre = float(t.float().mean())
        return (torch.randn(shape, generator=gen) * scale + centre).to(t.dtype)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    low, high = int(t.min()), int(t.max())
    return torch.randint(low, high + 1, shape, generator=gen, dtype=t.dtype)


def _export_graph(graph: _Graph, folder: Path, opset: int, dynamo: bool,
                  axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """``axes``: named dynamic axes besides the batch, per input/output name (TorchScript exporter)."""
    axes = axes or {}
    path = folder / graph.file
    if dynamo:
        # forward(*args): one varargs entry holding a spec per input; one shared batch dim
        batch = torch.export.Dim("batch")
        shape_args: dict[str, Any] = {"dynamic_shapes": (tuple({0: batch} for _ in graph.example),),
                                      "verbose": False}
    else:
        shape_args = {"dynamic_axes": {n: {0: "batch", **axes.get(n, {})}
                                       for n in graph.input_names + graph.output_names}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                graph.module, graph.example, str(path), input_names=graph.input_names,
                output_names=graph.output_names, opset_version=opset, dynamo=dynamo,
                do_constant_folding=True, external_data=False,
                **shape_args,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {graph.name}: {exc}") from exc
    _restore_dropped_inputs(path, graph, axes)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker refused the graph of {graph.name}: {exc}") from exc
    return path


def _restore_dropped_inputs(path: Path, graph: _Graph, axes: Mapping[str, Mapping[int, str]]) -> None:
    """Put back graph inputs the exporter pruned because nothing reads them (a skip tensor only
    some stages use): the manifest and the runtime feed every declared input, in order."""
    model = onnx.load(str(path))
    present = {i.name: i for i in model.graph.input}
    if all(name in present for name in graph.input_names):
        return
    rebuilt = []
    for name, example in zip(graph.input_names, graph.example):
        if name in present:
            rebuilt.append(present[name])
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(_dtype_name(example)))
        rebuilt.append(onnx.helper.make_tensor_value_info(name, elem, _symbolic_shape(example, axes.get(name, {}))))
    extra = [i for n, i in present.items() if n not in graph.input_names]   # initializers listed as inputs
    del model.graph.input[:]
    model.graph.input.extend(rebuilt + extra)
    onnx.save_model(model, str(path))


def _call(module: nn.Module, args: Sequence[torch.Tensor], what: str) -> Any:
    """``module(*args)``, with a forward that does not take the carry the documented way explained."""
    try:
        return module(*args)
    except TypeError as exc:
        if "positional argument" not in str(exc) and "takes" not in str(exc):
            raise
        raise ModelSpecError(
            f"{what} ({type(module).__name__}) cannot be called with the {len(args)} tensor(s) it receives: {exc}. "
            "A stage receives the previous carry unpacked, one positional argument per tensor (a tuple carry "
            "(a, b) arrives as forward(self, a, b)); the model inputs for stage 0, in example_inputs order; an exit "
            "receives its stage's carry the same way. Write forward(self, a, b) (or forward(self, *carry))."
        ) from None


def _validate(
    graphs: Sequence[_Graph], paths: Sequence[Path], make_args: Callable[[int], list[tuple[torch.Tensor, ...]]],
    atol: float, rtol: float, log: Callable[[str], None],
) -> None:
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]
    worst: dict[tuple[str, str], tuple[float, float]] = {}
    for batch in VALIDATION_BATCHES:
        per_graph_args = make_args(batch)
        for graph, session, args in zip(graphs, sessions, per_graph_args):
            with torch.no_grad():
                expected = graph.module(*args)
            expected = expected if isinstance(expected, tuple) else (expected,)
            feeds = {n: a.numpy() for n, a in zip(graph.input_names, args)}
            got = session.run(graph.output_names, feeds)
            for name, ref, out in zip(graph.output_names, expected, got):
                ref_np = ref.numpy()
                if out.shape != ref_np.shape:
                    diff = float("inf")
                else:
                    diff = float(np.max(np.abs(out.astype(np.float64) - ref_np))) if out.size else 0.0
                bound = atol + rtol * float(np.max(np.abs(ref_np))) if ref_np.size else atol
                key = (graph.name, name)
                prev = worst.get(key, (0.0, bound))
                worst[key] = (max(prev[0], diff), max(prev[1], bound))
    failures = []
    for (gname, oname), (diff, bound) in worst.items():
        ok = diff <= bound
        log(f"  {gname:<10} {oname:<14} max |onnxruntime - torch| = {diff:.2e}  (tolerance {bound:.1e})  "
            f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{gname}/{oname}: {diff:.3e} > {bound:.1e}")
    if failures:
        raise ExportValidationError(
            f"onnxruntime differs from torch beyond tolerance on batches {VALIDATION_BATCHES} for "
            f"{len(failures)} output(s): {'; '.join(failures)}. Check for ops that behave differently in "
            "eval mode, or raise atol/rtol if the difference is expected."
        )


def _compiled_in(folder: Path, manifest: dict[str, Any], files: dict[str, Path], *, required: bool, final: Path,
                 say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The manifest and files with ``compiled.onnx`` added, built in a staging package."""
    staging = write_package(folder / "staging.eexit", manifest, files)
    blocker = compile_blocker(load_package(staging))
    try:
        if blocker is not None:
            raise CompileError(f"cannot compile this model: {blocker}")
        compile_package(staging, log=lambda line: say(line.replace(str(staging.resolve()), str(final))))
    except CompileError as exc:
        if required:
            raise
        say(f"not compiled ({exc}); the package runs with the stage loop")
        return manifest, files
    _, compiled = read_manifest(staging)
    return compiled, {name: staging / name for name in compiled.pop("files")}


def export_package(
    model: EarlyExitModel,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    policy: str = "entropy",
    thresholds: Sequence[float | None] | None = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    include_full_model: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    preprocessing: Mapping[str, Any] | None = None,
    seed: int = 0,
    compile: bool | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    text: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> Package:
    """Export ``model`` as an exit package at ``path`` and return the loaded package.

    Args:
        model: the stages and exits.
        example_inputs: ``{name: tensor}`` with a batch of >= 2 on axis 0; names become the
            package's input names.
        path: the package directory to write.  Something already there is an ``OutputError``
            (before any work), unless it is an exit package and ``overwrite`` is True: that one
            is replaced atomically, once everything succeeded.
        policy: a registered exit policy used at every exit.
        thresholds: one per early exit (every exit but the last); None for an exit, or no
            thresholds at all, leaves it disabled until ``edgeexit calibrate`` chooses one
            (format version 4: the package then runs as the full model).
        labels: class names, optional.
        include_full_model: also write ``full.onnx``, the model without early exits, as a
            baseline for benchmarks.
        dynamo: passed to ``torch.onnx.export``; the TorchScript exporter (False) is the
            default because it is fast and exact for these models.
        atol, rtol: validation tolerance per output: ``atol + rtol * max|torch|``.
        compile: add ``compiled.onnx`` (the whole model as one graph deciding its exits
            in-graph; see ``edgeexit.export.compile``).  None (default): when every exit
            policy has an in-graph form; True: always (a ``CompileError`` if it cannot);
            False: never.
        dynamic_axes: input axes that vary per call besides the batch, e.g.
            ``{"input_ids": {1: "tokens"}}`` for text (TorchScript exporter only).  Carries and
            outputs whose axes follow them are found by running the model at two lengths, and
            validation runs at both.
        text: for token-id inputs, the tokenizer to ship in the package (format version 7):
            ``{"tokenizer": PATH_TO_TOKENIZER_JSON, "ids": INPUT, "mask": INPUT or None,
            "max_tokens": N, "pad_id": 0}``; ``ExitSession.tokenize`` and ``edgeexit run`` on a
            text file then use it (wherever the ``tokenizers`` package is installed).
        overwrite: replace an exit package at ``path``.  Anything else there (a file, a
            folder that is not an exit package) is never replaced.
        log: where the validation lines go (None: silent).

    Example:
        >>> export_package(model, {"image": x}, "lenet.eexit",
        ...                policy="entropy", thresholds=[0.05])        # doctest: +SKIP
    """
    if not isinstance(model, EarlyExitModel):
        raise ModelSpecError(f"model must be an EarlyExitModel, got {type(model).__name__}")
    check_replaceable(path, overwrite=overwrite)   # before any work: never replaces what is not ours
    examples = _check_inputs(example_inputs)
    axes = _check_dynamic_axes(dynamic_axes, examples, dynamo)
    pol = get_policy(policy)
    signals = getattr(model, "signals", ())   # a model pickled before signals existed has none
    if pol.reads != "logits" and pol.reads not in signals:
        raise ModelSpecError(f"policy {pol.name!r} scores the exits' {pol.reads!r} signal, but the model's exits "
                             f"return {'the signals ' + str(list(signals)) if signals else 'only logits'}; "
                             f"build it with EarlyExitModel(..., signals=[{pol.reads!r}]) and heads that return it")
    if thresholds is None:
        thresholds = [None] * (model.num_exits - 1)
    values = check_thresholds(pol, thresholds, model.num_exits - 1, allow_disabled=True)
    say = log or (lambda _line: None)
    was_training = model.training
    model.eval()
    try:
        manifest_text, tokenizer = _check_text(text, examples, axes)
        return _export(model, examples, path, pol.name, values, labels, name, include_full_model, opset, dynamo,
                       atol, rtol, preprocessing, seed, compile, say, axes, manifest_text, tokenizer, overwrite)
    finally:
        model.train(was_training)


def _export(
    model: EarlyExitModel, examples: dict[str, torch.Tensor], path: str | os.PathLike[str], policy: str,
    values: list[float | None], labels: Sequence[str] | None, name: str | None, include_full_model: bool, opset: int,
    dynamo: bool, atol: float, rtol: float, preprocessing: Mapping[str, Any] | None, seed: int,
    compile: bool | None, say: Callable[[str], None], axes: dict[str, dict[int, str]],
    text: dict[str, Any] | None = None, tokenizer: Path | None = None, overwrite: bool = False,
) -> Package:

    input_names = list(examples)
    signals: tuple[str, ...] = tuple(getattr(model, "signals", ()))
    graphs: list[_Graph] = []
    stage_specs: list[dict[str, Any]] = []
    read_later = set(model.reads)
    inputs_t = tuple(examples.values())
    with torch.no_grad():
        carries: list[tuple[torch.Tensor, ...]] = []
        carry_names: list[list[str]] = []
        early = iter(values)
        for k, stage in enumerate(model.stages):
            last = k == model.num_stages - 1
            head = model.exit_at(k)
            args = model.stage_args(k, inputs_t, carries)
            source = model.reads[k]
            reads = input_names if source == "inputs" else carry_names[source]  # type: ignore[index]
            with FlopCounter([stage]) as stage_flops:
                one = as_tuple(_call(stage, [t[:1] for t in args], f"stage {k}"))
            exit_flops = 0
            if head is not None:
                with FlopCounter([head]) as counter:
                    _check_exit_outputs(_call(head, one, f"the exit of stage {k}"), signals, k)
                exit_flops = counter.total
            carries.append(as_tuple(stage(*args)))
            emit = k in read_later
            carry_names.append([_carry_name(k, i) for i in range(len(carries[k]))] if emit else [])
            outputs = carry_names[k] + (_exit_names(k, signals) if head is not None else [])
            graphs.append(_Graph(f"stage{k}", f"stage{k}.onnx", _StageGraph(stage, head, emit).eval(),
                                 list(reads), outputs, args))
            stage_specs.append({
                "name": f"stage{k}",
                "file": f"stage{k}.onnx",
                "inputs": list(reads),
                "carry": carry_names[k],
                "exit": None if head is None else {
                    "logits": _logits_name(k),
                    "policy": policy,
                    "threshold": None if last else next(early),
                    **({"signals": dict(zip(signals, _exit_names(k, signals)[1:]))}
                       if signals else {}),
                },
                "cost": {
                    "params": count_parameters([stage] + ([head] if head is not None else [])),
                    "flops": stage_flops.total + exit_flops,
                    "exit_flops": exit_flops,
                },
            })

    grown = _grown(examples, axes) if axes else examples
    if axes:     # which carry and output axes follow the named input axes
        with torch.no_grad():
            big: list[tuple[torch.Tensor, ...]] = []
            for k, stage in enumerate(model.stages):
                big.append(as_tuple(stage(*model.stage_args(k, tuple(grown.values()), big))))
                for small, large, spec in ((carries[k], big[k], stage_specs[k]),):
                    axes.update(_inherited_axes(small, large, spec["carry"], axes))
                    head = model.exit_at(k)
                    if head is not None:
                        axes.update(_inherited_axes(_exit_outputs(head(*small)), _exit_outputs(head(*large)),
                                                    _exit_names(k, signals), axes))
    full_spec = None
    if include_full_model:
        full = _FullGraph(model).eval()
        path_stages = full.path
        graphs.append(_Graph("full", "full.onnx", full, input_names, ["logits"], inputs_t))
        full_spec = {
            "file": "full.onnx", "inputs": input_names, "logits": "logits",
            "cost": {
                "params": count_parameters([*(model.stages[k] for k in path_stages), full.head]),
                "flops": sum(stage_specs[k]["cost"]["flops"] - stage_specs[k]["cost"]["exit_flops"]
                             for k in path_stages) + stage_specs[-1]["cost"]["exit_flops"],
            },
        }

    def validation_args(batch: int) -> list[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(seed + batch)
        lengths = examples if batch == VALIDATION_BATCHES[0] else grown   # named axes: validated at two lengths
        fresh = tuple(_fresh_like(t, batch, gen) for t in lengths.values())
        per_graph = []
        with torch.no_grad():
            done: list[tuple[torch.Tensor, ...]] = []
            for k, stage in enumerate(model.stages):
                args = model.stage_args(k, fresh, done)
                per_graph.append(args)
                done.append(as_tuple(stage(*args)))
        if include_full_model:
            per_graph.append(fresh)
        return per_graph

    labels_list = [str(v) for v in labels] if labels is not None else None
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        # a stage that reads something other than the previous stage's carry makes a pipeline
        "kind": "classifier" if model.reads == ["inputs", *range(model.num_stages - 1)] else "pipeline",
        "name": name or type(model).__name__,
        "inputs": [
            {"name": n, "dtype": _dtype_name(t), "shape": _symbolic_shape(t, axes.get(n, {}))}
            for n, t in examples.items()
        ],
        "labels": labels_list,
        "stages": stage_specs,
        "full_model": full_spec,
        "preprocessing": dict(preprocessing) if preprocessing else None,
        **({"text": text} if text else {}),
        "producer": {
            "edgeexit": __version__, "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "opset": opset, "exporter": "dynamo" if dynamo else "torchscript",
        },
    }

    leftovers.collect_work_dirs("export")   # work folders of exports that were killed
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-export-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        say(f"exporting {len(graphs)} graph(s) (opset {opset}, dynamo={dynamo})")
        if include_full_model and full_spec is not None:
            axes["logits"] = axes.get(stage_specs[-1]["exit"]["logits"], {})
        paths = [_export_graph(g, folder, opset, dynamo, axes) for g in graphs]
        say(f"validating onnxruntime against torch on batches {VALIDATION_BATCHES}:")
        _validate(graphs, paths, validation_args, atol, rtol, say)
        files = {g.file: p for g, p in zip(graphs, paths)}
        if text and tokenizer is not None:
            files[text["tokenizer"]] = tokenizer
            manifest["format_version"] = max(manifest["format_version"], TEXT_VERSION)
        if signals:
            manifest["format_version"] = max(manifest["format_version"], SIGNALS_VERSION)
        if compile is not False:
            manifest, files = _compiled_in(folder, manifest, files, required=bool(compile), final=Path(path), say=say)
        write_package(path, manifest, files, overwrite=overwrite)
    say(f"wrote {path}")
    return load_package(path)
