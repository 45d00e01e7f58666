"""``edgeexit attach``: exits on a network we did not write, from its factory and the user's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._logging import logger, logging_options
from ..errors import ModelSpecError
from ._shared import call_factory, check_outputs, progress_bar


@click.command()
@logging_options()
@click.argument("model")
@click.option("--at", "cuts", multiple=True,
              help="A layer to put an exit after (a module name as model.named_modules() gives it); repeat in "
                   "execution order. With --dry-run, the layers to time (default: every one that can be cut).")
@click.option("--train-data", type=click.Path(path_type=Path),
              help=".npz with the model's inputs (named after forward's arguments) and 'labels': trains the heads.")
@click.option("--calibrate-data", type=click.Path(path_type=Path),
              help="Labelled validation .npz: fits a temperature per exit, then chooses the thresholds on it "
                   "(as `edgeexit calibrate`).")
@click.option("--max-drop", type=float, default=0.5, show_default=True,
              help="With --calibrate-data: accuracy points the exits may lose against the model.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A state_dict (.pt) to load into the factory's model first.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1), help="Training epochs.")
@click.option("--lr", default=1e-2, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate of the heads.")
@click.option("--joint", is_flag=True, help="Fine-tune the backbone with the heads (default: backbone frozen).")
@click.option("--final-weight", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="With --joint: the weight of the model's own loss beside the exits'.")
@click.option("--token", type=click.Choice(["mean", "first"]), default="mean", show_default=True,
              help="Automatic heads on a token sequence: its mean, or its first (class) token.")
@click.option("--seed", default=0, show_default=True, help="Seed of the heads' weights and the training order.")
@click.option("--dry-run", is_flag=True,
              help="Print the layers that can be cut, each with its output shape and the share of the model's "
                   "onnxruntime time spent before it; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing package at --output.")
def attach(model: str, cuts: tuple[str, ...], train_data: Path | None, calibrate_data: Path | None, max_drop: float,
           output: Path | None, weights: Path | None, epochs: int, lr: float, joint: bool, final_weight: float,
           token: str, seed: int, dry_run: bool, force: bool) -> None:
    """Attach exits to MODEL (module.path:factory returning an unmodified torch network, or (network,
    {input_name: example}); or a model.onnx, cut at tensor names), train their heads, and write an exit
    package."""
    if not dry_run:
        if output is None or train_data is None or not cuts:
            raise click.UsageError("pass --at LAYER (once per exit), -o PACKAGE and --train-data TRAIN.npz (or "
                                   "--dry-run to list the layers that can be cut)")
        check_outputs(output, folder=True)
        if output.exists() and not force:
            raise click.UsageError(f"{output} exists; pass --force to replace it")
    if final_weight != 1.0 and not joint:
        raise click.UsageError("--final-weight weighs the model's own loss when fine-tuning: pass --joint with it")
    if model.lower().endswith(".onnx"):
        _attach_onnx(Path(model), cuts, train_data, calibrate_data, max_drop, output, epochs, lr, seed, dry_run,
                     force, weights, joint)
        return
    net, example = _network(model, weights)
    names = _input_names(net, example)
    train = _load(train_data, names) if train_data is not None else None
    if example is None and train is not None:
        from ..export.attach_package import example_from

        example = example_from(train[0])
    if dry_run:
        if example is None:
            raise click.UsageError("--dry-run needs example inputs: pass --train-data, or have the factory return "
                                   "(network, {input_name: example_tensor})")
        _print_cut_points(net, example, cuts)
        return
    assert train is not None and output is not None
    from ..export.attach_package import attach_package

    calibration = _load(calibrate_data, names) if calibrate_data is not None else None
    with progress_bar("training the exit heads", epochs * len(train[1])) as bar:
        report = attach_package(net, list(cuts), train=train, output=output, calibration=calibration, token=token,
                                epochs=epochs, lr=lr, joint=joint, final_weight=final_weight, seed=seed,
                                name=model.split(":")[-1], overwrite=force, progress=bar.update, log=logger.info)
    for line in report.lines():
        click.echo(line)
    if calibrate_data is not None:
        from .calibrate import run_calibration

        run_calibration(output, calibrate_data, max_drop=max_drop)
    else:
        click.echo(f"wrote {output}; its exits stay disabled until `edgeexit calibrate {output} --data VAL.npz "
                   "--max-drop POINTS` chooses their thresholds")


def _attach_onnx(model: Path, cuts: tuple[str, ...], train_data: Path | None, calibrate_data: Path | None,
                 max_drop: float, output: Path | None, epochs: int, lr: float, seed: int, dry_run: bool,
                 force: bool, weights: Path | None, joint: bool) -> None:
    """``edgeexit attach model.onnx --at TENSOR``: the graph cut at tensor names, the heads trained on
    the features onnxruntime records there."""
    if not model.is_file():
        raise click.UsageError(f"{model}: no such file")
    if weights is not None or joint:
        raise click.UsageError("--weights and --joint need the network in torch; a model.onnx keeps its weights")
    if dry_run:
        from ..export.attach_onnx import cuttable_tensors

        click.echo(f"{'tensor':<40}{'op':<18}shape")
        for name, op, shape in cuttable_tensors(model):
            click.echo(f"{name:<40}{op:<18}{shape}")
        return
    from ..export.attach_onnx import attach_onnx_exits, onnx_input_names

    assert train_data is not None and output is not None
    inputs, labels = _load(train_data, onnx_input_names(model))
    attach_onnx_exits(model, list(cuts), inputs, labels, output, epochs=epochs, lr=lr, seed=seed,
                      name=model.stem, overwrite=force, log=logger.info)
    if calibrate_data is not None:
        from ..export.attach_package import scale_temperatures
        from .calibrate import run_calibration

        calibration = _load(calibrate_data, onnx_input_names(model))
        for k, (t, before, after) in enumerate(scale_temperatures(output, *calibration, log=logger.info)[:-1]):
            click.echo(f"exit {k} ({cuts[k]}): temperature {t:.3f}, expected calibration error {before:.4f} -> "
                       f"{after:.4f}")
        run_calibration(output, calibrate_data, max_drop=max_drop)
    else:
        click.echo(f"wrote {output}; its exits stay disabled until `edgeexit calibrate {output} --data VAL.npz "
                   "--max-drop POINTS` chooses their thresholds")


def _network(spec: str, weights: Path | None) -> tuple[Any, dict[str, Any] | None]:
    from ..export.attach_package import network_from

    return network_from(call_factory(spec), spec, weights)


def _input_names(net: Any, example: dict[str, Any] | None) -> list[str]:
    """The model's input names: the example's, else ``forward``'s arguments without defaults."""
    if example is not None:
        return list(example)
    import inspect

    params = inspect.signature(net.forward).parameters.values()
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _load(path: Path, names: list[str]) -> tuple[dict[str, Any], Any]:
    from ..export.train_heads import load_training_npz

    return load_training_npz(path, names)


def _print_cut_points(net: Any, example: dict[str, Any], cuts: tuple[str, ...]) -> None:
    from ..export.attach import cuttable_layers
    from ..export.layer_times import time_shares

    points = cuttable_layers(net, example)
    if cuts:
        known = {p.name for p in points}
        unknown = [c for c in cuts if c not in known]
        if unknown:
            raise ModelSpecError(f"cannot cut after {unknown}: not a layer that can be cut; run --dry-run without "
                                 "--at to list them")
        points = [p for p in points if p.name in cuts]
    shares = time_shares(net, example, [p.name for p in points])
    width = max(12, *(len(p.name) + 2 for p in points)) if points else 12
    click.echo(f"{'layer':<{width}}{'kind':<22}{'output shape':<22}{'carried':>8}{'time before':>13}")
    for p in points:
        share = shares.get(p.name)
        click.echo(f"{p.name:<{width}}{p.kind:<22}{tuple(p.shape)!s:<22}{p.carried:>8}"
                   f"{'-' if share is None else f'{share:.1%}':>13}")
    click.echo("time before: the share of the unmodified model's onnxruntime kernel time spent up to and including "
               "the layer (1 thread); '-': the export folded the layer into another")
