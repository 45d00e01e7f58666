"""``EncoderDecoderDescription``: what the seq2seq exporter needs of an image + text encoder-decoder.

The exporter (``edgeexit.export.seq2seq``) reads a model only through this description, so it
never imports the zoo; a model hands one over from ``describe()`` (``MuEModel.describe()``), and
another encoder-decoder with the same layer calling conventions exports without touching the
exporter.  Torch appears here only in annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ModelSpecError

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True, eq=False)   # holds modules: compared and hashed by identity
class EncoderDecoderDescription:
    """The parts of an encoder-decoder the seq2seq exporter wraps into graphs, and its sizes.

    Every callable's parameters must belong to ``module`` (each decoder K/V projection's to its
    decoder layer), so tracing records them as weights rather than constants.

    Example:
        >>> export_mue(model.describe(), "mue.eexit")   # doctest: +SKIP
    """

    module: nn.Module                      # owns every parameter below; export puts it in eval mode
    encoder_layers: Sequence[nn.Module]    # layer(hidden, bias) -> hidden; shared by both modalities
    encoder_norm: nn.Module                # hidden -> memory, per token (the memory is the join of its outputs)
    # layer(x, past_key, past_value, self_bias, memory, memory_bias) -> (x, keys, values), keys and values
    # being the past ones with the new positions' appended
    decoder_layers: Sequence[nn.Module]
    # one per decoder layer, weights in that layer: hidden -> (key, value), the self-attention K/V the
    # layer keeps for a position (what kv="copy_hidden" runs for the layers a token skipped)
    decoder_self_kv: Sequence[Callable[[Tensor], tuple[Tensor, Tensor]]]
    embed_image: Callable[[Tensor], Tensor]              # (b, *image_shape) -> (b, image_tokens, width)
    embed_text: Callable[[Tensor], Tensor]               # question ids (b, question_len) -> (b, question_len, width)
    embed_answer: Callable[[Tensor, Tensor], Tensor]     # answer ids, their positions (b, t) -> (b, t, width)
    head: Callable[[Tensor], Tensor]                     # final norm + output projection -> (b, t, len(vocab))
    key_bias: Callable[[Tensor], Tensor]                 # validity (b, t) bool -> additive (b, 1, 1, t): 0 or -1e9
    encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]   # image, question -> memory, validity (plain export)
    vocab: Sequence[str]                   # token strings by id
    pad: int
    bos: int
    eos: int
    image_shape: tuple[int, ...]           # one image, without the batch axis: (1, 28, 28) for MuE
    image_tokens: int                      # tokens embed_image makes of one image
    question_len: int                      # question tokens embed_text takes (its position table's length)
    answer_len: int                        # answer positions embed_answer knows, <bos> and <eos> included
    width: int
    heads: int
    config: Mapping[str, Any] = field(default_factory=dict)   # JSON values, written to the manifest as-is

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_layers", tuple(self.encoder_layers))
        object.__setattr__(self, "decoder_layers", tuple(self.decoder_layers))
        object.__setattr__(self, "decoder_self_kv", tuple(self.decoder_self_kv))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "config", dict(self.config))
        if not self.encoder_layers or not self.decoder_layers:
            raise ModelSpecError(f"an encoder-decoder needs at least one encoder and one decoder layer; got "
                                 f"{len(self.encoder_layers)} and {len(self.decoder_layers)}")
        if len(self.decoder_self_kv) != len(self.decoder_layers):
            raise ModelSpecError(f"decoder_self_kv needs one projection per decoder layer ({len(self.decoder_layers)}),"
                                 f" got {len(self.decoder_self_kv)}")
        if self.heads <= 0 or self.width % self.heads:
            raise ModelSpecError(f"width {self.width} must split evenly into heads {self.heads}")
        for name in ("image_tokens", "question_len", "answer_len"):
            if getattr(self, name) <= 0:
                raise ModelSpecError(f"{name} must be positive, got {getattr(self, name)}")
        special = {"pad": self.pad, "bos": self.bos, "eos": self.eos}
        if any(not 0 <= v < len(self.vocab) for v in special.values()) or len(set(special.values())) != 3:
            raise ModelSpecError(f"pad, bos and eos must be three distinct ids below the vocabulary size "
                                 f"{len(self.vocab)}; got {', '.join(f'{k}={v}' for k, v in special.items())}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class DescribesEncoderDecoder(Protocol):
    """A model that hands the exporter its description (``MuEModel`` does)."""

    def describe(self) -> EncoderDecoderDescription: ...


def as_description(model: EncoderDecoderDescription | DescribesEncoderDecoder) -> EncoderDecoderDescription:
    """``model`` itself when it is a description, else ``model.describe()``."""
    if isinstance(model, EncoderDecoderDescription):
        return model
    describe = getattr(model, "describe", None)
    if not callable(describe):
        raise ModelSpecError(f"cannot export {type(model).__name__!r} as an encoder-decoder: pass an "
                             "EncoderDecoderDescription or a model with describe() returning one (as MuEModel has)")
    description = describe()
    if not isinstance(description, EncoderDecoderDescription):
        raise ModelSpecError(f"{type(model).__name__}.describe() returned a {type(description).__name__}, "
                             "not an EncoderDecoderDescription")
    return description
