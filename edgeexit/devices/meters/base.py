"""The shared base of every energy meter: the reading, its errors, the trapezoid rule and the meter interface.

Counter meters (RAPL, NVML's total energy) subclass ``EnergyMeter``; meters that sample a
power sensor in a background thread subclass ``_SampledMeter``.
"""

from __future__ import annotations

import abc
import math
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import EdgeExitError
from .sampler import Clock, PeriodicSampler

CommandRunner = Callable[[Sequence[str]], str]
KINDS = ("measured", "estimated")


class EnergyMeterError(EdgeExitError, RuntimeError):
    """An energy meter cannot be read here, or was used out of order."""

    exit_code = 4


class UnknownMeterError(EnergyMeterError, KeyError):
    """No energy meter of that name is registered."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EnergyMeterWarning(UserWarning):
    """A meter skipped malformed values or samples; the reading is still usable."""


# --- the reading ------------------------------------------------------------------


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one window.

    Attributes:
        joules: energy in the window, after idle subtraction when ``idle_subtracted_j > 0``.
        seconds: length of the window that ``joules`` covers.
        kind: ``"measured"`` (read from a sensor or counter) or ``"estimated"`` (a power model).
        source: where the figure comes from (a sysfs path, a command, a profile).
        interval_s: sampling interval, or the counter's update period.
        samples: power samples (or counter reads) the figure is built from.
        idle_subtracted_j: idle energy taken off a whole-board figure; 0 if none.
        note: how the figure was made, in words (rails, wrap-arounds, skipped values...).
        skipped: malformed values, lines or rows that were skipped.
    """

    joules: float
    seconds: float
    kind: str
    source: str
    interval_s: float
    samples: int
    idle_subtracted_j: float = 0.0
    note: str = ""
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"EnergyReading.kind must be one of {KINDS}, got {self.kind!r}")
        if not math.isfinite(self.joules):
            raise ValueError(f"EnergyReading.joules must be finite, got {self.joules}")
        if not self.seconds >= 0:
            raise ValueError(f"EnergyReading.seconds must be >= 0, got {self.seconds}")

    @property
    def watts(self) -> float:
        """Mean power over the window (nan for an empty window)."""
        return self.joules / self.seconds if self.seconds > 0 else math.nan

    def per_inference(self, n: int) -> float:
        """Joules per inference when the window ran ``n`` inferences."""
        if n <= 0:
            raise ValueError(f"per_inference needs a positive inference count, got {n}")
        return self.joules / n

    def summary(self) -> str:
        """One line that says what was measured and how: ``"3.2 J over 1.00 s (measured, ...)"``."""
        idle = f", idle {self.idle_subtracted_j:.4g} J subtracted" if self.idle_subtracted_j else ""
        return f"{self.joules:.4g} J over {self.seconds:.3f} s ({self.kind}, {self.source}{idle})"


# --- integration ---------------------------------------------------------------------


def integrate_power(
    times: Sequence[float] | np.ndarray, watts: Sequence[float] | np.ndarray, t0: float, t1: float
) -> float:
    """Joules in ``[t0, t1]`` from power samples, by the trapezoid rule.

    The power at ``t0`` and ``t1`` is interpolated linearly between the neighbouring
    samples, so a window that starts or ends between two samples is clipped exactly.
    The samples must cover the window: nothing is extrapolated.

    Args:
        times: sample times in seconds, non-decreasing.
        watts: power at each time.
        t0: window start; ``times[0] <= t0``.
        t1: window end; ``t0 <= t1 <= times[-1]``.

    Example:
        >>> integrate_power([0.0, 1.0, 2.0], [2.0, 4.0, 4.0], 0.5, 2.0)
        5.75
    """
    t = np.asarray(times, dtype=np.float64)
    w = np.asarray(watts, dtype=np.float64)
    if t.ndim != 1 or t.shape != w.shape or t.size == 0:
        raise ValueError(f"times and watts must be 1-D, non-empty and equally long; got {t.shape} and {w.shape}")
    if not (np.isfinite(t).all() and np.isfinite(w).all()):
        raise ValueError("times and watts must be finite")
    if np.any(np.diff(t) < 0):
        raise ValueError("times must be non-decreasing")
    if not t0 <= t1:
        raise ValueError(f"window start {t0} is after its end {t1}")
    if t0 < t[0] or t1 > t[-1]:
        raise ValueError(f"samples cover [{t[0]}, {t[-1]}] but the window is [{t0}, {t1}]")
    inner = (t > t0) & (t < t1)
    tt = np.concatenate(([t0], t[inner], [t1]))
    ww = np.concatenate(([np.interp(t0, t, w)], w[inner], [np.interp(t1, t, w)]))
    return float(np.sum((ww[1:] + ww[:-1]) * np.diff(tt)) / 2.0)


# --- shared readers -----------------------------------------------------------------


def _run_command(argv: Sequence[str], timeout_s: float = 5.0) -> str:
    """stdout of ``argv``; raises ``OSError`` / ``subprocess.SubprocessError`` on failure."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=True).stdout


def _read_number(path: Path) -> float:
    """A number from a sysfs file; ``ValueError`` if malformed, ``OSError`` if unreadable."""
    value = float(path.read_text().strip())
    if not math.isfinite(value):
        raise ValueError(f"{path}: non-finite value {value}")
    return value


def _root_only(path: Path, pattern: str) -> str:
    return (
        f"{path} exists but is readable by root only; run as root or make it readable with "
        f"`sudo chmod a+r {pattern}` (reset at each boot)"
    )


# --- the meter interface ------------------------------------------------------------


class EnergyMeter(abc.ABC):
    """Base of every energy meter: ``start()``, work, ``stop()`` → ``EnergyReading``.

    Attributes:
        name: registry name.
        kind: ``"measured"`` or ``"estimated"``.
        source: where the figures come from, in words.
        interval_s: sampling interval, or the counter's update period.
        whole_board: True when the meter sees the whole board, so idle power may be
            subtracted (``idle_watts=`` on those meters, see ``measure_idle``).
        reading: the last reading taken by the context manager.

    Also a context manager: ``with meter: work()`` leaves the reading in ``meter.reading``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "measured"
    whole_board: ClassVar[bool] = False

    def __init__(
        self, *, source: str, interval_s: float, clock: Clock | None = None, idle_watts: float | None = None
    ) -> None:
        if idle_watts is not None:
            if not self.whole_board:
                raise ValueError(f"{self.name}: idle_watts applies to whole-board meters only")
            idle_watts = float(idle_watts)
            if not (math.isfinite(idle_watts) and idle_watts >= 0):
                raise ValueError(f"{self.name}: idle_watts must be finite and >= 0, got {idle_watts}")
        self.source = source
        self.interval_s = float(interval_s)
        self.reading: EnergyReading | None = None
        self._idle_to_subtract = idle_watts
        self._clock = clock or time.monotonic
        self._running = False
        self._skipped = 0
        self._dropped = 0

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """``(True, what it reads)`` if this meter can be read here, else ``(False, why not and the fix)``."""

    @classmethod
    def detect(cls, **options: Any) -> tuple[bool, str]:
        """``available()`` of a meter built from ``options`` (the defaults when none are given)."""
        return cls(**options).available()

    @abc.abstractmethod
    def _begin(self) -> None:
        """Take the first reading; raise ``EnergyMeterError`` saying why when the meter cannot be read."""

    @abc.abstractmethod
    def _finish(self) -> tuple[float, float, int, list[str]]:
        """Take the last reading: ``(joules, seconds, samples, notes)``."""

    def _abort(self) -> None:  # noqa: B027 - an optional hook: counter meters hold nothing to release
        """Release threads and handles without a reading (after an exception in the window)."""

    def start(self) -> None:
        if self._running:
            raise EnergyMeterError(f"{self.name}: start() called twice; stop() the running window first")
        self._skipped = self._dropped = 0
        self._begin()
        self._running = True

    def stop(self) -> EnergyReading:
        if not self._running:
            raise EnergyMeterError(f"{self.name}: stop() called before start()")
        self._running = False
        joules, seconds, samples, notes = self._finish()
        idle_j = 0.0
        if self._idle_to_subtract:
            idle_j = self._idle_to_subtract * seconds
            joules -= idle_j
            notes.append(
                f"idle {self._idle_to_subtract:.4g} W × {seconds:.3f} s = {idle_j:.4g} J subtracted (whole-board meter)"
            )
            if joules < 0:
                notes.append("net energy is negative: idle power exceeds this window's mean power; re-measure idle")
        if self._skipped:
            notes.append(f"{self._skipped} malformed value(s) skipped")
        if self._skipped or self._dropped:
            warnings.warn(
                f"{self.name}: {self._skipped} malformed value(s) skipped and {self._dropped} sample(s) dropped "
                f"while reading {self.source}; see the reading's note",
                EnergyMeterWarning,
                stacklevel=2,
            )
        return EnergyReading(
            joules=joules, seconds=seconds, kind=self.kind, source=self.source, interval_s=self.interval_s,
            samples=samples, idle_subtracted_j=idle_j, note="; ".join(notes), skipped=self._skipped,
        )

    def __enter__(self) -> EnergyMeter:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.reading = self.stop()
        else:  # keep the original exception; just release threads and handles
            self._running = False
            self._abort()

    def _integrate(self, sampler: PeriodicSampler[float]) -> tuple[float, float, int, list[str]]:
        """Stop ``sampler`` and integrate its samples over the span they cover."""
        samples = sampler.stop()
        times = np.array([t for t, _ in samples])
        watts = np.array([w for _, w in samples])
        t0, t1 = float(times[0]), float(times[-1])
        notes = [f"{len(samples)} power sample(s) every ~{self.interval_s:g} s integrated (trapezoid)"]
        self._dropped = sampler.dropped
        if sampler.dropped:
            why = f" ({sampler.first_error})" if sampler.first_error else ""
            notes.append(f"{sampler.dropped} sample(s) dropped{why}; the window spans the usable ones")
        return integrate_power(times, watts, t0, t1), t1 - t0, len(samples), notes


class _SampledMeter(EnergyMeter):
    """A meter that samples power in a background thread and integrates it."""

    def _begin(self) -> None:
        self._sampler: PeriodicSampler[float] = PeriodicSampler(self._read_watts, self.interval_s, self._clock)
        self._sampler.start()
        if not self._sampler.samples:
            self._sampler.stop()
            why = self._sampler.first_error or "the value was malformed"
            raise EnergyMeterError(f"{self.name}: the first power reading from {self.source} failed ({why})")

    def _finish(self) -> tuple[float, float, int, list[str]]:
        return self._integrate(self._sampler)

    def _abort(self) -> None:
        if self._sampler.running:
            self._sampler.stop()

    @abc.abstractmethod
    def _read_watts(self) -> float | None:
        """Current power in watts, or None (after counting it in ``_skipped``) when malformed."""
