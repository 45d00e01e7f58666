"""Serving the stages a device offloads: a Ray Serve deployment (the ``serve`` extra).

``start(package, from_stage=K, token=...)`` runs stages K..end of ``package`` behind Ray Serve's
HTTP proxy, batching requests from many devices (``_deployment.OffloadServer`` has the routes and
the checks).  Devices call it with ``edgeexit.runtime.offload.OffloadSession``.  The runtime never
imports this package (it imports ray).

Ray's own ports have no authentication of ours, so a cluster that ``start`` creates stays on this
machine: no dashboard (so no jobs API), the node address and the dashboard agent on 127.0.0.1
(Ray's single-machine mode), and the HTTP proxy on ``host`` (127.0.0.1 unless asked).  Ray Serve
2.60 binds each replica's inter-deployment gRPC port on every interface whatever the settings
(ray/serve/_private/replica.py): firewall everything but the HTTP port on a server reachable
from outside.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..runtime import ExitSession, wire
from ..runtime._split import carry_specs

APP_NAME = "edgeexit-offload"


def start(package: str | os.PathLike[str], from_stage: int, token: str, *, replicas: int = 1, max_batch: int = 8,
          batch_wait_ms: float = 5.0, device: str = "cpu", host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, max_bytes: int = wire.MAX_BYTES, num_cpus: int | None = None) -> str:
    """Deploy stages ``from_stage``..end of ``package`` on Ray Serve and return the base URL.

    Starts a local Ray (loopback only, no dashboard) unless ``address`` names a running cluster
    or this process already joined one.  The package, the split and the token are checked here
    first, so a mistake is a typed error before Ray starts.
    """
    if not token:
        raise InputError("the server needs a bearer token: --token-file with a non-empty first line")
    if replicas < 1 or max_batch < 1 or batch_wait_ms < 0 or max_bytes < 1:
        raise InputError("need replicas >= 1, max_batch >= 1, batch_wait_ms >= 0 and max_bytes >= 1")
    path = str(Path(package).resolve())
    with ExitSession(path) as session:   # a typed error here, not inside a replica
        carry_specs(session._stages, from_stage)
    if address is None:
        _single_machine()
    import ray
    from ray import serve

    from ._deployment import OffloadServer, deployment_options

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, dashboard_host="127.0.0.1", num_cpus=num_cpus,
                 log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(name=APP_NAME, **deployment_options(replicas, max_batch, device))(OffloadServer)
    app = deployment.bind(path, from_stage, token, device=device, max_batch=max_batch,
                          batch_wait_s=batch_wait_ms / 1e3, max_bytes=max_bytes)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop(shutdown_ray: bool = True) -> None:
    """Remove the deployment and Serve (and Ray itself, with ``shutdown_ray``)."""
    import ray
    from ray import serve

    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


def _single_machine() -> None:
    """Ray's single-machine mode: the node address is 127.0.0.1, so the GCS, the raylet, the workers
    and the dashboard agent listen on loopback only (set for the processes Ray starts, too)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants: Any = sys.modules.get("ray._private.ray_constants")
    if constants is not None:   # ray already imported: its constant was read from the environment then
        constants.ENABLE_RAY_CLUSTER = False
