"""The quickstart: train a zoo model on MNIST-5k, export it, and compare it with the full model.

Splits are seeded and disjoint (3,000 train / 1,000 calibration / 1,000 test): the
shared entropy threshold is chosen on the calibration split, every reported figure
comes from the test split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ..calibrate import record_engine_choice, record_exits, shared_threshold
from ..datasets import MNIST_PREPROCESSING, mnist5k_splits
from ..export import export_package
from ..measure import LatencyStats
from ..package import set_thresholds
from ..runtime import ExitSession
from ..runtime._threads import session_options
from . import get_model
from .train import train_early_exit

ProgressFactory = Callable[[str, int], Any]


@dataclass(frozen=True)
class QuickstartReport:
    model: str
    package: Path
    sizes: tuple[int, int, int]
    thresholds: list[float]
    full_accuracy: float
    early_accuracy: float
    exit_shares: list[float]
    full_latency: LatencyStats
    early_latency: LatencyStats       # the stage loop
    compiled_latency: LatencyStats    # the compiled graph
    overhead_us: float                # the stage loop's Python per call, beyond its onnxruntime calls
    engine: str                       # what ExitSession chose for batch 1 (tune_engines, calibration split)

    @property
    def chosen_latency(self) -> LatencyStats:
        return self.compiled_latency if self.engine == "compiled" else self.early_latency

    @property
    def speedup_p50(self) -> float:
        return self.full_latency.p50 / self.chosen_latency.p50


@contextlib.contextmanager
def _no_bar(_label: str, _length: int):  # type: ignore[no-untyped-def]
    class _Bar:
        def update(self, _n: int) -> None:
            pass
    yield _Bar()


def time_batch1_many(
    calls: Sequence[Callable[[np.ndarray], Any]], x: np.ndarray, *, passes: int = 3, warmup: int = 200,
    progress: ProgressFactory = _no_bar,
) -> list[LatencyStats]:
    """Batch-1 latency of several callables, interleaved per sample with a rotating order."""
    samples = [np.ascontiguousarray(x[i:i + 1]) for i in range(len(x))]
    for s in samples[:warmup]:
        for call in calls:
            call(s)
    m = len(calls)
    times: list[list[int]] = [[] for _ in calls]
    with progress("timing batch 1", passes * len(samples)) as bar:
        for p in range(passes):
            for i, s in enumerate(samples):
                for j in [(i + p + r) % m for r in range(m)]:
                    t0 = perf_counter_ns()
                    calls[j](s)
                    times[j].append(perf_counter_ns() - t0)
            bar.update(len(samples))
    return [LatencyStats.from_ns(t) for t in times]


def run_quickstart(
    model_name: str = "blenet",
    *,
    epochs: int = 20,
    seed: int = 0,
    output_dir: str | Path = "edgeexit-quickstart",
    max_drop: float = 0.003,
    progress: ProgressFactory = _no_bar,
    log: Callable[[str], None] = print,
) -> QuickstartReport:
    """Train, export, calibrate a shared threshold, and time the test split at batch 1."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    splits = mnist5k_splits(seed)
    model = get_model(model_name, seed=seed)
    with progress(f"training {model_name} ({epochs} epochs)", epochs * len(splits.train)) as bar:
        train_early_exit(model, splits.train.x, splits.train.y, epochs=epochs, seed=seed, progress=bar.update)

    out = Path(output_dir)
    path = out / f"{model_name}.eexit"
    example = {"image": torch.from_numpy(splits.train.x[:8])}
    early = model.num_exits - 1
    export_package(model, example, path, policy="entropy", thresholds=[0.0] * early, name=model_name,
                   labels=[str(i) for i in range(10)], include_full_model=True,
                   preprocessing=MNIST_PREPROCESSING, seed=seed, overwrite=True, log=log)

    session = ExitSession(path)
    records = record_exits(session, splits.calibration.x, splits.calibration.y)
    threshold, cal_acc, cal_shares = shared_threshold(records, max_drop)
    thresholds = [threshold] * early
    log(f"calibration split: shared entropy threshold {threshold:.4g} keeps accuracy {cal_acc:.1%} "
        f"(full {records.full_accuracy:.1%}), exit shares {np.round(cal_shares, 3).tolist()}")
    set_thresholds(path, thresholds)
    session = ExitSession(path)

    result = session.run(splits.test.x)  # the test split through the real runtime, batched
    runtime_acc = float((result.predictions == splits.test.y).mean())

    full = ort.InferenceSession(str(path / "full.onnx"), session_options(1, False, False),
                                providers=["CPUExecutionProvider"])
    full_logits = full.run(None, {"image": splits.test.x})[0]
    full_acc = float((full_logits.argmax(1) == splits.test.y).mean())
    stages, compiled = ExitSession(path, engine="stages"), ExitSession(path, engine="compiled")
    # time both engines on the calibration split and record the faster per regime in the package
    timings = record_engine_choice(path, splits.calibration.x)
    engine = timings[0].faster if timings else "stages"
    overhead_ns: list[float] = []

    def stage_loop(s: np.ndarray) -> None:
        t0 = perf_counter_ns()
        r = stages.run(s)
        overhead_ns.append(perf_counter_ns() - t0 - sum(r.stage_ms) * 1e6)

    full_stats, early_stats, compiled_stats = time_batch1_many(
        [lambda s: full.run(None, {"image": s}), stage_loop, compiled.run], splits.test.x, progress=progress)
    return QuickstartReport(
        model=model_name, package=path,
        sizes=(len(splits.train), len(splits.calibration), len(splits.test)),
        thresholds=thresholds, full_accuracy=full_acc, early_accuracy=runtime_acc,
        exit_shares=(np.bincount(result.exit_index, minlength=session.num_exits) / len(result.exit_index)).tolist(),
        full_latency=full_stats, early_latency=early_stats, compiled_latency=compiled_stats,
        overhead_us=float(np.median(overhead_ns)) / 1e3, engine=engine,
    )
