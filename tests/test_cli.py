"""The CLI through click's CliRunner: export, run, inspect, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from _models import reference_decisions, tiny_inputs, tiny_model  # noqa: E402

from edgeexit.cli import cli  # noqa: E402
from edgeexit.package import load_package  # noqa: E402

THRESHOLDS = ["--threshold", "0.9", "--threshold", "0.7"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.eexit"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(path), "--policy", "confidence",
                                      *THRESHOLDS])
    assert result.exit_code == 0, result.output
    assert "max |onnxruntime - torch|" in result.output and f"wrote {path}" in result.output
    return path


def test_run_npz_with_labels_reports_accuracy_and_writes_results(package, tmp_path):
    x = tiny_inputs(40, seed=5)
    exits, preds, _, _ = reference_decisions(tiny_model(), x, "confidence", [0.9, 0.7])
    labels = preds.copy()
    labels[:10] = (labels[:10] + 1) % 5  # 30 of 40 right
    np.savez(tmp_path / "in.npz", x=x, labels=labels)
    out = tmp_path / "out.npz"
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "in.npz"), "-o", str(out),
                                      "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    assert "accuracy: 75.00% (30/40)" in result.output
    shares = np.bincount(exits, minlength=3) / 40
    assert f"exit 0: {shares[0]:.1%}" in result.output
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["predictions"], preds)
        np.testing.assert_array_equal(saved["exit_index"], exits)
        assert saved["logits"].shape == (40, 5)


def test_run_npy_and_csv_output(package, tmp_path):
    x = tiny_inputs(6, seed=2)
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "in.npy"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()
    assert rows[0] == "predictions,exit_index,scores" and len(rows) == 7
    _, preds, _, _ = reference_decisions(tiny_model(), x, "confidence", [0.9, 0.7])
    assert [int(r.split(",")[0]) for r in rows[1:]] == preds.tolist()


def test_run_threshold_override(package, tmp_path):
    np.save(tmp_path / "in.npy", tiny_inputs(5))
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "in.npy"), "--threshold", "0",
                                      "--threshold", "0"])
    assert result.exit_code == 0, result.output
    assert "exit 0: 100.0%" in result.output


@pytest.mark.parametrize(
    ("make", "code", "fragment"),
    [
        (lambda p: np.save(p / "in.npy", tiny_inputs(3).astype(np.float64)), 2,
         "InputDtypeError: input 'x': expected dtype float32"),
        (lambda p: np.save(p / "in.npy", tiny_inputs(3)[:, 0]), 2, "InputShapeError"),
        (lambda p: np.save(p / "in.npy", tiny_inputs(3)[:0]), 2, "EmptyBatchError"),
        (lambda p: np.savez(p / "in.npy", y=tiny_inputs(3), z=tiny_inputs(3)), 2, "InputFileError"),
        (lambda p: (p / "in.npy").write_text("not numpy"), 2, "InputFileError"),
    ],
)
def test_run_bad_input_is_one_line_without_traceback(package, tmp_path, make, code, fragment):
    make(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "in.npy")])
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_run_missing_package_exit_code(tmp_path):
    np.save(tmp_path / "in.npy", tiny_inputs(2))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.eexit"), str(tmp_path / "in.npy")])
    assert result.exit_code == 3 and "PackageNotFoundError: no exit package at" in result.output


def test_inspect_lists_stages_exits_costs_and_hashes(package):
    result = CliRunner().invoke(cli, ["inspect", str(package)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format version 4" in out and "input x: float32 (batch, 1, 8, 8)" in out
    for stage in ("stage0", "stage1", "stage2", "stage3"):
        assert stage in out
    assert "confidence" in out and "0.9" in out and "0.7" in out and "always" in out
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["files"]["stage0.onnx"]["sha256"][:12] in out
    raw = CliRunner().invoke(cli, ["inspect", str(package), "--manifest"])
    assert json.loads(raw.output) == manifest
    view = json.loads(CliRunner().invoke(cli, ["inspect", str(package), "--json"]).output)
    assert view["schema"] == "edgeexit.inspect/1" and view["machine"]["onnxruntime"]
    assert view["thresholds"] == [0.9, 0.7] and [s["exit"]["state"] for s in view["stages"] if s["exit"]] == [
        "enabled", "enabled", "final"]
    assert view["stages"][0]["sha256"] == manifest["files"]["stage0.onnx"]["sha256"]


def test_one_json_rule_for_run_and_devices(package, tmp_path):
    np.savez(tmp_path / "x.npz", x=tiny_inputs(6), labels=np.zeros(6, dtype=np.int64))
    printed = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "x.npz"), "--json"])
    data = json.loads(printed.stdout)
    assert data["schema"] == "edgeexit.run/1" and data["samples"] == 6 and len(data["exit_index"]) == 6
    assert data["accuracy"] is not None
    written = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "x.npz"), "-o", str(tmp_path / "r.json")])
    assert written.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["predictions"] == data[
        "predictions"]
    shown = json.loads(CliRunner().invoke(cli, ["devices", "--json"]).stdout)
    assert shown["schema"] == "edgeexit.devices/1" and "CPUExecutionProvider" in shown["providers_available"]
    assert {m["name"] for m in shown["meters"]} >= {"rapl", "estimate"}


def test_export_without_thresholds_disables_the_exits_and_refuses_to_overwrite(package, tmp_path):
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(tmp_path / "a.eexit"), "--threshold", "1"])
    assert result.exit_code == 2 and "pass --threshold once per early exit (2 for this model), or none" in result.output
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(tmp_path / "a.eexit")])
    assert result.exit_code == 0 and "stay disabled" in result.output
    assert load_package(tmp_path / "a.eexit").thresholds == [None, None]
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a.eexit")]).output
    assert "early exits: DISABLED" in shown and "ExitSession runs full.onnx" in shown
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(package), *THRESHOLDS])
    assert result.exit_code == 2 and "--force" in result.output


def test_export_zoo_model_needs_weights(tmp_path):
    result = CliRunner().invoke(cli, ["export", "blenet", "-o", str(tmp_path / "b.eexit"), "--threshold", "0.1"])
    assert result.exit_code == 2 and "needs weights" in result.output
    result = CliRunner().invoke(cli, ["export", "lenet", "-o", str(tmp_path / "b.eexit"), "--threshold", "0.1"])
    assert result.exit_code == 2 and "Did you mean 'blenet'?" in result.output


def test_export_zoo_model_from_weights(tmp_path):
    from edgeexit.zoo import blenet

    torch.manual_seed(0)
    torch.save(blenet().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "b.eexit"
    result = CliRunner().invoke(cli, ["export", "blenet", "--weights", str(tmp_path / "w.pt"), "-o", str(out),
                                      "--threshold", "0.05"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["full_model"]["file"] == "full.onnx" and manifest["stages"][0]["exit"]["threshold"] == 0.05


def test_help_and_version():
    assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
    assert "0.1.0" in CliRunner().invoke(cli, ["--version"]).output


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["quickstart", "--epochs", "2", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "full model (onnxruntime)" in result.output and "early exit, stage loop" in result.output
    assert "early exit, compiled" in result.output and "was faster at batch 1 (recorded in the package" in result.output
    assert (tmp_path / "blenet.eexit" / "manifest.json").is_file()


def test_quantize_command_and_export_with_quantize(package, tmp_path):
    x = tiny_inputs(120, seed=8)
    _, preds, _, _ = reference_decisions(tiny_model(), x, "confidence", [0.9, 0.7])
    np.savez(tmp_path / "cal.npz", x=x, labels=preds)
    out = tmp_path / "int8.eexit"
    result = CliRunner().invoke(cli, ["quantize", str(package), "-o", str(out), "--data", str(tmp_path / "cal.npz")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["quantization"]["stages"]] == ["static_qdq"] * 4
    assert manifest["quantization"]["thresholds"]["status"] == "recalibrated"
    shown = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert "quantization: int8" in shown and "thresholds recalibrated" in shown
    exported = tmp_path / "exported-int8.eexit"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(exported), *THRESHOLDS,
                                      "--quantize", "int8", "--data", str(tmp_path / "cal.npz")])
    assert result.exit_code == 0, result.output
    assert json.loads((exported / "manifest.json").read_text())["quantization"]["method"] == "int8"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(tmp_path / "x.eexit"), *THRESHOLDS,
                                      "--quantize", "int8"])
    assert result.exit_code == 2 and "go together" in result.output


def test_export_with_calibrate_data_chooses_the_thresholds_after_exporting(tmp_path):
    x = tiny_inputs(200, seed=4)
    _, preds, _, _ = reference_decisions(tiny_model(), x, "entropy", [1e9, 1e9])
    np.savez(tmp_path / "val.npz", x=x, labels=preds)
    out = tmp_path / "cal.eexit"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(out), "--calibrate-data",
                                      str(tmp_path / "val.npz"), "--max-drop", "1"])
    assert result.exit_code == 0, result.output
    assert "stay disabled" not in result.output and "chosen thresholds" in result.output
    history = load_package(out).calibration["history"]
    assert len(history) == 1 and history[0]["objective"] == {"kind": "max_drop", "value": 0.01, "z": 1.645}
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(tmp_path / "b.eexit"),
                                      "--calibrate-data", str(tmp_path / "missing.npz")])
    assert result.exit_code == 2 and "no such file" in result.output and not (tmp_path / "b.eexit").exists()


def test_every_command_takes_h_and_every_option_has_help():
    for name, command in cli.commands.items():
        result = CliRunner().invoke(cli, [name, "-h"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


def test_user_models_resolve_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from _models import factory as make\n")   # a module of the user's, next to where they run
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", "my_models:make", "-o", str(tmp_path / "m.eexit"),
                                      "--threshold", "0.5", "--threshold", "0.5", "--no-compile"])
    assert result.exit_code == 0, result.output
    assert load_package(tmp_path / "m.eexit").thresholds == [0.5, 0.5]


def test_run_takes_device_threads_and_allow_fallback(package, tmp_path):
    np.savez(tmp_path / "x.npz", x=tiny_inputs(5))
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "x.npz"), "--device", "cpu",
                                      "--threads", "1"])
    assert result.exit_code == 0 and "5 samples" in result.output


def test_export_options_name_opset_tolerances(tmp_path):
    out = tmp_path / "named.eexit"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(out), "--threshold", "0.5",
                                      "--threshold", "0.5", "--name", "mine", "--opset", "17", "--atol", "1e-3",
                                      "--no-compile"])
    assert result.exit_code == 0, result.output
    package = load_package(out)
    assert package.name == "mine" and package.producer["opset"] == 17
    assert "(tolerance 1.0e-03)" in result.output


def test_trained_zoo_weights_are_saved_next_to_the_package(tmp_path):
    out = tmp_path / "b.eexit"
    result = CliRunner().invoke(cli, ["export", "blenet", "--train", "--epochs", "1", "-o", str(out),
                                      "--threshold", "0.1", "--no-compile"])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "b.pt"
    assert weights.is_file() and f"--weights {weights}" in result.output
    again = CliRunner().invoke(cli, ["export", "blenet", "--weights", str(weights), "-o", str(tmp_path / "c.eexit"),
                                     "--threshold", "0.1", "--no-compile"])
    assert again.exit_code == 0, again.output
    assert load_package(out).files["stage0.onnx"]["sha256"] == load_package(tmp_path / "c.eexit").files[
        "stage0.onnx"]["sha256"]


def test_quiet_verbose_and_provider_warnings_as_one_line(package, tmp_path):
    """Progress goes through logging on stderr (-q silences it), results stay on stdout, and a
    provider fallback is one 'warning:' line, not a Python source excerpt."""
    import subprocess

    np.savez(tmp_path / "x.npz", x=tiny_inputs(5))
    run = ["edgeexit", "run", str(package), str(tmp_path / "x.npz")]
    done = subprocess.run([*run, "--device", "cuda", "--allow-fallback"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning: execution provider(s) CUDAExecutionProvider"), warned
    assert "5 samples" in done.stdout and "warnings.warn" not in done.stderr

    out = tmp_path / "q.eexit"
    loud = subprocess.run(["edgeexit", "export", "_models:factory", "-o", str(out), *THRESHOLDS],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    quiet = subprocess.run(["edgeexit", "export", "_models:factory", "-o", str(out), "--force", "-q", *THRESHOLDS],
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "max |onnxruntime - torch|" in loud.stderr and "max |onnxruntime - torch|" not in quiet.stderr
    assert quiet.stderr.strip() == "" and load_package(out).thresholds == [float(t) for t in THRESHOLDS[1::2]]

    both = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "x.npz"), "-q", "-v"])
    assert both.exit_code == 2 and "contradict" in both.output
