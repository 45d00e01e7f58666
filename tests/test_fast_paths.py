"""The fast paths of ``ExitSession.run`` (issue "within two microseconds of a bare onnxruntime call").

Each shortcut answers exactly what the checked path answers (``engine="auto"`` passes the same
call through the checked path), what an independent reference answers (a bare onnxruntime
session of the same graph, and the torch model), and skips nothing silently: for every input it
does not take (a wrong dtype, shape or rank, a NaN or an Inf, a name it does not know), the
one-function path of ``runtime/_fast.py`` returns None, and the checked path raises the typed
error.  The shortcuts: that function (exits disabled: ``full.onnx``; the compiled graph at
batch 1), the C++ run of ``_stage.direct_run``, the input checks' one-step screen (any batch
size), results whose fields are computed when read, and one-pass row scores.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from _models import all_exit_logits, reference_decisions, safe_thresholds, tiny_inputs, tiny_model  # noqa: E402

from edgeexit.errors import (  # noqa: E402
    EmptyBatchError,
    InputDtypeError,
    InputError,
    InputNameError,
    InputShapeError,
    NonFiniteInputError,
    SessionError,
)
from edgeexit.export import export_package  # noqa: E402
from edgeexit.package import load_package, set_thresholds  # noqa: E402
from edgeexit.policies import get_policy  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402
from edgeexit.runtime._stage import direct_run  # noqa: E402
from edgeexit.runtime._threads import ThreadSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

POLICY = "entropy"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def packages(model, tmp_path_factory):
    """The tiny model exported once (stages, full.onnx, compiled.onnx): ``exits`` with thresholds
    that spread samples over every exit, ``disabled`` with every early exit disabled."""
    x = tiny_inputs(400, seed=7)
    thresholds = safe_thresholds(model, x, POLICY, [0.35, 0.5])
    root = tmp_path_factory.mktemp("fast")
    exits = root / "exits.eexit"
    export_package(model, {"x": torch.from_numpy(tiny_inputs(4))}, exits, policy=POLICY, thresholds=thresholds,
                   include_full_model=True, compile=True, log=None)
    disabled = root / "disabled.eexit"
    export_package(model, {"x": torch.from_numpy(tiny_inputs(4))}, disabled, policy=POLICY, thresholds=None,
                   include_full_model=True, compile=True, log=None)
    return {"exits": (exits, thresholds), "disabled": (disabled, None)}


def _same(fast, slow) -> None:
    """Every field of two results, bit for bit (dtypes included)."""
    assert fast.engine == slow.engine and fast.stage_ms.__class__ is tuple
    for field in ("logits", "predictions", "exit_index", "scores"):
        a, b = getattr(fast, field), getattr(slow, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert fast.nonfinite_scores == slow.nonfinite_scores
    assert fast.exit_counts(3).tolist() == slow.exit_counts(3).tolist()


# --- the one-function paths answer what the checked path and the references answer -----------


def test_exits_disabled_fast_path_is_full_onnx_bit_for_bit(model, packages):
    path, _ = packages["disabled"]
    sess = ExitSession(path)
    assert sess._fast_one is not None and sess.engine_for(1) == "full"
    bare = ort.InferenceSession(str(path / "full.onnx"), ThreadSettings().options(),
                                providers=["CPUExecutionProvider"])
    full = load_package(path).full_model
    x = tiny_inputs(40, seed=11)
    torch_last = all_exit_logits(model, x)[-1].numpy()
    entropy = get_policy(POLICY)
    for i in range(len(x)):
        one = x[i:i + 1]
        fast, slow = sess.run(one), sess.run(one, engine="auto")      # engine="auto": the checked path
        _same(fast, slow)
        assert fast.engine == "full" and fast.stage_ms == () and fast.total_ms > 0
        np.testing.assert_array_equal(fast.logits, bare.run([full.logits], {"x": one})[0])
        np.testing.assert_allclose(fast.logits[0], torch_last[i], rtol=1e-4, atol=1e-5)
        assert fast.exit_index.tolist() == [2] and fast.predictions.tolist() == [int(torch_last[i].argmax())]
        assert fast.scores[0] == pytest.approx(float(entropy.scores(torch_last[i:i + 1])[0]), rel=1e-5, abs=1e-6)
        _same(sess.run({"x": one}), slow)                               # by name, too


def test_compiled_fast_path_is_the_compiled_graph_and_the_torch_decision(model, packages):
    path, thresholds = packages["exits"]
    sess = ExitSession(path)
    assert sess._fast_one is not None and sess.engine_for(1) == "compiled"
    package = load_package(path)
    spec = package.compiled
    bare = ort.InferenceSession(str(path / spec.file), ThreadSettings().options(), providers=["CPUExecutionProvider"])
    outputs = [spec.outputs[k] for k in ("logits", "exit_index", "score")]
    stages = ExitSession(path, engine="stages")
    x = tiny_inputs(120, seed=7)
    ref = reference_decisions(model, x, POLICY, thresholds)
    for i in range(len(x)):
        one = x[i:i + 1]
        fast = sess.run(one)
        _same(fast, sess.run(one, engine="auto"))
        logits, exit_index, score = bare.run(outputs, {"x": one, spec.thresholds: np.array(thresholds)})
        np.testing.assert_array_equal(fast.logits, logits)
        np.testing.assert_array_equal(fast.exit_index, exit_index)
        np.testing.assert_array_equal(fast.scores, score)
        assert fast.exit_index[0] == ref[0][i] and fast.predictions[0] == ref[1][i]
        loop = stages.run(one)                                  # the reference semantics, at batch 1 too
        assert loop.exit_index.tolist() == fast.exit_index.tolist() and loop.engine == "stages"
        np.testing.assert_allclose(loop.scores, fast.scores, rtol=1e-9, atol=1e-9)
    assert len(set(ref[0].tolist())) == 3


def test_stage_loop_at_batch_1_answers_like_the_batch_loop_and_torch(model, packages):
    path, thresholds = packages["exits"]
    stages = ExitSession(path, engine="stages")
    assert stages._fast_one is None                             # the stage loop has no one-function path
    x = tiny_inputs(120, seed=7)
    ref = reference_decisions(model, x, POLICY, thresholds)
    batch = stages.run(x)
    for i in range(len(x)):
        one = stages.run(x[i:i + 1])
        assert one.exit_index.dtype == batch.exit_index.dtype == np.int64
        assert one.predictions.dtype == batch.predictions.dtype and one.scores.dtype == np.float64
        assert one.exit_index[0] == batch.exit_index[i] == ref[0][i] and one.predictions[0] == ref[1][i]
        np.testing.assert_array_equal(one.logits[0], batch.logits[i])
        np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-12, atol=1e-12)
        assert one.nonfinite_scores == 0 and len(one.stage_ms) == 4


# --- what the shortcuts skip is caught ---------------------------------------------------------


def _bad_inputs(x: np.ndarray) -> list[tuple[str, object, type[Exception]]]:
    nan, inf, ninf = (x.copy() for _ in range(3))
    nan[0, 0, 3, 3], inf[0, 0, 0, 0], ninf[0, 0, 7, 7] = np.nan, np.inf, -np.inf
    return [
        ("float64", x.astype(np.float64), InputDtypeError),
        ("float16", x.astype(np.float16), InputDtypeError),
        ("int32", x.astype(np.int32), InputDtypeError),
        ("big-endian float32", x.astype(">f4"), InputDtypeError),
        ("a list", x.tolist(), InputNameError),
        ("rank 3", x[0], InputShapeError),
        ("rank 5", x[None], InputShapeError),
        ("wrong width", np.ascontiguousarray(x[:, :, :, :7]), InputShapeError),
        ("empty batch", x[:0], EmptyBatchError),
        ("NaN", nan, NonFiniteInputError),
        ("+Inf", inf, NonFiniteInputError),
        ("-Inf", ninf, NonFiniteInputError),
        ("a NaN by name", {"x": nan}, NonFiniteInputError),
        ("an unknown name", {"image": x}, InputNameError),
        ("an extra name", {"x": x, "y": x}, InputNameError),
    ]


@pytest.mark.parametrize("which", ["disabled", "exits"])
def test_every_input_the_fast_path_declines_is_refused_by_the_checked_path(packages, which):
    sess = ExitSession(packages[which][0])
    x = tiny_inputs(1, seed=3)
    for label, bad, error in _bad_inputs(x):
        assert sess._fast_one(bad, 0) is None, f"{label}: the one-function path must not answer it"
        with pytest.raises(error):
            sess.run(bad)
        # the same input in a batch of 4: the input checks' one-step screen passes it to the exact checks
        if isinstance(bad, np.ndarray) and bad.ndim == 4 and bad.shape[0] == 1:
            with pytest.raises(error):
                sess.run(np.concatenate([bad.astype(np.float32)] * 3 + [bad.astype(np.float32)]).astype(bad.dtype))


@pytest.mark.parametrize("which", ["disabled", "exits"])
def test_inputs_the_fast_path_declines_but_that_are_fine_get_the_same_answer(packages, which):
    sess = ExitSession(packages[which][0])
    x = tiny_inputs(1, seed=5)
    want = sess.run(x)
    strided = np.zeros((1, 1, 8, 16), np.float32)[:, :, :, ::2]
    strided[...] = x
    assert not strided.flags.c_contiguous and sess._fast_one(strided, 0) is None
    _same(sess.run(strided), want)                                   # made contiguous, then run
    huge = x.copy()
    huge[0, 0, 0, 0] = np.finfo(np.float32).max                      # finite: never refused
    assert sess._fast_one(huge, 0) is not None
    _same(sess.run(huge), sess.run(huge, engine="auto"))


def test_check_finite_false_lets_nan_through_both_paths_alike(packages):
    for which in ("disabled", "exits"):
        sess = ExitSession(packages[which][0], check_finite=False)
        bad = tiny_inputs(1, seed=6)
        bad[0, 0, 2, 2] = np.nan
        fast = sess._fast_one(bad, 0)
        assert fast is not None                                      # the caller asked for no check
        slow = sess.run(bad, engine="auto")
        np.testing.assert_array_equal(fast.logits, slow.logits)      # NaN where NaN, bit for bit
        assert fast.exit_index.tolist() == slow.exit_index.tolist() == [2]   # a NaN score never exits
        assert fast.nonfinite_scores == slow.nonfinite_scores == 1


def test_exits_the_package_lacks_are_refused_by_the_checked_path(packages, tmp_path):
    """The compiled path checks its exit index on every call: where it is out of range the
    one-function path declines and the checked path raises (a tampered graph is built in
    tests/test_hardening_results.py; here the check itself, on a real graph's output)."""
    from edgeexit.runtime._fast import compiled_one

    sess = ExitSession(packages["exits"][0])
    graph, plan = sess._compiled, sess._default_plan
    x = tiny_inputs(1, seed=8)
    name, shape, dtype, check = sess._checker.single
    fewer = compiled_one(name, shape, dtype, check, graph._ort_run, graph.outputs, graph.thresholds,
                         plan.threshold_array, num_exits=0)          # as if the graph named an exit past the last
    assert fewer(x, 0) is None
    assert compiled_one(name, shape, dtype, check, graph._ort_run, graph.outputs, graph.thresholds,
                        plan.threshold_array, graph.num_exits)(x, 0) is not None


# --- the session's state decides whether the fast path runs -----------------------------------------


def test_engine_choice_switches_the_fast_path_and_is_set_whole(packages):
    path, _ = packages["exits"]
    sess = ExitSession(path)
    x = tiny_inputs(1, seed=9)
    assert sess.run(x).engine == "compiled"
    sess.engine_choice = {"batch1": "stages", "batch": "compiled"}
    assert sess._fast_one is None and sess.run(x).engine == "stages" and sess.run(tiny_inputs(3)).engine == "compiled"
    sess.engine_choice = {"batch1": "compiled", "batch": "stages"}
    assert sess.run(x).engine == "compiled" and sess.run(tiny_inputs(3)).engine == "stages"
    with pytest.raises(TypeError):
        sess.engine_choice["batch1"] = "stages"                      # type: ignore[index]
    with pytest.raises(InputError, match="engine_choice"):
        sess.engine_choice = {"batch1": "fastest", "batch": "stages"}
    overrides = [({"thresholds": [None, None]}, "full"), ({"early_exits": False}, "stages"),
                 ({"engine": "stages"}, "stages"), ({"policy": "confidence", "thresholds": [0.5, 0.5]}, "stages")]
    for call, engine in overrides:                                    # the checked path answers every override
        assert sess.run(x, **call).engine == engine


def test_a_package_calibrated_back_to_exits_leaves_the_full_model_path(packages, tmp_path):
    import shutil

    path = tmp_path / "p.eexit"
    shutil.copytree(packages["disabled"][0], path)
    x = tiny_inputs(1, seed=10)
    assert ExitSession(path).run(x).engine == "full"
    set_thresholds(path, packages["exits"][1])
    sess = ExitSession(path)
    assert sess.run(x).engine == "compiled"
    _same(sess.run(x), ExitSession(packages["exits"][0]).run(x))


def test_closed_sessions_refuse_and_measure_counts_fast_calls(packages):
    sess = ExitSession(packages["disabled"][0])
    x = tiny_inputs(1, seed=12)
    with sess.measure() as m:
        for _ in range(5):
            sess.run(x)
        sess.run(tiny_inputs(3))
    assert m.calls == 6 and m.samples == 8 and m.inference_ms > 0
    sess.close()
    with pytest.raises(SessionError, match="closed"):
        sess.run(x)


def test_fast_calls_from_several_threads_give_the_serial_answers(packages):
    sess = ExitSession(packages["exits"][0])
    x = tiny_inputs(64, seed=13)
    want = [sess.run(x[i:i + 1], engine="auto") for i in range(len(x))]
    got: dict[int, list] = {}

    def work(t: int) -> None:
        got[t] = [sess.run(x[i:i + 1]) for i in range(len(x))]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for results in got.values():
        for fast, slow in zip(results, want):
            _same(fast, slow)


# --- the lower-level pieces ------------------------------------------------------------------------


def test_direct_run_is_the_cpp_run_and_answers_like_session_run(packages):
    path, thresholds = packages["exits"]
    spec = load_package(path).compiled
    session = ort.InferenceSession(str(path / spec.file), ThreadSettings().options(),
                                   providers=["CPUExecutionProvider"])
    run = direct_run(session)
    assert run is not session.run                                 # the binding's own run, not the Python wrapper
    outputs = [spec.outputs[k] for k in ("logits", "exit_index", "score")]
    for n in (1, 7):
        feeds = {"x": tiny_inputs(n, seed=14), spec.thresholds: np.array(thresholds)}
        for a, b in zip(run(outputs, feeds, None), session.run(outputs, feeds)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match=r"(?i)missing|input"):    # the C++ run still refuses a missing input
        run(outputs, {"x": tiny_inputs(1)}, None)


def test_row_scores_in_one_pass_match_the_batch_scores():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(c) * s for c in (1, 2, 10, 64) for s in (0.1, 10.0, 300.0)]
    rows += [np.array([1.0, 1.0, 0.5]), np.array([-np.inf, 0.0, 1.0]), np.array([np.nan, 1.0]),
             np.array([np.inf, 1.0]), np.array([-np.inf, -np.inf])]
    for name in ("entropy", "confidence", "margin"):
        policy = get_policy(name)
        for row in rows:
            one = policy.score_one(row)
            many = float(policy.scores(row[None])[0])
            if math.isnan(many):
                assert math.isnan(one), (name, row)
            else:
                assert one == pytest.approx(many, rel=1e-12, abs=1e-12), (name, row)


def test_a_runner_answers_like_run_with_its_arguments_through_the_fast_path(packages):
    """``runner`` is what calibration times a setting by: the package written with it would take
    the one-function path, so the runner does too (and answers exactly what ``run`` answers)."""
    path, thresholds = packages["exits"]
    sess = ExitSession(path)
    x = tiny_inputs(30, seed=15)
    settings = [({"thresholds": [None, None]}, "full"), ({"thresholds": thresholds}, "compiled"),
                ({"thresholds": [None, None], "policy": "confidence"}, "full"),
                ({"thresholds": thresholds, "engine": "stages"}, "stages"), ({}, "compiled")]
    for kwargs, engine in settings:
        runner = sess.runner(**kwargs)
        for i in range(len(x)):
            got, want = runner(x[i:i + 1]), sess.run(x[i:i + 1], **kwargs)
            assert got.engine == engine
            _same(got, want)
        _same(runner(x), sess.run(x, **kwargs))                     # a batch: run itself answers
        with pytest.raises(NonFiniteInputError):
            runner(np.full((1, 1, 8, 8), np.nan, np.float32))
    off = sess.runner([None, None])
    with sess.measure() as m:
        off(x[:1])
        off(x[:4])
    assert m.calls == 2 and m.samples == 5
    sess.close()
    with pytest.raises(SessionError, match="closed"):
        off(x[:1])
