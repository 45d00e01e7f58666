"""Per-exit calibrated thresholds vs the best single shared threshold vs the full model.

For each zoo model: thresholds are chosen on the MNIST-5k calibration split two ways,
both under the same objective (accuracy drop vs the last exit <= 0.3 pt at one-sided
95 % confidence): one threshold shared by every early exit (``shared_threshold``), and
one threshold per exit searched against the stage ms measured on this machine
(``calibrate_thresholds``).  Then, on the test split, at batch 1, interleaved in blocks:
the full model in onnxruntime, the shared-threshold runtime and the calibrated runtime.

    python benchmarks/bench_calibration.py --json benchmarks/results/bench_calibration.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import onnxruntime as ort
from _common import (
    CACHE_DIR,
    DEFAULT_EPOCHS,
    MAX_DROP,
    interleaved_timing,
    log,
    machine_info,
    prepare,
    stats_dict,
    table,
    write_json,
)

from edgeexit.calibrate import (
    accuracy_at,
    apply_calibration,
    calibrate_thresholds,
    record_exits,
    shared_threshold,
)
from edgeexit.measure import LatencyStats
from edgeexit.package import set_thresholds
from edgeexit.runtime import ExitSession
from edgeexit.runtime._threads import session_options


def _copy_with_thresholds(src: Path, dst: Path, thresholds: list[float]) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    set_thresholds(dst, thresholds)
    return dst


def bench_model(name: str, epochs: int, seed: int, passes: int, block: int) -> dict:
    prep = prepare(name, epochs, seed)
    cal, test = prep.splits.calibration, prep.splits.test
    base = ExitSession(prep.package)
    early = base.num_exits - 1

    records = record_exits(base, cal.x, cal.y)
    shared_t, shared_cal_acc, _ = shared_threshold(records, MAX_DROP)
    calibrated = calibrate_thresholds(base, cal.x, cal.y, max_drop=MAX_DROP)
    log(f"[{name}] shared {shared_t:.4g}; per exit {[round(t, 4) for t in calibrated.thresholds]} "
        f"({calibrated.method}, {calibrated.evaluated} choices, stage ms {calibrated.stage_costs})")

    work = CACHE_DIR / "calibration"
    work.mkdir(exist_ok=True)
    shared_pkg = _copy_with_thresholds(prep.package, work / f"{name}-shared.eexit", [shared_t] * early)
    cal_pkg = _copy_with_thresholds(prep.package, work / f"{name}-calibrated.eexit", [shared_t] * early)
    apply_calibration(cal_pkg, calibrated, device="cpu")

    full = ort.InferenceSession(str(prep.package / "full.onnx"), session_options(1, False, False),
                                providers=["CPUExecutionProvider"])
    s_shared, s_cal = ExitSession(shared_pkg), ExitSession(cal_pkg)

    test_records = record_exits(base, test.x, test.y)
    full_acc = test_records.full_accuracy
    rows = {}
    for label, thresholds in (("shared threshold", [shared_t] * early), ("per-exit calibrated", calibrated.thresholds)):
        acc, shares = accuracy_at(test_records, thresholds)
        rows[label] = {"thresholds": [float(t) for t in thresholds], "test_accuracy": acc,
                       "drop_pt": 100 * (full_acc - acc), "exit_shares": shares.tolist()}

    xs = [test.x[i:i + 1] for i in range(len(test.y))]
    calls = [lambda x: full.run(None, {"image": x}), s_shared.run, s_cal.run]
    times = interleaved_timing(calls, xs, passes=passes, warmup=200, block=block)
    stats = [LatencyStats.from_ns(t) for t in times]
    out = {"model": name, "full_test_accuracy": full_acc, "full": stats_dict(stats[0]),
           "calibration": {"samples": len(cal.y), "max_drop": MAX_DROP, "z": 1.645,
                           "shared_threshold": shared_t, "shared_calibration_accuracy": shared_cal_acc,
                           "per_exit": calibrated.entry()}}
    for (label, row), st in zip(rows.items(), stats[1:], strict=True):
        row.update({"latency": stats_dict(st), "speedup_vs_full_p50": stats[0].p50 / st.p50,
                    "speedup_vs_full_mean": stats[0].mean / st.mean})
        out[label] = row
    out["per_exit_vs_shared_p50"] = stats[1].p50 / stats[2].p50
    out["per_exit_vs_shared_mean"] = stats[1].mean / stats[2].mean
    return out


def print_result(r: dict, passes: int, block: int) -> None:
    print(f"\n=== {r['model']} · batch 1 · test split, {passes} pass(es), interleaved per block of {block} ===")
    headers = ["contender", "thresholds", "test acc", "drop pt", "exit shares", "p50 ms", "p95 ms", "mean ms",
               "speedup p50", "speedup mean"]
    full = r["full"]
    rows = [["full model, onnxruntime", "-", f"{r['full_test_accuracy']:.2%}", "-", "-",
             f"{full['p50']:.4f}", f"{full['p95']:.4f}", f"{full['mean']:.4f}", "1.00x", "1.00x"]]
    for label in ("shared threshold", "per-exit calibrated"):
        row = r[label]
        rows.append([label, " ".join(f"{t:.4g}" for t in row["thresholds"]), f"{row['test_accuracy']:.2%}",
                     f"{row['drop_pt']:+.1f}", " ".join(f"{s:.3f}" for s in row["exit_shares"]),
                     f"{row['latency']['p50']:.4f}", f"{row['latency']['p95']:.4f}",
                     f"{row['latency']['mean']:.4f}", f"{row['speedup_vs_full_p50']:.2f}x",
                     f"{row['speedup_vs_full_mean']:.2f}x"])
    print(table(headers, rows))
    print(f"per-exit calibrated vs shared threshold: {r['per_exit_vs_shared_p50']:.2f}x at p50, "
          f"{r['per_exit_vs_shared_mean']:.2f}x in mean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="blenet,bresnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"bench_calibration: {info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPU(s), "
          f"onnxruntime {info['onnxruntime']}; 1 thread each; objective: drop <= "
          f"{100 * MAX_DROP:.1f} pt at 95 % one-sided confidence on the 1,000-sample calibration split")
    results = []
    for name in args.models.split(","):
        r = bench_model(name, DEFAULT_EPOCHS[name], args.seed, args.passes, args.block)
        print_result(r, args.passes, args.block)
        results.append(r)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "results": results})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
