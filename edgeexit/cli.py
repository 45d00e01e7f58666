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
from ._logging import logger, logging_options
from ._logging import quiet as _quiet
from .errors import EdgeExitError, MissingExtraError, ModelSpecError, OutputError


class _Group(click.Group):
    """Shows an ``EdgeExitError`` as one line on stderr and exits with the error's own code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeExitError as exc:
            click.echo(f"Error: {type(exc).__name__}: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            missing = _missing_extra(exc)
            click.echo(f"Error: {type(missing).__name__}: {missing}", err=True)
            ctx.exit(missing.exit_code)
        except OSError as exc:   # the OS refused a read or write that no check above foresaw
            what = exc.filename or "a file"
            click.echo(f"Error: OutputError: {what}: {exc.strerror or exc} (check the path, free space and "
                       "permissions)", err=True)
            ctx.exit(OutputError.exit_code)


# the extra that provides each optional module the commands import
_EXTRAS = {"torch": "export", "onnxscript": "export", "onnx": "onnx", "mlxtend": "data", "sklearn": "data",
           "matplotlib": "dev", "onnxruntime": "(the runtime itself: pip install onnxruntime)"}


def _missing_extra(exc: ModuleNotFoundError) -> MissingExtraError:
    top = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(top)
    if extra is None:
        return MissingExtraError(f"this command needs the Python module {exc.name!r}, which is not installed")
    if extra.startswith("("):
        return MissingExtraError(f"this command needs {top} {extra}")
    first = "pip install torch==2.13.0 (the CPU build) && " if extra == "export" else ""
    return MissingExtraError(
        f"this command needs {top}, from the {extra!r} extra, which is not installed: {first}pip install "
        f"'edgeexit[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="edgeexit")
def cli() -> None:
    """Early-exit networks as one ONNX graph per exit, run with onnxruntime."""


def _envelope(command: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Every command's JSON: a schema name and version, when, which tools on which machine, then the payload."""
    import platform
    from datetime import datetime, timezone

    import numpy as np
    import onnxruntime as ort

    return {
        "schema": f"edgeexit.{command}/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "python": platform.python_version(), "edgeexit": __version__, "onnxruntime": ort.__version__,
                    "numpy": np.__version__},
        **payload,
    }


def _emit_json(command: str, payload: dict[str, Any], as_json: bool, output: Path | None) -> None:
    """The one rule for machine-readable output: --json prints it, -o FILE.json writes it (atomically)."""
    text = json.dumps(_envelope(command, payload), indent=2, default=str) + "\n"
    if as_json:
        click.echo(text, nl=False)
    if output is not None:
        _write_text_atomic(output, text)
        click.echo(f"wrote {output}", err=as_json)
def _package_kind(package: Path) -> str:
    """The manifest's kind, read without hashing the graphs (the command verifies them when it loads)."""
    from .package import load_package

    return load_package(package, verify_hashes=False).kind


def _classifier_only(package: Path, command: str) -> None:
    """Refuse a seq2seq package in a command that works on classifiers and pipelines only."""
    if _package_kind(package) == "seq2seq":
        raise click.UsageError(f"`edgeexit {command}` works on classifier and pipeline packages; {package} is a "
                               "seq2seq package (run it with `edgeexit run`, or ExitSession.generate from Python)")


def _check_outputs(*paths: Path | None, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done (OutputError, exit code 8)."""
    from ._atomic import check_output_path

    for path in paths:
        if path is not None:
            check_output_path(path, folder=folder)


def _bar(label: str, length: int) -> Any:

    return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True, hidden=_quiet())


# --- export -------------------------------------------------------------------------


def _load_user_model(spec: str) -> tuple[Any, dict[str, Any], list[str] | None]:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))   # as `python -m` would: a module in the current directory
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
@logging_options()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Package directory to write.")
@click.option("--policy", default="entropy", show_default=True,
              help="Exit policy for every exit: entropy (exits when < threshold), confidence, margin or patience (>=); "
                   "bert-exits also q_exit and gate (>=), which score the exits' halt and gate signals.")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Threshold of one early exit; repeat once per early exit, or leave out to keep the exits "
                   "disabled until calibrated. Scales: entropy 0 (sure) … ln C (uniform over C classes), exits "
                   "below; confidence 1/C … 1 and margin 0 … 1, exit at or above.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="state_dict (.pt) for a zoo model.")
@click.option("--train", is_flag=True, help="Train the zoo model first (train split; MNIST-5k, bert-exits: fortunes).")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Epochs for --train (default: 20; mue: 12).")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the data split, the initial weights and the example inputs.")
@click.option("--full-model/--no-full-model", default=True, show_default=True,
              help="Also write full.onnx (the model without early exits) as a baseline.")
@click.option("--dynamo/--no-dynamo", default=False, show_default=True, help="torch.onnx.export's exporter.")
@click.option("--compile/--no-compile", "compile_graph", default=True, show_default=True,
              help="Also write compiled.onnx (one graph deciding the exits in-graph) when every policy allows it.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Quantize the stage graphs (needs --data).")
@click.option("--data", "cal_data", type=click.Path(path_type=Path),
              help="Calibration data for --quantize (.npz of the inputs; with 'labels' thresholds are recalibrated).")
@click.option("--calibrate-data", type=click.Path(path_type=Path),
              help="Labelled validation data (.npz with the inputs and 'labels'): choose the thresholds on it right "
                   "after exporting, timed here (as `edgeexit calibrate`).")
@click.option("--max-drop", type=float, default=0.3, show_default=True,
              help="With --calibrate-data: accuracy points the exits may lose against the last exit.")
@click.option("--name", default=None, help="Model name in the manifest (default: the zoo or factory name).")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=13), help="ONNX opset of the graphs.")
@click.option("--atol", default=1e-4, show_default=True, type=float,
              help="Absolute tolerance of the onnxruntime-vs-torch check on every output.")
@click.option("--rtol", default=1e-4, show_default=True, type=float,
              help="Relative tolerance (times max |torch output|) of the same check.")
@click.option("--force", is_flag=True, help="Replace an existing package at --output.")
def export(model: str, output: Path, policy: str, thresholds: tuple[float, ...], weights: Path | None,
           train: bool, epochs: int | None, seed: int, full_model: bool, dynamo: bool, compile_graph: bool,
           quantize: str | None, cal_data: Path | None, calibrate_data: Path | None, max_drop: float,
           name: str | None, opset: int, atol: float, rtol: float, force: bool) -> None:
    """Export MODEL (a zoo name: blenet, bresnet, cbnet, mue, bert-exits; or module.path:factory) as an exit package.

    For cbnet, --no-full-model exports the paper's CBNet (converter + light classifier only)
    instead of the pipeline with a fallback to the full LeNet on the original image.
    """
    _check_outputs(output, folder=True)
    from .export import EarlyExitModel, export_package
    from .zoo import ZOO, example_images, get_model, load_weights, save_weights

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to replace it")
    if (quantize is None) != (cal_data is None):
        raise click.UsageError("--quantize int8 and --data CAL.npz go together")
    if calibrate_data is not None and thresholds:
        raise click.UsageError("--calibrate-data chooses the thresholds; drop --threshold")
    if calibrate_data is not None and not calibrate_data.is_file():
        raise click.UsageError(f"--calibrate-data {calibrate_data}: no such file")
    labels = None
    preprocessing = None
    if model == "mue":
        from ._seq2seq_cli import export_mue_cli

        if quantize is not None or calibrate_data is not None:
            raise click.UsageError("mue: --quantize and --calibrate-data are not supported yet")
        export_mue_cli(output, weights, train, epochs, seed, thresholds)
        return
    if model == "bert-exits":
        from ._text_cli import export_bert_cli

        if quantize is not None or calibrate_data is not None:
            raise click.UsageError("bert-exits: --quantize and --calibrate-data are not supported yet; run "
                                   "`edgeexit calibrate` afterwards")
        export_bert_cli(output, weights, train, seed, thresholds, policy)
        return
    epochs = epochs or 20
    if model == "cbnet":
        if quantize is not None:
            raise click.UsageError("--quantize is not supported for cbnet yet; run `edgeexit quantize` afterwards")
        _export_cbnet(output, weights, train, epochs, seed, full_model, thresholds, dynamo, compile_graph)
        if calibrate_data is not None:
            _calibrate(output, calibrate_data, max_drop=max_drop)
        return
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
            weights_file = save_weights(net, output.parent / f"{output.name.removesuffix('.eexit')}.pt")
            click.echo(f"saved the trained weights to {weights_file} (export again with --weights {weights_file})")
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
    if thresholds and len(thresholds) != net.num_exits - 1:
        raise click.UsageError(
            f"pass --threshold once per early exit ({net.num_exits - 1} for this model), or none: the exits then "
            "stay disabled until `edgeexit calibrate` chooses thresholds from data"
        )
    if not thresholds and calibrate_data is None:
        logger.info(f"no --threshold: the {net.num_exits - 1} early exit(s) stay disabled (the package runs as the "
                    "full model) until `edgeexit calibrate PACKAGE --data VAL.npz --max-drop POINTS` chooses them")

    def write(path: Path) -> None:
        export_package(net, example, path, policy=policy, thresholds=list(thresholds) or None, labels=labels,
                       name=name or model.split(":")[-1], include_full_model=full_model, dynamo=dynamo,
                       opset=opset, atol=atol, rtol=rtol,
                       preprocessing=preprocessing, seed=seed, compile=None if compile_graph else False,
                       log=logger.info)

    if quantize is None or cal_data is None:
        write(output)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgeexit-fp32-") as tmp:
            fp32 = Path(tmp) / "fp32.eexit"
            write(fp32)
            _quantize(fp32, output, cal_data, force)
    if calibrate_data is not None:
        _calibrate(output, calibrate_data, max_drop=max_drop)


def _export_cbnet(output: Path, weights: Path | None, train: bool, epochs: int, seed: int, fallback: bool,
                  thresholds: tuple[float, ...], dynamo: bool, compile_graph: bool) -> None:
    from .zoo.cbnet import CBNetBuild, build_cbnet, export_cbnet

    if weights is not None:
        build = CBNetBuild.load(weights)
    elif train:
        build = build_cbnet(seed=seed, blenet_epochs=epochs, progress=_bar, log=logger.info)
    else:
        raise click.UsageError("cbnet needs weights: pass --weights CBNET.pt (CBNetBuild.save) or --train")
    if len(thresholds) > 1:
        raise click.UsageError("cbnet has one early exit (the light classifier): pass at most one --threshold")
    export_cbnet(build, output, fallback=fallback, threshold=thresholds[0] if thresholds else None, dynamo=dynamo,
                 compile=None if compile_graph else False, log=logger.info)


def _quantize(src: Path, dst: Path, data_file: Path, force: bool, **options: Any) -> None:
    from .datafiles import load_input_file
    from .export.quantize import quantize_package
    from .package import load_package

    names = [i.name for i in load_package(src).inputs]
    inputs, labels = load_input_file(data_file, names)
    if labels is None:
        logger.warning("warning: --data has no 'labels'; the fp32 thresholds are copied and must be recalibrated "
                       "(edgeexit calibrate)")
    quantize_package(src, dst, inputs, calibration_labels=labels, overwrite=force, log=logger.info, **options)


@cli.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The int8 package to write.")
@click.option("--data", "data_file", type=click.Path(path_type=Path), required=True,
              help="Calibration data (.npz named after the inputs; with 'labels', thresholds are recalibrated).")
@click.option("--mode", type=click.Choice(["auto", "dynamic", "static"]), default="auto", show_default=True,
              help="auto: static QDQ for graphs with Conv, dynamic for MatMul/Gemm-only graphs.")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="Activation type of static graphs: uint8 (U8S8, fast on x86 AVX2/VNNI) or int8 (S8S8).")
@click.option("--per-channel/--no-per-channel", default=True, show_default=True,
              help="One weight scale per output channel (more accurate, same speed) or one per tensor.")
@click.option("--max-calibration-samples", default=512, show_default=True, type=click.IntRange(min=1),
              help="Samples fed through the stages to fix the activation ranges of static graphs.")
@click.option("--max-drop", type=float, default=None,
              help="Recalibrate one shared threshold within this many accuracy points. Default: the objective of "
                   "the package's calibration (thresholds searched again per exit), else 0.3.")
@click.option("--force", is_flag=True, help="Replace an existing package at --output.")
def quantize(package: Path, output: Path, data_file: Path, mode: str, activation_type: str, per_channel: bool,
             max_calibration_samples: int, max_drop: float | None, force: bool) -> None:
    """Quantize PACKAGE's stage graphs to int8 with onnxruntime.quantization."""
    _check_outputs(output, folder=True)
    _classifier_only(package, "quantize")
    _quantize(package, output, data_file, force, mode=mode, activation_type=activation_type,
              per_channel=per_channel, max_calibration_samples=max_calibration_samples,
              max_drop=None if max_drop is None else max_drop / 100)


@cli.command("compile")
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the compiled graph to this .onnx file instead of adding compiled.onnx to the package.")
@click.option("--bake-thresholds", is_flag=True,
              help="With -o: store the package's thresholds as constants instead of a 'thresholds' input.")
def compile_command(package: Path, output: Path | None, bake_thresholds: bool) -> None:
    """Compile PACKAGE into one ONNX graph that decides its exits in-graph (any onnxruntime binding).

    Inputs: the package's inputs plus 'thresholds' (float64, one per early exit; the
    values are in the manifest). Outputs: logits, exit_index (int64), score (float64).
    """
    _check_outputs(output)
    _classifier_only(package, "compile")
    from .export.compile import compile_package

    if bake_thresholds and output is None:
        raise click.UsageError("--bake-thresholds writes a standalone graph: pass -o FILE.onnx with it")
    compile_package(package, output=output, bake=bake_thresholds, log=logger.info)


@cli.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The packed file to write (NAME.eexit.zip); ExitSession and every command take it as a package.")
def pack(package: Path, output: Path) -> None:
    """Pack PACKAGE into one file, for apps that ship the model inside their bundle and load it from memory."""
    _check_outputs(output)
    from .package import load_package, pack_package

    pack_package(package, output)
    click.echo(f"wrote {output} ({output.stat().st_size:,} bytes, {len(load_package(output).files)} files verified)")


# --- run ----------------------------------------------------------------------------


@cli.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the results to .npz (with logits), .csv or .json.")
@click.option("--threshold", "thresholds", type=float, multiple=True, help="Override one early exit's threshold.")
@click.option("--policy", default=None, help="Override the package's exit policy (with --threshold).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Samples per ExitSession.run call.")
@click.option("--show", default=10, show_default=True, help="Print this many per-sample lines.")
@click.option("--engine", type=click.Choice(["auto", "compiled", "stages"]), default="auto", show_default=True,
              help="auto: the compiled graph when the package has one and the policy is compiled in.")
@click.option("--device", default=None, help="Device profile (cpu, rpi4, rpi5, jetson, cuda, tensorrt, auto); "
              "default: onnxruntime's CPU provider, 1 thread.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per session (default: the profile's).")
@click.option("--allow-fallback", is_flag=True, help="Warn instead of failing when a provider is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (and accuracy) as one JSON object on stdout.")
def run(package: Path, input_file: Path, output: Path | None, thresholds: tuple[float, ...], policy: str | None,
        batch_size: int, show: int, engine: str, device: str | None, threads: int | None,
        allow_fallback: bool, as_json: bool) -> None:
    """Run PACKAGE on INPUT (.npy, or .npz with arrays named after the inputs and optional labels; .txt, one
    text per line, for a package that ships its tokenizer)."""
    _check_outputs(output)   # before any inference: a bad -o must not waste the run
    import numpy as np

    from .datafiles import load_input_file, save_results_atomic
    from .runtime import ExitSession

    session = ExitSession(package, engine=engine, device=device, threads=threads, allow_fallback=allow_fallback)
    if session.package.kind == "seq2seq":
        from ._seq2seq_cli import run_seq2seq

        if thresholds or policy:
            raise click.UsageError("--threshold/--policy apply to classifier packages; seq2seq thresholds are "
                                   "in the package (ExitSession.generate(thresholds=...) from Python)")
        run_seq2seq(session, input_file, output, batch_size, show, as_json, _emit_json, _write_text_atomic)
        return
    if input_file.suffix.lower() == ".txt":     # one text per line, through the package's tokenizer
        from .datafiles import load_text_lines

        texts = load_text_lines(input_file)
        n, labels = len(texts), None

        def batch_at(start: int) -> dict[str, np.ndarray]:
            return session.tokenize(texts[start:start + batch_size])
    else:
        inputs, labels = load_input_file(input_file, session.input_names)
        n = next(iter(inputs.values())).shape[0]

        def batch_at(start: int) -> dict[str, np.ndarray]:
            return {k: v[start:start + batch_size] for k, v in inputs.items()}
    parts = [session.run(batch_at(start), thresholds=list(thresholds) or None, policy=policy)
             for start in range(0, max(n, 1), batch_size)]
    predictions = np.concatenate([p.predictions for p in parts])
    exit_index = np.concatenate([p.exit_index for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    names = session.package.labels
    shares = np.bincount(exit_index, minlength=session.num_exits) / n
    nonfinite = sum(p.nonfinite_scores for p in parts)
    if as_json or (output is not None and output.suffix.lower() == ".json"):
        _emit_json("run", {
            "package": str(package), "input": str(input_file), "samples": n, "engine": parts[0].engine,
            "exit_shares": shares.tolist(), "nonfinite_scores": nonfinite,
            "accuracy": None if labels is None else float((predictions == labels).mean()),
            "predictions": predictions.tolist(), "exit_index": exit_index.tolist(), "scores": scores.tolist(),
        }, as_json, output if output is not None and output.suffix.lower() == ".json" else None)
        if as_json:
            return
    for i in range(min(show, n)):
        label = f"  ({names[predictions[i]]})" if names and predictions[i] < len(names) else ""
        click.echo(f"sample {i:>5}: prediction {predictions[i]}{label}  exit {exit_index[i]}  score {scores[i]:.4g}")
    if n > show:
        click.echo(f"... {n - show} more")
    click.echo(f"{n} samples; exit shares: " + ", ".join(f"exit {e}: {s:.1%}" for e, s in enumerate(shares)))
    if labels is not None:
        click.echo(f"accuracy: {(predictions == labels).mean():.2%} ({int((predictions == labels).sum())}/{n})")
    if nonfinite:
        logger.warning(f"warning: {nonfinite} non-finite exit score(s); those samples did not exit early")
    if output is not None and output.suffix.lower() != ".json":
        arrays = {"predictions": predictions, "exit_index": exit_index, "scores": scores}
        if output.suffix.lower() == ".npz":
            arrays["logits"] = np.concatenate([p.logits for p in parts])
        save_results_atomic(output, arrays)
        click.echo(f"wrote {output}")


# --- inspect ------------------------------------------------------------------------


@cli.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a structured view of the package as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the structured view as JSON to this file.")
@click.option("--manifest", "raw", is_flag=True, help="Print the package's manifest.json as it is.")
def inspect(package: Path, as_json: bool, output: Path | None, raw: bool) -> None:
    """Show a package's stages, shapes, exits, policies, thresholds, costs and hashes."""
    _check_outputs(output)
    from .package import load_package

    pkg = load_package(package)
    if raw:
        click.echo(json.dumps(pkg.manifest, indent=2, ensure_ascii=False))
        return
    if as_json or output is not None:
        _emit_json("inspect", _package_view(pkg), as_json, output)
        if as_json:
            return
    click.echo(f"{pkg.root}: {pkg.kind} {pkg.name!r}, format version {pkg.format_version}")
    prod = ", ".join(f"{k} {v}" for k, v in pkg.producer.items())
    click.echo(f"producer: {prod}")
    for inp in pkg.inputs:
        click.echo(f"input {inp.name}: {inp.dtype} ({', '.join(str(d) for d in inp.shape)})")
    if pkg.labels:
        click.echo(f"labels: {len(pkg.labels)} ({', '.join(pkg.labels[:10])}{'…' if len(pkg.labels) > 10 else ''})")
    if pkg.text is not None:
        click.echo(f"text: tokenizer {pkg.text.tokenizer} (shipped) fills {pkg.text.ids}"
                   f"{' and ' + pkg.text.mask if pkg.text.mask else ''}, up to {pkg.text.max_tokens} tokens; "
                   "edgeexit run takes a .txt file, one text per line")
    if pkg.seq2seq is not None:
        _inspect_seq2seq(pkg)
        return
    w = max(8, *(len(s.name) + 2 for s in pkg.stages))
    r = max(18, *(len(",".join(s.inputs)) + 2 for s in pkg.stages))
    c = max(14, *(len(",".join(s.carry)) + 2 for s in pkg.stages))
    click.echo(f"{'stage':<{w}}{'reads':<{r}}{'carry':<{c}}{'exit':<10}{'policy':<12}{'threshold':>10}"
               f"{'params':>10}{'MFLOPs':>9}{'bytes':>10}  sha256")
    exit_no = 0
    for spec in pkg.stages:
        ex = spec.exit
        exit_col = "-" if ex is None else f"exit {exit_no}"
        last = spec is pkg.stages[-1]
        thr = "-" if ex is None else (("always" if last else "disabled") if ex.threshold is None
                                      else f"{ex.threshold:.4g}")
        if ex is not None:
            exit_no += 1
        meta = pkg.files[spec.file]
        click.echo(
            f"{spec.name:<{w}}{','.join(spec.inputs):<{r}}{','.join(spec.carry) or '-':<{c}}{exit_col:<10}"
            f"{ex.policy if ex else '-':<12}{thr:>10}{spec.cost.get('params', 0):>10}"
            f"{spec.cost.get('flops', 0) / 1e6:>9.3f}{meta['size']:>10}  {meta['sha256'][:12]}"
        )
    signals = sorted({signal for s in pkg.stages if s.exit is not None for signal in s.exit.signals})
    if signals:
        click.echo(f"exit signals: {', '.join(signals)} (policies q_exit and gate score them; format version 8)")
    if pkg.quantization:
        modes = ", ".join(f"{q['name']} {q['mode']}" for q in pkg.quantization.get("stages", []))
        status = (pkg.quantization.get("thresholds") or {}).get("status", "?")
        click.echo(f"quantization: {pkg.quantization.get('method')} ({modes}); thresholds {status}")
    if pkg.calibration and pkg.calibration.get("history"):
        last = pkg.calibration["history"][-1]
        state = "reverted" if last.get("reverted") else "current"
        click.echo(f"calibration: {len(pkg.calibration['history'])} entr(y/ies); last ({state}) "
                   f"{last.get('created')} on {last.get('device')}: {last['objective']['kind']} "
                   f"{last['objective']['value']}, accuracy {last['validation_accuracy']:.2%} on "
                   f"{last['samples']} samples, expected {last['expected_cost']:.4g} {last['cost_unit']}")
    if pkg.exits_disabled:
        runs = "ExitSession runs full.onnx" if pkg.full_model else "ExitSession runs every stage (no full.onnx)"
        click.echo(f"early exits: DISABLED (no thresholds: not calibrated, or slower than the full model where it "
                   f"was calibrated); {runs}. Enable them with edgeexit calibrate.")
    if pkg.compiled:
        meta = pkg.files[pkg.compiled.file]
        click.echo(f"compiled graph: {pkg.compiled.file}, policies {', '.join(pkg.compiled.policies)}, "
                   f"input {pkg.compiled.thresholds!r} (float64, {len(pkg.thresholds)}), {meta['size']} bytes  "
                   f"{meta['sha256'][:12]}" + ("" if list(pkg.compiled.policies) == pkg.policies else
                                               f"; STALE: the exits now use {pkg.policies}, so ExitSession runs "
                                               "the stage loop (edgeexit compile PACKAGE)"))
    if pkg.full_model:
        meta = pkg.files[pkg.full_model.file]
        click.echo(f"full model: {pkg.full_model.file}, {pkg.full_model.cost.get('params', 0)} params, "
                   f"{pkg.full_model.cost.get('flops', 0) / 1e6:.3f} MFLOPs, {meta['size']} bytes  "
                   f"{meta['sha256'][:12]}")


def _package_view(pkg: Any) -> dict[str, Any]:
    """A package described for machines: what ``inspect`` prints, as data."""
    exit_no, stages = 0, []
    for spec in pkg.stages:
        exit_info = None
        if spec.exit is not None:
            last = spec is pkg.stages[-1]
            exit_info = {"index": exit_no, "logits": spec.exit.logits, "policy": spec.exit.policy,
                         "threshold": spec.exit.threshold, "signals": dict(spec.exit.signals),
                         "state": "final" if last else ("disabled" if spec.exit.threshold is None else "enabled")}
            exit_no += 1
        stages.append({"name": spec.name, "file": spec.file, "reads": list(spec.inputs), "carry": list(spec.carry),
                       "exit": exit_info, "cost": dict(spec.cost), **pkg.files[spec.file]})
    history = (pkg.calibration or {}).get("history") or []
    return {
        "package": str(pkg.root), "name": pkg.name, "kind": pkg.kind, "format_version": pkg.format_version,
        "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in pkg.inputs],
        "labels": list(pkg.labels) if pkg.labels else None, "stages": stages,
        "text": None if pkg.text is None else {"tokenizer": pkg.text.tokenizer, "ids": pkg.text.ids,
                                               "mask": pkg.text.mask, "max_tokens": pkg.text.max_tokens},
        "thresholds": pkg.thresholds, "policies": pkg.policies, "exits_disabled": pkg.exits_disabled,
        "full_model": None if pkg.full_model is None else {
            "file": pkg.full_model.file, **pkg.files[pkg.full_model.file]},
        "compiled": None if pkg.compiled is None else {
            "file": pkg.compiled.file, "policies": list(pkg.compiled.policies), "thresholds": pkg.compiled.thresholds,
            "stale": list(pkg.compiled.policies) != pkg.policies, "engines": pkg.compiled.engines,
            **pkg.files[pkg.compiled.file]},
        "quantization": pkg.quantization, "calibration": history[-1] if history else None,
        "producer": dict(pkg.producer),
    }


# --- calibrate ---------------------------------------------------------------------


def _format_frontier(result: Any) -> str:
    unit = result.cost_unit
    lines = [f"{'':2}{'accuracy':>9}{'expected ' + unit:>16}{'vs full':>9}  {'meets':<7}{'exit shares':<24}thresholds"]
    for p in result.frontier:
        mark = "*" if list(p.thresholds) == result.thresholds else " "
        shares = " ".join(f"{s:.3f}" for s in p.shares)
        thr = ", ".join(f"{t:.6g}" for t in p.thresholds)
        lines.append(f"{mark:2}{p.accuracy:>9.2%}{p.expected_cost:>16.4f}{result.full_cost / p.expected_cost:>8.2f}x"
                     f"  {'yes' if p.feasible else 'no':<7}{shares:<24}{thr}")
    cheaper = [p for p in result.frontier if p.expected_cost < result.expected_cost and p.accuracy >= result.accuracy]
    if cheaper:
        lines.append(f"{len(cheaper)} row(s) above the choice are cheaper and as accurate on these samples but do not "
                     f"meet the objective: the drop bound also counts the samples they lose and win "
                     f"({result.objective['kind']} {result.objective['value']}, z {result.objective['z']})")
    return "\n".join(lines)


def _save_frontier_plot(result: Any, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p.expected_cost for p in result.frontier]
    ys = [100 * p.accuracy for p in result.frontier]
    ax.step(xs, ys, where="post", marker="o", label="Pareto frontier")
    for p, x, y in zip(result.frontier, xs, ys):
        ax.annotate(", ".join(f"{t:.3g}" for t in p.thresholds), (x, y), textcoords="offset points", xytext=(4, -10),
                    fontsize=6, color="dimgrey")
    ax.scatter([result.expected_cost], [100 * result.accuracy], s=120, facecolors="none", edgecolors="red",
               label="chosen", zorder=3)
    ax.axhline(100 * result.full_accuracy, color="grey", linestyle=":", label="last exit only")
    ax.axvline(result.full_cost, color="black", linestyle="--", label=f"full model ({result.full_model})")
    kind, value = result.objective["kind"], float(result.objective["value"])
    if kind == "latency_budget":
        ax.axvline(value, color="tab:orange", linestyle="-.", label="latency budget")
    elif kind == "target_accuracy":
        ax.axhline(100 * value, color="tab:orange", linestyle="-.", label="target accuracy")
    else:
        ax.axhline(100 * (result.full_accuracy - value), color="tab:orange", linestyle="-.",
                   label=f"last exit - {100 * value:g} pt")
    ax.set_xlim(0, max(result.full_cost, *xs) * 1.05)
    ax.set_xlabel(f"expected cost per sample ({result.cost_unit}); labels: thresholds")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"calibration frontier ({result.policy}, {result.samples} samples)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    from ._atomic import replace_atomically

    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)




def _inspect_seq2seq(pkg: Any) -> None:
    spec = pkg.seq2seq

    def state(t: float | None) -> str:
        return "disabled" if t is None else f"exits when similarity > {t:g}"

    click.echo(f"seq2seq (MuE exits, cosine similarity of each layer's output and input): vocabulary "
               f"{len(spec.vocab)}, answers up to {spec.max_answer - 1} tokens, width {spec.width}, "
               f"{spec.heads} heads")
    for m in spec.modalities:
        click.echo(f"encoder, {m['name']} ({m['input']}, {m['tokens']} tokens): {len(spec.encoder)} shared layers, "
                   f"{state(m.get('threshold'))}")
    click.echo(f"decoder: {len(spec.decoder)} layers with a key/value cache, shared head; per token "
               f"{state(spec.decoder_threshold)}")
    modes = sorted(spec.encoder_exits or {})
    click.echo("encoder with in-graph exits (one onnxruntime call): " + (", ".join(modes) if modes else
               "none (format version 5: the encoder runs one call per layer and modality)"))
    click.echo(f"{'file':<26}{'bytes':>10}  sha256")
    for name in spec.graph_files():
        meta = pkg.files[name]
        click.echo(f"{name:<26}{meta['size']:>10,}  {meta['sha256'][:16]}…")


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_file", type=click.Path(path_type=Path),
              help="Labelled validation data (.npz with the inputs and 'labels'); never the test data.")
@click.option("--max-drop", type=float, help="Accuracy points you may lose vs the last exit (0.5 = half a point).")
@click.option("--target-accuracy", type=float, help="Accuracy to keep, in percent (e.g. 97.5).")
@click.option("--latency-budget-ms", type=float, help="Expected ms per sample; maximise accuracy within it.")
@click.option("--confidence-z", "--confidence", "z", default=1.645, show_default=True, type=click.FloatRange(min=0),
              help="One-sided z of the --max-drop bound: 1.645 is 95 %, 0 the point estimate (--confidence: the old "
                   "name).")
@click.option("--device", default="auto", show_default=True, help="Device profile whose sessions are timed.")
@click.option("--flops", is_flag=True, help="Use the manifest's FLOPs instead of timing the stages here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Save the frontier as a PNG.")
@click.option("--dry-run", is_flag=True, help="Print the choice without writing it into the package.")
@click.option("--revert", is_flag=True, help="Restore the thresholds the last calibration replaced.")
@logging_options(verbose_help="Also print the whole accuracy/cost frontier, and debug detail.", expose_verbose=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def calibrate(package: Path, data_file: Path | None, max_drop: float | None, target_accuracy: float | None,
              latency_budget_ms: float | None, z: float, device: str, flops: bool, plot: Path | None,
              dry_run: bool, revert: bool, verbose: bool, as_json: bool) -> None:
    """Choose one threshold per early exit from labelled data, timed on this device."""
    _check_outputs(plot)
    if _package_kind(package) == "seq2seq":
        from ._seq2seq_cli import calibrate_seq2seq_cli

        if data_file is None or max_drop is None or target_accuracy is not None or latency_budget_ms is not None \
                or revert or plot is not None or flops:
            raise click.UsageError("a seq2seq package calibrates with --data QA.npz (with 'answers') and --max-drop "
                                   "POINTS only")
        calibrate_seq2seq_cli(package, data_file, max_drop, dry_run, as_json, _emit_json)
        return
    from .calibrate import revert_calibration

    if revert:
        pkg = revert_calibration(package)
        click.echo(f"restored thresholds {pkg.thresholds} ({pkg.policies[0]}) in {package}")
        return
    if data_file is None:
        raise click.UsageError("pass --data VAL.npz (labelled validation data), or --revert")
    objectives = [o for o in (max_drop, target_accuracy, latency_budget_ms) if o is not None]
    if len(objectives) != 1:
        raise click.UsageError(
            "pass exactly one of --max-drop POINTS, --target-accuracy PERCENT or --latency-budget-ms MS"
        )
    if latency_budget_ms is not None and flops:
        raise click.UsageError("--latency-budget-ms needs timed stages; drop --flops")
    _calibrate(package, data_file, max_drop=max_drop, target_accuracy=target_accuracy,
               latency_budget_ms=latency_budget_ms, z=z, device=device, flops=flops, plot=plot, dry_run=dry_run,
               verbose=verbose, as_json=as_json)


def _calibrate(package: Path, data_file: Path, *, max_drop: float | None, target_accuracy: float | None = None,
               latency_budget_ms: float | None = None, z: float = 1.645, device: str = "auto", flops: bool = False,
               plot: Path | None = None, dry_run: bool = False, verbose: bool = False, as_json: bool = False) -> None:
    """The calibration flow of `edgeexit calibrate` (also run by `export --calibrate-data`)."""
    from .calibrate import (
        apply_calibration,
        calibrate_thresholds,
        record_engine_choice,
        replay_calibration,
        why_disable_exits,
    )
    from .datafiles import load_input_file
    from .devices import get_profile
    from .runtime import ExitSession

    profile = get_profile(device)
    session = ExitSession(package, device=profile)
    inputs, labels = load_input_file(data_file, session.input_names)
    result = calibrate_thresholds(
        session, inputs, labels, max_drop=None if max_drop is None else max_drop / 100,
        target_accuracy=None if target_accuracy is None else target_accuracy / 100,
        latency_budget=latency_budget_ms, z=z, measure=not flops,
    )
    say = (lambda _line: None) if as_json else click.echo
    costs = (f"exit paths {', '.join(f'{c:.4g}' for c in result.exit_costs or [])} {result.cost_unit} and the full "
             f"model {result.full_cost:.4g} {result.cost_unit}" if result.engine else
             "stages " + ", ".join(f"{c:.4g}" for c in result.stage_costs) + f" {result.cost_unit}")
    say(f"{result.samples} samples, policy {result.policy}, {result.method} search over "
        f"{result.evaluated} choices; costs ({result.cost_source}): {costs}")
    if verbose:
        say(_format_frontier(result))
    else:
        say(f"frontier: {len(result.frontier)} non-dominated choice(s) (--verbose lists them)")
    say(f"chosen thresholds {[round(t, 6) for t in result.thresholds]}: accuracy {result.accuracy:.2%} "
               f"(last exit {result.full_accuracy:.2%}), expected {result.expected_cost:.4g} {result.cost_unit} vs "
               f"{result.full_cost:.4g} for the full model ({result.full_model}): {result.speedup:.2f}x, "
               f"exit shares {[round(s, 3) for s in result.shares]}")
    replay = None
    if result.cost_unit == "ms":
        replay = replay_calibration(session, inputs, labels, result)
        say(f"replayed on the calibration data: accuracy and exit shares as computed; {replay.mean_ms:.4f} ms "
                   f"vs the full model {replay.full_mean_ms:.4f} ms per sample (mean of {replay.samples_timed} "
                   f"samples' medians at batch 1, interleaved): {replay.speedup:.2f}x measured, "
                   f"{result.speedup:.2f}x expected")
    slower = why_disable_exits(result, replay)
    if slower:
        runs = ("it runs full.onnx" if session.package.full_model is not None else
                "it runs every stage; export with the full model (the default) to run the single full graph")
        logger.warning(f"warning: the exits under this objective do not pay on this device: {slower}. "
                       f"{'Writing the package with its early exits disabled: ' + runs if not dry_run else ''}"
                       " (a looser objective may still win; --revert undoes it)")
    measured = replay.speedup if replay is not None else result.speedup
    if result.cost_unit == "ms" and not slower and measured < 1:
        logger.warning(f"warning: the chosen exits run at {measured:.2f}x the plain model on this device, and "
                       "disabling them would be slower still: the runtime's own cost per call is more than the exits "
                       "save here")
    if plot is not None:
        _save_frontier_plot(result, plot)
        say(f"wrote {plot}")
    engines = []
    if dry_run:
        say("dry run: the package was not changed")
    else:
        apply_calibration(package, result, device=profile.name, disable_exits=slower)
        say(f"wrote {'disabled early exits' if slower else 'the thresholds'} into {package} (the previous "
            "thresholds are kept; undo with --revert)")
        chosen = result.engine if result.engine in ("stages", "compiled") else None
        engines = record_engine_choice(package, inputs, device=profile, batch1=chosen)
        words = {"compiled": "compiled graph", "stages": "stage loop"}
        for t in engines:
            runs = chosen if t.batch_size == 1 and chosen else t.faster
            why = " (the engine whose exit paths were timed faster above)" if runs != t.faster else ""
            say(f"batch {t.batch_size}: stage loop {t.stages_ms:.4f} ms, compiled graph {t.compiled_ms:.4f} ms "
                f"per call -> ExitSession runs the {words[runs]}{why}")
    if as_json:
        import dataclasses

        click.echo(json.dumps({
            "schema": "edgeexit.calibrate/1", "package": str(package), "device": profile.name,
            **result.entry(), "speedup_vs_full": result.speedup,
            "replay": None if replay is None else {**dataclasses.asdict(replay), "speedup_vs_full": replay.speedup},
            "exits_disabled": slower, "written": not dry_run,
            "engines": [dataclasses.asdict(t) | {"faster": t.faster} for t in engines],
            "frontier": [dataclasses.asdict(p) for p in result.frontier],
        }, indent=2))




# --- bench and devices ---------------------------------------------------------------


def _pick_meter(profile: Any, meter: str | None, meter_log: Path | None, meter_command: str | None) -> Any:
    from .devices import create_meter, meter_for_profile

    options: dict[str, dict[str, Any]] = {}
    if meter_log is not None:
        options["external"] = {"csv_path": str(meter_log)}
    elif meter_command is not None:
        options["external"] = {"command": meter_command}
    if meter is None and options:
        meter = "external"
    if meter is None:
        chosen, skipped = meter_for_profile(profile, options)
        for why in skipped:
            logger.info(f"meter skipped: {why}")
        return chosen
    if meter == "external" and "external" not in options:
        raise click.UsageError("--meter external needs --meter-log FILE.csv or --meter-command CMD")
    if meter == "estimate":
        from .devices.energy import EstimateMeter

        p = profile.power
        return EstimateMeter(p.busy_watts, p.idle_watts, source=f"profile {profile.name}: {p.source}")
    return create_meter(meter, **options.get(meter, {}))


@cli.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_file", type=click.Path(path_type=Path), help=".npy/.npz as for `run`.")
@click.option("--dataset", type=click.Choice(["mnist5k"]), help="A built-in dataset (its seeded test split).")
@click.option("--device", default="auto", show_default=True, help="Device profile (cpu, rpi4, rpi5, jetson, cuda, "
              "tensorrt, auto).")
@click.option("--batch-size", "--batch", "batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Samples per call; whole batches only (--batch: the old name).")
@click.option("--duration", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per measurement window.")
@click.option("--windows", default=3, show_default=True, type=click.IntRange(min=1), help="Windows per contender.")
@click.option("--warmup", default=2.0, show_default=True, type=click.FloatRange(min=0), help="Warm-up seconds.")
@click.option("--compare", type=click.Choice(["full", "none"]), default="full", show_default=True,
              help="full: also measure the plain full model, interleaved window by window, and report every speedup "
                   "against it; none: the package alone.")
@click.option("--full-model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The full-model ONNX file to compare with (default: the package's full.onnx if it has one, "
                   "else the package with early exits off).")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per stage session (default: the "
              "profile's).")
@click.option("--meter", default=None, help="Energy meter to use (default: the profile's first readable one).")
@click.option("--meter-log", type=click.Path(path_type=Path), help="CSV log (timestamp,watts) of an external meter.")
@click.option("--meter-command", help="Command printing the current watts (external meter).")
@click.option("--idle-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0),
              help="Quiet seconds to measure idle power for whole-board meters (0: don't subtract).")
@click.option("--allow-fallback", is_flag=True, help="Warn instead of failing when a provider is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout.")
@click.option("-o", "--output", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON to this file (.json).")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), help="Write the results as CSV.")
def bench(package: Path, data_file: Path | None, dataset: str | None, device: str, batch: int, duration: float,
          windows: int, warmup: float, compare: str | None, full_model: Path | None, meter: str | None,
          meter_log: Path | None, meter_command: str | None, idle_seconds: float, allow_fallback: bool,
          as_json: bool, json_out: Path | None, csv_out: Path | None, threads: int | None) -> None:
    """Measure latency, throughput and energy of PACKAGE on this device."""
    _check_outputs(json_out, csv_out)
    _classifier_only(package, "bench")
    from .bench import BenchConfig, csv_rows, format_table, run_benchmark
    from .devices import create_meter, get_profile, measure_idle
    from .runtime import ExitSession

    if (data_file is None) == (dataset is None):
        raise click.UsageError("pass exactly one of --data FILE or --dataset mnist5k")
    if full_model is not None and compare != "full":
        raise click.UsageError("--full-model names the model to compare with; it does not go with --compare none")
    profile = get_profile(device)
    session = ExitSession(package, device=profile, allow_fallback=allow_fallback, threads=threads)
    if dataset == "mnist5k":
        from .datasets import mnist5k_splits

        test = mnist5k_splits().test
        inputs: dict[str, Any] = {session.input_names[0]: test.x}
        labels: Any = test.y
    else:
        from .datafiles import load_input_file

        assert data_file is not None  # exactly one of --data / --dataset was checked above
        inputs, labels = load_input_file(data_file, session.input_names)
    energy = _pick_meter(profile, meter, meter_log, meter_command)
    if energy.whole_board and idle_seconds > 0:
        logger.info(f"measuring idle power for {idle_seconds:g} s (whole-board meter) ...")
        idle = measure_idle(energy, idle_seconds)
        opts = {"csv_path": str(meter_log)} if meter_log else ({"command": meter_command} if meter_command else {})
        energy = create_meter(energy.name, idle_watts=idle, **opts)
        logger.info(f"idle {idle:.3f} W will be subtracted from every window")
    config = BenchConfig(batch=batch, duration_s=duration, windows=windows, warmup_s=warmup)
    contenders = (2 if compare == "full" else 1) + (session.engine_for(batch) != "full" and session.has_compiled)
    total = duration * windows * contenders
    with click.progressbar(length=int(total * 10), label="benchmarking", file=sys.stderr, hidden=_quiet()) as bar:
        report = run_benchmark(session, inputs, labels, config, energy, compare_full=compare == "full",
                               full_model=full_model, progress=lambda s: bar.update(int(s * 10)))
    if not as_json:
        click.echo(format_table(report))
    _emit_json("bench", report.to_dict(), as_json, json_out)
    if csv_out is not None:
        import csv
        import io

        rows = csv_rows(report)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        _write_text_atomic(csv_out, buf.getvalue())
        click.echo(f"wrote {csv_out}")
    if not report.valid:
        sys.exit(7)


def _write_text_atomic(path: Path, text: str) -> None:
    from ._atomic import write_bytes_atomically

    write_bytes_atomically(path, text.encode("utf-8"))


@cli.command()
@logging_options()
@click.option("--device", default="auto", show_default=True, help="Profile to show (auto: detect).")
@click.option("--json", "as_json", is_flag=True, help="Print the same as one JSON object on stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON to this file.")
def devices(device: str, as_json: bool, output: Path | None) -> None:
    """Show the detected device, its profile, providers and energy meters."""
    _check_outputs(output)
    import dataclasses

    from .devices import available_providers, detect, detect_meters, get_profile

    found = detect()
    profile = get_profile(device)
    if as_json or output is not None:
        _emit_json("devices", {
            "detected": dataclasses.asdict(found), "profile": dataclasses.asdict(profile),
            "providers_available": available_providers(),
            "meters": [{"name": name, "readable": ok, "why": why} for name, ok, why in detect_meters()],
        }, as_json, output)
        if as_json:
            return
    click.echo(f"detected: {found.profile} ({found.reason}); machine {found.machine}"
               + (f", model {found.model!r}" if found.model else ""))
    click.echo(f"profile: {profile.name} — {profile.description}")
    available = available_providers()
    click.echo(f"providers available: {', '.join(available)}")
    marks = [f"{p} ({'ok' if p in available else 'MISSING'})" for p in profile.provider_names]
    click.echo(f"providers requested: {', '.join(marks)}")
    click.echo(f"threads: {profile.threads} per stage session, spinning {'on' if profile.spinning else 'off'}, "
               f"global pool {'yes' if profile.global_thread_pool else 'no'}")
    p = profile.power
    click.echo(f"power figures for estimates: idle {p.idle_watts:g} W, busy {p.busy_watts:g} W ({p.source})")
    click.echo("energy meters:")
    for name, ok, why in detect_meters():
        star = "*" if name in profile.energy_meters else " "
        click.echo(f" {star} {name:<9} {'readable' if ok else 'not readable'}: {why}")
    click.echo("(* = in this profile's order of preference: " + ", ".join(profile.energy_meters) + ")")


# --- quickstart ---------------------------------------------------------------------


@cli.command()
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
    _check_outputs(output, folder=True)
    if model == "mue":
        from .zoo.mue_quickstart import EPOCHS, run_mue_quickstart

        mue_report = run_mue_quickstart(output, epochs=epochs or EPOCHS, seed=seed, floor=1 - max_drop / 100,
                                    log=logger.info)
        if as_json:
            _emit_json("quickstart", mue_report.to_dict(), True, None)
            return
        click.echo("")
        for line in mue_report.lines():
            click.echo(line)
        click.echo(f"package: {mue_report.package}")
        return
    if as_json:
        raise click.UsageError("--json is for --model mue; the other quickstarts print their table")
    if model == "bert-exits":
        from .zoo.bert_quickstart import run_bert_quickstart

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
        from .zoo.cbnet import run_cbnet_quickstart

        report = run_cbnet_quickstart(blenet_epochs=epochs, seed=seed, output_dir=output, max_drop=max_drop / 100,
                                      progress=_bar, log=logger.info)
        click.echo("")
        for line in report.lines():
            click.echo(line)
        return
    from .zoo.quickstart import run_quickstart

    r = run_quickstart(model, epochs=epochs, seed=seed, output_dir=output, max_drop=max_drop / 100,
                       progress=_bar, log=logger.info)
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


def main(argv: list[str] | None = None, standalone_mode: bool = True) -> Any:
    return cli.main(args=argv, prog_name="edgeexit", standalone_mode=standalone_mode)


if __name__ == "__main__":  # pragma: no cover
    main()
