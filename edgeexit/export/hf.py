"""Exits on a Hugging Face model folder: any supported text encoder or vision transformer, unchanged.

``export_hf(MODEL_DIR, ...)`` takes what ``AutoConfig`` / ``AutoModel`` (or the folder's own
``...ForSequenceClassification`` / ``...ForImageClassification`` class) load from a local
folder, with depth and width read through optimum's normalized configs:

1. **The graph.** The model is exported once with ``torch.onnx.export`` (eager attention, a
   dynamic batch and token axis) with its hidden states as extra outputs ``hidden_0`` (the
   embeddings) … ``hidden_{L-1}``; the extra outputs are then dropped, so ``full.onnx`` is the
   model's own graph and the names mark where layer l ends.
2. **The stages.** The graph is cut after every exit layer (``attach_onnx``'s cutter: the
   carry is the hidden state plus what later layers read, e.g. BERT's extended mask or
   DeBERTa's relative positions are recomputed where needed).
3. **The heads.** Where the folder holds a classification head, the last exit *is* that
   head (its logits are the transformers model's logits); every earlier exit gets a
   ``highway`` head (DeeBERT: the model's pooler-and-classifier shape on the first token:
   dense, the model's activation, linear; ViT/DeiT: layer norm, linear) or a
   ``masked_mean`` / ``first_token`` / ``mean`` linear head (``pooling``).  A folder without
   a head (a bare encoder such as MiniLM) gets a trained head at the last layer too.  Every
   exit also outputs the ``halt`` and ``gate`` signals (package format version 8) that the
   ``q_exit`` and ``gate`` policies score.
4. **Training.** Heads only on the frozen model's features (default), or PABEE-style joint
   fine-tuning of every layer with exit losses weighted by depth (``finetune=True``).

ALBERT shares one layer's weights across its depth; cut into stages, every stage graph
holds its own copy of them (onnxruntime loads each stage on its own), so a package of an
L-layer ALBERT stores about L copies (``docs/HF.md`` gives the sizes).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import (
    ExportValidationError,
    InputFileError,
    MissingExtraError,
    ModelSpecError,
    UnsupportedModelError,
)
from ..package import SIGNALS_VERSION, Package, check_replaceable
from ..policies import check_thresholds, get_policy
from .attach_onnx import (
    _analyse,
    _check_stage,
    _cut,
    _fresh,
    _manifest,
    _order_cuts,
    _run_stages,
    _sessions,
    _splice,
    torchscript_to_onnx,
    write_cut_package,
)
from .exit_signals import SIGNALS, fit_gates, fit_halting, fit_linear, gate_features, halting_head
from .exit_signals import out_of_fold_logits as oof_logits

# model_type -> (modality, the activation of its classification head: the highway heads' shape)
SUPPORTED: dict[str, tuple[str, str]] = {
    "bert": ("text", "tanh"),          # BERT, MiniLM (a BERT config), and their fine-tuned classifiers
    "distilbert": ("text", "relu"),
    "roberta": ("text", "tanh"),
    "xlm-roberta": ("text", "tanh"),
    "albert": ("text", "tanh"),
    "electra": ("text", "gelu"),
    "deberta-v2": ("text", "gelu"),
    "vit": ("image", "layernorm"),
    "deit": ("image", "layernorm"),
}
POOLINGS = ("highway", "masked_mean", "first_token", "mean")
DEFAULT_MAX_TOKENS = 128
OPSET = 18
TOKENIZER_FILE = "tokenizer.json"
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


# --- the model folder -------------------------------------------------------------------


@dataclass
class HFModel:
    """A model folder as loaded: the torch model (eval mode), what it is, and its sizes."""

    folder: Path
    config: Any
    model: nn.Module
    model_type: str
    modality: str                      # "text" or "image"
    activation: str                    # the classification head's activation (highway heads copy it)
    has_head: bool                     # the folder holds a classification head: the last exit is it
    layers: int
    width: int
    labels: list[str] | None           # the config's id2label, where it names the classes
    image: dict[str, Any] = field(default_factory=dict)   # image processor settings (size, mean, std)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingExtraError("export hf needs transformers: pip install 'edgeexit[transformers]'") from exc
    return transformers


def depth_and_width(config: Any) -> tuple[int, int]:
    """Layers and hidden size of a Hugging Face config, through optimum's normalized config
    (attribute names differ: DistilBERT's ``n_layers``/``dim``)."""
    try:
        from optimum.utils import NormalizedConfigManager

        normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        return int(normalized.num_layers), int(normalized.hidden_size)
    except Exception:   # optimum absent, or too old/new for this transformers: the configs' own attributes
        return int(config.num_hidden_layers), int(config.hidden_size)


def _config_labels(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)] if id2label else []
    if not names or all(_DEFAULT_LABEL.fullmatch(n) for n in names):
        return None
    return names


def _image_settings(folder: Path, config: Any) -> dict[str, Any]:
    import json

    size = int(getattr(config, "image_size", 224))
    settings: dict[str, Any] = {"size": [size, size], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                "rescale": 1 / 255, "layout": "NCHW",
                                "channels": int(getattr(config, "num_channels", 3))}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputFileError(f"{path} is not readable JSON: {exc}") from None
        for key, ours in (("image_mean", "mean"), ("image_std", "std"), ("rescale_factor", "rescale")):
            if raw.get(key) is not None:
                settings[ours] = raw[key]
    return settings


def load_hf(folder: str | os.PathLike[str]) -> HFModel:
    """Load a local model folder (``config.json`` + weights) with transformers, eager attention.

    Raises:
        InputFileError: no ``config.json`` in the folder.
        UnsupportedModelError: a ``model_type`` outside ``SUPPORTED`` (the message lists them).
    """
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise InputFileError(f"{root} is not a Hugging Face model folder (no config.json); pass the folder that "
                             "save_pretrained wrote")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(root), local_files_only=True)
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"{root}: model_type {model_type!r} is not supported by export hf; supported: "
            f"{', '.join(sorted(SUPPORTED))} (MiniLM is a 'bert' config). For another network, export it to ONNX "
            "and use `edgeexit attach MODEL.onnx --at TENSOR`")
    modality, activation = SUPPORTED[model_type]
    head_suffix = "ForSequenceClassification" if modality == "text" else "ForImageClassification"
    head_class = next((a for a in getattr(config, "architectures", None) or [] if head_suffix in a), None)
    cls = getattr(tf, head_class, None) if head_class else tf.AutoModel
    if cls is None:
        raise UnsupportedModelError(f"{root}: config.json names {head_class}, which this transformers "
                                    f"({tf.__version__}) does not have")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls.from_pretrained(str(root), local_files_only=True, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise InputFileError(f"transformers cannot load {root}: {str(exc).splitlines()[0][:300]}") from None
    layers, width = depth_and_width(config)
    return HFModel(root, config, model.eval(), model_type, modality, activation, head_class is not None, layers,
                   width, _config_labels(config) if head_class else None,
                   _image_settings(root, config) if modality == "image" else {})


# --- exit heads -------------------------------------------------------------------------


class HFExitHead(nn.Module):
    """An early exit on a layer's hidden states (batch, tokens, width): pool, classify, and the
    two signals.  ``forward(hidden, previous, mask)`` returns (logits, halt, gate), the signals
    (batch, 1); ``previous`` is the previous exit's hidden states (the embeddings for the first),
    which PALBERT's halting head reads pooled beside this exit's."""

    def __init__(self, pooling: str, width: int, classes: int, activation: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelSpecError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        if pooling != "highway":
            self.classifier: nn.Module = nn.Linear(width, classes)
        elif activation == "layernorm":
            self.classifier = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(width, width), _ACTIVATIONS[activation](),
                                            nn.Linear(width, classes))
        self.halting = halting_head(width)
        self.gate = nn.Linear(4, 1)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "masked_mean":
            if mask is None:
                raise ModelSpecError("a masked_mean head needs the attention mask")
            m = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        if self.pooling == "mean":
            return hidden.mean(dim=1)
        return hidden[:, 0]

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.pool(hidden, mask)
        logits = self.classifier(pooled)
        halt = torch.sigmoid(self.halting(torch.cat([pooled, self.pool(previous, mask)], dim=1)))
        return logits, halt, torch.sigmoid(self.gate(gate_features(logits)))


class LastExitSignals(nn.Module):
    """The last exit's signals, from its logits: halt = 1 (PonderNet's lambda_N; the last exit
    always answers) and JEI-DNN's gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 1)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(logits[:, :1]), torch.sigmoid(self.gate(gate_features(logits)))


class _WithHiddenStates(nn.Module):
    """The model as one graph: (input_ids, attention_mask) or (pixel_values,) -> (logits, hidden_0 …
    hidden_{L-1}); a folder without a classification head gets ``last`` on the last layer."""

    def __init__(self, hf: HFModel, last: HFExitHead | None) -> None:
        super().__init__()
        self.model, self.text, self.last = hf.model, hf.modality == "text", last

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = inputs[1] if self.text else None
        kw = {"input_ids": inputs[0], "attention_mask": inputs[1]} if self.text else {"pixel_values": inputs[0]}
        out = self.model(**kw, output_hidden_states=True)
        hidden = out.hidden_states
        logits = out.logits if self.last is None else self.last(hidden[-1], hidden[-2], mask)[0]
        return (logits, *hidden[:-1])


# --- data ------------------------------------------------------------------------------


@dataclass
class _Data:
    """Training or validation samples: texts (tokenized per batch) or images (N, C, H, W) float32."""

    texts: list[str] | None
    images: np.ndarray | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _max_positions(hf: HFModel) -> int | None:
    """How many tokens the model's position embeddings cover (RoBERTa-style models number positions from
    pad_token_id + 1, so they lose those)."""
    size = getattr(hf.config, "max_position_embeddings", None)
    if not isinstance(size, int) or size <= 0:
        return None
    if hf.model_type in ("roberta", "xlm-roberta"):
        size -= int(getattr(hf.config, "pad_token_id", 1) or 0) + 1
    return size


def _tokenizer(hf: HFModel, max_tokens: int) -> tuple[Any, int]:
    path = hf.folder / TOKENIZER_FILE
    if not path.is_file():
        raise InputFileError(f"{hf.folder} has no {TOKENIZER_FILE} (the fast tokenizer the package ships); write "
                             "it with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    from ..runtime._text import load_tokenizer_bytes

    pad = getattr(hf.config, "pad_token_id", None)
    return load_tokenizer_bytes(path.read_bytes(), max_tokens), int(pad) if pad is not None else 0


def _batches(data: _Data, order: np.ndarray, batch_size: int, tokenizer: Any, pad_id: int
             ) -> list[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
    from ..runtime._text import encode_batch

    out: list[tuple[np.ndarray, tuple[torch.Tensor, ...]]] = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if data.texts is not None:
            ids, mask = encode_batch(tokenizer, [data.texts[i] for i in rows], pad_id)
            out.append((rows, (torch.from_numpy(ids), torch.from_numpy(mask))))
        else:
            assert data.images is not None
            out.append((rows, (torch.from_numpy(np.ascontiguousarray(data.images[rows])),)))
    return out


def _by_length(data: _Data) -> np.ndarray:
    if data.texts is None:
        return np.arange(len(data))
    return np.argsort([len(t) for t in data.texts], kind="stable")


def _features(hf: HFModel, data: _Data, layers: Sequence[int], pooling: str, tokenizer: Any, pad_id: int,
              batch_size: int, say: Callable[[str], None]) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """The pooled hidden states after each layer in ``layers`` (0: the embeddings) for every sample,
    and the model's own logits where it has a head; texts batched by length."""
    pool = HFExitHead(pooling, hf.width, 2, hf.activation).pool
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    logits: list[np.ndarray] = []
    order = _by_length(data)
    done = 0
    with torch.no_grad():
        for rows, inputs in _batches(data, order, batch_size, tokenizer, pad_id):
            mask = inputs[1] if len(inputs) > 1 else None
            kw = {"input_ids": inputs[0], "attention_mask": inputs[1]} if mask is not None else \
                {"pixel_values": inputs[0]}
            out = hf.model(**kw, output_hidden_states=True)
            for layer in layers:
                parts[layer].append(pool(out.hidden_states[layer], mask).numpy())
            if hf.has_head:
                logits.append(out.logits.float().numpy())
            done += len(rows)
            if done == len(order) or len(parts[layers[0]]) % 20 == 0:
                say(f"  features: {done:,}/{len(order):,} samples")
    back = np.argsort(order)
    return ({layer: np.concatenate(p)[back] for layer, p in parts.items()},
            np.concatenate(logits)[back] if logits else None)


def _finetune(hf: HFModel, heads: Sequence[HFExitHead], exit_layers: Sequence[int], data: _Data, tokenizer: Any,
              pad_id: int, *, epochs: int, lr: float, head_lr: float, batch_size: int, seed: int,
              say: Callable[[str], None]) -> list[float]:
    """PABEE's joint fine-tuning: every layer and head trained on sum_k l_k * CE_k / sum_k l_k (exit k
    after layer l_k), the model's own classifier as the last exit where it has one."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    weights = torch.tensor([float(layer) for layer in exit_layers])
    weights = weights / weights.sum()
    opt = torch.optim.AdamW([{"params": hf.model.parameters(), "lr": lr},
                             {"params": [p for h in heads for p in h.parameters()], "lr": head_lr}],
                            weight_decay=0.01)
    y_all = torch.from_numpy(data.labels)
    losses = []
    hf.model.train()
    for h in heads:
        h.train()
    try:
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for rows, inputs in _batches(data, gen.permutation(len(data)), batch_size, tokenizer, pad_id):
                mask = inputs[1] if len(inputs) > 1 else None
                kw = {"input_ids": inputs[0], "attention_mask": inputs[1]} if mask is not None else \
                    {"pixel_values": inputs[0]}
                out = hf.model(**kw, output_hidden_states=True)
                hidden = out.hidden_states
                y = y_all[torch.from_numpy(rows)]
                per_exit = []
                for k, layer in enumerate(exit_layers):
                    if k == len(exit_layers) - 1 and hf.has_head:
                        z = out.logits
                    else:
                        previous = hidden[exit_layers[k - 1]] if k else hidden[0]
                        z = heads[k](hidden[layer], previous, mask)[0]
                    per_exit.append(nn.functional.cross_entropy(z, y))
                loss = (torch.stack(per_exit) * weights).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
            losses.append(total / max(seen, 1))
            say(f"  fine-tuning epoch {epoch + 1}/{epochs}: weighted exit loss {losses[-1]:.4f}")
    finally:
        hf.model.eval()
        for h in heads:
            h.eval()
    return losses


# --- graphs -----------------------------------------------------------------------------


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: Sequence[str], outputs: Sequence[str],
            axes: Mapping[str, Mapping[int, str]], what: str) -> onnx.ModelProto:
    return torchscript_to_onnx(module, args, names, outputs, axes, OPSET, what)


def _input_axes(text: bool) -> tuple[list[str], dict[str, dict[int, str]]]:
    if text:
        return ["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "tokens"},
                                                  "attention_mask": {0: "batch", 1: "tokens"}}
    return ["pixel_values"], {"pixel_values": {0: "batch"}}


def _head_graph(head: HFExitHead, hidden: torch.Tensor, previous: torch.Tensor, mask: torch.Tensor | None
                ) -> onnx.ModelProto:
    token_axes = {0: "batch", 1: "tokens"}
    names = ["feature", "previous"] + (["mask"] if mask is not None else [])
    axes: dict[str, dict[int, str]] = {"feature": token_axes, "previous": token_axes,
                                       **({"mask": token_axes} if mask is not None else {}),
                                       "logits": {0: "batch"}, "halt": {0: "batch"}, "gate": {0: "batch"}}
    args = (hidden, previous) + ((mask,) if mask is not None else ())
    return _export(head, args, names, ["logits", "halt", "gate"], axes, "an exit head")


# --- the recipe --------------------------------------------------------------------------


@dataclass
class HFExport:
    """What ``export_hf`` did: the package, the exits' layers, and the training figures."""

    package: Package
    exit_layers: list[int]
    labels: list[str]
    train_accuracy: list[float]
    finetune_losses: list[float]
    heads: list[HFExitHead]            # the early exits' heads (and the last one's, for a folder without a head)
    last_signals: LastExitSignals


def _exit_layers(exits_at: Sequence[int] | None, layers: int) -> list[int]:
    chosen = sorted(set(int(v) for v in exits_at)) if exits_at else list(range(1, layers + 1))
    bad = [v for v in chosen if not 1 <= v <= layers]
    if bad:
        raise ModelSpecError(f"exits_at {bad}: the model has layers 1 to {layers}; an exit goes after one of them")
    return chosen if chosen[-1] == layers else [*chosen, layers]


def export_hf(
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    texts: Sequence[str] | None = None,
    images: np.ndarray | None = None,
    labels: Sequence[str] | Sequence[int] | np.ndarray,
    exits_at: Sequence[int] | None = None,
    pooling: str = "highway",
    finetune: bool = False,
    epochs: int = 60,
    lr: float = 3e-3,
    finetune_epochs: int = 2,
    finetune_lr: float = 2e-5,
    batch_size: int = 32,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    policy: str = "entropy",
    thresholds: Sequence[float | None] | None = None,
    name: str | None = None,
    compile: bool | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> HFExport:
    """Exits on the Hugging Face model in ``model_dir``, trained on the user's labelled data.

    Args:
        model_dir: a local folder ``save_pretrained`` wrote (``config.json``, weights, and for
            text ``tokenizer.json``); ``model_type`` one of ``SUPPORTED``.
        output: the package directory (replaced only with ``overwrite``, when it is a package).
        texts / images: the training samples: texts, or images (N, C, H, W) float32, already
            resized and normalized as the model's image processor does.
        labels: one per sample: class names (matched to the config's ``id2label`` where it has
            them) or integer indices.
        exits_at: the layers (1 … L) to put an exit after; default every layer.  The last
            layer always has one (the model's classifier, or a trained head).
        pooling: the early exits' heads: ``highway`` (the model's head shape on the first
            token), ``masked_mean`` (text), ``first_token`` or ``mean`` (images).
        finetune: PABEE-style joint fine-tuning of all layers (``finetune_epochs``,
            ``finetune_lr``) before the heads-only fit; default heads only, encoder frozen.
        epochs, lr: the heads' full-batch AdamW fit (``epochs * 10`` steps).
        max_tokens: where the shipped tokenizer cuts a text.
        policy, thresholds: the exit policy; thresholds None keeps the exits disabled until
            ``edgeexit calibrate`` chooses them.

    Example:
        >>> export_hf("my-bert/", "bert.eexit", texts=texts, labels=labels)   # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    check_replaceable(output, overwrite=overwrite)
    pol = get_policy(policy)
    hf = load_hf(model_dir)
    text = hf.modality == "text"
    if pooling not in POOLINGS or (text and pooling == "mean") or (not text and pooling == "masked_mean"):
        allowed = [p for p in POOLINGS if p != ("mean" if text else "masked_mean")]
        raise ModelSpecError(f"pooling {pooling!r} does not fit a {hf.modality} model; choose one of {allowed}"
                             + (" (a plain mean would average the padding of a batch)" if pooling == "mean" else ""))
    if (texts is None) == (images is None) or (texts is not None) != text:
        raise ModelSpecError(f"{hf.folder} is a {hf.modality} model: pass {'texts' if text else 'images'}=... only")
    if images is not None:
        images = np.asarray(images)
        want = (hf.image["channels"], *hf.image["size"])
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.float32:
            raise ModelSpecError(f"images must be float32 (N, {', '.join(map(str, want))}), resized and normalized "
                                 f"as the model's image processor does; got {images.dtype} {images.shape}")
    exit_layers = _exit_layers(exits_at, hf.layers)
    values = check_thresholds(pol, [None] * (len(exit_layers) - 1) if thresholds is None else thresholds,
                              len(exit_layers) - 1, allow_disabled=True)
    from ..datafiles import label_indices

    values_ = [str(v) for v in labels]
    names = hf.labels
    if hf.has_head and names is None and all(v.isdigit() for v in values_):   # indices into the model's classes
        names = [str(i) for i in range(int(hf.config.num_labels))]
    y, label_names = label_indices(values_, names)
    classes = int(hf.config.num_labels) if hf.has_head else len(label_names)
    if len(label_names) != classes:
        raise ModelSpecError(f"the data has {len(label_names)} classes {label_names[:10]} but the model's classifier "
                             f"has {classes} and its config no id2label to match them by name; label the rows 0 to "
                             f"{classes - 1}, or save id2label in config.json")
    if len(y) < 2:
        raise ModelSpecError(f"need at least 2 labelled samples, got {len(y)}")
    data = _Data(list(texts) if texts is not None else None, images, y)
    if text:
        positions = _max_positions(hf)
        if positions is not None and max_tokens > positions:
            say(f"max_tokens {max_tokens} -> {positions}: the model has position embeddings for {positions} tokens")
            max_tokens = positions
    tokenizer, pad_id = _tokenizer(hf, max_tokens) if text else (None, 0)
    say(f"{hf.folder.name}: {hf.model_type}, {hf.layers} layers of width {hf.width}; exits after layers "
        f"{exit_layers} ({'the last is the model’s own classifier' if hf.has_head else 'every head trained here'})")

    torch.manual_seed(seed)
    early = exit_layers[:-1]
    heads = [HFExitHead(pooling, hf.width, classes, hf.activation) for _ in (early if hf.has_head else exit_layers)]
    finetune_losses: list[float] = []
    if finetune:
        finetune_losses = _finetune(hf, heads, exit_layers, data, tokenizer, pad_id, epochs=finetune_epochs,
                                    lr=finetune_lr, head_lr=1e-3, batch_size=batch_size, seed=seed, say=say)
    needed = sorted({0, *exit_layers})
    say(f"pooled features of {len(data):,} samples after layers {needed} ...")
    pooled, model_logits = _features(hf, data, needed, pooling, tokenizer, pad_id, batch_size, say)
    accuracy = []
    for k, head in enumerate(heads):
        layer = exit_layers[k]
        fit_linear(head.classifier, pooled[layer], y, classes, epochs=epochs, lr=lr, weight_decay=1e-3)
        with torch.no_grad():
            z = head.classifier(torch.from_numpy(pooled[layer]))
        accuracy.append(float((z.argmax(1).numpy() == y).mean()))
    if model_logits is not None:
        accuracy.append(float((model_logits.argmax(1) == y).mean()))
    say("  training accuracy per exit: " + ", ".join(f"{a:.3f}" for a in accuracy))
    # the signals judge new samples: out-of-fold linear probes for the trained exits
    oof = oof_logits([pooled[layer] for layer in (early if hf.has_head else exit_layers)], y, classes, seed=seed)
    if model_logits is not None:
        oof.append(model_logits)
    prev = [0, *exit_layers[:-1]]
    halting_inputs = [np.concatenate([pooled[layer], pooled[p]], axis=1) for layer, p in zip(exit_layers, prev)]
    halting = [h.halting for h in heads[:len(early)]] + [halting_head(hf.width)]
    last_signals = LastExitSignals()
    fit_halting(halting, halting_inputs, oof, y, seed=seed)
    fit_gates([h.gate for h in heads[:len(early)]] + [last_signals.gate], oof, y, seed=seed)

    package = _write(hf, output, heads, last_signals, exit_layers, pooling, data, tokenizer, pad_id, max_tokens,
                     label_names, classes, pol.name, values, name, compile, atol, rtol, overwrite, say,
                     {"samples": len(data), "epochs": epochs, "lr": lr, "seed": seed, "finetune": finetune,
                      **({"finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr} if finetune else {})})
    return HFExport(package, exit_layers, label_names, accuracy, finetune_losses, heads, last_signals)


def _write(hf: HFModel, output: str | os.PathLike[str], heads: Sequence[HFExitHead], last_signals: LastExitSignals,
           exit_layers: Sequence[int], pooling: str, data: _Data, tokenizer: Any, pad_id: int, max_tokens: int,
           label_names: Sequence[str], classes: int, policy: str, thresholds: Sequence[float | None],
           name: str | None, compile: bool | None, atol: float, rtol: float, overwrite: bool,
           say: Callable[[str], None], trained: Mapping[str, Any]) -> Package:
    """Export, cut, splice the heads, check every exit against transformers, write the package."""
    text = hf.modality == "text"
    early = list(exit_layers[:-1])
    example_rows = np.arange(min(len(data), 8))
    _, example = _batches(data, _by_length(data)[example_rows], len(example_rows), tokenizer, pad_id)[0]
    names, axes = _input_axes(text)
    hidden_names = [f"hidden_{k}" for k in range(hf.layers)]
    wrapper = _WithHiddenStates(hf, None if hf.has_head else heads[-1]).eval()
    say("exporting the model with torch.onnx.export ...")
    proto = _export(wrapper, example, names, ["logits", *hidden_names],
                    {**axes, "logits": {0: "batch"}, **{h: {0: "batch"} for h in hidden_names}}, "the model")
    del proto.graph.output[1:]   # the hidden states stay as named tensors inside the graph
    feeds = {n: t.numpy() for n, t in zip(names, example)}
    g = _analyse(proto, "logits", feeds)
    cuts = _order_cuts(g, [f"hidden_{layer}" for layer in early]) if early else []
    mask_name = "attention_mask" if text and pooling == "masked_mean" else None
    source = proto.SerializeToString()
    cut = _cut(g, source, cuts, {k: [mask_name] for k in range(len(cuts))} if mask_name else {})
    stage_models: list[onnx.ModelProto] = []
    signal_names: list[dict[str, str]] = []
    with torch.no_grad():
        out = hf.model(**({"input_ids": example[0], "attention_mask": example[1]} if text else
                          {"pixel_values": example[0]}), output_hidden_states=True)
    for k, layer in enumerate(early):
        previous = f"hidden_{exit_layers[k - 1]}" if k else "hidden_0"
        stage = cut.stages[k]
        taken = {o for n in stage.model.graph.node for o in n.output}
        outs = {"logits": stage.logits, "halt": _fresh(f"halt{k}", taken), "gate": _fresh(f"gate{k}", taken)}
        mask_t = example[1] if mask_name else None
        graph = _head_graph(heads[k], out.hidden_states[layer], out.hidden_states[exit_layers[k - 1] if k else 0],
                            mask_t)
        wiring = {"feature": f"hidden_{layer}", "previous": previous, **({"mask": mask_name} if mask_name else {})}
        spliced = _splice(stage, graph, f"edgeexit_exit{k}/", wiring, outs)
        _check_stage(spliced, f"stage {k} with its exit head")
        stage_models.append(spliced)
        signal_names.append({s: outs[s] for s in SIGNALS})
    last = cut.stages[-1]
    taken = {o for n in last.model.graph.node for o in n.output}
    outs = {s: _fresh(f"{s}{len(early)}", taken) for s in SIGNALS}
    signals_graph = _export(last_signals, (out.logits if hf.has_head else wrapper(*example)[0],), ["logits"],
                            list(SIGNALS), {"logits": {0: "batch"}, "halt": {0: "batch"}, "gate": {0: "batch"}},
                            "the last exit's signals")
    spliced = _splice(last, signals_graph, f"edgeexit_exit{len(early)}/", {"logits": "logits"}, outs)
    _check_stage(spliced, "the last stage with its signals")
    stage_models.append(spliced)
    signal_names.append(outs)
    _check_parity(hf, wrapper, heads, cut, stage_models, exit_layers, data, tokenizer, pad_id, mask_name, atol,
                  rtol, say)

    kinds = ["first_token" if pooling == "highway" else pooling] * len(early)
    manifest = _manifest(cut, stage_models, kinds, thresholds, policy, list(label_names), name or hf.folder.name,
                         hf.folder / "model", dict(trained))
    manifest["format_version"] = SIGNALS_VERSION
    for k, stage in enumerate(manifest["stages"]):
        stage["exit"]["signals"] = signal_names[k]
        if k < len(early) and pooling == "highway":   # the highway's dense layer (ViT's: a layer norm)
            extra = 2 * hf.width * hf.width if hf.activation != "layernorm" else 4 * hf.width
            stage["cost"]["flops"] += extra
            stage["cost"]["exit_flops"] += extra
    import transformers

    manifest["producer"]["transformers"] = transformers.__version__
    manifest["attach"] = {"source": "huggingface", "model_type": hf.model_type, "layers": hf.layers,
                          "exits_at": list(exit_layers), "heads": pooling,
                          "last_exit": "the model's classifier" if hf.has_head else f"a trained {pooling} head",
                          **trained}
    files_extra: dict[str, Path] = {}
    if text:
        manifest["text"] = {"tokenizer": TOKENIZER_FILE, "ids": "input_ids", "mask": "attention_mask",
                            "max_tokens": max_tokens, "pad_id": pad_id}
        manifest["preprocessing"] = {"text": f"tokenized with the shipped {TOKENIZER_FILE}, cut to {max_tokens} "
                                             f"tokens; early exits pool the hidden states ({pooling})"}
        files_extra[TOKENIZER_FILE] = hf.folder / TOKENIZER_FILE
    else:
        manifest["preprocessing"] = {"image": dict(hf.image)}
    return write_cut_package(output, manifest, stage_models, source, compile=compile, overwrite=overwrite, say=say,
                             extra_files=files_extra)


def _check_parity(hf: HFModel, wrapper: nn.Module, heads: Sequence[HFExitHead], cut: Any,
                  stage_models: Sequence[onnx.ModelProto], exit_layers: Sequence[int], data: _Data, tokenizer: Any,
                  pad_id: int, mask_name: str | None, atol: float, rtol: float, say: Callable[[str], None]) -> None:
    """Every exit in onnxruntime against transformers: exit k = its head on ``output_hidden_states``,
    the last exit = the model's own logits; on up to 16 samples in one padded batch."""
    text = hf.modality == "text"
    rows, inputs = _batches(data, np.arange(min(len(data), 16)), 16, tokenizer, pad_id)[0]
    feeds = {n: t.numpy() for n, t in zip(_input_axes(text)[0], inputs)}
    mask = inputs[1] if mask_name else None
    with torch.no_grad():
        out = hf.model(**({"input_ids": inputs[0], "attention_mask": inputs[1]} if text else
                          {"pixel_values": inputs[0]}), output_hidden_states=True)
        hidden = out.hidden_states
        expected = [heads[k](hidden[layer], hidden[exit_layers[k - 1] if k else 0], mask)[0].numpy()
                    for k, layer in enumerate(exit_layers[:-1])]
        expected.append(wrapper(*inputs)[0].numpy())
    names = [s.logits for s in cut.stages]
    got = _run_stages(_sessions(stage_models), cut.stages, feeds, lambda k: [*cut.stages[k].carry, names[k]])
    full = ort.InferenceSession(cut.source, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    failures = []
    say(f"checking every exit against transformers on {len(rows)} samples:")
    for k, (values, ref) in enumerate(zip([*got, [full]], [*expected, expected[-1]])):
        diff = float(np.max(np.abs(values[-1].astype(np.float64) - ref)))
        bound = atol + rtol * float(np.max(np.abs(ref)))
        what = "full.onnx" if k == len(got) else f"exit {k} (after layer {exit_layers[k]})"
        ok = values[-1].shape == ref.shape and diff <= bound
        say(f"  {what:<26} max |onnxruntime - transformers| = {diff:.2e} (tolerance {bound:.1e})  "
            f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{what}: {diff:.3e} > {bound:.1e}")
    if failures:
        raise ExportValidationError(f"{len(failures)} exit(s) differ from transformers: {'; '.join(failures)}")


__all__ = ["POOLINGS", "SUPPORTED", "HFExitHead", "HFExport", "HFModel", "LastExitSignals", "depth_and_width",
           "export_hf", "load_hf"]
