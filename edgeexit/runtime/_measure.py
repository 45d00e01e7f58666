"""``ExitSession.measure()``: latency and energy of the calls made inside a ``with`` block."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Measurement:
    """Filled in when the ``with sess.measure() as m:`` block ends.

    Attributes:
        latency_ms: wall time of the whole block.
        inference_ms: time spent inside ``ExitSession.run`` calls.
        calls: ``run`` calls made in the block; ``samples``: samples they held.
        energy_j: energy of the block from the meter (see ``energy_kind``: ``measured`` or
            ``estimated``), after idle subtraction when the meter did one.
        energy_source, energy_note: where the energy figure comes from, and how it was made.
    """

    latency_ms: float = math.nan
    inference_ms: float = 0.0
    calls: int = 0
    samples: int = 0
    energy_j: float = math.nan
    energy_kind: str = ""
    energy_source: str = ""
    energy_note: str = ""

    def record(self, samples: int, ms: float) -> None:
        self.calls += 1
        self.samples += samples
        self.inference_ms += ms

    @property
    def energy_per_inference_j(self) -> float:
        return self.energy_j / self.samples if self.samples else math.nan

    @property
    def mean_call_ms(self) -> float:
        return self.inference_ms / self.calls if self.calls else math.nan
