"""``edgeexit quantize``: a package's stage graphs to int8 with onnxruntime.quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._logging import logger, logging_options
from ._shared import check_new, check_outputs, classifier_only


def quantize_package_file(src: Path, dst: Path, data_file: Path, force: bool, **options: Any) -> None:
    from ..datafiles import load_input_file
    from ..export.quantize import quantize_package
    from ..package import load_package

    names = [i.name for i in load_package(src).inputs]
    inputs, labels = load_input_file(data_file, names)
    if labels is None:
        logger.warning("warning: --data has no 'labels'; the fp32 thresholds are copied and must be recalibrated "
                       "(edgeexit calibrate)")
    quantize_package(src, dst, inputs, calibration_labels=labels, overwrite=force, log=logger.info, **options)


@click.command()
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
    from ..package import check_replaceable

    check_replaceable(output, overwrite=True)   # what is not an exit package is never replaced, --force or not
    check_new(output, force)   # as export: an existing output is a usage error (exit 2), before any work
    check_outputs(output, folder=True)
    classifier_only(package, "quantize")
    quantize_package_file(package, output, data_file, force, mode=mode, activation_type=activation_type,
              per_channel=per_channel, max_calibration_samples=max_calibration_samples,
              max_drop=None if max_drop is None else max_drop / 100)
