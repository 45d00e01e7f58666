"""Exits on a network trained without them, end to end on real data, with the time each step takes.

A ResNet-style network written as a user would (a conv stem, residual stages ``layer1`` ..
``layer3`` of one BasicBlock each, with BatchNorm and a skip, global average pool, ``fc``) is
trained on MNIST-5k's train split (3,000 digits) with plain cross-entropy and no exits.  By
default two of them: 16/32/64 channels (0.2 ms per digit in onnxruntime here) and 32/64/128
(4x the compute).  Then, each step timed:

1. ``cuttable_layers`` and each cut's share of the model's onnxruntime time (what
   ``edgeexit attach --dry-run`` prints);
2. ``attach_exits(model, ["layer1", "layer2"], heads="auto")``: the model cut in its torch.fx graph;
3. ``train_exit_heads``: the heads only, the backbone frozen; its parameters and BatchNorm
   buffers are checked to be bit-for-bit unchanged;
4. ``export_package`` with ``full.onnx`` (the plain model) and the compiled graph, exits disabled;
   ``full.onnx`` is checked against the torch model on the test split;
5. ``calibrate_temperatures`` on the calibration split (1,000 digits), the compiled graph rebuilt;
   each exit's expected calibration error before and after, on calibration and on test;
6. thresholds chosen on the calibration split by the flow ``edgeexit calibrate PKG --data CAL.npz
   --max-drop 0.5 --device cpu --json`` runs (``edgeexit.cli.calibrate.run_calibration``): exit
   paths timed here, the stage-time cost model's expected speedup, a replay, and the exits
   written disabled when they do not pay;
7. on the TEST split (1,000 digits): each exit's accuracy alone, the package's accuracy and exit
   shares against the plain model's (the drop in points with its paired 95 % interval), and, at
   batch 1, ``run_benchmark(compare_full=True)`` (what ``edgeexit bench --compare full`` runs:
   fixed-duration windows, the package and ``full.onnx`` interleaved) set against the expected
   speedup.  When calibration disabled the exits, the chosen thresholds are benchmarked as well,
   through ``ExitSession.run(thresholds=...)`` in the same kind of interleaved windows, so the
   figure the decision rests on is shown.

One torch thread and one onnxruntime thread throughout (device profile ``cpu``).  Progress goes
to stderr, the tables to stdout, every figure and each step's seconds to the JSON file.  About
4 minutes on 2 cores.

    python benchmarks/bench_attach.py                    # -> benchmarks/results/bench_attach.json
    python benchmarks/bench_attach.py --duration 5       # longer bench windows
    python benchmarks/bench_attach.py --widths 16,32,64  # one backbone
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, log, machine_info, one_torch_thread, table, write_json

from edgeexit.bench import BenchConfig, BenchReport, run_benchmark
from edgeexit.datasets import MNIST_PREPROCESSING, Split, mnist5k_splits
from edgeexit.devices import get_profile
from edgeexit.devices.meters import EstimateMeter
from edgeexit.errors import InputError
from edgeexit.package import load_package
from edgeexit.runtime import ExitSession

DEFAULT_OUT = BENCH_DIR / "results" / "bench_attach.json"
CUTS = ("layer1", "layer2")
WIDTHS = ((16, 32, 64), (32, 64, 128))   # a small backbone and one 4x its compute


# --- the user's network: nothing here knows about exits -------------------------------------


def user_resnet(widths: tuple[int, int, int]) -> Any:
    """A small ResNet for 28x28 digits, as a user would write it (torchvision's layout, one block a stage)."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, widths: tuple[int, int, int], classes: int = 10) -> None:
            super().__init__()
            a, b, c = widths
            self.stem = nn.Sequential(nn.Conv2d(1, a, 3, 1, 1, bias=False), nn.BatchNorm2d(a), nn.ReLU())
            self.layer1 = nn.Sequential(BasicBlock(a, a))          # 28x28
            self.layer2 = nn.Sequential(BasicBlock(a, b, 2))       # 14x14
            self.layer3 = nn.Sequential(BasicBlock(b, c, 2))       # 7x7
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c, classes)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.layer3(self.layer2(self.layer1(self.stem(image))))
            return self.fc(torch.flatten(self.pool(x), 1))   # type: ignore[no-any-return]

    return ResNet(widths)


def head_text(head: Any) -> str:
    """``AdaptiveAvgPool2d + Flatten + Linear(16, 10)``: an automatic head in one line."""
    parts = list(head.children()) or [head]
    return " + ".join(f"Linear({m.in_features}, {m.out_features})" if type(m).__name__ == "Linear"
                      else type(m).__name__ for m in parts)


def train_backbone(model: Any, train: Split, epochs: int, seed: int) -> list[dict[str, float]]:
    """Plain cross-entropy, Adam with a one-cycle schedule (peak 5e-3), batches of 64, seeded."""
    import torch
    from torch import nn

    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * -(-len(y) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        started, loss_sum, correct = time.perf_counter(), 0.0, 0
        for rows in torch.randperm(len(y), generator=order).split(64):
            logits = model(x[rows])
            loss = nn.functional.cross_entropy(logits, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(rows)
            correct += int((logits.argmax(1) == y[rows]).sum())
        history.append({"epoch": epoch + 1, "loss": loss_sum / len(y), "train_accuracy": correct / len(y),
                        "seconds": time.perf_counter() - started})
        log(f"[backbone] epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}, train accuracy "
            f"{history[-1]['train_accuracy']:.2%} ({history[-1]['seconds']:.1f} s)")
    return history


# --- steps ------------------------------------------------------------------------------------


class Steps:
    """Seconds per named step, in the order they ran."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log(f"[{self.prefix}] {name} ...")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)
            log(f"[{self.prefix}] {name}: {self.seconds[name]:.1f} s")


def calibrate_like_the_cli(package: Path, cal_npz: Path, max_drop_pt: float) -> tuple[dict[str, Any], str]:
    """``edgeexit calibrate PACKAGE --data CAL --max-drop P --device cpu --json``: its JSON and its stderr."""
    from edgeexit.cli.calibrate import run_calibration

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        run_calibration(package, cal_npz, max_drop=max_drop_pt, device="cpu", as_json=True)
    return json.loads(out.getvalue()), err.getvalue().strip()


class AtThresholds:
    """``session`` as ``run_benchmark`` sees it, except that every call is
    ``session.run(x, thresholds=..., engine=...)``: the exits at thresholds the package does not hold."""

    def __init__(self, session: ExitSession, thresholds: list[float], engine: str, probe: np.ndarray) -> None:
        self._session, self._thresholds, self._engine = session, tuple(thresholds), engine
        try:   # the compiled graph serves these thresholds (run_benchmark then times both engines)
            session.run(probe, thresholds=self._thresholds, engine="compiled")
            self.has_compiled = True
        except InputError:
            self.has_compiled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, inputs: Any, *, early_exits: bool = True, engine: str | None = None) -> Any:
        return self._session.run(inputs, thresholds=self._thresholds, early_exits=early_exits,
                                 engine=engine or self._engine)

    def engine_for(self, batch_size: int) -> str:
        return self._engine


def bench(session: Any, test: Split, args: argparse.Namespace) -> BenchReport:
    """``edgeexit bench PKG --device cpu --compare full --batch 1`` on the test split."""
    profile = get_profile("cpu")
    meter = EstimateMeter(profile.power.busy_watts, profile.power.idle_watts,
                          source=f"profile {profile.name}: {profile.power.source}")
    config = BenchConfig(batch=1, duration_s=args.duration, windows=args.windows, warmup_s=args.warmup)
    return run_benchmark(session, {"image": test.x}, test.y, config, meter, compare_full=True)


def contenders(report: BenchReport) -> list[dict[str, Any]]:
    rows = report.to_dict()["contenders"]
    full = next(r for r in rows if r["name"].startswith("full model"))
    for r in rows:
        r["speedup_mean"] = full["mean_ms"] / r["mean_ms"]
        r["speedup_p50"] = full["p50_ms"] / r["p50_ms"]
    return rows


# --- the run ----------------------------------------------------------------------------------


def paired_drop(plain: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy drop of ``predicted`` against ``plain`` on the same samples, in points, with its paired
    95 % interval: ``lost`` samples the plain model gets right and the package wrong, ``won`` the other
    way round; drop = (lost - won) / n, standard error sqrt(lost + won) / n."""
    n = labels.size
    lost = int(((plain == labels) & (predicted != labels)).sum())
    won = int(((predicted == labels) & (plain != labels)).sum())
    drop, half = 100 * (lost - won) / n, 100 * 1.96 * (lost + won) ** 0.5 / n
    return {"drop_points": drop, "lost": lost, "won": won, "ci95_points": [drop - half, drop + half]}


# --- one backbone -----------------------------------------------------------------------------


def run_one(args: argparse.Namespace, widths: tuple[int, int, int], work: Path) -> dict[str, Any]:
    import torch

    from edgeexit.calibrate import calibrate_temperatures, expected_calibration_error
    from edgeexit.export import export_package
    from edgeexit.export.attach import attach_exits, cuttable_layers
    from edgeexit.export.compile import compile_package
    from edgeexit.export.layer_times import time_shares
    from edgeexit.export.train_heads import train_exit_heads

    name = "resnet-" + "-".join(map(str, widths))
    steps = Steps(name)
    splits = mnist5k_splits(args.seed)
    train, cal, test = splits.train, splits.calibration, splits.test
    example = {"image": torch.from_numpy(train.x[:8])}

    with steps("train backbone"):
        torch.manual_seed(args.seed)
        model = user_resnet(widths)
        history = train_backbone(model, train, args.epochs, args.seed)
        model.eval()
        with torch.no_grad():
            plain_logits = model(torch.from_numpy(test.x)).numpy()
    plain_accuracy = float((plain_logits.argmax(1) == test.y).mean())
    log(f"[{name}] {args.epochs} epochs in {steps.seconds['train backbone']:.1f} s; test accuracy "
        f"{plain_accuracy:.2%} (torch, eval mode)")

    with steps("dry run"):   # what `edgeexit attach --dry-run` prints
        points = cuttable_layers(model, example)
        shares = time_shares(model, example, list(CUTS))

    with steps("attach exits"):
        torch.manual_seed(args.seed)
        exits = attach_exits(model, list(CUTS), example_inputs=example, heads="auto")
    heads = [head_text(exits.exit_at(k).head) for k in range(len(CUTS))]   # type: ignore[union-attr]

    backbone = {key: value.clone() for key, value in model.state_dict().items()}
    with steps("train heads"):
        report = train_exit_heads(exits, (train.x, train.y), epochs=args.head_epochs, lr=args.head_lr,
                                  seed=args.seed, log=lambda line: log(f"[{name}] heads: {line}"))
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, backbone[key])]
    assert not changed, f"training the heads changed the backbone: {changed}"
    buffers = [key for key in backbone if "running_" in key or "num_batches_tracked" in key]
    log(f"[{name}] backbone unchanged, bit for bit: {len(backbone) - len(buffers)} parameter tensors and "
        f"{len(buffers)} BatchNorm buffers")

    path = work / f"{name}.eexit"
    with steps("export"):
        export_package(exits, example, path, policy="entropy", thresholds=None, name=name,
                       labels=[str(i) for i in range(10)], include_full_model=True,
                       preprocessing=MNIST_PREPROCESSING, seed=args.seed, log=lambda line: log(f"[{name}] {line}"))
    full_logits = ExitSession(path, device="cpu").run_full(test.x)
    full_vs_torch = {"max_abs_logit_difference": float(np.abs(full_logits - plain_logits).max()),
                     "same_predictions": int((full_logits.argmax(1) == plain_logits.argmax(1)).sum()),
                     "samples": len(test)}

    with steps("temperatures"):
        fits = calibrate_temperatures(path, cal.x, cal.y)
        if load_package(path).compiled is not None:   # it divides by the temperatures it was built with
            compile_package(path, log=lambda line: log(f"[{name}] {line}"))
    session = ExitSession(path, device="cpu")
    test_logits, cal_logits = session.run_all_exits(test.x), session.run_all_exits(cal.x)
    per_exit = [{
        "exit": e, "after": CUTS[e] if e < len(CUTS) else "fc, the model's own",
        "temperature": fit.temperature,
        "ece_calibration_before": fit.ece_before, "ece_calibration_after": fit.ece_after,
        "ece_test_before": expected_calibration_error(test_logits[e], test.y),
        "ece_test_after": expected_calibration_error(test_logits[e], test.y, temperature=fit.temperature),
        "train_accuracy": report.final[e],
        "calibration_accuracy": float((cal_logits[e].argmax(1) == cal.y).mean()),
        "test_accuracy": float((test_logits[e].argmax(1) == test.y).mean()),
    } for e, fit in enumerate(fits)]

    cal_npz = work / "calibration.npz"
    if not cal_npz.is_file():
        np.savez(cal_npz, image=cal.x, labels=cal.y)
    with steps("calibrate thresholds"):
        cli_json, cli_stderr = calibrate_like_the_cli(path, cal_npz, args.max_drop)
    if cli_stderr:
        log(f"[{name}] calibrate said: {cli_stderr}")
    entry = load_package(path, verify_hashes=True).manifest["calibration"]["history"][-1]
    disabled = entry.get("exits_disabled")
    expected_setting = entry["full_cost"] / entry["expected_cost"]

    with steps("bench"):
        session = ExitSession(path, device="cpu")
        engine = session.engine_for(1)
        written = bench(session, test, args)
    rows = contenders(written)
    package_row, full_row = rows[0], next(r for r in rows if r["name"].startswith("full model"))
    ratios = written.ratios()
    assert ratios is not None
    plain_pred = full_logits.argmax(1)
    test_shares = package_row["exit_shares"]

    at_thresholds = None
    if disabled:
        with steps("bench at the chosen thresholds"):
            proxy = AtThresholds(ExitSession(path, device="cpu"), entry["thresholds"], entry["engine"] or "stages",
                                 test.x[:1])
            report_t = bench(proxy, test, args)
        rows_t = contenders(report_t)
        shares_t = rows_t[0]["exit_shares"]
        at_thresholds = {
            "thresholds": entry["thresholds"], "engine": entry["engine"], "test_accuracy": rows_t[0]["accuracy"],
            "test_exit_shares": shares_t,
            "vs_plain": paired_drop(plain_pred, session.run(test.x, thresholds=entry["thresholds"]).predictions,
                                    test.y),
            "measured_speedup_mean": rows_t[0]["speedup_mean"], "measured_speedup_p50": rows_t[0]["speedup_p50"],
            "expected_speedup": expected_setting,
            "expected_speedup_with_test_shares": entry["full_cost"] / float(np.dot(shares_t, entry["exit_costs"])),
            "contenders": rows_t, "bench": report_t.to_dict(),
        }

    return {
        "name": name, "widths": list(widths),
        "backbone": {"architecture": f"ResNet: conv stem + layer1..layer3 (one BasicBlock each, "
                                     f"{'/'.join(map(str, widths))} channels), global average pool, fc",
                     "parameters": sum(p.numel() for p in model.parameters()), "epochs": history,
                     "test_accuracy_torch": plain_accuracy},
        "cuts": list(CUTS), "heads": heads,
        "cuttable_layers": [{"name": p.name, "kind": p.kind, "shape": list(p.shape), "carried": p.carried}
                            for p in points],
        "dry_run_time_before": {k: shares.get(k) for k in CUTS},
        "heads_training": {"epochs": args.head_epochs, "lr": args.head_lr,
                           "accuracies": [list(a) for a in report.accuracies], "backbone_unchanged": True,
                           "parameter_tensors": len(backbone) - len(buffers), "batchnorm_buffers": len(buffers)},
        "full_onnx_vs_torch": full_vs_torch,
        "exits": per_exit,
        "calibration": {
            "max_drop_points": args.max_drop, "samples": entry["samples"], "thresholds": entry["thresholds"],
            "exits_disabled": disabled, "engine": entry["engine"], "full_model": entry["full_model"],
            "exit_costs_ms": entry["exit_costs"], "full_cost_ms": entry["full_cost"],
            "expected_cost_ms": entry["expected_cost"], "disabled_cost_ms": entry.get("disabled_cost"),
            "stage_costs_ms": entry["stage_costs"], "expected_shares": entry["expected_shares"],
            "validation_accuracy": entry["validation_accuracy"], "full_accuracy": entry["full_accuracy"],
            "expected_speedup_of_setting": expected_setting, "replay": cli_json.get("replay"),
            "cost_source": entry["cost_source"], "method": entry["method"], "stderr": cli_stderr or None,
        },
        "test": {
            "engine_batch1": engine, "package_accuracy": package_row["accuracy"],
            "plain_accuracy": full_row["accuracy"],
            "vs_plain": paired_drop(plain_pred, session.run(test.x).predictions, test.y),
            # disabled, the package runs full.onnx behind the runtime's per-call work, timed by calibration too
            "exit_shares": test_shares,
            "expected_speedup": entry["full_cost"] / entry["disabled_cost"] if disabled else expected_setting,
            "expected_speedup_with_test_shares": (None if disabled else entry["full_cost"] / float(
                np.dot(test_shares, entry["exit_costs"]))),
            "measured_speedup_mean": ratios["speedup_mean"], "measured_speedup_p50": ratios["speedup_p50"],
            "contenders": rows, "bench": written.to_dict(),
        },
        "at_chosen_thresholds": at_thresholds,
        "seconds": {**steps.seconds, "total": round(sum(steps.seconds.values()), 1)},
    }


# --- report -----------------------------------------------------------------------------------


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def shares_text(shares: list[float] | None) -> str:
    return "-" if not shares else " ".join(f"{s:.3f}" for s in shares)


def points(v: float) -> str:
    """A signed change in accuracy points (a loss negative), never '-0.00'."""
    return f"{v + 0.0:+.2f}"


def drop_text(d: dict[str, Any]) -> str:
    lo, hi = d["ci95_points"]
    return f"{points(-d['drop_points'])} [{points(-hi)}, {points(-lo)}]"


ROW_NAMES = {"package, exits disabled": "exits disabled (runs full.onnx)", "early exit, compiled": "compiled graph",
             "early exit, stage loop": "stage loop"}


def print_run(r: dict[str, Any], args: argparse.Namespace) -> None:
    b, c, t, a = r["backbone"], r["calibration"], r["test"], r["at_chosen_thresholds"]
    check = r["full_onnx_vs_torch"]
    print(f"\n=== {r['name']}: {b['architecture']}; {b['parameters']:,} parameters ===")
    print(f"trained without exits: {args.epochs} epochs in {r['seconds']['train backbone']:.1f} s, test accuracy "
          f"{b['test_accuracy_torch']:.2%}. Exits after {', '.join(r['cuts'])}, heads auto ({'; '.join(r['heads'])}), "
          f"trained {args.head_epochs} epochs at lr {args.head_lr:g} with the backbone frozen: its "
          f"{r['heads_training']['parameter_tensors']} parameter tensors and "
          f"{r['heads_training']['batchnorm_buffers']} BatchNorm buffers unchanged bit for bit. full.onnx vs torch "
          f"on the test split: max |logit difference| "
          f"{check['max_abs_logit_difference']:.2e}, same predictions {check['same_predictions']}/{check['samples']}. "
          f"Dry run: {len(r['cuttable_layers'])} layers can be cut; share of the model's onnxruntime time up to the "
          "cut: " + ", ".join(f"{k} {v:.1%}" for k, v in r["dry_run_time_before"].items() if v is not None))
    rows = [[f"exit {e['exit']} ({e['after']})", f"{e['temperature']:.3f}",
             f"{e['ece_calibration_before']:.4f} -> {e['ece_calibration_after']:.4f}",
             f"{e['ece_test_before']:.4f} -> {e['ece_test_after']:.4f}", pct(e["calibration_accuracy"]),
             pct(e["test_accuracy"])] for e in r["exits"]]
    print(table(["exit (each alone)", "temperature", "ECE calibration", "ECE test", "calibration acc", "test acc"],
                rows))
    print(f"calibrate --max-drop {c['max_drop_points']:g} --device cpu (calibration split): thresholds "
          f"[{' '.join(f'{x:.4g}' for x in c['thresholds'])}] on the {c['engine']} engine; exit paths "
          f"{' '.join(f'{v:.4f}' for v in c['exit_costs_ms'])} ms, full model {c['full_cost_ms']:.4f} ms "
          f"({c['full_model']}), exits disabled {c['disabled_cost_ms']:.4f} ms; expected shares "
          f"{shares_text(c['expected_shares'])}, calibration accuracy "
          f"{c['validation_accuracy']:.2%} (last exit {c['full_accuracy']:.2%}); expected "
          f"{c['expected_speedup_of_setting']:.2f}x"
          + (f", replayed {c['replay']['speedup_vs_full']:.2f}x" if c.get("replay") else "")
          + (f"\n  EXITS DISABLED: {c['exits_disabled']}" if c["exits_disabled"] else ""))

    print(f"test split, batch 1, {args.windows} window(s) x {args.duration:g} s per contender, interleaved with "
          "full.onnx, median over windows:")
    out: list[list[str]] = []

    def add(rows_: list[dict[str, Any]], label: str, drop: str, expected: str) -> None:
        for row in rows_:
            full = row["name"].startswith("full model")
            if full and out:   # the plain model once, from the first run
                continue
            first = row is rows_[0]
            out.append(["plain model (full.onnx)" if full else f"{label}: {ROW_NAMES.get(row['name'], row['name'])}",
                        pct(row["accuracy"]),
                        "-" if full else drop if first else "same", shares_text(row["exit_shares"]),
                        f"{row['mean_ms']:.4f}", f"{row['p50_ms']:.4f}", f"{row['speedup_mean']:.2f}x",
                        f"{row['speedup_p50']:.2f}x", "1.00x" if full else expected if first else "-"])

    test_exp = t["expected_speedup_with_test_shares"]
    add([row for row in t["contenders"] if row["name"].startswith("full model")], "", "", "")
    add(t["contenders"], "package as calibrated", drop_text(t["vs_plain"]),
        f"{t['expected_speedup']:.2f}x" + ("" if test_exp is None else f" ({test_exp:.2f}x)"))
    if a is not None:
        add(a["contenders"], "exits at the chosen thresholds", drop_text(a["vs_plain"]),
            f"{a['expected_speedup']:.2f}x ({a['expected_speedup_with_test_shares']:.2f}x)")
    print(table(["contender", "test acc", "vs plain, pt [95% CI]", "exit shares", "mean ms", "p50 ms",
                 "speedup mean", "p50", "expected (test shares)"], out))


def summary_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        c, t, a = r["calibration"], r["test"], r["at_chosen_thresholds"]
        alone = " / ".join(f"{e['test_accuracy']:.1%}" for e in r["exits"])
        decided = " ".join(f"{x:.3g}" for x in c["thresholds"])
        decided = f"disabled (chose {decided})" if c["exits_disabled"] else decided
        measured = f"{t['measured_speedup_mean']:.2f}x / {t['expected_speedup']:.2f}x"
        chosen = "-" if a is None else (f"{a['measured_speedup_mean']:.2f}x / {a['expected_speedup']:.2f}x, "
                                        f"{points(-a['vs_plain']['drop_points'])} pt")
        rows.append([r["name"], f"{r['backbone']['parameters']:,}", pct(t["plain_accuracy"]), alone, decided,
                     pct(t["package_accuracy"]), points(-t["vs_plain"]["drop_points"]),
                     shares_text(t["exit_shares"]), measured, chosen])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", default=[",".join(map(str, w)) for w in WIDTHS],
                    help="channels of layer1,layer2,layer3, one backbone per value (default: "
                         f"{' '.join(','.join(map(str, w)) for w in WIDTHS)})")
    ap.add_argument("--epochs", type=int, default=8, help="backbone training epochs (default 8)")
    ap.add_argument("--head-epochs", type=int, default=10, help="exit-head training epochs (default 10)")
    ap.add_argument("--head-lr", type=float, default=1e-2,
                    help="Adam learning rate of the exit heads (default 0.01; at train_exit_heads' own default, "
                         "0.001, these pooled linear heads are still far from converged after 10 epochs)")
    ap.add_argument("--seed", type=int, default=0, help="data splits, weights and training order (default 0)")
    ap.add_argument("--max-drop", type=float, default=0.5,
                    help="accuracy points the exits may lose, as `edgeexit calibrate --max-drop` (default 0.5)")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per bench window (default 2)")
    ap.add_argument("--windows", type=int, default=3, help="bench windows per contender (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="bench warm-up seconds per contender (default 0.5)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"JSON file to write (default {DEFAULT_OUT.relative_to(BENCH_DIR.parent)})")
    args = ap.parse_args(argv)
    if min(args.epochs, args.head_epochs, args.windows) < 1 or args.duration <= 0 or args.max_drop < 0 \
            or args.head_lr <= 0:
        ap.error("--epochs, --head-epochs and --windows must be >= 1, --duration and --head-lr > 0, --max-drop >= 0")
    backbones = []
    for given in args.widths:
        try:
            widths = tuple(int(w) for w in given.split(","))
        except ValueError:
            widths = ()
        if len(widths) != 3 or min(widths) < 1:
            ap.error(f"--widths takes three positive channel counts per backbone, e.g. 16,32,64; got {given!r}")
        backbones.append(widths)

    one_torch_thread()
    info = machine_info()
    print(f"bench_attach: {info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPU(s), onnxruntime "
          f"{info['onnxruntime']}, torch {info.get('torch')}; 1 torch thread, device profile cpu (1 onnxruntime "
          f"thread); MNIST-5k, 3,000 train / 1,000 calibration / 1,000 test, seed {args.seed}")
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeexit-attach-") as tmp:
        for widths in backbones:
            results.append(run_one(args, widths, Path(tmp)))
            print_run(results[-1], args)
    total = round(time.perf_counter() - started, 1)

    print(f"\n=== summary: exits after {', '.join(CUTS)} of a ResNet trained without them, calibrated with "
          f"--max-drop {args.max_drop:g}; test split; speedup against full.onnx at batch 1, mean latency ===")
    print(table(["backbone", "params", "plain acc", "each exit alone", "thresholds", "package acc", "vs plain pt",
                 "exit shares", "measured / expected", "at chosen thresholds"], summary_rows(results)))
    steps = list(dict.fromkeys(k for r in results for k in r["seconds"]))
    print("\nseconds per step")
    print(table(["step", *[r["name"] for r in results]],
                [[k, *[f"{r['seconds'][k]:.1f}" if k in r["seconds"] else "-" for r in results]] for k in steps]))
    valid = all(r["test"]["bench"]["valid"] and (r["at_chosen_thresholds"] is None
                                                 or r["at_chosen_thresholds"]["bench"]["valid"]) for r in results)
    print(f"whole run {total:.0f} s; machine: {info.get('cpu_model', info.get('processor'))}, {info.get('cpu_count')} "
          f"CPU(s), load average at start {info.get('loadavg_at_start')}; throttling "
          f"{'none seen' if valid else 'SEEN (run invalid)'}")
    write_json(args.out, {
        "machine": info, "note": "noisy shared 2-core VM" if info.get("cpu_count") == 2 else None,
        "command": " ".join(["python benchmarks/bench_attach.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"widths": [list(w) for w in backbones], "cuts": list(CUTS), "epochs": args.epochs,
                   "head_epochs": args.head_epochs, "head_lr": args.head_lr, "seed": args.seed,
                   "max_drop_points": args.max_drop, "policy": "entropy", "device": "cpu", "batch": 1,
                   "duration_s": args.duration, "windows": args.windows, "warmup_s": args.warmup,
                   "flow": "train backbone (no exits) -> cuttable_layers + time_shares (attach --dry-run) -> "
                           "attach_exits -> train_exit_heads (backbone frozen) -> export_package -> "
                           "calibrate_temperatures (+ compile_package) -> edgeexit.cli.calibrate.run_calibration "
                           "(as `edgeexit calibrate --json`) -> edgeexit.bench.run_benchmark(compare_full=True) "
                           "on the test split"},
        "seconds": total, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
