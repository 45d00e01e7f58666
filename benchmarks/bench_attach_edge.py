"""Edge-sized networks with attached exits: what the exits save on ResNet-18 and MobileNetV3-Small.

torchvision's ResNet-18 and MobileNetV3-Small (random weights, 1000 classes as shipped, input
224×224) get exits with ``attach_exits`` at two cuts each (ResNet-18: ``layer2``, ``layer3``;
MobileNetV3-Small: ``features.3``, ``features.8``), heads ``"auto"`` (untrained: this measures
runtime cost, not accuracy), and are exported with ``export_package`` (stage graphs, ``full.onnx``,
``compiled.onnx``).  The int8 packages come from ``quantize_package`` (static QDQ, uint8
activations, int8 per-channel weights, calibrated on 64 other random images).

BatchNorm statistics are re-estimated on those calibration images before export (weights stay
random): with the shipped initialisation MobileNetV3-Small's activations shrink layer after
layer until its logits are about 1e-9, which no trained network produces and which static int8
quantization cannot represent.  In fp32 the BatchNorms fold into the convolutions either way.

Thresholds: on a fixed set of 64 seeded random images, the entropy thresholds are the midpoints
between consecutive sorted exit scores that let 50 % of the set leave at exit 0, 25 % at exit 1
and 25 % at the final exit; they are written into the package (``set_thresholds``), recomputed on
the int8 exits for the int8 package, and the shares the stage loop and the compiled graph achieve
are checked and printed.

For each model × precision × threads × batch, one interleaved run times seven contenders on the
same input set, all with the same onnxruntime options (``ExitSession``'s: ``threads`` intra-op
threads, spinning off):

- the plain model: the package's ``full.onnx`` of that precision, one bare ``InferenceSession.run``;
- the package through ``ExitSession.run(engine="stages")`` (the stage loop);
- the package through ``ExitSession.run(engine="compiled")`` (one graph, exits decided in-graph);
- ``compiled.onnx`` in a bare ``InferenceSession`` (what an app without edgeexit's Python pays;
  compiled minus bare is what ``ExitSession`` adds around the one call);
- each stage graph alone (its exit head included), fed the carries the previous stages make for
  every sample of the batch: the stage times of the cost model.

The stage loop's own ``ExitResult.stage_ms`` of every timed call split its time into what it spent
inside the stages' onnxruntime calls and what it spent outside them.

Like ``edgeexit bench`` (``edgeexit.bench.run_benchmark``), each contender runs in fixed-duration
windows, the windows of all contenders interleaved (the order rotates per window), after untimed
warm-up calls, with Python's gc paused.  A window runs whole passes over the input set until
``--duration`` seconds have passed, so every window holds exactly the 50/25/25 mix.  The figure is
ms per sample in a window (its busy time / samples), median over windows.  (The per-call median of
a 50/25/25 mix sits on the edge between the exit-0 and the exit-1 calls, so it would say nothing
about an expected cost; per-call p50s are in the JSON.)

The stage-time cost model: expected ms per sample = Σ over exits of share × (ms per sample of
every stage graph up to that exit, heads included), with the stage times from the same run; its
speedup is the plain model's ms over that: what a runtime with zero overhead would get from the
same shares.  Targets (the issue): measured ≥ 0.97 × the cost model at batch 1, and ≥ 1.0× the
plain model wherever the cost model says ≥ 1.05×.

Progress goes to stderr, the tables to stdout, every figure to the JSON file.

    python benchmarks/bench_attach_edge.py               # -> benchmarks/results/bench_attach_edge.json
    python benchmarks/bench_attach_edge.py --models resnet18 --batches 1 --threads 1 --no-int8 --duration 0.2
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np
import onnxruntime as ort
from _common import BENCH_DIR, fmt_ms, log, machine_info, one_torch_thread, table, write_json

from edgeexit.package import COMPILED_OUTPUTS, Package, load_package, set_thresholds
from edgeexit.policies import get_policy
from edgeexit.runtime import ExitSession

DEFAULT_OUT = BENCH_DIR / "results" / "bench_attach_edge.json"
SHARES = (0.5, 0.25, 0.25)          # of the input set leaving at exit 0, exit 1, the final exit
IMAGE = (3, 224, 224)
POLICY = "entropy"
WARMUP_CALLS = 2                    # untimed calls per contender before its first window (1 at batch > 1)
BATCH_TARGET = 0.97                 # measured / cost model at batch 1
PAYS_OFF = 1.05                     # where the cost model says at least this, measured must be >= 1.0x


@dataclass(frozen=True)
class ModelSpec:
    label: str
    builder: str                    # torchvision.models.<builder>
    cuts: tuple[str, str]


MODELS = {
    "resnet18": ModelSpec("ResNet-18", "resnet18", ("layer2", "layer3")),
    # features.3 ends the stride-8 blocks and features.8 the stride-16 ones: about a quarter and
    # three fifths of the time (time_shares, printed at the start of each model)
    "mobilenet_v3_small": ModelSpec("MobileNetV3-Small", "mobilenet_v3_small", ("features.3", "features.8")),
}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=0.5,
                    help="seconds per window (whole passes over the input set; at least one) (default 0.5)")
    ap.add_argument("--windows", type=int, default=5, help="interleaved windows per contender (default 5)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--batches", type=_int_list, default=[1, 32], help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--threads", type=_int_list, default=[1, 2],
                    help="comma-separated onnxruntime intra-op thread counts (default 1,2)")
    ap.add_argument("--no-int8", action="store_true", help="fp32 only (skip quantize_package)")
    ap.add_argument("--images", type=int, default=64, help="random images in the timed input set (default 64)")
    ap.add_argument("--calibration-images", type=int, default=64,
                    help="other random images: BatchNorm statistics and int8 calibration (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.windows < 1 or not args.duration > 0 or min(args.batches + args.threads) < 1:
        ap.error("--windows, --batches and --threads must be >= 1 and --duration > 0")
    if args.images % max(args.batches) or args.images < 4:
        ap.error(f"--images {args.images} must be at least 4 and a multiple of every batch size {args.batches}")
    return args


# --- models and packages (torch) -------------------------------------------------------------------------------


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *IMAGE), dtype=np.float32)


def build_model(spec: ModelSpec, bn_images: np.ndarray, seed: int) -> Any:
    """The torchvision model with random weights, BatchNorm running statistics re-estimated on ``bn_images``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, spec.builder)(num_classes=1000)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(bn_images), 16):
            model(torch.from_numpy(bn_images[start:start + 16]))
    return model.eval()


def export_fp32(spec: ModelSpec, model: Any, folder: Path) -> tuple[Path, dict[str, float | None]]:
    """Exits attached and exported; also the share of the plain model's time up to each cut."""
    import torch

    from edgeexit.export import attach_exits, export_package
    from edgeexit.export.layer_times import time_shares

    example = {"image": torch.from_numpy(random_images(2, 12345))}
    shares = time_shares(model, example, list(spec.cuts))
    exits = attach_exits(model, list(spec.cuts), example_inputs=example, heads="auto")
    path = folder / f"{spec.builder}.eexit"
    export_package(exits, example, path, policy=POLICY, name=spec.builder, include_full_model=True, compile=True,
                   log=lambda line: log(f"[{spec.builder}] {line}"))
    return path, shares


def quantize(spec: ModelSpec, fp32: Path, calibration: np.ndarray) -> Path:
    from edgeexit.export import quantize_package

    path = fp32.with_name(f"{spec.builder}-int8.eexit")
    quantize_package(fp32, path, calibration, mode="auto", activation_type="uint8",
                     max_calibration_samples=len(calibration), log=lambda line: log(f"[{spec.builder} int8] {line}"))
    return path


# --- thresholds -----------------------------------------------------------------------------------------------


def thresholds_for_shares(session: ExitSession, x: np.ndarray, shares: Sequence[float]) -> tuple[list[float], float]:
    """Entropy thresholds that let ``shares[e]`` of ``x`` leave at early exit e (the rest at the last).

    Each threshold is the midpoint between the last score that leaves and the first that stays,
    among the samples still running at that exit; also returns the smallest such gap (how far the
    nearest sample is from flipping)."""
    policy = get_policy(POLICY)
    scores = [policy.scores(logits) for logits in session.run_all_exits(x)[:-1]]
    running = np.arange(len(x))
    thresholds, gaps = [], []
    for e, s in enumerate(scores):
        leave = round(shares[e] * len(x))
        order = running[np.argsort(s[running], kind="stable")]
        low, high = s[order[leave - 1]], s[order[leave]]
        if not high > low:
            raise SystemExit(f"exit {e}: samples tie at entropy {low!r}; no threshold lets exactly {leave} leave")
        thresholds.append(float((low + high) / 2))
        gaps.append(float(high - low))
        running = order[leave:]
    return thresholds, min(gaps)


def exit_shares(session: ExitSession, x: np.ndarray, batch: int, engine: str) -> tuple[list[float], np.ndarray]:
    exits = np.concatenate([session.run(x[s:s + batch], engine=engine).exit_index for s in range(0, len(x), batch)])
    return (np.bincount(exits, minlength=session.num_exits) / len(exits)).tolist(), exits


# --- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One thing timed: ``call(feed)`` for each feed of a pass over the input set."""

    name: str
    call: Callable[[Any], object]
    feeds: list[Any]
    windows_ns: list[list[int]] = field(default_factory=list)
    seen: Callable[[Any], None] | None = None   # gets each timed call's result, off the clock


def _window(c: Contender, duration_s: float) -> list[int]:
    """Whole passes over the feeds until ``duration_s`` has passed (at least one); ns per call."""
    clock = perf_counter_ns
    out: list[int] = []
    end = clock() + int(duration_s * 1e9)
    while True:
        for feed in c.feeds:
            t0 = clock()
            result = c.call(feed)
            out.append(clock() - t0)
            if c.seen is not None:
                c.seen(result)
        if clock() >= end:
            return out


def time_interleaved(contenders: Sequence[Contender], windows: int, duration_s: float, warmup: int) -> None:
    for c in contenders:
        for feed in (c.feeds * warmup)[:warmup]:
            c.call(feed)
    m = len(contenders)
    gc.collect()
    gc.disable()
    try:
        for w in range(windows):
            for j in range(m):
                c = contenders[(w + j) % m]
                c.windows_ns.append(_window(c, duration_s))
    finally:
        gc.enable()


def ms_per_sample(c: Contender, batch: int) -> list[float]:
    return [sum(ns) / 1e6 / (len(ns) * batch) for ns in c.windows_ns]


@dataclass(frozen=True)
class Sessions:
    """A package opened for timing: the ExitSession, and bare sessions of full.onnx, compiled.onnx and each stage."""

    package: Package
    exit_session: ExitSession
    full: ort.InferenceSession
    compiled: ort.InferenceSession
    stages: list[ort.InferenceSession]


def open_sessions(path: Path, threads: int) -> Sessions:
    session = ExitSession(path, threads=threads)
    pkg = session.package
    assert pkg.full_model is not None and pkg.compiled is not None, "export_package wrote full.onnx and compiled.onnx"

    def bare(file: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(pkg.file_path(file)), session.thread_settings.options(),
                                    providers=["CPUExecutionProvider"])

    return Sessions(pkg, session, bare(pkg.full_model.file), bare(pkg.compiled.file),
                    [bare(s.file) for s in pkg.stages])


def stage_outputs(spec: Any) -> list[str]:
    """What the stage loop fetches from a stage: its carry, then its exit's logits and signals."""
    exit_ = spec.exit
    return list(spec.carry) + ([exit_.logits, *(v for _, v in sorted(exit_.signals.items()))] if exit_ else [])


def bench_config(s: Sessions, x: np.ndarray, batch: int, shares: Sequence[float], args: argparse.Namespace
                 ) -> dict[str, Any]:
    """One interleaved run: the plain model, both engines and every stage alone, at one batch size."""
    pkg = s.package
    full = pkg.full_model
    assert full is not None
    batches = [np.ascontiguousarray(x[i:i + batch]) for i in range(0, len(x), batch)]
    full_in, full_out = full.inputs[0], [full.logits]
    stage_feeds: list[list[dict[str, np.ndarray]]] = [[] for _ in pkg.stages]
    for b in batches:                     # every stage fed what the stages before it make from the whole batch
        tensors = {pkg.inputs[0].name: b}
        for k, (spec, sess) in enumerate(zip(pkg.stages, s.stages)):
            stage_feeds[k].append({n: tensors[n] for n in spec.inputs})
            tensors.update(zip(stage_outputs(spec), sess.run(stage_outputs(spec), stage_feeds[k][-1])))

    def stage_call(sess: ort.InferenceSession, outputs: list[str]) -> Callable[[Any], object]:
        return lambda feed: sess.run(outputs, feed)

    compiled = pkg.compiled
    assert compiled is not None
    bare_in, bare_out = compiled.inputs[0], [compiled.outputs[name] for name in COMPILED_OUTPUTS]
    bare_feed = {compiled.thresholds: np.asarray(pkg.thresholds, dtype=np.float64)}
    ee = s.exit_session
    loop_calls: list[tuple[float, tuple[float, ...], np.ndarray]] = []   # total_ms, stage_ms, exit_index

    def loop_seen(r: Any) -> None:
        loop_calls.append((r.total_ms, r.stage_ms, r.exit_index))

    contenders = [
        Contender("full", lambda b: s.full.run(full_out, {full_in: b}), batches),
        Contender("stages", lambda b: ee.run(b, engine="stages"), batches, seen=loop_seen),
        Contender("compiled", lambda b: ee.run(b, engine="compiled"), batches),
        Contender("compiled_bare", lambda b: s.compiled.run(bare_out, {bare_in: b, **bare_feed}), batches),
        *(Contender(f"stage{k}", stage_call(sess, stage_outputs(spec)), stage_feeds[k])
          for k, (spec, sess) in enumerate(zip(pkg.stages, s.stages))),
    ]
    started = time.perf_counter()
    time_interleaved(contenders, args.windows, args.duration, WARMUP_CALLS if batch == 1 else 1)
    took = time.perf_counter() - started
    per_window = {c.name: ms_per_sample(c, batch) for c in contenders}
    med = {name: float(np.median(v)) for name, v in per_window.items()}
    stage_ms = [med[f"stage{k}"] for k in range(len(pkg.stages))]
    cumulative = np.cumsum(stage_ms)
    expected = float(sum(share * cumulative[k] for share, k in zip(shares, pkg.exit_stages)))
    cost_model = med["full"] / expected
    out: dict[str, Any] = {
        "batch": batch, "timed_seconds": round(took, 2),
        "calls_per_window": {c.name: [len(ns) for ns in c.windows_ns] for c in contenders},
        "ms_per_sample_per_window": per_window,
        "ms_per_sample": med,
        "p50_ms_per_call": {c.name: float(np.median(np.concatenate(c.windows_ns))) / 1e6 for c in contenders},
        "stage_ms_per_sample": stage_ms,
        "stages_sum_over_full": float(cumulative[-1] / med["full"]),
        "cost_model": {"expected_ms_per_sample": expected, "speedup": cost_model, "shares": list(shares)},
        "stage_loop_inside": loop_breakdown(loop_calls, pkg.exit_stages, batch, stage_ms),
    }
    for name in ("stages", "compiled"):
        measured = med["full"] / med[name]
        paired = [f / e for f, e in zip(per_window["full"], per_window[name])]
        ok_b1 = measured >= BATCH_TARGET * cost_model if batch == 1 else None
        ok_pays = measured >= 1.0 if cost_model >= PAYS_OFF else None
        out[name] = {
            "speedup": measured, "speedup_per_window": paired, "over_cost_model": measured / cost_model,
            "overhead_ms_per_sample": med[name] - expected,
            "target_batch1_vs_cost_model": ok_b1, "target_not_slower_where_it_pays": ok_pays,
        }
    return out


def loop_breakdown(calls: list[tuple[float, tuple[float, ...], np.ndarray]], exit_stages: Sequence[int], batch: int,
                   alone_ms: Sequence[float]) -> dict[str, Any]:
    """Where the stage loop's time went, from its own ``ExitResult``s of the timed calls: per sample,
    the time inside each stage's onnxruntime call, and the rest of ``ExitSession.run`` (input
    checks, policy scores, compaction, the result) outside them."""
    samples = len(calls) * batch
    total = sum(t for t, _, _ in calls)
    in_stage = np.sum([st for _, st, _ in calls], axis=0)
    # samples that ran stage k: those leaving at an exit on stage k or later
    ran = [sum(int(np.count_nonzero(np.asarray(exit_stages)[ex] >= k)) for _, _, ex in calls)
           for k in range(len(in_stage))]
    outside = [t - sum(st) for t, st, _ in calls]
    by_exit: dict[str, float] = {}
    if batch == 1:
        for e in range(len(exit_stages)):
            mine = [o for o, (_, _, ex) in zip(outside, calls) if ex[0] == e]
            if mine:
                by_exit[str(e)] = float(np.median(mine)) * 1e3
    in_loop = [float(v) / r if r else None for v, r in zip(in_stage, ran)]
    return {
        "ms_per_sample": total / samples,
        "onnxruntime_ms_per_sample": float(in_stage.sum()) / samples,
        "outside_onnxruntime_ms_per_sample": (total - float(in_stage.sum())) / samples,
        "outside_onnxruntime_us_per_call_median": float(np.median(outside)) * 1e3,
        "outside_onnxruntime_us_per_call_median_by_exit": by_exit,
        "stage_ms_per_sample_that_ran_it": in_loop,
        "stage_in_loop_over_alone": [None if v is None else v / a for v, a in zip(in_loop, alone_ms)],
    }


# --- one model ------------------------------------------------------------------------------------------------


def run_model(name: str, args: argparse.Namespace, x: np.ndarray, calibration: np.ndarray, work: Path
              ) -> dict[str, Any]:
    spec = MODELS[name]
    started = time.perf_counter()
    model = build_model(spec, calibration, args.seed)
    fp32, time_split = export_fp32(spec, model, work)
    paths = {"fp32": fp32}
    if not args.no_int8:
        paths["int8"] = quantize(spec, fp32, calibration)
    prep_s = time.perf_counter() - started
    print(f"\n##### {spec.label}: exits after {' and '.join(spec.cuts)} (heads 'auto'), 224x224, 1000 classes; "
          "share of the plain model's onnxruntime time up to each cut (time_shares, fp32, 1 thread, batch 2): "
          + ", ".join(f"{c} {v:.1%}" if v is not None else f"{c} -" for c, v in time_split.items())
          + f"; built in {prep_s:.0f} s", flush=True)
    info: dict[str, Any] = {"label": spec.label, "cuts": list(spec.cuts), "time_shares": time_split,
                            "prepare_seconds": round(prep_s, 1), "precisions": {}}
    for precision, path in paths.items():
        pkg = load_package(path)
        thresholds, gap = thresholds_for_shares(ExitSession(path, threads=1), x, SHARES)
        set_thresholds(path, thresholds)
        files = [pkg.full_model.file] if pkg.full_model else []
        p: dict[str, Any] = {
            "thresholds": thresholds, "smallest_score_gap": gap,
            "bytes": {"stages": sum(int(pkg.files[st.file]["size"]) for st in pkg.stages),
                      "full": sum(int(pkg.files[f]["size"]) for f in files),
                      "compiled": int(pkg.files[pkg.compiled.file]["size"]) if pkg.compiled else None},
            "quantization": None if precision == "fp32" else {
                k: v for k, v in pkg.manifest["quantization"].items() if k not in ("source_sha256", "thresholds")},
            "achieved_shares": {}, "configs": [],
        }
        check = ExitSession(path, threads=1)
        for batch in args.batches:
            got_s, ex_s = exit_shares(check, x, batch, "stages")
            got_c, ex_c = exit_shares(check, x, batch, "compiled")
            p["achieved_shares"][str(batch)] = {"stages": got_s, "compiled": got_c,
                                                "engines_disagree_on": int((ex_s != ex_c).sum())}
            log(f"[{name} {precision}] batch {batch}: shares stage loop {got_s}, compiled {got_c}")
        print(f"{precision}: entropy thresholds {', '.join(f'{t:.6g}' for t in thresholds)} (nearest sample "
              f"{gap / 2:.2g} from one); achieved exit shares on the {len(x)} images: "
              + "; ".join(f"batch {b}: stage loop {' '.join(f'{v:.3f}' for v in a['stages'])}, compiled "
                          f"{' '.join(f'{v:.3f}' for v in a['compiled'])}"
                          + (f" ({a['engines_disagree_on']} sample(s) at another exit)" if a["engines_disagree_on"]
                             else "")
                          for b, a in p["achieved_shares"].items()), flush=True)
        for threads in args.threads:
            sessions = open_sessions(path, threads)
            for batch in args.batches:
                log(f"[{name} {precision}] timing batch {batch}, {threads} thread(s): {args.windows} window(s) of "
                    f"{args.duration:g} s x 7 contenders (load average {os.getloadavg()[0]:.2f}) ...")
                load = [round(v, 2) for v in os.getloadavg()]
                res = bench_config(sessions, x, batch, p["achieved_shares"][str(batch)]["stages"], args)
                res["threads"], res["loadavg_before"] = threads, load
                p["configs"].append(res)
                log(f"[{name} {precision}] batch {batch}, {threads} thread(s): full {res['ms_per_sample']['full']:.3f}"
                    f" ms/sample, stage loop {res['stages']['speedup']:.2f}x, compiled "
                    f"{res['compiled']['speedup']:.2f}x, cost model {res['cost_model']['speedup']:.2f}x "
                    f"({res['timed_seconds']:.0f} s)")
        info["precisions"][precision] = p
    return info


# --- report ---------------------------------------------------------------------------------------------------


def _verdict(r: dict[str, Any]) -> str:
    marks = []
    if r["target_batch1_vs_cost_model"] is not None:
        marks.append("ok" if r["target_batch1_vs_cost_model"] else "MISS 0.97")
    if r["target_not_slower_where_it_pays"] is not None:
        marks.append("ok" if r["target_not_slower_where_it_pays"] else "MISS 1.0x")
    return ", ".join(marks) or "-"


def print_tables(report: dict[str, Any]) -> None:
    rows, split = [], []
    for info in report["models"].values():
        for precision, p in info["precisions"].items():
            for c in p["configs"]:
                ms = c["ms_per_sample"]
                rows.append([info["label"], precision, str(c["batch"]), str(c["threads"]), fmt_ms(ms["full"]),
                             fmt_ms(ms["stages"]), f"{c['stages']['speedup']:.2f}x", fmt_ms(ms["compiled"]),
                             f"{c['compiled']['speedup']:.2f}x", f"{c['cost_model']['speedup']:.2f}x",
                             f"{c['stages']['over_cost_model']:.2f}", f"{c['compiled']['over_cost_model']:.2f}",
                             _verdict(c["stages"]), _verdict(c["compiled"])])
                inside = c["stage_loop_inside"]
                wrapper_us = (ms["compiled"] - ms["compiled_bare"]) * c["batch"] * 1e3
                split.append([info["label"], precision, str(c["batch"]), str(c["threads"]), fmt_ms(ms["full"]),
                              *(fmt_ms(v) for v in c["stage_ms_per_sample"]), f"{c['stages_sum_over_full']:.2f}",
                              fmt_ms(c["cost_model"]["expected_ms_per_sample"]),
                              fmt_ms(inside["onnxruntime_ms_per_sample"]),
                              f"{inside['outside_onnxruntime_us_per_call_median']:.0f}",
                              fmt_ms(ms["compiled_bare"]), f"{wrapper_us:+.0f}"])
    cfg = report["config"]
    print(f"\n=== ms per sample (median of {cfg['windows']} interleaved windows of >= {cfg['duration_s']:g} s, whole "
          f"passes over {cfg['images']} images); speedup vs the plain full.onnx of the same precision, same run ===")
    print(table(["model", "prec", "batch", "thr", "full ms", "stage loop ms", "x", "compiled ms", "x", "cost model x",
                 "loop/model", "compiled/model", "targets loop", "targets compiled"], rows,
                "llrrrrrrrrrrll"))
    print("\n=== where the time goes (same runs): ms per sample of each stage graph alone (exit head included), their "
          "sum over the plain model, the cost model's expected ms; the stage loop's time inside its onnxruntime calls "
          "(ms per sample) and outside them (median us per call: input check, scores, compaction, result); "
          "compiled.onnx in a bare session, and what ExitSession adds around it (us per call) ===")
    print(table(["model", "prec", "batch", "thr", "full ms", "stage 0", "stage 1", "stage 2", "stages/full",
                 "model ms", "loop in ORT ms", "loop outside us", "bare compiled ms", "ExitSession us"], split,
                "llrrrrrrrrrrrr"))


def versions() -> dict[str, str]:
    out = {}
    for dist in ("edgeexit", "torch", "torchvision", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    import edgeexit

    out["edgeexit_source"] = edgeexit.__version__
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_torch_thread()     # imports torch, so machine_info records its version
    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "bench_attach_edge",
        "machine": machine,
        "versions": versions(),
        "config": {
            "models": args.models, "batches": args.batches, "threads": args.threads, "int8": not args.no_int8,
            "duration_s": args.duration, "windows": args.windows, "warmup_calls": WARMUP_CALLS,
            "images": args.images, "calibration_images": args.calibration_images, "seed": args.seed,
            "target_shares": list(SHARES), "policy": POLICY, "image": list(IMAGE),
            "onnxruntime_options": "ExitSession's: intra-op threads as given, spinning off, per-session pools",
            "gc_disabled_while_timing": True,
            "figure": "ms per sample = window busy time / samples; median over windows",
        },
        "models": {},
    }
    load = machine.get("loadavg_at_start")
    print(f"bench_attach_edge: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPU(s), "
          f"onnxruntime {machine['onnxruntime']}, torch {report['versions']['torch']}, torchvision "
          f"{report['versions']['torchvision']}; load average at start {load}", flush=True)
    x = random_images(args.images, args.seed)
    calibration = random_images(args.calibration_images, args.seed + 1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeexit-bench-attach-edge-") as tmp:
        for name in args.models:
            report["models"][name] = run_model(name, args, x, calibration, Path(tmp))
            write_json(args.out, report)      # partial results survive a later failure
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print_tables(report)
    before = [c["loadavg_before"][0] for i in report["models"].values() for p in i["precisions"].values()
              for c in p["configs"]]
    print(f"\nload average (1, 5, 15 min) at start {load}, at end {report['machine']['loadavg_at_end']}; 1-min load "
          f"before each timed configuration {min(before):.2f}-{max(before):.2f}; {report['seconds']:.0f} s in all")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
