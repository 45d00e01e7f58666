"""Intel/AMD CPU package energy from the Linux powercap RAPL counters."""

from __future__ import annotations

import re
from pathlib import Path

from .base import EnergyMeter, EnergyMeterError, _root_only
from .registry import register_meter
from .sampler import Clock

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
