"""MuE on the edge runtime: layers executed, accuracy and wall time against the plain model.

The zoo's MuE model (6 tied encoder layers, 6 decoder layers, width 64) is trained on the
digit question-answering task (``edgeexit.zoo.mue_task``; weights cached under
``benchmarks/.cache``), exported as a seq2seq package, and its plain counterpart (one
encoder graph, one decoder-step graph with the cache, same weights) is exported beside it.

Thresholds are chosen on the calibration split (1,000 pairs): first each modality's encoder
threshold with the decoder exits off, then the decoder threshold, each the loosest setting
whose exact-match accuracy stays >= 99 % of the full model's on that split.  Every figure
below is on the test split (1,000 pairs), batch 1 for wall time (interleaved per sample:
plain model, per-layer graphs with exits off, MuE drop, MuE copy_hidden, the joint-encoder
ablation), batched for accuracy and layer counts.

Layers are counted as MuE counts them: encoder layers per modality plus decoder layers per
generated token; the full model runs 2 x 6 + 6 x tokens.

    python benchmarks/bench_mue.py --json          # -> benchmarks/results/bench_mue.json
    python benchmarks/bench_mue.py --quick         # smoke run (100 test samples), not for reporting
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, log, machine_info, table, write_json

DEFAULT_JSON = BENCH_DIR / "results" / "bench_mue.json"
GRID = [0.0, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]
EPOCHS = 12


def trained(seed: int, epochs: int) -> Any:
    import torch

    from edgeexit.zoo.mue import MuEConfig, MuEModel, train_mue
    from edgeexit.zoo.mue_task import mnist_qa_splits

    cache = BENCH_DIR / ".cache" / f"mue-e{epochs}-s{seed}.pt"
    torch.manual_seed(seed)
    model = MuEModel(MuEConfig())
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        log(f"[mue] loaded cached weights {cache.relative_to(BENCH_DIR)}")
    else:
        log(f"[mue] training {epochs} epochs (a few minutes on one core) ...")
        torch.set_num_threads(1)
        history = train_mue(model, mnist_qa_splits(seed), epochs=epochs, seed=seed)
        log(f"[mue] loss per epoch {[round(h, 3) for h in history]}")
        cache.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval()


def accuracy(texts: list[str], answers: list[str]) -> float:
    return float(np.mean([t == a for t, a in zip(texts, answers)]))


def layer_counts(gen: Any) -> tuple[float, float]:
    """(layers run, layers the full model runs) summed over samples."""
    run = full = 0.0
    for i, tokens in enumerate(gen.decoder_layers):
        enc = sum(float(v[i]) for v in gen.encoder_layers.values())
        run += enc + sum(tokens)
        full += 6 * len(gen.encoder_layers) + 6 * len(tokens)
    return run, full


def generate_all(sess: Any, split: Any, batch: int = 100, **options: Any) -> tuple[list[str], Any]:
    from edgeexit.runtime.seq2seq import Generation

    texts, parts = [], []
    for s in range(0, len(split), batch):
        out = sess.generate({"image": split.image[s:s + batch], "question": split.question[s:s + batch]}, **options)
        texts += out.text
        parts.append(out)
    merged = Generation(
        tokens=[t for p in parts for t in p.tokens], text=texts,
        encoder_layers={k: np.concatenate([p.encoder_layers[k] for p in parts]) for k in parts[0].encoder_layers},
        decoder_layers=[d for p in parts for d in p.decoder_layers], encoder_ms=0.0)
    return texts, merged


def choose(sess: Any, cal: Any, full_acc: float, floor: float) -> dict[str, float | None]:
    """Loosest thresholds keeping calibration accuracy >= floor x full: each modality, then the decoder."""
    answers = cal.answers()
    chosen: dict[str, float | None] = {"image": None, "text": None, "decoder": None}
    for key in ("image", "text", "decoder"):
        for t in GRID:                       # loosest first: lower similarity thresholds exit more
            trial = {**chosen, key: t}
            texts, _ = generate_all(sess, cal, thresholds=trial)
            if accuracy(texts, answers) >= floor * full_acc:
                chosen[key] = t
                break
        log(f"[mue] calibration: {key} threshold {chosen[key]}")
    return chosen


def plain_runner(encoder: Any, decoder: Any, layers: int, heads: int, head_dim: int, limit: int) -> Any:
    from edgeexit.zoo.mue_task import BOS, EOS

    def run(feeds: dict[str, np.ndarray]) -> list[int]:
        memory, memory_bias = encoder.run(None, feeds)
        keys = np.zeros((layers, 1, heads, 0, head_dim), np.float32)
        values = keys
        token = np.array([[BOS]], np.int64)
        out = []
        for t in range(limit):
            logits, keys, values = decoder.run(None, {"token": token, "position": np.array([[t]], np.int64),
                                                      "past_key": keys, "past_value": values, "memory": memory,
                                                      "memory_bias": memory_bias})
            token = logits[:, 0].argmax(1)[:, None].astype(np.int64)
            out.append(int(token[0, 0]))
            if out[-1] == EOS:
                break
        return out
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const=str(DEFAULT_JSON), help="write the results as JSON (default path)")
    ap.add_argument("--quick", action="store_true", help="100 test samples, 1 timing pass: a smoke run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits and the weights")
    ap.add_argument("--passes", type=int, default=2, help="timing passes over the test samples at batch 1")
    ap.add_argument("--floor", type=float, default=0.99, help="accuracy to keep, as a fraction of the full model's")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from edgeexit.export.seq2seq import export_mue, export_plain_mue
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime._threads import session_options
    from edgeexit.zoo.mue_task import mnist_qa_splits

    started = time.time()
    splits = mnist_qa_splits(args.seed)
    test = splits.test
    n_time = 100 if args.quick else 300
    model = trained(args.seed, EPOCHS)
    c = model.config
    with tempfile.TemporaryDirectory(prefix="edgeexit-mue-bench-") as tmp:
        package = export_mue(model, Path(tmp) / "mue.eexit", log=None).root
        enc_path, dec_path = export_plain_mue(model, tmp)
        sess = ExitSession(package)
        opts = session_options(1, False, False)
        plain_enc, plain_dec = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                                for p in (enc_path, dec_path))
        plain = plain_runner(plain_enc, plain_dec, c.decoder_layers, c.heads, c.width // c.heads,
                             c.answer_len - 1)

        cal_full, _ = generate_all(sess, splits.calibration)
        cal_acc = accuracy(cal_full, splits.calibration.answers())
        log(f"[mue] calibration split: full model exact match {cal_acc:.2%}")
        chosen = choose(sess, splits.calibration, cal_acc, args.floor)
        joint = None
        for t in GRID:
            texts, _ = generate_all(sess, splits.calibration, thresholds={"encoder": t, "decoder": chosen["decoder"]},
                                    encoder_exit="joint")
            if accuracy(texts, splits.calibration.answers()) >= args.floor * cal_acc:
                joint = t
                break
        log(f"[mue] calibration: joint encoder threshold {joint}")

        answers = test.answers()
        contenders: dict[str, dict[str, Any]] = {
            "full model, per-layer graphs (exits off)": {},
            "MuE, kv=drop": {"thresholds": chosen, "kv": "drop"},
            "MuE, kv=copy_hidden": {"thresholds": chosen, "kv": "copy_hidden"},
            "no modality decomposition (joint encoder exit)": {
                "thresholds": {"encoder": joint, "decoder": chosen["decoder"]}, "encoder_exit": "joint"},
        }
        rows: dict[str, dict[str, Any]] = {}
        for name, options in contenders.items():
            texts, gen = generate_all(sess, test, **options)
            run, full = layer_counts(gen)
            rows[name] = {"accuracy": accuracy(texts, answers), "layers": run, "full_layers": full,
                          "encoder_layers": {k: float(v.mean()) for k, v in gen.encoder_layers.items()},
                          "decoder_layers_per_token": float(np.mean([np.mean(d) for d in gen.decoder_layers]))}
        plain_texts = []
        from edgeexit.zoo.mue_task import decode

        for i in range(len(test)):
            plain_texts.append(decode(plain({"image": test.image[i:i + 1], "question": test.question[i:i + 1]})))
        rows = {"plain model (encoder graph + decoder-step graph)": {"accuracy": accuracy(plain_texts, answers)},
                **rows}

        # wall time at batch 1, interleaved per sample
        picks = np.linspace(0, len(test) - 1, n_time).astype(int)
        calls = {"plain model (encoder graph + decoder-step graph)": lambda f: plain(f)}
        for name, options in contenders.items():
            calls[name] = (lambda o: (lambda f: sess.generate(f, **o)))(options)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for p in range(1 if args.quick else args.passes):
            for j, i in enumerate(picks):
                feeds = {"image": test.image[i:i + 1], "question": test.question[i:i + 1]}
                names = list(calls)
                for k in range(len(names)):
                    name = names[(k + j + p) % len(names)]
                    t0 = time.perf_counter_ns()
                    calls[name](feeds)
                    times[name].append((time.perf_counter_ns() - t0) / 1e6)
        for name, values in times.items():
            rows[name]["mean_ms"] = float(np.mean(values))
            rows[name]["p50_ms"] = float(np.median(values))

    base = rows["plain model (encoder graph + decoder-step graph)"]
    full_layers = rows["full model, per-layer graphs (exits off)"]["layers"]
    printed = []
    for name, r in rows.items():
        layers = r.get("layers", full_layers)
        printed.append([name, f"{r['accuracy']:.2%}", f"{r['accuracy'] / base['accuracy']:.3f}",
                        f"{1 - layers / full_layers:+.1%}" if "layers" in r else "-",
                        f"{r['p50_ms']:.3f}", f"{r['mean_ms']:.3f}", f"{1 - r['mean_ms'] / base['mean_ms']:+.1%}"])
    print(f"\n=== MuE on the digit QA test split ({len(test)} pairs; timing: {n_time} samples x "
          f"{1 if args.quick else args.passes} pass(es), batch 1, interleaved) ===")
    print(f"thresholds (calibration split, >= {args.floor:.0%} of full accuracy): {chosen}; joint encoder {joint}")
    print(table(["contender", "exact match", "vs plain", "layers saved", "p50 ms", "mean ms", "time saved"],
                printed))
    for name, r in rows.items():
        if "encoder_layers" in r:
            print(f"{name}: encoder layers per modality {r['encoder_layers']}, decoder layers per token "
                  f"{r['decoder_layers_per_token']:.2f}")
    mue = rows["MuE, kv=drop"]
    target = {"layers_saved": 1 - mue["layers"] / full_layers, "time_saved": 1 - mue["mean_ms"] / base["mean_ms"],
              "accuracy_ratio": mue["accuracy"] / base["accuracy"]}
    ok = target["layers_saved"] >= 0.5 and target["time_saved"] >= 0.4 and target["accuracy_ratio"] >= 0.99
    print(f"target (>= 50% fewer layers, >= 40% less wall time, >= 99% of the accuracy), kv=drop: "
          f"{'PASS' if ok else 'MISS'} - layers {target['layers_saved']:+.1%}, time {target['time_saved']:+.1%}, "
          f"accuracy {target['accuracy_ratio']:.3f}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "config": {**vars(args), "epochs": EPOCHS,
                                                                     "grid": GRID, "model": c.to_dict()},
                               "seconds": round(time.time() - started, 1), "thresholds": chosen,
                               "joint_encoder_threshold": joint, "rows": rows, "target": {**target, "pass": ok}})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
