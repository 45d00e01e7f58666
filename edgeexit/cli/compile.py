"""``edgeexit compile`` (one graph deciding the exits in-graph) and ``edgeexit pack`` (a package as one file)."""

from __future__ import annotations

from pathlib import Path

import click

from .._logging import logger, logging_options
from ._shared import check_new, check_outputs, check_suffix, classifier_only


@click.command("compile")
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the compiled graph to this .onnx file instead of adding compiled.onnx to the package.")
@click.option("--bake-thresholds", is_flag=True,
              help="With -o: store the package's thresholds as constants instead of a 'thresholds' input.")
@click.option("--force", is_flag=True, help="Replace an existing file at -o.")
def compile_command(package: Path, output: Path | None, bake_thresholds: bool, force: bool) -> None:
    """Compile PACKAGE into one ONNX graph that decides its exits in-graph (any onnxruntime binding).

    Inputs: the package's inputs plus 'thresholds' (float64, one per early exit; the
    values are in the manifest). Outputs: logits, exit_index (int64), score (float64).
    """
    check_suffix(output, (".onnx",))
    if output is not None:
        check_new(output, force)
    check_outputs(output)
    classifier_only(package, "compile")
    from ..export.compile import compile_package

    if bake_thresholds and output is None:
        raise click.UsageError("--bake-thresholds writes a standalone graph: pass -o FILE.onnx with it")
    compile_package(package, output=output, bake=bake_thresholds, log=logger.info)


@click.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The packed file to write (NAME.eexit.zip); ExitSession and every command take it as a package.")
@click.option("--force", is_flag=True, help="Replace an existing file at -o.")
def pack(package: Path, output: Path, force: bool) -> None:
    """Pack PACKAGE into one file, for apps that ship the model inside their bundle and load it from memory."""
    check_new(output, force)
    check_outputs(output)
    from ..package import load_package, pack_package

    pack_package(package, output)
    click.echo(f"wrote {output} ({output.stat().st_size:,} bytes, {len(load_package(output).files)} files verified)")


# --- run ----------------------------------------------------------------------------
