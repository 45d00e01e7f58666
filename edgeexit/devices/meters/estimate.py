"""The estimate meter: energy from a power model's busy and idle watts, always labelled estimated."""

from __future__ import annotations

import math
from typing import Any

from .base import EnergyMeter, EnergyReading
from .registry import register_meter
from .sampler import Clock


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
