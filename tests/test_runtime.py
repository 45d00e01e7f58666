"""The runtime's decisions against an independent torch reference of the same policy and model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _models import (  # noqa: E402
    all_exit_logits,
    reference_decisions,
    safe_thresholds,
    tiny_inputs,
    tiny_model,
)

from edgeexit.errors import ThresholdError  # noqa: E402
from edgeexit.export import export_package  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

POLICIES = ["entropy", "confidence", "margin"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def packages(model, tmp_path_factory):
    """One package per policy, thresholds placed so samples spread over all three exits."""
    x = tiny_inputs(400, seed=7)
    out = {}
    for policy in POLICIES:
        quantiles = [0.35, 0.5] if policy == "entropy" else [0.65, 0.5]
        thresholds = safe_thresholds(model, x, policy, quantiles)
        path = tmp_path_factory.mktemp(policy) / "tiny.eexit"
        export_package(model, {"x": torch.from_numpy(tiny_inputs(4))}, path, policy=policy,
                       thresholds=thresholds, include_full_model=True, log=None)
        out[policy] = (path, thresholds)
    return out


def _assert_matches(result, ref, rows=slice(None)):
    exit_index, predictions, scores, logits = ref
    np.testing.assert_array_equal(result.exit_index, exit_index[rows])
    np.testing.assert_array_equal(result.predictions, predictions[rows])
    np.testing.assert_allclose(result.scores, scores[rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.logits, logits[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["stages", "compiled"])
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_decisions_equal_torch_reference(model, packages, policy, engine):
    path, thresholds = packages[policy]
    x = tiny_inputs(300, seed=7)
    ref = reference_decisions(model, x, policy, thresholds)
    assert len(np.unique(ref[0])) == 3, "the reference must use every exit"
    result = ExitSession(path, engine=engine).run(x)
    _assert_matches(result, ref)
    assert result.nonfinite_scores == 0 and result.engine == engine
    # the stage loop times each stage; the compiled graph is one call
    assert len(result.stage_ms) == (4 if engine == "stages" else 0) and all(ms >= 0 for ms in result.stage_ms)


@pytest.mark.parametrize("engine", ["stages", "compiled"])
@pytest.mark.parametrize("policy", POLICIES)
def test_single_samples_equal_torch_reference(model, packages, policy, engine):
    path, thresholds = packages[policy]
    x = tiny_inputs(60, seed=7)
    ref = reference_decisions(model, x, policy, thresholds)
    sess = ExitSession(path, engine=engine)
    for i in range(len(x)):
        _assert_matches(sess.run(x[i:i + 1]), ref, slice(i, i + 1))


def test_batch_where_every_sample_leaves_at_a_different_exit(model, packages):
    path, thresholds = packages["entropy"]
    pool = tiny_inputs(300, seed=7)
    exits = reference_decisions(model, pool, "entropy", thresholds)[0]
    picks = [int(np.flatnonzero(exits == e)[0]) for e in (2, 0, 1)]  # deepest first: order must hold
    x = pool[picks]
    ref = reference_decisions(model, x, "entropy", thresholds)
    np.testing.assert_array_equal(ref[0], [2, 0, 1])
    result = ExitSession(path, engine="stages").run(x)
    _assert_matches(result, ref)
    assert all(ms > 0 for ms in result.stage_ms), "every stage ran for the deepest sample"


def test_batch_where_all_leave_at_the_first_exit_skips_later_stages(model, packages):
    path, thresholds = packages["entropy"]
    pool = tiny_inputs(300, seed=7)
    exits = reference_decisions(model, pool, "entropy", thresholds)[0]
    x = pool[exits == 0][:20]
    result = ExitSession(path, engine="stages").run(x)
    assert (result.exit_index == 0).all()
    assert result.stage_ms[0] > 0 and result.stage_ms[1:] == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_threshold_and_policy_overrides_per_call(model, packages, policy):
    path, _ = packages["entropy"]
    x = tiny_inputs(200, seed=11)
    quantiles = [0.2, 0.6] if policy == "entropy" else [0.8, 0.4]
    thresholds = safe_thresholds(model, x, policy, quantiles)
    sess = ExitSession(path)
    ref = reference_decisions(model, x, policy, thresholds)
    _assert_matches(sess.run(x, thresholds=thresholds, policy=policy), ref)
    # the stored thresholds are untouched by an override
    stored = packages["entropy"][1]
    _assert_matches(sess.run(x), reference_decisions(model, x, "entropy", stored))


def test_policy_override_without_thresholds_is_refused(packages):
    from edgeexit.errors import InputError

    sess = ExitSession(packages["entropy"][0])
    with pytest.raises(InputError, match="pass thresholds= with it"):
        sess.run(tiny_inputs(2), policy="confidence")


def test_extreme_thresholds_send_everything_to_one_exit(packages):
    sess = ExitSession(packages["confidence"][0])
    x = tiny_inputs(50)
    assert (sess.run(x, thresholds=[0.0, 0.0]).exit_index == 0).all()
    assert (sess.run(x, thresholds=[None, None]).exit_index == 2).all()     # None: that exit is disabled
    with pytest.raises(ThresholdError, match="could never fire"):
        sess.run(x, thresholds=[1.01, 1.01])      # above every confidence: refused, not silently disabled


def test_run_all_exits_and_run_full_equal_torch(model, packages):
    path, _ = packages["entropy"]
    x = tiny_inputs(33)
    sess = ExitSession(path)
    ref = [t.numpy() for t in all_exit_logits(model, x)]
    for got, want in zip(sess.run_all_exits(x), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sess.run_full(x), ref[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sess.run_full({"x": x}), ref[-1], rtol=1e-4, atol=1e-4)


def test_non_finite_scores_never_exit_early(packages):
    sess = ExitSession(packages["confidence"][0], check_finite=False)
    x = tiny_inputs(4)
    x[1, 0, 0, 0] = np.nan
    result = sess.run(x, thresholds=[0.0, 0.0])  # every finite score passes 0.0
    assert result.exit_index.tolist() == [0, 2, 0, 0]
    assert result.nonfinite_scores == 1 and np.isnan(result.scores[1])
    one = sess.run(x[1:2], thresholds=[0.0, 0.0])
    assert one.exit_index.tolist() == [2] and one.nonfinite_scores == 1


def test_results_are_in_input_order_for_a_shuffled_batch(model, packages):
    path, _ = packages["margin"]
    x = tiny_inputs(120, seed=3)
    perm = np.random.default_rng(0).permutation(len(x))
    sess = ExitSession(path)
    a, b = sess.run(x), sess.run(x[perm])
    np.testing.assert_array_equal(a.exit_index[perm], b.exit_index)
    np.testing.assert_allclose(a.logits[perm], b.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_io_binding_path_gives_the_same_results(model, packages, policy):
    """The IOBinding path (carries as OrtValues, bound to the CPU here) decides exactly as the plain one."""
    path, thresholds = packages[policy]
    x = tiny_inputs(150, seed=7)
    ref = reference_decisions(model, x, policy, thresholds)
    bound = ExitSession(path, io_binding=True)
    assert bound.io_binding_device == "cpu" and ExitSession(path).io_binding_device is None
    _assert_matches(bound.run(x), ref)
    for i in range(0, 150, 15):
        _assert_matches(bound.run(x[i:i + 1]), ref, slice(i, i + 1))
    for got, want in zip(bound.run_all_exits(x), ExitSession(path).run_all_exits(x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
