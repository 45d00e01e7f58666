"""Throttling checks for a benchmark window: Linux thermal zones and the Pi's ``get_throttled``.

A run on a device that throttled measures the throttled clock, not the model, so the
benchmark flags it.  ``ThrottleMonitor`` reads the thermal zones (and, on a Raspberry
Pi, ``vcgencmd get_throttled``) at start, optionally every ``interval_s``, and at stop::

    >>> from edgeexit.devices.thermal import ThrottleMonitor
    >>> with ThrottleMonitor(interval_s=None) as monitor:
    ...     pass  # run the benchmark here
    >>> monitor.report.throttled
    False

Standard library only, plus the sampler from ``energy``; never torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .meters.base import CommandRunner, _read_number, _run_command
from .meters.sampler import Clock, PeriodicSampler

# Bits of ``vcgencmd get_throttled`` (Raspberry Pi firmware documentation).
THROTTLE_BITS: dict[int, str] = {
    0: "under-voltage detected",
    1: "arm frequency capped",
    2: "currently throttled",
    3: "soft temperature limit active",
    16: "under-voltage has occurred",
    17: "arm frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
NOW_BITS = (0, 1, 2, 3)
OCCURRED_BITS = (16, 17, 18, 19)
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")
_ZONE = re.compile(r"^thermal_zone(\d+)$")
_TRIP_TYPE = re.compile(r"^trip_point_(\d+)_type$")


def decode_throttled(value: int) -> list[str]:
    """The conditions set in a ``get_throttled`` value, lowest bit first.

    Example:
        >>> decode_throttled(0x50005)
        ['under-voltage detected', 'currently throttled', 'under-voltage has occurred', 'throttling has occurred']
    """
    if value < 0:
        raise ValueError(f"get_throttled values are unsigned, got {value}")
    return [THROTTLE_BITS.get(bit, f"unknown bit {bit}") for bit in range(value.bit_length()) if value >> bit & 1]


def parse_throttled(text: str) -> int | None:
    """The value in ``vcgencmd get_throttled`` output (``throttled=0x50005``), or None if absent."""
    m = _THROTTLED.search(text)
    return int(m[1], 0) if m else None


@dataclass(frozen=True)
class ThermalReport:
    """What happened to the device's clocks during a window.

    Attributes:
        throttled: True when a ``get_throttled`` condition was active or newly occurred in
            the window, or a thermal zone reached its passive trip point.
        reasons: one line per cause.
        max_temp_c: hottest zone reading seen in the window; None without thermal zones.
        zones: per zone: ``type``, ``start_c``, ``stop_c``, ``max_c``, ``passive_trip_c``.
        get_throttled: the ``(start, stop)`` values, None off a Raspberry Pi.
        note: what was checked; says so when nothing could be.
    """

    throttled: bool
    reasons: list[str]
    max_temp_c: float | None
    zones: dict[str, dict[str, Any]] = field(default_factory=dict)
    get_throttled: tuple[int, int] | None = None
    note: str = ""


@dataclass(frozen=True)
class _Zone:
    name: str
    type: str
    temp: Path
    passive_trip_c: float | None


def _zones(root: Path) -> list[_Zone]:
    found = []
    for path in root.glob("thermal_zone*"):
        m = _ZONE.match(path.name)
        if not m or not (path / "temp").exists():
            continue
        try:
            kind = (path / "type").read_text().strip()
        except OSError:
            kind = "unknown"
        trips = []
        for trip in path.glob("trip_point_*_type"):
            t = _TRIP_TYPE.match(trip.name)
            try:
                if t and trip.read_text().strip() == "passive":
                    trips.append(_read_number(path / f"trip_point_{t[1]}_temp") / 1000.0)
            except (OSError, ValueError):
                continue
        found.append((int(m[1]), _Zone(path.name, kind, path / "temp", min(trips) if trips else None)))
    return [zone for _, zone in sorted(found, key=lambda item: item[0])]


class ThrottleMonitor:
    """Watches for throttling between ``start()`` and ``stop()`` → ``ThermalReport``.

    Args:
        root: the thermal class folder (``/sys/class/thermal``).
        run_command: ``argv -> stdout`` runner for ``vcgencmd get_throttled``; by default
            the real command, skipped where ``vcgencmd`` is not installed.
        interval_s: also sample the zones this often in a thread (None: start and stop only).
        clock: time source for the samples.
    """

    COMMAND = ("vcgencmd", "get_throttled")

    def __init__(
        self,
        root: str | Path = "/sys/class/thermal",
        *,
        run_command: CommandRunner | None = None,
        interval_s: float | None = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        self.report: ThermalReport | None = None
        self._run = run_command
        self._clock = clock
        self._sampler: PeriodicSampler[dict[str, float]] | None = None
        self._zones: list[_Zone] = []
        self._temps: list[dict[str, float]] = []
        self._throttled_start: int | None = None
        self._start_problem = ""
        self._running = False

    def _read_temps(self) -> dict[str, float]:
        temps = {}
        for zone in self._zones:
            try:
                temps[zone.name] = _read_number(zone.temp) / 1000.0
            except (OSError, ValueError):
                continue  # a zone that cannot be read now is just not in this sample
        return temps

    def _get_throttled(self) -> tuple[int | None, str]:
        if self._run is None and shutil.which(self.COMMAND[0]) is None:
            return None, ""
        try:
            out = (self._run or _run_command)(self.COMMAND)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"`{' '.join(self.COMMAND)}` failed: {exc}"
        value = parse_throttled(out)
        return value, "" if value is not None else f"`{' '.join(self.COMMAND)}` printed no throttled=0x...: {out!r}"

    def start(self) -> None:
        if self._running:
            raise RuntimeError("ThrottleMonitor.start() called twice; stop() first")
        self._zones = _zones(self.root) if self.root.is_dir() else []
        self._throttled_start, self._start_problem = self._get_throttled()
        if self.interval_s is None or not self._zones:
            self._temps = [self._read_temps()]
        else:
            self._sampler = PeriodicSampler(self._read_temps, self.interval_s, self._clock)
            self._sampler.start()
        self._running = True

    def stop(self) -> ThermalReport:
        if not self._running:
            raise RuntimeError("ThrottleMonitor.stop() called before start()")
        self._running = False
        if self._sampler is not None:
            self._temps = [temps for _, temps in self._sampler.stop()]
            self._sampler = None
        else:
            self._temps.append(self._read_temps())
        throttled_stop, stop_problem = self._get_throttled()
        reasons: list[str] = []
        notes: list[str] = []

        zones: dict[str, dict[str, Any]] = {}
        for zone in self._zones:
            seen = [temps[zone.name] for temps in self._temps if zone.name in temps]
            zones[zone.name] = {
                "type": zone.type,
                "start_c": self._temps[0].get(zone.name),
                "stop_c": self._temps[-1].get(zone.name),
                "max_c": max(seen) if seen else None,
                "passive_trip_c": zone.passive_trip_c,
            }
            if seen and zone.passive_trip_c is not None and max(seen) >= zone.passive_trip_c:
                reasons.append(
                    f"{zone.name} ({zone.type}) reached {max(seen):.1f} °C, at or above its passive trip point "
                    f"{zone.passive_trip_c:.1f} °C"
                )
        all_max = [z["max_c"] for z in zones.values() if z["max_c"] is not None]
        if zones:
            notes.append(f"{len(zones)} thermal zone(s) under {self.root}")

        pair = None
        if self._throttled_start is not None and throttled_stop is not None:
            pair = (self._throttled_start, throttled_stop)
            reasons += _throttle_reasons(*pair)
            notes.append(f"`{' '.join(self.COMMAND)}` {pair[0]:#x} → {pair[1]:#x}")
            before = self._throttled_start & _mask(OCCURRED_BITS)
            if before:
                notes.append(f"already set before the window (since boot): {', '.join(decode_throttled(before))}")
        notes += [p for p in (self._start_problem, stop_problem) if p]
        if not zones and pair is None:
            notes.append(f"no thermal zone under {self.root} and no vcgencmd: throttling could not be checked")
        self.report = ThermalReport(
            throttled=bool(reasons), reasons=reasons, max_temp_c=max(all_max) if all_max else None,
            zones=zones, get_throttled=pair, note="; ".join(notes),
        )
        return self.report

    def __enter__(self) -> ThrottleMonitor:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.stop()
            return
        self._running = False  # keep the original exception; just join the thread
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None


def _mask(bits: Sequence[int]) -> int:
    return sum(1 << b for b in bits)


def _throttle_reasons(start: int, stop: int) -> list[str]:
    """Conditions active at either end of the window, or newly occurred during it."""
    reasons = []
    for bit in NOW_BITS:
        at = [name for name, value in (("start", start), ("stop", stop)) if value >> bit & 1]
        if at:
            reasons.append(f"vcgencmd: {THROTTLE_BITS[bit]} (at {' and '.join(at)})")
    for bit in OCCURRED_BITS:
        if stop >> bit & 1 and not start >> bit & 1:
            reasons.append(f"vcgencmd: {THROTTLE_BITS[bit]} during the window")
    return reasons
