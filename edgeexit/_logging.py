"""How the command line talks: results on stdout, everything else through ``logging`` on stderr.

The library logs to the ``edgeexit`` logger and leaves its configuration to the application.
The CLI's ``-q/--quiet`` (warnings and errors only, no progress bars) and ``-v/--verbose``
(also debug detail, and onnxruntime's own warnings) set its level; Python warnings such as a
provider fallback are shown as one line (``warning: ...``), not as a source excerpt.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import click

logger = logging.getLogger("edgeexit")


class _ClickHandler(logging.Handler):
    """One line per record on stderr; warnings and errors say so."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and not message.startswith(("warning:", "error:")):
            message = f"{record.levelname.lower()}: {message}"
        click.echo(message, err=True)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    first = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    logger.warning(f"warning: {first}")


def configure(level: int) -> None:
    """Send the ``edgeexit`` logger to stderr at ``level`` and Python warnings through it."""
    if not any(isinstance(h, _ClickHandler) for h in logger.handlers):
        logger.addHandler(_ClickHandler())
    logger.setLevel(level)
    logger.propagate = False
    warnings.showwarning = _show_warning
    import onnxruntime as ort

    ort.set_default_logger_severity(2 if level <= logging.DEBUG else 3)   # -v: its warnings, not its INFO flood


def quiet() -> bool:
    return logger.getEffectiveLevel() > logging.INFO


def _set_level(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    levels = ctx.meta.setdefault("edgeexit_levels", {})
    levels[param.name] = value
    if levels.get("quiet") and levels.get("verbose"):
        raise click.UsageError("--quiet and --verbose contradict each other; pass one")
    if levels.get("verbose"):
        configure(logging.DEBUG)
    elif levels.get("quiet"):
        configure(logging.WARNING)
    else:
        configure(logging.INFO)
    return value


def logging_options(verbose_help: str = "Also print debug detail and onnxruntime's own warnings.",
                    expose_verbose: bool = False) -> Any:
    """``-q/--quiet`` and ``-v/--verbose`` for a command (``expose_verbose``: the command also reads it)."""
    def decorate(f: Any) -> Any:
        f = click.option("-v", "--verbose", is_flag=True, callback=_set_level, expose_value=expose_verbose,
                         help=verbose_help)(f)
        f = click.option("-q", "--quiet", is_flag=True, callback=_set_level, expose_value=False,
                         help="Only results, warnings and errors: no progress messages or bars.")(f)
        return f
    return decorate
