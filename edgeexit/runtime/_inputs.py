"""Checks that turn a user's input mapping into validated feeds for stage 0."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import (
    EmptyBatchError,
    InputDtypeError,
    InputNameError,
    InputShapeError,
    NonFiniteInputError,
)
from ..package import InputSpec


class InputChecker:
    """Validates inputs against the package's input specs; fast for batch 1."""

    def __init__(self, specs: Sequence[InputSpec], check_finite: bool = True) -> None:
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in specs)
        self._dtypes = tuple(np.dtype(s.dtype) for s in specs)
        self._fixed = tuple(
            tuple((axis, dim) for axis, dim in enumerate(s.shape) if isinstance(dim, int)) for s in specs
        )
        self._ranks = tuple(len(s.shape) for s in specs)
        self._floating = tuple(np.issubdtype(d, np.floating) for d in self._dtypes)
        self.check_finite = check_finite
        sample_dims = [d for d in specs[0].shape[1:] if isinstance(d, int)]
        fixed_sample = len(specs) == 1 and len(sample_dims) == len(specs[0].shape) - 1
        self._single: tuple[int, ...] | None = (1, *sample_dims) if fixed_sample else None
        # np.isfinite(x).all() on the batch-1 path (x . 0, one BLAS call, was 0.8 us cheaper but
        # raised numpy's "invalid value" RuntimeWarning on every non-finite input)
        self._check_one = bool(check_finite and self._floating[0] and fixed_sample)

    def feeds(self, inputs: Any) -> tuple[dict[str, np.ndarray], int]:
        """Validated ``{name: C-contiguous array}`` and the batch size."""
        if self._single is not None:  # batch-1 fast path: one input (bare or named), exact dtype and shape
            array = inputs.get(self.names[0]) if type(inputs) is dict and len(inputs) == 1 else inputs
            if (
                type(array) is np.ndarray and array.shape == self._single
                and array.dtype == self._dtypes[0] and array.flags.c_contiguous
                and not (self._check_one and not np.isfinite(array).all())
            ):
                return {self.names[0]: array}, 1
        if isinstance(inputs, np.ndarray):
            if len(self.specs) != 1:
                raise InputNameError(
                    f"a bare array was given but this package has {len(self.specs)} inputs "
                    f"{list(self.names)}; pass a dict {{name: array}}"
                )
            inputs = {self.names[0]: inputs}
        elif not isinstance(inputs, Mapping):
            raise InputNameError(
                f"inputs must be a numpy array or a dict {{name: array}} with names {list(self.names)}; "
                f"got {type(inputs).__name__}"
            )
        if len(inputs) != len(self.names) or any(n not in inputs for n in self.names):
            self._name_error(inputs)

        feeds: dict[str, np.ndarray] = {}
        batch = -1
        for spec, dtype, fixed, rank, floating in zip(
            self.specs, self._dtypes, self._fixed, self._ranks, self._floating
        ):
            array = inputs[spec.name]
            if not isinstance(array, np.ndarray):
                raise InputDtypeError(
                    f"input {spec.name!r}: expected a numpy array of {spec.dtype}, got "
                    f"{type(array).__name__}; convert it with np.asarray(x, dtype=np.{spec.dtype})"
                )
            if array.dtype != dtype:
                raise InputDtypeError(
                    f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype}; convert it "
                    f"with x.astype(np.{spec.dtype}) (no silent casts: they can change results)"
                )
            if array.ndim != rank:
                raise InputShapeError(
                    f"input {spec.name!r}: expected rank {rank} with shape {_shape_str(spec.shape)}, got "
                    f"shape {array.shape}" + (
                        "; add the batch axis with x[None]" if array.ndim == rank - 1 else ""
                    )
                )
            for axis, dim in fixed:
                if array.shape[axis] != dim:
                    raise InputShapeError(
                        f"input {spec.name!r}: axis {axis} must be {dim} (expected shape "
                        f"{_shape_str(spec.shape)}), got shape {array.shape}"
                    )
            n = array.shape[0]
            if n == 0:
                raise EmptyBatchError(
                    f"input {spec.name!r} has an empty batch (shape {array.shape}); pass at least one sample"
                )
            if batch == -1:
                batch = n
            elif n != batch:
                raise InputShapeError(
                    f"inputs disagree on the batch size: {self.names[0]!r} has {batch}, "
                    f"{spec.name!r} has {n}; every input must hold the same samples"
                )
            # one reduction instead of a mask and a reduction: a finite sum means every value is
            # finite; only a non-finite sum (NaN/Inf, or an overflow) needs the exact check
            if floating and self.check_finite and not _finite_sum(array) and not np.isfinite(array).all():
                bad = np.flatnonzero(~np.isfinite(array.reshape(n, -1)).all(axis=1))
                raise NonFiniteInputError(
                    f"input {spec.name!r} holds NaN or Inf in sample(s) {bad[:10].tolist()}"
                    f"{'…' if bad.size > 10 else ''}; clean the data, or pass check_finite=False to let "
                    "them through (a non-finite exit score never triggers an early exit)"
                )
            feeds[spec.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        return feeds, batch

    def _name_error(self, inputs: Mapping[str, Any]) -> None:
        missing = [n for n in self.names if n not in inputs]
        unknown = [str(n) for n in inputs if n not in self.names]
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            hints = []
            for u in unknown:
                lowered = {n.lower(): n for n in self.names}
                near = difflib.get_close_matches(u.lower(), list(lowered), n=1)
                hints.append(f"{u!r}" + (f" (did you mean {lowered[near[0]]!r}?)" if near else ""))
            parts.append(f"unknown input(s) {', '.join(hints)}")
        raise InputNameError(f"{'; '.join(parts)}; the package expects exactly {list(self.names)}")


def _shape_str(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def synthetic_inputs(specs: Sequence[InputSpec], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the package's dtypes and shapes (symbolic non-batch axes: 1), for timing
    and self-checks where only the shapes matter."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [n] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        if spec.dtype == "bool":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype.startswith(("int", "uint")):
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def _finite_sum(array: np.ndarray) -> bool:
    """Whether the sum is finite; an overflow of large finite values is not a warning here."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(array.sum())
