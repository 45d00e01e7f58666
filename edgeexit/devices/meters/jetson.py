"""NVIDIA Jetson power from the INA3221 rail monitors in sysfs, and the rail discovery it needs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .base import EnergyMeterError, _read_number, _root_only, _SampledMeter
from .registry import register_meter
from .sampler import Clock

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
