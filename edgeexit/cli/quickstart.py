"""``edgeexit quickstart``: train a zoo model, export it, and compare early exit with the full model."""

from __future__ import annotations

from pathlib import Path

import click

from .._logging import logger, logging_options
from ._shared import check_outputs, emit_json, progress_bar


@click.command()
@logging_options()
@click.option("--model", type=click.Choice(["blenet", "bresnet", "cbnet", "mue", "bert-exits"]), default="blenet",
              show_default=True, help="Zoo model to train, export and compare with its full model (mue: the digit QA "
                                      "task; bert-exits: MiniLM-L6 on Debian's fortunes, choosing the exit policy).")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Training epochs (default: 20; mue: 12).")
@click.option("--json", "as_json", is_flag=True,
              help="mue: print the comparison as one JSON object on stdout (keys in docs/MUE.md).")
@click.option("--seed", default=0, show_default=True, help="Seed of the data split and the training.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("edgeexit-quickstart"),
              show_default=True, help="Folder for the package and the trained weights.")
@click.option("--max-drop", default=0.3, show_default=True,
              help="Accuracy drop (points) allowed when choosing the threshold on the calibration split.")
def quickstart(model: str, epochs: int | None, seed: int, output: Path, max_drop: float, as_json: bool) -> None:
    """Train a zoo model (MNIST-5k; bert-exits: Debian's fortunes), export it, and compare early exit with the
    full model."""
    check_outputs(output, folder=True)
    if model == "mue":
        from ..zoo.mue_quickstart import EPOCHS, run_mue_quickstart

        mue_report = run_mue_quickstart(output, epochs=epochs or EPOCHS, seed=seed, floor=1 - max_drop / 100,
                                    log=logger.info)
        if as_json:
            emit_json("quickstart", mue_report.to_dict(), True, None)
            return
        click.echo("")
        for line in mue_report.lines():
            click.echo(line)
        click.echo(f"package: {mue_report.package}")
        return
    if as_json:
        raise click.UsageError("--json is for --model mue; the other quickstarts print their table")
    if model == "bert-exits":
        from ..zoo.bert_quickstart import run_bert_quickstart

        if epochs is not None:
            raise click.UsageError("--epochs does not apply to bert-exits (its heads train on frozen features)")
        bert_report = run_bert_quickstart(output, seed=seed, max_drop=max_drop / 100, log=logger.info)
        click.echo("")
        for line in bert_report.lines():
            click.echo(line)
        click.echo(f"package: {bert_report.package}")
        return
    epochs = epochs or 20
    if model == "cbnet":
        from ..zoo.cbnet import run_cbnet_quickstart

        report = run_cbnet_quickstart(blenet_epochs=epochs, seed=seed, output_dir=output, max_drop=max_drop / 100,
                                      progress=progress_bar, log=logger.info)
        click.echo("")
        for line in report.lines():
            click.echo(line)
        return
    from ..zoo.quickstart import run_quickstart

    r = run_quickstart(model, epochs=epochs, seed=seed, output_dir=output, max_drop=max_drop / 100,
                       progress=progress_bar, log=logger.info)
    train_n, cal_n, test_n = r.sizes
    click.echo("")
    click.echo(f"{r.model} on MNIST-5k ({train_n} train / {cal_n} calibration / {test_n} test, seed {seed}); "
               f"test split, batch 1, CPU, 1 thread")
    exit_cols = "".join(f"{'exit ' + str(e):>9}" for e in range(len(r.exit_shares)))
    click.echo(f"{'':<24}{'accuracy':>9}{exit_cols}{'p50 ms':>9}{'p95 ms':>9}")
    full_shares = "".join(f"{'-':>9}" for _ in r.exit_shares[:-1]) + f"{'100.0%':>9}"
    click.echo(f"{'full model (onnxruntime)':<24}{r.full_accuracy:>9.1%}{full_shares}"
               f"{r.full_latency.p50:>9.3f}{r.full_latency.p95:>9.3f}")
    shares = "".join(f"{s:>9.1%}" for s in r.exit_shares)
    for label, stats in (("early exit, stage loop", r.early_latency), ("early exit, compiled", r.compiled_latency)):
        click.echo(f"{label:<24}{r.early_accuracy:>9.1%}{shares}{stats.p50:>9.3f}{stats.p95:>9.3f}")
    engine = "the compiled graph" if r.engine == "compiled" else "the stage loop"
    click.echo(f"timed on the calibration split, {engine} was faster at batch 1 (recorded in the package: "
               f"ExitSession runs it): {r.speedup_p50:.2f}x the "
               f"full model at p50, {r.full_latency.p95 / r.chosen_latency.p95:.2f}x at p95; stage loop "
               f"{r.full_latency.p50 / r.early_latency.p50:.2f}x ({r.overhead_us:.1f} µs of Python per call), compiled "
               f"graph {r.full_latency.p50 / r.compiled_latency.p50:.2f}x at p50; thresholds "
               f"{[round(t, 4) for t in r.thresholds]}")
    click.echo(f"package: {r.package}")
