"""Generation with MuE's exits for a ``seq2seq`` package (numpy + onnxruntime, no torch).

Encoder: each modality (image patches, question tokens) runs through the shared encoder
layers on its own; after each layer, the cosine similarity between the layer's output and
its input (per sample, over the whole flattened tensor, padding left out) is compared with
that modality's threshold, and a sample whose similarity exceeds it stops there for that
modality.  The outputs are joined and normalised into the decoder's memory.

Decoder: per generated token, the same test after each layer; a token that exits takes the
logits of the shared head from there (each decoder layer graph returns them, and the first
one embeds the token itself, so a token that leaves at layer 1 costs one onnxruntime call).
The key/values a skipped layer would have kept for that
position are handled by ``kv``:

- ``"drop"``: the layer has no entry for that position (MuE's code); its later tokens attend
  only to the positions it ran for, so each sample's cache has its own length and the
  decoder graphs take a self-attention bias that masks the missing ones;
- ``"copy_hidden"``: the skipped layer's own key/value projections are run on the exited
  hidden state (CALM's propagation), so every layer keeps every position.

Samples finish independently (``<eos>`` or ``max_new_tokens``); only unfinished samples, and
at each layer only the samples still in it, are run (batch compaction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

import numpy as np

from ..errors import EdgeExitError, GraphMismatchError, InputError, SessionError
from ..package import Package, Seq2SeqSpec
from ._contract import check_seq2seq_graphs

NEG = np.float32(-1e9)
KV_MODES = ("drop", "copy_hidden")
ENGINES = ("auto", "compiled", "stages")
DISABLED = 2.0   # the threshold that disables an in-graph exit: a cosine never exceeds 1


@dataclass
class Generation:
    """What ``ExitSession.generate`` returns.

    Attributes:
        tokens: generated ids per sample (without <bos>, up to and including <eos>), int64 lists.
        text: the generated words per sample (up to <eos>).
        encoder_layers: per modality name, the encoder layers each sample ran (n,).
        decoder_layers: per sample, the decoder layers run for each generated token.
        step_ms: wall time of each decoding step (all samples), ms; encoder_ms: the encoder's.
        encoder_engine: "compiled" (the encoder with in-graph exits, one call) or "stages"
            (one call per layer per modality).
        decoder_engine: "compiled" (one call per token, batch 1) or "stages" (one call per layer).
    """

    tokens: list[list[int]]
    text: list[str]
    encoder_layers: dict[str, np.ndarray]
    decoder_layers: list[list[int]]
    encoder_ms: float
    step_ms: list[float] = field(default_factory=list)
    encoder_engine: str = "stages"
    decoder_engine: str = "stages"

    @property
    def total_ms(self) -> float:
        return self.encoder_ms + sum(self.step_ms)


def cosine(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-sample cosine similarity of two (n, t, d) tensors over all valid positions (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if valid is not None:
        a64, b64 = a64 * valid[:, :, None], b64 * valid[:, :, None]
    a2, b2 = a64.reshape(len(a64), -1), b64.reshape(len(b64), -1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a2 * b2).sum(1) / np.where(den > 0, den, 1.0), 0.0)


def encode_texts(spec: Seq2SeqSpec, texts: Any, length: int, name: str = "question") -> np.ndarray:
    """Token ids (n, length) int64 of question strings, with the package's own vocabulary: words
    split on whitespace, padded with <pad>; no tokenizer library.  Raises ``InputError`` for an
    unknown word, an empty question or one longer than ``length`` words."""
    index = {w: i for i, w in enumerate(spec.vocab)}
    specials = {spec.vocab[spec.pad], spec.vocab[spec.bos], spec.vocab[spec.eos]}
    ids = np.full((len(texts), length), spec.pad, np.int64)
    for i, text in enumerate(texts):
        words = str(text).split()
        if not words:
            raise InputError(f"{name} {i} is empty; every question needs at least one word")
        if len(words) > length:
            raise InputError(f"{name} {i} ({text!r}) has {len(words)} words; the model takes at most {length}")
        unknown = [w for w in words if w not in index or w in specials]
        if unknown:
            known = " ".join(w for w in spec.vocab if w not in specials)
            raise InputError(f"{name} {i} ({text!r}): {unknown[0]!r} is not in the package's vocabulary; "
                             f"use its words: {known}")
        ids[i, :len(words)] = [index[w] for w in words]
    return ids


def _fed(values: list[float | None]) -> np.ndarray:
    """Thresholds as the in-graph exits take them: float64, a disabled exit (None) as ``DISABLED``."""
    return np.array([DISABLED if v is None else v for v in values], np.float64)


def _finite_number(value: Any) -> bool:
    """A real number float64 can hold (a Python int beyond it is not: isfinite would raise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def decoder_threshold(base: float | None, t: int, limit: int, decay: float | None) -> float | None:
    """The decoder exits' threshold for generated token ``t`` (0-based) of at most ``limit``.

    Without ``decay`` (None) it is ``base`` for every token; ``decay=0`` is CALM's schedule at
    temperature 0 (0.9 base + 0.1 for every token), not "no decay".  With it, CALM's schedule:
    ``clip(0.9 * base + 0.1 * exp(-decay * t / limit))``, strict for the first tokens and looser
    later, clipped to the similarity's range [-1, 1]."""
    if base is None or decay is None:
        return base
    return float(min(1.0, max(-1.0, 0.9 * base + 0.1 * np.exp(-decay * t / limit))))


def _exits(threshold: float | None, out: np.ndarray, entering: np.ndarray,
           valid: np.ndarray | None = None) -> np.ndarray:
    """Which samples leave: similarity of a layer's output and input above ``threshold``; none
    when the exit is disabled (then the similarity is not computed at all)."""
    if threshold is None:
        return np.zeros(len(out), dtype=bool)
    similarity = cosine(out, entering, valid)
    return np.isfinite(similarity) & (similarity > threshold)


class Seq2SeqRunner:
    """The generation loop over a seq2seq package's graphs (built by ``ExitSession``)."""

    def __init__(self, package: Package, build: Callable[[str, str], Any], in_graph: bool = True) -> None:
        assert package.seq2seq is not None
        self.spec: Seq2SeqSpec = package.seq2seq
        s = self.spec
        self.first = {m["name"]: build(m["first"], f"encoder layer 0 ({m['name']})") for m in s.modalities}
        self.encoder = [build(f, f"encoder layer {k}") for k, f in enumerate(s.encoder)]
        self.decoder = [build(d["step"], f"decoder layer {k}") for k, d in enumerate(s.decoder)]
        self.decoder_kv = [build(d["kv"], f"decoder layer {k} key/value") for k, d in enumerate(s.decoder)]
        self.encoder_exits = {mode: build(f, f"encoder with in-graph exits ({mode})")
                              for mode, f in (s.encoder_exits or {}).items()} if in_graph else {}
        self.decoder_steps = {kv: build(f, f"decoder step with in-graph exits (kv={kv})")
                              for kv, f in (s.decoder_steps or {}).items()} if in_graph else {}
        # vocabulary, width, heads against the graphs: now, not in the middle of generate() (the
        # exporter's own check passes a stand-in package with only ``seq2seq``: no inputs to compare)
        check_seq2seq_graphs(s, getattr(package, "inputs", ()), self.first, self.encoder, self.decoder,
                             self.decoder_kv, self.encoder_exits, self.decoder_steps)

    @staticmethod
    def _run(session: Any, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
        try:
            return session.run(None, feeds)  # type: ignore[no-any-return]
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail subclasses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SessionError(f"{what} failed in onnxruntime: {first[:300]}") from None

    def _thresholds(self, thresholds: dict[str, Any] | None) -> tuple[dict[str, float | None], float | None]:
        enc = {m["name"]: m.get("threshold") for m in self.spec.modalities}
        dec = self.spec.decoder_threshold
        for key, value in (thresholds or {}).items():
            if value is not None and not _finite_number(value):
                raise InputError(f"threshold {key!r} must be a finite number or None, got {value!r}")
            if key == "decoder":
                dec = value
            elif key in enc:
                enc[key] = value
            else:
                raise InputError(f"unknown threshold {key!r}; this package has {sorted(enc)} and 'decoder'")
        return enc, dec

    def encoder_engine(self, engine: str, joint_exit: bool) -> str:
        """"compiled" where the package has the encoder with in-graph exits for this mode (and
        ``engine`` allows it), else "stages"."""
        if engine not in ENGINES:
            raise InputError(f"engine={engine!r} is not one of {ENGINES}")
        mode = "joint" if joint_exit else "per_modality"
        if engine == "compiled" and mode not in self.encoder_exits:
            raise InputError(f"this package has no encoder with in-graph exits for encoder_exit="
                             f"{'joint' if joint_exit else 'per_modality'!r} (format version 5, or built without); "
                             "re-export it with this edgeexit, or use engine='stages'")
        return "compiled" if engine != "stages" and mode in self.encoder_exits else "stages"

    def decoder_engine(self, engine: str, kv: str, batch: int) -> str:
        """"compiled" (one call per token, exits decided in-graph) at batch 1 where the package has
        the decoder step for ``kv`` and ``engine`` allows it; else "stages" (one call per layer, with
        batch compaction): the decoder step is a batch-1 graph, so even ``engine="compiled"``
        decodes a batch per layer."""
        if engine == "compiled" and kv not in self.decoder_steps:
            raise InputError(f"this package has no decoder step with in-graph exits for kv={kv!r} (format version "
                             "5, or built without); re-export it with this edgeexit, or use engine='stages'")
        return "compiled" if engine != "stages" and kv in self.decoder_steps and batch == 1 else "stages"

    def _valids(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [(x != self.spec.pad) if x.dtype.kind in "iu" and x.ndim == 2
                else np.ones((len(x), int(m["tokens"])), bool)
                for m in self.spec.modalities for x in (feeds[m["input"]],)]

    def encode(self, feeds: dict[str, np.ndarray], thresholds: dict[str, float | None], joint: float | None = None,
               joint_exit: bool = False, engine: str = "auto") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Memory (n, m, d), its validity (n, m) and the encoder layers each modality ran per sample.

        ``joint_exit``: MuE's ablation without modality decomposition: the modalities go through
        each layer together and leave together, on one similarity over all their tokens and one
        threshold (``joint``).  ``engine``: see ``encoder_engine``."""
        if self.encoder_engine(engine, joint_exit) == "compiled":
            mode = "joint" if joint_exit else "per_modality"
            fed = [joint] if joint_exit else [thresholds[m["name"]] for m in self.spec.modalities]
            inputs = {m["input"]: feeds[m["input"]] for m in self.spec.modalities}
            inputs["thresholds"] = _fed(fed)
            memory, *ran = self._run(self.encoder_exits[mode], inputs, f"the encoder with in-graph exits ({mode})")
            return memory, np.concatenate(self._valids(feeds), axis=1), \
                {m["name"]: r for m, r in zip(self.spec.modalities, ran)}
        hs, valids, biases, memories = [], [], [], []
        similarities: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        for m, valid in zip(self.spec.modalities, self._valids(feeds)):  # layer 0 embeds the modality itself
            x = feeds[m["input"]]
            bias = np.where(valid, np.float32(0), NEG)[:, None, None, :].astype(np.float32)
            entering, h, normed = self._run(self.first[m["name"]], {m["input"]: x, "bias": bias},
                                            f"encoder layer 0 ({m['name']})")
            similarities.append((h, entering, valid))
            hs.append(h)
            valids.append(valid)
            biases.append(bias)
            memories.append(normed)
        n = len(hs[0])
        ran = [np.ones(n, dtype=np.int64) for _ in hs]
        active = [np.arange(n) for _ in hs]
        for k in range(len(self.encoder)):
            # the exit test on the layer just run, then the next layer for those who stay
            if joint_exit:
                pairs = [p for p in similarities if p is not None]
                keep = ~_exits(joint, *(np.concatenate([p[i] for p in pairs], 1) for i in range(3)))
                active = [a[keep] for a in active]
            else:
                for j, (m, pair) in enumerate(zip(self.spec.modalities, similarities)):
                    if pair is not None:
                        active[j] = active[j][~_exits(thresholds[m["name"]], *pair)]
            if k + 1 == len(self.encoder) or all(a.size == 0 for a in active):
                break
            session = self.encoder[k + 1]
            similarities = []
            for j, (h, valid, bias) in enumerate(zip(hs, valids, biases)):
                rows = active[j]
                if rows.size == 0:
                    similarities.append(None)
                    continue
                out, normed = self._run(session, {"hidden": h[rows], "bias": bias[rows]}, f"encoder layer {k + 1}")
                similarities.append((out, h[rows], valid[rows]))
                h[rows] = out
                memories[j][rows] = normed
                ran[j][rows] += 1
        memory = np.concatenate(memories, axis=1)
        layers = {m["name"]: r for m, r in zip(self.spec.modalities, ran)}
        return memory, np.concatenate(valids, axis=1), layers

    def generate(self, feeds: dict[str, np.ndarray], *, max_new_tokens: int | None = None,
                 thresholds: dict[str, Any] | None = None, kv: str = "drop",
                 encoder_exit: str = "per_modality", engine: str = "auto", decay: float | None = None) -> Generation:
        s = self.spec
        if decay is not None and (not _finite_number(decay) or decay < 0):
            raise InputError(f"decay must be a finite number >= 0 (CALM's temperature) or None, got {decay!r}")
        if kv not in KV_MODES:
            raise InputError(f"kv={kv!r} is not one of {KV_MODES}")
        limit = s.max_answer - 1 if max_new_tokens is None else max_new_tokens
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= s.max_answer - 1:
            raise InputError(f"max_new_tokens must be an integer from 1 to {s.max_answer - 1} (the answer "
                             f"positions the model was trained with), got {max_new_tokens!r}")
        for m in s.modalities:
            x = feeds[m["input"]]
            if x.dtype.kind in "iu" and x.ndim == 2:
                if ((x < 0) | (x >= len(s.vocab))).any():
                    raise InputError(f"input {m['input']!r} holds token ids outside the vocabulary (0 to "
                                     f"{len(s.vocab) - 1})")
                empty = np.flatnonzero((x == s.pad).all(axis=1))
                if empty.size:
                    raise InputError(f"input {m['input']!r}: sample(s) {empty[:10].tolist()} hold only padding; "
                                     "every question needs at least one token")
        if encoder_exit not in ("per_modality", "joint"):
            raise InputError(f"encoder_exit={encoder_exit!r} is not 'per_modality' or 'joint'")
        if thresholds is not None and not isinstance(thresholds, Mapping):
            raise InputError(f"thresholds must be a dict such as {{'decoder': 0.9, 'image': 0.95}} or None, got "
                             f"{thresholds!r}")
        joint = (thresholds or {}).get("encoder")
        if joint is not None and not _finite_number(joint):
            raise InputError(f"threshold 'encoder' must be a finite number or None, got {joint!r}")
        enc_thr, dec_thr = self._thresholds({k: v for k, v in (thresholds or {}).items() if k != "encoder"})
        try:
            return self._generate(feeds, limit, enc_thr, dec_thr, joint, kv, encoder_exit, engine, decay)
        except (ValueError, IndexError) as exc:   # numpy on outputs of other shapes than the manifest's
            if isinstance(exc, EdgeExitError):
                raise
            raise GraphMismatchError(
                f"the outputs of the package's graphs do not fit the manifest (width {s.width}, heads {s.heads}, "
                f"head_dim {s.head_dim}, a vocabulary of {len(s.vocab)}): {exc}. Re-export the package.") from exc

    def _generate(self, feeds: dict[str, np.ndarray], limit: int, enc_thr: dict[str, float | None],
                  dec_thr: float | None, joint: float | None, kv: str, encoder_exit: str, engine: str,
                  decay: float | None) -> Generation:
        s = self.spec
        encoder_engine = self.encoder_engine(engine, encoder_exit == "joint")
        t0 = perf_counter_ns()
        memory, mem_valid, enc_layers = self.encode(feeds, enc_thr, joint, encoder_exit == "joint", encoder_engine)
        encoder_ms = (perf_counter_ns() - t0) / 1e6
        n = memory.shape[0]
        mem_bias = np.where(mem_valid, np.float32(0), NEG)[:, None, None, :].astype(np.float32)
        decoder_engine = self.decoder_engine(engine, kv, n)
        decode = self._decode_compiled if decoder_engine == "compiled" else self._decode_stages
        schedule = [decoder_threshold(dec_thr, t, limit, decay) for t in range(limit)]
        generated, dec_layers, step_ms = decode(memory, mem_bias, schedule, kv)
        specials = {s.pad, s.bos, s.eos}
        text = [" ".join(s.vocab[i] for i in (g[:g.index(s.eos)] if s.eos in g else g) if i not in specials)
                for g in generated]
        return Generation(generated, text, enc_layers, dec_layers, encoder_ms, step_ms, encoder_engine, decoder_engine)

    def _decode_compiled(self, memory: np.ndarray, mem_bias: np.ndarray, schedule: list[float | None],
                         kv: str) -> tuple[list[list[int]], list[list[int]], list[float]]:
        """Greedy decoding at batch 1: one call per token; each layer's cache is the step's own output."""
        s, session = self.spec, self.decoder_steps[kv]
        empty = np.zeros((1, s.heads, 0, s.head_dim), np.float32)
        feeds = {"memory": memory, "memory_bias": mem_bias}
        thresholds = [_fed([v]) for v in schedule]
        caches = [f"past_{w}_{k}" for k in range(len(self.decoder)) for w in ("key", "value")]
        feeds.update(dict.fromkeys(caches, empty))
        token, tokens, layers, step_ms = s.bos, [], [], []
        for t, threshold in enumerate(thresholds):
            start = perf_counter_ns()
            feeds["token"], feeds["position"] = np.array([[token]], np.int64), np.array([[t]], np.int64)
            feeds["threshold"] = threshold
            logits, exit_layer, *presents = self._run(session, feeds, f"the decoder step (kv={kv})")
            feeds.update(zip(caches, presents))
            token = int(logits[0, 0].argmax())
            tokens.append(token)
            layers.append(int(exit_layer[0]) + 1)
            step_ms.append((perf_counter_ns() - start) / 1e6)
            if token == s.eos:
                break
        return [tokens], [layers], step_ms

    def _decode_stages(self, memory: np.ndarray, mem_bias: np.ndarray, schedule: list[float | None],
                       kv: str) -> tuple[list[list[int]], list[list[int]], list[float]]:
        """Greedy decoding with one call per decoder layer and batch compaction."""
        s = self.spec
        n, layers, limit = memory.shape[0], len(self.decoder), len(schedule)
        cache_k = np.zeros((layers, n, s.heads, limit, s.head_dim), np.float32)
        cache_v = np.zeros_like(cache_k)
        has = np.zeros((layers, n, limit), dtype=bool)          # which positions each layer holds
        tokens = np.full(n, s.bos, dtype=np.int64)
        generated: list[list[int]] = [[] for _ in range(n)]
        dec_layers: list[list[int]] = [[] for _ in range(n)]
        alive = np.arange(n)
        step_ms = []
        for t in range(limit):
            if alive.size == 0:
                break
            start = perf_counter_ns()
            exited_at = np.full(alive.size, layers - 1)
            active = np.arange(alive.size)          # rows of `alive` still in the decoder
            hidden = np.empty((alive.size, 1, s.width), np.float32)
            logits = np.empty((alive.size, len(s.vocab)), np.float32)
            for k in range(layers):
                rows = alive[active]
                past = has[k, rows, :t]
                self_bias = np.concatenate([np.where(past, np.float32(0), NEG), np.zeros((rows.size, 1),
                                                                                        np.float32)], axis=1)
                feeds = {"past_key": cache_k[k, rows, :, :t], "past_value": cache_v[k, rows, :, :t],
                         "self_bias": self_bias[:, None, None, :], "memory": memory[rows],
                         "memory_bias": mem_bias[rows]}
                if k == 0:   # layer 0 embeds the token itself and returns that embedding
                    feeds.update(token=tokens[rows, None], position=np.full((rows.size, 1), t, np.int64))
                    entering, out, key, value, layer_logits = self._run(self.decoder[0], feeds, "decoder layer 0")
                else:
                    entering = hidden[active]
                    feeds["hidden"] = entering
                    out, key, value, layer_logits = self._run(self.decoder[k], feeds, f"decoder layer {k}")
                cache_k[k, rows, :, t], cache_v[k, rows, :, t] = key[:, :, 0], value[:, :, 0]
                has[k, rows, t] = True
                leave = _exits(schedule[t], out, entering) if k < layers - 1 else np.ones(rows.size, bool)
                hidden[active] = out
                logits[active[leave]] = layer_logits[leave, 0]
                exited_at[active[leave]] = k
                if kv == "copy_hidden" and k < layers - 1 and leave.any():
                    self._propagate(k, alive[active[leave]], out[leave], t, cache_k, cache_v, has)
                active = active[~leave]
                if active.size == 0:
                    break
            chosen = logits.argmax(axis=1).astype(np.int64)
            for j, row in enumerate(alive):
                generated[row].append(int(chosen[j]))
                dec_layers[row].append(int(exited_at[j]) + 1)
            tokens[alive] = chosen
            alive = alive[chosen != s.eos]
            step_ms.append((perf_counter_ns() - start) / 1e6)
        return generated, dec_layers, step_ms

    def _propagate(self, k: int, rows: np.ndarray, hidden: np.ndarray, t: int, cache_k: np.ndarray,
                   cache_v: np.ndarray, has: np.ndarray) -> None:
        """CALM's propagation: layers after ``k`` get keys/values of the exited hidden state at position t."""
        for j in range(k + 1, len(self.decoder)):
            key, value = self._run(self.decoder_kv[j], {"hidden": hidden}, f"decoder layer {j} key/value")
            cache_k[j, rows, :, t], cache_v[j, rows, :, t] = key[:, :, 0], value[:, :, 0]
            has[j, rows, t] = True
