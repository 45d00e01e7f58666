"""Shared pieces of the benchmark scripts: trained-model cache, calibrated packages, timing, reports.

Nothing here imports torch, onnx or the exporter at module level: ``bench_threads.py``
imports this module in its worker subprocesses, which must stay torch-free so that
the only threads in them are onnxruntime's.

Cache layout (``benchmarks/.cache``, git-ignored)::

    {model}-e{epochs}-s{seed}.pt                  trained state_dict
    {model}-e{epochs}-s{seed}.json                how it was trained (threads, versions, seconds)
    packages/{model}-e{epochs}-s{seed}.eexit/     exported package, calibrated shared threshold
    packages/{model}-e{epochs}-s{seed}.json       what the package was built from (reused if it matches)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit._atomic import write_bytes_atomically
from edgeexit.datasets import Splits, mnist5k_splits
from edgeexit.measure import LatencyStats
from edgeexit.package import sha256_file

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_EPOCHS = {"blenet": 20, "bresnet": 6}
MAX_DROP = 0.003


def one_torch_thread() -> None:
    """Pin torch to one thread, like every onnxruntime session here (call before torch works)."""
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    torch.set_num_threads(1)


def timing_parser(doc: str, *, zoo_models: bool, block: int) -> argparse.ArgumentParser:
    """The options every timing script shares; ``parse_timing_args`` fills the --quick defaults."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    if zoo_models:
        ap.add_argument("--models", default="blenet,bresnet", help="comma-separated zoo models")
        ap.add_argument("--epochs-blenet", type=int, default=DEFAULT_EPOCHS["blenet"])
        ap.add_argument("--epochs-bresnet", type=int, default=DEFAULT_EPOCHS["bresnet"])
        ap.add_argument("--batch-sizes", default="1,64")
        ap.add_argument("--warmup-batches", type=int, default=None, help="untimed rounds at batch > 1")
    ap.add_argument("--passes", type=int, default=None, help="timing passes over the test samples")
    ap.add_argument("--samples", type=int, default=None, help="test samples used (default: all 1000)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed batch-1 rounds before timing")
    ap.add_argument("--block", type=int, default=block,
                    help=f"interleave the contenders per block of this many inputs (default {block}; 1: per "
                         "input, every call follows another contender's, caches cold; 100: each runs warm)")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads while training (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 pass, 200 samples, short warm-up (numbers are not for reporting)")
    ap.add_argument("--json", type=Path, default=None, help="write every number and machine info here")
    return ap


def parse_timing_args(ap: argparse.ArgumentParser, argv: list[str] | None,
                      defaults: dict[str, tuple[int, int]]) -> argparse.Namespace:
    """Parse; options left unset take ``defaults[name] = (full run, --quick)``; validate."""
    args = ap.parse_args(argv)
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if hasattr(args, "models"):
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        for m in args.models:
            if m not in DEFAULT_EPOCHS:
                ap.error(f"unknown model {m!r}; choose from {', '.join(DEFAULT_EPOCHS)}")
    if min(args.passes, args.samples, args.block) < 1:
        ap.error("--passes, --samples and --block must be >= 1")
    return args


def timing_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings every zoo-model timing script records in its JSON ``config``."""
    return {
        "models": args.models, "epochs": {"blenet": args.epochs_blenet, "bresnet": args.epochs_bresnet},
        "seed": args.seed, "passes": args.passes, "samples": args.samples, "batch_sizes": args.batch_sizes,
        "warmup_calls_batch1": args.warmup, "warmup_calls_batched": args.warmup_batches,
        "interleave_block_samples": args.block, "quick": args.quick, "max_drop": MAX_DROP,
    }


def log(message: str) -> None:
    """Progress and export chatter go to stderr; stdout holds only the result tables."""
    print(message, file=sys.stderr, flush=True)


def cache_key(model: str, epochs: int, seed: int) -> str:
    return f"{model}-e{epochs}-s{seed}"


def _write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


# --- training and packaging (torch needed) --------------------------------------------


def trained_model(model_name: str, epochs: int, seed: int, splits: Splits, train_threads: int = 1,
                  make: Callable[[], Any] | None = None) -> Any:
    """The zoo model (or ``make()``, cached under ``model_name``) trained on ``splits.train``,
    from the cache when it is there.

    Training runs with ``train_threads`` torch threads (default 1) so that the result is
    bit-for-bit reproducible on a given machine and torch build; the thread count used
    is recorded beside the weights.
    """
    import torch

    from edgeexit.zoo import get_model
    from edgeexit.zoo.train import train_early_exit

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = cache_key(model_name, epochs, seed)
    weights = CACHE_DIR / f"{key}.pt"
    torch.manual_seed(seed)  # the initial weights come from torch's global generator
    model = make() if make is not None else get_model(model_name)
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log(f"[{model_name}] loaded cached weights {weights.relative_to(BENCH_DIR)}")
        return model.eval()

    previous = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    log(f"[{model_name}] training {epochs} epoch(s) on {len(splits.train)} samples "
        f"(seed {seed}, {train_threads} torch thread(s)) ...")
    started = time.perf_counter()
    try:
        train_early_exit(model, splits.train.x, splits.train.y, epochs=epochs, seed=seed)
    finally:
        torch.set_num_threads(previous)
    took = time.perf_counter() - started
    tmp = weights.with_name(f".{weights.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    _write_json_atomic(weights.with_suffix(".json"), {
        "model": model_name, "epochs": epochs, "seed": seed, "train_threads": train_threads,
        "train_seconds": round(took, 1), "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "sha256": sha256_file(weights),
        "weights_digest": state_digest(model.state_dict()),
    })
    log(f"[{model_name}] trained in {took:.1f} s, cached as {weights.relative_to(BENCH_DIR)}")
    return model.eval()


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and bytes (stable across torch.save calls)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """A trained model, its calibrated package and the data splits."""

    model_name: str
    epochs: int
    seed: int
    splits: Splits
    model: Any                 # the trained EarlyExitModel (eval mode)
    package: Path
    threshold: float
    calibration: dict[str, Any]


def prepare(model_name: str, epochs: int, seed: int, *, train_threads: int = 1,
            max_drop: float = MAX_DROP) -> Prepared:
    """Train (or load), export with the full model, calibrate the shared entropy threshold.

    The threshold is the most permissive one shared by every early exit whose accuracy
    drop on the calibration split stays within ``max_drop`` (``shared_threshold``); it is
    written into the package with ``set_thresholds``.  A package built earlier from the
    same weights, edgeexit/torch/onnxruntime versions and ``max_drop`` is reused.
    """
    import onnxruntime as ort
    import torch

    import edgeexit
    from edgeexit.calibrate import record_exits, shared_threshold
    from edgeexit.datasets import MNIST_PREPROCESSING
    from edgeexit.export import export_package
    from edgeexit.package import load_package, set_thresholds
    from edgeexit.runtime import ExitSession

    splits = mnist5k_splits(seed)
    model = trained_model(model_name, epochs, seed, splits, train_threads)
    key = cache_key(model_name, epochs, seed)
    folder = CACHE_DIR / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.eexit"
    sidecar = folder / f"{key}.json"
    wanted = {
        "weights_sha256": sha256_file(CACHE_DIR / f"{key}.pt"), "edgeexit": edgeexit.__version__,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "max_drop": max_drop,
        "policy": "entropy",
    }
    if sidecar.is_file() and path.is_dir():
        built = json.loads(sidecar.read_text(encoding="utf-8"))
        if {k: built.get(k) for k in wanted} == wanted:
            try:
                package = load_package(path)
            except edgeexit.EdgeExitError as exc:
                log(f"[{model_name}] cached package unusable ({exc}); rebuilding")
            else:
                threshold = package.thresholds[0]
                if threshold == built["threshold"]:
                    log(f"[{model_name}] reusing cached package {path.relative_to(BENCH_DIR)}")
                    return Prepared(model_name, epochs, seed, splits, model, path, threshold,
                                    built["calibration"])

    early = model.num_exits - 1
    log(f"[{model_name}] exporting {path.relative_to(BENCH_DIR)}")
    export_package(model, {"image": torch.from_numpy(splits.train.x[:8])}, path, policy="entropy",
                   thresholds=[0.0] * early, name=model_name, labels=[str(i) for i in range(10)],
                   include_full_model=True, preprocessing=MNIST_PREPROCESSING, seed=seed, overwrite=True,
                   log=lambda line: log(f"[{model_name}] {line}"))
    records = record_exits(ExitSession(path), splits.calibration.x, splits.calibration.y)
    threshold, cal_acc, cal_shares = shared_threshold(records, max_drop)

    set_thresholds(path, [threshold] * early)
    calibration = {
        "samples": len(splits.calibration), "max_drop": max_drop, "threshold": threshold,
        "early_exit_accuracy": cal_acc, "full_accuracy": records.full_accuracy,
        "exit_shares": [float(s) for s in cal_shares],
    }
    _write_json_atomic(sidecar, {**wanted, "threshold": threshold, "calibration": calibration})
    log(f"[{model_name}] calibration split: shared entropy threshold {threshold:.4g}, accuracy "
        f"{cal_acc:.2%} (last exit {records.full_accuracy:.2%}), exit shares "
        f"{[round(float(s), 3) for s in cal_shares]}")
    return Prepared(model_name, epochs, seed, splits, model, path, threshold, calibration)


# --- timing --------------------------------------------------------------------------


def interleaved_timing(
    calls: Sequence[Callable[[np.ndarray], Any]],
    inputs: Sequence[np.ndarray],
    passes: int,
    warmup: int,
    on_result: dict[int, Callable[[Any, int], None]] | None = None,
    block: int = 1,
) -> list[list[int]]:
    """Time every call on every input, ``passes`` times; returns ns per call, per contender.

    The contenders are interleaved per block of ``block`` consecutive inputs (default 1:
    per input) and their order rotates with the block index and the pass
    (``(b + p) % len(calls)``), so slow drift of the machine (thermal, other load) hits all
    of them alike.  With ``block=1`` every call follows a different contender's call, so
    its caches and branch predictors are as cold as they get; larger blocks measure each
    contender warm, as a loop in an application would run it.  ``warmup`` untimed rounds
    (cycling over the inputs) run first.  ``on_result[j](result, ns)`` sees contender j's
    return value for every timed call.  Python's garbage collector is paused while timing.
    """
    m = len(calls)
    for x in itertools.islice(itertools.cycle(inputs), warmup):
        for call in calls:
            call(x)
    hooks = on_result or {}
    times: list[list[int]] = [[] for _ in range(m)]
    orders = [list(range(r, m)) + list(range(r)) for r in range(m)]
    blocks = [inputs[s:s + block] for s in range(0, len(inputs), max(1, block))]
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for p in range(passes):
            for b, chunk in enumerate(blocks):
                for j in orders[(b + p) % m]:
                    call, out, hook = calls[j], times[j], hooks.get(j)
                    for x in chunk:
                        t0 = clock()
                        result = call(x)
                        took = clock() - t0
                        out.append(took)
                        if hook is not None:
                            hook(result, took)
    finally:
        gc.enable()
    return times


def stats_dict(stats: LatencyStats) -> dict[str, Any]:
    return asdict(stats)


# --- reporting ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        # x86: "model name"; Raspberry Pi / other ARM boards: "Model" or "Hardware"
        for key in ("model name", "model", "hardware"):
            if fields.get(key) and not fields[key].isdigit():
                info["cpu_model"] = fields[key]
                break
    except OSError:
        pass
    governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor.is_file():
        info["cpufreq_governor"] = governor.read_text().strip()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    try:
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    _write_json_atomic(Path(path), data)
    log(f"wrote {path}")


def fmt_ms(v: float) -> str:
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain text table; ``align`` has one 'l' or 'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
