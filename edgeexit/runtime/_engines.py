"""The compiled engine (one graph that decides exits in-graph) and the rule that picks an engine.

``ExitSession`` has two engines with identical results: the *stage loop* (one onnxruntime
session per stage, Python deciding between stages) and, when the package holds
``compiled.onnx``, the *compiled graph* (one ``session.run`` per call).  The rule:

- ``engine="stages"`` or ``"compiled"`` (per session or per call) forces one;
- ``engine="auto"`` (the default) takes the compiled graph whenever the package has one
  and the call's policies are the ones compiled into it; otherwise the stage loop;
- ``ExitSession.tune_engines(inputs)`` times both engines, interleaved, at batch 1 and at
  one larger batch on the caller's data, and from then on ``auto`` uses the faster one in
  each regime (batch 1, batch > 1).  It can be repeated at any time, e.g. on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import GraphMismatchError, SessionError
from ..package import COMPILED_OUTPUTS, CompiledSpec, Package
from ..policies import always_threshold, get_policy

ENGINES = ("auto", "compiled", "stages")


class CompiledGraph:
    """The package's compiled graph in one onnxruntime session."""

    def __init__(self, spec: CompiledSpec, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.session = session
        self.policies = spec.policies
        self.outputs = [spec.outputs[name] for name in COMPILED_OUTPUTS]
        self.inputs = spec.inputs
        self.thresholds = spec.thresholds

    def check_names(self) -> None:
        """The graph's inputs and outputs are the ones the manifest names (else GraphMismatchError)."""
        inputs = sorted(i.name for i in self.session.get_inputs())
        outputs = {o.name for o in self.session.get_outputs()}
        wanted = sorted([*self.inputs, self.thresholds])
        if inputs != wanted or not outputs.issuperset(self.outputs):
            raise GraphMismatchError(
                f"the compiled graph {self.spec.file} has inputs {inputs} and outputs {sorted(outputs)}; the manifest "
                f"declares inputs {wanted} and outputs {self.outputs}. Rebuild it with `edgeexit compile PACKAGE`."
            )

    def run(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray) -> list[np.ndarray]:
        """(logits, exit_index, score) for the batch in ``feeds``."""
        run_feeds = {name: feeds[name] for name in self.inputs}
        run_feeds[self.thresholds] = thresholds
        try:
            return self.session.run(self.outputs, run_feeds)  # type: ignore[no-any-return]
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail subclasses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SessionError(f"the compiled graph {self.spec.file} failed to run: {first}") from None


@dataclass(frozen=True)
class EngineTiming:
    """Median ms per call of each engine in one regime, measured interleaved."""

    batch_size: int
    stages_ms: float
    compiled_ms: float

    @property
    def faster(self) -> str:
        return "compiled" if self.compiled_ms <= self.stages_ms else "stages"


def interleaved_ms(calls: Sequence[Callable[[Any], Any]], args: Sequence[Any], repeats: int = 1,
                   warmup: int = 8, block: int = 1) -> np.ndarray:
    """ms of every call on every argument, shape (calls, repeats, args).

    The callables take turns per block of ``block`` consecutive arguments (each runs the whole
    block, then the next one does), the order rotating per block and repeat, after ``warmup``
    untimed rounds.  ``block=1`` alternates on every call (each contender runs cold, as in an
    app that calls it now and then); a larger block lets each run warm, as in a stream of
    requests and as ``bench`` windows measure it.
    """
    for arg in args[:warmup]:
        for call in calls:
            call(arg)
    times = np.zeros((len(calls), repeats, len(args)))
    starts = range(0, len(args), max(1, block))
    for r in range(repeats):
        for b, start in enumerate(starts):
            for j in ((k + b + r) % len(calls) for k in range(len(calls))):
                for i in range(start, min(start + max(1, block), len(args))):
                    t0 = perf_counter_ns()
                    calls[j](args[i])
                    times[j, r, i] = perf_counter_ns() - t0
    return times / 1e6


def time_interleaved(calls: dict[str, Callable[[Any], Any]], args: Sequence[Any], rounds: int) -> dict[str, float]:
    """Median ms per call of each callable, ``rounds`` calls each on ``args`` in cycle, interleaved."""
    cycled = [args[r % len(args)] for r in range(rounds)]
    times = interleaved_ms(list(calls.values()), cycled, warmup=1)
    return {name: float(np.median(t)) for name, t in zip(calls, times)}


def calibrated_shares(package: Package) -> list[float] | None:
    """The exit shares of the package's current calibration, if its history has one."""
    history = (package.calibration or {}).get("history") or []
    live = [e for e in history if not e.get("reverted")]
    shares = live[-1].get("expected_shares") if live else None
    if isinstance(shares, list) and len(shares) == len(package.exit_stages):
        return [float(s) for s in shares]
    return None


def forced_paths(policies: Sequence[str]) -> list[list[float | None]]:
    """Thresholds that send every sample to exit k, one list per exit k: exit k passes
    everything, every other early exit is disabled (None)."""
    early = len(policies) - 1
    return [[always_threshold(get_policy(p)) if j == k else None for j, p in enumerate(policies[:-1])]
            for k in range(early + 1)]
