"""Part of the stage loop: stages ``first`` to ``stop - 1`` with their exits, for offloading.

``ExitSession.run_stages`` calls ``run_split``: a device runs the stages before K and keeps
the carry of the samples still running, a server (``edgeexit.serve``) runs the stages from K
on that carry.  The loop is ``ExitSession._run_batch``'s, so a sample leaves at the same exit
with the same logits and score whether its stages ran in one process or two.  ``carry_specs``
and ``check_carry`` say and check which tensors enter stage K (names, dtypes, shapes, read from
the stage graphs themselves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import EmptyBatchError, InputDtypeError, InputError, InputNameError, InputShapeError
from ._stage import Stage, take

_ORT_DTYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor entering a stage: name, numpy dtype name, shape (str or None: any size)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageSplit:
    """What stages ``first`` .. ``stop - 1`` did to a batch of ``n`` samples.

    ``done`` holds the positions (in the batch given) of the samples that left at an exit of
    those stages, with their ``exit_index``, ``scores`` and ``logits`` row by row; ``rest`` the
    positions of the samples still running and ``carry`` their tensors that later stages read
    (empty when every sample left).  ``stage_ms`` has one entry per stage of the package."""

    done: np.ndarray
    exit_index: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    rest: np.ndarray
    carry: dict[str, np.ndarray]
    stage_ms: tuple[float, ...]


def carry_specs(stages: Sequence[Stage], first: int) -> tuple[TensorSpec, ...]:
    """The tensors that enter stage ``first`` and go on from there: what a stage before it left that
    a stage from it on reads, with the dtype and shape the reading graph declares."""
    if not 0 < first < len(stages):
        raise InputError(f"a split must fall between two stages: 1 <= K <= {len(stages) - 1}, got {first}")
    specs: dict[str, TensorSpec] = {}
    for stage in stages[first:]:
        for arg in stage.session.get_inputs():
            if arg.name in stages[first - 1].keep_after and arg.name not in specs:
                dtype = _ORT_DTYPE.get(arg.type)
                if dtype is None:
                    raise InputError(f"stage {stage.spec.name!r} reads {arg.name!r} as {arg.type}, which cannot be "
                                     "offloaded")
                specs[arg.name] = TensorSpec(arg.name, dtype, tuple(
                    d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in arg.shape))
    return tuple(specs[name] for name in stages[first - 1].keep_after)


def check_carry(specs: Sequence[TensorSpec], tensors: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """``tensors`` as feeds of the stage the specs enter, and the batch size; a typed ``InputError``
    naming the tensor for a missing or unknown name, a wrong dtype, rank, fixed axis or batch."""
    names = [s.name for s in specs]
    if set(tensors) != set(names):
        missing = [n for n in names if n not in tensors]
        unknown = [str(n) for n in tensors if n not in names]
        raise InputNameError(f"the carry must be exactly {names}" + (f"; missing {missing}" if missing else "")
                             + (f"; unknown {unknown}" if unknown else ""))
    feeds, batch = {}, -1
    for spec in specs:
        array = tensors[spec.name]
        if not isinstance(array, np.ndarray) or array.dtype.name != spec.dtype:
            got = array.dtype.name if isinstance(array, np.ndarray) else type(array).__name__
            raise InputDtypeError(f"carry {spec.name!r}: expected {spec.dtype}, got {got}")
        if array.ndim != len(spec.shape) or any(isinstance(d, int) and array.shape[i] != d
                                                for i, d in enumerate(spec.shape)):
            raise InputShapeError(f"carry {spec.name!r}: expected shape {list(spec.shape)}, got {list(array.shape)}")
        if batch == -1:
            batch = array.shape[0]
        elif array.shape[0] != batch:
            raise InputShapeError(f"the carry tensors disagree on the batch size: {batch} and {array.shape[0]} "
                                  f"({spec.name!r})")
        feeds[spec.name] = np.ascontiguousarray(array)
    if batch <= 0:
        raise EmptyBatchError("the carry holds no samples")
    return feeds, batch


def run_split(stages: Sequence[Stage], policies: Sequence[Any], thresholds: Sequence[float], dtype: np.dtype[Any],
              tensors: dict[str, Any], n: int, first: int, stop: int) -> StageSplit:
    """``ExitSession._run_batch`` over stages ``first`` .. ``stop - 1`` only (see the module's doc)."""
    last_exit = len(policies) - 1
    stage_ms = [0.0] * len(stages)
    active = np.arange(n)
    done: list[np.ndarray] = []
    exits: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for k in range(first, stop):
        stage = stages[k]
        t0 = perf_counter_ns()
        outs = stage.run(tensors)
        stage_ms[k] = (perf_counter_ns() - t0) / 1e6
        tensors.update(zip(stage.outputs, outs))
        e = stage.exit_number
        if e is None:
            continue
        policy = policies[e]
        s = policy.scores(outs[stage.read_pos[policy.reads]])
        last = e == last_exit
        leave = np.ones(len(active), dtype=bool) if last else policy.accepts(s, thresholds[e])
        if leave.any():
            done.append(active[leave])
            exits.append(np.full(int(leave.sum()), e, dtype=np.int64))
            scores.append(s[leave])
            logits.append(outs[stage.logits_pos][leave].astype(dtype, copy=False))
        if last or leave.all():
            active = active[:0]
            break
        if leave.any():
            stay = ~leave
            active = active[stay]
            tensors = {name: take(tensors[name], stay) for name in stage.keep_after}
    carry = {} if not active.size else {
        name: tensors[name].numpy() if isinstance(tensors[name], ort.OrtValue) else tensors[name]
        for name in stages[stop - 1].keep_after}
    return StageSplit(
        done=np.concatenate(done) if done else np.empty(0, np.int64),
        exit_index=np.concatenate(exits) if exits else np.empty(0, np.int64),
        scores=np.concatenate(scores) if scores else np.empty(0, np.float64),
        logits=np.concatenate(logits) if logits else np.empty((0, 0), dtype),
        rest=active, carry=carry, stage_ms=tuple(stage_ms))
