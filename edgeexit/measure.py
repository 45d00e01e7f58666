"""Latency statistics (numpy only): percentiles, mean and throughput from ns samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Latency over calls in milliseconds; ``throughput`` in samples per second."""

    calls: int
    batch: int
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    throughput: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int] | np.ndarray, batch: int = 1) -> LatencyStats:
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if ms.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        mean = float(ms.mean())
        return cls(int(ms.size), batch, float(p50), float(p90), float(p95), float(p99), mean,
                   batch * 1000.0 / mean)
