"""Raspberry Pi 5 power from the PMIC rails of ``vcgencmd pmic_read_adc``, and the parser of its output."""

from __future__ import annotations

import math
import re
import subprocess

from .base import CommandRunner, _run_command, _SampledMeter
from .registry import register_meter
from .sampler import Clock

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
