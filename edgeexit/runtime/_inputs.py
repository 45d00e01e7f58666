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
    """Validates inputs against the package's input specs; fast for one input of fixed sample shape."""

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
        sample_dims = tuple(d for d in specs[0].shape[1:] if isinstance(d, int))
        fixed_sample = len(specs) == 1 and len(sample_dims) == len(specs[0].shape) - 1
        # the common call, checked in a few steps: one input whose every axis but the batch is fixed
        self._sample: tuple[int, ...] | None = sample_dims if fixed_sample else None
        self._name, self._dtype, self._rank = self.names[0], self._dtypes[0], self._ranks[0]
        self._check_values = bool(check_finite and self._floating[0])
        # what a batch-1 call's one array must be for the fast paths (runtime/_fast.py): its input
        # name, exact shape and dtype, and whether its values are checked for NaN/Inf
        self.single = None if not fixed_sample else (self._name, (1, *sample_dims), self._dtype, self._check_values)

    def feeds(self, inputs: Any) -> tuple[dict[str, np.ndarray], int]:
        """Validated ``{name: C-contiguous array}`` and the batch size."""
        if self._sample is not None:  # one input (bare or named) of the exact dtype and sample shape
            array = inputs.get(self._name) if type(inputs) is dict and len(inputs) == 1 else inputs
            if type(array) is np.ndarray:
                shape = array.shape
                if (
                    len(shape) == self._rank and shape[1:] == self._sample and shape[0]
                    and array.dtype == self._dtype and array.flags.c_contiguous
                    and not (self._check_values and not _all_finite(array))
                ):   # anything else (a wrong dtype, shape, a NaN...) is refused below, with its own error
                    return {self._name: array}, shape[0]
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
            if floating and self.check_finite and not _all_finite(array):
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


# Up to this many values a mask is cheap to hold; past it a sum (no mask) goes first.
_MASK_MAX_VALUES = 1 << 20


def _all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite, at the cost of one numpy call where that can be had.

    The mask of ``np.isfinite`` searched as bytes (a 0 byte is a non-finite value) costs half of
    ``np.isfinite(x).all()`` at batch 1 (0.7 against 1.3 us: the reduction is the other half),
    and ``.all()`` a third of a sum at batch 64 (numpy 2.4, x86).  Past ``_MASK_MAX_VALUES`` a
    sum first, which needs no mask: a finite sum means every value is finite, and only a
    non-finite one (NaN/Inf, or the overflow of large finite values) needs the exact check.
    """
    if array.size <= 4096:
        return b"\x00" not in np.isfinite(array).tobytes()
    if array.size <= _MASK_MAX_VALUES:
        return bool(np.isfinite(array).all())
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(array.sum()) or bool(np.isfinite(array).all())
