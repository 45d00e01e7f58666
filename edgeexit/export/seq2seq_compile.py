"""In-graph exits for a seq2seq package: the encoder in one graph, a decoder step in another.

At batch 1 the per-layer graphs cost one ``session.run`` per layer per modality and per layer
per generated token, and the Python between those calls (the cosine, the bookkeeping) costs
about as much as a small layer.  This module splices the package's per-layer graphs into
graphs that decide their exits themselves, the way ``edgeexit.export.compile`` builds a
classifier's compiled exits.

**The encoder** (``encoder_exits.onnx``; ``encoder_exits_joint.onnx`` for MuE's ablation).
The modalities share (tie) the encoder layers, so they run through each layer as rows of one
batch: every modality's embedding is padded to the longest one's tokens (the padding masked
like the question's own) and stacked on the batch axis, so a layer costs one set of nodes for
all modalities instead of one per modality::

    rows = [image of each sample; question of each sample]      (modalities x batch, tokens, width)
    layer 0 -> cosine(out, in) per row > that row's threshold ?
        If(any row left): gather the rows left -> layer 1 -> ... -> ScatterND back
        else:             the memory from layer 0, 1 layer run

Each row leaves on its own modality's threshold (MuE's modality decomposition); with
``joint``, a sample's rows leave together on one similarity over all their tokens.
Inputs: the package's inputs and ``thresholds`` (float64: one per modality in the manifest's
order, or one for ``joint``).  Outputs: ``memory`` (batch, memory, width), the encoder norm of
every modality's last hidden state joined along the tokens, and ``{modality}_layers`` (int64,
batch).  The similarity is computed in float64 over each row's valid tokens, as
``edgeexit.runtime.seq2seq.cosine`` does; a disabled exit is fed a threshold of 2, which no
cosine passes.

**The decoder step** (``decoder_step_{kv}.onnx``): one generated token at batch 1, each layer
in the ``If`` branch that only a token still in the decoder enters, each layer's cache an
input and an output (``build_decoder_step``).

Every layer's nodes and weights are spliced into the branch that runs them.  This module
needs onnx, never torch.
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
NEG = np.float32(-1e9)


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


def _passes(scope: _Scope, dot: str, aa: str, bb: str, threshold: str) -> str:
    """Per row: the cosine exceeds ``threshold`` (the cosine is 0 where a norm is 0)."""
    den = scope.one("Mul", [scope.one("Sqrt", [aa], "norm_a"), scope.one("Sqrt", [bb], "norm_b")], "den")
    zero = scope.const(np.array(0.0), "zero64")
    positive = scope.one("Greater", [den, zero], "den_positive")
    safe = scope.one("Where", [positive, den, scope.const(np.array(1.0), "one64")], "den_safe")
    similarity = scope.one("Where", [positive, scope.one("Div", [dot, safe], "ratio"), zero], "similarity")
    return scope.one("Greater", [similarity, threshold], "passes")


@dataclass
class _EncoderCompiler:
    layers: list[onnx.ModelProto]      # encoder{k}: (hidden, bias) -> hidden_out, memory
    modalities: int
    joint: bool
    names: _Names
    opset: int

    def emit(self, scope: _Scope, k: int, hidden: str, bias: str, mask: str, threshold: str) -> tuple[str, str]:
        """Layer ``k`` and what follows for the rows in this scope; returns (memory, layers run)."""
        got = _splice(scope, self.layers[k], f"enc/l{k}/", {"hidden": hidden, "bias": bias})
        out, memory = got["hidden_out"], got["memory"]
        rows_here = scope.one("Shape", [mask], "rows_here", end=1)
        ran = scope.one("ConstantOfShape", [rows_here], f"layers{k + 1}",
                        value=numpy_helper.from_array(np.array([k + 1], np.int64)))
        if k + 1 == len(self.layers):
            return memory, ran
        dot, aa, bb = _sums(scope, out, hidden, mask)
        if self.joint:    # a sample's rows (one per modality, in blocks) leave together
            blocks = scope.const(np.array([self.modalities, -1], np.int64), "by_modality")
            dot, aa, bb = (scope.reduce("ReduceSum", scope.one("Reshape", [v, blocks], "blocks"), "per_sample", axis=0)
                           for v in (dot, aa, bb))
            passes = _passes(scope, dot, aa, bb, threshold)
            passes = scope.one("Tile", [passes, scope.const(np.array([self.modalities], np.int64), "times")], "rows")
        else:
            passes = _passes(scope, dot, aa, bb, threshold)
        left = scope.one("Not", [passes], f"left_after_layer{k}")
        rows = scope.one("NonZero", [left], "rows_left")
        any_left = scope.one("Cast", [scope.one("Size", [rows], "count_left")], "any_left", to=TensorProto.BOOL)

        branch = _Scope(self.names, self.opset)
        flat = branch.one("Reshape", [rows, branch.const(np.array([-1], np.int64), "flat")], "rows_flat")
        column = branch.one("Transpose", [rows], "rows_column", perm=[1, 0])
        kept = [branch.one("Gather", [v, flat], "kept", axis=0) for v in (out, bias, mask)]
        sub_threshold = threshold if self.joint else branch.one("Gather", [threshold, flat], "kept", axis=0)
        sub_memory, sub_ran = self.emit(branch, k + 1, kept[0], kept[1], kept[2], sub_threshold)
        merged = [branch.one("ScatterND", [memory, column, sub_memory], "merged_memory"),
                  branch.one("ScatterND", [ran, column, sub_ran], "merged_layers")]
        done = _Scope(self.names, self.opset)
        as_is = [done.one("Identity", [memory], "memory_as_is"), done.one("Identity", [ran], "layers_as_is")]
        results = [self.names.new(f"after_layer{k}") for _ in merged]
        scope.nodes.append(helper.make_node(
            "If", [any_left], results, name=self.names.new(f"if_rows_left_after_layer{k}"),
            then_branch=branch.graph(f"rows_left_after_layer{k}", self._infos(merged)),
            else_branch=done.graph(f"none_left_after_layer{k}", self._infos(as_is))))
        return results[0], results[1]

    @staticmethod
    def _infos(names: Sequence[str]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, None),
                helper.make_tensor_value_info(names[1], TensorProto.INT64, None)]


def build_encoder_exits(folder: Path, spec: dict, *, joint: bool) -> onnx.ModelProto:
    """The encoder with in-graph exits, from the graphs in ``folder`` named by the manifest's
    ``seq2seq`` object ``spec`` (each modality's ``embed`` and the shared ``encoder`` layers)."""
    mods = spec["modalities"]
    embeds = [onnx.load(str(folder / m["embed"])) for m in mods]
    layers = [onnx.load(str(folder / f)) for f in spec["encoder"]]
    imports, opset = _opsets(embeds + layers)
    width, pad = int(spec["width"]), int(spec["pad"])
    tokens = [int(m["tokens"]) for m in mods]
    longest = max(tokens)
    inputs = [next(i for i in model.graph.input if i.name == m["input"]) for m, model in zip(mods, embeds)]
    inputs.append(helper.make_tensor_value_info("thresholds", TensorProto.DOUBLE, [1 if joint else len(mods)]))
    outputs = ["memory"] + [f"{m['name']}_layers" for m in mods]
    names = _Names([i.name for i in inputs] + outputs)
    main = _Scope(names, opset)
    batch = main.one("Shape", [mods[0]["input"]], "batch", end=1)
    hidden, valid, per_row = [], [], []
    for j, (m, model, info, t) in enumerate(zip(mods, embeds, inputs, tokens)):
        h = _splice(main, model, f"{m['name']}/embed/", {m["input"]: m["input"]})[model.graph.output[0].name]
        if info.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32):     # token ids: pad masked
            ids = np.int64 if info.type.tensor_type.elem_type == TensorProto.INT64 else np.int32
            is_pad = main.one("Equal", [m["input"], main.const(np.array(pad, ids), "pad")], "is_pad")
            v = main.one("Cast", [main.one("Not", [is_pad], "valid")], "valid64", to=TensorProto.DOUBLE)
        else:
            dims = main.one("Concat", [batch, main.const(np.array([t], np.int64), "tokens")], "dims", axis=0)
            v = main.one("ConstantOfShape", [dims], "valid64", value=numpy_helper.from_array(np.ones(1, np.float64)))
        if t < longest:      # padded to the longest modality's tokens, the padding masked out
            h = main.one("Pad", [h, main.const(np.array([0, 0, 0, 0, longest - t, 0], np.int64), "pads3")], "padded")
            v = main.one("Pad", [v, main.const(np.array([0, 0, 0, longest - t], np.int64), "pads2")], "padded")
        hidden.append(h)
        valid.append(v)
        if not joint:
            split = main.one("Slice", ["thresholds", main.const(np.array([j], np.int64), "at"),
                                       main.const(np.array([j + 1], np.int64), "to")], "threshold")
            per_row.append(main.one("Expand", [split, batch], "threshold_rows"))
    rows_hidden = main.one("Concat", hidden, "rows", axis=0)
    rows_valid = main.one("Concat", valid, "rows_valid", axis=0)
    mask = main.one("Unsqueeze", [rows_valid, main.const(np.array([2], np.int64), "axis2")], "mask")
    bias2 = main.one("Where", [main.one("Greater", [rows_valid, main.const(np.array(0.5), "half")], "is_valid"),
                               main.const(np.array(0, np.float32), "zero32"), main.const(np.array(NEG), "neg")],
                     "bias2")
    bias = main.one("Unsqueeze", [bias2, main.const(np.array([1, 2], np.int64), "axes12")], "bias")
    threshold = "thresholds" if joint else main.one("Concat", per_row, "threshold_rows", axis=0)
    compiler = _EncoderCompiler(layers, len(mods), joint, names, opset)
    memory_rows, layers_rows = compiler.emit(main, 0, rows_hidden, bias, mask, threshold)
    sizes = main.one("Concat", [batch] * len(mods), "split_sizes", axis=0)
    memories = main.op("Split", [memory_rows, sizes], "memory_of", outputs=len(mods), axis=0)
    counts = main.op("Split", [layers_rows, sizes], "layers_of", outputs=len(mods), axis=0)
    parts = [mem if t == longest else main.one("Slice", [mem, main.const(np.array([0], np.int64), "from0"),
                                                          main.const(np.array([t], np.int64), "to_tokens"),
                                                          main.const(np.array([1], np.int64), "axis1")], "unpadded")
             for mem, t in zip(memories, tokens)]
    main.nodes.append(helper.make_node("Concat", parts, ["memory"], name="ee/memory", axis=1))
    main.nodes.extend(helper.make_node("Identity", [c], [o], name=f"ee/{o}") for c, o in zip(counts, outputs[1:]))
    graph_outputs = [helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["batch", sum(tokens), width])] + [
        helper.make_tensor_value_info(o, TensorProto.INT64, ["batch"]) for o in outputs[1:]]
    return _checked_model(main, "encoder_exits_joint" if joint else "encoder_exits", inputs, graph_outputs,
                          imports, embeds + layers, "the compiled encoder", (
                              "MuE encoder with in-graph exits compiled by edgeexit: feed the inputs and thresholds "
                              "(float64, " + ("one for all modalities together" if joint else "one per modality")
                              + "; 2 disables an exit)."))


def _checked_model(main: _Scope, name: str, inputs: Sequence[onnx.ValueInfoProto],
                   outputs: Sequence[onnx.ValueInfoProto], imports: list[onnx.OperatorSetIdProto],
                   sources: Sequence[onnx.ModelProto], what: str, doc: str) -> onnx.ModelProto:
    """The model of the main scope, at the sources' IR version, checked with ``onnx.checker``."""
    graph = helper.make_graph(main.nodes, name, list(inputs), list(outputs), initializer=main.initializers,
                              value_info=main.value_info)
    model = helper.make_model(graph, opset_imports=imports, producer_name="edgeexit", doc_string=doc)
    model.ir_version = max(m.ir_version for m in sources)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise CompileError(f"onnx.checker refused {what}: {exc}") from exc
    return model


CHECK_THRESHOLDS = (None, -1.0, 0.5, 0.9, 0.99)


def _check_inputs(spec, samples: int, seed: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
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
    return feeds


def check_in_graph_exits(runner, samples: int = 7, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Run the in-graph encoders and decoder steps of ``runner`` (a ``Seq2SeqRunner``) and its
    per-layer graphs on random inputs at several thresholds; raise ``CompileError`` where the
    layers run, the memory or the generated tokens differ."""
    spec = runner.spec
    feeds = _check_inputs(spec, samples, seed)
    names = [m["name"] for m in spec.modalities]
    for mode in runner.encoder_exits:
        joint = mode == "joint"
        for a in CHECK_THRESHOLDS:
            for b in (None,) if joint else CHECK_THRESHOLDS:
                chosen = {n: (a if j == 0 else b) for j, n in enumerate(names)}
                memory, _, layers = runner.encode(feeds, chosen, a, joint, engine="stages")
                got, _, got_layers = runner.encode(feeds, chosen, a, joint, engine="compiled")
                if not all(np.array_equal(got_layers[n], layers[n]) for n in names) or \
                        not np.allclose(got, memory, atol=1e-5):
                    raise CompileError(
                        f"the compiled encoder ({mode}) disagrees with the per-layer graphs at thresholds "
                        f"{a if joint else chosen}: layers {[got_layers[n].tolist() for n in names]} vs "
                        f"{[layers[n].tolist() for n in names]}; this is a bug in the compiler, please report it")
    for kv in runner.decoder_steps:
        for threshold in CHECK_THRESHOLDS:
            for i in range(samples):
                one = {k: v[i:i + 1] for k, v in feeds.items()}
                options = {"thresholds": {"decoder": threshold}, "kv": kv}
                want = runner.generate(one, engine="stages", **options)
                got = runner.generate(one, engine="compiled", **options)
                if got.tokens != want.tokens or got.decoder_layers != want.decoder_layers:
                    raise CompileError(
                        f"the compiled decoder step (kv={kv}) disagrees with the per-layer graphs at threshold "
                        f"{threshold}: tokens {got.tokens} vs {want.tokens}, layers {got.decoder_layers} vs "
                        f"{want.decoder_layers}; this is a bug in the compiler, please report it")


# --- the decoder: one graph per generated token ------------------------------------------

STEP_FILES = {"drop": "decoder_step_drop.onnx", "copy_hidden": "decoder_step_copy_hidden.onnx"}


@dataclass
class _StepCompiler:
    """One token through the decoder layers at batch 1, each layer's exit decided by an ``If``."""

    layers: list[onnx.ModelProto]     # decoder{k}: (hidden | token, position), past, self_bias, memory -> ...
    kv: list[onnx.ModelProto]         # decoder{k}_kv: hidden -> key, value
    kv_mode: str
    names: _Names
    opset: int
    self_bias: str     # zeros (1, 1, 1, 1): at batch 1 a layer attends to every position its cache holds

    def emit(self, scope: _Scope, k: int, entering: str, threshold: str) -> list[str]:
        """Layer ``k`` and what follows; returns logits, exit layer, then present key and value of
        every layer from ``k`` on."""
        feeds = {"past_key": f"past_key_{k}", "past_value": f"past_value_{k}", "memory": "memory",
                 "memory_bias": "memory_bias", "self_bias": self.self_bias}
        if k == 0:
            feeds.update(token="token", position="position")
        else:
            feeds["hidden"] = entering
        got = _splice(scope, self.layers[k], f"dec/l{k}/", feeds)
        if k == 0:
            entering = got["hidden"]
        out = got["hidden_out"]
        presents = [scope.one("Concat", [f"past_key_{k}", got["key"]], f"present_key_{k}", axis=2),
                    scope.one("Concat", [f"past_value_{k}", got["value"]], f"present_value_{k}", axis=2)]
        exit_k = scope.const(np.array([k], np.int64), f"exit{k}")
        if k + 1 == len(self.layers):
            return [got["logits"], scope.one("Identity", [exit_k], "exit"), *presents]
        passes = _passes(scope, *_sums(scope, out, entering, ""), threshold)
        leave = _Scope(self.names, self.opset)
        after = [leave.one("Identity", [got["logits"]], "logits_here"), leave.one("Identity", [exit_k], "exit_here")]
        for j in range(k + 1, len(self.layers)):
            if self.kv_mode == "drop":     # the layer keeps nothing for this position
                after += [leave.one("Identity", [f"past_key_{j}"], f"kept_key_{j}"),
                          leave.one("Identity", [f"past_value_{j}"], f"kept_value_{j}")]
            else:                          # its own projections of the exited hidden state (CALM)
                kv = _splice(leave, self.kv[j], f"dec/l{k}/kv{j}/", {"hidden": out})
                after += [leave.one("Concat", [f"past_key_{j}", kv["key"]], f"copied_key_{j}", axis=2),
                          leave.one("Concat", [f"past_value_{j}", kv["value"]], f"copied_value_{j}", axis=2)]
        go_on = _Scope(self.names, self.opset)
        deeper = self.emit(go_on, k + 1, out, threshold)
        results = [self.names.new(f"after_layer{k}") for _ in deeper]
        cond = scope.one("Squeeze", [passes, scope.const(np.array([0], np.int64), "axis0")], "leaves")
        scope.nodes.append(helper.make_node(
            "If", [cond], results, name=self.names.new(f"if_exit_after_layer{k}"),
            then_branch=leave.graph(f"exit_after_layer{k}", self._infos(after)),
            else_branch=go_on.graph(f"layer{k + 1}", self._infos(deeper))))
        return [results[0], results[1], *presents, *results[2:]]

    @staticmethod
    def _infos(names: Sequence[str]) -> list[onnx.ValueInfoProto]:
        types = [TensorProto.FLOAT, TensorProto.INT64] + [TensorProto.FLOAT] * (len(names) - 2)
        return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]


def build_decoder_step(folder: Path, spec: dict, *, kv: str) -> onnx.ModelProto:
    """One generated token at batch 1 with the decoder exits decided in-graph (``kv``: what a
    skipped layer keeps for the token, as in ``ExitSession.generate``).

    Inputs: ``token``, ``position`` (1, 1) int64, ``memory``, ``memory_bias``, ``threshold``
    (float64, [1]; 2 disables the exits) and per layer k ``past_key_k``, ``past_value_k``
    (1, heads, past_k, head_dim): at batch 1 each layer's cache holds exactly the positions it
    ran for, so no self-attention mask is needed.  Outputs: ``logits`` (1, 1, vocab), ``exit``
    (int64, [1]: the layer the token left at) and ``present_key_k``, ``present_value_k``.
    """
    if kv not in STEP_FILES:
        raise CompileError(f"kv={kv!r} is not one of {sorted(STEP_FILES)}")
    layers = [onnx.load(str(folder / d["step"])) for d in spec["decoder"]]
    kvs = [onnx.load(str(folder / d["kv"])) for d in spec["decoder"]]
    imports, opset = _opsets(layers + kvs)
    heads, dh, vocab = int(spec["heads"]), int(spec["head_dim"]), len(spec["vocab"])
    count = len(layers)
    memory_info = next(i for i in layers[0].graph.input if i.name == "memory")
    memory_bias_info = next(i for i in layers[0].graph.input if i.name == "memory_bias")
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("position", TensorProto.INT64, [1, 1]),
              memory_info, memory_bias_info,
              helper.make_tensor_value_info("threshold", TensorProto.DOUBLE, [1])]
    for k in range(count):
        inputs += [helper.make_tensor_value_info(f"past_{w}_{k}", TensorProto.FLOAT, [1, heads, f"past_{k}", dh])
                   for w in ("key", "value")]
    outputs = ["logits", "exit"] + [f"present_{w}_{k}" for k in range(count) for w in ("key", "value")]
    names = _Names([i.name for i in inputs] + outputs)
    main = _Scope(names, opset)
    self_bias = main.const(np.zeros((1, 1, 1, 1), np.float32), "self_bias")    # broadcast over the positions
    results = _StepCompiler(layers, kvs, kv, names, opset, self_bias).emit(main, 0, "", "threshold")
    main.nodes.extend(helper.make_node("Identity", [r], [o], name=f"ee/{o}") for r, o in zip(results, outputs))
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab]),
                     helper.make_tensor_value_info("exit", TensorProto.INT64, [1])] + [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, heads, f"present_{o.rsplit('_', 1)[1]}", dh])
        for o in outputs[2:]]
    return _checked_model(main, f"decoder_step_{kv}", inputs, graph_outputs, imports, layers + kvs,
                          "the compiled decoder step", (
                              f"MuE decoder step with in-graph exits (kv={kv}) compiled by edgeexit: batch 1; feed the "
                              "token, its position, the memory, each layer's cache and the threshold (float64; 2 "
                              "disables the exits)."))
