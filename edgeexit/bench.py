"""``edgeexit bench``: fixed-duration latency and energy windows on the device itself.

Each contender (the early-exit runtime, and with ``compare_full`` the same package with
every early exit disabled, or a separate full-model ONNX file) runs warm-up calls, then
``windows`` windows of ``duration_s`` seconds each, interleaved between contenders so
drift and heat hit both alike.  Per window: latency percentiles, throughput, and energy
per inference from the meter; the report gives the median over windows.  Accuracy and
exit shares come from one untimed pass over the data.  A throttle monitor watches the
whole run and marks it invalid if the device throttled.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort

from . import __version__
from .devices.meters import EnergyMeter, EnergyReading, EstimateMeter
from .devices.thermal import ThermalReport, ThrottleMonitor
from .errors import InputError
from .measure import LatencyStats
from .runtime import ExitSession

Progress = Callable[[float], None]


@dataclass(frozen=True)
class BenchConfig:
    """How long and how often to measure.  The defaults follow MLPerf's habits: windows of
    at least 10 s, several of them, the median reported, warm-up excluded."""

    batch: int = 1
    duration_s: float = 10.0
    windows: int = 3
    warmup_s: float = 2.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.windows < 1 or not self.duration_s > 0 or self.warmup_s < 0:
            raise InputError(
                f"bench needs batch >= 1, windows >= 1, duration > 0 and warm-up >= 0; got {self}"
            )


@dataclass(frozen=True)
class WindowResult:
    latency: LatencyStats
    samples: int
    energy: EnergyReading

    @property
    def energy_per_inference_j(self) -> float:
        return self.energy.joules / self.samples


@dataclass(frozen=True)
class ContenderResult:
    """Median over windows of one contender's figures."""

    name: str
    windows: tuple[WindowResult, ...]
    accuracy: float | None
    exit_shares: tuple[float, ...] | None

    def _median(self, get: Callable[[WindowResult], float]) -> float:
        return float(np.median([get(w) for w in self.windows]))

    @property
    def p50(self) -> float:
        return self._median(lambda w: w.latency.p50)

    @property
    def summary(self) -> dict[str, Any]:
        first = self.windows[0].energy
        return {
            "name": self.name,
            "calls": sum(w.latency.calls for w in self.windows),
            "p50_ms": self.p50,
            "p90_ms": self._median(lambda w: w.latency.p90),
            "p95_ms": self._median(lambda w: w.latency.p95),
            "p99_ms": self._median(lambda w: w.latency.p99),
            "mean_ms": self._median(lambda w: w.latency.mean),
            "throughput_per_s": self._median(lambda w: w.samples / w.energy.seconds if w.energy.seconds else math.nan),
            "energy_per_inference_j": self._median(lambda w: w.energy_per_inference_j),
            "energy_kind": first.kind,
            "energy_source": first.source,
            "energy_note": first.note,
            "accuracy": self.accuracy,
            "exit_shares": list(self.exit_shares) if self.exit_shares is not None else None,
        }


@dataclass(frozen=True)
class BenchReport:
    config: BenchConfig
    contenders: tuple[ContenderResult, ...]
    thermal: ThermalReport
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.thermal.throttled

    def ratios(self) -> dict[str, float] | None:
        """Full ÷ early exit for latency and energy (> 1: early exit is better)."""
        fulls = [c.summary for c in self.contenders if c.name.startswith("full model")]
        if not fulls:
            return None
        early, full = self.contenders[0].summary, fulls[0]
        return {
            "speedup_p50": full["p50_ms"] / early["p50_ms"],
            "speedup_mean": full["mean_ms"] / early["mean_ms"],
            "energy_ratio": full["energy_per_inference_j"] / early["energy_per_inference_j"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "valid": self.valid,
            "throttling": {"throttled": self.thermal.throttled, "reasons": list(self.thermal.reasons),
                           "max_temp_c": self.thermal.max_temp_c, "note": self.thermal.note},
            "contenders": [c.summary for c in self.contenders],
            "ratios": self.ratios(),
            "environment": self.environment,
        }


def split_batches(inputs: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(inputs.values())).shape[0]
    if n == 0:
        raise InputError("the benchmark data holds no samples")
    if n < batch:
        raise InputError(f"--batch {batch} is larger than the {n} samples in the data; lower it")
    starts = range(0, n - batch + 1, batch)  # whole batches only: every timed call holds `batch` samples
    return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in inputs.items()} for i in starts]


def _window(call: Callable[[dict[str, np.ndarray]], object], batches: list[dict[str, np.ndarray]], batch: int,
            duration_s: float, meter: EnergyMeter, progress: Progress | None) -> WindowResult:
    latencies = []
    meter.start()
    start = perf_counter_ns()
    end = start + int(duration_s * 1e9)
    i = 0
    now = start
    while now < end:
        t0 = perf_counter_ns()
        call(batches[i % len(batches)])
        now = perf_counter_ns()
        latencies.append(now - t0)
        i += 1
    busy_s = sum(latencies) / 1e9
    reading = meter.stop(busy_seconds=busy_s) if isinstance(meter, EstimateMeter) else meter.stop()
    if progress is not None:
        progress(duration_s)
    return WindowResult(LatencyStats.from_ns(latencies, batch), i * batch, reading)


def _warm_up(call: Callable[[dict[str, np.ndarray]], object], batches: list[dict[str, np.ndarray]],
             seconds: float) -> None:
    end = perf_counter_ns() + int(seconds * 1e9)
    i = 0
    while perf_counter_ns() < end or i == 0:
        call(batches[i % len(batches)])
        i += 1


ENGINE_LABELS = {"stages": "early exit, stage loop", "compiled": "early exit, compiled"}


def run_benchmark(
    session: ExitSession,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    config: BenchConfig,
    meter: EnergyMeter,
    *,
    compare_full: bool = False,
    full_model: str | Path | None = None,
    thermal: ThrottleMonitor | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark ``session`` (and the full model) on ``inputs``; see the module docstring.

    The full model is ``full_model`` (an ONNX file) if given, else the package's own
    ``full.onnx`` if it has one, else the package with every early exit disabled.  When
    the package has a compiled graph, the engine ``session.run`` does not take at this
    batch size is measured too (last), so both engines are reported.
    """
    batches = split_batches(inputs, config.batch)
    contenders: list[tuple[str, Callable[[dict[str, np.ndarray]], object]]] = [("early exit", session.run)]
    full_session = None
    if compare_full:
        source: str | bytes | None = None if full_model is None else str(full_model)
        if full_model is None and session.package.full_model is not None:
            full_model = session.package.full_model.file
            source = session.package.read(full_model)   # the package's own graph, as verified
        if full_model is not None and source is not None:
            full_session = ort.InferenceSession(source, session.thread_settings.options(),
                                                providers=session.providers)
            names = [i.name for i in full_session.get_inputs()]
            missing = [n for n in names if n not in inputs]
            if missing:
                raise InputError(f"--full-model {full_model} needs inputs {names}; the data lacks {missing}")
            contenders.append(("full model (one graph)", lambda b: full_session.run(None, {n: b[n] for n in names})))
        else:
            contenders.append(("full model (no early exit)", lambda b: session.run(b, early_exits=False)))
    engine = session.engine_for(config.batch)
    if engine == "full":
        contenders[0] = ("package, exits disabled", session.run)
    elif session.has_compiled:
        other = "stages" if engine == "compiled" else "compiled"
        contenders[0] = (ENGINE_LABELS[engine], session.run)
        contenders.append((ENGINE_LABELS[other], lambda b: session.run(b, engine=other)))

    accuracy: dict[str, float | None] = {}
    shares: dict[str, tuple[float, ...] | None] = {}
    for name, _ in contenders:
        if name.startswith(("early exit", "package")):
            preds, exits = _untimed_pass(session, batches, True)
            shares[name] = tuple((np.bincount(exits, minlength=session.num_exits) / exits.size).tolist())
        elif full_session is not None:
            preds = np.concatenate([full_session.run(None, {k: b[k] for k in inputs})[0].argmax(1) for b in batches])
            shares[name] = None
        else:
            preds, _ = _untimed_pass(session, batches, False)
            shares[name] = None
        accuracy[name] = None if labels is None else float((preds == labels[:preds.size]).mean())

    monitor = thermal or ThrottleMonitor()
    monitor.start()
    try:
        for _, call in contenders:
            _warm_up(call, batches, config.warmup_s)
        results: dict[str, list[WindowResult]] = {name: [] for name, _ in contenders}
        for w in range(config.windows):
            order = contenders if w % 2 == 0 else contenders[::-1]  # alternate who goes first
            for name, call in order:
                results[name].append(_window(call, batches, config.batch, config.duration_s, meter, progress))
    finally:
        report = monitor.stop()
    return BenchReport(
        config=config,
        contenders=tuple(ContenderResult(name, tuple(results[name]), accuracy[name], shares[name])
                         for name, _ in contenders),
        thermal=report,
        environment=environment(session),
    )


def _untimed_pass(
    session: ExitSession, batches: list[dict[str, np.ndarray]], early: bool
) -> tuple[np.ndarray, np.ndarray]:
    results = [session.run(b, early_exits=early) for b in batches]
    return (np.concatenate([r.predictions for r in results]), np.concatenate([r.exit_index for r in results]))


def environment(session: ExitSession) -> dict[str, Any]:
    settings = session.thread_settings
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "edgeexit": __version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "profile": session.profile.name if session.profile else None,
        "providers": session._stages[0].session.get_providers(),
        "threads": settings.threads,
        "spinning": settings.spinning,
        "global_thread_pool": settings.global_pool,
        "package": str(session.package.root),
        "package_name": session.package.name,
        "thresholds": session.package.thresholds,
    }


def format_table(report: BenchReport) -> str:
    """The report as a plain-text table."""
    rows = [c.summary for c in report.contenders]
    cfg = report.config
    env = report.environment
    out = [f"{env.get('package_name')} on {env.get('processor')} ({env.get('profile') or 'no profile'}, "
           f"{', '.join(env.get('providers', []))}, {env.get('threads')} thread(s)); batch {cfg.batch}, "
           f"{cfg.windows} window(s) of {cfg.duration_s:g} s, median over windows"]
    head = (f"{'contender':<27}{'accuracy':>9}{'p50 ms':>10}{'p90 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
            f"{'mean ms':>10}{'samples/s':>11}{'mJ/inference':>14}  exit shares")
    out += [head, "-" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2%}"
        sh = " ".join(f"{s:.3f}" for s in r["exit_shares"]) if r["exit_shares"] else "-"
        out.append(f"{r['name']:<27}{acc:>9}{r['p50_ms']:>10.4f}{r['p90_ms']:>10.4f}{r['p95_ms']:>10.4f}"
                   f"{r['p99_ms']:>10.4f}{r['mean_ms']:>10.4f}{r['throughput_per_s']:>11.0f}"
                   f"{r['energy_per_inference_j'] * 1e3:>14.4f}  {sh}")
    out.append(f"energy: {rows[0]['energy_kind']} — {rows[0]['energy_source']}")
    full = next((r for r in rows if r["name"].startswith("full model")), None)
    if full is not None:
        for other in rows:
            if other is full:
                continue
            line = (f"{other['name']} vs full model: {describe_speedup(full['p50_ms'] / other['p50_ms'])} at p50, "
                    f"{describe_speedup(full['mean_ms'] / other['mean_ms'])} in mean")
            if other is rows[0]:
                energy = other["energy_per_inference_j"] / full["energy_per_inference_j"]
                line += f"; energy per inference {energy:.2f}x the full model's"
            out.append(line)
    if report.valid:
        out.append(f"throttling: none seen ({report.thermal.note})")
    else:
        out.append(f"INVALID RUN: the device throttled during it ({'; '.join(report.thermal.reasons)})")
    return "\n".join(out)


def describe_speedup(ratio: float) -> str:
    """A speed ratio (baseline time / contender time) in words: '1.25x faster' or '1.79x slower (0.56x)'."""
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower ({ratio:.2f}x)"


def csv_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One row per contender; exit shares in one column per exit (``exit_share_0`` …, empty for the full model)."""
    env = report.environment
    exits = max((len(c.summary["exit_shares"] or []) for c in report.contenders), default=0)
    rows = []
    for c in report.contenders:
        row = {k: v for k, v in c.summary.items() if k != "exit_shares"}
        shares = c.summary["exit_shares"] or []
        row.update({f"exit_share_{e}": (round(shares[e], 6) if e < len(shares) else "") for e in range(exits)})
        row.update({"batch": report.config.batch, "windows": report.config.windows,
                    "duration_s": report.config.duration_s, "valid": report.valid})
        row.update({k: (" ".join(v) if isinstance(v, list) else v) for k, v in env.items() if k != "thresholds"})
        rows.append(row)
    return rows
