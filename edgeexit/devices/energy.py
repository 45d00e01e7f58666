"""Energy meters: one interface over RAPL, NVML, Jetson rails, the Pi 5 PMIC, external meters and estimates.

Every meter is started before the work and stopped after it; ``stop()`` returns an
``EnergyReading`` that says how many joules, over how many seconds, whether they were
``measured`` or ``estimated`` and where they came from.  Counters (RAPL, NVML's total
energy) are read twice; power sensors (Jetson INA3221, Pi 5 PMIC, an external command)
are sampled in a background thread and integrated with the trapezoid rule.

Meters are registered by name::

    >>> from edgeexit.devices.energy import create_meter
    >>> meter = create_meter("estimate", busy_watts=6.0, idle_watts=2.5, source="rpi5 profile")
    >>> with meter:
    ...     pass  # run the inferences here
    >>> meter.reading.kind
    'estimated'

This module imports numpy and the standard library only; ``pynvml`` (nvidia-ml-py) is
imported inside the NVML meter when it is used.
"""

from __future__ import annotations

import abc
import csv
import math
import re
import shlex
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from .._names import did_you_mean
from ..errors import EdgeExitError

Clock = Callable[[], float]
CommandRunner = Callable[[Sequence[str]], str]
KINDS = ("measured", "estimated")
T = TypeVar("T")


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


# --- integration and sampling -------------------------------------------------------


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


class PeriodicSampler(Generic[T]):
    """Calls ``read()`` at start, every ``interval_s`` in a thread, and at stop; keeps ``(t, value)``.

    ``read`` returns ``None`` (or raises) when a sample is unusable; such samples are
    dropped and counted in ``dropped``, with the first error kept in ``first_error``.
    The thread is always joined by ``stop()``.

    Example:
        >>> sampler = PeriodicSampler(lambda: 5.0, interval_s=0.005)
        >>> sampler.start()
        >>> samples = sampler.stop()
        >>> len(samples) >= 2
        True
    """

    def __init__(self, read: Callable[[], T | None], interval_s: float, clock: Clock | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"sampling interval must be > 0 s, got {interval_s}")
        self.interval_s = float(interval_s)
        self._read = read
        self._clock = clock or time.monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[tuple[float, T]] = []
        self.dropped = 0
        self.first_error = ""

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        self.samples, self.dropped, self.first_error = [], 0, ""
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="edgeexit-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, T]]:
        if self._thread is None:
            raise RuntimeError("the sampler is not running")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        return list(self.samples)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        t = self._clock()
        try:
            value = self._read()
        except Exception as exc:  # a sensor hiccup drops one sample; it must not kill the thread
            value = None
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
        if value is None:
            self.dropped += 1
        else:
            self.samples.append((t, value))


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


# --- registry -----------------------------------------------------------------------

_REGISTRY: dict[str, type[EnergyMeter]] = {}
M = TypeVar("M", bound=type[EnergyMeter])


def register_meter(cls: M) -> M:
    """Register a meter class under ``cls.name``; refuses to overwrite an existing name."""
    if not cls.name:
        raise EnergyMeterError(f"{cls.__name__} has no registry name; set the class attribute `name`")
    if cls.name in _REGISTRY:
        raise EnergyMeterError(f"an energy meter named {cls.name!r} is already registered; pick another name")
    _REGISTRY[cls.name] = cls
    return cls


def list_meters() -> list[str]:
    """Names of every registered energy meter, sorted."""
    return sorted(_REGISTRY)


def get_meter(name: str) -> type[EnergyMeter]:
    """The meter class registered as ``name``; a typed error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMeterError(
            f"unknown energy meter {name!r}; registered meters: {', '.join(list_meters())}."
            + did_you_mean(name, _REGISTRY)
        ) from None


def create_meter(name: str, **options: Any) -> EnergyMeter:
    """A meter of the registered class ``name`` built with ``options``."""
    return get_meter(name)(**options)


def detect_meters(options: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, bool, str]]:
    """``(name, readable, reason)`` for every registered meter, probed at its default locations.

    Args:
        options: constructor options per meter name, to probe other locations
            (``{"rapl": {"root": "/tmp/fake"}}``).

    Example:
        >>> [name for name, ok, why in detect_meters()][:2]
        ['estimate', 'external']
    """
    options = dict(options or {})
    for name in options:
        get_meter(name)  # a misspelt name fails loudly instead of probing the default
    found = []
    for name in list_meters():
        try:
            ok, why = _REGISTRY[name].detect(**dict(options.get(name, {})))
        except Exception as exc:  # one broken probe must not hide the other meters
            ok, why = False, f"{type(exc).__name__}: {exc}"
        found.append((name, ok, why))
    return found


def measure_idle(meter: EnergyMeter, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> float:
    """Mean watts over a quiet window of ``seconds``; run it with nothing else working.

    Pass the result as ``idle_watts=`` to a whole-board meter so its readings count the
    work only.  Any idle subtraction configured on ``meter`` is undone here.
    """
    if not seconds > 0:
        raise ValueError(f"the idle window must be > 0 s, got {seconds}")
    meter.start()
    sleep(seconds)
    reading = meter.stop()
    if reading.seconds <= 0:
        raise EnergyMeterError(f"{meter.name}: the idle window measured {reading.seconds} s; make it longer")
    return (reading.joules + reading.idle_subtracted_j) / reading.seconds


# --- RAPL -------------------------------------------------------------------------

_RAPL_PACKAGE = re.compile(r"^intel-rapl:(\d+)$")


@register_meter
class RaplMeter(EnergyMeter):
    """CPU package energy from Linux powercap RAPL (Intel, and AMD since Linux 5.8).

    Reads ``<root>/intel-rapl:N/energy_uj`` of every package domain (not the
    ``intel-rapl:N:M`` subzones, which the package already counts) at start and stop,
    adding ``max_energy_range_uj`` when a counter wrapped.  One wrap per window is
    detectable; the range is hundreds of kJ, i.e. tens of minutes at full load.
    The package excludes DRAM and the rest of the board, so no idle subtraction.
    """

    name = "rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap", *, clock: Clock | None = None) -> None:
        self.root = Path(root)
        self._pattern = f"{self.root}/intel-rapl:*/energy_uj"
        super().__init__(source=self._pattern, interval_s=0.001, clock=clock)

    def _domains(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.root.iterdir() if (m := _RAPL_PACKAGE.match(p.name))]
        return [p for _, p in sorted(found) if (p / "energy_uj").exists()]

    def _read(self, path: Path) -> int:
        try:
            return int(path.read_text().strip())
        except PermissionError:
            raise EnergyMeterError(f"rapl: {_root_only(path, self._pattern)}") from None
        except (OSError, ValueError) as exc:
            raise EnergyMeterError(f"rapl: cannot read a counter from {path}: {exc}") from None

    def _names(self, domains: list[Path]) -> str:
        names = []
        for d in domains:
            try:
                names.append(f"{d.name} ({(d / 'name').read_text().strip()})")
            except OSError:
                names.append(d.name)
        return ", ".join(names)

    def available(self) -> tuple[bool, str]:
        domains = self._domains()
        if not domains:
            return False, (
                f"rapl: no RAPL package domain under {self.root} (expected intel-rapl:N/energy_uj); needs an Intel "
                "or AMD CPU with the intel_rapl powercap driver, and not a VM that hides it"
            )
        try:
            for d in domains:
                self._read(d / "energy_uj")
                self._read(d / "max_energy_range_uj")
        except EnergyMeterError as exc:
            return False, str(exc)
        return True, f"{len(domains)} package domain(s): {self._names(domains)}"

    def _begin(self) -> None:
        self._domains_used = self._domains()
        if not self._domains_used:
            raise EnergyMeterError(self.available()[1])
        self._max = [self._read(d / "max_energy_range_uj") for d in self._domains_used]
        self._start_uj = [self._read(d / "energy_uj") for d in self._domains_used]
        self._t0 = self._clock()

    def _finish(self) -> tuple[float, float, int, list[str]]:
        end = [self._read(d / "energy_uj") for d in self._domains_used]
        seconds = self._clock() - self._t0
        total, wrapped = 0, 0
        for start_uj, end_uj, max_uj in zip(self._start_uj, end, self._max):
            if end_uj < start_uj:
                wrapped += 1
                end_uj += max_uj
            total += end_uj - start_uj
        notes = [f"sum of {len(end)} package domain(s): {self._names(self._domains_used)} (CPU package only)"]
        if wrapped:
            notes.append(f"counter wrapped in {wrapped} domain(s); max_energy_range_uj added")
        return total / 1e6, seconds, 2 * len(end), notes


# --- NVML -------------------------------------------------------------------------


@register_meter
class NvmlMeter(EnergyMeter):
    """GPU energy from NVML: the total-energy counter (Volta and newer), else sampled power.

    ``nvmlDeviceGetTotalEnergyConsumption`` (mJ) updates every 20–100 ms, so windows
    should last seconds.  Where it is not supported, ``nvmlDeviceGetPowerUsage`` (mW) is
    sampled every ``interval_s`` and integrated.  Needs ``pip install nvidia-ml-py``;
    ``nvml=`` takes any object with the same functions (another binding, or a test fake).
    """

    name = "nvml"
    _COUNTER_PERIOD_S = 0.1

    def __init__(
        self, device_index: int = 0, *, nvml: Any = None, interval_s: float = 0.02, clock: Clock | None = None
    ) -> None:
        super().__init__(source=f"NVML GPU {device_index}", interval_s=interval_s, clock=clock)
        self.device_index = device_index
        self._nvml = nvml
        self._sample_interval_s = float(interval_s)
        self._handle: Any = None
        self._sampler: PeriodicSampler[float] | None = None

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml  # optional: nvidia-ml-py
            except ImportError:
                raise EnergyMeterError(
                    "nvml: the NVML binding is not installed; `pip install nvidia-ml-py` (needs an NVIDIA driver)"
                ) from None
            self._nvml = pynvml
        return self._nvml

    def _errors(self, nvml: Any) -> tuple[type[BaseException], ...]:
        return (getattr(nvml, "NVMLError", OSError), AttributeError)

    def _open(self) -> tuple[Any, str]:
        """Init NVML and get the device; returns the handle and its description."""
        nvml = self._module()
        errors = self._errors(nvml)
        try:
            nvml.nvmlInit()
        except errors as exc:
            raise EnergyMeterError(f"nvml: cannot initialise NVML ({exc}); is the NVIDIA driver loaded?") from None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            gpu = nvml.nvmlDeviceGetName(handle)
        except errors as exc:
            nvml.nvmlShutdown()
            raise EnergyMeterError(f"nvml: no GPU at index {self.device_index} ({exc})") from None
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        return handle, f"NVML GPU {self.device_index} ({gpu})"

    def _counter_mj(self, handle: Any) -> int | None:
        nvml = self._module()
        try:
            return int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self._errors(nvml):
            return None

    def available(self) -> tuple[bool, str]:
        try:
            handle, what = self._open()
        except EnergyMeterError as exc:
            return False, str(exc)
        nvml = self._module()
        try:
            if self._counter_mj(handle) is not None:
                return True, f"{what}: total-energy counter"
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except self._errors(nvml) as exc:
                return False, f"nvml: {what} reports neither total energy nor power usage ({exc})"
            return True, f"{what}: power usage sampled (no total-energy counter on this GPU)"
        finally:
            nvml.nvmlShutdown()

    def _read_watts(self) -> float:
        return self._module().nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _begin(self) -> None:
        self._handle, what = self._open()
        self._start_mj = self._counter_mj(self._handle)
        if self._start_mj is not None:
            self.source = f"{what} nvmlDeviceGetTotalEnergyConsumption"
            self.interval_s = self._COUNTER_PERIOD_S
            self._t0 = self._clock()
            return
        self.source = f"{what} nvmlDeviceGetPowerUsage"
        self.interval_s = self._sample_interval_s
        self._sampler = PeriodicSampler(self._read_watts, self.interval_s, self._clock)
        self._sampler.start()
        if not self._sampler.samples:
            why = self._sampler.first_error
            self._abort()
            raise EnergyMeterError(f"nvml: cannot read power usage from {what} ({why})")

    def _finish(self) -> tuple[float, float, int, list[str]]:
        try:
            if self._sampler is None:
                end_mj = self._counter_mj(self._handle)
                seconds = self._clock() - self._t0
                if end_mj is None or self._start_mj is None or end_mj < self._start_mj:
                    raise EnergyMeterError(f"nvml: the total-energy counter of {self.source} failed or went back")
                note = "total-energy counter (mJ), updated every 20–100 ms: windows under ~10 s are coarse"
                return (end_mj - self._start_mj) / 1000.0, seconds, 2, [note, "GPU only"]
            joules, seconds, samples, notes = self._integrate(self._sampler)
            fallback = "total-energy counter not supported, power usage sampled (NVML may average it over 1 s)"
            return joules, seconds, samples, [fallback, *notes, "GPU only"]
        finally:
            self._sampler = None
            self._module().nvmlShutdown()

    def _abort(self) -> None:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        self._sampler = None
        self._module().nvmlShutdown()


# --- Jetson INA3221 -------------------------------------------------------------------

# (file-name pattern, role); a channel is usable with a power file or a voltage and a current file.
_JETSON_FILES = (
    (re.compile(r"^in_power(\d+)_input$"), "power"),  # mW (iio schemes)
    (re.compile(r"^in_voltage(\d+)_input$"), "voltage"),  # mV
    (re.compile(r"^in_current(\d+)_input$"), "current"),  # mA
    (re.compile(r"^in(\d+)_input$"), "voltage"),  # mV (hwmon scheme, JetPack 5+)
    (re.compile(r"^curr(\d+)_input$"), "current"),  # mA
)
_JETSON_LABELS = ("in_power{n}_label", "rail_name_{n}", "in{n}_label")
_JETSON_TOTALS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class _Rail:
    label: str
    files: dict[str, Path]

    def watts(self) -> float:
        if "power" in self.files:
            return _read_number(self.files["power"]) / 1e3
        return _read_number(self.files["voltage"]) * _read_number(self.files["current"]) / 1e6

    def where(self) -> str:
        if "power" in self.files:
            return str(self.files["power"])
        return f"{self.files['voltage']} × {self.files['current'].name}"


def _jetson_rails(root: Path) -> list[_Rail]:
    """Every labelled INA3221 channel under ``root`` (the i2c drivers folder), first label wins."""
    folders: list[Path] = []
    for pattern in ("ina3221*/*", "ina3221*/*/iio:device*", "ina3221*/*/hwmon/hwmon*"):
        folders += [p for p in sorted(root.glob(pattern)) if p.is_dir()]
    rails: dict[str, _Rail] = {}
    for folder in folders:
        channels: dict[int, dict[str, Path]] = {}
        for f in sorted(folder.iterdir()):
            for rx, role in _JETSON_FILES:
                if m := rx.match(f.name):
                    channels.setdefault(int(m[1]), {}).setdefault(role, f)
        for n, files in sorted(channels.items()):
            if "power" not in files and not ("voltage" in files and "current" in files):
                continue
            label = ""
            for name in _JETSON_LABELS:
                try:
                    label = (folder / name.format(n=n)).read_text().strip()
                except OSError:
                    continue
                if label:
                    break
            if label.upper() == "NC":  # not connected
                continue
            label = label or f"{folder.relative_to(root)}/channel{n}"
            rails.setdefault(label, _Rail(label, files))  # the same chip seen twice is counted once
    return list(rails.values())


@register_meter
class JetsonMeter(_SampledMeter):
    """NVIDIA Jetson power from the INA3221 rail monitors, sampled and integrated.

    Reads ``in_powerN_input`` (mW), or ``in_voltageN_input`` (mV) × ``in_currentN_input``
    (mA), or the hwmon ``inN_input`` × ``currN_input``, labelled by ``in_powerN_label``,
    ``rail_name_N`` or ``inN_label``, under ``<root>/ina3221*/``.  Uses the board's input
    rail (``VDD_IN`` / ``POM_5V_IN``) when there is one, else the sum of all rails.
    Either way it includes the board's idle power: pass ``idle_watts=`` to subtract it.
    """

    name = "jetson"
    whole_board = True

    def __init__(
        self,
        root: str | Path = "/sys/bus/i2c/drivers",
        *,
        interval_s: float = 0.05,
        idle_watts: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.root = Path(root)
        super().__init__(source=f"INA3221 rails under {self.root}", interval_s=interval_s, clock=clock,
                         idle_watts=idle_watts)
        self._rails: list[_Rail] = []

    def _choose(self) -> tuple[list[_Rail], str]:
        rails = _jetson_rails(self.root)
        if not rails:
            if not any(self.root.glob("ina3221*")):
                raise EnergyMeterError(
                    f"jetson: no INA3221 driver under {self.root} (not a Jetson, or the ina3221 driver is not loaded)"
                )
            raise EnergyMeterError(
                f"jetson: the INA3221 driver under {self.root} exposes no rail (in_powerN_input, "
                "in_voltageN_input + in_currentN_input, or inN_input + currN_input)"
            )
        for rail in rails:
            if any(total in rail.label.upper() for total in _JETSON_TOTALS):
                return [rail], f"total input rail {rail.label}"
        labels = ", ".join(r.label for r in rails)
        return rails, f"sum of rails {labels} (no VDD_IN / POM_5V_IN total rail found)"

    def available(self) -> tuple[bool, str]:
        try:
            rails, how = self._choose()
        except EnergyMeterError as exc:
            return False, str(exc)
        for rail in rails:
            try:
                rail.watts()
            except PermissionError as exc:
                return False, f"jetson: {_root_only(Path(exc.filename), f'{self.root}/ina3221*/*/*_input')}"
            except (OSError, ValueError) as exc:
                return False, f"jetson: rail {rail.label} ({rail.where()}) is not readable: {exc}"
        return True, how

    def _read_watts(self) -> float | None:
        try:
            return sum(rail.watts() for rail in self._rails)
        except (OSError, ValueError):
            self._skipped += 1
            return None

    def _begin(self) -> None:
        self._rails, self._how = self._choose()
        self.source = (
            f"INA3221 {self._rails[0].label} ({self._rails[0].where()})" if len(self._rails) == 1
            else f"INA3221 rails under {self.root}"
        )
        super()._begin()

    def _finish(self) -> tuple[float, float, int, list[str]]:
        joules, seconds, samples, notes = super()._finish()
        return joules, seconds, samples, [self._how, *notes]


# --- Raspberry Pi 5 PMIC ----------------------------------------------------------------

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>\S+?)(?P=unit)\s*$")


def parse_pmic_adc(text: str) -> tuple[dict[str, float], int]:
    """Watts per rail from ``vcgencmd pmic_read_adc`` output, and the count of malformed lines.

    Pairs ``X_A current(n)=...A`` with ``X_V volt(m)=...V`` by rail name; a rail with only
    one of the two (``EXT5V_V``, ``BATT_V``) is not a malformed line, it is just unpaired.

    Example:
        >>> parse_pmic_adc("VDD_CORE_A current(0)=2.0A\\nVDD_CORE_V volt(8)=0.9V\\n")
        ({'VDD_CORE': 1.8}, 0)
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _PMIC_LINE.match(line)
        try:
            if m is None:
                raise ValueError(line)
            value = float(m["value"])
            if not math.isfinite(value):
                raise ValueError(line)
        except ValueError:
            bad += 1
            continue
        (amps if m["unit"] == "A" else volts)[m["rail"]] = value
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}, bad


@register_meter
class Rpi5Meter(_SampledMeter):
    """Raspberry Pi 5 power: Σ V·I over the PMIC rails of ``vcgencmd pmic_read_adc``, sampled.

    The PMIC rails feed the SoC, memory and I/O; USB peripherals and the regulators'
    own losses are not in them, so the figure is below the wall power (an external
    meter gives that).  ``run_command=`` takes a callable ``argv -> stdout``.
    """

    name = "rpi5"
    whole_board = True
    COMMAND = ("vcgencmd", "pmic_read_adc")

    def __init__(
        self,
        *,
        run_command: CommandRunner | None = None,
        interval_s: float = 0.1,
        idle_watts: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(source=" ".join(self.COMMAND), interval_s=interval_s, clock=clock, idle_watts=idle_watts)
        self._run = run_command or _run_command
        self._rails: frozenset[str] = frozenset()

    def _parse(self) -> dict[str, float]:
        rails, bad = parse_pmic_adc(self._run(self.COMMAND))
        self._skipped += bad
        return rails

    def available(self) -> tuple[bool, str]:
        try:
            rails, _ = parse_pmic_adc(self._run(self.COMMAND))
        except FileNotFoundError:
            return False, "rpi5: vcgencmd not found (not a Raspberry Pi OS, or install raspi-utils)"
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"rpi5: `{self.source}` failed: {exc} (needs a Raspberry Pi 5 with recent firmware)"
        if not rails:
            return False, f"rpi5: `{self.source}` printed no current/voltage pair (not a Raspberry Pi 5?)"
        return True, f"{len(rails)} PMIC rail(s) via `{self.source}`"

    def _read_watts(self) -> float | None:
        rails = self._parse()
        if not self._rails:  # the first sample fixes the rail set
            self._rails = frozenset(rails)
        if not rails or not self._rails <= rails.keys():
            return None  # a sample missing a rail would under-count; drop it
        return sum(rails[r] for r in self._rails)

    def _begin(self) -> None:
        self._rails = frozenset()
        super()._begin()

    def _finish(self) -> tuple[float, float, int, list[str]]:
        joules, seconds, samples, notes = super()._finish()
        return joules, seconds, samples, [f"Σ V·I over {len(self._rails)} PMIC rail(s)", *notes]


# --- external meters ------------------------------------------------------------------


def read_power_log(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """``(timestamps, watts, malformed rows)`` from a CSV log with a ``timestamp,watts`` header.

    Other columns are ignored; rows come back sorted by time.  Raises ``EnergyMeterError``
    when the file or its header is missing.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            header = [c.strip().lower() for c in next(reader, [])]
            if "timestamp" not in header or "watts" not in header:
                raise EnergyMeterError(
                    f"external: {path} needs a header with columns 'timestamp' (s) and 'watts'; found {header}"
                )
            it, iw = header.index("timestamp"), header.index("watts")
            times, watts, bad = [], [], 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                try:
                    t, w = float(row[it]), float(row[iw])
                    if not (math.isfinite(t) and math.isfinite(w)):
                        raise ValueError(row)
                except (IndexError, ValueError):
                    bad += 1
                    continue
                times.append(t)
                watts.append(w)
    except OSError as exc:
        raise EnergyMeterError(f"external: cannot read the power log {path}: {exc}") from None
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    return np.asarray(times, dtype=np.float64)[order], np.asarray(watts, dtype=np.float64)[order], bad


@register_meter
class ExternalMeter(_SampledMeter):
    """An external meter (a USB power meter, a lab supply): its CSV log or a command.

    ``csv_path=``: a log of ``timestamp`` (seconds since the epoch, this host's clock)
    and ``watts`` rows, written by another program throughout the window; ``stop()``
    integrates the rows within ``[start, stop]`` (``time.time()``), interpolating at the
    edges, and waits up to ``wait_s`` for the log to pass the end of the window.
    ``command=``: a program printing the current watts as a number, sampled every
    ``interval_s``.  Measures whatever the meter sees, normally the whole board.
    """

    name = "external"
    whole_board = True

    def __init__(
        self,
        csv_path: str | Path | None = None,
        command: str | Sequence[str] | None = None,
        *,
        run_command: CommandRunner | None = None,
        interval_s: float = 1.0,
        idle_watts: float | None = None,
        clock: Clock | None = None,
        wait_s: float = 2.0,
    ) -> None:
        if (csv_path is None) == (command is None):
            raise ValueError("external: give exactly one of csv_path= (a timestamp,watts log) or command= (watts)")
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.command = shlex.split(command) if isinstance(command, str) else list(command or [])
        self.wait_s = float(wait_s)
        self._run = run_command or _run_command
        if self.csv_path is not None:
            super().__init__(source=f"CSV power log {self.csv_path}", interval_s=math.nan,
                             clock=clock or time.time, idle_watts=idle_watts)
        else:
            super().__init__(source=f"command `{shlex.join(self.command)}`", interval_s=interval_s,
                             clock=clock, idle_watts=idle_watts)

    @classmethod
    def detect(cls, **options: Any) -> tuple[bool, str]:
        if not options:
            return False, "external: needs csv_path= (a timestamp,watts log, e.g. a USB meter's) or command= (watts)"
        return super().detect(**options)

    def _read_log(self) -> tuple[np.ndarray, np.ndarray, int]:
        assert self.csv_path is not None
        times, watts, bad = read_power_log(self.csv_path)
        if times.size >= 2:
            self.interval_s = float(np.median(np.diff(times)))
        return times, watts, bad

    def available(self) -> tuple[bool, str]:
        if self.csv_path is not None:
            try:
                times, _, _ = self._read_log()
            except EnergyMeterError as exc:
                return False, str(exc)
            return True, f"{self.source}: {times.size} row(s)"
        try:
            watts = self._read_watts()
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"external: {self.source} failed: {exc}"
        if watts is None:
            return False, f"external: {self.source} did not print a number of watts"
        return True, f"{self.source}: {watts:g} W now"

    def _read_watts(self) -> float | None:
        out = self._run(self.command)
        try:
            watts = float(out.split()[0])
            if not math.isfinite(watts):
                raise ValueError(out)
        except (IndexError, ValueError):
            self._skipped += 1
            return None
        return watts

    def _begin(self) -> None:
        if self.csv_path is None:
            super()._begin()
            return
        self._read_log()  # fail now, not after the work, when the log is missing or headless
        self._t0 = self._clock()

    def _abort(self) -> None:
        if self.csv_path is None:
            super()._abort()

    def _finish(self) -> tuple[float, float, int, list[str]]:
        if self.csv_path is None:
            return super()._finish()
        t0, t1 = self._t0, self._clock()
        deadline = time.monotonic() + self.wait_s
        while True:
            times, watts, bad = self._read_log()
            covered = times.size > 0 and times[0] <= t0 and times[-1] >= t1
            if covered or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._skipped = bad
        if not covered:
            span = f"[{times[0]:.3f}, {times[-1]:.3f}]" if times.size else "nothing"
            span += f" ({bad} malformed row(s) skipped)" if bad else ""
            raise EnergyMeterError(
                f"external: the power log {self.csv_path} covers {span} but the window is [{t0:.3f}, {t1:.3f}] "
                "(time.time()); start logging before start() and keep it running past stop(), on a synced clock"
            )
        inside = int(((times >= t0) & (times <= t1)).sum())
        note = f"{inside} log row(s) inside the window integrated (trapezoid), edges interpolated"
        return integrate_power(times, watts, t0, t1), t1 - t0, inside, [note]


# --- estimate ---------------------------------------------------------------------------


@register_meter
class EstimateMeter(EnergyMeter):
    """A power-model estimate: ``busy_watts`` while working, ``idle_watts`` otherwise.

    ``stop()`` assumes the device was busy the whole window (energy = busy_watts × wall
    seconds); ``stop(busy_seconds=s)`` (e.g. the summed inference time) gives
    busy_watts × s + idle_watts × (wall − s).  Always ``kind="estimated"``.

    Example:
        >>> meter = EstimateMeter(busy_watts=6.0, idle_watts=2.0, source="datasheet", clock=iter([0.0, 2.0]).__next__)
        >>> meter.start()
        >>> meter.stop(busy_seconds=0.5).joules
        6.0
    """

    name = "estimate"
    kind = "estimated"

    def __init__(self, busy_watts: float, idle_watts: float = 0.0, *, source: str, clock: Clock | None = None) -> None:
        if not source:
            raise ValueError("estimate: say where the busy/idle watts come from (source=)")
        for what, value in (("busy_watts", busy_watts), ("idle_watts", idle_watts)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"estimate: {what} must be finite and >= 0, got {value}")
        super().__init__(source=f"estimate from {source}", interval_s=0.0, clock=clock)
        self.busy_watts = float(busy_watts)
        self.idle_watts = float(idle_watts)
        self._busy_s: float | None = None

    @classmethod
    def detect(cls, **options: Any) -> tuple[bool, str]:
        if not options:
            return True, "estimate: always usable from a profile's busy/idle watts (kind=estimated, not a measurement)"
        return super().detect(**options)

    def available(self) -> tuple[bool, str]:
        return True, f"{self.source}: busy {self.busy_watts:g} W, idle {self.idle_watts:g} W"

    def _begin(self) -> None:
        self._busy_s = None
        self._t0 = self._clock()

    def stop(self, busy_seconds: float | None = None) -> EnergyReading:
        """The estimate; ``busy_seconds`` (≤ the window) is the time the device worked."""
        if busy_seconds is not None and not (math.isfinite(busy_seconds) and busy_seconds >= 0):
            raise ValueError(f"estimate: busy_seconds must be finite and >= 0, got {busy_seconds}")
        self._busy_s = busy_seconds
        return super().stop()

    def _finish(self) -> tuple[float, float, int, list[str]]:
        wall = self._clock() - self._t0
        if self._busy_s is None:
            note = f"busy {self.busy_watts:g} W × {wall:.3f} s wall (assumes the device was busy the whole window)"
            return self.busy_watts * wall, wall, 0, [note]
        if self._busy_s > wall + 1e-3:
            raise ValueError(f"estimate: busy_seconds {self._busy_s:.4f} exceeds the window of {wall:.4f} s")
        busy = min(self._busy_s, wall)
        joules = self.busy_watts * busy + self.idle_watts * (wall - busy)
        note = f"busy {self.busy_watts:g} W × {busy:.3f} s + idle {self.idle_watts:g} W × {wall - busy:.3f} s"
        return joules, wall, 0, [note]
