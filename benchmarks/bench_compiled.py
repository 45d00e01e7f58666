"""Compiled exits vs the stage loop vs the full model on MNIST-5k, in one interleaved run.

For each zoo model (``blenet``, ``bresnet``): the trained model and its calibrated package
come from ``_common.prepare`` (cached in ``benchmarks/.cache``; a cached package exported
before compiled graphs existed gets its ``compiled.onnx`` from
``edgeexit.export.compile.compile_package``).  On the TEST split, at batch 1 and 64, four
contenders run side by side:

- ``full``: ``onnxruntime.InferenceSession`` on the package's ``full.onnx``;
- ``stage loop``: ``ExitSession(pkg, engine="stages")``, one onnxruntime session per
  stage, Python deciding between stages;
- ``compiled``: ``ExitSession(pkg, engine="compiled")``, the whole model as one graph
  deciding its exits in-graph (If / NonZero / Gather / ScatterND), one ``session.run``;
- ``compiled, bare ORT``: the same ``compiled.onnx`` in a plain ``InferenceSession``,
  one ``session.run`` with the package's thresholds and no edgeexit Python around it
  (compiled minus bare = what the ExitSession wrapper costs per call).

Every session: ExitSession's default options (``ThreadSettings().options()``: 1 intra-op
thread, no spinning, ORT_ENABLE_ALL), CPU provider.  Timing: ``time.perf_counter_ns`` around
each call, warm-up excluded, the contenders interleaved per block of ``--block``
samples (batch 1: that many consecutive inputs; batch 64: ``max(1, block // 64)``
batches) with a rotating order, several passes; Python's gc paused while timing.  At
batch 1 a hidden fifth contender (the stage loop with ``early_exits=False``) gives the
median onnxruntime ms per stage of the stage-time cost model: expected ms per sample =
sum over exits of exit share x the stage time up to that exit; cost-model speedup =
full mean / expected.  At batch 64 every pass takes the full 64-sample batches of a
seeded permutation of the test samples (a partial last batch is not timed).

Accuracy and exit shares come from a separate untimed pass over every test sample at
each batch size, in which the compiled graph (ExitSession and bare) must give the same
predictions and exits as the stage loop on every sample (else the exit status is 1;
missed targets do not change it).

Targets (printed PASS/MISS with the figures): batch 1: compiled mean speedup vs full
>= 0.95 x the cost-model speedup, and compiled mean <= stage-loop mean, on every model;
batch 64: compiled throughput >= the stage loop's and >= 1.6 x the full model's.

Usage::

    python benchmarks/bench_compiled.py --json     # full run -> benchmarks/results/bench_compiled.json
    python benchmarks/bench_compiled.py --quick    # smoke run, numbers not for reporting
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _common import (
    BENCH_DIR,
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
    timing_config,
    timing_parser,
    write_json,
)

from edgeexit.measure import LatencyStats
from edgeexit.package import COMPILED_OUTPUTS, Package, load_package
from edgeexit.runtime import ExitSession
from edgeexit.runtime.session import describe

DEFAULT_JSON = BENCH_DIR / "results" / "bench_compiled.json"
CONTENDERS = ("full", "stages", "compiled", "bare")
LABELS = {
    "full": "full model, onnxruntime",
    "stages": "stage loop, ExitSession",
    "compiled": "compiled, ExitSession",
    "bare": "compiled, bare ORT",
}
# targets
COST_MODEL_SHARE = 0.95      # batch 1: compiled speedup >= this x the cost-model speedup
FULL_THROUGHPUT_GAIN = 1.6   # batch 64: compiled throughput >= this x the full model's


def ensure_compiled(prep: Prepared) -> Package:
    """The package, with a compiled graph (added when the cached package predates them)."""
    package = load_package(prep.package)
    if package.compiled is None:
        from edgeexit.export.compile import compile_package

        log(f"[{prep.model_name}] cached package has no compiled graph; compiling it")
        compile_package(prep.package, log=lambda line: log(f"[{prep.model_name}] {line}"))
        package = load_package(prep.package)
    assert package.compiled is not None
    return package


class Contenders:
    """The four sessions on one package, each with a ``call(x)`` for the timing loop."""

    def __init__(self, package: Package) -> None:
        self.stages = ExitSession(package.root, engine="stages")
        self.compiled = ExitSession(package.root, engine="compiled")
        options = self.compiled.thread_settings   # the plain sessions get ExitSession's options
        providers = ["CPUExecutionProvider"]
        assert package.full_model is not None and package.compiled is not None
        self.full = ort.InferenceSession(str(package.file_path(package.full_model.file)), options.options(),
                                         providers=providers)
        self.full_input, self.full_outputs = package.full_model.inputs[0], [package.full_model.logits]
        spec = package.compiled
        self.bare = ort.InferenceSession(str(package.file_path(spec.file)), options.options(), providers=providers)
        self.bare_input, self.bare_thresholds = spec.inputs[0], spec.thresholds
        self.bare_outputs = [spec.outputs[name] for name in COMPILED_OUTPUTS]   # logits, exit_index, score
        self.thresholds = np.asarray(package.thresholds, dtype=np.float64)
        self.calls: dict[str, Callable[[np.ndarray], Any]] = {
            "full": self.run_full, "stages": self.stages.run, "compiled": self.compiled.run, "bare": self.run_bare,
        }

    def run_full(self, x: np.ndarray) -> list[np.ndarray]:
        return self.full.run(self.full_outputs, {self.full_input: x})  # type: ignore[no-any-return]

    def run_bare(self, x: np.ndarray) -> list[np.ndarray]:
        return self.bare.run(self.bare_outputs, {self.bare_input: x,  # type: ignore[no-any-return]
                                                 self.bare_thresholds: self.thresholds})

    def all_stages(self, x: np.ndarray) -> Any:
        return self.stages.run(x, early_exits=False)

    def evaluate(self, x: np.ndarray, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """(predictions, exits or None, logits) of every contender over ``x``, untimed."""
        out: dict[str, list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]] = {c: [] for c in CONTENDERS}
        for start in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[start:start + batch])
            logits = self.run_full(xb)[0]
            out["full"].append((logits.argmax(axis=1), None, logits))
            for c in ("stages", "compiled"):
                r = self.calls[c](xb)
                out[c].append((r.predictions, r.exit_index, r.logits))
            logits, exits, _ = self.run_bare(xb)
            out["bare"].append((logits.argmax(axis=1), exits, logits))
        return {c: (np.concatenate([p for p, _, _ in rows]),
                    None if rows[0][1] is None else np.concatenate([e for _, e, _ in rows]),  # type: ignore[misc]
                    np.concatenate([z for _, _, z in rows]))
                for c, rows in out.items()}


def timed_inputs(x: np.ndarray, batch: int, args: argparse.Namespace) -> tuple[list[np.ndarray], int, int, int]:
    """(inputs, passes, warm-up calls, interleave block) for one batch size."""
    if batch == 1:
        return [x[i:i + 1] for i in range(len(x))], args.passes, args.warmup, args.block
    inputs = []
    for p in range(args.passes):
        order = np.arange(len(x)) if p == 0 else np.random.default_rng([args.seed, p]).permutation(len(x))
        inputs += [np.ascontiguousarray(x[order[s:s + batch]]) for s in range(0, len(x) - batch + 1, batch)]
    if not inputs:
        raise SystemExit(f"--samples {len(x)} gives no full batch of {batch}")
    return inputs, 1, args.warmup_batches, max(1, args.block // batch)


def bench_batch(name: str, package: Package, run: Contenders, x: np.ndarray, y: np.ndarray, batch: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy, exit shares, agreement, latency, speedups (and at batch 1 the cost model) at one batch size."""
    num_exits = len(package.exit_stages)
    evals = run.evaluate(x, batch)
    ref_p, ref_e, ref_z = evals["stages"]
    agreement = {
        c: {"different_predictions": int((evals[c][0] != ref_p).sum()),
            "different_exits": int((evals[c][1] != ref_e).sum()),
            "max_abs_logit_difference": float(np.abs(evals[c][2] - ref_z).max())}
        for c in ("compiled", "bare")
    }

    inputs, passes, warmup, block = timed_inputs(x, batch, args)
    calls = [run.calls[c] for c in CONTENDERS]
    stage_ms_rows: list[tuple[float, ...]] = []
    hooks: dict[int, Callable[[Any, int], None]] = {}
    if batch == 1:   # hidden contender: every stage, for the stage-time cost model
        calls.append(run.all_stages)
        hooks[len(CONTENDERS)] = lambda r, _took: stage_ms_rows.append(r.stage_ms)
    log(f"[{name}] timing batch {batch}: {len(inputs)} inputs x {passes} pass(es), {len(calls)} contenders "
        f"interleaved per block of {block} input(s) ...")
    started = time.perf_counter()
    times = interleaved_timing(calls, inputs, passes, warmup, on_result=hooks, block=block)
    log(f"[{name}] batch {batch} timed in {time.perf_counter() - started:.1f} s")

    stats = {c: LatencyStats.from_ns(times[j], batch=batch) for j, c in enumerate(CONTENDERS)}
    base = stats["full"]
    contenders: dict[str, Any] = {}
    for c in CONTENDERS:
        preds, exits, _ = evals[c]
        s = stats[c]
        contenders[c] = {
            "label": LABELS[c],
            "accuracy": float((preds == y).mean()),
            "exit_shares": None if exits is None else (np.bincount(exits, minlength=num_exits) / len(exits)).tolist(),
            "latency_ms": stats_dict(s),
            "latency_ms_per_sample": {"p50": s.p50 / batch, "p95": s.p95 / batch, "mean": s.mean / batch},
            "speedup_mean": base.mean / s.mean,
            "speedup_p50": base.p50 / s.p50,
        }
    comp, bare = stats["compiled"], stats["bare"]
    res: dict[str, Any] = {
        "batch": batch,
        "test_samples": len(x),
        "timed_calls_per_contender": len(times[0]),
        "timed_samples_per_contender": len(times[0]) * batch,
        "warmup_calls": warmup,
        "interleave_block_inputs": block,
        "contenders": contenders,
        "agreement_with_stage_loop": agreement,
        "exitsession_wrapper_us": {
            "mean": (comp.mean - bare.mean) * 1e3, "p50": (comp.p50 - bare.p50) * 1e3,
            "what": "compiled through ExitSession minus the same graph in a bare InferenceSession, per call",
        },
    }
    if batch == 1:
        res["cost_model"] = cost_model(package, contenders, stage_ms_rows, LatencyStats.from_ns(times[-1]))
    return res


def cost_model(package: Package, contenders: dict[str, Any], rows: list[tuple[float, ...]],
               all_stages: LatencyStats) -> dict[str, Any]:
    """Stage-time cost model at batch 1: median stage ms x the stage loop's exit shares."""
    shares = np.array(contenders["stages"]["exit_shares"])
    stage_ms = np.median(np.array(rows), axis=0)
    cum_ms = np.cumsum(stage_ms)
    expected = float(sum(shares[e] * cum_ms[k] for e, k in enumerate(package.exit_stages)))
    full_mean = contenders["full"]["latency_ms"]["mean"]
    speedup = full_mean / expected
    return {
        "what": "median onnxruntime ms per stage (ExitResult.stage_ms of the stage loop with early_exits=False, "
                "same interleaved run) x exit shares; reference: full model mean",
        "median_stage_ms": stage_ms.tolist(),
        "all_stages_sum_ms": float(cum_ms[-1]),
        "all_stages_call_latency_ms": stats_dict(all_stages),
        "expected_ms_per_sample": expected,
        "speedup": speedup,
        "measured_over_model_mean": {c: contenders[c]["speedup_mean"] / speedup
                                     for c in ("stages", "compiled", "bare")},
        "compiled_mean_minus_expected_us": (contenders["compiled"]["latency_ms"]["mean"] - expected) * 1e3,
        "bare_mean_minus_expected_us": (contenders["bare"]["latency_ms"]["mean"] - expected) * 1e3,
    }


def check_targets(model: str, batches: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/MISS of every target that the measured batch sizes allow."""
    out = []

    def target(what: str, ok: bool, figures: str) -> None:
        out.append({"model": model, "target": what, "pass": bool(ok), "figures": figures})

    if "1" in batches:
        b1 = batches["1"]
        c, s = b1["contenders"]["compiled"], b1["contenders"]["stages"]
        model_speedup = b1["cost_model"]["speedup"]
        target(f"batch 1: compiled mean speedup >= {COST_MODEL_SHARE} x cost-model speedup",
               c["speedup_mean"] >= COST_MODEL_SHARE * model_speedup,
               f"{c['speedup_mean']:.2f}x vs {COST_MODEL_SHARE} x {model_speedup:.2f}x = "
               f"{COST_MODEL_SHARE * model_speedup:.2f}x (ratio {c['speedup_mean'] / model_speedup:.3f})")
        cm, sm = c["latency_ms"]["mean"], s["latency_ms"]["mean"]
        target("batch 1: compiled mean <= stage loop mean", cm <= sm,
               f"{fmt_ms(cm)} ms vs {fmt_ms(sm)} ms ({sm / cm:.2f}x)")
    for key, res in batches.items():
        if key == "1":
            continue
        cs = res["contenders"]
        ct, st, ft = (cs[c]["latency_ms"]["throughput"] for c in ("compiled", "stages", "full"))
        target(f"batch {key}: compiled throughput >= stage loop's", ct >= st,
               f"{ct:.0f} vs {st:.0f} samples/s ({ct / st:.2f}x)")
        target(f"batch {key}: compiled throughput >= {FULL_THROUGHPUT_GAIN} x full model's",
               ct >= FULL_THROUGHPUT_GAIN * ft,
               f"{ct:.0f} vs {FULL_THROUGHPUT_GAIN} x {ft:.0f} = {FULL_THROUGHPUT_GAIN * ft:.0f} samples/s "
               f"({ct / ft:.2f}x)")
    return out


def print_block(name: str, res: dict[str, Any], passes: int) -> None:
    b = res["batch"]
    print(f"\n=== {name} · batch {b} · {res['test_samples']} test samples, {res['timed_calls_per_contender']} "
          f"timed calls per contender ({passes} pass(es)), interleaved per {res['interleave_block_inputs']} "
          "input(s) ===")
    rows = []
    for r in res["contenders"].values():
        s, ps = r["latency_ms"], r["latency_ms_per_sample"]
        shares = "-" if r["exit_shares"] is None else " ".join(f"{v:.3f}" for v in r["exit_shares"])
        per_sample = [fmt_ms(ps["p50"]), fmt_ms(ps["p95"]), fmt_ms(ps["mean"])] if b > 1 else []
        rows.append([r["label"], f"{r['accuracy']:.2%}", shares, fmt_ms(s["p50"]), fmt_ms(s["p95"]),
                     fmt_ms(s["mean"]), *per_sample, f"{s['throughput']:.0f}", f"{r['speedup_mean']:.2f}x",
                     f"{r['speedup_p50']:.2f}x"])
    per_sample_heads = ["p50 ms/sample", "p95 ms/sample", "mean ms/sample"] if b > 1 else []
    heads = ["contender", "accuracy", "exit shares", "p50 ms", "p95 ms", "mean ms", *per_sample_heads,
             "samples/s", "speedup mean", "speedup p50"]
    print(table(heads, rows, "lrl" + "r" * (len(heads) - 3)))
    agree = res["agreement_with_stage_loop"]
    same = all(a["different_predictions"] == 0 and a["different_exits"] == 0 for a in agree.values())
    print(("identical to the stage loop on every sample: " if same else "DIFFERENT from the stage loop: ")
          + "; ".join(f"{LABELS[c]}: {a['different_predictions']} prediction(s), {a['different_exits']} exit(s) "
                      f"differ, max |logit diff| {a['max_abs_logit_difference']:.2g}" for c, a in agree.items()))
    w = res["exitsession_wrapper_us"]
    print(f"ExitSession wrapper around the compiled graph: {w['mean']:.1f} µs mean, {w['p50']:.1f} µs p50 per call")
    m = res.get("cost_model")
    if m is None:
        return
    tot = m["all_stages_sum_ms"]
    print(f"stage-time cost model: expected {fmt_ms(m['expected_ms_per_sample'])} ms/sample -> "
          f"{m['speedup']:.2f}x vs full mean; measured/model: " + ", ".join(
              f"{LABELS[c]} {v:.3f}" for c, v in m["measured_over_model_mean"].items()))
    print("  median stage ms: " + "   ".join(f"stage {k}: {fmt_ms(ms)} ({ms / tot:.1%})"
                                             for k, ms in enumerate(m["median_stage_ms"]))
          + f"   (all stages: {fmt_ms(tot)} ms in onnxruntime, "
            f"{fmt_ms(m['all_stages_call_latency_ms']['p50'])} ms per call p50)")
    print(f"  compiled mean - expected: {m['compiled_mean_minus_expected_us']:.1f} µs through ExitSession, "
          f"{m['bare_mean_minus_expected_us']:.1f} µs bare (in-graph decisions + one session.run)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = timing_parser(__doc__, zoo_models=True, block=100)
    for action in ap._actions:   # --json with no value writes the default results file
        if action.dest == "json":
            action.nargs, action.const = "?", DEFAULT_JSON
            action.help = ("write every number and machine info here (no value: "
                           f"{DEFAULT_JSON.relative_to(BENCH_DIR.parent)})")
    return parse_timing_args(ap, argv, {"passes": (3, 1), "samples": (1000, 200), "warmup": (200, 50),
                                        "warmup_batches": (20, 3)})


def run_model(model_name: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    epochs = args.epochs_blenet if model_name == "blenet" else args.epochs_bresnet
    prep = prepare(model_name, epochs, args.seed, train_threads=args.train_threads)
    package = ensure_compiled(prep)
    run = Contenders(package)
    assert package.compiled is not None and package.full_model is not None
    stage_bytes = sum(int(package.files[s.file]["size"]) for s in package.stages)
    compiled_bytes = int(package.files[package.compiled.file]["size"])
    full_bytes = int(package.files[package.full_model.file]["size"])
    cal = prep.calibration
    entry: dict[str, Any] = {
        "epochs": epochs, "seed": args.seed, "package": str(prep.package), "threshold": prep.threshold,
        "calibration": cal, "exit_stages": package.exit_stages, "exitsession_options": describe(run.compiled),
        "sizes": {"stage_files_bytes": stage_bytes, "compiled_bytes": compiled_bytes, "full_bytes": full_bytes,
                  "compiled_over_stages": compiled_bytes / stage_bytes,
                  "stage_files": {s.file: int(package.files[s.file]["size"]) for s in package.stages}},
        "batches": {},
    }
    print(f"\n##### {model_name}: {len(package.stages)} stages, exits after stages {package.exit_stages}; "
          f"shared entropy threshold {prep.threshold:.5g} (calibration split, {cal['samples']} samples: accuracy "
          f"{cal['early_exit_accuracy']:.2%} vs last exit {cal['full_accuracy']:.2%})")
    print(f"compiled.onnx {compiled_bytes:,} bytes vs stage files {stage_bytes:,} bytes "
          f"({compiled_bytes / stage_bytes:.1%}; {compiled_bytes - stage_bytes:+,} bytes); full.onnx {full_bytes:,}")
    x, y = prep.splits.test.x[:args.samples], prep.splits.test.y[:args.samples]
    for batch in args.batch_sizes:
        res = bench_batch(model_name, package, run, x, y, batch, args)
        entry["batches"][str(batch)] = res
        print_block(model_name, res, args.passes)
        sys.stdout.flush()
    return entry, check_targets(model_name, entry["batches"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_torch_thread()
    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "bench_compiled",
        "machine": machine,
        "config": {
            **timing_config(args),
            "train_threads": args.train_threads,
            "onnxruntime_threads": {"intra_op": 1, "inter_op": 1, "spinning": False},
            "gc_disabled_while_timing": True,
            "targets": {"batch1_compiled_speedup_over_cost_model_speedup": COST_MODEL_SHARE,
                        "batch1_compiled_mean_le_stage_loop_mean": True,
                        "batched_compiled_throughput_ge_stage_loop": True,
                        "batched_compiled_throughput_over_full": FULL_THROUGHPUT_GAIN},
        },
        "models": {},
    }
    print(f"bench_compiled: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPU(s), "
          f"python {machine['python']}, onnxruntime {machine['onnxruntime']}; 1 onnxruntime thread per session"
          + ("; QUICK smoke run, not for reporting" if args.quick else ""))
    targets: list[dict[str, Any]] = []
    for model_name in args.models:
        report["models"][model_name], model_targets = run_model(model_name, args)
        targets += model_targets
    report["targets"] = targets
    print("\n=== targets" + (" (QUICK run: indicative only)" if args.quick else "") + " ===")
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['model']:8s} {t['target']}: {t['figures']}")
    try:
        report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if args.json is not None:
        write_json(Path(args.json), report)
    disagree = [f"{m} batch {b}" for m, entry in report["models"].items() for b, res in entry["batches"].items()
                if any(a["different_predictions"] or a["different_exits"]
                       for a in res["agreement_with_stage_loop"].values())]
    if disagree:
        print(f"ERROR: the compiled graph and the stage loop disagree ({', '.join(disagree)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
