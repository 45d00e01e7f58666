"""``edgeexit plan-offload``: the expected latency and bytes of every split point, checked against
an independent computation (numpy, the wire format's layout written out by hand), by hand without
a server, against a real Ray Serve on 127.0.0.1, and bad arguments refused with exit code 2.

The package is ``_models.tiny_model()`` (4 stages, exits after stages 0, 2 and 3) with thresholds
that let samples leave at every exit, as in tests/test_offload.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import cli
from edgeexit.runtime import ExitSession

torch = pytest.importorskip("torch")
_models = pytest.importorskip("_models")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydantic.*", "ignore::DeprecationWarning:ray.*")

TOKEN = "plan-token-0123456789"
HAND = ["--server-ms", "3", "--rtt-ms", "20", "--mbps", "50"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from edgeexit.export import export_package

    model = _models.tiny_model()
    x = _models.tiny_inputs(64, seed=3)
    thresholds = _models.safe_thresholds(model, x, "entropy", [0.3, 0.5])
    folder = tmp_path_factory.mktemp("plan")
    path = folder / "tiny.eexit"
    export_package(model, {"x": torch.from_numpy(_models.tiny_inputs(4))}, path, thresholds=thresholds, log=None)
    np.savez(folder / "val.npz", x=x)
    (folder / "token").write_text(TOKEN + "\n")
    return path, folder / "val.npz", x


def _plan(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["plan-offload", *args, "--repeat", "5", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _request_bytes(carry: dict[str, np.ndarray], k: int) -> int:
    """The wire format written out: 4-byte length, the compact JSON header, the raw tensor bytes."""
    header = {"tensors": [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in carry.items()],
              "meta": {"from_stage": k}}
    return 4 + len(json.dumps(header, separators=(",", ":")).encode()) + sum(a.nbytes for a in carry.values())


def _answer_bytes(classes: int) -> int:
    """The server's answer for one sample: logits (float32), exit index (int64), score (float64)."""
    specs = [{"name": "logits", "dtype": "float32", "shape": [1, classes]},
             {"name": "exit_index", "dtype": "int64", "shape": [1]},
             {"name": "scores", "dtype": "float64", "shape": [1]}]
    meta = {"package": "0" * 64, "batch_requests": 1, "batch_samples": 1, "server_ms": 1.5}
    return 4 + len(json.dumps({"tensors": specs, "meta": meta}, separators=(",", ":"))) + 4 * classes + 8 + 8


def _expected(report: dict) -> tuple[np.ndarray, np.ndarray]:
    """Expected ms and bytes per sample for K = 1 .. stages, computed here from the report's inputs."""
    t = np.array(report["device"]["stage_ms"])
    stages = len(t)
    left_at = np.zeros(stages + 1)
    np.add.at(left_at, np.array(report["exit_stages"]) + 1, report["shares"])   # leaves after its stage
    reach = 1 - np.cumsum(left_at)                                              # reach[k]: still running at k
    net, server = report["network"], report["server"]["answer_ms"]
    ms, sent = [], []
    for row in report["splits"]:
        k = row["from_stage"]
        device = float(np.dot(reach[:k], t[:k]))
        if k == stages:
            ms.append(device)
            sent.append(0.0)
            continue
        size = row["request_bytes"] + row["answer_bytes"]
        per_call = net["rtt_ms"] + (size * 8 / (net["mbps"] * 1e3) if net["mbps"] else 0.0) + server
        ms.append(device + reach[k] * per_call)
        sent.append(reach[k] * size)
    return np.array(ms), np.array(sent)


def test_by_hand_the_figures_follow_from_the_shares_times_and_bytes(files):
    package, val, x = files
    report = _plan(str(package), *HAND, "--data", str(val))
    assert report["schema"] == "edgeexit.plan-offload/1" and report["server"] == {"mode": "given", "answer_ms": 3.0}
    with ExitSession(package) as local:
        reference = local.run(x)
        np.testing.assert_allclose(report["shares"], np.bincount(reference.exit_index, minlength=3) / len(x))
        stages = len(report["device"]["stage_ms"])
        assert [r["from_stage"] for r in report["splits"]] == list(range(1, stages + 1))
        exit_stage = np.array(local.exit_stages)[reference.exit_index]
        for row in report["splits"][:-1]:
            k = row["from_stage"]
            i = int(np.flatnonzero(exit_stage >= k)[0])          # a sample still running at stage k
            carry = local.run_stages(x[i:i + 1], stop=k).carry
            assert row["request_bytes"] == _request_bytes(carry, k)
            assert abs(row["answer_bytes"] - _answer_bytes(reference.logits.shape[1])) <= 12   # server_ms's digits
            np.testing.assert_allclose(row["offload_share"], np.mean(exit_stage >= k))
    ms, sent = _expected(report)
    np.testing.assert_allclose([r["expected_ms"] for r in report["splits"]], ms, rtol=1e-9)
    np.testing.assert_allclose([r["expected_bytes"] for r in report["splits"]], sent, rtol=1e-9)
    best = int(np.argmin(ms))
    assert [r["best"] for r in report["splits"]] == [i == best for i in range(len(ms))]
    assert report["best"] == report["splits"][best]["from_stage"]
    assert report["splits"][-1]["offload_share"] == 0 and report["splits"][-1]["request_bytes"] == 0


def test_a_fast_network_makes_an_early_split_best_and_the_table_marks_it(files):
    package, val, _ = files
    report = _plan(str(package), "--server-ms", "0", "--rtt-ms", "0", "--mbps", "1e9", "--data", str(val))
    assert report["best"] == 1   # sending is free: the device does as little as it can
    result = CliRunner().invoke(cli, ["plan-offload", str(package), "--server-ms", "0", "--rtt-ms", "0", "--mbps",
                                      "1e9", "--data", str(val), "--repeat", "3"])
    assert result.exit_code == 0, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("1 "))
    assert first.rstrip().endswith("*") and "none (all here)" in result.output


def test_without_data_the_calibrated_shares_are_used_and_without_them_it_says_so(files, tmp_path):
    package, _, _ = files
    result = CliRunner().invoke(cli, ["plan-offload", str(package), *HAND, "--repeat", "3"])
    assert result.exit_code == 2 and "no calibrated exit shares" in result.output and "--data" in result.output
    copy = tmp_path / "calibrated.eexit"
    shutil.copytree(package, copy)
    from edgeexit.package import update_manifest

    def change(manifest: dict) -> None:
        manifest["calibration"] = {"history": [{
            "created": "2026-12-01T00:00:00+00:00", "device": "cpu", "previous_thresholds": [0.5, 0.5],
            "previous_policies": ["entropy"] * 3, "policy": "entropy", "thresholds": [0.5, 0.5],
            "objective": {"kind": "max_drop", "value": 0.01}, "method": "exhaustive", "samples": 100,
            "validation_accuracy": 0.9, "full_accuracy": 0.9, "expected_shares": [0.5, 0.25, 0.25],
            "expected_cost": 1.0, "full_cost": 1.0, "cost_unit": "ms", "cost_source": "measured",
            "stage_costs": [1.0, 1.0, 1.0, 1.0]}]}
        manifest["format_version"] = max(manifest["format_version"], 2)

    update_manifest(copy, change)
    report = _plan(str(copy), *HAND)
    assert report["shares"] == [0.5, 0.25, 0.25] and "calibration history" in report["shares_source"]
    assert [r["offload_share"] for r in report["splits"]] == [0.5, 0.5, 0.25, 0.0]
    ms, _ = _expected(report)
    np.testing.assert_allclose([r["expected_ms"] for r in report["splits"]], ms, rtol=1e-9)


@pytest.mark.parametrize(("args", "words"), [
    ([], "either"),
    (["--server-url", "http://127.0.0.1:9", "--token-file", "token", *HAND], "either"),
    (["--server-url", "http://127.0.0.1:9"], "--token-file"),
    (["--server-ms", "3", "--rtt-ms", "20"], "--mbps"),
    (["--server-ms", "3", "--mbps", "50"], "--rtt-ms"),
    (["--server-ms", "3", "--rtt-ms", "20", "--mbps", "0"], "--mbps"),
    (["--server-ms", "-1", "--rtt-ms", "20", "--mbps", "50"], "--server-ms"),
    (["--server-url", "ftp://x", "--token-file", "token"], "http://"),
    ([*HAND, "--data", "missing.npz"], "does not exist"),
    ([*HAND, "-o", "plan.txt"], ".json"),
])
def test_bad_arguments_are_refused_with_exit_code_2(files, args, words):
    package, _, _ = files
    runner = CliRunner()
    with runner.isolated_filesystem():
        Path("token").write_text(TOKEN)
        result = runner.invoke(cli, ["plan-offload", str(package), *args])
    assert result.exit_code == 2 and words in result.output, result.output


def test_an_unreachable_server_is_a_typed_error(files, tmp_path):
    package, val, _ = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "token").write_text(TOKEN)
    result = CliRunner().invoke(cli, ["plan-offload", str(package), "--server-url", f"http://127.0.0.1:{port}",
                                      "--token-file", str(tmp_path / "token"), "--data", str(val)])
    assert result.exit_code == 4 and "OffloadError" in result.output and "/health" in result.output


def test_against_a_real_server_the_answer_time_and_bytes_are_measured(files):
    """A real `edgeexit serve` (Ray Serve, 127.0.0.1) of stages 2..3: about 10 s to start."""
    pytest.importorskip("ray")
    from edgeexit import serve

    package, val, _ = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = serve.start(package, 2, TOKEN, max_batch=4, batch_wait_ms=1, port=port, num_cpus=2)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"})
                if urllib.request.urlopen(request, timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        token = val.parent / "token"
        report = _plan(str(package), "--server-url", url, "--token-file", str(token), "--data", str(val))
        server = report["server"]
        assert server["mode"] == "measured" and server["from_stage"] == 2 and server["calls"] == 5
        assert 0 < server["compute_ms"] < server["answer_ms"] < 5000
        assert server["request_bytes"] == report["splits"][1]["request_bytes"]   # what was really sent
        assert abs(server["answer_bytes"] - report["splits"][1]["answer_bytes"]) < 16
        assert report["network"] == {"rtt_ms": 0.0, "mbps": None}
        ms, _ = _expected(report)
        np.testing.assert_allclose([r["expected_ms"] for r in report["splits"]], ms, rtol=1e-9)
        wrong = val.parent / "wrong-token"
        wrong.write_text("nope\n")
        result = CliRunner().invoke(cli, ["plan-offload", str(package), "--server-url", url, "--token-file",
                                          str(wrong), "--data", str(val)])
        assert result.exit_code == 4 and "401" in result.output
    finally:
        serve.stop()
