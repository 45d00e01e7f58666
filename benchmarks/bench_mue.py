"""MuE on the edge runtime: layers executed, accuracy and wall time against the plain model.

The zoo's MuE model (6 tied encoder layers, 6 decoder layers, width 64) is trained on the
digit question-answering task (``edgeexit.zoo.mue_task``; weights cached under
``benchmarks/.cache``), exported as a seq2seq package, and its plain counterpart (one
encoder graph, one decoder-step graph with the cache, same weights) is exported beside it.

Thresholds are chosen on the calibration split (1,000 pairs): first each modality's encoder
threshold with the decoder exits off, then the decoder threshold, each the loosest setting
whose exact-match accuracy stays >= 99 % of the full model's on that split.  Every figure
below is on the test split (1,000 pairs), batch 1 for wall time, batched for accuracy and
layer counts.  Timed contenders take turns in blocks of 16 samples: the plain model, the
per-layer graphs and the in-graph exit graphs with every exit off, MuE drop (in-graph exits,
and per-layer graphs), MuE copy_hidden and the joint-encoder ablation.

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

from _common import BENCH_DIR, log, machine_info, write_json

DEFAULT_JSON = BENCH_DIR / "results" / "bench_mue.json"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const=str(DEFAULT_JSON), help="write the results as JSON (default path)")
    ap.add_argument("--quick", action="store_true", help="100 timed samples, 1 pass: a smoke run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits and the weights")
    ap.add_argument("--passes", type=int, default=3, help="timing passes over the timed samples at batch 1")
    ap.add_argument("--floor", type=float, default=0.99, help="accuracy to keep, as a fraction of the full model's")
    args = ap.parse_args(argv)

    from edgeexit.calibrate_seq2seq import GRID
    from edgeexit.export.seq2seq import export_mue
    from edgeexit.zoo.mue_quickstart import EPOCHS, EXITS_OFF, compare
    from edgeexit.zoo.mue_task import mnist_qa_splits

    started = time.time()
    model = trained(args.seed, EPOCHS)
    with tempfile.TemporaryDirectory(prefix="edgeexit-mue-bench-") as tmp:
        package = export_mue(model, Path(tmp) / "mue.eexit", log=None).root
        report = compare(model, package, Path(tmp) / "plain", mnist_qa_splits(args.seed), floor=args.floor,
                         timed_samples=100 if args.quick else 300, passes=1 if args.quick else args.passes,
                         log=lambda line: log(f"[mue] {line}"))
    print()
    print("\n".join(report.lines()))
    for name, r in report.rows.items():
        if "encoder_layers" in r:
            print(f"{name}: encoder layers per modality {r['encoder_layers']}, decoder layers per token "
                  f"{r['decoder_layers_per_token']:.2f}")
    base, mue = report.rows["plain model (encoder graph + decoder-step graph)"], report.rows["MuE, kv=drop"]
    target = {"layers_saved": 1 - mue["layers"] / report.rows[EXITS_OFF]["layers"],
              "time_saved": 1 - mue["mean_ms"] / base["mean_ms"], "accuracy_ratio": mue["accuracy"] / base["accuracy"]}
    ok = target["layers_saved"] >= 0.5 and target["time_saved"] >= 0.4 and target["accuracy_ratio"] >= 0.99
    print(f"target (>= 50% fewer layers, >= 40% less wall time, >= 99% of the accuracy), kv=drop: "
          f"{'PASS' if ok else 'MISS'} - layers {target['layers_saved']:+.1%}, time {target['time_saved']:+.1%}, "
          f"accuracy {target['accuracy_ratio']:.3f}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "config": {**vars(args), "epochs": EPOCHS, "grid": GRID,
                                                                     "model": model.config.to_dict()},
                               "seconds": round(time.time() - started, 1), **report.to_dict(),
                               "target": {**target, "pass": ok}})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
