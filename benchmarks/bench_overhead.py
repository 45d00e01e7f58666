"""What ``ExitSession.run`` adds to a bare onnxruntime call, per path, paired and interleaved.

For three graph sizes (a tiny MLP at onnxruntime's floor, ~7 us; a 3/6/6-channel CNN, ~18 us;
a 24/48/96-channel CNN, ~100 us; all three stages with an exit each, random weights, on real
MNIST-5k test digits) and every path ``run`` can take, a bare ``onnxruntime.InferenceSession``
call of the very graph that path runs and ``ExitSession.run`` take turns call by call
(``interleaved_ms``, block 1, rotating order), several repeats:

- ``full b1``: a package with every early exit disabled answers from ``full.onnx``; bare:
  ``full.onnx`` in its own session;
- ``compiled b1`` / ``compiled b64``: the package's ``compiled.onnx``; bare: the same graph with
  the package's thresholds as its input;
- ``stages b1 exit0``: the stage loop, every sample leaving at exit 0; bare: stage 0's session;
- ``stages b1 last``: the stage loop through all three stages (early exits disabled, engine
  ``stages``); bare: the three stage sessions chained.

Every session has ExitSession's default options (one intra-op thread, no spinning,
ORT_ENABLE_ALL) on the CPU provider; Python's gc is paused while timing.  Reported per path:
each contender's median, the median of the paired differences (wrapper minus bare, call by
call: "overhead") and bare/wrapper of the medians ("ratio", 1.00 = free).

``--profile``: where the wrapper's time goes on the batch-1 full-model and compiled paths, two
ways.  *Warm*: each step alone in a loop of 20,000 calls (input checks, plan and engine choice,
result building, the clock reads, the measure-block check).  *In place*: the fast path rebuilt
here step by step (``stepwise``: the same code as ``edgeexit/runtime/_fast.py``, each step
switchable), each variant paired against the bare call like the table above; the last row is
``ExitSession.run`` itself.  The two differ because right after onnxruntime ran a model the
CPU's caches hold the model: every object a step touches is then a cache miss, so a step
costs in place several times what it costs alone.

``--calibrated``: the ~18 us CNN trained on MNIST-5k (cached in ``benchmarks/.cache``),
exported without thresholds, calibrated exactly as ``edgeexit calibrate PKG --data CAL.npz
--max-drop 1 --device cpu`` does, then ``run_benchmark(..., compare_full=True)`` (what
``edgeexit bench --compare full --batch 1`` runs) on the test split: the package against a bare
``full.onnx``, mean and p50.

Targets (issue "within two microseconds"): overhead <= 2 us on ``full b1`` and ``compiled b1``;
the calibrated ~18 us CNN >= 0.95x its plain model (mean and p50).  Run it pinned to one core
for the Raspberry-Pi-like figure::

    python benchmarks/bench_overhead.py --profile --calibrated --json     # -> benchmarks/results/bench_overhead.json
    taskset -c 0 python benchmarks/bench_overhead.py --profile --calibrated \
        --json benchmarks/results/bench_overhead_1core.json
    python benchmarks/bench_overhead.py --quick          # smoke run, numbers not for reporting
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _common import BENCH_DIR, log, machine_info, one_torch_thread, table, trained_model, write_json

from edgeexit.datasets import Splits, mnist5k_splits
from edgeexit.package import load_package, set_thresholds
from edgeexit.runtime import ExitSession
from edgeexit.runtime._engines import interleaved_ms
from edgeexit.runtime._threads import ThreadSettings

DEFAULT_JSON = BENCH_DIR / "results" / "bench_overhead.json"
SIZES = {"mlp ~7us": "mlp", "cnn ~18us": (3, 6, 6), "cnn ~100us": (24, 48, 96)}
TARGET_US = 2.0
TARGET_RATIO = 0.95
CALIBRATED = (3, 6, 6)   # the ~18 us CNN
EXIT0 = 1e300   # an entropy threshold every finite score passes: every sample leaves at exit 0


# --- the models ------------------------------------------------------------------------


def model(kind: Any, seed: int = 0) -> Any:
    """Three stages on 1x28x28 with an exit after each: a tiny MLP, or three conv blocks."""
    import torch
    from torch import nn

    from edgeexit.export import EarlyExitModel

    torch.manual_seed(seed)
    if kind == "mlp":
        stages = [nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(49, 16), nn.ReLU()),
                  nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU())]
        exits = [nn.Linear(16, 10) for _ in range(3)]
    else:
        a, b, c = kind

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        stages = [block(1, a), block(a, b), block(b, c)]                         # 28 -> 14 -> 7 -> 3
        exits = [nn.Sequential(nn.Flatten(), nn.Linear(w * s * s, 10)) for w, s in ((a, 14), (b, 7), (c, 3))]
    return EarlyExitModel(stages=stages, exits=exits).eval()


def packages(kind: Any, folder: Path, x: np.ndarray) -> dict[str, Path]:
    """One export (stages, full.onnx, compiled.onnx), copied three times with other thresholds:
    ``exits`` (thresholds in the middle of exit 0's scores), ``exit0`` (every sample leaves at
    exit 0) and ``disabled`` (every early exit disabled: the package answers from full.onnx)."""
    import torch

    from edgeexit.export import export_package

    base = folder / "base.eexit"
    export_package(model(kind), {"image": torch.from_numpy(x[:8])}, base, policy="entropy", thresholds=[1.0, 1.0],
                   include_full_model=True, compile=True, log=None)
    out = {}
    for name, thresholds in (("exits", [1.0, 1.0]), ("exit0", [EXIT0, None]), ("disabled", [None, None])):
        out[name] = folder / f"{name}.eexit"
        shutil.copytree(base, out[name])
        set_thresholds(out[name], thresholds)
    return out


# --- the contenders ----------------------------------------------------------------------


def bare_session(package: Path, file: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(package / file), ThreadSettings().options(), providers=["CPUExecutionProvider"])


def pairs(pkgs: dict[str, Path]) -> dict[str, tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any], int,
                                                    ExitSession]]:
    """Per path: (bare call, ExitSession.run, batch, the session)."""
    spec = load_package(pkgs["exits"])
    assert spec.full_model is not None and spec.compiled is not None
    full_sess = ExitSession(pkgs["disabled"])
    full_bare = bare_session(pkgs["disabled"], spec.full_model.file)
    full_out, full_in = [spec.full_model.logits], spec.full_model.inputs[0]

    comp_sess = ExitSession(pkgs["exits"])
    comp_bare = bare_session(pkgs["exits"], spec.compiled.file)
    comp_out = [spec.compiled.outputs[k] for k in ("logits", "exit_index", "score")]
    comp_in, comp_thr = spec.compiled.inputs[0], spec.compiled.thresholds
    thresholds = np.array([1.0, 1.0])

    exit0_sess = ExitSession(pkgs["exit0"], engine="stages")
    last_sess = ExitSession(pkgs["disabled"], engine="stages")
    stage_bare = [bare_session(pkgs["exits"], s.file) for s in spec.stages]
    stage_io = [([*s.carry, s.exit.logits], s.inputs) for s in spec.stages if s.exit is not None]

    def stage0(x: np.ndarray) -> Any:
        out, names = stage_io[0]
        return stage_bare[0].run(out, {names[0]: x})

    def chain(x: np.ndarray) -> Any:
        tensors = {spec.inputs[0].name: x}
        for session, (out, names) in zip(stage_bare, stage_io):
            tensors.update(zip(out, session.run(out, {n: tensors[n] for n in names})))
        return tensors

    return {
        "full b1": (lambda x: full_bare.run(full_out, {full_in: x}), full_sess.run, 1, full_sess),
        "compiled b1": (lambda x: comp_bare.run(comp_out, {comp_in: x, comp_thr: thresholds}), comp_sess.run, 1,
                        comp_sess),
        "compiled b64": (lambda x: comp_bare.run(comp_out, {comp_in: x, comp_thr: thresholds}), comp_sess.run, 64,
                         comp_sess),
        "stages b1 exit0": (stage0, exit0_sess.run, 1, exit0_sess),
        "stages b1 last": (chain, last_sess.run, 1, last_sess),
    }


def check_same(bare: Callable[[np.ndarray], Any], wrapped: Callable[[np.ndarray], Any], path: str,
               x: np.ndarray) -> None:
    """The two contenders of a path answer the same logits (else the comparison is void)."""
    got = wrapped(x).logits
    want = bare(x)
    want = list(want.values())[-1] if isinstance(want, dict) else want[0 if path.startswith("compiled") else -1]
    if not np.array_equal(got, want):
        raise SystemExit(f"{path}: ExitSession.run and the bare call disagree; the timing would compare other work")


def time_path(bare: Callable[[np.ndarray], Any], wrapped: Callable[[np.ndarray], Any], args: list[np.ndarray],
              repeats: int) -> dict[str, float]:
    gc.collect()
    gc.disable()
    try:
        times = interleaved_ms([bare, wrapped], args, repeats=repeats, warmup=50) * 1e3   # us
    finally:
        gc.enable()
    b, w = times[0].ravel(), times[1].ravel()
    return {"bare_us": float(np.median(b)), "run_us": float(np.median(w)),
            "overhead_us": float(np.median(w - b)), "ratio": float(np.median(b) / np.median(w)),
            "bare_mean_us": float(b.mean()), "run_mean_us": float(w.mean()), "calls": int(b.size)}


# --- where the time goes -------------------------------------------------------------------


def per_call_us(call: Callable[[], Any], calls: int) -> float:
    """us per call, the step alone (warm): the median of 100 rounds of ``calls // 100`` back-to-back
    calls (short rounds, so that another process taking the core spoils a few rounds, not the median)."""
    per_round = max(calls // 100, 1)
    rounds = []
    for _ in range(100):
        t0 = time.perf_counter_ns()
        for _ in range(per_round):
            call()
        rounds.append((time.perf_counter_ns() - t0) / per_round / 1e3)
    return float(np.median(rounds))


def warm_steps(sess: ExitSession, x: np.ndarray, calls: int) -> dict[str, float]:
    """Each wrapper step of ``sess.run(x)`` alone; the session's internals are read here on
    purpose: this is what they cost."""
    from edgeexit.runtime._result import ExitResult

    logits = np.zeros((1, 10), np.float32)
    exit_index, scores = np.zeros(1, np.int64), np.zeros(1)
    new, nan = ExitResult.__new__, math.nan

    def result() -> ExitResult:
        r = new(ExitResult)
        r.logits, r.stage_ms, r.engine, r._exit_index, r._scores = logits, (), "compiled", exit_index, scores
        r._predictions = r._nonfinite = r._policy = None
        r._last_exit, r._score, r.total_ms = -1, nan, 0.0
        return r

    fast, thresholds, policy, early_exits, engine = sess._fast_one, None, None, True, None
    return {
        "clock reads (2 x perf_counter_ns)": per_call_us(lambda: (time.perf_counter_ns(), time.perf_counter_ns()),
                                                         calls),
        "input checks (the batch-1 screen)": per_call_us(lambda: sess._checker.feeds(x), calls),
        "  of which NaN/Inf (np.isfinite, bytes search)": per_call_us(
            lambda: b"\x00" in np.isfinite(x).tobytes(), calls),
        "  the same by np.isfinite(x).all() (before)": per_call_us(lambda: np.isfinite(x).all(), calls),
        "plan and engine choice": per_call_us(
            lambda: fast is not None and thresholds is None and policy is None and early_exits and engine is None,
            calls),
        "exit-index check (compiled: .item(0))": per_call_us(lambda: 0 <= exit_index.item(0) < 3, calls),
        "result building (ExitResult, 12 slots)": per_call_us(result, calls),
        "measure-block check": per_call_us(lambda: sess._measures_open and sess._measures.block, calls),
    }


def stepwise(sess: ExitSession, compiled: bool, *, screen: bool = True, finite: bool = True, item: bool = True,
             result: bool = True) -> Callable[[np.ndarray], Any]:
    """The batch-1 fast path of ``edgeexit/runtime/_fast.py`` rebuilt with each step switchable
    (the onnxruntime call is always the session's own, ``_stage.direct_run``)."""
    from edgeexit.runtime._result import ExitResult

    assert sess._checker.single is not None
    name, shape, dtype, _ = sess._checker.single
    if compiled:
        assert sess._compiled is not None and sess._default_plan.threshold_array is not None
        graph = sess._compiled
        run, outputs, extra = graph._ort_run, graph.outputs, {graph.thresholds: sess._default_plan.threshold_array}
    else:
        call = sess._full_call
        assert call is not None
        run, outputs, extra = call.run, call.outputs, {}
    ndarray, isfinite, clock, new, nan = np.ndarray, np.isfinite, time.perf_counter_ns, ExitResult.__new__, math.nan

    def step(inputs: Any) -> Any:
        start = clock()
        x = inputs
        if screen and (type(x) is not ndarray or x.shape != shape or x.dtype != dtype or not x.flags.c_contiguous):
            return None
        if finite and b"\x00" in isfinite(x).tobytes():
            return None
        outs = run(outputs, {name: x, **extra}, None)
        if compiled and item and not 0 <= outs[1].item(0) < 3:
            return None
        if not result:
            return outs
        r = new(ExitResult)
        r.logits, r.stage_ms, r.engine, r._exit_index, r._scores = outs[0], (), "compiled", None, None
        r._predictions = r._nonfinite = r._policy = None
        r._last_exit, r._score = -1, nan
        r.total_ms = (clock() - start) / 1e6
        return r

    return step


def in_place_steps(sess: ExitSession, bare: Callable[[np.ndarray], Any], path: str, args: list[np.ndarray],
                   repeats: int) -> dict[str, float]:
    """Paired overhead (us) of the fast path built up step by step, then of ``ExitSession.run``."""
    compiled = path.startswith("compiled")
    variants: list[tuple[str, Callable[[np.ndarray], Any]]] = [
        ("onnxruntime's C++ run alone (direct_run)", stepwise(sess, compiled, screen=False, finite=False, item=False,
                                                               result=False)),
        ("+ dtype/shape/contiguity screen", stepwise(sess, compiled, finite=False, item=False, result=False)),
        ("+ NaN/Inf check", stepwise(sess, compiled, item=False, result=False)),
    ]
    if compiled:
        variants.append(("+ exit-index check", stepwise(sess, compiled, result=False)))
    variants += [("+ result and clock = the fast path", stepwise(sess, compiled)),
                 ("ExitSession.run (+ the call, plan choice, measure check)", sess.run)]
    return {label: time_path(bare, call, args, repeats)["overhead_us"] for label, call in variants}


# --- the calibrated ~18 us CNN ------------------------------------------------------------------


def calibrated(splits: Splits, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or load) the ~18 us CNN, export it without thresholds, calibrate it like the CLI
    with ``--max-drop 1``, then ``edgeexit bench --compare full --batch 1`` on the test split."""
    import torch
    from bench_honest_calibration import calibrate_like_the_cli

    from edgeexit.bench import BenchConfig, run_benchmark
    from edgeexit.datasets import MNIST_PREPROCESSING
    from edgeexit.devices import get_profile
    from edgeexit.devices.meters import EstimateMeter
    from edgeexit.export import export_package

    net = trained_model("cnn18", args.epochs, 0, splits, make=lambda: model(CALIBRATED))
    package = folder / "cnn18.eexit"
    export_package(net.eval(), {"image": torch.from_numpy(splits.train.x[:8])}, package, policy="entropy",
                   thresholds=None, name="cnn18", labels=[str(i) for i in range(10)], include_full_model=True,
                   preprocessing=MNIST_PREPROCESSING, seed=0, log=None)
    cal_npz = folder / "calibration.npz"
    np.savez(cal_npz, image=splits.calibration.x, labels=splits.calibration.y)
    log("[calibrated] edgeexit calibrate --max-drop 1 --device cpu ...")
    cli, said = calibrate_like_the_cli(package, cal_npz, 1.0)
    entry = load_package(package).manifest["calibration"]["history"][-1]
    session = ExitSession(package, device="cpu")
    profile = get_profile("cpu")
    meter = EstimateMeter(profile.power.busy_watts, profile.power.idle_watts, source="profile cpu")
    config = BenchConfig(batch=1, duration_s=args.duration, windows=args.windows, warmup_s=args.warmup)
    log(f"[calibrated] bench --compare full --batch 1, engine {session.engine_for(1)}, {args.windows} x "
        f"{args.duration:g} s per contender ...")
    report = run_benchmark(session, {"image": splits.test.x}, splits.test.y, config, meter, compare_full=True)
    ratios = report.ratios()
    assert ratios is not None
    rows = report.to_dict()["contenders"]
    return {"model": f"cnn {CALIBRATED}", "epochs": args.epochs, "max_drop_pt": 1.0,
            "exits_disabled": bool(entry.get("exits_disabled")), "thresholds": entry["thresholds"],
            "engine_batch1": session.engine_for(1), "calibrate_said": said or None,
            "expected_speedup": entry["full_cost"] / entry["expected_cost"],
            "speedup_mean": ratios["speedup_mean"], "speedup_p50": ratios["speedup_p50"],
            "contenders": [{k: r[k] for k in ("name", "p50_ms", "mean_ms", "accuracy")} for r in rows],
            "valid": report.to_dict()["valid"], "cli_json_keys": sorted(cli)}


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--samples", type=int, default=None, help="test digits cycled per repeat (default 1000)")
    ap.add_argument("--repeats", type=int, default=None, help="passes over them per path (default 5)")
    ap.add_argument("--profile", action="store_true", help="also where the time goes, warm and in place")
    ap.add_argument("--calibrated", action="store_true", help="also the calibrated ~18 us CNN against full.onnx")
    ap.add_argument("--only-calibrated", action="store_true", help="only that (skips the paired table)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the calibrated CNN (default 5)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per bench window (default 5; quick 0.5)")
    ap.add_argument("--windows", type=int, default=None, help="bench windows per contender (default 3; quick 1)")
    ap.add_argument("--warmup", type=float, default=None, help="bench warm-up seconds (default 1; quick 0.2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 samples x 1 (numbers not for reporting)")
    ap.add_argument("--json", type=Path, nargs="?", const=DEFAULT_JSON, default=None,
                    help=f"write every number here (default {DEFAULT_JSON.relative_to(BENCH_DIR.parent)})")
    args = ap.parse_args(argv)
    args.samples = args.samples or (200 if args.quick else 1000)
    args.repeats = args.repeats or (1 if args.quick else 5)
    for opt, (full, quick) in {"duration": (5.0, 0.5), "windows": (3, 1), "warmup": (1.0, 0.2)}.items():
        if getattr(args, opt) is None:
            setattr(args, opt, quick if args.quick else full)
    sizes = [] if args.only_calibrated else [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")

    one_torch_thread()
    info = machine_info()
    info["loadavg_at_start"] = os.getloadavg()
    splits = mnist5k_splits(0)
    test = splits.test.x
    results: dict[str, Any] = {}
    warm: dict[str, dict[str, float]] = {}
    in_place: dict[str, dict[str, float]] = {}
    cal: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="edgeexit-overhead-") as tmp:
        for size in sizes:
            folder = Path(tmp) / size.replace(" ", "-").replace("~", "")
            folder.mkdir()
            log(f"[{size}] exporting ...")
            contenders = pairs(packages(SIZES[size], folder, test))
            for path, (bare, wrapped, batch, sess) in contenders.items():
                n = len(test) // batch
                batches = [np.ascontiguousarray(test[i * batch:(i + 1) * batch]) for i in range(n)]
                args_ = [batches[i % n] for i in range(args.samples if batch == 1 else max(args.samples // 20, 20))]
                check_same(bare, wrapped, path, batches[0])
                log(f"[{size}] {path}: {len(args_)} calls x {args.repeats} ...")
                key = f"{size} | {path}"
                results[key] = {"size": size, "path": path, "batch": batch,
                                **time_path(bare, wrapped, args_, args.repeats)}
                if args.profile and path in ("full b1", "compiled b1"):
                    warm[key] = warm_steps(sess, batches[0], 2000 if args.quick else 20000)
                    in_place[key] = in_place_steps(sess, bare, path, args_, max(1, args.repeats // 2))
        if args.calibrated or args.only_calibrated:
            folder = Path(tmp) / "calibrated"
            folder.mkdir()
            cal = calibrated(splits, folder, args)
    info["loadavg_at_end"] = os.getloadavg()
    affinity = len(os.sched_getaffinity(0))
    hit = report(results, warm, in_place, cal, info, affinity)
    if args.json is not None:
        write_json(args.json, {"machine": info, "cores_allowed": affinity,
                               "config": {"sizes": sizes, "samples": args.samples, "repeats": args.repeats,
                                          "quick": args.quick, "block": 1, "threads": 1,
                                          "bench": {"duration_s": args.duration, "windows": args.windows,
                                                    "warmup_s": args.warmup}},
                               "targets": {"overhead_us": TARGET_US, "ratio": TARGET_RATIO, **hit},
                               "results": list(results.values()), "profile_warm_us": warm,
                               "profile_in_place_us": in_place, "calibrated": cal})
    return 0


def report(results: dict[str, Any], warm: dict[str, dict[str, float]], in_place: dict[str, dict[str, float]],
           cal: dict[str, Any] | None, info: dict[str, Any], affinity: int) -> dict[str, Any]:
    hit: dict[str, Any] = {}
    if results:
        print(f"\n=== ExitSession.run vs a bare InferenceSession.run of the same graph, paired and interleaved per "
              f"call; {affinity} core(s) allowed; load average {info['loadavg_at_start']} at start, "
              f"{info['loadavg_at_end']} at end ===")
        rows = [[r["size"], r["path"], f"{r['bare_us']:.2f}", f"{r['run_us']:.2f}", f"{r['overhead_us']:+.2f}",
                 f"{r['ratio']:.3f}", f"{r['bare_mean_us']:.2f}", f"{r['run_mean_us']:.2f}", str(r["calls"])]
                for r in results.values()]
        print(table(["graph", "path", "bare p50 us", "run p50 us", "overhead us", "ratio", "bare mean", "run mean",
                     "calls"], rows))
        b1 = {k: r["overhead_us"] for k, r in results.items() if r["path"] in ("full b1", "compiled b1")}
        hit["overhead_pass"] = {k: v <= TARGET_US for k, v in b1.items()}
        print(f"\ntarget: overhead <= {TARGET_US:g} us on full b1 and compiled b1: "
              f"{'PASS' if all(hit['overhead_pass'].values()) else 'MISS'} - " + ", ".join(
                  f"{k} {v:+.2f} {'ok' if v <= TARGET_US else 'MISS'}" for k, v in b1.items()))
    for key in warm:
        print(f"\nwhere the wrapper's time goes, {key}: each step alone (warm) | the fast path built up step by "
              f"step, paired against the bare call (in place; cumulative us)")
        steps = list(warm[key].items())
        places = list(in_place[key].items())
        width = max(len(steps), len(places))
        steps += [("", math.nan)] * (width - len(steps))
        places += [("", math.nan)] * (width - len(places))
        print(table(["step alone", "us", "in place", "us"],
                    [[a, "" if math.isnan(u) else f"{u:.3f}", b, "" if math.isnan(v) else f"{v:+.2f}"]
                     for (a, u), (b, v) in zip(steps, places)], align="lrlr"))
    if cal is not None:
        mean, p50 = cal["speedup_mean"], cal["speedup_p50"]
        hit["calibrated_pass"] = mean >= TARGET_RATIO and p50 >= TARGET_RATIO
        print(f"\n=== {cal['model']} trained {cal['epochs']} epochs, calibrate --max-drop 1 --device cpu, then bench "
              f"--compare full --batch 1 on the test split ===")
        print(table(["contender", "p50 ms", "mean ms", "accuracy"],
                    [[c["name"], f"{c['p50_ms']:.4f}", f"{c['mean_ms']:.4f}",
                      "-" if c["accuracy"] is None else f"{c['accuracy']:.2%}"] for c in cal["contenders"]]))
        print(f"exits disabled by calibration: {cal['exits_disabled']}; engine at batch 1: {cal['engine_batch1']}; "
              f"calibration expected {cal['expected_speedup']:.2f}x for its best setting")
        print(f"target: >= {TARGET_RATIO:.2f}x the plain model, mean and p50: "
              f"{'PASS' if hit['calibrated_pass'] else 'MISS'} - mean {mean:.3f}x, p50 {p50:.3f}x"
              + ("" if cal["valid"] else " (throttling seen: run invalid)"))
    return hit


if __name__ == "__main__":
    sys.exit(main())
