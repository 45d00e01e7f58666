"""Stress: threads sharing one session, memory over a million calls, threads and CPU left after.

Not in the default run (marker ``stress``); run with

    python -m pytest -m stress tests/stress -s        # about 2 minutes on 2 cores; prints its figures
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MANIFEST, write_tiny_sources

from edgeexit.package import write_package
from edgeexit.runtime import ExitSession

pytestmark = pytest.mark.stress
X = np.random.default_rng(0).standard_normal((10_000, 4)).astype(np.float32) * 3


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stress")
    return write_package(folder / "tiny.eexit", copy.deepcopy(TINY_MANIFEST), write_tiny_sources(folder / "src"))


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _threads() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_eight_threads_times_ten_thousand_calls_are_bit_identical_to_serial(package):
    sess = ExitSession(package)
    serial = [sess.run(X[i:i + 1]) for i in range(len(X))]

    def worker(offset: int) -> list[tuple[int, bytes, int]]:
        order = np.roll(np.arange(len(X)), offset * 1250)       # each thread its own order
        return [(int(i), sess.run(X[i:i + 1]).logits.tobytes(), int(sess.run(X[i:i + 1]).exit_index[0]))
                for i in order]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    seconds = time.perf_counter() - start
    for per_thread in results:
        for i, logits, exit_index in per_thread:
            assert logits == serial[i].logits.tobytes() and exit_index == int(serial[i].exit_index[0])
    print(f"\n8 threads x 10,000 samples (2 calls each): {seconds:.1f} s, every result bit-identical to serial")


def test_memory_is_flat_over_a_million_batch_1_calls(package):
    sess = ExitSession(package)
    samples = [X[i:i + 1] for i in range(1000)]
    for x in samples:            # warm up allocators and caches
        sess.run(x)
    marks = []
    calls = 0
    start = time.perf_counter()
    for _ in range(10):
        for _ in range(100):
            for x in samples:
                sess.run(x)
        calls += 100_000
        marks.append((calls, _rss_kb()))
    seconds = time.perf_counter() - start
    counts, rss = np.array(marks, dtype=float).T
    slope = np.polyfit(counts, rss, 1)[0] * 100_000          # KiB per 100k calls
    print(f"\n1,000,000 batch-1 calls in {seconds:.0f} s; RSS {rss[0]:.0f} -> {rss[-1]:.0f} KiB, "
          f"slope {slope:+.1f} KiB per 100k calls")
    assert slope < 64, f"RSS grows {slope:.1f} KiB per 100k calls: {marks}"


def test_no_threads_and_no_cpu_left_running_after_the_last_call(package):
    before = _threads()
    sess = ExitSession(package)
    for i in range(2000):
        sess.run(X[i:i + 1])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: sess.run(X[i:i + 8]), range(0, 4000, 8)))
    time.sleep(0.2)
    after = _threads()
    cpu0 = sum(os.times()[:2])
    time.sleep(2.0)
    idle_cpu = sum(os.times()[:2]) - cpu0
    print(f"\nthreads: {before} before the session, {after} after its last call; CPU used in 2 s idle: "
          f"{idle_cpu * 1000:.0f} ms")
    assert after <= before + 1, f"{after - before} threads left running"   # one intra-op thread per session
    assert idle_cpu < 0.05, f"{idle_cpu:.3f} s of CPU while idle: a spinning thread"
    sess.close()
