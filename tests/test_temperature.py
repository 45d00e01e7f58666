"""Temperature scaling per exit (package format version 9).

Fitting and judging a temperature (``fit_temperature`` against a brute-force grid,
``expected_calibration_error`` against a hand-computed case and a per-bin loop), the manifest
field and its version rule, ``set_temperatures``, the stage loop scoring the scaled logits at
batch 1 and in batches, the compiled graph agreeing with it, calibration recording the scaled
scores, ``calibrate_temperatures`` end to end, and ``edgeexit inspect``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeexit.calibrate import (
    CalibrationError,
    calibrate_temperatures,
    expected_calibration_error,
    fit_temperature,
    record_exits,
)
from edgeexit.errors import InputError, ManifestSchemaError, SessionError
from edgeexit.package import TEMPERATURE_VERSION, load_package, parse_manifest, read_manifest, set_temperatures
from edgeexit.policies import get_policy
from edgeexit.runtime import ExitSession

# --- fit_temperature ---------------------------------------------------------------------------


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    s = s - s.max(axis=1, keepdims=True)
    return float(-(s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))).mean())


def _grid_reference(z: np.ndarray, y: np.ndarray) -> float:
    """Brute force: the best of a coarse grid over log T in [0.05, 20], then of a fine one around it."""
    coarse = np.linspace(math.log(0.05), math.log(20.0), 2001)
    best = coarse[int(np.argmin([_nll(z, y, math.exp(g)) for g in coarse]))]
    fine = np.linspace(best - 0.004, best + 0.004, 2001)
    fine = fine[(fine >= coarse[0]) & (fine <= coarse[-1])]
    return math.exp(fine[int(np.argmin([_nll(z, y, math.exp(g)) for g in fine]))])


def _labelled_logits(true_t: float, scale: float, n: int = 400, classes: int = 6, seed: int = 0):
    """Logits ``scale`` x N(0, 1) whose labels are drawn from softmax(logits / true_t)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, classes)) * scale
    p = np.exp(z / true_t - (z / true_t).max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z.astype(np.float32), y


@pytest.mark.parametrize(("true_t", "scale"), [(1.0, 2.0), (2.5, 6.0), (0.4, 1.0), (8.0, 10.0)],
                         ids=["calibrated", "overconfident", "underconfident", "very-overconfident"])
def test_fit_temperature_finds_the_grid_minimum(true_t: float, scale: float) -> None:
    z, y = _labelled_logits(true_t, scale)
    fitted, reference = fit_temperature(z, y), _grid_reference(z.astype(np.float64), y)
    assert abs(fitted - reference) / reference < 1e-4
    assert _nll(z.astype(np.float64), y, fitted) <= _nll(z.astype(np.float64), y, reference) + 1e-9
    assert abs(math.log(fitted / true_t)) < 0.35      # and near the temperature the labels were drawn with


def test_fit_temperature_stops_at_the_ends_of_its_range_and_leaves_constant_logits_alone() -> None:
    z = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]] * 10)
    assert fit_temperature(z, np.array([0, 1] * 10)) == pytest.approx(0.05, rel=1e-4)    # always right: sharpen
    assert fit_temperature(z, np.array([1, 0] * 10)) == pytest.approx(20.0, rel=1e-4)    # always wrong: flatten
    assert fit_temperature(np.ones((4, 3)), np.array([0, 1, 2, 0])) == 1.0


@pytest.mark.parametrize(("logits", "labels", "message"), [
    (np.zeros(3), np.zeros(3, int), r"\(samples, classes\)"),
    (np.zeros((3, 2)), np.zeros(2, int), r"labels must be integers of shape \(3,\)"),
    (np.zeros((3, 2)), np.zeros(3), r"labels must be integers"),
    (np.zeros((3, 2)), np.array([0, 2, 1]), r"class indices 0\.\.1"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), r"1 sample\(s\) have NaN or infinite logits"),
], ids=["1-d", "count", "float-labels", "out-of-range", "nan"])
def test_bad_logits_or_labels_are_refused(logits: np.ndarray, labels: np.ndarray, message: str) -> None:
    for call in (fit_temperature, expected_calibration_error):
        with pytest.raises(CalibrationError, match=message):
            call(logits, labels)


# --- expected_calibration_error ----------------------------------------------------------------


def _two_class_logits(confidences: list[float]) -> np.ndarray:
    """Logits whose softmax gives class 0 each confidence (> 0.5)."""
    return np.array([[math.log(c / (1 - c)), 0.0] for c in confidences])


def test_ece_of_a_hand_computed_case() -> None:
    # 5 bins of width 0.2: (0.8, 1] holds 0.95 (right) and 0.85 (wrong): |0.5 - 0.9| x 2/5 = 0.16;
    # (0.6, 0.8] holds 0.65 (right) and 0.75 (wrong): |0.5 - 0.7| x 2/5 = 0.08; (0.4, 0.6] holds
    # 0.55 (right): |1 - 0.55| x 1/5 = 0.09.  ECE = 0.33.
    z = _two_class_logits([0.95, 0.85, 0.65, 0.75, 0.55])
    y = np.array([0, 1, 0, 1, 0])
    assert expected_calibration_error(z, y, bins=5) == pytest.approx(0.33, abs=1e-12)
    # one bin: |accuracy - mean confidence| = |0.6 - 0.75|
    assert expected_calibration_error(z, y, bins=1) == pytest.approx(0.15, abs=1e-12)
    # a temperature divides the logits first
    assert expected_calibration_error(z, y, bins=5, temperature=2.0) == \
        pytest.approx(expected_calibration_error(z / 2.0, y, bins=5), abs=1e-15)


def _ece_loop(z: np.ndarray, y: np.ndarray, bins: int, t: float) -> float:
    s = z / t
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    conf, right = p.max(axis=1), p.argmax(axis=1) == y
    total = 0.0
    for lower, upper in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (conf > lower) & (conf <= upper)
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("bins", [1, 10, 15])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_ece_matches_a_per_bin_loop(bins: int, temperature: float) -> None:
    z, y = _labelled_logits(2.0, 4.0, n=300, seed=4)
    assert expected_calibration_error(z, y, bins, temperature) == pytest.approx(
        _ece_loop(z.astype(np.float64), y, bins, temperature), abs=1e-12)


def test_scaling_by_the_fitted_temperature_lowers_the_ece_of_overconfident_logits() -> None:
    z, y = _labelled_logits(3.0, 8.0, n=1000, seed=5)
    t = fit_temperature(z, y)
    assert expected_calibration_error(z, y, temperature=t) < 0.5 * expected_calibration_error(z, y)


# --- the manifest field --------------------------------------------------------------------------


def _with_temperatures(manifest: dict[str, Any], temperatures: list[Any], version: int = 9) -> dict[str, Any]:
    manifest["format_version"] = version
    for stage, t in zip(manifest["stages"], temperatures):
        stage["exit"]["temperature"] = t
    manifest["files"] = {f"stage{k}.onnx": {"sha256": "0" * 64, "size": 1} for k in (0, 1)}
    return manifest


def test_the_temperature_version_is_9_and_readers_accept_it(tiny_manifest: dict[str, Any], tmp_path: Path) -> None:
    assert TEMPERATURE_VERSION == 9
    package = parse_manifest(_with_temperatures(tiny_manifest, [0.5, 2]), tmp_path)
    assert package.temperatures == [0.5, 2.0] and package.stages[1].exit.temperature == 2.0
    assert isinstance(package.stages[1].exit.temperature, float)


def test_an_absent_or_null_temperature_is_1(tiny_manifest: dict[str, Any], tmp_path: Path) -> None:
    assert parse_manifest(_with_temperatures(tiny_manifest, [], 4), tmp_path).temperatures == [1.0, 1.0]
    assert parse_manifest(_with_temperatures(tiny_manifest, [None, None], 4), tmp_path).temperatures == [1.0, 1.0]


@pytest.mark.parametrize("version", [1, 4, 8])
def test_a_temperature_below_version_9_is_refused(tiny_manifest: dict[str, Any], tmp_path: Path,
                                                  version: int) -> None:
    with pytest.raises(ManifestSchemaError, match=rf"stages\[0\]\.exit\.temperature: expected absent in a "
                                                  rf"version-{version} package \(temperatures need format version 9"):
        parse_manifest(_with_temperatures(tiny_manifest, [1.5], version), tmp_path)


@pytest.mark.parametrize("value", [0, -1.0, 0.0, math.nan, math.inf, True, "2", [2.0]],
                         ids=["zero-int", "negative", "zero", "nan", "inf", "bool", "string", "list"])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(tiny_manifest: dict[str, Any], tmp_path: Path,
                                                                  value: Any) -> None:
    with pytest.raises(ManifestSchemaError, match=r"stages\[1\]\.exit\.temperature: expected a positive finite "
                                                  r"number"):
        parse_manifest(_with_temperatures(tiny_manifest, [1.0, value]), tmp_path)


# --- set_temperatures ----------------------------------------------------------------------------


def test_set_temperatures_writes_them_and_raises_the_version(tiny_package: Path) -> None:
    assert load_package(tiny_package).format_version == 1
    package = set_temperatures(tiny_package, [1.5, np.float32(0.75)])
    assert package.format_version == TEMPERATURE_VERSION and package.temperatures == [1.5, 0.75]
    _, manifest = read_manifest(tiny_package)
    # a manifest update appends new keys: the temperature comes last in each exit
    assert list(manifest["stages"][0]["exit"]) == ["logits", "policy", "threshold", "temperature"]
    package = set_temperatures(tiny_package, [1.0, None])   # 1 (or None) removes the key
    assert package.temperatures == [1.0, 1.0]
    assert all("temperature" not in s["exit"] for s in read_manifest(tiny_package)[1]["stages"])
    assert package.format_version == TEMPERATURE_VERSION   # never lowered


@pytest.mark.parametrize(("values", "message"), [
    ([1.5], r"1 temperature\(s\) given but the package has 2 exit\(s\); give one per exit, the final exit's"),
    ([1.5, 0.0], r"temperature 1 is 0\.0; give a positive finite number"),
    ([math.nan, 1.0], r"temperature 0 is nan"),
    ([True, 1.0], r"temperature 0 is True"),
])
def test_set_temperatures_refuses_bad_values_and_writes_nothing(tiny_package: Path, values: list[Any],
                                                                message: str) -> None:
    before = (tiny_package / "manifest.json").read_bytes()
    with pytest.raises(ManifestSchemaError, match=message):
        set_temperatures(tiny_package, values)
    assert (tiny_package / "manifest.json").read_bytes() == before


# --- the stage loop ------------------------------------------------------------------------------


def _tiny_inputs(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 4)) * 0.6).astype(np.float32)


@pytest.mark.parametrize("policy", ["entropy", "confidence", "margin"])
def test_the_stage_loop_scores_each_exits_logits_divided_by_its_temperature(tiny_package: Path, policy: str) -> None:
    temperatures = [0.5, 2.0]
    set_temperatures(tiny_package, temperatures)
    session = ExitSession(tiny_package)
    pol = get_policy(policy)
    x = _tiny_inputs(64)
    raw = session.run_all_exits(x)
    scaled = [pol.scores(z.astype(np.float64) / t) for z, t in zip(raw, temperatures)]
    threshold = float(np.median(scaled[0]))
    batch = session.run(x, policy=policy, thresholds=[threshold])
    want_exit = np.where(pol.accepts(scaled[0], threshold), 0, 1)
    np.testing.assert_array_equal(batch.exit_index, want_exit)
    assert 0 < want_exit.sum() < len(x)
    np.testing.assert_array_equal(batch.scores, np.choose(want_exit, scaled))
    np.testing.assert_array_equal(batch.logits, np.where(want_exit[:, None] == 0, raw[0], raw[1]))  # raw logits
    np.testing.assert_array_equal(batch.predictions, batch.logits.argmax(axis=1))
    for i in range(8):   # batch 1 (pure-Python scores) gives the same answers
        one = session.run(x[i:i + 1], policy=policy, thresholds=[threshold])
        assert one.exit_index[0] == batch.exit_index[i]
        assert one.scores[0] == pytest.approx(batch.scores[i], rel=1e-12, abs=1e-15)
        np.testing.assert_array_equal(one.logits[0], batch.logits[i])


def test_every_temperature_1_leaves_the_registered_policies_in_the_plan(tiny_package: Path) -> None:
    # nothing is divided per call when every temperature is 1: the plan holds the registry's own policies
    session = ExitSession(tiny_package)
    assert all(p is get_policy("entropy") for p in session._default_plan.policies)
    set_temperatures(tiny_package, [1.0, 3.0])
    scaled = ExitSession(tiny_package)._default_plan.policies
    assert scaled[0] is get_policy("entropy") and scaled[1] is not get_policy("entropy")
    assert scaled[1].name == "entropy" and scaled[1].direction == "lower"


def test_with_every_early_exit_disabled_the_score_is_the_final_exits_on_scaled_logits(tiny_package: Path) -> None:
    set_temperatures(tiny_package, [0.5, 2.0])
    session = ExitSession(tiny_package)
    x = _tiny_inputs(8)
    result = session.run(x, thresholds=[None])   # every early exit disabled: the stages answer (no full.onnx)
    final = session.run_all_exits(x)[-1]
    np.testing.assert_allclose(result.scores, get_policy("entropy").scores(final.astype(np.float64) / 2.0),
                               rtol=1e-12)


# --- calibration ---------------------------------------------------------------------------------


def test_record_exits_scores_the_scaled_logits(tiny_package: Path) -> None:
    set_temperatures(tiny_package, [0.25, 4.0])
    session = ExitSession(tiny_package)
    x = _tiny_inputs(40)
    labels = np.arange(40) % 3
    records = record_exits(session, x, labels, batch_size=16)
    raw = session.run_all_exits(x)
    pol = get_policy("entropy")
    np.testing.assert_array_equal(records.scores, np.stack([pol.scores(raw[0].astype(np.float64) / 0.25),
                                                            pol.scores(raw[1].astype(np.float64) / 4.0)]))
    np.testing.assert_array_equal(records.predictions, np.stack([z.argmax(axis=1) for z in raw]))


def test_calibrate_temperatures_fits_every_exit_and_writes_them(tiny_package: Path) -> None:
    session = ExitSession(tiny_package)
    x = _tiny_inputs(300, seed=1)
    raw = session.run_all_exits(x)
    # labels from a softer version of each exit's own answer: its logits are overconfident
    rng = np.random.default_rng(2)
    p = np.exp(raw[1] / 3.0)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    fits = calibrate_temperatures(session, {"x": x}, labels, batch_size=128)
    assert len(fits) == 2
    for fit, logits in zip(fits, raw):
        t, before, after = fit
        assert t == pytest.approx(fit_temperature(logits, labels), rel=1e-12)
        assert before == pytest.approx(expected_calibration_error(logits, labels))
        assert after == pytest.approx(expected_calibration_error(logits, labels, temperature=t))
    assert fits[1].ece_after < fits[1].ece_before and fits[1].temperature > 1.5
    package = load_package(tiny_package)
    assert package.temperatures == [f.temperature for f in fits] and package.format_version == 9
    # a second fit starts from the stored temperatures: "before" is the ECE at them
    again = calibrate_temperatures(tiny_package, x, labels, write=False)
    assert [f.ece_before for f in again] == pytest.approx([f.ece_after for f in fits])


def test_calibrate_temperatures_needs_samples(tiny_package: Path) -> None:
    with pytest.raises(CalibrationError, match="empty"):
        calibrate_temperatures(tiny_package, np.zeros((0, 4), np.float32), np.zeros(0, int))


# --- the compiled graph ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: Any) -> tuple[Path, np.ndarray]:
    torch = pytest.importorskip("torch")
    from _models import tiny_inputs, tiny_model

    from edgeexit.export import export_package

    x = tiny_inputs(64, seed=3)
    path = tmp_path_factory.mktemp("temperature") / "tuple.eexit"
    export_package(tiny_model(), {"x": torch.from_numpy(x[:4])}, path, policy="entropy", thresholds=[0.5, 0.5],
                   log=None)
    return path, x


def _copy(path: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(path, tmp_path / path.name))


def _spread(session: ExitSession, x: np.ndarray, policy: str, temperatures: list[float]) -> list[float]:
    """Per-early-exit thresholds at the median scaled score, in the widest gap nearby."""
    pol, out = get_policy(policy), []
    for logits, t in zip(session.run_all_exits(x)[:-1], temperatures):
        s = np.sort(pol.scores(logits.astype(np.float64) / t))
        window = s[len(s) // 4:3 * len(s) // 4]
        j = int(np.argmax(np.diff(window)))
        out.append(float(window[j] + window[j + 1]) / 2)
    return out


def _divisions(graph: Any) -> list[float]:
    """The temperatures a compiled graph divides by (its Div nodes' constant, in every subgraph)."""
    from onnx import numpy_helper

    found = []
    constants = {i.name: float(numpy_helper.to_array(i)) for i in graph.initializer if not i.dims}
    for node in graph.node:
        if node.op_type == "Div" and "z_scaled" in node.name:
            found.append(constants[node.input[1]])
        for attr in node.attribute:
            if attr.g.node:
                found += _divisions(attr.g)
    return found


@pytest.mark.parametrize("policy", ["entropy", "confidence", "margin"])
@pytest.mark.parametrize("temperatures", [[0.5, 2.0, 1.0], [0.5, 2.0, 3.0]], ids=["final-1", "final-3"])
def test_the_compiled_graph_agrees_with_the_stage_loop(exported: tuple[Path, np.ndarray], tmp_path: Path,
                                                       policy: str, temperatures: list[float]) -> None:
    import onnx

    from edgeexit.export.compile import compile_package
    from edgeexit.package import update_manifest

    path, x = exported
    path = _copy(path, tmp_path)
    update_manifest(path, lambda m: [s["exit"].update(policy=policy) for s in m["stages"] if s.get("exit")])
    set_temperatures(path, temperatures)
    compile_package(path, log=None)
    package = load_package(path)
    assert package.compiled is not None and list(package.compiled.temperatures) == temperatures
    assert package.compiled_stale is None
    # a Div in float64 before the score ops, only for the exits whose temperature is not 1
    assert sorted(_divisions(onnx.load(str(path / package.compiled.file)).graph)) == \
        sorted(t for t in temperatures if t != 1.0)
    compiled, stages = ExitSession(path, engine="compiled"), ExitSession(path, engine="stages")
    spread = _spread(stages, x, policy, temperatures)
    for thresholds in (None, spread):
        for n in (1, 7, 64):
            got, want = compiled.run(x[:n], thresholds=thresholds), stages.run(x[:n], thresholds=thresholds)
            assert got.engine == "compiled" and want.engine == "stages"
            np.testing.assert_array_equal(got.exit_index, want.exit_index)
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-9, rtol=1e-9)
    assert len(set(stages.run(x, thresholds=spread).exit_index.tolist())) == 3   # every exit is taken


def test_new_temperatures_make_the_compiled_graph_stale_until_it_is_rebuilt(exported: tuple[Path, np.ndarray],
                                                                            tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.export.compile import compile_package

    path, x = exported
    path = _copy(path, tmp_path)
    assert "temperatures" not in read_manifest(path)[1]["compiled"]   # written only when one is not 1
    assert ExitSession(path).run(x[:7]).engine == "compiled"
    set_temperatures(path, [0.5, 2.0, 1.0])
    package = load_package(path)
    assert package.compiled_stale is not None and "temperatures [1.0, 1.0, 1.0]" in package.compiled_stale
    session = ExitSession(path)
    assert session.run(x[:7]).engine == "stages" and session.engine_for(1) == "stages"
    with pytest.raises(InputError, match="stale: it divides the exits' logits by the temperatures"):
        session.run(x[:7], engine="compiled")
    with pytest.raises(SessionError, match=r"stale: .*edgeexit compile"):
        ExitSession(path, engine="compiled")
    shown = CliRunner().invoke(cli, ["inspect", str(path)])
    assert shown.exit_code == 0 and "STALE: it divides" in shown.output
    compile_package(path, log=None)
    assert read_manifest(path)[1]["compiled"]["temperatures"] == [0.5, 2.0, 1.0]
    assert ExitSession(path).run(x[:7]).engine == "compiled"
    # a temperature in compiled.temperatures follows the same version rule as the exits'
    _, manifest = read_manifest(path)
    for stage in manifest["stages"]:
        (stage["exit"] or {}).pop("temperature", None)
    manifest["format_version"] = 8
    with pytest.raises(ManifestSchemaError, match=r"compiled\.temperatures: expected absent in a version-8"):
        parse_manifest(manifest, path)


def test_inspect_shows_a_temperature_column_only_when_one_is_not_1(exported: tuple[Path, np.ndarray],
                                                                   tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from edgeexit.cli import cli

    path = _copy(exported[0], tmp_path)
    assert "temp." not in CliRunner().invoke(cli, ["inspect", str(path)]).output
    set_temperatures(path, [0.5, 2.0, 1.0])
    lines = CliRunner().invoke(cli, ["inspect", str(path)]).output.splitlines()
    header = next(line for line in lines if line.startswith("stage "))
    assert "temp." in header
    rows = [line.split() for line in lines if line.startswith("stage") and line is not header]
    assert [r[header.split().index("temp.") + 1] for r in rows if "exit" in r] == ["0.5", "2", "1"]
    view = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).output)
    assert [s["exit"]["temperature"] for s in view["stages"] if s["exit"]] == [0.5, 2.0, 1.0]
    assert view["compiled"]["stale"] is True
