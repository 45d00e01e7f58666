"""``edgeexit quickstart --model bert-exits``: train MiniLM's exits on fortunes, pick a policy, compare.

1. The exit heads, halting heads and gates are trained on the train split (``train_bert_exits``).
2. Every exit's outputs on the calibration split are recorded once; for each policy (entropy,
   confidence, margin, patience, q_exit, gate) the most permissive shared threshold whose
   accuracy drop against the last exit stays within ``max_drop`` (95 % one-sided bound,
   ``shared_threshold``) is found, and the policy with the fewest expected layers wins.
3. The package is exported with that policy and threshold.
4. On the test split, batch 1, unpadded: the package's plain full model (``full.onnx``, a bare
   onnxruntime session) and the exits (``ExitSession``) take turns in blocks of 16 quotations;
   accuracy of both over the whole test split.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np

from ..calibrate import ExitRecords, shared_threshold
from ..measure import LatencyStats
from ..policies import get_policy

POLICIES = ("entropy", "confidence", "margin", "patience", "q_exit", "gate")
BLOCK = 16


@dataclass(frozen=True)
class PolicyChoice:
    policy: str
    threshold: float
    calibration_accuracy: float
    layers: float          # expected layers per quotation on the calibration split


@dataclass(frozen=True)
class BertReport:
    package: Path
    sizes: tuple[int, int, int]
    choices: tuple[PolicyChoice, ...]
    chosen: PolicyChoice
    full_accuracy: float
    exit_accuracy: float
    test_layers: float
    full_latency: LatencyStats
    exit_latency: LatencyStats
    engine: str

    @property
    def speedup(self) -> float:
        return self.full_latency.mean / self.exit_latency.mean

    def lines(self) -> list[str]:
        train, cal, test = self.sizes
        out = [f"bert-exits (MiniLM-L6) on fortunes ({train} train / {cal} calibration / {test} test quotations)",
               "policies on the calibration split (shared threshold, accuracy within the budget of the last exit):"]
        for c in self.choices:
            mark = "  <- chosen" if c == self.chosen else ""
            out.append(f"  {c.policy:<11} threshold {c.threshold:>9.4g}  accuracy {c.calibration_accuracy:6.1%}  "
                       f"layers {c.layers:.2f}{mark}")
        out.append(f"test split, batch 1, CPU, 1 thread ({self.full_latency.calls} timed calls each):")
        out.append(f"  {'full model (full.onnx)':<24} accuracy {self.full_accuracy:6.1%}  layers 6.00  "
                   f"mean {self.full_latency.mean:.3f} ms  p95 {self.full_latency.p95:.3f} ms")
        out.append(f"  {'exits, ' + self.chosen.policy:<24} accuracy {self.exit_accuracy:6.1%}  layers "
                   f"{self.test_layers:.2f}  mean {self.exit_latency.mean:.3f} ms  p95 {self.exit_latency.p95:.3f} ms "
                   f"({self.engine})")
        out.append(f"speedup against the plain full model, measured in the same interleaved run: {self.speedup:.2f}x "
                   f"(mean)")
        return out


def choose_policy(session: Any, texts: Sequence[str], labels: np.ndarray, max_drop: float,
                  policies: Sequence[str] = POLICIES) -> list[PolicyChoice]:
    """The shared threshold of every policy within ``max_drop`` (a fraction) of the last exit,
    from one recording of every exit's outputs."""
    from .bert_exits import text_exit_outputs

    outputs = text_exit_outputs(session, texts)
    predictions = outputs["logits"].argmax(axis=2)
    choices = []
    for policy in policies:
        pol = get_policy(policy)
        records = ExitRecords(pol.score_table(list(outputs[pol.reads])), predictions, np.asarray(labels), pol.name)
        threshold, accuracy, shares = shared_threshold(records, max_drop)
        layers = float((shares * np.arange(1, len(shares) + 1)).sum())
        choices.append(PolicyChoice(policy, threshold, accuracy, layers))
    return choices


def interleaved(calls: Sequence[Callable[[Any], Any]], inputs: Sequence[Any], passes: int = 2,
                block: int = BLOCK) -> list[LatencyStats]:
    """Batch-1 latency of each call; they take turns in blocks of ``block`` inputs, the order rotating."""
    for x in inputs[:block]:        # warm up
        for call in calls:
            call(x)
    times: list[list[int]] = [[] for _ in calls]
    for p in range(passes):
        for b, start in enumerate(range(0, len(inputs), block)):
            for j in [(b + p + r) % len(calls) for r in range(len(calls))]:
                for x in inputs[start:start + block]:
                    t0 = perf_counter_ns()
                    calls[j](x)
                    times[j].append(perf_counter_ns() - t0)
    return [LatencyStats.from_ns(t) for t in times]


def run_bert_quickstart(output_dir: str | Path = "edgeexit-quickstart", *, seed: int = 0, max_drop: float = 0.003,
                        samples: int = 200, log: Callable[[str], None] | None = print) -> BertReport:
    """Train, choose a policy on the calibration split, export, and time against the plain full model."""
    import onnxruntime as ort
    import torch

    from ..runtime import ExitSession
    from ..runtime._threads import session_options
    from .bert_exits import export_bert_exits, save_heads, train_bert_exits
    from .fortunes import fortunes_splits

    say = log or (lambda _line: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    splits = fortunes_splits(seed)
    model, _ = train_bert_exits(splits, seed=seed, log=say)
    save_heads(model, out / "bert-exits.heads.pt")
    with tempfile.TemporaryDirectory(prefix="edgeexit-bert-quickstart-") as tmp:
        probe = ExitSession(export_bert_exits(model, Path(tmp) / "probe.eexit", splits.categories, log=None).root)
        say(f"recording every exit on the {len(splits.calibration)} calibration quotations ...")
        choices = choose_policy(probe, splits.calibration.texts, splits.calibration.labels, max_drop)
        probe.close()
    chosen = min(choices, key=lambda c: (c.layers, -c.calibration_accuracy))
    say(f"chosen: {chosen.policy} at {chosen.threshold:.4g} ({chosen.layers:.2f} layers on the calibration split)")
    path = out / "bert-exits.eexit"
    package = export_bert_exits(model, path, splits.categories, policy=chosen.policy,
                                thresholds=[chosen.threshold] * (model.num_exits - 1), overwrite=True, log=None)
    options = session_options(1, False, False)
    session = ExitSession(path, sess_options=options)
    full = package.full_model
    assert full is not None
    bare = ort.InferenceSession(str(package.file_path(full.file)), options, providers=["CPUExecutionProvider"])

    def plain(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return bare.run([full.logits], {n: feeds[n] for n in full.inputs})[0]  # type: ignore[no-any-return]

    test = splits.test
    feeds = [session.tokenize([t]) for t in test.texts]
    results = [session.run(f) for f in feeds]
    exit_right = np.array([int(r.predictions[0]) for r in results]) == test.labels
    full_right = np.array([int(plain(f)[0].argmax()) for f in feeds]) == test.labels
    picks = np.linspace(0, len(feeds) - 1, min(samples, len(feeds))).astype(int)
    say(f"timing {len(picks)} test quotations at batch 1, full model and exits in turns ...")
    full_stats, exit_stats = interleaved([plain, session.run], [feeds[i] for i in picks])
    report = BertReport(
        package=path, sizes=(len(splits.train), len(splits.calibration), len(test)), choices=tuple(choices),
        chosen=chosen, full_accuracy=float(full_right.mean()), exit_accuracy=float(exit_right.mean()),
        test_layers=float(np.mean([int(r.exit_index[0]) + 1 for r in results])), full_latency=full_stats,
        exit_latency=exit_stats, engine=",".join(sorted({r.engine for r in results})))
    session.close()
    return report
