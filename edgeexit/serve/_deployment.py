"""The Ray Serve deployment: stages K..end of one package for many devices, batched by Ray Serve.

Routes (every one needs ``Authorization: Bearer TOKEN``; 401 without it or with another token):

- ``POST /infer``: a tensor message (``edgeexit.runtime.wire``) holding exactly the carry that
  enters stage K, with ``X-Edgeexit-Package: <sha256 of manifest.json>`` (409 for another
  package) and ``X-Edgeexit-From-Stage: K`` (409 for another split).  Every tensor's name,
  dtype and shape is checked against the stage graphs before anything runs (400 with the
  reason); a body over ``max_bytes`` is 413.  The answer is a tensor message: ``logits``,
  ``exit_index`` (int64, the package's exit numbers), ``scores`` (float64), meta ``package``,
  ``batch_requests``, ``batch_samples``, ``server_ms``; headers ``X-Edgeexit-Batch`` (requests
  run together) and ``X-Edgeexit-Batch-Samples``.
- ``GET /health``: ``{"status": "ok", "package": ..., "from_stage": K}``.
- ``GET /metadata``: the package hash and name, the stages and exits served, the carry expected
  (names, dtypes, shapes), the batching settings and the batch sizes this replica has run.

Requests are batched with Ray Serve's ``@serve.batch``: every request waiting within
``batch_wait_s`` (up to ``max_batch`` requests) runs as one batch of the stage loop, answered
per request.  A bad request never stops the replica: each is answered alone.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import Counter
from time import perf_counter_ns
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import EdgeExitError, InputError, MessageTooLargeError
from ..runtime import ExitSession, wire
from ..runtime._split import carry_specs, check_carry
from ..runtime.offload import PACKAGE_HEADER, STAGE_HEADER, manifest_sha256

log = logging.getLogger("edgeexit.serve")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OffloadServer:
    """One replica: the package's stages from ``from_stage`` on (see the module's doc)."""

    def __init__(self, package: str, from_stage: int, token: str, *, device: str = "cpu", max_batch: int = 8,
                 batch_wait_s: float = 0.005, max_bytes: int = wire.MAX_BYTES) -> None:
        if not token:
            raise InputError("the server needs a non-empty bearer token")
        self.session = ExitSession(package, device=device)
        self.package_hash = manifest_sha256(package, self.session.package)
        self.from_stage = from_stage
        self.carry = carry_specs(self.session._stages, from_stage)
        if any(p.step is not None for p in self.session._default_plan.policies):
            raise InputError(f"policies {self.session.package.policies}: a stateful policy cannot be offloaded")
        self._token = token.encode()
        self.max_batch, self.batch_wait_s, self.max_bytes = max_batch, batch_wait_s, max_bytes
        batching: Any = self._run_batch   # Ray Serve's batch wrapper: its limits are set per replica
        batching.set_max_batch_size(max_batch)
        batching.set_batch_wait_timeout_s(batch_wait_s)
        self.batches: Counter[int] = Counter()   # requests per batch -> how many batches
        stages = self.session._stages
        self.metadata = {
            "package": self.package_hash, "name": self.session.package.name, "from_stage": from_stage,
            "stages": [s.spec.name for s in stages[from_stage:]],
            "exits": [s.exit_number for s in stages[from_stage:] if s.exit_number is not None],
            "carry": [s.as_json() for s in self.carry], "logits_dtype": self.session._logits_dtype.name,
            "max_batch": max_batch, "batch_wait_ms": batch_wait_s * 1e3, "max_bytes": max_bytes,
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            self._authorize(request)
            if path == "health" and request.method == "GET":
                return JSONResponse({"status": "ok", "package": self.package_hash, "from_stage": self.from_stage})
            if path == "metadata" and request.method == "GET":
                return JSONResponse({**self.metadata, "batches": {str(k): v for k, v in sorted(self.batches.items())}})
            if path == "infer" and request.method == "POST":
                return await self._infer(request)
            raise _Refused(404 if path not in ("health", "metadata", "infer") else 405,
                           f"no route {request.method} {request.url.path}: POST /infer, GET /health, GET /metadata")
        except _Refused as exc:
            return self._refuse(exc.status, str(exc))
        except MessageTooLargeError as exc:
            return self._refuse(413, str(exc))
        except InputError as exc:
            return self._refuse(400, f"{type(exc).__name__}: {exc}")
        except EdgeExitError as exc:
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            return self._refuse(500, f"{type(exc).__name__}: {exc}")

    def _refuse(self, status: int, message: str) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return PlainTextResponse(message + "\n", status_code=status, headers=headers)

    def _authorize(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise _Refused(401, "a valid bearer token is required (Authorization: Bearer TOKEN)")

    async def _infer(self, request: Request) -> Response:
        sent = request.headers.get(PACKAGE_HEADER)
        if sent != self.package_hash:
            raise _Refused(409, f"this server runs package {self.package_hash}; the request is for {sent!r} "
                                f"(send the sha256 of manifest.json in {PACKAGE_HEADER})")
        if request.headers.get(STAGE_HEADER) != str(self.from_stage):
            raise _Refused(409, f"this server runs stages from {self.from_stage}; the request says "
                                f"{request.headers.get(STAGE_HEADER)!r} ({STAGE_HEADER})")
        body = await self._body(request)
        tensors, _meta = wire.decode(body, max_bytes=self.max_bytes)
        feeds, _n = check_carry(self.carry, tensors)
        logits, exits, scores, batch_requests, batch_samples, server_ms = await self._run_batch(feeds)
        answer = wire.encode({"logits": logits, "exit_index": exits, "scores": scores},
                             {"package": self.package_hash, "batch_requests": batch_requests,
                              "batch_samples": batch_samples, "server_ms": server_ms})
        return Response(answer, media_type=wire.CONTENT_TYPE, headers={
            "X-Edgeexit-Batch": str(batch_requests), "X-Edgeexit-Batch-Samples": str(batch_samples)})

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            raise _Refused(413, f"the body is {length} bytes, over the limit of {self.max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, f"the body is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, requests: list[dict[str, np.ndarray]]) -> list[tuple[Any, ...]]:
        self.batches[len(requests)] += 1
        return await asyncio.to_thread(self._run_sync, requests)

    def _run_sync(self, requests: list[dict[str, np.ndarray]]) -> list[tuple[Any, ...]]:
        t0 = perf_counter_ns()
        answers: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}   # requests whose tensors concatenate (same sample shapes)
        for i, feeds in enumerate(requests):
            groups.setdefault(tuple(feeds[s.name].shape[1:] for s in self.carry), []).append(i)
        for members in groups.values():
            sizes = [len(requests[i][self.carry[0].name]) for i in members]
            batch = {s.name: np.concatenate([requests[i][s.name] for i in members]) for s in self.carry}
            split = self.session.run_stages(batch, first=self.from_stage)
            order = np.empty(len(split.done), dtype=np.int64)
            order[split.done] = np.arange(len(split.done))   # row of each sample in the split's arrays
            start = 0
            for i, size in zip(members, sizes):
                rows = order[start:start + size]
                answers[i] = (split.logits[rows], split.exit_index[rows], split.scores[rows])
                start += size
        ms = (perf_counter_ns() - t0) / 1e6
        total = sum(len(r[self.carry[0].name]) for r in requests)
        return [(*a, len(requests), total, ms) for a in answers if a is not None]


def deployment_options(replicas: int, max_batch: int, device: str) -> dict[str, Any]:
    """Ray Serve options of the deployment: replicas, enough concurrent requests per replica to fill
    a batch twice over, and a share of a GPU per replica for ``device="cuda"``."""
    options: dict[str, Any] = {"num_replicas": replicas, "max_ongoing_requests": max(2 * max_batch, 8)}
    if device == "cuda":
        options["ray_actor_options"] = {"num_gpus": 1 / replicas}
    return options
