"""Offloading: the device runs the stages before K, a server (``edgeexit serve``) the rest.

``OffloadSession(path, Offload(url, from_stage=K, token=...))`` runs a batch through stages
0 .. K-1 with their exits on the device (``ExitSession.run_stages``).  The samples still running
after stage K-1 go to the server in one request: their carry as raw tensors
(``edgeexit.runtime.wire``, never pickle), the package's hash in a header and the bearer token.
The server answers their logits, exits and scores, and ``run`` merges everything back into input
order.  The result is an ``OffloadResult``: an ``ExitResult`` plus, per sample, where it finished
(``"device"``, ``"server"``, or ``"local"``: the server part ran on the device after the server
failed), and the bytes sent, received and the network time of the call.

The client never hangs and never answers a sample twice: each attempt has a deadline
(``timeout_s``, covering connecting, sending and reading), connection failures, timeouts and
5xx answers are retried ``retries`` times, and an answer is taken whole (right sample count,
dtypes and exits, the same package hash) or not at all.  When no attempt succeeds, or the server
refuses the request (4xx), the remaining stages run on the device (the package has them), or,
with ``fallback=False``, ``OffloadError`` is raised.  stdlib (urllib) and numpy only: no ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any
from uuid import uuid4

import numpy as np

from ..errors import InputError, OffloadError, PackageError, WireFormatError
from ..package import Package
from . import wire
from ._result import ExitResult
from ._split import StageSplit, carry_specs
from .session import ExitSession

PACKAGE_HEADER = "X-Edgeexit-Package"
STAGE_HEADER = "X-Edgeexit-From-Stage"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def manifest_sha256(path: str | os.PathLike[str] | bytes, package: Package) -> str:
    """sha256 of the package's ``manifest.json`` bytes (it covers every file's hash: one value pins
    the package), checked to be the manifest ``package`` was loaded from."""
    if isinstance(path, (bytes, bytearray, memoryview)) or Path(path).is_file():
        data = bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else Path(path).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            raw = archive.read("manifest.json")
    else:
        raw = (Path(path) / "manifest.json").read_bytes()
    if json.loads(raw) != package.manifest:
        where = "the package" if isinstance(path, (bytes, bytearray, memoryview)) else str(path)
        raise PackageError(f"{where}: manifest.json changed while the package was loaded (republished?); load it again")
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Offload:
    """Where and how to offload: the server's base URL (``http://host:port``) and the first stage
    it runs (K >= 1), the bearer token, the deadline of one attempt in seconds, how many more
    attempts after a connection failure, timeout or 5xx, whether to run the rest on the device
    when the server fails (else ``OffloadError``), and the largest answer read."""

    url: str
    from_stage: int
    token: str | None = None
    timeout_s: float = 2.0
    retries: int = 1
    fallback: bool = True
    max_bytes: int = wire.MAX_BYTES

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise OffloadError(f"offload url {self.url!r} must start with http:// or https://")
        if not (self.timeout_s > 0 and self.retries >= 0):
            raise OffloadError(f"offload needs timeout_s > 0 and retries >= 0, got {self.timeout_s}, {self.retries}")

    def bind(self, session: ExitSession, path: str | os.PathLike[str] | bytes) -> OffloadSession:
        """The offloading runner of ``session`` (what ``ExitSession(path, offload=self)`` calls)."""
        return OffloadSession(path, self, session=session)


class OffloadResult(ExitResult):
    """An ``ExitResult`` (input order) plus where each sample finished and what the network cost.

    Attributes (besides ``ExitResult``'s):
        where: per sample, ``"device"`` (an exit before K), ``"server"``, or ``"local"`` (the
            server failed and the device ran the rest); ``exit_index`` says which exit.
        bytes_sent, bytes_received: the request and answer bodies of this call (every attempt).
        network_ms: wall time spent on requests (every attempt), server time included.
        server_ms: the server's own time for the batch it ran these samples in (None: no answer).
        server_batch: how many requests the server ran together with this one (None: no answer).
        attempts: requests made; error: why the server part ran locally (None when it did not).
    """

    __slots__ = ("attempts", "bytes_received", "bytes_sent", "error", "network_ms", "server_batch", "server_ms",
                 "where")
    where: np.ndarray
    bytes_sent: int
    bytes_received: int
    network_ms: float
    server_ms: float | None
    server_batch: int | None
    attempts: int
    error: str | None


class OffloadSession:
    """An ``ExitSession`` whose stages from ``offload.from_stage`` on run on a server.

    Args:
        path: the package (as ``ExitSession`` takes it); the server must serve the same one.
        offload: the server and the split point.
        **session_options: passed to ``ExitSession`` (``device``, ``threads``...).

    ``run`` is thread-safe like ``ExitSession.run``; ``session`` is the local ``ExitSession``.
    """

    def __init__(self, path: str | os.PathLike[str] | bytes, offload: Offload, *, session: ExitSession | None = None,
                 **session_options: Any) -> None:
        self.session = session if session is not None else ExitSession(path, **session_options)
        self.offload = offload
        self.package_hash = manifest_sha256(path, self.session.package)
        self.carry = carry_specs(self.session._stages, offload.from_stage)
        if any(p.step is not None for p in self.session._default_plan.policies):
            raise OffloadError(f"policies {self.session.package.policies}: a stateful policy cannot be offloaded")
        self._infer_url = offload.url.rstrip("/") + "/infer"

    def run(self, inputs: np.ndarray | dict[str, np.ndarray]) -> OffloadResult:
        """Run a batch: stages before K here, the samples still running on the server, merged in order."""
        start = perf_counter_ns()
        k = self.offload.from_stage
        head = self.session.run_stages(inputs, stop=k)
        n = len(head.done) + len(head.rest)
        where = np.full(n, "device", dtype="<U6")
        stats: dict[str, Any] = {"attempts": 0, "bytes_sent": 0, "bytes_received": 0, "network_ms": 0.0,
                                 "server_ms": None, "server_batch": None, "error": None}
        parts = [head]
        if head.rest.size:
            try:
                tail = self._remote(head, stats)
                where[head.rest] = "server"
            except OffloadError as exc:
                if not self.offload.fallback:
                    raise
                stats["error"] = str(exc)
                tail = self.session.run_stages(head.carry, first=k)
                tail = StageSplit(head.rest[tail.done], tail.exit_index, tail.scores, tail.logits, tail.rest,
                                  tail.carry, tail.stage_ms)
                where[head.rest] = "local"
            parts.append(tail)
        classes = max(p.logits.shape[1] for p in parts)
        logits = np.empty((n, classes), dtype=self.session._logits_dtype)
        exit_index = np.empty(n, dtype=np.int64)
        scores = np.empty(n, dtype=np.float64)
        for p in parts:
            if p.done.size:
                logits[p.done], exit_index[p.done], scores[p.done] = p.logits, p.exit_index, p.scores
        result = OffloadResult(None, logits, exit_index, scores, head.stage_ms, int((~np.isfinite(scores)).sum()),
                               (perf_counter_ns() - start) / 1e6)
        result._class_names = self.session.labels
        result.where = where
        for name, value in stats.items():
            setattr(result, name, value)
        return result

    def send(self, carry: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Send ``carry`` (the tensors entering stage K, any batch) to the server as ``run`` sends the
        samples still running, and return the call's figures: ``attempts``, ``bytes_sent``,
        ``bytes_received``, ``network_ms``, ``server_ms``, ``server_batch``.  ``OffloadError`` when no
        attempt is answered (no fallback: for measuring the server, ``edgeexit plan-offload``)."""
        n = len(next(iter(carry.values()))) if carry else 0
        head = StageSplit(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty((0, 0)),
                          np.arange(n), dict(carry), ())
        stats: dict[str, Any] = {"attempts": 0, "bytes_sent": 0, "bytes_received": 0, "network_ms": 0.0,
                                 "server_ms": None, "server_batch": None}
        self._remote(head, stats)
        return stats

    def _remote(self, head: StageSplit, stats: dict[str, Any]) -> StageSplit:
        """The server's answer for ``head``'s remaining samples, positions in the caller's batch; or OffloadError."""
        off = self.offload
        body = wire.encode({s.name: head.carry[s.name] for s in self.carry}, {"from_stage": off.from_stage})
        headers = {"Content-Type": wire.CONTENT_TYPE, PACKAGE_HEADER: self.package_hash,
                   STAGE_HEADER: str(off.from_stage), "X-Request-Id": uuid4().hex}
        if off.token is not None:
            headers["Authorization"] = f"Bearer {off.token}"
        why = "no attempt made"
        for _attempt in range(off.retries + 1):
            stats["attempts"] += 1
            stats["bytes_sent"] += len(body)
            t0 = perf_counter_ns()
            try:
                status, answer = self._post(body, headers)
            except (OSError, TimeoutError, urllib.error.URLError) as exc:   # refused, reset, timed out
                status, answer, why = 0, b"", f"{self._infer_url} unreachable: {getattr(exc, 'reason', exc)}"
            finally:
                stats["network_ms"] += (perf_counter_ns() - t0) / 1e6
            stats["bytes_received"] += len(answer)
            if status == 200:
                return self._accept(answer, head, stats)
            if status:
                why = f"{self._infer_url} answered {status}: {answer[:300].decode('utf-8', 'replace').strip()}"
            if status and status not in _RETRY_STATUS:
                break   # refused (token, package, tensors): asking again would not help
        raise OffloadError(f"offloading {len(head.rest)} sample(s) failed after {stats['attempts']} attempt(s): {why}")

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """``(status, body)`` of one POST, read within the attempt's deadline; OSError/TimeoutError past it."""
        off = self.offload
        deadline = perf_counter_ns() + int(off.timeout_s * 1e9)
        request = urllib.request.Request(self._infer_url, data=body, headers=headers, method="POST")
        try:
            response = _NO_PROXY.open(request, timeout=off.timeout_s)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(64 * 1024)
        with response:
            chunks, size = [], 0
            while True:
                if perf_counter_ns() > deadline:
                    raise TimeoutError(f"no whole answer within {off.timeout_s} s")
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > off.max_bytes:
                    raise OSError(f"the answer is over {off.max_bytes} bytes")
                chunks.append(chunk)
            return response.status, b"".join(chunks)

    def _accept(self, answer: bytes, head: StageSplit, stats: dict[str, Any]) -> StageSplit:
        """The answer as a StageSplit, if it answers exactly these samples; else OffloadError."""
        m = len(head.rest)
        try:
            tensors, meta = wire.decode(answer, max_bytes=self.offload.max_bytes)
        except WireFormatError as exc:
            raise OffloadError(f"the server's answer is malformed: {exc}") from None
        logits, exits, scores = (tensors.get(n) for n in ("logits", "exit_index", "scores"))
        first_exit = sum(1 for s in self.session._stages[:self.offload.from_stage] if s.exit_number is not None)
        problem = None
        if meta.get("package") != self.package_hash:
            problem = f"it is for package {meta.get('package')!r}, not {self.package_hash}"
        elif logits is None or exits is None or scores is None or set(tensors) != {"logits", "exit_index", "scores"}:
            problem = f"it holds {sorted(tensors)}, not logits, exit_index and scores"
        elif logits.dtype != self.session._logits_dtype or logits.ndim != 2 or logits.shape[0] != m \
                or exits.dtype != np.int64 or exits.shape != (m,) or scores.dtype != np.float64 \
                or scores.shape != (m,):
            problem = (f"shapes/dtypes logits {logits.dtype}{list(logits.shape)}, exit_index {exits.dtype}"
                       f"{list(exits.shape)}, scores {scores.dtype}{list(scores.shape)} do not answer {m} sample(s)")
        elif m and not ((exits >= first_exit) & (exits < self.session.num_exits)).all():
            problem = f"exit indices {sorted(set(exits.tolist()))} are not exits of stages {self.offload.from_stage}+"
        if problem:
            raise OffloadError(f"the server's answer is refused: {problem}")
        stats["server_ms"] = meta.get("server_ms")
        stats["server_batch"] = meta.get("batch_requests")
        assert logits is not None and exits is not None and scores is not None
        return StageSplit(head.rest, exits, scores, logits, head.rest[:0], {}, ())



def message_bytes(carry: Mapping[str, np.ndarray], from_stage: int, classes: int, logits_dtype: Any = np.float32
                  ) -> tuple[int, int]:
    """Bytes of one offloaded call's bodies for the rows of ``carry``: the request exactly as
    ``OffloadSession`` encodes it (header + tensor bytes), and the server's answer (logits of
    ``classes`` columns, exit index, score; its meta holds the server's time, so a few bytes more or
    less).  HTTP and TCP/IP headers are not counted."""
    request = wire.encode(dict(carry), {"from_stage": from_stage})
    n = len(next(iter(carry.values()))) if carry else 0
    answer = wire.encode({"logits": np.zeros((n, classes), logits_dtype), "exit_index": np.zeros(n, np.int64),
                          "scores": np.zeros(n, np.float64)},
                         {"package": "0" * 64, "batch_requests": 1, "batch_samples": n, "server_ms": 1.234567})
    return len(request), len(answer)


def split_costs(stage_ms: Sequence[float], exit_stages: Sequence[int], shares: Sequence[float],
                wire_bytes: Mapping[int, tuple[int, int]], *, server_ms: float, rtt_ms: float = 0.0,
                mbps: float | None = None) -> list[dict[str, Any]]:
    """The expected cost per sample of each split point K (``edgeexit plan-offload``).

    A sample reaches stage k unless it left at an exit of an earlier stage: ``reach[k] = 1 - sum of
    shares[e] over exits e with exit_stages[e] < k``.  At split K the device runs stage k < K for
    the samples that reach it (``sum reach[k] * stage_ms[k]``), and the ``reach[K]`` still running
    cost one round trip each: ``rtt_ms`` + the request and answer bytes at ``mbps`` (both ways;
    None: free) + ``server_ms``.  ``wire_bytes[K]`` is ``(request, answer)`` bytes for one sample
    (``message_bytes``).  Returns one dict per K in ``wire_bytes`` (sorted), plus K = stages (the
    whole model on the device, nothing sent)."""
    stages = len(stage_ms)
    if len(shares) != len(exit_stages) or not stages or any(not 0 <= k < stages for k in exit_stages):
        raise InputError(f"{len(shares)} shares for exits at stages {list(exit_stages)} of {stages} stage(s)")
    if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise InputError(f"exit shares {list(shares)} must be >= 0 and add up to 1")
    if server_ms < 0 or rtt_ms < 0 or (mbps is not None and mbps <= 0):
        raise InputError("need server_ms >= 0, rtt_ms >= 0 and mbps > 0")
    reach = [1.0 - sum(s for s, e in zip(shares, exit_stages) if e < k) for k in range(stages + 1)]
    reach = [min(1.0, max(0.0, r)) for r in reach]
    rows = []
    for k in [*sorted(wire_bytes), stages]:
        if not 1 <= k <= stages:
            raise InputError(f"a split must be 1 <= K <= {stages}, got {k}")
        sent, answer = wire_bytes.get(k, (0, 0)) if k < stages else (0, 0)
        offload = reach[k] if k < stages else 0.0
        transfer = 0.0 if mbps is None else (sent + answer) * 8 / (mbps * 1e3)
        device = sum(reach[j] * stage_ms[j] for j in range(k))
        remote = offload * (rtt_ms + transfer + server_ms)
        rows.append({"from_stage": k, "device_share": 1.0 - offload, "offload_share": offload,
                     "request_bytes": sent, "answer_bytes": answer, "expected_bytes": offload * (sent + answer),
                     "device_ms": device, "remote_ms": remote, "expected_ms": device + remote})
    return rows
