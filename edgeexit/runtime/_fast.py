"""The package's own call at batch 1 as one small function: one input screened, one onnxruntime
call, the result.  ``ExitSession.run`` tries it first and falls back on its checked path.

What it saves, measured by ``benchmarks/bench_overhead.py`` (paired against a bare
``InferenceSession.run`` of the same graph): right after onnxruntime ran a model, the CPU's
caches hold the model, so every object the wrapper touches costs a cache miss; a numpy
reduction, a function call, a dict lookup each cost 0.5 to 3 us there, far more than the same
step alone in a warm loop.  So this function touches as little as it can: its own closure
variables, the input array, ``np.isfinite`` once, the session's C++ run
(``_stage.direct_run``) and the result's slots.  The result's other fields are computed when
read (``ExitResult``).  Measured on a shared 2-core x86 VM, the time added to a bare call went
from 4.8-6.6 us to 1.1-1.4 us (full.onnx of ~7 and ~18 us graphs) and from 8.6-12.5 us to
1.4-2.6 us (their compiled graphs).

It screens, it does not judge: anything that is not a plain, valid batch-1 call (a batch, a
wrong dtype or shape, a non-contiguous array, a NaN or an Inf, an onnxruntime failure, an exit
index the package does not have) makes it return None, and ``run``'s checked path answers that
call from the start, with the typed error where there is one.  ``tests/test_fast_paths.py``
shows each case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import numpy as np

from ..policies import ExitPolicy
from ._result import ExitResult
from ._stage import OrtRun

FastCall = Callable[[Any, int], "ExitResult | None"]


def _screen(name: str, shape: tuple[int, ...], dtype: np.dtype[Any],
            check_finite: bool) -> Callable[[Any], np.ndarray | None]:
    """The single input array of a call, when it is exactly what the package takes at batch 1."""
    ndarray, isfinite = np.ndarray, np.isfinite

    def screen(inputs: Any) -> np.ndarray | None:
        x = inputs.get(name) if type(inputs) is dict and len(inputs) == 1 else inputs
        if type(x) is not ndarray or x.shape != shape or x.dtype != dtype or not x.flags.c_contiguous:
            return None
        # one numpy call: the mask searched as bytes (a 0 byte is a NaN or an Inf)
        return None if check_finite and b"\x00" in isfinite(x).tobytes() else x

    return screen


def full_model_one(name: str, shape: tuple[int, ...], dtype: np.dtype[Any], check_finite: bool, run: OrtRun,
                   logits_name: str, policy: ExitPolicy, last_exit: int) -> FastCall:
    """The call of a package whose early exits are disabled: ``full.onnx`` (its one input is
    ``name``; its logits are the exits' dtype), answered as ``ExitResult.of_full_model`` does."""
    screen, outputs, clock, new, nan = _screen(name, shape, dtype, check_finite), [logits_name], perf_counter_ns, \
        ExitResult.__new__, math.nan

    def call(inputs: Any, start: int) -> ExitResult | None:
        x = screen(inputs)
        if x is None:
            return None
        try:
            logits = run(outputs, {name: x}, None)[0]
        except Exception:  # the checked path runs it again and raises the typed error
            return None
        result = new(ExitResult)
        result.logits, result.stage_ms, result.engine, result._policy, result._last_exit = logits, (), "full", \
            policy, last_exit
        result._predictions = result._exit_index = result._scores = result._nonfinite = None
        result._score = nan
        result.total_ms = (clock() - start) / 1e6
        return result

    return call


def compiled_one(name: str, shape: tuple[int, ...], dtype: np.dtype[Any], check_finite: bool, run: OrtRun,
                 outputs: list[str], thresholds_name: str, thresholds: np.ndarray, num_exits: int) -> FastCall:
    """The call of the compiled graph at the package's thresholds (its inputs: ``name`` and the
    thresholds), checked and answered as ``CompiledGraph.run`` and ``ExitSession._run_compiled`` do."""
    screen, clock, new, nan = _screen(name, shape, dtype, check_finite), perf_counter_ns, ExitResult.__new__, math.nan

    def call(inputs: Any, start: int) -> ExitResult | None:
        x = screen(inputs)
        if x is None:
            return None
        try:
            logits, exit_index, scores = run(outputs, {name: x, thresholds_name: thresholds}, None)
        except Exception:  # the checked path runs it again and raises the typed error
            return None
        if not 0 <= exit_index.item(0) < num_exits:   # an exit the package lacks: the checked path refuses it
            return None
        result = new(ExitResult)
        result.logits, result.stage_ms, result.engine, result._exit_index, result._scores = logits, (), "compiled", \
            exit_index, scores
        result._predictions = result._nonfinite = result._policy = None
        result._last_exit, result._score = -1, nan
        result.total_ms = (clock() - start) / 1e6
        return result

    return call
