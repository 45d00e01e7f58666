"""``edgeexit plan-offload``: where to split a package between this device and a server.

Measures the stage times here (batch 1, ``ExitSession``, 1 thread), the bytes one sample costs
on the wire at each split point K (``edgeexit.runtime.wire``), and the server's answer time
(against a running ``edgeexit serve``, or given by hand), then prints the expected latency and
bytes per sample for every K with the package's exit shares (``runtime.offload.split_costs``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import click

from .._logging import logging_options
from ._shared import check_outputs, check_suffix, classifier_only, emit_json


@click.command("plan-offload")
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--server-url", help="A running `edgeexit serve` of this package: its answer time is measured "
              "(from here, so it includes the network between here and the server).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --server-url: the file whose first line is the bearer token.")
@click.option("--server-ms", type=click.FloatRange(min=0), help="The server's answer time per request, by hand "
              "(instead of --server-url).")
@click.option("--rtt-ms", type=click.FloatRange(min=0), help="Network round-trip time (needed with --server-ms; "
              "with --server-url added on top of the measured time, default 0).")
@click.option("--mbps", type=click.FloatRange(min=0, min_open=True), help="Network bandwidth in Mbit/s, both "
              "ways (needed with --server-ms; with --server-url added on top, default: free).")
@click.option("--data", "data_file", type=click.Path(path_type=Path),
              help=".npy/.npz inputs: the exit shares are measured on them at the package's thresholds (default: "
                   "the shares of the package's calibration), and the stages are timed on them.")
@click.option("--repeat", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed batch-1 calls per stage (and requests to the server).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout.")
@click.option("-o", "--output", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON to this file (.json).")
def plan_offload(package: Path, server_url: str | None, token_file: Path | None, server_ms: float | None,
                 rtt_ms: float | None, mbps: float | None, data_file: Path | None, repeat: int, as_json: bool,
                 json_out: Path | None) -> None:
    """Expected latency and bytes per sample of PACKAGE for every split point K (stages before K here,
    the rest on a server), against running it all here.

    Give the server either as --server-url URL --token-file F (measured), or as --server-ms MS
    --rtt-ms MS --mbps MBPS (by hand).
    """
    if (server_url is None) == (server_ms is None):
        raise click.UsageError("give the server either as --server-url URL --token-file F (measured) or as "
                               "--server-ms MS --rtt-ms MS --mbps MBPS (by hand), not both and not neither")
    if server_url is not None and token_file is None:
        raise click.UsageError("--server-url needs --token-file F (the bearer token on its first line)")
    if server_ms is not None and (token_file is not None or rtt_ms is None or mbps is None):
        raise click.UsageError("--server-ms needs --rtt-ms and --mbps (and takes no --token-file)")
    if server_url is not None and not server_url.startswith(("http://", "https://")):
        raise click.UsageError(f"--server-url {server_url!r} must start with http:// or https://")
    check_outputs(json_out)
    check_suffix(json_out, (".json",))
    classifier_only(package, "plan-offload")
    token = _token(token_file) if token_file is not None else None
    report = plan(package, server_url=server_url, token=token, server_ms=server_ms, rtt_ms=rtt_ms, mbps=mbps,
                  data_file=data_file, repeat=repeat)
    if not as_json:
        click.echo(format_plan(report))
    emit_json("plan-offload", report, as_json, json_out)


def _token(path: Path) -> str:
    from ..errors import InputError, InputFileError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read the token file {path}: {exc}") from None
    if not lines or not lines[0].strip():
        raise InputError(f"the token file {path} is empty; put the bearer token on its first line")
    return lines[0].strip()


def plan(package: Path, *, server_url: str | None, token: str | None, server_ms: float | None,
         rtt_ms: float | None, mbps: float | None, data_file: Path | None, repeat: int) -> dict[str, Any]:
    """Measure and model every split point (see the module's doc); the JSON payload."""
    import numpy as np

    from ..datafiles import load_input_file
    from ..errors import InputError
    from ..runtime import ExitSession
    from ..runtime._engines import calibrated_shares
    from ..runtime._inputs import synthetic_inputs
    from ..runtime.offload import message_bytes, split_costs

    with ExitSession(package, threads=1) as session:
        stages = session._stages
        if any(p.step is not None for p in session._default_plan.policies):
            raise InputError(f"policies {session.package.policies}: a stateful policy cannot be offloaded")
        if len(stages) < 2:
            raise InputError(f"{package} has one stage: there is no split point")
        if data_file is not None:
            feeds, _labels = load_input_file(data_file, session.input_names)
            n = len(next(iter(feeds.values())))
            if n == 0:
                raise InputError(f"{data_file} holds no samples")
            exits = np.concatenate([session.run({k: v[i:i + 256] for k, v in feeds.items()}).exit_index
                                    for i in range(0, n, 256)])
            shares = (np.bincount(exits, minlength=session.num_exits) / n).tolist()
            shares_source = f"measured on {data_file} ({n} samples, the package's thresholds)"
        else:
            calibrated = calibrated_shares(session.package)
            if calibrated is None:
                raise InputError(f"{package} has no calibrated exit shares (its calibration history has none): "
                                 "pass --data VAL.npz to measure them, or calibrate it with `edgeexit calibrate`")
            shares, shares_source = calibrated, "the package's calibration history (expected_shares)"
            feeds, n = synthetic_inputs(session.package.inputs, min(repeat, 64)), min(repeat, 64)
        stage_ms, carries, classes = _time_stages(session, feeds, n, repeat)
        wire_bytes = {k: message_bytes(carries[k], k, classes, session._logits_dtype) for k in carries}
        server: dict[str, Any]
        if server_url is not None:
            server = _measure_server(package, server_url, token, carries, repeat)
            answer_ms = server["answer_ms"]
            if wire_bytes[server["from_stage"]][0] != server["request_bytes"]:   # the model's bytes are the real ones
                raise InputError(f"the request at K={server['from_stage']} was {server['request_bytes']} bytes, "
                                 f"the plan says {wire_bytes[server['from_stage']][0]}")
        else:
            assert server_ms is not None
            server, answer_ms = {"mode": "given", "answer_ms": server_ms}, server_ms
        rows = split_costs(stage_ms, session.exit_stages, shares, wire_bytes, server_ms=answer_ms,
                           rtt_ms=rtt_ms or 0.0, mbps=mbps)
        best = min(rows, key=lambda r: r["expected_ms"])
        for row in rows:
            row["best"] = row is best
        return {
            "package": str(package), "name": session.package.name, "stages": len(stages),
            "exit_stages": list(session.exit_stages), "thresholds": list(session.package.thresholds),
            "shares": shares, "shares_source": shares_source,
            "device": {"stage_ms": stage_ms, "calls_per_stage": repeat, "batch": 1, "threads": 1,
                       "inputs": str(data_file) if data_file is not None else "synthetic (the package's shapes)",
                       "statistic": "median"},
            "server": server, "network": {"rtt_ms": rtt_ms or 0.0, "mbps": mbps},
            "splits": rows, "best": best["from_stage"],
        }


def _time_stages(session: Any, feeds: dict[str, Any], n: int, repeat: int
                 ) -> tuple[list[float], dict[int, dict[str, Any]], int]:
    """Median ms of each stage at batch 1 with every stage run (no exit taken), the one-sample carry
    entering each split point K, and the number of classes of the last exit."""
    import numpy as np

    stages = session._stages
    times: list[list[float]] = [[] for _ in stages]
    carries: dict[int, dict[str, Any]] = {}
    classes = 0
    for call in range(repeat + 3):   # 3 untimed warm-up calls
        row = {k: np.ascontiguousarray(v[call % n:call % n + 1]) for k, v in feeds.items()}
        tensors, _ = session._checker.feeds(row)
        tensors = dict(tensors)
        for k, stage in enumerate(stages):
            t0 = perf_counter_ns()
            outs = stage.run(tensors)
            took = (perf_counter_ns() - t0) / 1e6
            if call >= 3:
                times[k].append(took)
            tensors.update(zip(stage.outputs, outs))
            if k + 1 < len(stages) and k + 1 not in carries:
                carries[k + 1] = {name: _numpy(tensors[name]) for name in stage.keep_after}
            if stage.exit_number is not None:
                classes = int(_numpy(outs[stage.logits_pos]).shape[-1])
    return [statistics.median(t) for t in times], carries, classes


def _numpy(value: Any) -> Any:
    return value.numpy() if hasattr(value, "numpy") else value


def _measure_server(package: Path, url: str, token: str | None, carries: dict[int, dict[str, Any]],
                    repeat: int) -> dict[str, Any]:
    """The served split (GET /health) and the median wall time of POST /infer with one sample's carry."""
    import urllib.error
    import urllib.request

    from ..errors import OffloadError
    from ..runtime.offload import _NO_PROXY, Offload, OffloadSession

    base = url.rstrip("/")
    request = urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {token}"})
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            health = json.loads(response.read(64 * 1024))
    except urllib.error.HTTPError as exc:
        raise OffloadError(f"{base}/health answered {exc.code}: {exc.read(300).decode('utf-8', 'replace').strip()}"
                           ) from None
    except (OSError, ValueError) as exc:
        raise OffloadError(f"{base}/health: {getattr(exc, 'reason', exc)}") from None
    k = health.get("from_stage") if isinstance(health, dict) else None
    if not isinstance(k, int) or k not in carries:
        raise OffloadError(f"{base}/health does not name a split of this package: {str(health)[:200]}")
    client = OffloadSession(package, Offload(base, from_stage=k, token=token, timeout_s=10.0, retries=0,
                                             fallback=False), threads=1)
    if health.get("package") != client.package_hash:
        raise OffloadError(f"{base} serves package {health.get('package')!r}, not {client.package_hash} ({package})")
    wall, compute = [], []
    for call in range(repeat + 3):
        stats = client.send(carries[k])
        if call >= 3:
            wall.append(stats["network_ms"])
            if stats["server_ms"] is not None:
                compute.append(float(stats["server_ms"]))
    return {"mode": "measured", "url": base, "from_stage": k, "answer_ms": statistics.median(wall),
            "answer_ms_p95": float(sorted(wall)[min(len(wall) - 1, int(0.95 * len(wall)))]),
            "compute_ms": statistics.median(compute) if compute else None, "calls": repeat,
            "request_bytes": stats["bytes_sent"], "answer_bytes": stats["bytes_received"]}


def format_plan(report: dict[str, Any]) -> str:
    """The plan as a text table, the best split marked."""
    server, net = report["server"], report["network"]
    if server["mode"] == "measured":
        where = (f"server {server['url']} (serves K={server['from_stage']}): {server['answer_ms']:.2f} ms per request "
                 f"(median of {server['calls']}, measured from here; its own compute {server['compute_ms']:.2f} ms)")
    else:
        where = f"server: {server['answer_ms']:g} ms per request (given)"
    bw = "free" if net["mbps"] is None else f"{net['mbps']:g} Mbit/s"
    lines = [
        f"{report['name']}: {report['stages']} stages, exits after stages {report['exit_stages']}",
        "device stage times (ms, batch 1, 1 thread, median): " + ", ".join(f"{t:.3f}" for t in
                                                                           report["device"]["stage_ms"]),
        "exit shares: " + ", ".join(f"{s:.1%}" for s in report["shares"]) + f"  ({report['shares_source']})",
        where + f"; network: RTT {net['rtt_ms']:g} ms, {bw}",
        "",
    ]
    headers = ["split K", "on device", "sent", "bytes/sent sample", "bytes/sample", "device ms", "network+server ms",
               "expected ms", "best"]
    rows = []
    for r in report["splits"]:
        label = f"{r['from_stage']}" if r["from_stage"] < report["stages"] else "none (all here)"
        rows.append([label, f"{r['device_share']:.1%}", f"{r['offload_share']:.1%}",
                     f"{r['request_bytes']}+{r['answer_bytes']}" if r["request_bytes"] else "0",
                     f"{r['expected_bytes']:.0f}", f"{r['device_ms']:.3f}", f"{r['remote_ms']:.3f}",
                     f"{r['expected_ms']:.3f}", "*" if r["best"] else ""])
    lines.append(_table(headers, rows))
    lines.append("bytes: request + answer bodies of one sample (HTTP and TCP/IP headers not counted); "
                 "expected: per sample, over the exit shares")
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
                               ).rstrip() for r in [headers, ["-" * w for w in widths], *rows])
