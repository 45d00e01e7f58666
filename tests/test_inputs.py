"""Bad inputs to ExitSession.run: a typed error that names the input, expected vs got."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from edgeexit.devices import ProviderError, ProviderFallbackWarning
from edgeexit.errors import (
    EmptyBatchError,
    InputDtypeError,
    InputError,
    InputNameError,
    InputShapeError,
    NonFiniteInputError,
    SessionError,
    ThresholdError,
    UnknownPolicyError,
)
from edgeexit.runtime import ExitSession


def _x(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[1, 2] = np.nan
    return a


def _inf(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[0, 0] = -np.inf
    return a


@pytest.mark.parametrize(
    ("inputs", "error", "fragments"),
    [
        (lambda: _x().astype(np.float64), InputDtypeError, ["'x'", "expected dtype float32, got float64", "astype"]),
        (lambda: _x().astype(np.int64), InputDtypeError, ["'x'", "float32", "int64"]),
        (lambda: _x().tolist(), InputNameError, ["numpy array or a dict", "list"]),
        (lambda: {"x": _x().tolist()}, InputDtypeError, ["'x'", "numpy array of float32", "list"]),
        (lambda: _x()[0], InputShapeError, ["'x'", "expected rank 2", "(batch, 4)", "got shape (4,)", "x[None]"]),
        (lambda: _x()[:, :, None], InputShapeError, ["expected rank 2", "(3, 4, 1)"]),
        (lambda: _x()[:, :3], InputShapeError, ["'x'", "axis 1 must be 4", "got shape (3, 3)"]),
        (lambda: {}, InputNameError, ["missing input(s) ['x']", "expects exactly ['x']"]),
        (lambda: {"X": _x()}, InputNameError, ["unknown input(s) 'X' (did you mean 'x'?)", "missing input(s) ['x']"]),
        (lambda: {"x": _x(), "y": _x()}, InputNameError, ["unknown input(s) 'y'"]),
        (lambda: _x(0), EmptyBatchError, ["'x'", "empty batch", "(0, 4)"]),
        (lambda: _nan(_x()), NonFiniteInputError, ["'x'", "NaN or Inf", "sample(s) [1]", "check_finite=False"]),
        (lambda: _inf(_x()), NonFiniteInputError, ["sample(s) [0]"]),
        (lambda: _nan(_x())[1:2], NonFiniteInputError, ["sample(s) [0]"]),  # the batch-1 path too
    ],
)
def test_bad_inputs_raise_typed_errors(tiny_package, inputs, error, fragments):
    sess = ExitSession(tiny_package)
    with pytest.raises(error) as info:
        sess.run(inputs())
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_non_contiguous_input_is_accepted(tiny_package):
    sess = ExitSession(tiny_package)
    x = np.asfortranarray(_x(5))
    np.testing.assert_array_equal(sess.run(x).logits, sess.run(np.ascontiguousarray(x)).logits)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"thresholds": [0.1, 0.2]}, ThresholdError, "expected 1 threshold(s)"),
        ({"thresholds": [float("nan")]}, ThresholdError, "threshold 0 is nan"),
        ({"thresholds": ["high"]}, ThresholdError, "must be a number"),
        ({"thresholds": [0.5], "policy": "entropi"}, UnknownPolicyError, "Did you mean 'entropy'?"),
    ],
)
def test_bad_run_options(tiny_package, kwargs, error, fragment):
    with pytest.raises(error, match=None) as info:
        ExitSession(tiny_package).run(_x(), **kwargs)
    assert fragment in str(info.value)


def test_missing_provider_is_an_error_unless_fallback_is_allowed(tiny_package):
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider .*not in this onnxruntime build"):
        ExitSession(tiny_package, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="did you mean CPUExecutionProvider"):
        ExitSession(tiny_package, providers=["CPUExecutionProvidr"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sess = ExitSession(tiny_package, providers=["CUDAExecutionProvider"], allow_fallback=True)
    assert any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
    assert sess.providers == ["CPUExecutionProvider"]
    assert sess.run(_x()).predictions.shape == (3,)


def _in_subprocess(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_global_thread_pool_is_explicit(tiny_package):
    # Process-wide state: each case runs in its own interpreter.
    ok = _in_subprocess(f"""
        import numpy as np
        from edgeexit.runtime import ExitSession, use_global_thread_pool
        use_global_thread_pool(1, 1)
        sess = ExitSession({str(tiny_package)!r}, global_thread_pool=True)
        print(sess.run(np.ones((2, 4), np.float32)).exit_index.tolist())
    """)
    assert ok.returncode == 0, ok.stderr
    host_pool = _in_subprocess(f"""
        import onnxruntime as ort
        from edgeexit.errors import SessionError
        from edgeexit.runtime import ExitSession
        ort.set_global_thread_pool_sizes(1, 1)   # the host app made a global pool itself
        try:
            ExitSession({str(tiny_package)!r})
        except SessionError as exc:
            print("REFUSED:", exc)
    """)
    assert "REFUSED:" in host_pool.stdout and "global_thread_pool=True" in host_pool.stdout, host_pool.stderr
    no_pool = _in_subprocess(f"""
        from edgeexit.errors import SessionError
        from edgeexit.runtime import ExitSession
        try:
            ExitSession({str(tiny_package)!r}, global_thread_pool=True)
        except SessionError as exc:
            print("REFUSED:", exc)
    """)
    assert "REFUSED:" in no_pool.stdout and "use_global_thread_pool" in no_pool.stdout, no_pool.stderr


def test_threads_must_be_positive(tiny_package):
    with pytest.raises(SessionError, match="threads must be >= 1"):
        ExitSession(tiny_package, threads=0)
