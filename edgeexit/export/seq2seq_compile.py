"""In-graph exits for a seq2seq package: the encoder in one graph that decides its exits itself.

At batch 1 the per-layer graphs cost one ``session.run`` per layer per modality, and the
Python between those calls (the cosine, the bookkeeping) costs about as much as a small
layer.  This module splices the package's per-layer encoder graphs into one graph per exit
mode, built the way ``edgeexit.export.compile`` builds a classifier's compiled exits::

    image, question, thresholds -> layer 0 -> cosine(out, in) > threshold ?
        If(any row left): gather the rows left -> layer 1 -> ... -> ScatterND back
        else:             the memory from layer 0, 1 layer run

- ``encoder_exits.onnx``: each modality on its own chain (MuE's modality decomposition);
  ``thresholds`` (float64, one per modality) in the manifest's modality order;
- ``encoder_exits_joint.onnx``: the modalities run each layer together and leave together on
  one similarity over all their tokens (MuE's ablation); ``thresholds`` holds one value.

Outputs: ``memory`` (batch, memory, width), the encoder norm of every modality's last hidden
state joined along the tokens, and ``{modality}_layers`` (int64, batch).  The similarity is
computed in float64 over the flattened (tokens, width) of each sample with padding left out,
as ``edgeexit.runtime.seq2seq.cosine`` does; a disabled exit is fed a threshold of 2, which
no cosine passes.

Every layer's nodes and weights are spliced into the branch that runs them, so the tied
encoder layers are stored once per chain.  This module needs onnx, never torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CompileError
from .compile import _Names, _opsets, _Scope, _splice

ENCODER_FILE = "encoder_exits.onnx"
JOINT_ENCODER_FILE = "encoder_exits_joint.onnx"
DISABLED = 2.0   # a cosine similarity never exceeds 1
NEG = np.float32(-1e9)


@dataclass(frozen=True)
class _Modality:
    name: str
    input: str
    first: onnx.ModelProto      # layer 0 with the embedding: (input, bias) -> hidden, hidden_out, memory
    masked: bool                # token ids with padding (the text), or dense patches (the image)


@dataclass
class _State:
    """One modality's tensors in the current scope."""

    hidden: str      # (n, t, d) entering the next layer
    bias: str        # (n, 1, 1, t) additive key bias
    mask: str        # (n, t, 1) float64 validity, or "" when every token is valid


def _sums(scope: _Scope, out: str, entering: str, mask: str) -> tuple[str, str, str]:
    """Per row: sum(a*b), sum(a*a), sum(b*b) over all valid positions, in float64."""
    a = scope.one("Cast", [out], "a64", to=TensorProto.DOUBLE)
    b = scope.one("Cast", [entering], "b64", to=TensorProto.DOUBLE)
    if mask:
        a, b = scope.one("Mul", [a, mask], "a_valid"), scope.one("Mul", [b, mask], "b_valid")
    flat = scope.const(np.array([0, -1], np.int64), "rows_by_all")
    a, b = scope.one("Reshape", [a, flat], "a_flat"), scope.one("Reshape", [b, flat], "b_flat")
    return tuple(scope.reduce("ReduceSum", scope.one("Mul", [x, y], "prod"), what)   # type: ignore[return-value]
                 for x, y, what in ((a, b, "dot"), (a, a, "aa"), (b, b, "bb")))


def _cosine_passes(scope: _Scope, parts: list[tuple[str, str, str]], threshold: str) -> str:
    """Per row: the cosine of the joined tensors exceeds ``threshold`` (0 where a norm is 0)."""
    def total(i: int) -> str:
        values = [p[i] for p in parts]
        return values[0] if len(values) == 1 else scope.one("Sum", values, "sum")

    dot, aa, bb = total(0), total(1), total(2)
    den = scope.one("Mul", [scope.one("Sqrt", [aa], "norm_a"), scope.one("Sqrt", [bb], "norm_b")], "den")
    zero = scope.const(np.array(0.0), "zero64")
    positive = scope.one("Greater", [den, zero], "den_positive")
    safe = scope.one("Where", [positive, den, scope.const(np.array(1.0), "one64")], "den_safe")
    similarity = scope.one("Where", [positive, scope.one("Div", [dot, safe], "ratio"), zero], "similarity")
    return scope.one("Greater", [similarity, threshold], "passes")


@dataclass
class _EncoderCompiler:
    modalities: list[_Modality]
    layers: list[onnx.ModelProto]      # encoder{k}: (hidden, bias) -> hidden_out, memory
    names: _Names
    opset: int

    def emit(self, scope: _Scope, k: int, group: list[int], states: dict[int, _State],
             threshold: str, inputs: dict[int, str] | None = None) -> dict[int, tuple[str, str]]:
        """Run layer ``k`` and what follows for the modalities in ``group`` (which leave together);
        returns, per modality, (memory, layers run) for the rows in this scope."""
        outs, memories, parts = {}, {}, []
        for j in group:
            s = states[j]
            if k == 0:
                m = self.modalities[j]
                got = _splice(scope, m.first, f"{m.name}/l0/", {m.input: inputs[j], "bias": s.bias})  # type: ignore[index]
                s = states[j] = _State(got["hidden"], s.bias, s.mask)
            else:
                got = _splice(scope, self.layers[k], f"{self.modalities[j].name}/l{k}/",
                              {"hidden": s.hidden, "bias": s.bias})
            outs[j], memories[j] = got["hidden_out"], got["memory"]
        ran = {j: self._count(scope, memories[j], k + 1) for j in group}
        if k + 1 == len(self.layers):
            return {j: (memories[j], ran[j]) for j in group}
        for j in group:
            parts.append(_sums(scope, outs[j], states[j].hidden, states[j].mask))
        left = scope.one("Not", [_cosine_passes(scope, parts, threshold)], f"left_after_layer{k}")
        rows = scope.one("NonZero", [left], "rows_left")
        any_left = scope.one("Cast", [scope.one("Size", [rows], "count_left")], "any_left", to=TensorProto.BOOL)

        branch = _Scope(self.names, self.opset)
        flat = branch.one("Reshape", [rows, branch.const(np.array([-1], np.int64), "flat")], "rows_flat")
        column = branch.one("Transpose", [rows], "rows_column", perm=[1, 0])

        def gather(name: str) -> str:
            return branch.one("Gather", [name, flat], "kept", axis=0) if name else ""

        kept = {j: _State(gather(outs[j]), gather(states[j].bias), gather(states[j].mask)) for j in group}
        sub = self.emit(branch, k + 1, group, kept, threshold)
        merged, kept_as_is = [], []
        done = _Scope(self.names, self.opset)
        for j in group:
            merged += [branch.one("ScatterND", [memories[j], column, sub[j][0]], "merged_memory"),
                       branch.one("ScatterND", [ran[j], column, sub[j][1]], "merged_layers")]
            kept_as_is += [done.one("Identity", [memories[j]], "memory_as_is"),
                           done.one("Identity", [ran[j]], "layers_as_is")]
        results = [self.names.new(f"after_layer{k}") for _ in merged]
        scope.nodes.append(helper.make_node(
            "If", [any_left], results, name=self.names.new(f"if_rows_left_after_layer{k}"),
            then_branch=branch.graph(f"rows_left_after_layer{k}", self._infos(merged)),
            else_branch=done.graph(f"none_left_after_layer{k}", self._infos(kept_as_is))))
        return {j: (results[2 * i], results[2 * i + 1]) for i, j in enumerate(group)}

    def _count(self, scope: _Scope, memory: str, value: int) -> str:
        rows = scope.one("Slice", [scope.one("Shape", [memory], "shape"), scope.const(np.array([0], np.int64), "s0"),
                                   scope.const(np.array([1], np.int64), "s1")], "rows")
        return scope.one("ConstantOfShape", [rows], f"layers{value}",
                         value=numpy_helper.from_array(np.array([value], np.int64)))

    @staticmethod
    def _infos(names: Sequence[str]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT if i % 2 == 0 else TensorProto.INT64, None)
                for i, n in enumerate(names)]


def build_encoder_exits(folder: Path, spec: dict, *, joint: bool) -> onnx.ModelProto:
    """The encoder with in-graph exits, from the per-layer graphs in ``folder`` named by the
    manifest's ``seq2seq`` object ``spec``."""
    mods = spec["modalities"]
    first = [onnx.load(str(folder / m["first"])) for m in mods]
    layers = [onnx.load(str(folder / f)) for f in spec["encoder"]]
    imports, opset = _opsets(first + layers)
    width, pad = int(spec["width"]), int(spec["pad"])
    inputs, modalities = [], []
    for m, model in zip(mods, first):
        declared = next(i for i in model.graph.input if i.name == m["input"])
        inputs.append(declared)
        masked = declared.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)
        modalities.append(_Modality(m["name"], m["input"], model, masked))
    count = 1 if joint else len(mods)
    inputs.append(helper.make_tensor_value_info("thresholds", TensorProto.DOUBLE, [count]))
    outputs = ["memory"] + [f"{m['name']}_layers" for m in mods]
    names = _Names([i.name for i in inputs] + outputs)
    main = _Scope(names, opset)
    states = {}
    for j, (m, mod) in enumerate(zip(mods, modalities)):
        x = mod.input
        if mod.masked:
            valid = main.one("Not", [main.one("Equal", [x, main.const(np.array(pad, np.int64), "pad")], "is_pad")],
                             "valid")
            bias2 = main.one("Where", [valid, main.const(np.array(0, np.float32), "zero32"),
                                       main.const(np.array(NEG), "neg")], "bias2")
            bias = main.one("Unsqueeze", [bias2, main.const(np.array([1, 2], np.int64), "axes12")], "bias")
            mask = main.one("Unsqueeze", [main.one("Cast", [valid], "valid64", to=TensorProto.DOUBLE),
                                          main.const(np.array([2], np.int64), "axis2")], "mask")
        else:
            rows = main.one("Slice", [main.one("Shape", [x], "shape"), main.const(np.array([0], np.int64), "s0"),
                                      main.const(np.array([1], np.int64), "s1")], "rows")
            shape = main.one("Concat", [rows, main.const(np.array([1, 1, int(m["tokens"])], np.int64), "bias_dims")],
                             "bias_shape", axis=0)
            bias = main.one("ConstantOfShape", [shape], "bias", value=numpy_helper.from_array(np.zeros(1, np.float32)))
            mask = ""
        states[j] = _State("", bias, mask)
    compiler = _EncoderCompiler(modalities, layers, names, opset)
    if joint:
        thresholds = ["thresholds"]
    else:
        attrs = {"num_outputs": count} if opset >= 18 else {}
        thresholds = main.op("Split", ["thresholds"], "threshold", outputs=count, axis=0, **attrs)
    groups = [list(range(len(mods)))] if joint else [[j] for j in range(len(mods))]
    results: dict[int, tuple[str, str]] = {}
    for group, threshold in zip(groups, thresholds):
        results.update(compiler.emit(main, 0, group, dict(states), threshold,
                                     {j: modalities[j].input for j in group}))
    main.nodes.append(helper.make_node("Concat", [results[j][0] for j in range(len(mods))], ["memory"],
                                       name="ee/memory", axis=1))
    main.nodes.extend(helper.make_node("Identity", [results[j][1]], [out], name=f"ee/{out}")
                      for j, out in enumerate(outputs[1:]))
    graph_outputs = [helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["batch", "memory", width])] + [
        helper.make_tensor_value_info(o, TensorProto.INT64, ["batch"]) for o in outputs[1:]]
    graph = helper.make_graph(main.nodes, "encoder_exits_joint" if joint else "encoder_exits", inputs, graph_outputs,
                              initializer=main.initializers, value_info=main.value_info)
    model = helper.make_model(graph, opset_imports=imports, producer_name="edgeexit", doc_string=(
        "MuE encoder with in-graph exits compiled by edgeexit: feed the inputs and thresholds (float64, "
        + ("one for all modalities together" if joint else "one per modality") + "; 2 disables an exit)."))
    model.ir_version = max(m.ir_version for m in first + layers)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise CompileError(f"onnx.checker refused the compiled encoder: {exc}") from exc
    return model


def fed_thresholds(values: Sequence[float | None]) -> np.ndarray:
    """Thresholds as the graph takes them: a disabled exit (None) gets one no cosine passes."""
    return np.array([DISABLED if v is None else float(v) for v in values], np.float64)


CHECK_THRESHOLDS = (None, -1.0, 0.5, 0.9, 0.99)


def check_encoder_exits(runner, graphs: dict[str, bytes], samples: int = 7, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Run each compiled encoder and the per-layer loop (``runner``, a ``Seq2SeqRunner``) on random
    inputs at several thresholds; raise ``CompileError`` where layers or memory differ."""
    import onnxruntime as ort

    spec = runner.spec
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for m in spec.modalities:
        if m["name"] == "image":
            feeds[m["input"]] = rng.random((samples, 1, 28, 28), dtype=np.float32)
        else:
            q = np.full((samples, int(m["tokens"])), spec.pad, np.int64)
            for i in range(samples):
                length = 1 + i % int(m["tokens"])
                q[i, :length] = rng.integers(0, len(spec.vocab), length)
                q[i, :length][q[i, :length] == spec.pad] = spec.eos
            feeds[m["input"]] = q
    names = [m["name"] for m in spec.modalities]
    for mode, data in graphs.items():
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        for a in CHECK_THRESHOLDS:
            for b in CHECK_THRESHOLDS:
                if mode == "joint" and b is not None:
                    continue
                chosen = {n: (a if j == 0 else b) for j, n in enumerate(names)}
                memory, _, layers = runner.encode(feeds, chosen, a, mode == "joint", engine="stages")
                fed = fed_thresholds([a] if mode == "joint" else list(chosen.values()))
                got = session.run(None, {**feeds, "thresholds": fed})
                same = all(np.array_equal(got[1 + j], layers[n]) for j, n in enumerate(names))
                if not same or not np.allclose(got[0], memory, atol=1e-5):
                    raise CompileError(
                        f"the compiled encoder ({mode}) disagrees with the per-layer graphs at thresholds "
                        f"{chosen if mode != 'joint' else a}: layers {[g.tolist() for g in got[1:]]} vs "
                        f"{[layers[n].tolist() for n in names]}; this is a bug in the compiler, please report it")
