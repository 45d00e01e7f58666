"""Per-exit threshold calibration: exact optimum vs brute force, held-out behaviour, manifest updates."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit._search import Objective
from edgeexit.calibrate import (
    CalibrationError,
    ExitRecords,
    InfeasibleObjectiveError,
    accuracy_at,
    apply_calibration,
    calibrate_thresholds,
    exits_taken,
    revert_calibration,
    search_thresholds,
)
from edgeexit.cli import cli
from edgeexit.package import load_package
from edgeexit.runtime import ExitSession

COSTS = [1.0, 2.5, 4.0, 6.0]


def _table(seed: int, n: int = 40, exits: int = 4, policy: str = "confidence", levels: int = 6) -> ExitRecords:
    """Scores on a coarse grid (few distinct values: brute force stays small); later exits more accurate."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    hardness = rng.random(n)
    accuracy = np.linspace(0.55, 0.95, exits)[:, None]
    right = rng.random((exits, n)) < accuracy + 0.3 * (0.5 - hardness)
    predictions = np.where(right, labels, (labels + 1 + rng.integers(0, 2, (exits, n))) % 3)
    confident = np.clip(1 - hardness + rng.normal(0, 0.2, (exits, n)), 0, 1)
    scores = np.round(confident * (levels - 1)) / (levels - 1)
    if policy == "entropy":
        scores = 1.2 * (1 - scores)
    return ExitRecords(scores=scores, predictions=predictions, labels=labels, policy=policy)


def _brute_force(records: ExitRecords, costs, objective: Objective):
    """Every combination of candidate thresholds: midpoints between distinct scores, and both extremes."""
    n = records.labels.size
    full_right = records.predictions[-1] == records.labels
    per_exit = []
    for e in range(records.scores.shape[0] - 1):
        u = np.unique(records.scores[e])
        per_exit.append(np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]]))
    best = None
    for combo in itertools.product(*per_exit):
        taken = exits_taken(records, list(combo))
        right = records.predictions[taken, np.arange(n)] == records.labels
        lost = int((full_right & ~right).sum())
        won = int((~full_right & right).sum())
        cost = float(np.asarray(costs)[taken].sum())
        correct = int(right.sum())
        if objective.kind == "max_drop":
            ok = (lost - won + objective.z * math.sqrt(lost + won)) / n <= objective.value + 1e-12
            key = (cost, -correct)
        elif objective.kind == "target_accuracy":
            ok, key = correct / n >= objective.value - 1e-12, (cost, -correct)
        else:
            ok, key = cost / n <= objective.value + 1e-12, (-correct, cost)
        if ok and (best is None or key < best):
            best = key
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("policy", ["confidence", "entropy"])
@pytest.mark.parametrize(
    "objective",
    [Objective("max_drop", 0.0, 0.0), Objective("max_drop", 0.05, 0.0), Objective("max_drop", 0.05, 1.645),
     Objective("target_accuracy", 0.7), Objective("latency_budget", 2.5)],
    ids=["drop0", "drop5", "drop5-z", "target70", "budget2.5"],
)
def test_search_finds_the_exact_optimum(seed, policy, objective):
    records = _table(seed, policy=policy)
    want = _brute_force(records, COSTS, objective)
    if want is None:
        with pytest.raises(InfeasibleObjectiveError):
            search_thresholds(records, COSTS, objective)
        return
    outcome = search_thresholds(records, COSTS, objective)
    assert outcome.method == "exhaustive"
    best = outcome.best
    assert objective.key(best) == want
    # the point's figures are what replaying its thresholds gives
    thresholds = outcome.search.thresholds(best.index)
    acc, _ = accuracy_at(records, thresholds)
    assert acc == pytest.approx(best.correct / records.labels.size)
    taken = exits_taken(records, thresholds)
    assert float(np.asarray(COSTS)[taken].sum()) == pytest.approx(best.cost)


def test_per_exit_thresholds_beat_or_match_every_shared_threshold():
    records = _table(11, n=60, levels=8)
    objective = Objective("max_drop", 0.02, 0.0)
    best = search_thresholds(records, COSTS, objective).best
    n = records.labels.size
    full_right = records.predictions[-1] == records.labels
    for t in np.unique(records.scores):
        for shared in (t - 1e-6, t + 1e-6):
            taken = exits_taken(records, [shared] * 3)
            right = records.predictions[taken, np.arange(n)] == records.labels
            if ((full_right & ~right).sum() - (~full_right & right).sum()) / n <= 0.02:
                assert best.cost <= float(np.asarray(COSTS)[taken].sum()) + 1e-9


def test_large_tables_use_grid_and_refinement_and_stay_feasible():
    records = _table(3, n=3000, levels=400)
    objective = Objective("max_drop", 0.01, 1.645)
    outcome = search_thresholds(records, COSTS, objective)
    assert outcome.method == "grid+refine"
    assert objective.feasible(outcome.best, records.labels.size)
    everything_last = 3000 * COSTS[-1]
    assert outcome.best.cost < everything_last


def _population(n: int, seed: int) -> ExitRecords:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    hard = rng.random(n)
    scores = np.stack([np.clip(1 - hard + rng.normal(0, s, n), 0, 1) for s in (0.15, 0.1, 0.05)])
    right = np.stack([rng.random(n) < p - 0.25 * hard for p in (0.97, 0.99, 1.0)])
    predictions = np.where(right, labels, (labels + 1) % 5)
    return ExitRecords(scores=scores, predictions=predictions, labels=labels, policy="confidence")


def test_constraint_holds_on_held_out_data_within_sampling_error():
    calibration, held_out = _population(3000, 1), _population(30000, 2)
    objective = Objective("max_drop", 0.01, 1.645)
    outcome = search_thresholds(calibration, [1.0, 2.0, 3.0], objective)
    thresholds = outcome.search.thresholds(outcome.best.index)
    acc, shares = accuracy_at(held_out, thresholds)
    drop = held_out.full_accuracy - acc
    se = math.sqrt(held_out.full_accuracy * (1 - held_out.full_accuracy) / 30000)
    assert drop <= 0.01 + 3 * se
    assert shares[-1] < 0.9, "the calibration must let a real share of samples out early"


# --- through a package --------------------------------------------------------------------------


def _labelled(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32) * 3
    return x, rng.integers(0, 3, n)


def test_calibrate_apply_and_revert(tiny_package):
    x, y = _labelled()
    sess = ExitSession(tiny_package)
    before = (tiny_package / "manifest.json").read_bytes()
    result = calibrate_thresholds(sess, x, y, target_accuracy=0.0, stage_costs=[1.0, 3.0])
    assert result.shares[0] == pytest.approx(1.0)  # any accuracy will do: everyone leaves at once
    assert result.cost_unit == "ms" and result.expected_cost == pytest.approx(1.0) and result.full_cost == 4.0
    pkg = apply_calibration(tiny_package, result, device="cpu")
    assert pkg.format_version == 2 and pkg.thresholds == result.thresholds
    entry = pkg.calibration["history"][-1]
    assert entry["previous_thresholds"] == [0.5] and entry["thresholds"] == result.thresholds
    assert ExitSession(tiny_package).run(x).exit_index.max() == 0
    restored = revert_calibration(tiny_package)
    assert restored.thresholds == [0.5]
    assert restored.calibration["history"][-1]["reverted"]
    manifest = json.loads((tiny_package / "manifest.json").read_text())
    old = json.loads(before)
    for a, b in zip(manifest["stages"], old["stages"], strict=True):
        assert a["exit"] == b["exit"]
    with pytest.raises(CalibrationError, match="no calibration to revert"):
        revert_calibration(tiny_package)


def test_measured_stage_costs_are_written_to_the_manifest(tiny_package):
    x, y = _labelled()
    result = calibrate_thresholds(ExitSession(tiny_package), x, y, max_drop=0.05)
    assert result.cost_source.startswith("measured") and all(c > 0 for c in result.stage_costs)
    pkg = apply_calibration(tiny_package, result)
    assert [s.cost["measured_ms"] for s in pkg.stages] == result.stage_costs
    flops = calibrate_thresholds(ExitSession(tiny_package), x, y, max_drop=0.05, measure=False)
    assert flops.cost_unit == "MFLOPs"


def test_a_failed_update_leaves_the_manifest_untouched(tiny_package):
    x, y = _labelled()
    result = calibrate_thresholds(ExitSession(tiny_package), x, y, max_drop=0.05, stage_costs=[1, 2])
    bad = type(result)(**{**result.__dict__, "thresholds": [0.1, 0.2]})
    before = (tiny_package / "manifest.json").read_bytes()
    with pytest.raises(CalibrationError, match="2 thresholds but the package has 1"):
        apply_calibration(tiny_package, bad)
    assert (tiny_package / "manifest.json").read_bytes() == before
    assert [p.name for p in tiny_package.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        ({"labels": None, "max_drop": 0.01}, CalibrationError, "needs labels"),
        ({"labels": np.zeros(5, int), "max_drop": 0.01}, CalibrationError, "shape (300,)"),
        ({"labels": np.zeros(300), "max_drop": 0.01}, CalibrationError, "must be integers"),
        ({"max_drop": 0.01, "target_accuracy": 0.9}, CalibrationError, "exactly one objective"),
        ({}, CalibrationError, "exactly one objective"),
        ({"max_drop": -1}, CalibrationError, "must be finite and >= 0"),
        ({"target_accuracy": 1.5}, CalibrationError, "<= 1"),
        ({"latency_budget": 0.5}, InfeasibleObjectiveError, "the cheapest reachable is 1 ms"),
        ({"target_accuracy": 1.0}, InfeasibleObjectiveError, "the best reachable is"),
    ],
)
def test_bad_calibration_inputs(tiny_package, args, error, fragment):
    x, y = _labelled()
    kwargs = {"labels": y, **args}
    labels = kwargs.pop("labels")
    with pytest.raises(error) as info:
        calibrate_thresholds(ExitSession(tiny_package), x, labels, stage_costs=[1.0, 3.0], **kwargs)
    assert fragment in str(info.value)


def test_empty_calibration_set(tiny_package):
    with pytest.raises(CalibrationError, match="empty"):
        calibrate_thresholds(ExitSession(tiny_package), np.zeros((0, 4), np.float32), np.zeros(0, int),
                             max_drop=0.01)


def test_calibrate_cli(tiny_package, tmp_path):
    x, y = _labelled()
    np.savez(tmp_path / "val.npz", x=x, labels=y)
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_package), "--data", str(tmp_path / "val.npz"),
                                      "--max-drop", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "chosen thresholds" in result.output and "(--verbose lists them)" in result.output
    assert "meets" not in result.output and load_package(tiny_package).calibration is None
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_package), "--data", str(tmp_path / "val.npz"),
                                      "--max-drop", "1", "--dry-run", "--json"])
    shown = json.loads(result.stdout)
    assert shown["schema"] == "edgeexit.calibrate/1" and shown["written"] is False
    assert shown["speedup_vs_full"] == pytest.approx(shown["full_cost"] / shown["expected_cost"])
    assert any(p["thresholds"] == shown["thresholds"] for p in shown["frontier"])
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_package), "--data", str(tmp_path / "val.npz"),
                                      "--max-drop", "1", "--plot", str(tmp_path / "f.png"), "--verbose"])
    assert result.exit_code == 0, result.output
    assert "chosen thresholds" in result.output and "*" in result.output and "meets" in result.output
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert load_package(tiny_package).calibration is not None
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_package), "--revert"])
    assert result.exit_code == 0 and "restored thresholds [0.5]" in result.output
    np.savez(tmp_path / "nolabels.npz", x=x)
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_package), "--data", str(tmp_path / "nolabels.npz"),
                                      "--max-drop", "1"])
    assert result.exit_code == 2 and "needs labels" in result.output


def test_grid_search_repairs_toward_a_feasible_point(monkeypatch):
    """A target only reachable off the coarse grid is still found (not reported infeasible)."""
    import edgeexit.calibrate as calibrate_module

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    predictions = np.stack([labels.copy() for _ in range(4)])
    predictions[3, :40] = (labels[:40] + 1) % 3          # the last exit misses 40 samples ...
    predictions[0, 40:] = (labels[40:] + 1) % 3          # ... that only exit 0 gets right, with top scores
    scores = np.stack([np.concatenate([rng.uniform(0.9, 1.0, 40), rng.uniform(0.0, 0.85, 360)])] +
                      [rng.uniform(0, 1, 400) for _ in range(3)])
    records = ExitRecords(scores=scores, predictions=predictions, labels=labels, policy="confidence")
    top = search_thresholds(records, COSTS, Objective("latency_budget", 1e9)).best.correct  # most accurate choice
    target = Objective("target_accuracy", top / 400)
    coarse = lambda self, limit=0: ([[0] for _ in self.candidates], False)  # noqa: E731  (nobody exits early)
    monkeypatch.setattr(calibrate_module.Search, "grid", coarse)
    search = calibrate_module.Search(records.scores, records.predictions, records.labels, records.policy, COSTS)
    on_grid = []
    search.enumerate(coarse(search)[0], on_grid.append)
    assert max(p.correct for p in on_grid) < top, "the coarse grid alone must miss the target"
    outcome = search_thresholds(records, COSTS, target)
    assert outcome.method == "grid+refine" and outcome.best.correct == top


def test_revert_restores_each_exit_policy(tmp_path):
    torch = pytest.importorskip("torch")
    from _models import tiny_inputs, tiny_model

    from edgeexit.export import export_package
    from edgeexit.package import update_manifest

    path = tmp_path / "mixed.eexit"
    export_package(tiny_model(), {"x": torch.from_numpy(tiny_inputs(4))}, path, policy="entropy",
                   thresholds=[0.5, 0.5], log=None)

    def mix(manifest):
        manifest["stages"][2]["exit"].update(policy="confidence", threshold=0.9)

    update_manifest(path, mix)
    x = tiny_inputs(200, seed=3)
    y = ExitSession(path).run(x, early_exits=False).predictions
    result = calibrate_thresholds(ExitSession(path), x, y, max_drop=0.05, stage_costs=[1, 1, 1, 1])
    apply_calibration(path, result)
    assert load_package(path).policies == ["entropy"] * 3
    restored = revert_calibration(path)
    assert restored.policies == ["entropy", "confidence", "entropy"] and restored.thresholds == [0.5, 0.9]
