"""Exit policies: numpy-only rules that decide whether a sample leaves at an exit.

A policy turns exit logits into one score per sample and compares it with a
threshold in its declared direction: ``"higher"`` exits when ``score >= threshold``,
``"lower"`` exits when ``score < threshold``.  A non-finite score (NaN or Inf) never
triggers an exit: the sample is treated as "not confident" and goes on to the next
stage, where the last exit always accepts.

Policies live in a registry so packages and the CLI can name them::

    >>> from edgeexit.policies import get_policy
    >>> get_policy("entropy").direction
    'lower'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._names import did_you_mean
from .errors import PolicyError, ThresholdError, UnknownPolicyError

Direction = Literal["higher", "lower"]

# Exit outputs besides the logits that a policy may score (package format version 8), each of
# shape (batch, 1): PALBERT's per-layer halting probability and JEI-DNN's gate value.
SIGNALS = ("halt", "gate")

# Below this many classes a pure-Python score of one row beats numpy's per-call cost.
_SCALAR_PATH_MAX_CLASSES = 64


@dataclass(frozen=True)
class ExitPolicy:
    """A named exit rule.

    Attributes:
        name: registry name (``"entropy"``...).
        direction: ``"higher"``: exit when score >= threshold; ``"lower"``: exit when
            score < threshold.
        batch_score: maps logits of shape (n, classes) to float64 scores of shape (n,).
        row_score: the same score for one sample given as a list of floats; used by
            the batch-1 fast path.
        description: one line for ``edgeexit inspect`` and the docs.
        score_range: the lowest and highest score the policy can give (None: unbounded on
            that side); a threshold that no score can pass is refused.
    """

    name: str
    direction: Direction
    batch_score: Callable[[np.ndarray], np.ndarray]
    row_score: Callable[[list[float]], float]
    description: str
    score_range: tuple[float | None, float | None] = (None, None)
    # A stateful policy scores an exit from its logits and what the sample showed at the earlier
    # exits (PABEE's patience counter): ``initial(n)`` is the state before the first exit, one
    # row per sample; ``step(state, logits)`` returns (scores, the state after this exit).  The
    # runtime keeps the state per sample and compacts it with the batch.
    initial: Callable[[int], tuple[np.ndarray, ...]] | None = None
    step: Callable[[tuple[np.ndarray, ...], np.ndarray], tuple[np.ndarray, tuple[np.ndarray, ...]]] | None = None
    # What the policy scores: the exit's ``"logits"`` (batch, classes), or one of its signals
    # (format version 8), an extra exit output of shape (batch, 1) such as PALBERT's halting
    # probability ``"halt"`` or JEI-DNN's gate value ``"gate"``.
    reads: str = "logits"

    @property
    def stateful(self) -> bool:
        return self.step is not None

    def __post_init__(self) -> None:
        if self.direction not in ("higher", "lower"):
            raise PolicyError(
                f"policy {self.name!r}: direction must be 'higher' or 'lower', got {self.direction!r}"
            )
        if self.reads != "logits" and self.reads not in SIGNALS:
            raise PolicyError(
                f"policy {self.name!r}: reads must be 'logits' or a signal ({', '.join(SIGNALS)}), got {self.reads!r}"
            )

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Scores of a (n, classes) logits batch (or (n, 1) signal, for a policy that reads
        one) as float64, shape (n,)."""
        return self.batch_score(self._checked(np.asarray(logits)))

    def score_table(self, per_exit: Sequence[np.ndarray]) -> np.ndarray:
        """Scores of every exit for every sample, (exits, n), as the runtime computes them when a
        sample reaches each exit in turn (a stateful policy carries its state along).
        ``per_exit`` holds what the policy reads at each exit (logits, or its signal)."""
        if self.step is None or self.initial is None:
            return np.stack([self.scores(logits) for logits in per_exit])
        state = self.initial(len(per_exit[0]))
        table = []
        for logits in per_exit:
            scores, state = self.step(state, self._checked(np.asarray(logits)))
            table.append(scores)
        return np.stack(table)

    def _checked(self, values: np.ndarray) -> np.ndarray:
        """``values`` if they have the shape this policy reads, else a ``PolicyError``."""
        if values.ndim != 2 or (self.reads != "logits" and values.shape[1] != 1):
            raise PolicyError(
                f"policy {self.name!r} scores 2-D "
                f"{'logits (batch, classes)' if self.reads == 'logits' else self.reads + ' values (batch, 1)'}; "
                f"got shape {values.shape}"
            )
        return values

    def accepts(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        """Boolean mask of samples whose score passes ``threshold``; NaN/Inf never passes."""
        with np.errstate(invalid="ignore"):
            if self.direction == "higher":
                passed = scores >= threshold
            else:
                passed = scores < threshold
        return passed & np.isfinite(scores)

    def accepts_one(self, score: float, threshold: float) -> bool:
        """``accepts`` for a single Python float (batch-1 fast path)."""
        if not math.isfinite(score):
            return False
        return score >= threshold if self.direction == "higher" else score < threshold

    def score_one(self, logits_row: np.ndarray) -> float:
        """Score of one sample's logits (1-D); pure Python for small class counts."""
        if logits_row.shape[-1] <= _SCALAR_PATH_MAX_CLASSES:
            return self.row_score(logits_row.tolist())
        return float(self.batch_score(logits_row.reshape(1, -1))[0])


# --- scores -----------------------------------------------------------------------


def _shifted_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp(z - max z) per row, the row sums, and z - max z, all float64."""
    z = logits.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = z - z.max(axis=1, keepdims=True)
        e = np.exp(shifted)
    return e, e.sum(axis=1), shifted


def _confidence_batch(logits: np.ndarray) -> np.ndarray:
    # max softmax probability = exp(0) / sum(exp(z - max z))
    _, total, _ = _shifted_exp(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / total


def _entropy_batch(logits: np.ndarray) -> np.ndarray:
    # H = -sum p ln p = ln(sum e) - sum(p * shifted), exact and stable
    e, total, shifted = _shifted_exp(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = e / total[:, None]
        return np.log(total) - np.einsum("ij,ij->i", p, np.where(p > 0, shifted, 0.0))


def _margin_batch(logits: np.ndarray) -> np.ndarray:
    e, total, _ = _shifted_exp(logits)
    if e.shape[1] < 2:
        return np.ones(e.shape[0])
    second = np.partition(e, -2, axis=1)[:, -2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 - second) / total


# The batch-1 scores of one row, one pass each: no lists, no comprehensions.  Right after onnxruntime
# ran a stage the caches are cold, and each comprehension (its own code object before Python 3.12)
# cost about 0.5 us more there: 1.4 against 2.9 us for a 10-class entropy (benchmarks/bench_overhead.py).
# NaN or +Inf anywhere makes the total NaN, so the score comes out NaN: never an exit.
_exp, _log = math.exp, math.log


def _confidence_row(row: list[float]) -> float:
    top = max(row)
    total = 0.0
    for v in row:
        total += _exp(v - top)
    return 1.0 / total if total == total else math.nan


def _entropy_row(row: list[float]) -> float:
    # H = ln(sum e) - sum(e * shifted) / sum e, with e = exp(z - max z) (as _entropy_batch)
    top = max(row)
    total = weighted = 0.0
    for v in row:
        shifted = v - top
        e = _exp(shifted)
        total += e
        if e > 0.0:
            weighted += e * shifted
    if total != total:
        return math.nan
    return _log(total) - weighted / total


def _margin_row(row: list[float]) -> float:
    top = max(row)
    total, first, second = 0.0, -1.0, -1.0   # the two largest exp(z - max z)
    for v in row:
        e = _exp(v - top)
        total += e
        if e > first:
            first, second = e, first
        elif e > second:
            second = e
    if total != total:
        return math.nan
    if len(row) < 2:
        return 1.0
    return (1.0 - second) / total


def _patience_initial(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, -1, np.int64), np.zeros(n, np.int64)


def _patience_step(state: tuple[np.ndarray, ...], logits: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """PABEE: the count of consecutive earlier exits whose argmax equals this one's; a row with a
    NaN, a +inf or only -inf (no prediction) scores NaN (never exits) and breaks the run."""
    previous, count = state
    with np.errstate(invalid="ignore"):   # a class at -inf never occurs; NaN, +inf or all -inf: no prediction
        top = logits.max(axis=1) if logits.shape[1] else np.full(len(logits), np.nan)
    finite = np.isfinite(top) & ~np.isnan(logits).any(axis=1)
    prediction = np.where(finite, np.argmax(np.where(np.isnan(logits), -np.inf, logits), axis=1), -2)
    count = np.where(finite & (prediction == previous), count + 1, 0)
    return np.where(finite, count.astype(np.float64), np.nan), (prediction, count)


def _patience_fresh(logits: np.ndarray) -> np.ndarray:
    """The patience score without earlier exits (a full-model run): 0, NaN for non-finite logits."""
    return _patience_step(_patience_initial(len(logits)), logits)[0]


def _patience_fresh_row(row: list[float]) -> float:
    top = max(row) if row else math.nan
    return 0.0 if math.isfinite(top) and not any(v != v for v in row) else math.nan


def _signal_batch(values: np.ndarray) -> np.ndarray:
    """A (n, 1) signal as float64 scores (n,); NaN stays NaN (never an exit)."""
    return values[:, 0].astype(np.float64)


def _signal_row(row: list[float]) -> float:
    return float(row[0])


def _halt_initial(n: int) -> tuple[np.ndarray]:
    return (np.ones(n, np.float64),)


def _halt_step(state: tuple[np.ndarray, ...], halt: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """PALBERT's Q-exit: with halting probabilities lambda_j, the probability of having exited
    by this exit is sum_j p_j = 1 - prod_j (1 - lambda_j); the state is that product (the
    probability of still running).  A lambda within 1e-6 of [0, 1] (rounding, int8 graphs) is
    clipped into it; NaN or one further out is no probability: NaN from there on, never an exit."""
    (running,) = state
    lam = halt[:, 0].astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = (lam >= -_HALT_SLACK) & (lam <= 1.0 + _HALT_SLACK)
    lam = np.clip(np.where(valid, lam, 0.0), 0.0, 1.0)
    running = np.where(valid, running * (1.0 - lam), np.nan)
    return 1.0 - running, (running,)


_HALT_SLACK = 1e-6


def _stateful_fresh(values: np.ndarray) -> np.ndarray:
    """A stateful policy's score without its earlier exits (the full-model shortcut): NaN."""
    return np.full(len(values), np.nan)


def _stateful_fresh_row(row: list[float]) -> float:
    return math.nan


# --- registry ---------------------------------------------------------------------

_REGISTRY: dict[str, ExitPolicy] = {}


def scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """An exit's logits as its policy scores them: divided by the exit's temperature, in float64
    (package format version 9; the compiled graph divides the same way), or as they are at 1."""
    return logits if temperature == 1.0 else logits.astype(np.float64) / temperature


def register_policy(policy: ExitPolicy) -> ExitPolicy:
    """Add a policy to the registry; refuses to overwrite an existing name."""
    if policy.name in _REGISTRY:
        raise PolicyError(
            f"a policy named {policy.name!r} is already registered; pick another name"
        )
    _REGISTRY[policy.name] = policy
    return policy


def list_policies() -> list[str]:
    """Names of every registered policy, sorted."""
    return sorted(_REGISTRY)


def get_policy(name: str) -> ExitPolicy:
    """The registered policy called ``name``; a typed error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown exit policy {name!r}; registered policies: {', '.join(list_policies())}."
            + did_you_mean(name, _REGISTRY)
        ) from None


def never_threshold(policy: ExitPolicy) -> float:
    """The threshold of a disabled exit: no score passes it (a NaN never passes anyway)."""
    return math.inf if policy.direction == "higher" else -math.inf


def always_threshold(policy: ExitPolicy) -> float:
    """A finite threshold every finite score passes (a NaN still never does)."""
    return -1e300 if policy.direction == "higher" else 1e300


# a threshold this far outside the score range is refused; nearer ones are the search's
# "nobody exits" candidates, which sit just beyond the lowest or highest score seen
_RANGE_SLACK = 1e-6


def check_thresholds(policy: ExitPolicy, thresholds: Sequence[float | None], expected: int,
                     allow_disabled: bool = False) -> list[float | None]:
    """Validate one threshold per early exit; returns them as floats.

    Each must be a real number (not a bool or a string), finite, and one that some score of
    the policy can pass (confidence 7 or entropy -5 would silently disable the exit: pass
    None for that).  With ``allow_disabled``, None (that exit is disabled) is kept as None.
    """
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__iter__"):
        raise ThresholdError(
            f"thresholds must be a list with one number per early exit ({expected}), got "
            f"{type(thresholds).__name__} {thresholds!r}; e.g. thresholds=[{0.5 if expected else ''}]"
        )
    values = list(thresholds)
    if len(values) != expected:
        raise ThresholdError(
            f"expected {expected} threshold(s), one per early exit (the last exit always "
            f"accepts and takes none); got {len(values)}: {values}"
        )
    out: list[float | None] = []
    low, high = policy.score_range
    for i, t in enumerate(values):
        if t is None and allow_disabled:
            out.append(None)
            continue
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            raise ThresholdError(f"threshold {i} must be a number, got {t!r} ({type(t).__name__})")
        try:
            f, shown = float(t), ""
        except OverflowError:
            f, shown = math.inf, f"an integer of {len(str(abs(int(t))))} digits"
        if not math.isfinite(f):
            raise ThresholdError(
                f"threshold {i} is {shown or f}; use a finite number (policy {policy.name!r} exits when "
                f"score {'>=' if policy.direction == 'higher' else '<'} threshold)"
            )
        never = (policy.direction == "higher" and high is not None and f > high + _RANGE_SLACK) or (
            policy.direction == "lower" and low is not None and f < low - _RANGE_SLACK)
        if never:
            bounds = f"{low if low is not None else '-inf'} … {high if high is not None else 'inf'}"
            raise ThresholdError(
                f"threshold {i} is {f:g}, but {policy.name} scores lie in {bounds} and the exit fires when score "
                f"{'>=' if policy.direction == 'higher' else '<'} threshold: it could never fire. Pass None to "
                "disable an exit, or a threshold inside the range"
            )
        out.append(f)
    return out


register_policy(
    ExitPolicy(
        "confidence", "higher", _confidence_batch, _confidence_row,
        "max softmax probability; exits when score >= threshold", (0.0, 1.0),
    )
)
register_policy(
    ExitPolicy(
        "entropy", "lower", _entropy_batch, _entropy_row,
        "softmax entropy -sum p ln p (BranchyNet); exits when score < threshold", (0.0, None),
    )
)
register_policy(
    ExitPolicy(
        "margin", "higher", _margin_batch, _margin_row,
        "top-1 minus top-2 softmax probability; exits when score >= threshold", (0.0, 1.0),
    )
)
register_policy(
    ExitPolicy(
        "patience", "higher", _patience_fresh, _patience_fresh_row,
        "PABEE: consecutive earlier exits agreeing on the argmax; exits when the count >= threshold (the patience)",
        (0.0, None), initial=_patience_initial, step=_patience_step,
    )
)
register_policy(
    ExitPolicy(
        "q_exit", "higher", _stateful_fresh, _stateful_fresh_row,
        "PALBERT Q-exit: cumulative exit probability 1 - prod(1 - lambda) of the exits' halting heads; exits when "
        "it reaches the threshold q (0.5 in the paper)",
        (0.0, 1.0), initial=_halt_initial, step=_halt_step, reads="halt",
    )
)
register_policy(
    ExitPolicy(
        "gate", "higher", _signal_batch, _signal_row,
        "JEI-DNN gate: a learned sigmoid of four uncertainty features of the exit's softmax; exits when "
        "score >= threshold (0.5 by default)",
        (0.0, 1.0), reads="gate",
    )
)
