"""Choosing a seq2seq package's MuE thresholds from labelled data (numpy + onnxruntime, no torch).

One threshold at a time, each modality's encoder threshold and then the decoder's: the
loosest value of ``GRID`` (a lower similarity threshold exits sooner) that keeps the
exact-match accuracy on the data at or above ``floor`` times the package's own accuracy with
every exit off.  The joint-encoder threshold (MuE's ablation) is chosen the same way.
Used by ``edgeexit calibrate`` on a seq2seq package and by the MuE quickstart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .package import update_manifest

GRID = [0.0, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]


def accuracy(texts: list[str], answers: list[str]) -> float:
    return float(np.mean([t == a for t, a in zip(texts, answers)]))


def feeds_of(split: Any) -> dict[str, np.ndarray]:
    """The model inputs of a ``QASplit`` (image, question)."""
    return {"image": split.image, "question": split.question}


def generate_all(sess: Any, feeds: dict[str, np.ndarray], batch: int = 100, **options: Any) -> tuple[list[str], Any]:
    """Generate for every sample in batches; (texts, one merged Generation)."""
    from .runtime.seq2seq import Generation

    n = len(next(iter(feeds.values())))
    parts = [sess.generate({k: v[s:s + batch] for k, v in feeds.items()}, **options) for s in range(0, n, batch)]
    merged = Generation(
        tokens=[t for p in parts for t in p.tokens], text=[t for p in parts for t in p.text],
        encoder_layers={k: np.concatenate([p.encoder_layers[k] for p in parts]) for k in parts[0].encoder_layers},
        decoder_layers=[d for p in parts for d in p.decoder_layers], encoder_ms=0.0)
    return merged.text, merged


def layer_counts(gen: Any, encoder_layers: int, decoder_layers: int) -> tuple[float, float]:
    """(layers run, layers the full model runs), summed over samples."""
    run = full = 0.0
    for i, tokens in enumerate(gen.decoder_layers):
        run += sum(float(v[i]) for v in gen.encoder_layers.values()) + sum(tokens)
        full += encoder_layers * len(gen.encoder_layers) + decoder_layers * len(tokens)
    return run, full


def choose_thresholds(sess: Any, feeds: dict[str, np.ndarray], answers: list[str], floor: float,
                      log: Callable[[str], None]) -> tuple[dict[str, float | None], float | None, float]:
    """Per-modality encoder thresholds, then the decoder's, and the joint-encoder threshold;
    with the accuracy of every exit off on these samples."""
    names = [m["name"] for m in sess.package.seq2seq.modalities]
    off: dict[str, float | None] = {**dict.fromkeys(names), "decoder": None}
    full_acc = accuracy(generate_all(sess, feeds, thresholds=off)[0], answers)
    chosen = dict(off)
    for key in [*names, "decoder"]:
        for t in GRID:
            if accuracy(generate_all(sess, feeds, thresholds={**chosen, key: t})[0], answers) >= floor * full_acc:
                chosen[key] = t
                break
        log(f"calibration: {key} threshold {chosen[key]}")
    joint = None
    for t in GRID:
        texts, _ = generate_all(sess, feeds, thresholds={"encoder": t, "decoder": chosen["decoder"]},
                                encoder_exit="joint")
        if accuracy(texts, answers) >= floor * full_acc:
            joint = t
            break
    return chosen, joint, full_acc


def write_thresholds(package: Any, chosen: dict[str, float | None]) -> None:
    """Store per-modality and decoder thresholds in a seq2seq package's manifest (atomically)."""

    def change(manifest: dict[str, Any]) -> None:
        for m in manifest["seq2seq"]["modalities"]:
            m["threshold"] = chosen.get(m["name"])
        manifest["seq2seq"]["decoder_threshold"] = chosen.get("decoder")

    update_manifest(package, change)
