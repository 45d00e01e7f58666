"""``ExitResult``: what ``ExitSession.run`` returns."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..policies import ExitPolicy


class ExitResult:
    """What ``ExitSession.run`` returns, every array in input order.

    Attributes:
        predictions: argmax of the logits of the exit each sample left at, shape (n,).
        logits: those logits, shape (n, classes).
        exit_index: which exit each sample left at (0 = first exit; the last exit is
            ``num_exits - 1``), shape (n,).
        scores: the policy score at that exit, float64, shape (n,); NaN from the full model (exits
            disabled) for a stateful policy such as patience, whose score needs every exit, and for a
            policy that scores a signal (q_exit, gate), which the full model does not compute.
        stage_ms: onnxruntime time per stage for this call in ms (0.0 for stages that
            did not run).
        nonfinite_scores: how many scores were NaN/Inf (they never trigger an exit).
        total_ms: wall time of the whole call in ms.
        engine: ``"stages"`` (the stage loop), ``"compiled"`` (the package's compiled
            graph, one onnxruntime call: ``stage_ms`` is then empty) or ``"full"`` (every
            early exit disabled: the package's ``full.onnx``, one call).

    What a call does not need to answer is computed when first read: ``predictions`` (the
    argmax of ``logits``), and at batch 1 ``exit_index`` and ``scores`` as arrays; the full
    model's ``scores`` too.  Right after onnxruntime ran every numpy call runs with cold caches
    (1 to 7 us each at batch 1, measured in ``benchmarks/bench_overhead.py``), and an app that
    reads only the logits should not pay for them.  A result is not shared between calls;
    reading it from several threads is safe (a field computed twice is computed the same).
    """

    __slots__ = (
        "_class_names",
        "_exit_index",
        "_last_exit",
        "_nonfinite",
        "_policy",
        "_predictions",
        "_score",
        "_scores",
        "engine",
        "logits",
        "stage_ms",
        "total_ms",
    )

    def __init__(self, predictions: np.ndarray | None, logits: np.ndarray, exit_index: np.ndarray, scores: np.ndarray,
                 stage_ms: tuple[float, ...], nonfinite_scores: int | None, total_ms: float,
                 engine: str = "stages") -> None:
        self.logits = logits
        self.stage_ms = stage_ms
        self.total_ms = total_ms
        self.engine = engine
        self._predictions = predictions          # None: the argmax of ``logits``, when first read
        self._exit_index: np.ndarray | None = exit_index
        self._scores: np.ndarray | None = scores
        self._nonfinite = nonfinite_scores       # None: counted in ``scores`` when first read
        self._policy: ExitPolicy | None = None
        self._last_exit = -1
        self._score = math.nan
        self._class_names: tuple[str, ...] | None = None   # the package's labels, set by ExitSession.run

    @classmethod
    def of_full_model(cls, logits: np.ndarray, policy: ExitPolicy, last_exit: int, total_ms: float) -> ExitResult:
        """The answer of the single full graph: every sample at the last exit, scored when asked."""
        result = cls.__new__(cls)
        result.logits, result.stage_ms, result.total_ms, result.engine = logits, (), total_ms, "full"
        result._predictions = result._exit_index = result._scores = result._nonfinite = None
        result._policy, result._last_exit, result._score = policy, last_exit, math.nan
        return result

    @classmethod
    def of_one(cls, logits: np.ndarray, exit_number: int, score: float, stage_ms: tuple[float, ...],
               total_ms: float) -> ExitResult:
        """The stage loop's answer for one sample (``logits`` of shape (1, classes)) that left at
        ``exit_number`` with ``score``: its arrays are made when first read."""
        result = cls.__new__(cls)
        result.logits, result.stage_ms, result.total_ms, result.engine = logits, stage_ms, total_ms, "stages"
        result._predictions = result._exit_index = result._scores = result._nonfinite = result._policy = None
        result._last_exit, result._score = exit_number, score
        return result

    @property
    def labels(self) -> list[str] | None:
        """The class name of each prediction, where the package names its classes (else None)."""
        names = self._class_names
        return None if names is None else [names[i] if 0 <= i < len(names) else str(i) for i in self.predictions]

    @property
    def predictions(self) -> np.ndarray:
        if self._predictions is None:
            self._predictions = self.logits.argmax(axis=1)
        return self._predictions

    @property
    def exit_index(self) -> np.ndarray:
        if self._exit_index is None:
            self._exit_index = np.full(self.logits.shape[0], self._last_exit, dtype=np.int64)
        return self._exit_index

    @property
    def scores(self) -> np.ndarray:
        if self._scores is None:
            if self._policy is None:   # one sample's score from the stage loop (of_one)
                self._scores = np.array([self._score])
            elif self._policy.stateful or self._policy.reads != "logits":   # needs every exit, or a signal
                #                                the full model has only the last exit's logits
                self._scores = np.full(self.logits.shape[0], np.nan)
            elif self.logits.shape[0] == 1:   # the batch-1 score the stage loop computes, bit for bit
                self._scores = np.array([self._policy.score_one(self.logits[0])])
            else:
                self._scores = self._policy.scores(self.logits)
        return self._scores

    @property
    def nonfinite_scores(self) -> int:
        if self._nonfinite is None and self._policy is not None and (self._policy.stateful
                                                                     or self._policy.reads != "logits"):
            self._nonfinite = 0             # not computed (see scores), not a non-finite score
        if self._nonfinite is None:
            scores = self.scores
            self._nonfinite = (0 if math.isfinite(scores[0]) else 1) if scores.size == 1 else \
                int(np.count_nonzero(~np.isfinite(scores)))
        return self._nonfinite

    def exit_counts(self, num_exits: int) -> np.ndarray:
        """Number of samples that left at each exit."""
        return np.bincount(self.exit_index, minlength=num_exits)

    def __repr__(self) -> str:
        fields: dict[str, Any] = {"predictions": self.predictions, "exit_index": self.exit_index,
                                  "engine": self.engine, "total_ms": round(self.total_ms, 4)}
        return "ExitResult(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"
