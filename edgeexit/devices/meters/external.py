"""External meters (a USB power meter, a lab supply): a ``timestamp,watts`` CSV log or a command."""

from __future__ import annotations

import csv
import math
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import CommandRunner, EnergyMeterError, _run_command, _SampledMeter, integrate_power
from .registry import register_meter
from .sampler import Clock


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
