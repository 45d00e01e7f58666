"""CBNet vs B-LeNet vs the full LeNet on MNIST-5k: accuracy, batch-1 latency, energy per inference.

Reproduces the comparison of CBNet (Mahmud et al.; converting autoencoder + the first
exit of a BranchyNet LeNet) on this machine's CPU, one thread, batch 1, on the
MNIST-5k TEST split, side by side in one run:

- ``full LeNet``: plain ``onnxruntime.InferenceSession`` on the B-LeNet package's
  ``full.onnx`` (LeNet without exits; ``session_options(1, False, False)``);
- ``B-LeNet, calibrated``: ``ExitSession`` on the B-LeNet package with the shared entropy
  threshold chosen on the calibration split (``shared_threshold``, max drop 0.3 points);
- ``B-LeNet, T=0.025``: the same package with BranchyNet's entropy threshold 0.025;
- ``CBNet``: ``ExitSession`` on the converter + light package (the paper's CBNet: the
  light exit always answers);
- ``CBNet + fallback``: ``ExitSession`` on the pipeline package (light exit, calibrated
  the same way against the full LeNet; the rest fall back to the full LeNet on the
  ORIGINAL image).

B-LeNet comes from the shared cache of ``bench_mnist.py`` (``benchmarks/.cache``, trained
if missing); the converter is trained on top of it on the train split and cached there
too (``cbnet-...pt``, keyed by the B-LeNet weights' sha256).  Hidden contenders time the
single graphs (converter, light, B-LeNet stage 0 and 1) with plain onnxruntime, to
explain the result; the stage times inside each ExitSession (``ExitResult.stage_ms``) are
reported beside them.

Timing: ``time.perf_counter_ns`` around each call; warm-up excluded; the contenders are
interleaved per block of ``--block`` consecutive test samples (default 100: each runs
warm, as an application loop would; ``--block 1`` interleaves per sample) with a
rotating order, over ``--passes`` passes; Python's garbage collector is off while timing.
Accuracy and exit shares come from one untimed batch-1 pass.

Energy per inference is ESTIMATED: the ``cpu`` device profile's busy power (a generic
placeholder figure, not a measurement of this machine) × the mean latency, so its ratios
equal the mean-latency ratios.  Where an energy meter can be read (RAPL on an x86 box
with permission, ...), ``--energy-windows`` windows of ``--energy-seconds`` per contender
are MEASURED too (default 3 windows when a meter exists).

Usage::

    python benchmarks/bench_cbnet.py --json benchmarks/results/bench_cbnet.json   # full run (minutes)
    python benchmarks/bench_cbnet.py --quick                                      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import (
    CACHE_DIR,
    DEFAULT_EPOCHS,
    MAX_DROP,
    cache_key,
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

from edgeexit.devices.meters import EnergyMeter, EstimateMeter, meter_for_profile
from edgeexit.devices.profiles import get_profile
from edgeexit.measure import LatencyStats
from edgeexit.package import set_thresholds, sha256_file
from edgeexit.runtime import ExitSession
from edgeexit.runtime._threads import session_options
from edgeexit.zoo.cbnet import DEFAULT_SIZES, CBNetBuild, build_cbnet, export_cbnet

BRANCHYNET_T = 0.025
PAPER = {"speedup": 4.8, "energy_saving": 0.79}
CONTENDERS = ("full", "blenet", "blenet_t025", "cbnet", "cbnet_fallback")
LABELS = {
    "full": "full LeNet (no exits)",
    "blenet": "B-LeNet, calibrated",
    "blenet_t025": f"B-LeNet, T={BRANCHYNET_T}",
    "cbnet": "CBNet (AE + light)",
    "cbnet_fallback": "CBNet + fallback",
}
GRAPHS = ("converter", "converter_int8", "light", "blenet_stage0", "blenet_stage1")
GRAPH_LABELS = {
    "converter": "CBNet converter (dense AE)",
    "converter_int8": "  same, int8 weights (what-if)",
    "light": "CBNet light (conv1 + branch 1)",
    "blenet_stage0": "B-LeNet stage 0 (conv1 + branch 1)",
    "blenet_stage1": "B-LeNet stage 1 (trunk + final)",
}


def trained_cbnet(prep: Any, sizes: tuple[int, ...], ae_epochs: int, seed: int, train_threads: int) -> CBNetBuild:
    """The converter trained on top of the cached B-LeNet, from the cache when it matches."""
    blenet_sha = sha256_file(CACHE_DIR / f"{cache_key('blenet', prep.epochs, seed)}.pt")
    key = f"cbnet-{'x'.join(map(str, sizes))}-e{ae_epochs}-s{seed}-on-{cache_key('blenet', prep.epochs, seed)}"
    weights, sidecar = CACHE_DIR / f"{key}.pt", CACHE_DIR / f"{key}.json"
    if weights.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get("blenet_sha256") == blenet_sha and meta.get("sha256") == sha256_file(weights):
            log(f"[cbnet] loaded cached converter {weights.name}")
            return CBNetBuild.load(weights)
    previous = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    log(f"[cbnet] training the converter {sizes} for {ae_epochs} epoch(s) on {len(prep.splits.train)} samples "
        f"(seed {seed}, {train_threads} torch thread(s)) ...")
    started = time.perf_counter()
    try:
        build = build_cbnet(seed=seed, dataset="mnist5k", blenet=prep.model, blenet_epochs=prep.epochs,
                            ae_epochs=ae_epochs, sizes=sizes, log=lambda line: log(f"[cbnet] {line}"))
    finally:
        torch.set_num_threads(previous)
    took = time.perf_counter() - started
    build.save(weights)
    sidecar.write_text(json.dumps({
        "sizes": list(sizes), "ae_epochs": ae_epochs, "seed": seed, "train_threads": train_threads,
        "train_seconds": round(took, 1), "blenet_sha256": blenet_sha, "sha256": sha256_file(weights),
        "exemplars": build.exemplars.tolist(), "torch": torch.__version__,
    }, indent=2) + "\n", encoding="utf-8")
    log(f"[cbnet] trained in {took:.1f} s, cached as {weights.name}")
    return build


def with_threshold(src: Path, dst: Path, threshold: float) -> Path:
    """A copy of a package with every early exit's threshold replaced."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)

    set_thresholds(dst, [threshold])
    return dst


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1, False, False), providers=["CPUExecutionProvider"])


def int8_converter(src: Path, dst: Path) -> Path:
    """The converter graph with int8 weights (dynamic quantization of its MatMul/Gemm), for the what-if row."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process goes to the root logger
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def energy_windows(calls: dict[str, Callable[[int], Any]], n: int, meter: EnergyMeter, windows: int,
                   seconds: float) -> dict[str, dict[str, Any]]:
    """Joules per inference of each contender over ``windows`` windows of ``seconds`` (median)."""
    per: dict[str, list[float]] = {name: [] for name in calls}
    readings: dict[str, Any] = {}
    names = list(calls)
    for w in range(windows):
        for name in names[w % len(names):] + names[:w % len(names)]:
            call, count, busy_ns = calls[name], 0, 0
            meter.start()
            end = time.perf_counter_ns() + int(seconds * 1e9)
            while time.perf_counter_ns() < end:
                t0 = time.perf_counter_ns()
                call(count % n)
                busy_ns += time.perf_counter_ns() - t0
                count += 1
            reading = meter.stop(busy_seconds=busy_ns / 1e9) if isinstance(meter, EstimateMeter) else meter.stop()
            per[name].append(reading.joules / count)
            readings[name] = reading
    return {name: {"j_per_inference": float(np.median(v)), "windows": v, "kind": readings[name].kind,
                   "source": readings[name].source, "note": readings[name].note} for name, v in per.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = timing_parser(__doc__, zoo_models=False, block=100)
    ap.add_argument("--blenet-epochs", type=int, default=DEFAULT_EPOCHS["blenet"])
    ap.add_argument("--ae-epochs", type=int, default=30)
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="converter h1,h2,h3")
    ap.add_argument("--energy-windows", type=int, default=None,
                    help="measured-energy windows per contender (default: 3 when a meter can be read, else 0)")
    ap.add_argument("--energy-seconds", type=float, default=2.0, help="length of one energy window")
    args = parse_timing_args(ap, argv, {"passes": (10, 1), "samples": (1000, 200), "warmup": (200, 50)})
    args.sizes = tuple(int(v) for v in args.sizes.split(","))
    if len(args.sizes) != 3:
        ap.error("--sizes takes three integers h1,h2,h3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_torch_thread()
    machine = machine_info()
    print(f"bench_cbnet: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPU(s), "
          f"python {machine['python']}, onnxruntime {machine['onnxruntime']}, torch {torch.__version__}; "
          f"batch 1, 1 thread; load average {machine.get('loadavg_at_start', '?')}"
          + ("; QUICK smoke run, not for reporting" if args.quick else ""))

    # --- models and packages ---
    prep = prepare("blenet", args.blenet_epochs, args.seed, train_threads=args.train_threads)
    torch.set_num_threads(1)
    build = trained_cbnet(prep, args.sizes, args.ae_epochs, args.seed, args.train_threads)
    torch.set_num_threads(1)
    folder = CACHE_DIR / "packages"
    stem = f"cbnet-{'x'.join(map(str, args.sizes))}-e{args.ae_epochs}-s{args.seed}"
    quiet = lambda line: log(f"[cbnet] {line}")  # noqa: E731
    fb = export_cbnet(build, folder / f"{stem}.eexit", fallback=True, max_drop=MAX_DROP, log=quiet)
    light = export_cbnet(build, folder / f"{stem}-light.eexit", fallback=False, log=quiet)
    t025 = with_threshold(prep.package, folder / f"{cache_key('blenet', prep.epochs, args.seed)}-t0.025.eexit",
                          BRANCHYNET_T)
    sessions = {"blenet": ExitSession(prep.package), "blenet_t025": ExitSession(t025),
                "cbnet": ExitSession(light.package), "cbnet_fallback": ExitSession(fb.package)}
    full = ort_session(prep.package / "full.onnx")
    graphs = {"converter": ort_session(fb.package / "stage0.onnx"),
              "converter_int8": ort_session(int8_converter(fb.package / "stage0.onnx", folder / f"{stem}-int8.onnx")),
              "light": ort_session(fb.package / "stage1.onnx"),
              "blenet_stage0": ort_session(prep.package / "stage0.onnx"),
              "blenet_stage1": ort_session(prep.package / "stage1.onnx")}

    test = prep.splits.test
    x, y = test.x[:args.samples], test.y[:args.samples]
    n = len(y)
    xs = [np.ascontiguousarray(x[i:i + 1]) for i in range(n)]
    converted = [graphs["converter"].run(None, {"image": s})[0] for s in xs]
    blenet_carry = [graphs["blenet_stage0"].run(["carry0_0"], {"image": s})[0] for s in xs]

    calls: dict[str, Callable[[int], Any]] = {"full": lambda i: full.run(None, {"image": xs[i]})}
    for name, sess in sessions.items():
        calls[name] = lambda i, run=sess.run: run(xs[i])
    graph_calls: dict[str, Callable[[int], Any]] = {
        "converter": lambda i: graphs["converter"].run(None, {"image": xs[i]}),
        "converter_int8": lambda i: graphs["converter_int8"].run(None, {"image": xs[i]}),
        "light": lambda i: graphs["light"].run(None, {"carry0_0": converted[i]}),
        "blenet_stage0": lambda i: graphs["blenet_stage0"].run(None, {"image": xs[i]}),
        "blenet_stage1": lambda i: graphs["blenet_stage1"].run(None, {"carry0_0": blenet_carry[i]}),
    }

    # --- accuracy and exit shares: one untimed batch-1 pass ---
    preds: dict[str, np.ndarray] = {"full": np.array([int(calls["full"](i)[0].argmax()) for i in range(n)])}
    exits: dict[str, np.ndarray] = {}
    for name, sess in sessions.items():
        results = [sess.run(s) for s in xs]
        preds[name] = np.array([int(r.predictions[0]) for r in results])
        exits[name] = np.array([int(r.exit_index[0]) for r in results])
    int8_preds = np.array([int(graphs["light"].run(None, {"carry0_0": graphs["converter_int8"].run(None, {
        "image": s})[0]})[0].argmax()) for s in xs])
    int8_accuracy = float((int8_preds == y).mean())
    light_alone = np.array([int(graphs["blenet_stage0"].run(["logits0"], {"image": s})[0].argmax()) for s in xs])
    light_alone_accuracy = float((light_alone == y).mean())

    # --- timing ---
    names = list(calls) + list(graph_calls)
    stage_ms: dict[str, list[tuple[float, ...]]] = {name: [] for name in sessions}
    hooks = {names.index(name): (lambda r, _t, out=stage_ms[name]: out.append(r.stage_ms)) for name in sessions}
    log(f"timing batch 1: {n} samples x {args.passes} pass(es), {len(names)} contenders interleaved per "
        f"block of {args.block} ...")
    started = time.perf_counter()
    times = interleaved_timing([*calls.values(), *graph_calls.values()], list(range(n)), args.passes, args.warmup,
                               on_result=hooks, block=args.block)
    log(f"timed in {time.perf_counter() - started:.1f} s")
    stats = {name: LatencyStats.from_ns(times[j]) for j, name in enumerate(names)}

    # --- energy ---
    profile = get_profile("cpu")
    busy_w = profile.power.busy_watts
    meter, skipped = meter_for_profile(profile)
    measured_meter = not isinstance(meter, EstimateMeter)
    windows = args.energy_windows if args.energy_windows is not None else (3 if measured_meter else 0)
    measured = None
    if windows > 0:
        log(f"energy: {windows} window(s) of {args.energy_seconds:g} s per contender with {meter.source} ...")
        measured = energy_windows(calls, n, meter, windows, args.energy_seconds)

    # --- report ---
    base, ref = stats["full"], stats["blenet"]
    rows, contenders = [], {}
    for name in CONTENDERS:
        s = stats[name]
        est_mj = busy_w * s.mean  # W × ms = mJ
        shares = None if name == "full" else (np.bincount(exits[name], minlength=sessions[name].num_exits) / n)
        entry = {
            "label": LABELS[name], "accuracy": float((preds[name] == y).mean()),
            "exit_shares": None if shares is None else shares.tolist(), "latency_ms": stats_dict(s),
            "speedup_vs_full_p50": base.p50 / s.p50, "speedup_vs_blenet_p50": ref.p50 / s.p50,
            "speedup_vs_full_mean": base.mean / s.mean,
            "energy_estimated_mj": est_mj, "energy_vs_full": est_mj / (busy_w * base.mean) - 1,
            "energy_vs_blenet": est_mj / (busy_w * ref.mean) - 1,
            "energy_measured_mj": None if measured is None else measured[name]["j_per_inference"] * 1e3,
        }
        contenders[name] = entry
        sh = "-" if shares is None else " ".join(f"{v:.3f}" for v in shares)
        rows.append([LABELS[name], f"{entry['accuracy']:.2%}", sh, fmt_ms(s.p50), fmt_ms(s.p95), fmt_ms(s.mean),
                     f"{entry['speedup_vs_full_p50']:.2f}x", f"{entry['speedup_vs_blenet_p50']:.2f}x",
                     f"{est_mj:.3f}", f"{entry['energy_vs_full']:+.0%}", f"{entry['energy_vs_blenet']:+.0%}"])
    cal = fb.calibration or {}
    print(f"\n=== MNIST-5k test split: {n} samples x {args.passes} pass(es), batch 1, interleaved per block of "
          f"{args.block} ===")
    print(f"B-LeNet ({prep.epochs} epochs): calibrated entropy threshold {prep.threshold:.4g}; CBNet converter "
          f"{build.converter.sizes} ({build.epochs.get('converter', args.ae_epochs)} epochs), light-exit threshold "
          f"{fb.threshold:.4g} (calibration split: {cal.get('accuracy', float('nan')):.1%} vs full LeNet "
          f"{cal.get('full_lenet_accuracy', float('nan')):.1%}, max drop {MAX_DROP:.1%})")
    print(table(["contender", "accuracy", "exit shares", "p50 ms", "p95 ms", "mean ms", "vs full", "vs B-LeNet",
                 "est. mJ/inf", "energy vs full", "vs B-LeNet"], rows, "lrlrrrrrrrr"))
    print("exit shares: B-LeNet [branch 1, final]; CBNet [light]; CBNet + fallback [light path, fallback path]. "
          "Speedups are p50 ratios.")
    print(f"energy: ESTIMATED = busy {busy_w:g} W ({profile.name} profile: {profile.power.source}) x mean latency; "
          "its ratios are the mean-latency ratios, and the mean counts time this process lost to other load.")
    if measured is not None:
        kinds = {m["kind"] for m in measured.values()}
        print(f"energy windows ({'/'.join(sorted(kinds))}, {next(iter(measured.values()))['source']}): "
              + ", ".join(f"{LABELS[k]} {measured[k]['j_per_inference'] * 1e3:.3f} mJ" for k in CONTENDERS))
    else:
        print("measured energy: no meter readable here (" + "; ".join(skipped) + ")")

    graph_info: dict[str, Any] = {}
    costs = {"converter": fb.package, "converter_int8": fb.package, "light": fb.package, "blenet_stage0": prep.package,
             "blenet_stage1": prep.package}
    stage_index = {"converter": 0, "converter_int8": 0, "light": 1, "blenet_stage0": 0, "blenet_stage1": 1}
    chain = {"converter": "cbnet", "converter_int8": None, "light": "cbnet", "blenet_stage0": "blenet",
             "blenet_stage1": "blenet"}
    grows = []
    for g in GRAPHS:
        manifest = json.loads((costs[g] / "manifest.json").read_text(encoding="utf-8"))
        flops = manifest["stages"][stage_index[g]]["cost"]["flops"]
        in_chain = [ms[stage_index[g]] for ms in stage_ms.get(chain[g] or "", []) if ms[stage_index[g]] > 0]
        chain_ms = float(np.median(in_chain)) if in_chain else float("nan")
        graph_info[g] = {"label": GRAPH_LABELS[g], "flops": flops, "isolated_latency_ms": stats_dict(stats[g]),
                         "in_chain_median_ms": chain_ms}
        grows.append([GRAPH_LABELS[g], f"{flops / 1e6:.3f}", fmt_ms(stats[g].p50),
                      fmt_ms(chain_ms) if in_chain else "-"])
    full_flops = json.loads((prep.package / "manifest.json").read_text(encoding="utf-8"))["full_model"]["cost"]["flops"]
    grows.append(["full LeNet (full.onnx)", f"{full_flops / 1e6:.3f}", fmt_ms(base.p50), "-"])
    print("\nper graph (plain onnxruntime, batch 1): FLOPs from the manifests; p50 alone; median inside the "
          "ExitSession chain (stage_ms)")
    print(table(["graph", "MFLOP", "p50 ms alone", "ms in chain"], grows, "lrrr"))
    print(f"what-if: the converter with int8 weights (onnxruntime quantize_dynamic, not in the packages) keeps "
          f"CBNet's test accuracy at {int8_accuracy:.2%} (fp32 {contenders['cbnet']['accuracy']:.2%}).")
    print(f"the light classifier on the ORIGINAL images (B-LeNet branch 1 for every sample, no converter): "
          f"{light_alone_accuracy:.2%} test accuracy.")
    cb = contenders["cbnet"]
    print(f"\npaper (CBNet vs competing techniques, RPi 4 / cloud CPU / K80): up to {PAPER['speedup']}x lower "
          f"latency, -{PAPER['energy_saving']:.0%} energy at similar accuracy.")
    print(f"here: CBNet {cb['speedup_vs_full_p50']:.2f}x vs full LeNet and {cb['speedup_vs_blenet_p50']:.2f}x vs "
          f"B-LeNet (p50), energy {cb['energy_vs_full']:+.0%} vs full LeNet (estimated), accuracy "
          f"{cb['accuracy']:.2%} vs {contenders['full']['accuracy']:.2%}.")

    report = {
        "benchmark": "bench_cbnet", "machine": machine,
        "config": {
            "seed": args.seed, "blenet_epochs": prep.epochs, "ae_epochs": args.ae_epochs,
            "sizes": list(args.sizes), "passes": args.passes, "samples": n, "warmup": args.warmup,
            "block": args.block, "max_drop": MAX_DROP, "branchynet_threshold": BRANCHYNET_T,
            "train_threads": args.train_threads, "quick": args.quick,
            "onnxruntime_threads": {"intra_op": 1, "inter_op": 1, "spinning": False},
            "gc_disabled_while_timing": True,
        },
        "blenet": {"package": str(prep.package), "threshold": prep.threshold, "calibration": prep.calibration},
        "cbnet": {"package": str(fb.package), "light_package": str(light.package), "threshold": fb.threshold,
                  "calibration": fb.calibration, "exemplars": build.exemplars.tolist(),
                  "sizes": list(build.converter.sizes), "int8_converter_accuracy": int8_accuracy,
                  "light_on_original_accuracy": light_alone_accuracy},
        "contenders": contenders, "graphs": graph_info,
        "energy": {"estimate": {"busy_watts": busy_w, "source": profile.power.source,
                                "formula": "busy_watts x mean latency"},
                   "measured": measured, "meters_skipped": skipped},
        "paper": PAPER,
    }
    try:
        report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
