"""The ``edgeexit`` command line: thin click commands over the library.

Heavy modules (torch, onnx) are imported inside the commands that need them, so
``edgeexit --help``, ``run`` and ``inspect`` work on a runtime-only install.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import EdgeExitError, ModelSpecError


class _UserError(click.ClickException):
    """An ``EdgeExitError`` shown as one line, with the error's own exit code."""

    def __init__(self, exc: EdgeExitError) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.exit_code = exc.exit_code


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeExitError as exc:
            raise _UserError(exc) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgeexit")
def cli() -> None:
    """Early-exit networks as one ONNX graph per exit, run with onnxruntime."""


def _bar(label: str, length: int) -> Any:
    return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True)


# --- export -------------------------------------------------------------------------


def _load_user_model(spec: str) -> tuple[Any, dict[str, Any], list[str] | None]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}; MODEL must be module.path:factory")
    made = factory()
    model, example = made if isinstance(made, tuple) else (made, getattr(made, "example_inputs", None))
    if not isinstance(example, dict):
        raise ModelSpecError(
            f"{spec} must return (EarlyExitModel, {{input_name: example_tensor}}) or a model with an "
            "`example_inputs` dict attribute"
        )
    return model, example, getattr(model, "labels", None)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Package directory to write.")
@click.option("--policy", default="entropy", show_default=True, help="Exit policy for every exit.")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Threshold of one early exit; repeat once per early exit.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="state_dict (.pt) for a zoo model.")
@click.option("--train", is_flag=True, help="Train the zoo model on MNIST-5k first (train split).")
@click.option("--epochs", default=20, show_default=True, help="Epochs for --train.")
@click.option("--seed", default=0, show_default=True)
@click.option("--full-model/--no-full-model", default=True, show_default=True,
              help="Also write full.onnx (the model without early exits) as a baseline.")
@click.option("--dynamo/--no-dynamo", default=False, show_default=True, help="torch.onnx.export's exporter.")
@click.option("--force", is_flag=True, help="Replace an existing package at --output.")
def export(model: str, output: Path, policy: str, thresholds: tuple[float, ...], weights: Path | None,
           train: bool, epochs: int, seed: int, full_model: bool, dynamo: bool, force: bool) -> None:
    """Export MODEL (a zoo name, or module.path:factory) as an exit package."""
    from .export import EarlyExitModel, export_package
    from .zoo import ZOO, example_images, get_model, load_weights

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to replace it")
    labels = None
    preprocessing = None
    if ":" in model:
        net, example, labels = _load_user_model(model)
        if weights is not None or train:
            raise click.UsageError("--weights/--train apply to zoo models only")
    else:
        net = get_model(model, seed=seed)
        if weights is not None:
            load_weights(net, str(weights))
        elif train:
            from .datasets import mnist5k_splits
            from .zoo.train import train_early_exit

            splits = mnist5k_splits(seed)
            with _bar(f"training {model}", epochs * len(splits.train)) as bar:
                train_early_exit(net, splits.train.x, splits.train.y, epochs=epochs, seed=seed,
                                 progress=bar.update)
        else:
            raise click.UsageError(
                f"zoo model {model!r} needs weights: pass --weights FILE.pt or --train "
                f"(zoo: {', '.join(sorted(ZOO))})"
            )
        from .datasets import MNIST_PREPROCESSING

        example = example_images(4, seed)
        labels = [str(i) for i in range(10)]
        preprocessing = MNIST_PREPROCESSING
    if not isinstance(net, EarlyExitModel):
        raise ModelSpecError(f"{model} did not produce an EarlyExitModel (got {type(net).__name__})")
    if not thresholds:
        raise click.UsageError(
            f"pass --threshold once per early exit ({net.num_exits - 1} for this model); "
            "`edgeexit calibrate` can choose them from data"
        )
    export_package(net, example, output, policy=policy, thresholds=list(thresholds), labels=labels,
                   name=model.split(":")[-1], include_full_model=full_model, dynamo=dynamo,
                   preprocessing=preprocessing, seed=seed, log=click.echo)


# --- run ----------------------------------------------------------------------------


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write results to .npz or .csv.")
@click.option("--threshold", "thresholds", type=float, multiple=True, help="Override one early exit's threshold.")
@click.option("--policy", default=None, help="Override the package's exit policy (with --threshold).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--show", default=10, show_default=True, help="Print this many per-sample lines.")
def run(package: Path, input_file: Path, output: Path | None, thresholds: tuple[float, ...], policy: str | None,
        batch_size: int, show: int) -> None:
    """Run PACKAGE on INPUT (.npy, or .npz with arrays named after the inputs and optional labels)."""
    import numpy as np

    from .datafiles import load_input_file, save_results_atomic
    from .runtime import ExitSession

    session = ExitSession(package)
    inputs, labels = load_input_file(input_file, session.input_names)
    n = next(iter(inputs.values())).shape[0]
    parts = []
    for start in range(0, max(n, 1), batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
        parts.append(session.run(chunk, thresholds=list(thresholds) or None, policy=policy))
    predictions = np.concatenate([p.predictions for p in parts])
    exit_index = np.concatenate([p.exit_index for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    names = session.package.labels
    for i in range(min(show, n)):
        label = f"  ({names[predictions[i]]})" if names and predictions[i] < len(names) else ""
        click.echo(f"sample {i:>5}: prediction {predictions[i]}{label}  exit {exit_index[i]}  score {scores[i]:.4g}")
    if n > show:
        click.echo(f"... {n - show} more")
    shares = np.bincount(exit_index, minlength=session.num_exits) / n
    click.echo(f"{n} samples; exit shares: " + ", ".join(f"exit {e}: {s:.1%}" for e, s in enumerate(shares)))
    if labels is not None:
        click.echo(f"accuracy: {(predictions == labels).mean():.2%} ({int((predictions == labels).sum())}/{n})")
    nonfinite = sum(p.nonfinite_scores for p in parts)
    if nonfinite:
        click.echo(f"warning: {nonfinite} non-finite exit score(s); those samples did not exit early", err=True)
    if output is not None:
        arrays = {"predictions": predictions, "exit_index": exit_index, "scores": scores}
        if output.suffix.lower() == ".npz":
            arrays["logits"] = np.concatenate([p.logits for p in parts])
        save_results_atomic(output, arrays)
        click.echo(f"wrote {output}")


# --- inspect ------------------------------------------------------------------------


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(package: Path, as_json: bool) -> None:
    """Show a package's stages, shapes, exits, policies, thresholds, costs and hashes."""
    from .package import load_package

    pkg = load_package(package)
    if as_json:
        click.echo(json.dumps(pkg.manifest, indent=2))
        return
    click.echo(f"{pkg.root}: {pkg.kind} {pkg.name!r}, format version {pkg.format_version}")
    prod = ", ".join(f"{k} {v}" for k, v in pkg.producer.items())
    click.echo(f"producer: {prod}")
    for spec in pkg.inputs:
        click.echo(f"input {spec.name}: {spec.dtype} ({', '.join(str(d) for d in spec.shape)})")
    if pkg.labels:
        click.echo(f"labels: {len(pkg.labels)} ({', '.join(pkg.labels[:10])}{'…' if len(pkg.labels) > 10 else ''})")
    click.echo(f"{'stage':<8}{'reads':<18}{'carry':<14}{'exit':<10}{'policy':<12}{'threshold':>10}"
               f"{'params':>10}{'MFLOPs':>9}{'bytes':>10}  sha256")
    exit_no = 0
    for spec in pkg.stages:
        ex = spec.exit
        exit_col = "-" if ex is None else f"exit {exit_no}"
        thr = "-" if ex is None else ("always" if ex.threshold is None else f"{ex.threshold:.4g}")
        if ex is not None:
            exit_no += 1
        meta = pkg.files[spec.file]
        click.echo(
            f"{spec.name:<8}{','.join(spec.inputs):<18}{','.join(spec.carry) or '-':<14}{exit_col:<10}"
            f"{ex.policy if ex else '-':<12}{thr:>10}{spec.cost.get('params', 0):>10}"
            f"{spec.cost.get('flops', 0) / 1e6:>9.3f}{meta['size']:>10}  {meta['sha256'][:12]}"
        )
    if pkg.full_model:
        meta = pkg.files[pkg.full_model.file]
        click.echo(f"full model: {pkg.full_model.file}, {pkg.full_model.cost.get('params', 0)} params, "
                   f"{pkg.full_model.cost.get('flops', 0) / 1e6:.3f} MFLOPs, {meta['size']} bytes  "
                   f"{meta['sha256'][:12]}")


# --- quickstart ---------------------------------------------------------------------


@cli.command()
@click.option("--model", type=click.Choice(["blenet", "bresnet"]), default="blenet", show_default=True)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=Path("edgeexit-quickstart"), show_default=True)
@click.option("--max-drop", default=0.3, show_default=True,
              help="Accuracy drop (points) allowed when choosing the threshold on the calibration split.")
def quickstart(model: str, epochs: int, seed: int, output: Path, max_drop: float) -> None:
    """Train a zoo model on MNIST-5k, export it, and compare early exit with the full model."""
    from .zoo.quickstart import run_quickstart

    r = run_quickstart(model, epochs=epochs, seed=seed, output_dir=output, max_drop=max_drop / 100,
                       progress=_bar, log=click.echo)
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
    click.echo(f"{'early exit (edgeexit)':<24}{r.early_accuracy:>9.1%}{shares}"
               f"{r.early_latency.p50:>9.3f}{r.early_latency.p95:>9.3f}")
    click.echo(f"speedup: {r.speedup_p50:.2f}x at p50, {r.full_latency.p95 / r.early_latency.p95:.2f}x at p95; "
               f"thresholds {[round(t, 4) for t in r.thresholds]}; runtime overhead {r.overhead_us:.1f} µs/call")
    click.echo(f"package: {r.package}")


def main(argv: list[str] | None = None, standalone_mode: bool = True) -> Any:
    return cli.main(args=argv, prog_name="edgeexit", standalone_mode=standalone_mode)


if __name__ == "__main__":  # pragma: no cover
    main()
