"""Offloading B-ResNet on localhost: N simulated devices, early exits on the device, the rest on Ray Serve.

B-ResNet (3 stages, an exit after each) is trained on MNIST-5k and calibrated as in
``bench_mnist.py`` (``_common.prepare``, cached).  N device processes (default 4, each one
onnxruntime thread, batch 1, closed loop: the next sample as soon as the last is answered)
split the test split between them and run it under each scenario:

- ``local``: every device runs the whole package itself (early exits, ``ExitSession``);
- ``local, no exits``: every device runs the full model (``full.onnx``);
- ``split K=1``: the device runs stage 0 and its exit (``OffloadSession``); the samples still
  running go to one Ray Serve replica (stages 1 and 2), with ``max_batch`` 1 and 16, then to
  two replicas;
- ``all to server``: the device runs stage 0 without taking its exit and sends every sample's
  carry (``OffloadSession.send``): what a device that offloads everything after its first
  layers would do (the server cannot run stage 0).

Per scenario: per-device latency p50/p95 (per sample, wall clock on the device), the samples
per second of all devices together and those the server answered, bytes per sample on the wire
(request + answer bodies, all samples counted), and where the samples were answered.

Then what it means for a real network: ``edgeexit plan-offload`` (the same cost model) with the
device's stage times measured alone (batch 1, 1 thread), the server's answer time measured alone
against the ``max_batch 1`` deployment, and the bytes on the wire, for an assumed RTT and
bandwidth (``--rtt-ms 20 --mbps 50``); plus the break-even RTT of each split and how much slower
than this machine's core a device must be for offloading to pay.

Caveat: devices and server share this machine's CPU cores (``machine.cpu_count``), so every
concurrent figure is CPU-contended; the network model uses the figures measured alone.

Usage::

    python benchmarks/bench_offload.py --json benchmarks/results/bench_offload.json
    python benchmarks/bench_offload.py --quick            # smoke run: 50 samples per device
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_EPOCHS, log, machine_info, table, write_json

TOKEN = "bench-offload-token-0123456789"


def _device(args: tuple[str, str, str | None, int, np.ndarray, int], barrier: Any, out: Any) -> None:
    """One simulated device: run its samples one by one and send back per-sample figures."""
    mode, package, url, from_stage, x, warmup = args
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime.offload import Offload, OffloadSession

    client = None
    if mode.startswith("local"):
        session = ExitSession(package, threads=1)
    else:
        assert url is not None
        client = OffloadSession(package, Offload(url, from_stage=from_stage, token=TOKEN, timeout_s=30.0, retries=0,
                                                 fallback=False), threads=1)
        session = client.session
    stages = session._stages

    def one(row: np.ndarray) -> tuple[str, int, int | None]:
        if mode == "local":
            session.run(row)
            return "device", 0, None
        if mode == "local_full":
            session.run_full(row)
            return "device", 0, None
        assert client is not None
        if mode == "split":
            r = client.run(row)
            return str(r.where[0]), r.bytes_sent + r.bytes_received, r.server_batch
        tensors = {session.input_names[0]: row}   # all to server: stages before K without their exits
        for stage in stages[:from_stage]:
            tensors.update(zip(stage.outputs, stage.run(tensors)))
        stats = client.send({name: tensors[name] for name in stages[from_stage - 1].keep_after})
        return "server", stats["bytes_sent"] + stats["bytes_received"], stats["server_batch"]

    for i in range(warmup):
        one(x[i % len(x):i % len(x) + 1])
    barrier.wait()
    rows = []
    start = time.perf_counter()
    for i in range(len(x)):
        t0 = time.perf_counter_ns()
        where, nbytes, batch = one(x[i:i + 1])
        rows.append(((time.perf_counter_ns() - t0) / 1e6, where, nbytes, batch))
    out.put((rows, time.perf_counter() - start))


def run_scenario(name: str, mode: str, package: Path, url: str | None, from_stage: int, parts: list[np.ndarray],
                 warmup: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(parts) + 1), ctx.Queue()
    procs = [ctx.Process(target=_device, args=((mode, str(package), url, from_stage, part, warmup), barrier, out))
             for part in parts]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    results = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=60)
    load = [round(v, 2) for v in os.getloadavg()]
    per_device = []
    every: list[float] = []
    where: dict[str, int] = {}
    nbytes, batches = 0, []
    for rows, _seconds in results:
        ms = np.array([r[0] for r in rows])
        every.extend(ms.tolist())
        per_device.append({"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                           "mean_ms": float(ms.mean()), "samples": len(ms)})
        for r in rows:
            where[r[1]] = where.get(r[1], 0) + 1
            nbytes += r[2]
            if r[3] is not None:
                batches.append(r[3])
    n = len(every)
    all_ms = np.array(every)
    sent = np.array([r[0] for rows, _ in results for r in rows if r[1] != "device"])
    row = {
        "scenario": name, "mode": mode, "devices": len(parts), "samples": n, "wall_s": wall,
        "p50_ms": float(np.percentile(all_ms, 50)), "p95_ms": float(np.percentile(all_ms, 95)),
        "offloaded_p50_ms": float(np.percentile(sent, 50)) if sent.size else None,
        "offloaded_p95_ms": float(np.percentile(sent, 95)) if sent.size else None,
        "worst_device_p95_ms": max(d["p95_ms"] for d in per_device),
        "per_device": per_device, "samples_per_s": n / wall,
        "server_samples_per_s": where.get("server", 0) / wall,
        "shares": {k: v / n for k, v in sorted(where.items())}, "bytes_per_sample": nbytes / n,
        "mean_server_batch": float(np.mean(batches)) if batches else None, "loadavg_after": load,
    }
    log(f"  {name}: p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f} ms, {row['samples_per_s']:.0f} samples/s, "
        f"server {row['server_samples_per_s']:.0f}/s, {row['bytes_per_sample']:.0f} B/sample, {row['shares']}, "
        f"load {load}")
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deploy(package: Path, from_stage: int, replicas: int, max_batch: int, port: int, batch_wait_ms: float) -> str:
    """(Re)deploy the offload server and wait until every replica has the new settings."""
    import json

    from edgeexit import serve

    url = serve.start(package, from_stage, TOKEN, replicas=replicas, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, port=port, num_cpus=4)
    deadline = time.monotonic() + 180
    while True:
        try:
            request = urllib.request.Request(url + "/metadata", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                meta = json.loads(response.read())
            if meta["max_batch"] == max_batch and _replicas() == replicas:
                return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not come up")
        time.sleep(0.5)


def _replicas() -> int:
    from ray import serve

    status = serve.status().applications.get("edgeexit-offload")
    if status is None or str(status.status).split(".")[-1] != "RUNNING":
        return -1
    return sum(count for d in status.deployments.values() for state, count in d.replica_states.items()
               if str(state).split(".")[-1] == "RUNNING")


def network_model(package: Path, data: Path, url: str, rtt_ms: float, mbps: float, repeat: int
                  ) -> dict[str, Any]:
    """``edgeexit plan-offload``'s report (measured alone), and break-even figures for each split."""
    from edgeexit.cli.plan_offload import plan

    report = plan(package, server_url=url, token=TOKEN, server_ms=None, rtt_ms=rtt_ms, mbps=mbps, data_file=data,
                  repeat=repeat)
    t = np.array(report["device"]["stage_ms"])
    rows = report["splits"]
    local = rows[-1]["expected_ms"]
    server_ms = report["server"]["answer_ms"]
    for r in rows[:-1]:
        k, share = r["from_stage"], r["offload_share"]
        saved = local - r["device_ms"]   # what the device no longer runs, per sample
        transfer = (r["request_bytes"] + r["answer_bytes"]) * 8 / (mbps * 1e3)
        r["transfer_ms"] = transfer
        r["break_even_rtt_ms"] = saved / share - server_ms - transfer if share else None
        r["device_slower_to_pay_x"] = share * (rtt_ms + transfer + server_ms) / saved if saved > 0 else None
        r["stages_on_server_ms_here"] = float(t[k:].sum())
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=4, help="simulated device processes (default 4)")
    ap.add_argument("--samples", type=int, default=None, help="samples per device (default 250; --quick 50)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS["bresnet"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="Ray Serve batch wait (default 5)")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="assumed network round trip (default 20)")
    ap.add_argument("--mbps", type=float, default=50.0, help="assumed bandwidth in Mbit/s (default 50)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 samples per device, fewer scenarios")
    ap.add_argument("--json", type=Path, default=None, help="write every number and machine info here")
    args = ap.parse_args(argv)
    per_device = args.samples or (50 if args.quick else 250)
    if args.devices < 1 or per_device < 1:
        ap.error("--devices and --samples must be >= 1")
    from _common import prepare

    machine = machine_info()
    prep = prepare("bresnet", args.epochs, args.seed)
    x = prep.splits.test.x
    rng = np.random.default_rng(args.seed)
    picks = rng.permutation(len(x))[:args.devices * per_device] if args.devices * per_device <= len(x) else \
        rng.integers(0, len(x), args.devices * per_device)
    parts = [np.ascontiguousarray(x[picks[i::args.devices]]) for i in range(args.devices)]
    warmup = 5
    scenarios: list[dict[str, Any]] = []
    log(f"[bresnet] {args.devices} devices x {per_device} samples, package {prep.package}")
    scenarios.append(run_scenario("local (early exits)", "local", prep.package, None, 1, parts, warmup))
    scenarios.append(run_scenario("local, no exits (full.onnx)", "local_full", prep.package, None, 1, parts, warmup))
    from edgeexit import serve

    port = _free_port()
    plans = [(1, 1, "split"), (1, 1, "send_all"), (1, 16, "split"), (1, 16, "send_all"), (2, 16, "split")]
    if not args.quick:
        plans.append((2, 16, "send_all"))
    network = None
    try:
        current: tuple[int, int] | None = None
        for replicas, max_batch, mode in plans:
            if current != (replicas, max_batch):
                log(f"  deploying stages 1.. on {replicas} replica(s), max_batch {max_batch}")
                url = deploy(prep.package, 1, replicas, max_batch, port, args.batch_wait_ms)
                current = (replicas, max_batch)
                if network is None and max_batch == 1 and replicas == 1:
                    with tempfile.TemporaryDirectory() as folder:
                        data = Path(folder) / "test.npz"
                        np.savez(data, image=prep.splits.test.x)
                        network = network_model(prep.package, data, url, args.rtt_ms, args.mbps,
                                                repeat=30 if args.quick else 100)
            label = ("split K=1" if mode == "split" else "all to server") + \
                f", {replicas} replica(s), max_batch {max_batch}"
            row = run_scenario(label, mode, prep.package, url, 1, parts, warmup)
            row.update(replicas=replicas, max_batch=max_batch, batch_wait_ms=args.batch_wait_ms)
            scenarios.append(row)
    finally:
        serve.stop()
    assert network is not None
    report = {
        "benchmark": "bench_offload", "model": "bresnet", "machine": machine,
        "config": {"devices": args.devices, "samples_per_device": per_device, "epochs": args.epochs,
                   "seed": args.seed, "quick": args.quick, "batch_wait_ms": args.batch_wait_ms,
                   "device_threads": 1, "batch": 1, "split": 1, "rtt_ms": args.rtt_ms, "mbps": args.mbps,
                   "threshold": prep.threshold, "calibration": prep.calibration},
        "scenarios": scenarios, "network_model": network,
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(format_report(report))
    if args.json:
        write_json(args.json, report)


def format_report(report: dict[str, Any]) -> str:
    cfg, net = report["config"], report["network_model"]
    head = ["scenario", "p50 ms", "p95 ms", "worst device p95", "offloaded p50", "samples/s", "server samples/s",
            "B/sample", "on device", "server batch"]
    rows = [[s["scenario"], f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['worst_device_p95_ms']:.2f}",
             "" if s["offloaded_p50_ms"] is None else f"{s['offloaded_p50_ms']:.2f}", f"{s['samples_per_s']:.0f}",
             f"{s['server_samples_per_s']:.0f}", f"{s['bytes_per_sample']:.0f}",
             f"{s['shares'].get('device', 0):.1%}",
             "" if s["mean_server_batch"] is None else f"{s['mean_server_batch']:.1f}"] for s in report["scenarios"]]
    lines = [f"B-ResNet, {cfg['devices']} device processes x {cfg['samples_per_device']} samples, batch 1, "
             f"1 thread each, on {report['machine'].get('cpu_count')} CPU cores shared with the server"
             + (" (--quick)" if cfg["quick"] else ""), "", table(head, rows), ""]
    t = net["device"]["stage_ms"]
    lines.append(f"measured alone: device stages {', '.join(f'{v:.3f}' for v in t)} ms; server answer "
                 f"{net['server']['answer_ms']:.2f} ms per request on localhost (its compute "
                 f"{net['server']['compute_ms']:.2f} ms); exit shares "
                 f"{', '.join(f'{s:.1%}' for s in net['shares'])}")
    lines.append(f"over a network of RTT {cfg['rtt_ms']:g} ms and {cfg['mbps']:g} Mbit/s (expected per sample):")
    mrows = []
    for r in net["splits"]:
        last = r["from_stage"] == net["stages"]
        mrows.append(["all on device" if last else f"split K={r['from_stage']}", f"{r['offload_share']:.1%}",
                      f"{r['expected_bytes']:.0f}", f"{r['expected_ms']:.2f}",
                      "" if last else f"{r['break_even_rtt_ms']:.1f}",
                      "" if last or r["device_slower_to_pay_x"] is None else f"{r['device_slower_to_pay_x']:.0f}x"])
    lines.append(table(["option", "sent", "B/sample", "expected ms", "break-even RTT ms", "device slower to pay"],
                       mrows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
