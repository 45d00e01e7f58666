"""Batch-1 latency of ``ExitSession`` on B-LeNet under five onnxruntime thread configurations.

Each configuration runs in its own subprocess, because onnxruntime's global thread pool
is process-wide state (once created, per-session pools are refused):

  a  per-session pools, 1 intra-op thread, spinning on   ExitSession(path, threads=1, spinning=True)
  b  per-session pools, 1 intra-op thread, spinning off  ExitSession(path)   (the default)
  c  global pool (1 intra, 1 inter)                      use_global_thread_pool(1, 1);
                                                         ExitSession(path, global_thread_pool=True)
  d  per-session pools, 2 intra-op threads, spinning on  ExitSession(path, threads=2, spinning=True)
  e  per-session pools, 2 intra-op threads, spinning off ExitSession(path, threads=2)

The package is the calibrated B-LeNet that ``bench_mnist.py`` builds (shared cache in
``benchmarks/.cache``; trained here if missing).  Every round starts one fresh worker
process per configuration, in an order that rotates with the round, and each worker
times one pass over the test samples at batch 1 after its own warm-up; the rounds'
samples are pooled per configuration.  The workers never import torch.

Usage::

    python benchmarks/bench_threads.py                          # full run
    python benchmarks/bench_threads.py --quick --json out.json  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_EPOCHS,
    fmt_ms,
    interleaved_timing,
    log,
    machine_info,
    stats_dict,
    table,
    write_json,
)

from edgeexit.measure import LatencyStats

CONFIGS: dict[str, dict[str, Any]] = {
    "a": {"label": "per-session, 1 thread, spinning on", "threads": 1, "spinning": True, "global_pool": False},
    "b": {"label": "per-session, 1 thread, spinning off (default)", "threads": 1, "spinning": False,
          "global_pool": False},
    "c": {"label": "global pool (1 intra, 1 inter)", "threads": 1, "spinning": False, "global_pool": True},
    "d": {"label": "per-session, 2 threads, spinning on", "threads": 2, "spinning": True, "global_pool": False},
    "e": {"label": "per-session, 2 threads, spinning off", "threads": 2, "spinning": False,
          "global_pool": False},
}
BASELINE = "b"


# --- worker (its own process; no torch) ---------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    from edgeexit.datasets import mnist5k_splits
    from edgeexit.runtime import ExitSession, use_global_thread_pool
    from edgeexit.runtime.session import describe

    cfg = CONFIGS[args.worker]
    if cfg["global_pool"]:
        use_global_thread_pool(1, 1)
        session = ExitSession(args.package, global_thread_pool=True)
    else:
        session = ExitSession(args.package, threads=cfg["threads"], spinning=cfg["spinning"])
    test = mnist5k_splits(args.seed).test
    x, y = test.x[:args.samples], test.y[:args.samples]
    inputs = [x[i:i + 1] for i in range(len(x))]
    overhead_ns: list[float] = []
    exits: list[int] = []
    correct = 0

    def hook(r: Any, took: int) -> None:
        overhead_ns.append(took - sum(r.stage_ms) * 1e6)
        exits.append(int(r.exit_index[0]))

    times = interleaved_timing([session.run], inputs, 1, args.warmup, on_result={0: hook})
    preds = [int(session.run(s).predictions[0]) for s in inputs]
    correct = int((np.array(preds) == y).sum())
    out = {
        "config": args.worker,
        "ns": times[0],
        "overhead_ns": overhead_ns,
        "exit_counts": np.bincount(exits, minlength=session.num_exits).tolist(),
        "accuracy": correct / len(y),
        "session": describe(session),
        "torch_imported": "torch" in sys.modules,
        "pid": os.getpid(),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


# --- parent --------------------------------------------------------------------------------


def run_worker(key: str, package: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--package", str(package),
           "--seed", str(args.seed), "--samples", str(args.samples), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", str(args.seed))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {key} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations (default a,b,c,d,e)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS["blenet"], help="B-LeNet training epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=None,
                    help="rounds; each runs every configuration once over the test samples (default 3)")
    ap.add_argument("--samples", type=int, default=None, help="test samples (default 1000; --quick: 200)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per worker (default 200)")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 200 samples, short warm-up")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, full, small in (("passes", 3, 1), ("samples", 1000, 200), ("warmup", 200, 50)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    if args.passes < 1 or args.samples < 1:
        ap.error("--passes and --samples must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)

    from _common import prepare  # imports torch: only in the parent

    machine = machine_info()
    prep = prepare("blenet", args.epochs, args.seed, train_threads=args.train_threads)
    keys = args.configs
    pooled: dict[str, dict[str, Any]] = {k: {"ns": [], "overhead_ns": [], "runs": []} for k in keys}
    started = time.perf_counter()
    for r in range(args.passes):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        log(f"round {r + 1}/{args.passes}: {' '.join(order)}")
        for key in order:
            out = run_worker(key, prep.package, args)
            pooled[key]["ns"] += out["ns"]
            pooled[key]["overhead_ns"] += out["overhead_ns"]
            pooled[key]["runs"].append({k: out[k] for k in ("exit_counts", "accuracy", "session",
                                                            "torch_imported", "pid")})
    log(f"all workers done in {time.perf_counter() - started:.1f} s")

    stats = {k: LatencyStats.from_ns(v["ns"]) for k, v in pooled.items()}
    base = stats.get(BASELINE)
    results: dict[str, Any] = {}
    rows = []
    for key in keys:
        s = stats[key]
        first = pooled[key]["runs"][0]
        counts = np.array(first["exit_counts"])
        res = {
            **CONFIGS[key], "calls": s.calls, "latency_ms": stats_dict(s),
            "p50_vs_b": None if base is None else s.p50 / base.p50,
            "p95_vs_b": None if base is None else s.p95 / base.p95,
            "p99_vs_b": None if base is None else s.p99 / base.p99,
            "runtime_overhead_us_median": float(np.median(pooled[key]["overhead_ns"])) / 1e3,
            "accuracy": first["accuracy"], "exit_shares": (counts / counts.sum()).tolist(),
            "workers": pooled[key]["runs"],
        }
        results[key] = res
        rel = "-" if base is None else f"{res['p50_vs_b']:.2f} / {res['p95_vs_b']:.2f} / {res['p99_vs_b']:.2f}"
        rows.append([key, CONFIGS[key]["label"], str(s.calls), fmt_ms(s.p50), fmt_ms(s.p95), fmt_ms(s.p99),
                     fmt_ms(s.mean), rel, f"{res['runtime_overhead_us_median']:.1f}",
                     " ".join(f"{v:.3f}" for v in res["exit_shares"])])

    print(f"bench_threads: B-LeNet ({args.epochs} epochs, seed {args.seed}, threshold {prep.threshold:.5g}), "
          f"ExitSession at batch 1, {args.samples} test samples x {args.passes} round(s), one process per "
          f"configuration and round; {machine.get('cpu_model', machine['processor'])}, "
          f"{machine['cpu_count']} CPU(s), onnxruntime {machine['onnxruntime']}"
          + ("; QUICK smoke run, not for reporting" if args.quick else ""))
    print(table(["", "configuration", "calls", "p50 ms", "p95 ms", "p99 ms", "mean ms",
                 f"p50/p95/p99 vs ({BASELINE})", "overhead µs", "exit shares"], rows, "llrrrrrrrl"))
    if any(r["torch_imported"] for v in pooled.values() for r in v["runs"]):
        print("warning: a worker imported torch")
    try:
        machine["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if args.json is not None:
        write_json(args.json, {
            "benchmark": "bench_threads", "machine": machine,
            "config": {"model": "blenet", "epochs": args.epochs, "seed": args.seed, "passes": args.passes,
                       "samples": args.samples, "warmup_calls_per_worker": args.warmup,
                       "configs": keys, "quick": args.quick, "package": str(prep.package),
                       "threshold": prep.threshold},
            "results": results,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
