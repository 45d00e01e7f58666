"""Joint per-exit threshold search over recorded exit outputs (numpy only).

Every early exit gets its own threshold.  Candidates per exit are the midpoints between
neighbouring recorded scores (each one changes at least one decision), plus "nobody
exits here" and "everybody exits here".  When the product of candidate counts is small
the search is exhaustive (the exact optimum on the records); otherwise it enumerates an
evenly spaced grid of candidates, then refines the best point by coordinate descent over
all candidates until nothing improves.  Enumeration walks the exits depth first and
carries the mask of still-undecided samples, so a prefix is computed once for all its
continuations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .policies import ExitPolicy, get_policy

EXHAUSTIVE_LIMIT = 250_000  # evaluations; about a second of numpy on 1,000 samples


def candidate_thresholds(policy: ExitPolicy, scores: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring distinct finite scores, plus one beyond each end, strictest
    first (nobody exits ... everybody exits).  Each candidate changes at least one decision and
    sits as far as possible from every recorded score."""
    finite = np.unique(scores[np.isfinite(scores)])
    if finite.size == 0:
        return np.array([math.inf if policy.direction == "higher" else -math.inf])
    pad = 1e-9 + 1e-9 * np.abs(finite[[0, -1]])
    cands = np.concatenate([[finite[0] - pad[0]], (finite[:-1] + finite[1:]) / 2, [finite[-1] + pad[1]]])
    return cands[::-1] if policy.direction == "higher" else cands


def drop_bound(lost: int, won: int, n: int, z: float) -> float:
    """Upper confidence bound on the accuracy drop vs the last exit from paired outcomes: ``lost``
    samples the last exit gets right and the early exit wrong, ``won`` the other way round;
    (lost - won) / n with standard error sqrt(lost + won) / n (normal approximation)."""
    return (lost - won + z * math.sqrt(lost + won)) / n


@dataclass(frozen=True)
class Point:
    """One joint choice: candidate indices per early exit and what it gives on the records."""

    index: tuple[int, ...]
    correct: int
    cost: float          # summed over samples
    lost: int            # full model right, early exit wrong
    won: int             # early exit right, full model wrong


@dataclass(frozen=True)
class Objective:
    """``kind``: ``max_drop`` (drop vs the last exit <= value, at confidence ``z``),
    ``target_accuracy`` (accuracy >= value) or ``latency_budget`` (expected cost <= value)."""

    kind: str
    value: float
    z: float = 0.0

    def feasible(self, p: Point, n: int) -> bool:
        if self.kind == "max_drop":
            return drop_bound(p.lost, p.won, n, self.z) <= self.value + 1e-12
        if self.kind == "target_accuracy":
            return p.correct / n >= self.value - 1e-12
        return p.cost / n <= self.value + 1e-12

    def key(self, p: Point) -> tuple[float, float]:
        """Smaller is better among feasible points."""
        if self.kind == "latency_budget":
            return (-p.correct, p.cost)
        return (p.cost, -p.correct)


class Search:
    """Evaluates joint threshold choices on an ``ExitRecords`` table."""

    def __init__(self, scores: np.ndarray, predictions: np.ndarray, labels: np.ndarray, policy: str,
                 exit_costs: Sequence[float]) -> None:
        self.policy = get_policy(policy)
        num_exits, self.n = scores.shape
        self.early = num_exits - 1
        self.exit_costs = np.asarray(exit_costs, dtype=np.float64)
        correct = predictions == labels[None, :]
        full_right = correct[-1]
        self.correct = correct
        self.lost = full_right[None, :] & ~correct
        self.won = ~full_right[None, :] & correct
        self.candidates = [candidate_thresholds(self.policy, scores[e]) for e in range(self.early)]
        # pass[e][c]: which samples the c-th candidate of exit e lets out
        self.passes = [np.stack([self.policy.accepts(scores[e], t) for t in cands]) if len(cands) else
                       np.zeros((0, self.n), bool) for e, cands in enumerate(self.candidates)]
        self.evaluated = 0

    def thresholds(self, index: Sequence[int]) -> list[float]:
        return [float(self.candidates[e][c]) for e, c in enumerate(index)]

    def evaluate(self, index: Sequence[int]) -> Point:
        undecided = np.ones(self.n, dtype=bool)
        correct = lost = won = 0
        cost = 0.0
        for e, c in enumerate(index):
            fire = undecided & self.passes[e][c]
            correct += int((fire & self.correct[e]).sum())
            lost += int((fire & self.lost[e]).sum())
            won += int((fire & self.won[e]).sum())
            cost += float(fire.sum()) * self.exit_costs[e]
            undecided &= ~fire
        correct += int((undecided & self.correct[-1]).sum())
        cost += float(undecided.sum()) * self.exit_costs[-1]
        self.evaluated += 1
        return Point(tuple(index), correct, cost, lost, won)

    def taken(self, index: Sequence[int]) -> np.ndarray:
        out = np.full(self.n, self.early, dtype=np.int64)
        undecided = np.ones(self.n, dtype=bool)
        for e, c in enumerate(index):
            fire = undecided & self.passes[e][c]
            out[fire] = e
            undecided &= ~fire
        return out

    def enumerate(self, grids: Sequence[Sequence[int]], visit: Callable[[Point], None]) -> None:
        """Depth-first over the grid, sharing each prefix's undecided mask."""
        early = self.early

        def walk(e: int, undecided: np.ndarray, prefix: tuple[int, ...], correct: int, cost: float,
                 lost: int, won: int) -> None:
            if e == early:
                rest = undecided
                self.evaluated += 1
                visit(Point(prefix, correct + int((rest & self.correct[-1]).sum()),
                            cost + float(rest.sum()) * self.exit_costs[-1], lost, won))
                return
            for c in grids[e]:
                fire = undecided & self.passes[e][c]
                walk(e + 1, undecided & ~fire, (*prefix, c), correct + int((fire & self.correct[e]).sum()),
                     cost + float(fire.sum()) * self.exit_costs[e], lost + int((fire & self.lost[e]).sum()),
                     won + int((fire & self.won[e]).sum()))

        walk(0, np.ones(self.n, dtype=bool), (), 0, 0.0, 0, 0)

    def grid(self, limit: int = EXHAUSTIVE_LIMIT) -> tuple[list[list[int]], bool]:
        """Candidate indices per exit whose product stays under ``limit``; True if that is all of them."""
        sizes = [len(c) for c in self.candidates]
        if math.prod(sizes) <= limit:
            return [list(range(s)) for s in sizes], True
        per_exit = max(2, int(limit ** (1 / max(1, self.early))))
        return [sorted({0, s - 1, *np.linspace(0, s - 1, min(s, per_exit)).round().astype(int).tolist()})
                for s in sizes], False

    def repair(self, start: Point, objective: Objective, visit: Callable[[Point], None]) -> Point | None:
        """From an infeasible ``start``, move one exit at a time toward feasibility (more correct
        samples for an accuracy target, less cost for a budget) until feasible or stuck."""
        def toward(p: Point) -> tuple[float, float]:
            return (p.cost, -p.correct) if objective.kind == "latency_budget" else (-p.correct, p.cost)

        current = start
        while not objective.feasible(current, self.n):
            step = current
            for e in range(self.early):
                for c in range(len(self.candidates[e])):
                    p = self.evaluate((*current.index[:e], c, *current.index[e + 1:]))
                    visit(p)
                    if toward(p) < toward(step):
                        step = p
            if step is current:
                return None
            current = step
        return current

    def refine(self, start: Point, objective: Objective, visit: Callable[[Point], None]) -> Point:
        """Coordinate descent over every candidate of one exit at a time, from ``start``."""
        best = start
        for _ in range(20):
            improved = False
            for e in range(self.early):
                for c in range(len(self.candidates[e])):
                    if c == best.index[e]:
                        continue
                    p = self.evaluate((*best.index[:e], c, *best.index[e + 1:]))
                    visit(p)
                    if objective.feasible(p, self.n) and objective.key(p) < objective.key(best):
                        best, improved = p, True
            if not improved:
                break
        return best


def pareto(points: Sequence[Point]) -> list[Point]:
    """Points not beaten by another with lower cost and at least the same accuracy."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.correct)):
        if not front or p.correct > front[-1].correct:
            front.append(p)
    return front
