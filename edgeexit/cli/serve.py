"""``edgeexit serve``: run a package's stages from K on a Ray Serve server, for devices that offload."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .._logging import logging_options


@click.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--from-stage", "from_stage", type=int, required=True,
              help="First stage the server runs (K >= 1); devices run the stages before it.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File whose first line is the bearer token every request must carry.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Serve replicas of the deployment.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests Ray Serve runs as one batch.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a batch waits for more requests before it runs.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device profile the replicas run the stages on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface of the HTTP proxy (0.0.0.0 to take requests from other machines).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--address", default=None,
              help="A running Ray cluster to deploy on (default: start a local one, on loopback, no dashboard).")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
              help="Largest request body accepted (413 above).")
def serve(package: Path, from_stage: int, token_file: Path, replicas: int, max_batch: int, batch_wait_ms: float,
          device: str, host: str, port: int, address: str | None, max_body_mb: float) -> None:
    """Serve stages K..end of PACKAGE over HTTP for devices that run the stages before K.

    Routes: POST /infer, GET /health, GET /metadata (docs/OFFLOAD.md). Runs until interrupted.
    """
    from ..errors import InputError, InputFileError

    try:
        token = token_file.read_text(encoding="utf-8").splitlines()[0].strip() if token_file.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read the token file {token_file}: {exc}") from None
    if not token:
        raise InputError(f"the token file {token_file} is empty; put the bearer token on its first line")
    from ..serve import start, stop

    url = start(package, from_stage, token, replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                device=device, host=host, port=port, address=address, max_bytes=int(max_body_mb * 1024 * 1024))
    click.echo(f"serving stages {from_stage}.. of {package} at {url} (POST /infer, GET /health, GET /metadata); "
               "Ctrl-C stops", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(shutdown_ray=address is None)
