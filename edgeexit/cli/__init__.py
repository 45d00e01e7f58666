"""The ``edgeexit`` command line: thin click commands over the library, one module per command.

This module holds the group, the mapping from errors to one line and an exit code, and the list
of commands: adding a command is one new module here plus one ``add_command`` line below. What
the commands share (the JSON envelope, output checks) is in ``_shared.py``; ``-q``/``-v`` are in
``edgeexit._logging``.

Heavy modules (torch, onnx) are imported inside the commands that need them, so
``edgeexit --help``, ``run`` and ``inspect`` work on a runtime-only install.
"""

from __future__ import annotations

from typing import Any

import click

from .. import __version__
from ..errors import EdgeExitError, MissingExtraError, OutputError
from . import attach, bench, calibrate, devices, export, inspect, plan_offload, quantize, quickstart, run, serve
from .compile import compile_command, pack


class _Group(click.Group):
    """Shows an ``EdgeExitError`` as one line on stderr and exits with the error's own code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:   # `edgeexit devices | head -1`: the reader had enough; not an error
            _quiet_stdout()
            ctx.exit(0)
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
           "torchvision": "vision", "timm": "vision",
           "matplotlib": "dev", "ray": "serve", "onnxruntime": "(the runtime itself: pip install onnxruntime)"}


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


cli.add_command(export.export)
cli.add_command(attach.attach)
cli.add_command(quantize.quantize)
cli.add_command(compile_command)
cli.add_command(pack)
cli.add_command(run.run)
cli.add_command(inspect.inspect)
cli.add_command(calibrate.calibrate)
cli.add_command(bench.bench)
cli.add_command(devices.devices)
cli.add_command(quickstart.quickstart)
cli.add_command(serve.serve)
cli.add_command(plan_offload.plan_offload)


def _quiet_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush into a closed pipe is silent."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):   # no real stdout (an embedding app, a test runner)
        pass


def main(argv: list[str] | None = None, standalone_mode: bool = True) -> Any:
    try:
        return cli.main(args=argv, prog_name="edgeexit", standalone_mode=standalone_mode)
    except BrokenPipeError:   # raised while flushing after the command finished
        _quiet_stdout()
        return None


if __name__ == "__main__":  # pragma: no cover
    main()
