"""MuE end to end: train, export, choose thresholds on the calibration split, compare on the test split.

Used by ``edgeexit quickstart --model mue`` and ``benchmarks/bench_mue.py``.  Thresholds are
chosen on the calibration split by ``edgeexit.calibrate_seq2seq.choose_thresholds``.  On the test
split every contender is scored for exact match and layers executed (encoder layers per
modality plus decoder layers per token, as MuE counts them), and timed at batch 1 against
the plain model (one encoder graph and one decoder-step graph with the cache, same weights),
the contenders taking turns in blocks of 16 samples so that each runs warm, as a device
answering a stream of questions does.  The MuE rows run the in-graph exits (the encoder in one
call, one call per generated token); the per-layer rows run one call per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..calibrate_seq2seq import (
    accuracy,
    choose_thresholds,
    feeds_of,
    generate_all,
    layer_counts,
    write_thresholds,
)

EPOCHS = 12
PLAIN = "plain model (encoder graph + decoder-step graph)"
EXITS_OFF = "full model, per-layer graphs (exits off)"
IN_GRAPH_OFF = "full model, in-graph exit graphs (exits off)"
BLOCK = 16


@dataclass
class MuEReport:
    """The comparison; ``to_dict()`` is what ``--json`` prints (keys documented in docs/MUE.md)."""

    package: str
    thresholds: dict[str, float | None]
    joint_threshold: float | None
    calibration_accuracy: float
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_pairs: int = 0
    timed_samples: int = 0
    passes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "thresholds": self.thresholds, "joint_encoder_threshold": self.joint_threshold,
                "calibration_full_accuracy": self.calibration_accuracy, "test_pairs": self.test_pairs,
                "timed_samples": self.timed_samples, "passes": self.passes, "seconds": self.seconds,
                "contenders": self.rows}

    def lines(self) -> list[str]:
        base = self.rows[PLAIN]
        full_layers = self.rows[EXITS_OFF]["layers"]
        out = [f"MuE on the digit QA test split ({self.test_pairs} pairs); batch-1 times over {self.timed_samples} "
               f"samples x {self.passes} pass(es), interleaved in blocks of {BLOCK}; thresholds {self.thresholds} "
               "(calibration split)",
               f"{'contender':<48}{'exact match':>12}{'layers saved':>14}{'p50 ms':>9}{'mean ms':>9}{'time saved':>12}"]
        for name, r in self.rows.items():
            saved = f"{1 - r['layers'] / full_layers:+.1%}" if "layers" in r else "-"
            out.append(f"{name:<48}{r['accuracy']:>12.2%}{saved:>14}{r['p50_ms']:>9.3f}{r['mean_ms']:>9.3f}"
                       f"{1 - r['mean_ms'] / base['mean_ms']:>+12.1%}")
        return out


def plain_generator(encoder: Any, decoder: Any, config: Any) -> Callable[[dict[str, np.ndarray]], list[int]]:
    """Greedy batch-1 decoding with the plain graphs in bare onnxruntime sessions."""
    from .mue_task import BOS, EOS

    layers, heads, dh, limit = config.decoder_layers, config.heads, config.width // config.heads, config.answer_len - 1

    def run(feeds: dict[str, np.ndarray]) -> list[int]:
        memory, memory_bias = encoder.run(None, feeds)
        keys = values = np.zeros((layers, 1, heads, 0, dh), np.float32)
        token = np.array([[BOS]], np.int64)
        out: list[int] = []
        for t in range(limit):
            logits, keys, values = decoder.run(None, {"token": token, "position": np.array([[t]], np.int64),
                                                      "past_key": keys, "past_value": values, "memory": memory,
                                                      "memory_bias": memory_bias})
            token = logits[:, 0].argmax(1)[:, None].astype(np.int64)
            out.append(int(token[0, 0]))
            if out[-1] == EOS:
                break
        return out
    return run


def compare(model: Any, package: Path, plain_folder: Path, splits: Any, *, floor: float = 0.99,
            timed_samples: int = 300, passes: int = 2, log: Callable[[str], None] = print) -> MuEReport:
    """Choose thresholds on the calibration split, write them into ``package``, and compare on the test split."""
    import onnxruntime as ort

    from ..export.seq2seq import export_plain_mue
    from ..runtime import ExitSession
    from ..runtime._threads import session_options
    from .mue_task import decode

    started = time.time()
    c = model.config
    sess = ExitSession(package)
    chosen, joint, cal_acc = choose_thresholds(sess, feeds_of(splits.calibration), splits.calibration.answers(),
                                               floor, log)
    write_thresholds(package, chosen)
    enc_path, dec_path = export_plain_mue(model, plain_folder)
    opts = session_options(1, False, False)
    plain_encoder, plain_decoder = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                                    for p in (enc_path, dec_path))
    plain = plain_generator(plain_encoder, plain_decoder, c)
    test = splits.test
    answers = test.answers()
    off = {"image": None, "text": None, "decoder": None}
    contenders: dict[str, dict[str, Any]] = {
        EXITS_OFF: {"thresholds": off, "engine": "stages"},
        IN_GRAPH_OFF: {"thresholds": off},
        "MuE, kv=drop": {"thresholds": chosen, "kv": "drop"},
        "MuE, kv=drop, per-layer graphs": {"thresholds": chosen, "kv": "drop", "engine": "stages"},
        "MuE, kv=copy_hidden": {"thresholds": chosen, "kv": "copy_hidden"},
        "no modality decomposition (joint encoder exit)": {
            "thresholds": {"encoder": joint, "decoder": chosen["decoder"]}, "encoder_exit": "joint"},
    }
    rows: dict[str, dict[str, Any]] = {PLAIN: {"accuracy": accuracy(
        [decode(plain({"image": test.image[i:i + 1], "question": test.question[i:i + 1]})) for i in range(len(test))],
        answers)}}
    for name, options in contenders.items():
        texts, gen = generate_all(sess, feeds_of(test), **options)
        run, full = layer_counts(gen, c.encoder_layers, c.decoder_layers)
        rows[name] = {"accuracy": accuracy(texts, answers), "layers": run, "full_layers": full,
                      "encoder_layers": {k: float(v.mean()) for k, v in gen.encoder_layers.items()},
                      "decoder_layers_per_token": float(np.mean([np.mean(d) for d in gen.decoder_layers]))}
    picks = np.linspace(0, len(test) - 1, min(timed_samples, len(test))).astype(int)
    calls: dict[str, Callable[[dict[str, np.ndarray]], Any]] = {PLAIN: plain}
    for name, options in contenders.items():
        calls[name] = (lambda o: (lambda f: sess.generate(f, **o)))(options)
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for p in range(passes):    # contenders take turns in blocks of BLOCK samples: each runs warm, as in a stream
        for j, first in enumerate(range(0, len(picks), BLOCK)):
            block = [{"image": test.image[i:i + 1], "question": test.question[i:i + 1]}
                     for i in picks[first:first + BLOCK]]
            for k in range(len(names)):
                name = names[(k + j + p) % len(names)]
                for feeds in block:
                    t0 = time.perf_counter_ns()
                    calls[name](feeds)
                    times[name].append((time.perf_counter_ns() - t0) / 1e6)
    for name, values in times.items():
        rows[name]["mean_ms"] = float(np.mean(values))
        rows[name]["p50_ms"] = float(np.median(values))
    return MuEReport(str(package), chosen, joint, cal_acc, rows, len(test), len(picks), passes,
                     round(time.time() - started, 1))


def run_mue_quickstart(output_dir: str | Path = "edgeexit-quickstart", *, epochs: int = EPOCHS, seed: int = 0,
                       floor: float = 0.99, timed_samples: int = 300, passes: int = 2,
                       log: Callable[[str], None] = print) -> MuEReport:
    """Train MuE on the digit QA task, export it to ``output_dir/mue.eexit`` (weights in ``mue.pt``),
    choose its thresholds and compare it with the plain model."""
    import torch

    from ..export.seq2seq import export_mue
    from . import save_weights
    from .mue import MuEConfig, MuEModel, train_mue
    from .mue_task import mnist_qa_splits

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = mnist_qa_splits(seed)
    torch.manual_seed(seed)
    model = MuEModel(MuEConfig())
    log(f"training mue ({epochs} epochs on {len(splits.train):,} pairs) ...")
    history = train_mue(model, splits, epochs=epochs, seed=seed)
    log(f"training loss per epoch: {', '.join(f'{h:.3f}' for h in history)}")
    save_weights(model, out / "mue.pt")  # type: ignore[arg-type]
    package = export_mue(model, out / "mue.eexit", overwrite=True, log=log).root
    return compare(model, package, out / "plain", splits, floor=floor, timed_samples=timed_samples, passes=passes,
                   log=log)
