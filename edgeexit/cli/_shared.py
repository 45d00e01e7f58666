"""What every command shares: the JSON envelope and its one output rule, output checks before
any work, the package-kind guard, progress bars and atomic text writes.

Kept apart from ``__init__.py`` (which holds the group and imports every command) so that the
command modules import these without an import cycle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__
from .._logging import quiet


def envelope(command: str, payload: dict[str, Any]) -> dict[str, Any]:
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


def emit_json(command: str, payload: dict[str, Any], as_json: bool, output: Path | None) -> None:
    """The one rule for machine-readable output: --json prints it, -o FILE.json writes it (atomically)."""
    text = json.dumps(envelope(command, payload), indent=2, default=str) + "\n"
    if as_json:
        click.echo(text, nl=False)
    if output is not None:
        write_text_atomic(output, text)
        say_wrote(output, as_json)


def say_wrote(path: Path, as_json: bool) -> None:
    """``wrote PATH``: on stdout, or on stderr when stdout holds the one JSON object of --json."""
    click.echo(f"wrote {path}", err=as_json)


def check_suffix(path: Path | None, allowed: tuple[str, ...], option: str = "-o") -> None:
    """Refuse an output whose format the command cannot write, before any work (a usage error, exit 2)."""
    if path is not None and path.suffix.lower() not in allowed:
        raise click.UsageError(f"{option} {path}: this command writes {', '.join(allowed)} files; name the output "
                               f"with one of those suffixes")


def check_new(path: Path, force: bool) -> None:
    """An existing output is replaced only with --force (a usage error, exit 2, before any work)."""
    if path.exists() and not force:
        raise click.UsageError(f"{path} exists; pass --force to replace it")


def write_text_atomic(path: Path, text: str) -> None:
    from .._atomic import write_bytes_atomically

    write_bytes_atomically(path, text.encode("utf-8"))


def package_kind(package: Path) -> str:
    """The manifest's kind, read without hashing the graphs (the command verifies them when it loads)."""
    from ..package import load_package

    return load_package(package, verify_hashes=False).kind


def classifier_only(package: Path, command: str) -> None:
    """Refuse a seq2seq package in a command that works on classifiers and pipelines only."""
    if package_kind(package) == "seq2seq":
        raise click.UsageError(f"`edgeexit {command}` works on classifier and pipeline packages; {package} is a "
                               "seq2seq package (run it with `edgeexit run`, or ExitSession.generate from Python)")


def check_outputs(*paths: Path | None, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done (OutputError, exit code 8)."""
    from .._atomic import check_output_path

    for path in paths:
        if path is not None:
            check_output_path(path, folder=folder)


def call_factory(spec: str) -> Any:
    """What ``module.path:factory`` returns, the module imported as ``python -m`` would (the current
    directory first); a ModelSpecError when it cannot be imported or is not callable."""
    import importlib

    from ..errors import ModelSpecError

    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}; MODEL must be module.path:factory")
    return factory()


def progress_bar(label: str, length: int) -> Any:
    """A progress bar on stderr, hidden by -q."""
    return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True, hidden=quiet())


def require_modules(what: str, needs: dict[str, str]) -> None:
    """Every missing module at once, before any slow import: ``needs`` maps a module to how to install it."""
    import importlib.util

    from ..errors import MissingExtraError

    missing = [(m, how) for m, how in needs.items() if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(m for m, _ in missing)}, not installed: "
                                + "; ".join(dict.fromkeys(how for _, how in missing)))
