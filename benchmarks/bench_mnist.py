"""Early exit vs the full model on MNIST-5k: onnxruntime full graph, eager PyTorch, ExitSession.

For each zoo model (``blenet``, ``bresnet``): train on the MNIST-5k train split (cached
in ``benchmarks/.cache``), export with the full model, choose the shared entropy
threshold on the calibration split (``shared_threshold(records, max_drop=0.003)``),
then, on the TEST split, at batch 1 and batch 64, time side by side:

- ``full ORT``: ``onnxruntime.InferenceSession`` on the package's ``full.onnx``
  (``session_options(1, False, False)``: 1 intra-op thread, no spinning);
- ``eager torch``: the same early-exit model in eager PyTorch, a plain per-batch loop
  (stage k, entropy of exit k's softmax in torch, stop the samples that pass), 1 torch
  thread, ``torch.inference_mode()``;
- ``ExitSession``: the edgeexit runtime with default options (1 thread, no spinning).

Timing: ``time.perf_counter_ns`` around each call; warm-up calls excluded; the
contenders are interleaved per input (``--block N``: per N inputs) with a rotating
order (plus a hidden fourth contender, ExitSession with every exit disabled, which
gives the per-stage times of the measured cost model); several passes.  Per-input
interleaving leaves each call's caches cold (it follows another contender's call),
which penalises Python-heavy paths; ``--block 100`` measures every contender warm.
At batch 64, every pass takes the full 64-sample batches of a seeded permutation of
the test samples (pass 0: the split's order; a partial last batch is not timed, so
every timed call has exactly 64 samples); accuracy and exit shares come from a
separate untimed pass over every test sample in batches of that size (the last one
partial).

Usage::

    python benchmarks/bench_mnist.py                         # full run (minutes)
    python benchmarks/bench_mnist.py --quick --json out.json  # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import (
    MAX_DROP,
    Prepared,
    fmt_ms,
    interleaved_timing,
    log,
    machine_info,
    one_torch_thread,
    parse_timing_args,
    prepare,
    stats_dict,
    table,
    timing_parser,
    write_json,
)

from edgeexit.export.model import as_tuple
from edgeexit.measure import LatencyStats
from edgeexit.policies import get_policy
from edgeexit.runtime import ExitSession
from edgeexit.runtime._threads import session_options
from edgeexit.runtime.session import describe

CONTENDERS = ("full_ort", "eager_torch", "exitsession")
LABELS = {
    "full_ort": "full model, onnxruntime",
    "eager_torch": "early exit, eager torch",
    "exitsession": "early exit, ExitSession",
}


class EagerEarlyExit:
    """The early-exit model run the straightforward way in eager PyTorch.

    Per batch: run stage k, then its exit; the entropy -Σ p ln p of the exit's softmax
    (float32, torch) decides; samples below the threshold stop, the rest go on (compacted).
    At batch 1 the loop simply breaks.  Returns (predictions, exit index) as numpy arrays.
    """

    def __init__(self, model: Any, threshold: float) -> None:
        self.stages = list(model.stages)
        self.heads = [model.exit_at(k) for k in range(model.num_stages)]
        self.exit_number = {k: e for e, k in enumerate(model.exit_stage_indices)}
        self.last = model.exit_stage_indices[-1]
        self.threshold = threshold

    @staticmethod
    def entropy(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1)
        return -(logp.exp() * logp).sum(dim=1)

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = x.shape[0]
        carry: tuple[torch.Tensor, ...] = (torch.from_numpy(x),)
        if n == 1:
            for k, stage in enumerate(self.stages):
                carry = as_tuple(stage(*carry))
                head = self.heads[k]
                if head is None:
                    continue
                logits = head(*carry)
                if k == self.last or float(self.entropy(logits)[0]) < self.threshold:
                    break
            return logits.argmax(dim=1).numpy(), np.array([self.exit_number[k]])
        preds = torch.empty(n, dtype=torch.int64)
        exits = torch.empty(n, dtype=torch.int64)
        active = torch.arange(n)
        for k, stage in enumerate(self.stages):
            carry = as_tuple(stage(*carry))
            head = self.heads[k]
            if head is None:
                continue
            logits = head(*carry)
            if k == self.last:
                preds[active] = logits.argmax(dim=1)
                exits[active] = self.exit_number[k]
                break
            leave = self.entropy(logits) < self.threshold
            if bool(leave.any()):
                preds[active[leave]] = logits[leave].argmax(dim=1)
                exits[active[leave]] = self.exit_number[k]
                stay = ~leave
                if not bool(stay.any()):
                    break
                active = active[stay]
                carry = tuple(t[stay] for t in carry)
        return preds.numpy(), exits.numpy()


def _evaluate(fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], x: np.ndarray,
              batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    preds, exits = [], []
    for start in range(0, len(x), batch):
        p, e = fn(np.ascontiguousarray(x[start:start + batch]))
        preds.append(p)
        exits.append(e)
    return np.concatenate(preds), None if exits[0] is None else np.concatenate(exits)  # type: ignore[arg-type]


def _shares(exits: np.ndarray, num_exits: int) -> list[float]:
    return (np.bincount(exits, minlength=num_exits) / len(exits)).tolist()


def bench_batch(prep: Prepared, full: ort.InferenceSession, session: ExitSession, eager: EagerEarlyExit,
                x: np.ndarray, y: np.ndarray, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy, exit shares, latency, speedups and cost models at one batch size."""
    pkg = session.package
    num_exits = session.num_exits
    assert pkg.full_model is not None
    full_in, full_out = pkg.full_model.inputs[0], [pkg.full_model.logits]
    pol = get_policy(pkg.policies[0])
    never = [-1.0 if pol.direction == "lower" else 1e30] * (num_exits - 1)  # entropy >= 0: never exits

    def full_call(xb: np.ndarray) -> list[np.ndarray]:
        return full.run(full_out, {full_in: xb})

    def all_stages(xb: np.ndarray) -> Any:
        return session.run(xb, thresholds=never)

    # --- accuracy and exit shares: every test sample, untimed ---
    evals = {
        "full_ort": _evaluate(lambda xb: (full_call(xb)[0].argmax(axis=1), None), x, batch),
        "eager_torch": _evaluate(eager.run, x, batch),
        "exitsession": _evaluate(lambda xb: ((r := session.run(xb)).predictions, r.exit_index), x, batch),
    }

    # --- timing ---
    if batch == 1:
        inputs = [x[i:i + 1] for i in range(len(x))]
        passes, warmup = args.passes, args.warmup
    else:
        inputs = []
        for p in range(args.passes):
            order = np.arange(len(x)) if p == 0 else np.random.default_rng([args.seed, p]).permutation(len(x))
            inputs += [np.ascontiguousarray(x[order[s:s + batch]])
                       for s in range(0, len(x) - batch + 1, batch)]
        passes, warmup = 1, args.warmup_batches
        if not inputs:
            raise SystemExit(f"--samples {len(x)} gives no full batch of {batch}")
    overhead_ns: list[float] = []
    stage_ms_all: list[tuple[float, ...]] = []
    hooks = {
        2: lambda r, took: overhead_ns.append(took - sum(r.stage_ms) * 1e6),
        3: lambda r, _took: stage_ms_all.append(r.stage_ms),
    }
    log(f"[{prep.model_name}] timing batch {batch}: {len(inputs)} inputs x {passes} pass(es), "
        f"4 interleaved contenders ...")
    started = time.perf_counter()
    times = interleaved_timing([full_call, eager.run, session.run, all_stages], inputs, passes, warmup,
                               on_result=hooks, block=args.block)
    log(f"[{prep.model_name}] batch {batch} timed in {time.perf_counter() - started:.1f} s")
    stats = {name: LatencyStats.from_ns(times[j], batch=batch) for j, name in enumerate(CONTENDERS)}
    all_stats = LatencyStats.from_ns(times[3], batch=batch)

    base = stats["full_ort"]
    contenders: dict[str, Any] = {}
    for name in CONTENDERS:
        preds, exits = evals[name]
        s = stats[name]
        contenders[name] = {
            "label": LABELS[name],
            "accuracy": float((preds == y).mean()),
            "exit_shares": None if exits is None else _shares(exits, num_exits),
            "latency_ms": stats_dict(s),
            "speedup_p50": base.p50 / s.p50,
            "speedup_mean": base.mean / s.mean,
        }

    # --- cost models, with ExitSession's exit shares ---
    shares = np.array(contenders["exitsession"]["exit_shares"])
    exit_stages = pkg.exit_stages
    stage_flops = np.array([float(s.cost["flops"]) for s in pkg.stages])
    full_flops = float(pkg.full_model.cost["flops"])
    cum_flops = np.cumsum(stage_flops)
    expected_flops = float(sum(shares[e] * cum_flops[k] for e, k in enumerate(exit_stages)))
    flops_speedup = full_flops / expected_flops
    stage_ms = np.median(np.array(stage_ms_all), axis=0)
    cum_ms = np.cumsum(stage_ms)
    expected_ms = float(sum(shares[e] * cum_ms[k] for e, k in enumerate(exit_stages)))
    ms_speedup = base.p50 / expected_ms
    measured = contenders["exitsession"]
    cost = {
        "flops": {
            "full_model_flops": full_flops,
            "stage_flops": stage_flops.tolist(),
            "exit_flops": [float(s.cost.get("exit_flops", 0)) for s in pkg.stages],
            "expected_flops_per_sample": expected_flops,
            "speedup": flops_speedup,
            "measured_over_model_p50": measured["speedup_p50"] / flops_speedup,
            "measured_over_model_mean": measured["speedup_mean"] / flops_speedup,
        },
        "stage_ms": {
            "what": f"median onnxruntime ms per stage (ExitResult.stage_ms) over all-stages runs at batch "
                    f"{batch}; reference: full ORT p50",
            "median_stage_ms": stage_ms.tolist(),
            "all_stages_sum_ms": float(cum_ms[-1]),
            "all_stages_call_latency_ms": stats_dict(all_stats),
            "expected_ms_per_call": expected_ms,
            "speedup": ms_speedup,
            "measured_over_model_p50": measured["speedup_p50"] / ms_speedup,
            "measured_over_model_mean": measured["speedup_mean"] / ms_speedup,
        },
    }
    eager_exits, rt_exits = evals["eager_torch"][1], evals["exitsession"][1]
    assert eager_exits is not None and rt_exits is not None
    return {
        "batch": batch,
        "test_samples": len(x),
        "timed_calls_per_contender": len(times[0]),
        "timed_samples_per_contender": len(times[0]) * batch,
        "warmup_calls": warmup,
        "contenders": contenders,
        "cost_models": cost,
        "runtime_overhead_us": {
            "median": float(np.median(overhead_ns)) / 1e3,
            "p95": float(np.percentile(overhead_ns, 95)) / 1e3,
            "what": "wall time of ExitSession.run minus the sum of its stage_ms, per call",
        },
        "eager_vs_exitsession": {
            "different_exit": int((eager_exits != rt_exits).sum()),
            "different_prediction": int((evals["eager_torch"][0] != evals["exitsession"][0]).sum()),
        },
    }


def print_block(model: str, prep: Prepared, res: dict[str, Any], passes: int, block: int) -> None:
    b = res["batch"]
    calls = res["timed_calls_per_contender"]
    how = (f"{res['test_samples']} test samples x {passes} pass(es)" if b == 1
           else f"{calls} full batches of {b} over {passes} pass(es)")
    inter = "per input" if block == 1 else f"per block of {block} inputs"
    print(f"\n=== {model} · batch {b} · {how} = {calls} timed calls per contender, "
          f"interleaved {inter} ===")
    cal = prep.calibration
    print(f"shared entropy threshold {prep.threshold:.5g} (calibration split, {cal['samples']} samples: "
          f"accuracy {cal['early_exit_accuracy']:.2%} vs last exit {cal['full_accuracy']:.2%}, "
          f"max drop {cal['max_drop']:.1%}); accuracy below on {res['test_samples']} test samples")
    rows = []
    for c in res["contenders"].values():
        s = c["latency_ms"]
        shares = "-" if c["exit_shares"] is None else " ".join(f"{v:.3f}" for v in c["exit_shares"])
        rows.append([c["label"], f"{c['accuracy']:.2%}", shares, fmt_ms(s["p50"]), fmt_ms(s["p95"]),
                     fmt_ms(s["p99"]), fmt_ms(s["mean"]), f"{s['throughput']:.0f}",
                     f"{c['speedup_p50']:.2f}x", f"{c['speedup_mean']:.2f}x"])
    print(table(["contender", "accuracy", "exit shares", "p50 ms", "p95 ms", "p99 ms", "mean ms",
                 "samples/s", "speedup p50", "speedup mean"], rows, "lrlrrrrrrr"))
    es = res["contenders"]["exitsession"]
    f, m = res["cost_models"]["flops"], res["cost_models"]["stage_ms"]
    print(f"ExitSession measured: {es['speedup_p50']:.2f}x (p50), {es['speedup_mean']:.2f}x (mean) "
          "vs full ORT")
    print(f"  cost model, FLOPs:    {f['speedup']:.2f}x  (full {f['full_model_flops'] / 1e6:.3f} MFLOP, "
          f"expected {f['expected_flops_per_sample'] / 1e6:.3f} MFLOP/sample)   "
          f"measured/model {f['measured_over_model_p50']:.2f} (p50), "
          f"{f['measured_over_model_mean']:.2f} (mean)")
    print(f"  cost model, stage ms: {m['speedup']:.2f}x  (expected {fmt_ms(m['expected_ms_per_call'])} ms "
          f"vs full ORT p50 {fmt_ms(res['contenders']['full_ort']['latency_ms']['p50'])} ms)   "
          f"measured/model {m['measured_over_model_p50']:.2f} (p50), "
          f"{m['measured_over_model_mean']:.2f} (mean)")
    tot_f, tot_ms = sum(f["stage_flops"]), m["all_stages_sum_ms"]
    for k, (fl, ms) in enumerate(zip(f["stage_flops"], m["median_stage_ms"])):
        print(f"    stage {k}: {fl / 1e6:8.3f} MFLOP ({fl / tot_f:6.1%} of FLOPs)   "
              f"{fmt_ms(ms)} ms ({ms / tot_ms:6.1%} of stage time)")
    print(f"    all stages run: {fmt_ms(tot_ms)} ms in onnxruntime (sum of stage medians), "
          f"{fmt_ms(m['all_stages_call_latency_ms']['p50'])} ms per call (p50); "
          f"full graph {fmt_ms(res['contenders']['full_ort']['latency_ms']['p50'])} ms")
    o = res["runtime_overhead_us"]
    print(f"runtime overhead (wall of ExitSession.run - sum of stage_ms): median {o['median']:.1f} µs, "
          f"p95 {o['p95']:.1f} µs per call")
    d = res["eager_vs_exitsession"]
    print(f"eager torch vs ExitSession: {d['different_exit']} sample(s) left at a different exit, "
          f"{d['different_prediction']} different prediction(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = timing_parser(__doc__, zoo_models=True, block=1)
    return parse_timing_args(ap, argv, {"passes": (3, 1), "samples": (1000, 200), "warmup": (200, 50),
                                        "warmup_batches": (20, 3)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_torch_thread()
    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "bench_mnist",
        "machine": machine,
        "config": {
            "models": args.models, "epochs": {"blenet": args.epochs_blenet, "bresnet": args.epochs_bresnet},
            "seed": args.seed, "passes": args.passes, "samples": args.samples,
            "batch_sizes": args.batch_sizes,
            "warmup_calls_batch1": args.warmup, "warmup_calls_batched": args.warmup_batches,
            "quick": args.quick, "max_drop": MAX_DROP, "train_threads": args.train_threads,
            "onnxruntime_threads": {"intra_op": 1, "inter_op": 1, "spinning": False},
            "torch_threads": {"intra_op": torch.get_num_threads(),
                              "inter_op": torch.get_num_interop_threads()},
            "gc_disabled_while_timing": True, "interleave_block": args.block,
        },
        "models": {},
    }
    print(f"bench_mnist: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPU(s), "
          f"python {machine['python']}, onnxruntime {machine['onnxruntime']}, torch {torch.__version__}; "
          f"1 thread each" + ("; QUICK smoke run, not for reporting" if args.quick else ""))
    if args.block == 1:
        print("note: interleaving per input runs every call right after another contender's call (cold "
              "caches); Python-heavy paths pay most. --block 100 measures each contender warm.")
    for model_name in args.models:
        epochs = args.epochs_blenet if model_name == "blenet" else args.epochs_bresnet
        prep = prepare(model_name, epochs, args.seed, train_threads=args.train_threads)
        torch.set_num_threads(1)
        test = prep.splits.test
        x, y = test.x[:args.samples], test.y[:args.samples]
        full = ort.InferenceSession(str(prep.package / "full.onnx"), session_options(1, False, False),
                                    providers=["CPUExecutionProvider"])
        session = ExitSession(prep.package)
        eager = EagerEarlyExit(prep.model, prep.threshold)
        entry: dict[str, Any] = {
            "epochs": epochs, "seed": args.seed, "package": str(prep.package),
            "threshold": prep.threshold, "calibration": prep.calibration,
            "exitsession_options": describe(session), "batches": {},
        }
        for batch in args.batch_sizes:
            res = bench_batch(prep, full, session, eager, x, y, batch, args)
            entry["batches"][str(batch)] = res
            print_block(model_name, prep, res, args.passes, args.block)
            sys.stdout.flush()
        report["models"][model_name] = entry
    try:
        report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
