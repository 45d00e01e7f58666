"""MuE's model, small: a unified vision-language encoder-decoder with exits at every layer.

Built the way MuE ("You Need Multiple Exiting", CVPR 2023) builds on OFA:

- image patches (7 x 7 of a 28 x 28 digit) and question tokens are embedded into one width;
- the encoder layers are shared (tied) between the modalities, which run through them
  separately, so each modality can leave the stack on its own;
- the decoder has self-attention over the generated tokens (written here with an explicit
  key/value cache, which ``nn.TransformerDecoderLayer`` lacks) and cross-attention over the
  concatenated encoder outputs;
- one final norm and output projection is shared by every decoder layer, and training puts
  equal-weight cross-entropy on every decoder layer's output (MuE's layer-wise task loss), so
  any layer can answer.

Pre-norm layers; the decoder's self-attention keys and values of a position are
``W_k LN(h)`` and ``W_v LN(h)`` of the hidden state ``h`` entering the layer, which is also
what ``copy_hidden`` (CALM's propagation) computes for layers a token skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn

from ..export.seq2seq_model import EncoderDecoderDescription
from .mue_task import BOS, EOS, MAX_ANSWER, MAX_QUESTION, PAD, VOCAB

PATCH = 7
IMAGE_TOKENS = (28 // PATCH) ** 2


@dataclass(frozen=True)
class MuEConfig:
    width: int = 64
    heads: int = 4
    ff: int = 128
    encoder_layers: int = 6
    decoder_layers: int = 6
    vocab: int = len(VOCAB)
    question_len: int = MAX_QUESTION
    answer_len: int = MAX_ANSWER

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head attention with separate projections, so K/V can be computed and cached alone."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:   # (b, t, d) -> (b, h, t, dh)
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.dh).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias``: additive, broadcast to (b, h, tq, tk): 0 where allowed, a large negative where not."""
        q = self.split(self.q(q_in))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + bias
        out = torch.softmax(scores, dim=-1) @ v
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.dh))


class EncoderLayer(nn.Module):
    def __init__(self, c: MuEConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.attn = Attention(c.width, c.heads)
        self.ff = nn.Sequential(nn.Linear(c.width, c.ff), nn.GELU(), nn.Linear(c.ff, c.width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.attn.kv(h)
        x = x + self.attn.attend(h, k, v, bias)
        return x + self.ff(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: MuEConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c.width) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(c.width, c.heads), Attention(c.width, c.heads)
        self.ff = nn.Sequential(nn.Linear(c.width, c.ff), nn.GELU(), nn.Linear(c.ff, c.width))

    def self_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values this layer keeps for positions whose input hidden state is ``x``."""
        return self.self_attn.kv(self.norm1(x))

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, self_bias: torch.Tensor,
                memory: torch.Tensor, memory_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New positions ``x`` (b, t, d) after ``past`` cached ones; returns (out, keys, values) with
        the new positions' keys and values appended."""
        h = self.norm1(x)
        k_new, v_new = self.self_attn.kv(h)
        k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
        x = x + self.self_attn.attend(h, k, v, self_bias)
        mk, mv = self.cross_attn.kv(memory)
        x = x + self.cross_attn.attend(self.norm2(x), mk, mv, memory_bias)
        return x + self.ff(self.norm3(x)), k, v


NEG = -1e9   # an additive mask value that survives float32 softmax without NaN


class MuEModel(nn.Module):
    """The whole model; ``forward`` is the training pass (teacher forcing, logits of every decoder layer)."""

    def __init__(self, config: MuEConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or MuEConfig()
        self.patch = nn.Linear(PATCH * PATCH, c.width)
        self.image_pos = nn.Parameter(torch.randn(IMAGE_TOKENS, c.width) * 0.02)
        self.text = nn.Embedding(c.vocab, c.width)
        self.text_pos = nn.Parameter(torch.randn(c.question_len, c.width) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))   # tied across modalities
        self.encoder_norm = nn.LayerNorm(c.width)
        self.answer = nn.Embedding(c.vocab, c.width)
        self.answer_pos = nn.Parameter(torch.randn(c.answer_len, c.width) * 0.02)
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.final_norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.vocab)

    # --- pieces, each one exported graph -------------------------------------------------

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """(b, 1, 28, 28) -> (b, 16, d): 7 x 7 patches, row-major."""
        b = image.shape[0]
        patches = image.reshape(b, 4, PATCH, 4, PATCH).permute(0, 1, 3, 2, 4).reshape(b, IMAGE_TOKENS, PATCH * PATCH)
        return self.patch(patches) + self.image_pos

    def embed_text(self, question: torch.Tensor) -> torch.Tensor:
        return self.text(question) + self.text_pos[: question.shape[1]]

    def embed_answer(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Tokens (b, t) at positions (b, t) -> (b, t, d)."""
        return self.answer(tokens) + self.answer_pos[position]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.final_norm(hidden))

    @staticmethod
    def key_bias(valid: torch.Tensor) -> torch.Tensor:
        """(b, t) validity -> additive (b, 1, 1, t)."""
        return torch.where(valid, 0.0, NEG)[:, None, None, :].to(torch.float32)

    def encode(self, image: torch.Tensor, question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All encoder layers on each modality; memory (b, 16 + q, d) and its validity (b, 16 + q)."""
        img = self.embed_image(image)
        txt_valid = question != PAD
        txt = self.embed_text(question)
        img_bias = torch.zeros(img.shape[0], 1, 1, img.shape[1])
        txt_bias = self.key_bias(txt_valid)
        for layer in self.encoder:
            img, txt = layer(img, img_bias), layer(txt, txt_bias)
        memory = self.encoder_norm(torch.cat([img, txt], dim=1))
        valid = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool), txt_valid], dim=1)
        return memory, valid

    def describe(self) -> EncoderDecoderDescription:
        """What ``edgeexit.export.seq2seq`` exports of this model (it reads nothing else)."""
        c = self.config
        decoder = cast("list[DecoderLayer]", list(self.decoder))
        return EncoderDecoderDescription(
            module=self, encoder_layers=tuple(self.encoder), encoder_norm=self.encoder_norm, decoder_layers=decoder,
            decoder_self_kv=[layer.self_kv for layer in decoder],
            embed_image=self.embed_image, embed_text=self.embed_text, embed_answer=self.embed_answer,
            head=self.head, key_bias=self.key_bias, encode=self.encode,
            vocab=VOCAB, pad=PAD, bos=BOS, eos=EOS, image_shape=(1, 28, 28), image_tokens=IMAGE_TOKENS,
            question_len=c.question_len, answer_len=c.answer_len, width=c.width, heads=c.heads, config=c.to_dict())

    def forward(self, image: torch.Tensor, question: torch.Tensor, answer_in: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing on ``answer_in`` (b, t): the logits of every decoder layer, each (b, t, vocab)."""
        memory, valid = self.encode(image, question)
        b, t = answer_in.shape
        x = self.embed_answer(answer_in, torch.arange(t).expand(b, t))
        causal = torch.triu(torch.full((t, t), NEG), diagonal=1)[None, None]
        empty = torch.zeros(b, self.config.heads, 0, self.config.width // self.config.heads)
        mem_bias = self.key_bias(valid)
        outs = []
        for layer in self.decoder:
            x, _, _ = layer(x, empty, empty, causal, memory, mem_bias)
            outs.append(self.head(x))
        return outs


def train_mue(model: MuEModel, splits, *, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3,  # type: ignore[no-untyped-def]
              seed: int = 0, progress=None) -> list[float]:
    """MuE's layer-wise task loss: mean cross-entropy over every decoder layer's output (pad ignored).
    Returns the mean training loss per epoch."""
    torch.manual_seed(seed)
    data = splits.train
    image, question, answer = (torch.from_numpy(a) for a in (data.image, data.question, data.answer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            outs = model(image[idx], question[idx], answer[idx, :-1])
            target = answer[idx, 1:]
            loss = sum(loss_fn(o.reshape(-1, o.shape[-1]), target.reshape(-1)) for o in outs) / len(outs)
            opt.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if progress is not None:
                progress(len(idx))
        history.append(total / count)
    model.eval()
    return history
