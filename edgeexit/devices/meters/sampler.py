"""The background power sampler the sampled meters (and the throttle monitor) share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

Clock = Callable[[], float]
T = TypeVar("T")


class PeriodicSampler(Generic[T]):
    """Calls ``read()`` at start, every ``interval_s`` in a thread, and at stop; keeps ``(t, value)``.

    ``read`` returns ``None`` (or raises) when a sample is unusable; such samples are
    dropped and counted in ``dropped``, with the first error kept in ``first_error``.
    The thread is always joined by ``stop()``.

    Example:
        >>> sampler = PeriodicSampler(lambda: 5.0, interval_s=0.005)
        >>> sampler.start()
        >>> samples = sampler.stop()
        >>> len(samples) >= 2
        True
    """

    def __init__(self, read: Callable[[], T | None], interval_s: float, clock: Clock | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"sampling interval must be > 0 s, got {interval_s}")
        self.interval_s = float(interval_s)
        self._read = read
        self._clock = clock or time.monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[tuple[float, T]] = []
        self.dropped = 0
        self.first_error = ""

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        self.samples, self.dropped, self.first_error = [], 0, ""
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="edgeexit-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, T]]:
        if self._thread is None:
            raise RuntimeError("the sampler is not running")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        return list(self.samples)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        t = self._clock()
        try:
            value = self._read()
        except Exception as exc:  # a sensor hiccup drops one sample; it must not kill the thread
            value = None
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
        if value is None:
            self.dropped += 1
        else:
            self.samples.append((t, value))
