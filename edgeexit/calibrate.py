"""Threshold selection from recorded exit outputs (numpy only, runs on a device too).

``record_exits`` runs a labelled set once through every stage; ``exits_taken``
replays any thresholds on those records without running the model again;
``shared_threshold`` finds the most permissive single threshold, shared by every
early exit, that keeps accuracy within ``max_drop`` of the full model; and
``calibrate_thresholds`` searches one threshold per exit against the stage costs
measured on this device (see ``_search``), writing the result into the package with
``apply_calibration`` while keeping the previous thresholds recoverable.
``calibrate_temperatures`` fits one temperature per exit (``fit_temperature``, judged by
``expected_calibration_error``) and writes them with ``set_temperatures``; every exit score
here is computed from the logits divided by the exit's temperature, as the runtime does.

Why one file of ~760 lines: recording, replaying, choosing and writing share one record
type and one history format, and temperature scaling (fit, ECE, write) sits beside them because
every exit score calibration computes is taken at those temperatures; the joint search itself is
in ``_search``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._search import Objective, Point, Search, candidate_thresholds, drop_bound, pareto
from .errors import InputError
from .policies import get_policy, scale_logits


@dataclass(frozen=True)
class ExitRecords:
    """Every exit's scores and predictions for a labelled set (n samples, E exits)."""

    scores: np.ndarray        # (E, n) float64
    predictions: np.ndarray   # (E, n) int64
    labels: np.ndarray        # (n,)
    policy: str

    @property
    def full_accuracy(self) -> float:
        return float((self.predictions[-1] == self.labels).mean())


def record_exits(session, inputs, labels: np.ndarray, policy: str | None = None,
                 batch_size: int = 256) -> ExitRecords:
    """Run ``inputs`` through every stage of ``session`` (an ``ExitSession``) and record each exit."""
    labels = np.asarray(labels)
    pol = get_policy(policy or session.package.policies[0])
    names = session.input_names
    feeds = inputs if isinstance(inputs, dict) else {names[0]: inputs}
    n = len(labels)
    if n == 0:
        raise InputError("the labelled set is empty; calibration needs samples")
    if any(session.package.stages[k].exit.output(pol.reads) is None for k in session.exit_stages):
        raise InputError(f"policy {pol.name!r} scores the exits' {pol.reads!r} signal, which this package's exits "
                         "do not output; calibrate a policy that reads the logits")
    chunks: list[list[dict[str, np.ndarray]]] = []
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in feeds.items()}
        chunks.append(session.exit_outputs(part))
    per_exit = [{what: np.concatenate([c[e][what] for c in chunks]) for what in ("logits", pol.reads)}
                for e in range(session.num_exits)]
    # the runtime scores each exit's logits divided by its temperature (format version 9)
    scored = [scale_logits(outputs["logits"], t) if pol.reads == "logits" else outputs[pol.reads]
              for outputs, t in zip(per_exit, session.package.temperatures)]
    return ExitRecords(
        scores=pol.score_table(scored),
        predictions=np.stack([outputs["logits"].argmax(axis=1) for outputs in per_exit]),
        labels=labels,
        policy=pol.name,
    )


def exits_taken(records: ExitRecords, thresholds: Sequence[float]) -> np.ndarray:
    """Exit index each sample would take under ``thresholds`` (one per early exit)."""
    pol = get_policy(records.policy)
    num_exits, n = records.scores.shape
    taken = np.full(n, num_exits - 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for e, t in enumerate(thresholds):
        fire = undecided & pol.accepts(records.scores[e], t)
        taken[fire] = e
        undecided &= ~fire
    return taken


def accuracy_at(records: ExitRecords, thresholds: Sequence[float]) -> tuple[float, np.ndarray]:
    """Early-exit accuracy and exit shares under ``thresholds``."""
    taken = exits_taken(records, thresholds)
    preds = records.predictions[taken, np.arange(taken.size)]
    shares = np.bincount(taken, minlength=records.scores.shape[0]) / taken.size
    return float((preds == records.labels).mean()), shares


def accuracy_drop_bound(records: ExitRecords, taken: np.ndarray, z: float) -> float:
    """Upper confidence bound on the accuracy drop vs the last exit, from paired outcomes.

    With ``lost`` samples the full model gets right and the early exit gets wrong, and
    ``won`` the other way round, the drop is (lost - won) / n with standard error
    sqrt(lost + won) / n (paired comparison, normal approximation).
    """
    n = taken.size
    early_right = records.predictions[taken, np.arange(n)] == records.labels
    full_right = records.predictions[-1] == records.labels
    return drop_bound(int((full_right & ~early_right).sum()), int((early_right & ~full_right).sum()), n, z)


def shared_threshold(records: ExitRecords, max_drop: float, z: float = 1.645) -> tuple[float, float, np.ndarray]:
    """The most permissive single threshold (shared by every early exit) whose accuracy drop
    vs the full model stays within ``max_drop`` at the one-sided confidence ``z`` (1.645:
    95 %; 0: the point estimate).  Returns (threshold, accuracy, exit shares).

    The bound matters: on a 500-sample calibration split one sample is 0.2 points, so the
    point estimate alone picks thresholds that lose accuracy on held-out data.
    """
    pol = get_policy(records.policy)
    early = records.scores.shape[0] - 1
    for t in candidate_thresholds(pol, records.scores[:-1].ravel())[::-1]:  # most permissive first
        taken = exits_taken(records, [t] * early)
        if accuracy_drop_bound(records, taken, z) <= max_drop + 1e-12:
            acc, shares = accuracy_at(records, [t] * early)
            return float(t), acc, shares
    raise InputError("no threshold keeps accuracy within max_drop; this cannot happen with a valid record")


# --- per-exit threshold calibration -------------------------------------------------------


class CalibrationError(InputError):
    """The calibration data or objective cannot be used."""


class InfeasibleObjectiveError(CalibrationError):
    """No thresholds meet the objective on the calibration data; the message says what can."""


@dataclass(frozen=True)
class FrontierPoint:
    """One non-dominated choice: thresholds, accuracy and expected cost per sample."""

    thresholds: tuple[float, ...]
    accuracy: float
    expected_cost: float
    shares: tuple[float, ...]
    feasible: bool = True     # meets the objective (a cheaper row may not: see ``drop_bound``)


@dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate_thresholds`` chose, and the accuracy/cost frontier it saw.

    ``expected_cost`` and ``full_cost`` are per sample, in ``cost_unit`` (``ms`` when timed
    on this device, ``MFLOPs`` from the manifest otherwise).  Timed, ``exit_costs[e]`` is
    the median batch-1 time of ``ExitSession.run`` for a sample leaving at exit ``e`` (on
    ``engine``), and ``full_cost`` the full model's (``full_model``: ``full.onnx``, or every
    stage with exits disabled), measured in the same interleaved run; so the speedup
    ``full_cost / expected_cost`` is against the plain model, runtime costs included.
    """

    policy: str
    thresholds: list[float]
    accuracy: float
    full_accuracy: float
    expected_cost: float
    full_cost: float
    shares: list[float]
    stage_costs: list[float]
    cost_unit: str
    cost_source: str
    objective: dict[str, float | str]
    method: str
    evaluated: int
    samples: int
    frontier: list[FrontierPoint]
    exit_costs: list[float] | None = None
    engine: str | None = None
    full_model: str = "last exit"
    disabled_cost: float | None = None   # the package with its exits disabled, through the runtime

    @property
    def speedup(self) -> float:
        """Expected speedup against the full model (< 1: slower than not exiting at all)."""
        return self.full_cost / self.expected_cost if self.expected_cost > 0 else math.inf

    def entry(self) -> dict[str, object]:
        """The manifest's calibration-history entry for this result."""
        return {
            "policy": self.policy,
            "thresholds": self.thresholds,
            "objective": self.objective,
            "method": self.method,
            "samples": self.samples,
            "validation_accuracy": self.accuracy,
            "full_accuracy": self.full_accuracy,
            "expected_shares": self.shares,
            "expected_cost": self.expected_cost,
            "full_cost": self.full_cost,
            "cost_unit": self.cost_unit,
            "cost_source": self.cost_source,
            "stage_costs": self.stage_costs,
            "exit_costs": self.exit_costs,
            "engine": self.engine,
            "full_model": self.full_model,
            "disabled_cost": self.disabled_cost,
        }


def single_row(session, feeds: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Sample ``i`` alone, as a batch-1 call would get it: for a package that tokenizes texts, without
    the padding of the longest text of the set (a timed row must cost what that text costs)."""
    row = {k: np.ascontiguousarray(v[i:i + 1]) for k, v in feeds.items()}
    text = getattr(getattr(session, "package", None), "text", None)
    if text is not None and text.mask is not None and text.mask in row and row[text.mask].ndim == 2:
        length = max(1, int(np.count_nonzero(row[text.mask][0])))
        for name in (text.ids, text.mask):
            if name in row and row[name].ndim == 2:
                row[name] = np.ascontiguousarray(row[name][:, :length])
    return row


def measure_stage_ms(session, inputs, samples: int = 64, repeats: int = 3) -> list[float]:  # type: ignore[no-untyped-def]
    """Median onnxruntime ms of every stage at batch 1 on this device (all stages run)."""
    feeds = inputs if isinstance(inputs, dict) else {session.input_names[0]: inputs}
    n = next(iter(feeds.values())).shape[0]
    picks = np.linspace(0, n - 1, min(samples, n)).astype(int)
    one = [single_row(session, feeds, int(i)) for i in picks]
    for x in one[:8]:  # warm-up
        session.run(x, early_exits=False)
    times = [session.run(x, early_exits=False).stage_ms for _ in range(repeats) for x in one]
    return np.median(np.array(times), axis=0).tolist()


@dataclass(frozen=True)
class ExitPathTimes:
    """Median batch-1 ms of every exit path, of the package with its exits disabled and of the
    plain full model, from one interleaved run."""

    path_ms: list[float]   # a sample leaving at exit e, through ExitSession.run on ``engine``
    full_ms: float         # the plain model: full.onnx in a bare onnxruntime session
    disabled_ms: float     # ExitSession.run with every early exit disabled
    engine: str
    full_model: str        # "full.onnx" or "every stage, exits disabled"


def measure_exit_paths(session, inputs, *, policy: str | None = None, samples: int = 64,  # type: ignore[no-untyped-def]
                       repeats: int = 3, engine: str | None = None, block: int = 16) -> ExitPathTimes:
    """``measure_exit_paths_per_engine`` for one engine (default: the one ``session`` uses at batch 1)."""
    return measure_exit_paths_per_engine(session, inputs, [engine], policy=policy, samples=samples, repeats=repeats,
                                         block=block)[0]


def measure_exit_paths_per_engine(session, inputs, engines: Sequence[str | None], *,  # type: ignore[no-untyped-def]
                                  policy: str | None = None, samples: int = 64, repeats: int = 3,
                                  block: int = 16) -> list[ExitPathTimes]:
    """Time what the device pays per exit path, end to end, against the plain full model.

    For each of ``samples`` inputs (evenly spread, batch 1) and each repeat, calls in turn
    ``session.run`` with thresholds that send the sample to exit 0, 1, ... (so every stage
    call, exit head, policy score and the runtime's own work is counted, on each engine of
    ``engines``, None meaning the session's choice), ``session.run`` with every exit
    disabled (what a package written with its exits disabled pays) and the plain model
    (``session.plain_full_model``: ``full.onnx`` in a bare onnxruntime session, as ``bench``
    times it); the order rotates per block of ``block`` samples (each contender runs a block
    warm, as in a stream of requests and in ``bench``'s windows; ``block=1`` times every call
    cold).  Medians per contender.  Every engine's paths are timed in the same interleaved
    run, so they compare fairly; one ``ExitPathTimes`` per engine.
    """
    from .runtime._engines import forced_paths, interleaved_ms

    feeds = inputs if isinstance(inputs, dict) else {session.input_names[0]: inputs}
    n = next(iter(feeds.values())).shape[0]
    picks = np.linspace(0, n - 1, min(samples, n)).astype(int)
    one = [single_row(session, feeds, int(i)) for i in picks]
    pol = get_policy(policy or session.package.policies[0])
    paths = forced_paths([pol.name] * session.num_exits)
    plain, label = session.plain_full_model()
    # each through ``runner``: a setting costs what the package written with it pays per call
    calls: list[Any] = [session.runner(t, policy=pol.name, engine=e) for e in engines for t in paths]
    # every exit disabled, engine left to the session: what a package written disabled pays (full.onnx)
    calls += [session.runner(paths[-1], policy=pol.name), plain]
    times = interleaved_ms(calls, one, repeats, block=block)
    medians = [float(np.median(t)) for t in times]
    timed = []
    for i, e in enumerate(engines):
        used = session.run(one[0], thresholds=paths[0], policy=pol.name, engine=e).engine
        timed.append(ExitPathTimes(medians[i * len(paths):(i + 1) * len(paths)], medians[-1], medians[-2], used,
                                   label))
    return timed


def _objective(max_drop: float | None, target_accuracy: float | None, latency_budget: float | None,
               z: float) -> Objective:
    given = [(k, v) for k, v in (("max_drop", max_drop), ("target_accuracy", target_accuracy),
                                  ("latency_budget", latency_budget)) if v is not None]
    if len(given) != 1:
        raise CalibrationError(
            "give exactly one objective: max_drop (accuracy points you may lose, as a fraction), "
            f"target_accuracy (a fraction) or latency_budget (per sample); got {[k for k, _ in given] or 'none'}"
        )
    kind, value = given[0]
    if not math.isfinite(value) or value < 0 or (kind == "target_accuracy" and value > 1):
        raise CalibrationError(f"{kind} must be finite and >= 0{' and <= 1' if kind == 'target_accuracy' else ''}; "
                               f"got {value}")
    return Objective(kind, float(value), z if kind == "max_drop" else 0.0)


def calibrate_thresholds(
    session,  # type: ignore[no-untyped-def]
    inputs,
    labels,
    *,
    max_drop: float | None = None,
    target_accuracy: float | None = None,
    latency_budget: float | None = None,
    z: float = 1.645,
    stage_costs: Sequence[float] | None = None,
    measure: bool = True,
    policy: str | None = None,
    batch_size: int = 256,
) -> CalibrationResult:
    """Choose one threshold per early exit from labelled validation data.

    Minimises the expected cost per sample subject to an accuracy objective (``max_drop``:
    the drop vs the last exit, as a fraction, bounded at one-sided confidence ``z``;
    ``target_accuracy``: a fraction), or maximises accuracy under ``latency_budget`` (per
    sample, in the cost unit).  Costs are the stages' median batch-1 ms measured on this
    device (``measure=True``), given ``stage_costs``, or the manifest's FLOPs.

    Example:
        >>> result = calibrate_thresholds(ExitSession("lenet.eexit"), x_val, y_val,
        ...                               max_drop=0.003)               # doctest: +SKIP
        >>> result.thresholds, result.expected_cost                     # doctest: +SKIP
    """
    objective = _objective(max_drop, target_accuracy, latency_budget, z)
    feeds = inputs if isinstance(inputs, dict) else {session.input_names[0]: inputs}
    if labels is None:
        raise CalibrationError("calibration needs labels: add a 'labels' array (one integer per sample) to the data")
    labels = np.asarray(labels)
    n = next(iter(feeds.values())).shape[0] if feeds else 0
    if n == 0:
        raise CalibrationError("the calibration set is empty; give it labelled samples")
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationError(
            f"labels must be integers of shape ({n},), one per sample; got {labels.dtype} {labels.shape}"
        )
    if session.num_exits < 2:
        raise CalibrationError("this package has a single exit; there is no threshold to calibrate")
    records = record_exits(session, feeds, labels, policy=policy, batch_size=batch_size)

    stages = session.package.stages
    paths: ExitPathTimes | None = None
    if stage_costs is not None:
        costs, unit, source = [float(c) for c in stage_costs], "ms", "given"
        if len(costs) != len(stages):
            raise CalibrationError(f"stage_costs needs {len(stages)} values, one per stage; got {len(costs)}")
    elif measure:
        costs, unit = measure_stage_ms(session, feeds), "ms"
        # the exit paths on each engine the runtime can take for these policies; the search runs
        # on each and the cheaper outcome decides the engine too
        compiled = session.has_compiled and records.policy == session.package.policies[0]
        engines = ("stages", "compiled") if compiled else ("stages",)
        timed = measure_exit_paths_per_engine(session, feeds, engines, policy=records.policy)
        paths = min(timed, key=lambda t: search_thresholds(records, t.path_ms, objective).best.cost)
        source = (f"measured: median batch-1 ms of ExitSession.run per exit path ({paths.engine}) and of the "
                  f"full model ({paths.full_model}), interleaved on this device")
    else:
        costs, unit, source = [float(s.cost.get("flops", 0)) / 1e6 for s in stages], "MFLOPs", "manifest FLOPs"
    cumulative = np.cumsum(costs)
    exit_costs = paths.path_ms if paths is not None else [float(cumulative[k]) for k in session.exit_stages]
    full_cost, full_model = exit_costs[-1], "last exit"
    if paths is not None:
        full_cost, full_model = paths.full_ms, paths.full_model
    elif unit == "MFLOPs" and session.package.full_model is not None:
        full_cost, full_model = float(session.package.full_model.cost.get("flops", 0)) / 1e6 or full_cost, "full.onnx"

    outcome = search_thresholds(records, exit_costs, objective, unit=unit)
    search, best, n = outcome.search, outcome.best, records.labels.size

    def point(p: Point) -> FrontierPoint:
        taken = search.taken(p.index)
        return FrontierPoint(tuple(search.thresholds(p.index)), p.correct / n, p.cost / n,
                             tuple((np.bincount(taken, minlength=search.early + 1) / n).tolist()),
                             objective.feasible(p, n))

    chosen = point(best)
    return CalibrationResult(
        policy=records.policy, thresholds=list(chosen.thresholds), accuracy=chosen.accuracy,
        full_accuracy=records.full_accuracy, expected_cost=chosen.expected_cost, full_cost=full_cost,
        shares=list(chosen.shares), stage_costs=costs, cost_unit=unit, cost_source=source,
        objective={"kind": objective.kind, "value": objective.value, "z": objective.z},
        method=outcome.method, evaluated=search.evaluated, samples=n,
        # the chosen point can sit off the frontier (the drop bound also weighs lost vs won samples)
        frontier=[point(p) for p in sorted({*pareto(outcome.seen), best}, key=lambda p: (p.cost, -p.correct))],
        exit_costs=list(exit_costs), engine=None if paths is None else paths.engine, full_model=full_model,
        disabled_cost=None if paths is None else paths.disabled_ms,
    )


@dataclass(frozen=True)
class Replay:
    """The chosen thresholds run for real on the calibration data, before anything is written."""

    accuracy: float
    shares: list[float]
    mean_ms: float          # ExitSession.run at batch 1, mean over the timed samples
    full_mean_ms: float     # the plain model (full.onnx, bare onnxruntime) on the same samples, interleaved
    samples_timed: int
    disabled_mean_ms: float | None = None   # ExitSession.run with every exit disabled, same samples

    @property
    def speedup(self) -> float:
        return self.full_mean_ms / self.mean_ms


def replay_calibration(session, inputs, labels, result: CalibrationResult, *,  # type: ignore[no-untyped-def]
                       samples: int = 300, repeats: int = 3, batch_size: int = 256, block: int = 16) -> Replay:
    """Run ``result``'s thresholds through ``session`` on the calibration data.

    Accuracy and exit shares come from the real runtime over every sample (they must equal
    what the search computed from the records, else ``CalibrationError``); the speed from
    ``samples`` inputs at batch 1, each timed ``repeats`` times through ``session.run``, the
    plain model and the package with its exits disabled, in turn: the mean over samples of
    each sample's median, comparable with the expected cost (exit shares x median path
    times), so the expected speedup is checked against a measured one.
    """
    from .runtime._engines import interleaved_ms

    feeds = inputs if isinstance(inputs, dict) else {session.input_names[0]: inputs}
    labels = np.asarray(labels)
    n = labels.size
    runs = [session.run({k: v[s:s + batch_size] for k, v in feeds.items()}, thresholds=result.thresholds,
                        policy=result.policy, engine=result.engine) for s in range(0, n, batch_size)]
    predictions = np.concatenate([r.predictions for r in runs])
    exits = np.concatenate([r.exit_index for r in runs])
    accuracy = float((predictions == labels).mean())
    shares = (np.bincount(exits, minlength=session.num_exits) / n).tolist()
    if abs(accuracy - result.accuracy) > 0.5 / n or np.abs(np.subtract(shares, result.shares)).max() > 0.5 / n:
        raise CalibrationError(
            f"replaying thresholds {result.thresholds} through the runtime gave accuracy {accuracy:.4%} and exit "
            f"shares {np.round(shares, 4).tolist()}, but the search computed {result.accuracy:.4%} and "
            f"{np.round(result.shares, 4).tolist()}; nothing was written. Please report this."
        )
    picks = np.linspace(0, n - 1, min(samples, n)).astype(int)
    one = [single_row(session, feeds, int(i)) for i in picks]
    plain, _label = session.plain_full_model()
    off = [None] * len(result.thresholds)
    # through ``runner``: what the package written with these thresholds (or disabled) pays per call
    calls = [session.runner(result.thresholds, policy=result.policy, engine=result.engine), plain,
             session.runner(off, policy=result.policy)]
    per_sample = np.median(interleaved_ms(calls, one, repeats, block=block), axis=1)
    return Replay(accuracy, shares, float(per_sample[0].mean()), float(per_sample[1].mean()), len(one),
                  float(per_sample[2].mean()))


@dataclass(frozen=True)
class SearchOutcome:
    search: Search
    best: Point
    seen: list[Point]
    method: str


def search_thresholds(
    records: ExitRecords, exit_costs: Sequence[float], objective: Objective, *, unit: str = "cost units"
) -> SearchOutcome:
    """The best joint thresholds on ``records`` for ``objective`` (see ``_search``).

    ``exit_costs[e]`` is the cost of a sample that leaves at exit ``e`` (stages run so far).
    Raises ``InfeasibleObjectiveError`` saying what is reachable when nothing qualifies.
    """
    n = records.labels.size
    search = Search(records.scores, records.predictions, records.labels, records.policy, exit_costs)
    seen: list[Point] = []
    best: Point | None = None

    def visit(p: Point) -> None:
        nonlocal best
        seen.append(p)
        if objective.feasible(p, n) and (best is None or objective.key(p) < objective.key(best)):
            best = p

    grids, complete = search.grid()
    search.enumerate(grids, visit)
    method = "exhaustive" if complete else "grid+refine"
    if not complete and best is None:  # the grid may miss a feasible corner: walk toward one
        start = min(seen, key=(lambda p: (p.cost, -p.correct)) if objective.kind == "latency_budget"
                    else (lambda p: (-p.correct, p.cost)))
        repaired = search.repair(start, objective, visit)
        if repaired is not None:
            best = repaired
    if not complete and best is not None:
        best = search.refine(best, objective, visit)
    if best is None:
        raise InfeasibleObjectiveError(_reachable(objective, seen, n, unit))
    return SearchOutcome(search, best, seen, method)


def _reachable(objective: Objective, seen: Sequence[Point], n: int, unit: str) -> str:
    if objective.kind == "target_accuracy":
        top = max(seen, key=lambda p: (p.correct, -p.cost))
        return (f"no thresholds reach accuracy {objective.value:.2%} on the calibration data: the best reachable is "
                f"{top.correct / n:.2%} (expected {top.cost / n:.4g} {unit}); lower the target")
    if objective.kind == "latency_budget":
        cheap = min(seen, key=lambda p: (p.cost, -p.correct))
        return (f"no thresholds fit a budget of {objective.value:.4g} {unit} per sample: the cheapest reachable is "
                f"{cheap.cost / n:.4g} {unit} (accuracy {cheap.correct / n:.2%}, every sample at the first exit); "
                "raise the budget")
    return f"no thresholds keep the drop within {objective.value:.2%}"


def why_disable_exits(result: CalibrationResult, replay: Replay | None = None) -> str | None:
    """Why the package should be written with its exits disabled, or None to keep the thresholds.

    Disabling wins when the chosen exits cost more per sample than the package with its
    exits disabled (which runs ``full.onnx`` through the runtime), by the replay's
    measurement when there is one, else by the expectation.  Only timed calibrations can
    say: FLOPs and caller-given costs ignore what the runtime and the device pay.
    """
    if result.cost_unit != "ms" or result.engine is None or result.disabled_cost is None:
        return None
    if replay is not None and replay.disabled_mean_ms is not None:
        if replay.mean_ms > replay.disabled_mean_ms:
            return (f"replayed, the exits cost {replay.mean_ms:.4g} ms per sample and the package with its exits "
                    f"disabled {replay.disabled_mean_ms:.4g} ms (the plain model {replay.full_mean_ms:.4g} ms)")
        return None
    if result.expected_cost > result.disabled_cost:
        return (f"the exits are expected to cost {result.expected_cost:.4g} ms per sample and the package with its "
                f"exits disabled {result.disabled_cost:.4g} ms (the plain model {result.full_cost:.4g} ms)")
    return None


def apply_calibration(path, result: CalibrationResult, device: str | None = None,  # type: ignore[no-untyped-def]
                      disable_exits: str | None = None):
    """Write ``result`` into the package manifest atomically, keeping the previous thresholds in
    the ``calibration`` history so ``revert_calibration`` can restore them.

    ``disable_exits`` (a reason, e.g. from ``why_disable_exits``) writes every early
    exit's threshold as null instead: the package then runs as its full model (format
    version 4), and the history entry keeps the thresholds it would have used and why not.
    """
    from datetime import datetime, timezone

    from .package import update_manifest

    def change(manifest: dict) -> None:  # type: ignore[type-arg]
        early = [s for s in manifest["stages"][:-1] if s.get("exit")]
        if len(early) != len(result.thresholds):
            raise CalibrationError(
                f"the result has {len(result.thresholds)} thresholds but the package has {len(early)} early exits"
            )
        previous = [s["exit"]["threshold"] for s in early]
        previous_policies = [s["exit"]["policy"] for s in [*early, manifest["stages"][-1]]]
        for stage, t in zip(early, result.thresholds):
            stage["exit"]["threshold"] = None if disable_exits else t
            stage["exit"]["policy"] = result.policy
        manifest["stages"][-1]["exit"]["policy"] = result.policy
        if result.cost_unit == "ms" and result.cost_source.startswith("measured"):
            for stage, ms in zip(manifest["stages"], result.stage_costs):
                stage.setdefault("cost", {})["measured_ms"] = ms
        entry = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
                 "previous_thresholds": previous, "previous_policies": previous_policies, **result.entry()}
        if disable_exits:
            entry["exits_disabled"] = disable_exits
        if disable_exits or any(t is None for t in previous):
            manifest["format_version"] = max(manifest["format_version"], 4)   # null early thresholds
        calibration = manifest.get("calibration") or {"history": []}
        calibration["history"].append(entry)
        manifest["calibration"] = calibration
        manifest["format_version"] = max(manifest["format_version"], 2)  # `calibration` is a version-2 field

    return update_manifest(path, change)


def revert_calibration(path):  # type: ignore[no-untyped-def]
    """Restore the thresholds (and policy) the newest calibration replaced; records the revert."""
    from datetime import datetime, timezone

    from .package import update_manifest

    def change(manifest: dict) -> None:  # type: ignore[type-arg]
        history = (manifest.get("calibration") or {}).get("history") or []
        live = [e for e in history if not e.get("reverted")]
        if not live:
            raise CalibrationError("this package has no calibration to revert")
        last = live[-1]
        early = [s for s in manifest["stages"][:-1] if s.get("exit")]
        for stage, t in zip(early, last["previous_thresholds"]):
            stage["exit"]["threshold"] = t
        for stage, policy in zip([*early, manifest["stages"][-1]], last["previous_policies"]):
            stage["exit"]["policy"] = policy
        last["reverted"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    return update_manifest(path, change)


def record_engine_choice(path, inputs, *, device=None, batch_size: int = 64,  # type: ignore[no-untyped-def]
                         batch1: str | None = None):
    """Time both engines on ``inputs`` at the package's thresholds and record the faster per regime.

    Writes ``compiled.engines`` (format version 3) so that ``ExitSession(engine="auto")`` on
    this device starts from the measured choice instead of the compiled graph everywhere.
    ``batch1`` (the calibration's engine, whose exit paths it timed against each other in one
    run) decides batch 1 instead of this timing, so the package runs the engine its expected
    speedup was computed for.  Returns the ``EngineTiming`` per regime, or ``[]`` when the
    package has no usable compiled graph (nothing is written then).
    """
    from .package import update_manifest
    from .runtime import ExitSession

    session = ExitSession(path, device=device)
    if session.package.exits_disabled:   # it runs as the full model: no engine to choose
        return []
    timings = session.tune_engines(inputs, batch_size=batch_size)
    if not timings:
        return []

    def change(manifest: dict) -> None:  # type: ignore[type-arg]
        manifest["compiled"]["engines"] = {
            "batch1": batch1 or timings[0].faster, "batch": timings[1].faster, "batch_size": timings[1].batch_size,
            "stages_ms": [t.stages_ms for t in timings], "compiled_ms": [t.compiled_ms for t in timings],
            "device": getattr(device, "name", device),
        }

    update_manifest(path, change)
    return timings


# --- temperature scaling -------------------------------------------------------------------


# The range fit_temperature searches: beyond it a softmax is all but one-hot (T -> 0) or uniform
# (T -> inf), which no exit of a trained network should be made to say.
TEMPERATURE_RANGE = (0.05, 20.0)


class TemperatureFit(NamedTuple):
    """One exit's fitted temperature and its expected calibration error before and after it."""

    temperature: float
    ece_before: float   # at the exit's temperature in the package (1.0 unless one was set)
    ece_after: float    # at ``temperature``


def _logits_and_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` as finite float64 (n, classes) and ``labels`` as n class indices, else a CalibrationError."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise CalibrationError(f"logits must be a non-empty (samples, classes) array; got shape {z.shape}")
    if y.shape != (z.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise CalibrationError(f"labels must be integers of shape ({z.shape[0]},), one per sample; got "
                               f"{y.dtype} {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise CalibrationError(f"labels must be class indices 0..{z.shape[1] - 1}; got {int(y.min())}..{int(y.max())}")
    if not np.isfinite(z).all():
        raise CalibrationError(f"{int((~np.isfinite(z).all(axis=1)).sum())} sample(s) have NaN or infinite logits; "
                               "a temperature cannot be fitted on them")
    return z, y


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(z / temperature) at the labels."""
    s = z / temperature
    top = s.max(axis=1)
    log_total = top + np.log(np.exp(s - top[:, None]).sum(axis=1))
    return float((log_total - s[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T) at
    ``labels`` (temperature scaling, Guo et al. 2017), within ``TEMPERATURE_RANGE``.

    The NLL is convex in 1/T, so it has one minimum along log T: a golden-section search on log T
    over [0.05, 20] finds it to 1e-4 relative (at an end of the range when the minimum lies
    beyond it).  Logits that are constant in every row say nothing about T: 1.0.

    Example:
        >>> import numpy as np
        >>> z = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
        >>> round(fit_temperature(z, np.array([0, 1, 1, 0])), 2)   # one of four is wrong: soften
        3.64
    """
    z, y = _logits_and_labels(logits, labels)
    if np.ptp(z, axis=1).max() == 0:
        return 1.0
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def f(log_t: float) -> float:
        return _nll(z, y, math.exp(log_t))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > 1e-4:
        if fa <= fb:   # the minimum is in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:          # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2.0)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15,
                               temperature: float = 1.0) -> float:
    """Expected calibration error of softmax(logits / temperature): the confidences (max
    probability) fall into ``bins`` equal-width bins, bin m holding those in (m/bins, (m+1)/bins];
    the ECE is the mean over samples of |accuracy - mean confidence| of each sample's bin.

    Example:
        >>> import numpy as np
        >>> expected_calibration_error(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 0]))  # doctest: +ELLIPSIS
        0.3807...
    """
    z, y = _logits_and_labels(logits, labels)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise CalibrationError(f"bins must be a positive integer; got {bins!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CalibrationError(f"temperature must be a positive finite number; got {temperature!r}")
    s = z / temperature
    confidence = 1.0 / np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1)   # as the confidence policy
    correct = (z.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = np.bincount(which, correct, minlength=bins) - np.bincount(which, confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(y))   # sum over bins of |acc - conf| * count / n


def calibrate_temperatures(session_or_path, inputs, labels, *, bins: int = 15,  # type: ignore[no-untyped-def]
                           batch_size: int = 256, write: bool = True) -> list[TemperatureFit]:
    """Fit one temperature per exit on labelled data and write them into the package.

    Every exit's logits are recorded in one pass through all stages (``run_all_exits``), a
    temperature is fitted per exit (``fit_temperature``: the final exit's too, which changes
    only the score it reports) and the expected calibration error is reported at the
    package's temperature before and at the fitted one after.  With ``write`` the
    temperatures go into the manifest atomically (``set_temperatures``: format version 9);
    a session already open keeps the old ones (open a new one), and a compiled graph is
    stale until ``edgeexit compile PACKAGE`` rebuilds it.  Fit on a split that thresholds
    are not calibrated on, and calibrate thresholds after: scores change with temperatures.

    Args:
        session_or_path: an ``ExitSession`` or the package's path.
        inputs: ``{name: array}`` or one array; ``labels``: one integer class per sample.

    Returns:
        One ``TemperatureFit(temperature, ece_before, ece_after)`` per exit, in exit order.

    Example:
        >>> fits = calibrate_temperatures("lenet.eexit", x_val, y_val)     # doctest: +SKIP
        >>> [round(f.temperature, 2) for f in fits]                        # doctest: +SKIP
        [1.73, 1.21]
    """
    from .package import set_temperatures
    from .runtime import ExitSession

    session = session_or_path if isinstance(session_or_path, ExitSession) else ExitSession(session_or_path)
    feeds = inputs if isinstance(inputs, dict) else {session.input_names[0]: inputs}
    n = next(iter(feeds.values())).shape[0] if feeds else 0
    if n == 0:
        raise CalibrationError("the labelled set is empty; temperature scaling needs samples")
    chunks = [session.run_all_exits({k: v[start:start + batch_size] for k, v in feeds.items()})
              for start in range(0, n, batch_size)]
    fits = []
    for e, current in enumerate(session.package.temperatures):
        logits = np.concatenate([chunk[e] for chunk in chunks])
        t = fit_temperature(logits, labels)
        fits.append(TemperatureFit(t, expected_calibration_error(logits, labels, bins, current),
                                   expected_calibration_error(logits, labels, bins, t)))
    if write:
        set_temperatures(session.package.root, [f.temperature for f in fits])
    return fits
