"""fp32 vs int8, full model vs early exit, on MNIST-5k: accuracy, package size, latency.

For each zoo model (``blenet``, ``bresnet``): take the trained model and its calibrated
fp32 package from ``_common.prepare`` (cached in ``benchmarks/.cache``), quantize the
package with ``edgeexit.export.quantize.quantize_package`` (static QDQ for these conv
stages, calibrated on the calibration split, each stage fed the carries of the fp32
stages before it; uint8 activations / int8 weights unless ``--activation-type int8``),
recalibrate the shared entropy threshold of the int8 package on the calibration split
(same ``max_drop`` as the fp32 one), then on the TEST split compare:

- ``fp32 full``: ``onnxruntime.InferenceSession`` on the fp32 package's ``full.onnx``;
- ``fp32 early exit``: ``ExitSession`` on the fp32 package;
- ``int8 full``: ``InferenceSession`` on the int8 package's ``full.onnx``;
- ``int8 early exit``: ``ExitSession`` on the int8 package.

Every session: 1 intra-op thread, no spinning (``session_options(1, False, False)``,
ExitSession's defaults).  Timing: ``time.perf_counter_ns`` around each call, warm-up
excluded, the four contenders interleaved per block of ``--block`` samples (batch 1:
that many consecutive inputs; batch 64: ``max(1, block // 64)`` batches) with a rotating
order, several passes; Python's gc paused while timing.  At batch 64 every pass takes
the full batches of a seeded permutation of the test samples.  Accuracy and exit shares
come from a separate untimed pass over every test sample.  Package size is the bytes
of the stage graphs (what an early-exit deployment ships), with ``full.onnx`` apart.

Usage::

    python benchmarks/bench_int8.py --json benchmarks/results/bench_int8.json
    python benchmarks/bench_int8.py --quick            # smoke run, numbers not for reporting
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
from _common import (
    CACHE_DIR,
    MAX_DROP,
    cache_key,
    fmt_ms,
    interleaved_timing,
    log,
    machine_info,
    parse_timing_args,
    prepare,
    stats_dict,
    table,
    timing_config,
    timing_parser,
    write_json,
)

from edgeexit.measure import LatencyStats
from edgeexit.package import Package
from edgeexit.runtime import ExitSession
from edgeexit.runtime._threads import session_options
from edgeexit.runtime.session import describe

CONTENDERS = ("fp32_full", "fp32_early_exit", "int8_full", "int8_early_exit")
LABELS = {
    "fp32_full": "fp32 full model",
    "fp32_early_exit": "fp32 early exit",
    "int8_full": "int8 full model",
    "int8_early_exit": "int8 early exit",
}


def stage_bytes(pkg: Package) -> int:
    return sum(int(pkg.files[s.file]["size"]) for s in pkg.stages)


def full_bytes(pkg: Package) -> int | None:
    return None if pkg.full_model is None else int(pkg.files[pkg.full_model.file]["size"])


class Full:
    """The package's ``full.onnx`` in one plain onnxruntime session."""

    def __init__(self, pkg: Package) -> None:
        assert pkg.full_model is not None, "prepare() exports the full model"
        self.session = ort.InferenceSession(str(pkg.file_path(pkg.full_model.file)), session_options(1, False, False),
                                            providers=["CPUExecutionProvider"])
        self.input, self.outputs = pkg.full_model.inputs[0], [pkg.full_model.logits]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input: x})


def _evaluate(fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], x: np.ndarray,
              batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    preds, exits = [], []
    for start in range(0, len(x), batch):
        p, e = fn(np.ascontiguousarray(x[start:start + batch]))
        preds.append(p)
        exits.append(e)
    return np.concatenate(preds), None if exits[0] is None else np.concatenate(exits)  # type: ignore[arg-type]


def bench_batch(name: str, calls: dict[str, Any], x: np.ndarray, y: np.ndarray, batch: int,
                num_exits: int, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy, exit shares, latency and speedups of the four contenders at one batch size."""
    run = {
        "fp32_full": calls["fp32_full"],
        "fp32_early_exit": calls["fp32_early_exit"].run,
        "int8_full": calls["int8_full"],
        "int8_early_exit": calls["int8_early_exit"].run,
    }
    evals = {}
    for c in CONTENDERS:
        if c.endswith("full"):
            evals[c] = _evaluate(lambda xb, f=run[c]: (f(xb)[0].argmax(axis=1), None), x, batch)
        else:
            evals[c] = _evaluate(lambda xb, f=run[c]: ((r := f(xb)).predictions, r.exit_index), x, batch)

    if batch == 1:
        inputs = [x[i:i + 1] for i in range(len(x))]
        passes, warmup, block = args.passes, args.warmup, args.block
    else:
        inputs = []
        for p in range(args.passes):
            order = np.arange(len(x)) if p == 0 else np.random.default_rng([args.seed, p]).permutation(len(x))
            inputs += [np.ascontiguousarray(x[order[s:s + batch]]) for s in range(0, len(x) - batch + 1, batch)]
        passes, warmup, block = 1, args.warmup_batches, max(1, args.block // batch)
        if not inputs:
            raise SystemExit(f"--samples {len(x)} gives no full batch of {batch}")
    stage_ms: dict[int, list[tuple[float, ...]]] = {1: [], 3: []}
    hooks = {j: (lambda r, _took, j=j: stage_ms[j].append(r.stage_ms)) for j in stage_ms}
    log(f"[{name}] timing batch {batch}: {len(inputs)} inputs x {passes} pass(es), 4 contenders interleaved "
        f"per block of {block} input(s) ...")
    started = time.perf_counter()
    times = interleaved_timing([run[c] for c in CONTENDERS], inputs, passes, warmup, on_result=hooks, block=block)
    log(f"[{name}] batch {batch} timed in {time.perf_counter() - started:.1f} s")
    stats = {c: LatencyStats.from_ns(times[j], batch=batch) for j, c in enumerate(CONTENDERS)}
    base = stats["fp32_full"]
    contenders = {}
    for c in CONTENDERS:
        preds, exits = evals[c]
        s = stats[c]
        contenders[c] = {
            "label": LABELS[c],
            "accuracy": float((preds == y).mean()),
            "exit_shares": None if exits is None else (np.bincount(exits, minlength=num_exits) / len(exits)).tolist(),
            "latency_ms": stats_dict(s),
            "speedup_p50": base.p50 / s.p50,
            "speedup_mean": base.mean / s.mean,
        }

    def per_stage(rows: list[tuple[float, ...]]) -> list[float | None]:
        # median over the calls in which the stage ran (stage_ms is 0.0 for skipped stages)
        arr = np.array(rows)
        return [float(np.median(col[col > 0])) if (col > 0).any() else None for col in arr.T]

    fp_full, q_full = evals["fp32_full"][0], evals["int8_full"][0]
    fp_ee, q_ee = evals["fp32_early_exit"], evals["int8_early_exit"]
    return {
        "batch": batch,
        "test_samples": len(x),
        "timed_calls_per_contender": len(times[0]),
        "warmup_calls": warmup,
        "interleave_block_inputs": block,
        "contenders": contenders,
        "median_stage_ms_when_run": {"fp32": per_stage(stage_ms[1]), "int8": per_stage(stage_ms[3])},
        "int8_vs_fp32": {
            "full_different_predictions": int((fp_full != q_full).sum()),
            "early_exit_different_predictions": int((fp_ee[0] != q_ee[0]).sum()),
            "early_exit_different_exit": int((fp_ee[1] != q_ee[1]).sum()),  # type: ignore[operator]
        },
    }


def print_block(name: str, info: dict[str, Any], res: dict[str, Any], passes: int) -> None:
    b = res["batch"]
    print(f"\n=== {name} · batch {b} · {res['test_samples']} test samples, {res['timed_calls_per_contender']} "
          f"timed calls per contender ({passes} pass(es)), interleaved per {res['interleave_block_inputs']} "
          "input(s) ===")
    sizes = info["sizes"]
    rows = []
    for c, r in res["contenders"].items():
        s = r["latency_ms"]
        precision, kind = c.split("_", 1)
        size = sizes[precision]["full_bytes"] if kind == "full" else sizes[precision]["stage_bytes"]
        shares = "-" if r["exit_shares"] is None else " ".join(f"{v:.3f}" for v in r["exit_shares"])
        rows.append([r["label"], f"{r['accuracy']:.2%}", shares, f"{size:,}", fmt_ms(s["p50"]), fmt_ms(s["p95"]),
                     fmt_ms(s["mean"]), f"{s['throughput']:.0f}", f"{r['speedup_p50']:.2f}x",
                     f"{r['speedup_mean']:.2f}x"])
    print(table(["contender", "accuracy", "exit shares", "bytes", "p50 ms", "p95 ms", "mean ms", "samples/s",
                 "vs fp32 full p50", "mean"], rows, "lrlrrrrrrr"))
    st = res["median_stage_ms_when_run"]
    print("median stage ms when the stage ran (ExitResult.stage_ms): " + "   ".join(
        f"stage {k}: fp32 {fmt_ms(a) if a else '-'} / int8 {fmt_ms(b_) if b_ else '-'}"
        for k, (a, b_) in enumerate(zip(st["fp32"], st["int8"]))))
    d = res["int8_vs_fp32"]
    print(f"int8 vs fp32 on the test split: full model {d['full_different_predictions']} different prediction(s); "
          f"early exit {d['early_exit_different_predictions']} different prediction(s), "
          f"{d['early_exit_different_exit']} sample(s) at a different exit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = timing_parser(__doc__, zoo_models=True, block=100)
    ap.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                    help="int8 activations type of the static QDQ stages (default uint8: U8S8)")
    ap.add_argument("--max-calibration-samples", type=int, default=512,
                    help="calibration-split samples that fix the activation ranges (default 512)")
    return parse_timing_args(ap, argv, {"passes": (3, 1), "samples": (1000, 200), "warmup": (200, 30),
                                        "warmup_batches": (10, 2)})


def run_model(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from edgeexit.export.quantize import quantize_package

    epochs = args.epochs_blenet if model_name == "blenet" else args.epochs_bresnet
    prep = prepare(model_name, epochs, args.seed)
    cal, test = prep.splits.calibration, prep.splits.test
    int8_path = CACHE_DIR / "packages" / f"{cache_key(model_name, epochs, args.seed)}-int8.eexit"
    started = time.perf_counter()
    int8_pkg = quantize_package(prep.package, int8_path, cal.x, calibration_labels=cal.y, max_drop=MAX_DROP,
                                activation_type=args.activation_type,
                                max_calibration_samples=args.max_calibration_samples, overwrite=True,
                                log=lambda line: log(f"[{model_name}] {line}"))
    quantize_s = time.perf_counter() - started
    fp32_session, int8_session = ExitSession(prep.package), ExitSession(int8_path)
    fp32_pkg = fp32_session.package
    quant = int8_pkg.manifest["quantization"]
    info: dict[str, Any] = {
        "epochs": epochs, "seed": args.seed,
        "packages": {"fp32": str(prep.package), "int8": str(int8_path)},
        "thresholds": {"fp32": fp32_pkg.thresholds, "int8": int8_pkg.thresholds},
        "fp32_calibration": prep.calibration,
        "int8_calibration": quant["thresholds"],
        "quantization": {k: v for k, v in quant.items() if k != "source_sha256"},
        "quantize_seconds": round(quantize_s, 2),
        "sizes": {
            p: {"stage_bytes": stage_bytes(pkg), "full_bytes": full_bytes(pkg),
                "stage_files": {s.file: int(pkg.files[s.file]["size"]) for s in pkg.stages}}
            for p, pkg in (("fp32", fp32_pkg), ("int8", int8_pkg))
        },
        "exitsession_options": describe(fp32_session),
        "batches": {},
    }
    calls = {"fp32_full": Full(fp32_pkg), "fp32_early_exit": fp32_session,
             "int8_full": Full(int8_pkg), "int8_early_exit": int8_session}
    x, y = test.x[:args.samples], test.y[:args.samples]
    sz = info["sizes"]
    t = info["thresholds"]
    print(f"\n##### {model_name}: stages {', '.join(s['mode'] for s in quant['stages'])} "
          f"({quant['stages'][0]['activation_type']} activations, int8 weights, per-channel; "
          f"{quant['calibration']['samples']} "
          f"calibration samples); quantized in {quantize_s:.1f} s")
    print(f"stage graphs {sz['fp32']['stage_bytes']:,} -> {sz['int8']['stage_bytes']:,} bytes "
          f"({sz['int8']['stage_bytes'] / sz['fp32']['stage_bytes']:.1%}); full.onnx {sz['fp32']['full_bytes']:,} -> "
          f"{sz['int8']['full_bytes']:,} bytes")
    ic = quant["thresholds"]
    fc = prep.calibration
    print(f"shared entropy threshold on the calibration split ({ic['samples']} samples, max drop "
          f"{ic['max_drop']:.1%}): fp32 {t['fp32'][0]:.5g} (accuracy {fc['early_exit_accuracy']:.2%} vs last exit "
          f"{fc['full_accuracy']:.2%}, exit shares {[round(v, 3) for v in fc['exit_shares']]}); int8 recalibrated "
          f"{t['int8'][0]:.5g} (accuracy {ic['accuracy']:.2%} vs last exit {ic['last_exit_accuracy']:.2%}, "
          f"exit shares {[round(v, 3) for v in ic['exit_shares']]})")
    for batch in args.batch_sizes:
        res = bench_batch(model_name, calls, x, y, batch, fp32_session.num_exits, args)
        info["batches"][str(batch)] = res
        print_block(model_name, info, res, args.passes)
        sys.stdout.flush()
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "bench_int8",
        "machine": machine,
        "config": {
            **timing_config(args),
            "activation_type": args.activation_type, "max_calibration_samples": args.max_calibration_samples,
            "onnxruntime_threads": {"intra_op": 1, "inter_op": 1, "spinning": False},
            "gc_disabled_while_timing": True,
        },
        "models": {},
    }
    print(f"bench_int8: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPU(s), "
          f"python {machine['python']}, onnxruntime {machine['onnxruntime']}; 1 onnxruntime thread per session"
          + ("; QUICK smoke run, not for reporting" if args.quick else ""))
    for model_name in args.models:
        report["models"][model_name] = run_model(model_name, args)
    try:
        report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
