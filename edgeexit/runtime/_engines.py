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

A compiled graph is trusted for nothing its names promise: its outputs' types and shapes are
checked against the manifest at load (``CompiledGraph.check_outputs``), its answers against
the stage loop on synthetic probes at load (``disagreement``, run by ``ExitSession``), and
the exit indices it returns on every call (``CompiledGraph.run``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import GraphMismatchError, SessionError
from ..package import COMPILED_OUTPUTS, CompiledSpec, Package
from ..policies import always_threshold, get_policy
from ._contract import LOGITS_DTYPE, ExitLogits
from ._result import ExitResult
from ._stage import direct_run

ENGINES = ("auto", "compiled", "stages")


class CompiledGraph:
    """The package's compiled graph in one onnxruntime session."""

    def __init__(self, spec: CompiledSpec, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.session = session
        self._ort_run = direct_run(session)
        self.policies = spec.policies
        self.outputs = [spec.outputs[name] for name in COMPILED_OUTPUTS]
        self.inputs = spec.inputs
        self.thresholds = spec.thresholds
        self.num_exits = len(spec.policies)
        self.classes = 0              # set by check_outputs
        self.narrower = False         # its logits' dtype is narrower than the widest exit's (check_outputs)
        self.logits_dtype = ""

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

    def check_outputs(self, exits: ExitLogits) -> None:
        """The outputs' element types and shapes are what the manifest implies (else
        GraphMismatchError naming the output): ``logits`` float (exit 0's dtype, as FORMAT.md
        3.4 has it, or the widest exit's) of rank 2 with the package's classes, ``exit_index``
        int64 and ``score`` float64, both of rank 1."""
        args = {o.name: o for o in self.session.get_outputs()}
        logits, exit_index, score = (args[name] for name in self.outputs)
        dtype = LOGITS_DTYPE.get(logits.type)
        shape = list(logits.shape)
        classes = shape[1] if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0 else None
        allowed = sorted({exits.dtypes[0].name, exits.dtype.name})
        if dtype is None or dtype.name not in allowed or len(shape) != 2 \
                or (classes is not None and classes != exits.classes):
            self._mismatch("logits", f"is {logits.type} {shape}; the stage graphs make it "
                           f"{' or '.join(allowed)} of shape [batch, {exits.classes}]")
        for key, arg, want in (("exit_index", exit_index, "tensor(int64)"), ("score", score, "tensor(double)")):
            if arg.type != want or len(arg.shape) != 1:
                self._mismatch(key, f"is {arg.type} {list(arg.shape)}; it must be {want} of shape [batch]")
        assert dtype is not None and exits.classes is not None
        self.classes = exits.classes
        self.narrower = dtype != exits.dtype
        self.logits_dtype = dtype.name

    def _mismatch(self, key: str, what: str) -> None:
        raise GraphMismatchError(f"the compiled graph {self.spec.file}: output {key!r} ({self.spec.outputs[key]!r}) "
                                 f"{what}. Rebuild it with `edgeexit compile PACKAGE`, or open the session with "
                                 "engine='stages'.")

    def run(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray, n: int) -> list[np.ndarray]:
        """(logits, exit_index, score) for the batch of ``n`` samples in ``feeds``; a SessionError
        if the graph names an exit the package does not have.  The shapes are not checked per
        call: ``check_outputs`` checked the declared ones and the load-time probes the real ones."""
        outs = self.answer(feeds, thresholds)
        exit_index = outs[1]
        # one comparison per call: at batch 1 in Python (0.4 us right after the run; int(a[0]) was
        # 0.8); else one reduction (2.5 us at batch 64), a negative int64 read as uint64 past any exit
        if (not 0 <= exit_index.item(0) < self.num_exits) if n == 1 \
                else exit_index.view(np.uint64).max() >= self.num_exits:
            raise SessionError(
                f"the compiled graph {self.spec.file} sent samples to exits {np.unique(exit_index)[:10].tolist()}; "
                f"this package has exits 0 to {self.num_exits - 1}. Rebuild it with `edgeexit compile PACKAGE`, or "
                "open the session with engine='stages'.")
        return outs

    def answer(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray) -> list[np.ndarray]:
        """What the graph returns, unchecked (SessionError only if onnxruntime fails)."""
        run_feeds = {name: feeds[name] for name in self.inputs}
        run_feeds[self.thresholds] = thresholds
        try:
            return self._ort_run(self.outputs, run_feeds, None)
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


def disagreement(got: Sequence[np.ndarray], want: ExitResult, thresholds: Sequence[float]) -> str | None:
    """How the compiled graph's ``got`` (logits, exit_index, score) differs from the stage loop's
    ``want`` on the same samples and ``thresholds``, or None when they agree.

    Exits must be the same, except for a sample whose score at the earlier of the two exits lies
    within 1e-4 of that exit's threshold (the engines round differently, so either exit is right);
    logits and scores must agree to 1e-3 (1e-2 in float16) of the largest logit, far looser than
    the engines' differences (about 1e-6) and far tighter than any other model's answers.
    """
    logits, exit_index, scores = got
    n, num_exits = len(want.exit_index), len(thresholds) + 1
    if logits.shape != want.logits.shape or exit_index.shape != (n,) or scores.shape != (n,):
        return (f"it returns logits {logits.shape}, exit_index {exit_index.shape}, score {scores.shape}; the stages "
                f"give {want.logits.shape}, ({n},), ({n},)")
    if exit_index.min() < 0 or exit_index.max() >= num_exits:
        return f"it sends samples to exits {np.unique(exit_index).tolist()} of a package with {num_exits}"
    differ = exit_index != want.exit_index
    if differ.any():
        early = np.minimum(exit_index, want.exit_index)[differ]
        score = np.where(want.exit_index <= exit_index, want.scores, scores)[differ]
        limit = np.asarray(thresholds, np.float64)[early]
        with np.errstate(invalid="ignore"):
            on_threshold = np.isfinite(limit) & (np.abs(score - limit) <= 1e-4 * np.maximum(1.0, np.abs(limit)))
        if not on_threshold.all():
            return f"exits {exit_index.tolist()}, the stages {want.exit_index.tolist()}"
    same = ~differ
    a, b = logits[same].astype(np.float64), want.logits[same].astype(np.float64)
    tol = 1e-2 if np.float16 in (logits.dtype, want.logits.dtype) else 1e-3
    finite = np.abs(b[np.isfinite(b)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    if not np.allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True):
        with np.errstate(invalid="ignore"):
            gaps = np.abs(a - b)
        gaps = gaps[np.isfinite(gaps)]
        worst = float(gaps.max()) if gaps.size else math.inf
        return f"the logits differ by up to {worst:.3g} (largest logit {scale:.3g})"
    if not np.allclose(scores[same], want.scores[same], rtol=tol, atol=tol, equal_nan=True):
        return f"scores {np.round(scores, 4).tolist()}, the stages {np.round(want.scores, 4).tolist()}"
    return None


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
