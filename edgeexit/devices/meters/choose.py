"""Choosing an energy meter for a device profile: the first readable one, else the estimate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..profiles import DeviceProfile
from .base import EnergyMeter
from .estimate import EstimateMeter
from .registry import create_meter, get_meter


def meter_for_profile(
    profile: DeviceProfile, options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[EnergyMeter, list[str]]:
    """The first meter of ``profile.energy_meters`` that can be read here, and why the others
    were skipped; the profile's power estimate when none can (always labelled estimated)."""
    options = options or {}
    skipped: list[str] = []
    for name in profile.energy_meters[:-1]:
        opts = dict(options.get(name, {}))
        try:
            ok, why = get_meter(name).detect(**opts)
        except (TypeError, ValueError) as exc:  # e.g. the external meter without a log or command
            ok, why = False, f"{name}: not configured ({exc})"
        if ok:
            return create_meter(name, **opts), skipped
        skipped.append(why)
    power = profile.power
    return EstimateMeter(power.busy_watts, power.idle_watts, source=f"profile {profile.name}: {power.source}"), skipped
