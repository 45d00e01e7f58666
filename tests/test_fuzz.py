"""Property-based fuzzing: mutated manifests and arbitrary ``run()`` inputs end in success or an
``EdgeExitError`` subclass, within a time bound, never in another exception.

Bounded in the default run (profile ``default``: 80 examples per property); for a nightly run:

    HYPOTHESIS_PROFILE=nightly python -m pytest -m fuzz tests/test_fuzz.py     # 3,000 per property
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_MANIFEST, write_tiny_sources
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeexit.errors import EdgeExitError
from edgeexit.package import load_package, write_package
from edgeexit.runtime import ExitSession

settings.register_profile("default", max_examples=80, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

pytestmark = pytest.mark.fuzz
TIME_BOUND_S = 5.0
X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    return write_package(folder / "base.eexit", copy.deepcopy(TINY_MANIFEST), write_tiny_sources(folder / "src"))


# --- manifests ------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                      st.sampled_from(["stage0.onnx", "../x", "/etc/passwd", "x", "batch", "entropy", "float32",
                                       "confidence", "logits0", "carry0_0", "a" * 300]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(manifest: dict[str, Any], path: tuple[Any, ...], action: str, value: Any) -> None:
    if not path:
        return
    parent: Any = manifest
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = copy.deepcopy(value)
    elif action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    elif isinstance(parent, dict):
        parent[f"{last}_extra"] = copy.deepcopy(value)


def _exercise(path: Path) -> None:
    """Load, build a session, run at batch 1 and 5: success or a typed error, in bounded time."""
    start = time.perf_counter()
    try:
        package = load_package(path)
        sess = ExitSession(package.root)
        for batch in (X[:1], X):
            out = sess.run(batch)
            assert out.logits.shape[0] == batch.shape[0] and out.exit_index.shape == (batch.shape[0],)
    except EdgeExitError:
        pass
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_BOUND_S, f"{elapsed:.1f} s"


@given(data=st.data(), action=st.sampled_from(["replace", "delete", "add", "duplicate"]), value=json_value)
def test_mutated_manifests_load_or_fail_typed(base, tmp_path_factory, data, action, value):
    manifest = json.loads((base / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(manifest)
        _mutate(manifest, data.draw(st.sampled_from(paths)), action, value)
    work = tmp_path_factory.mktemp("m") / "p.eexit"
    shutil.copytree(base, work)
    (work / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
    _exercise(work)


@given(data=st.data())
def test_manifests_with_damaged_bytes_load_or_fail_typed(base, tmp_path_factory, data):
    raw = bytearray((base / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    work = tmp_path_factory.mktemp("b") / "p.eexit"
    shutil.copytree(base, work)
    (work / "manifest.json").write_bytes(bytes(raw))
    _exercise(work)


# --- run() inputs ---------------------------------------------------------------------------

dtypes = st.sampled_from(["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64",
                          "object", "U3"])
shapes = st.one_of(st.just([5, 4]), st.just([1, 4]),
                   st.lists(st.integers(0, 6), min_size=0, max_size=4))
values = st.sampled_from(["normal", "nan", "inf", "huge", "zeros"])


def _array(dtype: str, shape: list[int], kind: str, strided: bool) -> np.ndarray:
    size = int(np.prod(shape)) if shape else 1
    base_values = np.random.default_rng(size).standard_normal(size * (2 if strided else 1))
    if kind == "nan":
        base_values[::3] = math.nan
    elif kind == "inf":
        base_values[::2] = math.inf
    elif kind == "huge":
        base_values *= 1e38
    elif kind == "zeros":
        base_values[:] = 0
    if strided:
        base_values = base_values[::2]     # a non-contiguous view
    if dtype == "object":
        arr = np.empty(size, dtype=object)
        arr[:] = list(base_values)
    elif dtype == "U3":
        arr = base_values.astype("U3")
    else:
        with np.errstate(all="ignore"):
            arr = base_values.astype(dtype)
    return arr.reshape(shape) if shape else arr.reshape(())


@pytest.fixture(scope="module")
def session(base) -> ExitSession:
    return ExitSession(base)


@given(dtype=dtypes, shape=shapes, kind=values, strided=st.booleans(),
       wrap=st.sampled_from(["bare", "named", "wrong-name", "extra-name", "list", "none"]),
       engine=st.sampled_from([None, "stages"]), transpose=st.booleans())
def test_run_inputs_succeed_or_fail_typed(session, dtype, shape, kind, strided, wrap, engine, transpose):
    array = _array(dtype, shape, kind, strided)
    if transpose and array.ndim >= 2:
        array = array.T
    inputs: Any = {"bare": array, "named": {"x": array}, "wrong-name": {"y": array},
                   "extra-name": {"x": array, "z": array}, "list": array.tolist(), "none": None}[wrap]
    start = time.perf_counter()
    try:
        out = session.run(inputs, engine=engine)
    except EdgeExitError:
        pass
    else:
        n = array.shape[0]
        assert array.dtype == np.float32 and array.shape == (n, 4) and n > 0 and np.isfinite(array).all()
        assert out.logits.shape == (n, 3) and out.exit_index.shape == (n,) and out.predictions.shape == (n,)
    assert time.perf_counter() - start < TIME_BOUND_S


@given(thresholds=st.one_of(st.none(), json_value, st.lists(json_value, max_size=3)),
       policy=st.one_of(st.none(), st.text(max_size=10), st.sampled_from(["entropy", "confidence", "margin"])))
def test_run_thresholds_and_policies_succeed_or_fail_typed(session, thresholds, policy):
    try:
        out = session.run(X, thresholds=thresholds, policy=policy)
    except EdgeExitError:
        return
    assert out.logits.shape == (5, 3)


def test_found_by_fuzzing_large_finite_and_infinite_inputs_raise_no_numpy_warnings(session):
    """Two findings of the nightly run: float32 values near 1e38 overflowed the finiteness sum
    (a RuntimeWarning), and Inf at batch 1 made the old x . 0 check warn 'invalid value'."""
    huge = np.full((5, 4), 1e38, np.float32)
    assert session.run(huge).logits.shape == (5, 3)           # finite: runs, no warning (warnings are errors)
    one = np.array([[np.inf, 0, 0, 0]], np.float32)
    with pytest.raises(EdgeExitError, match="NaN or Inf"):
        session.run(one)
