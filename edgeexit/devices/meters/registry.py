"""The energy meter registry: register, list, look up, build and probe meters by name; measure idle power."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..._names import did_you_mean
from .base import EnergyMeter, EnergyMeterError, UnknownMeterError

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
