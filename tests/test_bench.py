"""bench and measure: fixed-duration windows, energy labels, throttling, the CLI commands."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.bench import BenchConfig, describe_speedup, format_table, run_benchmark, split_batches
from edgeexit.cli import cli
from edgeexit.devices.energy import EstimateMeter, ExternalMeter
from edgeexit.devices.thermal import ThrottleMonitor
from edgeexit.errors import InputError
from edgeexit.runtime import ExitSession

FAST = BenchConfig(batch=4, duration_s=0.05, windows=2, warmup_s=0.01)


def _data(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32) * 3}, rng.integers(0, 3, n)


def _quiet_monitor(tmp_path):
    return ThrottleMonitor(tmp_path / "no-thermal", run_command=lambda argv: "", interval_s=None)


def test_benchmark_compares_early_exit_with_the_full_package(tiny_package, tmp_path):
    sess = ExitSession(tiny_package)
    inputs, labels = _data()
    meter = EstimateMeter(10.0, 2.0, source="test figures")
    report = run_benchmark(sess, inputs, labels, FAST, meter, compare_full=True, thermal=_quiet_monitor(tmp_path))
    early, full = (c.summary for c in report.contenders)
    assert early["name"] == "early exit" and full["name"] == "full model (no early exit)"
    # accuracy and shares equal a plain run over the same batches (40 samples, batch 4: all used)
    result = sess.run(inputs["x"])
    assert early["accuracy"] == pytest.approx((result.predictions == labels).mean())
    np.testing.assert_allclose(early["exit_shares"], np.bincount(result.exit_index, minlength=2) / 40)
    full_preds = sess.run(inputs["x"], early_exits=False).predictions
    assert full["accuracy"] == pytest.approx((full_preds == labels).mean())
    for row in (early, full):
        assert row["calls"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["energy_kind"] == "estimated" and "test figures" in row["energy_source"]
        assert 0 < row["energy_per_inference_j"] < 10.0 * FAST.duration_s
    for contender in report.contenders:
        assert len(contender.windows) == 2
        for w in contender.windows:  # the window ran at least its duration, whole batches only
            assert w.energy.seconds >= FAST.duration_s and w.samples % 4 == 0
            assert w.samples == w.latency.calls * 4
    assert report.valid and set(report.ratios()) == {"speedup_p50", "speedup_mean", "energy_ratio"}
    text = format_table(report)
    assert "early exit vs full" in text and "estimated" in text


def test_benchmark_with_a_separate_full_model_file(tiny_package, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = np.ones((4, 3), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "full",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "full.onnx")
    inputs, labels = _data()
    report = run_benchmark(ExitSession(tiny_package), inputs, labels, FAST, EstimateMeter(1.0, source="t"),
                           compare_full=True, full_model=tmp_path / "full.onnx", thermal=_quiet_monitor(tmp_path))
    full = report.contenders[1].summary
    assert full["name"] == "full model (one graph)"
    assert full["accuracy"] == pytest.approx(((inputs["x"] @ w).argmax(1) == labels).mean())


def test_a_throttled_run_is_marked_invalid(tiny_package, tmp_path):
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("95000\n")
    (zone / "trip_point_0_temp").write_text("85000\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    monitor = ThrottleMonitor(tmp_path / "thermal", run_command=lambda argv: "throttled=0x0\n", interval_s=None)
    inputs, labels = _data()
    report = run_benchmark(ExitSession(tiny_package), inputs, labels, FAST, EstimateMeter(1.0, source="t"),
                           thermal=monitor)
    assert not report.valid and report.to_dict()["valid"] is False
    assert "INVALID RUN" in format_table(report)


def test_measured_meter_figures_are_labelled_measured(tiny_package, tmp_path):
    # an external meter command that prints a constant 4 W: real sampling and integration
    meter = ExternalMeter(command="echo 4.0", interval_s=0.01)
    inputs, labels = _data()
    report = run_benchmark(ExitSession(tiny_package), inputs, labels,
                           BenchConfig(batch=1, duration_s=0.2, windows=1, warmup_s=0.0), meter,
                           thermal=_quiet_monitor(tmp_path))
    row = report.contenders[0].summary
    assert row["energy_kind"] == "measured" and "echo 4.0" in row["energy_source"]
    window = report.contenders[0].windows[0]
    assert window.energy.joules == pytest.approx(4.0 * window.energy.seconds, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"batch": 0}, "batch >= 1"), ({"windows": 0}, "windows >= 1"), ({"duration_s": 0}, "duration > 0")],
)
def test_bad_bench_config(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        BenchConfig(**kwargs)


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(InputError, match="larger than the 3 samples"):
        split_batches({"x": np.zeros((3, 4), np.float32)}, 4)


def test_measure_context_reports_latency_and_energy(tiny_package):
    sess = ExitSession(tiny_package)
    x = _data(8)[0]["x"]
    meter = EstimateMeter(8.0, 1.0, source="unit test")
    with sess.measure(meter) as m:
        for _ in range(5):
            sess.run(x)
        sess.run(x[:1])
    assert m.calls == 6 and m.samples == 41 and m.latency_ms >= m.inference_ms > 0
    busy, wall = m.inference_ms / 1e3, m.latency_ms / 1e3
    assert m.energy_kind == "estimated" and "unit test" in m.energy_source
    assert m.energy_j == pytest.approx(8.0 * busy + 1.0 * (wall - busy), rel=0.05)
    assert m.energy_per_inference_j == pytest.approx(m.energy_j / 41)
    sess.run(x)  # outside the block: not counted
    assert m.calls == 6
    with sess.measure() as default:  # the profile's meter: the estimate on a machine without sensors
        sess.run(x)
    assert default.energy_kind in ("measured", "estimated") and default.calls == 1


def test_bench_cli_writes_json_and_csv(tiny_package, tmp_path):
    inputs, labels = _data()
    np.savez(tmp_path / "d.npz", x=inputs["x"], labels=labels)
    result = CliRunner().invoke(cli, [
        "bench", str(tiny_package), "--data", str(tmp_path / "d.npz"), "--device", "cpu", "--duration", "0.05",
        "--windows", "1", "--warmup", "0", "--meter", "estimate",   # --compare full is the default
        "-o", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    assert re.search(r"early exit vs full model: \d\.\d\dx (faster|slower)", result.output), result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema"] == "edgeexit.bench/1" and data["machine"]["edgeexit"]
    assert data["environment"]["profile"] == "cpu" and data["environment"]["providers"] == ["CPUExecutionProvider"]
    assert data["environment"]["threads"] == 1 and data["environment"]["onnxruntime"]
    assert [c["name"] for c in data["contenders"]] == ["early exit", "full model (no early exit)"]
    rows = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    assert [r["name"] for r in rows] == ["early exit", "full model (no early exit)"]
    shares = data["contenders"][0]["exit_shares"]
    assert len(shares) == 2 and [float(rows[0][f"exit_share_{e}"]) for e in range(2)] == pytest.approx(shares, abs=1e-6)
    assert rows[1]["exit_share_0"] == rows[1]["exit_share_1"] == ""      # the full model has no exits
    assert "exit_shares" not in rows[0]


def test_bench_compare_none_measures_the_package_alone(tiny_package, tmp_path):
    inputs, labels = _data()
    np.savez(tmp_path / "d.npz", x=inputs["x"], labels=labels)
    result = CliRunner().invoke(cli, [
        "bench", str(tiny_package), "--data", str(tmp_path / "d.npz"), "--device", "cpu", "--duration", "0.05",
        "--windows", "1", "--warmup", "0", "--compare", "none", "--meter", "estimate", "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [c["name"] for c in data["contenders"]] == ["early exit"] and data["ratios"] is None


@pytest.mark.parametrize(("ratio", "words"), [(1.25, "1.25x faster"), (1.0, "1.00x faster"),
                                              (0.5, "2.00x slower (0.50x)"), (0.8, "1.25x slower (0.80x)")])
def test_speedups_are_worded_without_faster_below_one(ratio, words):
    assert describe_speedup(ratio) == words


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([], "exactly one of --data"), (["--dataset", "mnist5k", "--data", "x.npz"], "exactly one of --data"),
     (["--dataset", "mnist5k", "--device", "rpi"], "Did you mean")],
)
def test_bench_cli_usage_errors(tiny_package, args, fragment):
    result = CliRunner().invoke(cli, ["bench", str(tiny_package), *args])
    assert result.exit_code == 2 and fragment in result.output


def test_devices_cli_lists_profile_providers_and_meters():
    result = CliRunner().invoke(cli, ["devices"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "detected:" in out and "providers available:" in out and "CPUExecutionProvider" in out
    for meter in ("rapl", "nvml", "jetson", "rpi5", "external", "estimate"):
        assert f" {meter}" in out
    result = CliRunner().invoke(cli, ["devices", "--device", "cuda"])
    assert "CUDAExecutionProvider (MISSING)" in result.output


def test_compare_full_uses_the_packages_own_full_graph(tmp_path):
    torch = pytest.importorskip("torch")
    from _models import tiny_inputs, tiny_model

    from edgeexit.export import export_package

    path = tmp_path / "with-full.eexit"
    export_package(tiny_model(), {"x": torch.from_numpy(tiny_inputs(4))}, path, thresholds=[0.5, 0.5],
                   include_full_model=True, log=None)
    x = tiny_inputs(40, seed=2)
    labels = np.zeros(40, dtype=np.int64)
    report = run_benchmark(ExitSession(path), {"x": x}, labels, FAST, EstimateMeter(1.0, source="t"),
                           compare_full=True, thermal=_quiet_monitor(tmp_path))
    full = report.contenders[1].summary
    assert full["name"] == "full model (one graph)"
    want = (ExitSession(path).run_full(x).argmax(1) == labels).mean()
    assert full["accuracy"] == pytest.approx(want)


def test_external_meter_needs_a_log_or_command(tiny_package):
    result = CliRunner().invoke(cli, ["bench", str(tiny_package), "--dataset", "mnist5k", "--meter", "external"])
    assert result.exit_code == 2 and "--meter-log" in result.output and "Traceback" not in result.output
