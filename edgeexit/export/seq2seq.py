"""Export MuE's encoder-decoder as a ``seq2seq`` exit package (format version 5): one graph per
encoder layer (run once per modality), one per decoder layer with its key/value cache, one
shared head, and the small graphs around them.

The exporter reads the model only through an ``EncoderDecoderDescription``
(``edgeexit.export.seq2seq_model``), which ``MuEModel.describe()`` returns; any encoder-decoder
that describes itself the same way exports here.

Graphs (every axis named ``batch``, ``tokens``, ``past`` or ``memory`` is dynamic):

- ``embed_image.onnx``  image (batch, 1, 28, 28) -> hidden (batch, 16, width) (MuE's image shape and tokens)
- ``embed_text.onnx``   question (batch, tokens) int64 -> hidden (batch, tokens, width)
- ``encoder{k}.onnx``   hidden, bias (batch, 1, 1, tokens) -> hidden_out and memory (the encoder
  norm of hidden_out: LayerNorm works per token, so the joined memory is the join of these);
  shared by both modalities
- ``encoder0_{modality}.onnx`` the modality's input, bias -> hidden (its embedding), hidden_out,
  memory: layer 0 with the embedding folded in
- ``encoder_norm.onnx`` hidden (batch, memory, width) -> memory
- ``embed_answer.onnx`` token, position (batch, 1) int64 -> hidden (batch, 1, width)
- ``decoder{k}.onnx``   hidden (batch, 1, width), past_key, past_value (batch, heads, past, head_dim),
  self_bias (batch, 1, 1, past + 1), memory, memory_bias (batch, 1, 1, memory)
  -> hidden_out, key, value (the new position's key and value, (batch, heads, 1, head_dim)) and
  logits (the shared head on hidden_out, so a token that leaves here needs no further call);
  ``decoder0.onnx`` takes token and position instead of hidden (the answer embedding folded
  in) and also returns that embedding as ``hidden``
- ``decoder{k}_kv.onnx`` hidden (batch, 1, width) -> key, value: this layer's projections of a
  hidden state, for ``kv="copy_hidden"``
- ``head.onnx``          hidden (batch, 1, width) -> logits (batch, 1, vocab)
- ``encoder_exits.onnx``, ``encoder_exits_joint.onnx``: the encoder with its exits decided
  in-graph (``edgeexit.export.seq2seq_compile``), spliced from the graphs above
- ``decoder_step_drop.onnx``, ``decoder_step_copy_hidden.onnx``: one generated token at batch 1
  with the decoder exits decided in-graph and each layer's cache as inputs and outputs

Each graph is checked with ``onnx.checker`` and against torch on fresh inputs of two sizes;
the in-graph encoders are checked against the per-layer graphs.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .. import __version__
from .. import _leftovers as leftovers
from ..errors import ExportError, ExportValidationError
from ..package import Package, Seq2SeqSpec, load_package, write_package
from .seq2seq_compile import (
    ENCODER_FILE,
    JOINT_ENCODER_FILE,
    STEP_FILES,
    build_decoder_step,
    build_encoder_exits,
    check_in_graph_exits,
)
from .seq2seq_model import DescribesEncoderDecoder, EncoderDecoderDescription, as_description

SEQ2SEQ_VERSION = 6   # 5 plus the encoder with in-graph exits (FORMAT.md section 3.5)


class _Call(nn.Module):
    """A function of ``owner``'s parameters as a module (so tracing sees them as weights)."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


def _graphs(d: EncoderDecoderDescription) -> list[tuple[str, nn.Module, list[str], list[str],
                                                         Callable[[int, int], tuple]]]:
    """(file, module, input names, output names, example(batch, length) -> args) for every graph."""
    model = d.module   # the owner of every graph's weights
    vocab, image_tokens = len(d.vocab), d.image_tokens

    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def hidden(b: int, t: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(b, t, d.width, generator=g(seed))

    def bias(b: int, t: int, seed: int = 1) -> torch.Tensor:
        valid = torch.rand(b, t, generator=g(seed)) > 0.2
        valid[:, 0] = True
        return d.key_bias(valid)

    out: list[tuple[str, nn.Module, list[str], list[str], Callable[[int, int], tuple]]] = [
        ("embed_image.onnx", _Call(model, d.embed_image), ["image"], ["hidden"],
         lambda b, t: (torch.rand(b, *d.image_shape, generator=g(2)),)),
        ("embed_text.onnx", _Call(model, d.embed_text), ["question"], ["hidden"],
         lambda b, t: (torch.randint(0, vocab, (b, d.question_len), generator=g(3)),)),
    ]
    def layer_and_norm(layer: nn.Module) -> Callable[..., Any]:
        def run(h, b):  # type: ignore[no-untyped-def]
            out_h = layer(h, b)
            return out_h, d.encoder_norm(out_h)   # LayerNorm is per token: norm(join) = join(norms)
        return run

    def first_layer(embed: Callable[..., Any]) -> Callable[..., Any]:
        def run(x, b):  # type: ignore[no-untyped-def]
            h = embed(x)
            out_h = d.encoder_layers[0](h, b)
            return h, out_h, d.encoder_norm(out_h)
        return run

    for k, layer in enumerate(d.encoder_layers):
        out.append((f"encoder{k}.onnx", _Call(model, layer_and_norm(layer)), ["hidden", "bias"],
                    ["hidden_out", "memory"], lambda b, t: (hidden(b, t + 2), bias(b, t + 2))))
    # layer 0 with each modality's embedding folded in: one call for a modality leaving at layer 1
    out.append(("encoder0_image.onnx", _Call(model, first_layer(d.embed_image)), ["image", "bias"],
                ["hidden", "hidden_out", "memory"],
                lambda b, t: (torch.rand(b, *d.image_shape, generator=g(2)), torch.zeros(b, 1, 1, image_tokens))))
    out.append(("encoder0_text.onnx", _Call(model, first_layer(d.embed_text)), ["question", "bias"],
                ["hidden", "hidden_out", "memory"],
                lambda b, t: (torch.randint(0, vocab, (b, d.question_len), generator=g(3)),
                              bias(b, d.question_len))))
    out.append(("encoder_norm.onnx", d.encoder_norm, ["hidden"], ["memory"],
                lambda b, t: (hidden(b, image_tokens + t),)))
    out.append(("embed_answer.onnx", _Call(model, d.embed_answer), ["token", "position"], ["hidden"],
                lambda b, t: (torch.randint(0, vocab, (b, 1), generator=g(4)),
                              torch.randint(0, d.answer_len, (b, 1), generator=g(5)))))

    def step(layer: nn.Module) -> Callable[..., Any]:
        def run(x, pk, pv, sb, mem, mb):  # type: ignore[no-untyped-def]
            out_x, key, value = layer(x, pk, pv, sb, mem, mb)
            return out_x, key[:, :, -1:], value[:, :, -1:], d.head(out_x)
        return run

    def first_step(layer: nn.Module) -> Callable[..., Any]:
        def run(token, position, pk, pv, sb, mem, mb):  # type: ignore[no-untyped-def]
            x = d.embed_answer(token, position)
            out_x, key, value = layer(x, pk, pv, sb, mem, mb)
            return x, out_x, key[:, :, -1:], value[:, :, -1:], d.head(out_x)
        return run

    def cache(b: int, t: int) -> tuple:
        return (torch.randn(b, d.heads, t, d.head_dim, generator=g(6)),
                torch.randn(b, d.heads, t, d.head_dim, generator=g(7)),
                bias(b, t + 1), hidden(b, image_tokens + d.question_len, 8),
                bias(b, image_tokens + d.question_len, 9))

    rest = ["past_key", "past_value", "self_bias", "memory", "memory_bias"]
    for k, (layer, self_kv) in enumerate(zip(d.decoder_layers, d.decoder_self_kv)):
        if k == 0:   # the answer embedding folded in: one onnxruntime call for a token that leaves here
            out.append(("decoder0.onnx", _Call(model, first_step(layer)), ["token", "position", *rest],
                        ["hidden", "hidden_out", "key", "value", "logits"],
                        lambda b, t: (torch.randint(0, vocab, (b, 1), generator=g(4)),
                                      torch.randint(0, d.answer_len, (b, 1), generator=g(5)), *cache(b, t))))
        else:
            out.append((f"decoder{k}.onnx", _Call(model, step(layer)), ["hidden", *rest],
                        ["hidden_out", "key", "value", "logits"], lambda b, t: (hidden(b, 1), *cache(b, t))))
        out.append((f"decoder{k}_kv.onnx", _Call(layer, self_kv), ["hidden"], ["key", "value"],
                    lambda b, t: (hidden(b, 1),)))
    out.append(("head.onnx", _Call(model, d.head), ["hidden"], ["logits"], lambda b, t: (hidden(b, 1),)))
    return out


_DYNAMIC = {"image": {0: "batch"}, "question": {0: "batch", 1: "tokens"}, "hidden": {0: "batch", 1: "tokens"},
            "hidden_out": {0: "batch", 1: "tokens"}, "bias": {0: "batch", 3: "tokens"},
            "memory": {0: "batch", 1: "memory"}, "memory_bias": {0: "batch", 3: "memory"},
            "token": {0: "batch"}, "position": {0: "batch"}, "past_key": {0: "batch", 2: "past"},
            "past_value": {0: "batch", 2: "past"}, "self_bias": {0: "batch", 3: "past_and_new"},
            "key": {0: "batch"}, "value": {0: "batch"}, "logits": {0: "batch"}}


def _export_one(module: nn.Module, args: tuple, names: list[str], outputs: list[str], path: Path,
                opset: int) -> None:
    axes = {n: _DYNAMIC[n] for n in names + outputs if n in _DYNAMIC}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
                              external_data=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"exporting {path.name} failed: {exc}") from exc


def _validate(graphs, folder: Path, atol: float, log: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
    failures = []
    for file, module, names, outputs, make in graphs:
        session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        worst = 0.0
        for b, t in ((1, 3), (4, 6)):
            args = make(b, t)
            with torch.no_grad():
                want = module(*args)
            want = want if isinstance(want, tuple) else (want,)
            got = session.run(outputs, {n: a.numpy() for n, a in zip(names, args)})
            for w, o in zip(want, got):
                if tuple(w.shape) != o.shape:
                    worst = float("inf")
                else:
                    worst = max(worst, float(np.max(np.abs(w.numpy() - o))))
        log(f"  {file:<20} max |onnxruntime - torch| = {worst:.2e}")
        if not worst <= atol:
            failures.append(f"{file}: {worst:.3e}")
    if failures:
        raise ExportValidationError(f"onnxruntime differs from torch beyond {atol}: {'; '.join(failures)}")


def _in_graph_exits(folder: Path, spec: dict[str, Any], say: Callable[[str], None]) -> dict[str, Path]:
    """Build the encoder with in-graph exits (both exit modes) and the decoder steps (both ``kv``
    modes) into ``folder``, and check them against the per-layer graphs there."""
    from ..runtime._threads import session_options
    from ..runtime.seq2seq import Seq2SeqRunner

    files: dict[str, Path] = {}
    for mode, file in spec["encoder_exits"].items():
        onnx.save(build_encoder_exits(folder, spec, joint=mode == "joint"), str(folder / file))
        files[file] = folder / file
    for kv, file in spec["decoder_steps"].items():
        onnx.save(build_decoder_step(folder, spec, kv=kv), str(folder / file))
        files[file] = folder / file
    fields = {k: spec[k] for k in ("pad", "bos", "eos", "max_answer", "heads", "head_dim", "width", "encoder_norm",
                                   "embed_answer", "head", "decoder_threshold", "encoder_exits", "decoder_steps")}
    seq2seq = Seq2SeqSpec(**fields, vocab=tuple(spec["vocab"]), encoder=tuple(spec["encoder"]),
                          decoder=tuple(spec["decoder"]), modalities=tuple(spec["modalities"]))
    options = session_options(1, False, False)

    def build(file: str, _what: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / file), options, providers=["CPUExecutionProvider"])

    check_in_graph_exits(Seq2SeqRunner(SimpleNamespace(seq2seq=seq2seq), build))  # type: ignore[arg-type]
    for file in files:
        say(f"  {file:<30} in-graph exits: same layers, memory and tokens as the per-layer graphs")
    return files


def export_mue(model: EncoderDecoderDescription | DescribesEncoderDecoder, path: str | os.PathLike[str], *,
               name: str = "mue", opset: int = 18, atol: float = 1e-4,
               encoder_thresholds: Sequence[float | None] = (None, None), decoder_threshold: float | None = None,
               overwrite: bool = False, log: Callable[[str], None] | None = print) -> Package:
    """Write ``model`` as a seq2seq exit package at ``path`` (replaced atomically) and load it back.

    ``model`` is an ``EncoderDecoderDescription`` or a model whose ``describe()`` returns one
    (``MuEModel``); the described module is put in eval mode.  Thresholds are MuE's
    cosine-similarity thresholds: ``encoder_thresholds`` one per modality (image, text),
    ``decoder_threshold`` for every decoder layer; None leaves that exit disabled.

    Example:
        >>> package = export_mue(MuEModel(), "mue.eexit", log=None)   # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    d = as_description(model)
    d.module.eval()
    graphs = _graphs(d)
    leftovers.collect_work_dirs("export")
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-export-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        say(f"exporting {len(graphs)} graph(s) (opset {opset})")
        for file, module, names, outputs, make in graphs:
            _export_one(module, make(2, 3), names, outputs, folder / file, opset)
        _validate(graphs, folder, atol, say)
        manifest = {
            "format": "edgeexit", "format_version": SEQ2SEQ_VERSION, "kind": "seq2seq", "name": name,
            "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", *d.image_shape]},
                       {"name": "question", "dtype": "int64", "shape": ["batch", d.question_len]}],
            "labels": None,
            "stages": [],
            "seq2seq": {
                "vocab": list(d.vocab), "pad": d.pad, "bos": d.bos, "eos": d.eos, "max_answer": d.answer_len,
                "width": d.width, "heads": d.heads, "head_dim": d.head_dim,
                "modalities": [
                    {"name": "image", "input": "image", "embed": "embed_image.onnx", "first": "encoder0_image.onnx",
                     "tokens": d.image_tokens, "threshold": encoder_thresholds[0]},
                    {"name": "text", "input": "question", "embed": "embed_text.onnx", "first": "encoder0_text.onnx",
                     "tokens": d.question_len, "threshold": encoder_thresholds[1]},
                ],
                "encoder": [f"encoder{k}.onnx" for k in range(len(d.encoder_layers))],
                "encoder_norm": "encoder_norm.onnx",
                "embed_answer": "embed_answer.onnx",
                "decoder": [{"step": f"decoder{k}.onnx", "kv": f"decoder{k}_kv.onnx"}
                            for k in range(len(d.decoder_layers))],
                "head": "head.onnx",
                "policy": "similarity",
                "decoder_threshold": decoder_threshold,
                "config": dict(d.config),
                "encoder_exits": {"per_modality": ENCODER_FILE, "joint": JOINT_ENCODER_FILE},
                "decoder_steps": dict(STEP_FILES),
            },
            "full_model": None, "preprocessing": {"layout": "NCHW", "pixel_scale": 1 / 255},
            "producer": {"edgeexit": __version__, "torch": torch.__version__.split("+")[0],
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": opset,
                         "exporter": "torchscript"},
        }
        compiled = _in_graph_exits(folder, manifest["seq2seq"], say)  # type: ignore[arg-type]
        write_package(path, manifest, {**{file: folder / file for file, *_ in graphs}, **compiled}, overwrite=overwrite)
    say(f"wrote {path}")
    return load_package(path)


class _PlainEncoder(nn.Module):
    def __init__(self, d: EncoderDecoderDescription) -> None:
        super().__init__()
        self.model = d.module   # registered, so the graph's weights are its parameters
        self.description = d

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, valid = self.description.encode(image, question)
        return memory, self.description.key_bias(valid)


class _PlainDecoderStep(nn.Module):
    """One generated token through every decoder layer, with the whole cache as two tensors."""

    def __init__(self, d: EncoderDecoderDescription) -> None:
        super().__init__()
        self.model = d.module   # registered, so the graph's weights are its parameters
        self.description = d

    def forward(self, token: torch.Tensor, position: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                memory: torch.Tensor, memory_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.description.embed_answer(token, position)
        bias = torch.zeros(x.shape[0], 1, 1, past_key.shape[3] + 1)
        keys, values = [], []
        for k, layer in enumerate(self.description.decoder_layers):
            x, key, value = layer(x, past_key[k], past_value[k], bias, memory, memory_bias)
            keys.append(key)
            values.append(value)
        return self.description.head(x), torch.stack(keys), torch.stack(values)


def export_plain_mue(model: EncoderDecoderDescription | DescribesEncoderDecoder, folder: str | os.PathLike[str],
                     opset: int = 18) -> tuple[Path, Path]:
    """The plain model with the same weights, as an app without exits would ship it: one encoder
    graph (image, question -> memory, memory_bias) and one decoder-step graph over all layers
    with the key/value cache as ``(layers, batch, heads, past, head_dim)`` tensors.  ``model`` as
    for ``export_mue``."""
    d = as_description(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, *d.image_shape, generator=g)
    question = torch.randint(3, len(d.vocab), (2, d.question_len), generator=g)
    encoder = folder / "plain_encoder.onnx"
    decoder = folder / "plain_decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_PlainEncoder(d).eval(), (image, question), str(encoder),
                          input_names=["image", "question"], output_names=["memory", "memory_bias"],
                          dynamic_axes={"image": {0: "batch"}, "question": {0: "batch"}, "memory": {0: "batch"},
                                        "memory_bias": {0: "batch"}}, opset_version=opset, dynamo=False)
        past = torch.randn(len(d.decoder_layers), 2, d.heads, 3, d.head_dim, generator=g)
        with torch.no_grad():
            memory, memory_bias = _PlainEncoder(d)(image, question)
        torch.onnx.export(_PlainDecoderStep(d).eval(),
                          (torch.randint(3, len(d.vocab), (2, 1), generator=g), torch.full((2, 1), 3), past,
                           past.clone(), memory, memory_bias), str(decoder),
                          input_names=["token", "position", "past_key", "past_value", "memory", "memory_bias"],
                          output_names=["logits", "present_key", "present_value"],
                          dynamic_axes={"token": {0: "batch"}, "position": {0: "batch"},
                                        "past_key": {1: "batch", 3: "past"}, "past_value": {1: "batch", 3: "past"},
                                        "memory": {0: "batch"}, "memory_bias": {0: "batch"},
                                        "logits": {0: "batch"}, "present_key": {1: "batch", 3: "past"},
                                        "present_value": {1: "batch", 3: "past"}},
                          opset_version=opset, dynamo=False)
    for path in (encoder, decoder):
        onnx.checker.check_model(str(path), full_check=True)
    return encoder, decoder
