"""One output rule for every command (README, "Machine-readable output"): with --json, stdout is one
JSON object and nothing else; -o names a file whose suffix the command writes, checked before any
work; an existing output is replaced only with --force (exit 2); a closed pipe is not an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from _models import tiny_inputs

from edgeexit.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "tiny.eexit"
    done = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(path), "--threshold", "0.9",
                                    "--threshold", "0.7", "--policy", "confidence"])
    assert done.exit_code == 0, done.output
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "x.npz"
    np.savez(path, x=tiny_inputs(48, seed=3), labels=np.random.default_rng(0).integers(0, 3, 48))
    return path


def _json_commands(package: Path, data: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "run": ["run", str(package), str(data), "--json", "-o", str(tmp / "r.npz")],
        "inspect": ["inspect", str(package), "--json", "-o", str(tmp / "i.json")],
        "devices": ["devices", "--json", "-o", str(tmp / "d.json")],
        "bench": ["bench", str(package), "--data", str(data), "--json", "--csv", str(tmp / "b.csv"), "-o",
                  str(tmp / "b.json"), "--duration", "0.05", "--windows", "1", "--warmup", "0",
                  "--idle-seconds", "0"],
        "calibrate": ["calibrate", str(package), "--data", str(data), "--max-drop", "5", "--dry-run", "--flops",
                      "--json", "-o", str(tmp / "c.json")],
    }


@pytest.mark.parametrize("command", ["run", "inspect", "devices", "bench", "calibrate"])
def test_every_json_command_prints_one_json_object_and_writes_the_rest_to_stderr(package, data, tmp_path, command):
    got = CliRunner().invoke(cli, _json_commands(package, data, tmp_path)[command])
    assert got.exit_code == 0, got.output
    printed = json.loads(got.stdout)   # stdout is exactly one JSON object: no "wrote ..." after it
    assert printed["schema"] == f"edgeexit.{command}/1"
    assert printed["created"] and printed["machine"]["onnxruntime"]
    assert "wrote" in got.stderr
    written = list(tmp_path.iterdir())
    assert written, "the -o/--csv files were written"
    for f in written:
        if f.suffix == ".json":
            assert json.loads(f.read_text())["schema"] == f"edgeexit.{command}/1"


@pytest.mark.parametrize("args, suffixes", [
    (["run", "{pkg}", "{data}", "-o", "{tmp}/r.txt"], ".npz, .csv, .json"),
    (["bench", "{pkg}", "--data", "{data}", "-o", "{tmp}/b.csv"], ".json"),
    (["bench", "{pkg}", "--data", "{data}", "--csv", "{tmp}/b.json"], ".csv"),
    (["inspect", "{pkg}", "-o", "{tmp}/i.txt"], ".json"),
    (["devices", "-o", "{tmp}/d.yaml"], ".json"),
    (["calibrate", "{pkg}", "--data", "{data}", "--max-drop", "1", "-o", "{tmp}/c.txt"], ".json"),
    (["compile", "{pkg}", "-o", "{tmp}/c.txt"], ".onnx"),
])
def test_an_output_the_command_cannot_write_is_refused_before_any_work(package, data, tmp_path, args, suffixes):
    argv = [a.format(pkg=package, data=data, tmp=tmp_path) for a in args]
    got = CliRunner().invoke(cli, argv)
    assert got.exit_code == 2, got.output
    assert suffixes in got.output
    assert not list(tmp_path.iterdir())


def test_missing_parent_folders_are_created_for_every_output(package, data, tmp_path):
    for argv, made in (
        (["run", str(package), str(data), "-o", str(tmp_path / "a" / "r.csv")], tmp_path / "a" / "r.csv"),
        (["inspect", str(package), "-o", str(tmp_path / "b" / "i.json")], tmp_path / "b" / "i.json"),
        (["compile", str(package), "-o", str(tmp_path / "c" / "m.onnx")], tmp_path / "c" / "m.onnx"),
        (["pack", str(package), "-o", str(tmp_path / "d" / "p.eexit.zip")], tmp_path / "d" / "p.eexit.zip"),
        (["export", "_models:factory", "-o", str(tmp_path / "e" / "m.eexit")], tmp_path / "e" / "m.eexit"),
    ):
        got = CliRunner().invoke(cli, argv)
        assert got.exit_code == 0, (argv, got.output)
        assert made.exists()


def test_an_existing_output_needs_force_everywhere(package, data, tmp_path):
    onnx_file, packed = tmp_path / "m.onnx", tmp_path / "p.eexit.zip"
    onnx_file.write_bytes(b"old")
    packed.write_bytes(b"old")
    for argv in (["compile", str(package), "-o", str(onnx_file)], ["pack", str(package), "-o", str(packed)],
                 ["quantize", str(package), "-o", str(package), "--data", str(data)],
                 ["export", "_models:factory", "-o", str(package)]):
        got = CliRunner().invoke(cli, argv)
        assert got.exit_code == 2 and "--force" in got.output, (argv, got.output)
    assert onnx_file.read_bytes() == b"old" and packed.read_bytes() == b"old"
    got = CliRunner().invoke(cli, ["compile", str(package), "-o", str(onnx_file), "--force"])
    assert got.exit_code == 0 and onnx_file.read_bytes()[:3] != b"old"


def test_a_closed_pipe_is_not_an_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = f"{sys.executable} -m edgeexit devices --json | head -c 20 > /dev/null; echo ${{PIPESTATUS[0]}}"
    # enough output that the writer still writes after the reader left
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "0", done
    assert "Error" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr


def test_plot_without_matplotlib_fails_before_calibrating(package, data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    got = CliRunner().invoke(cli, ["calibrate", str(package), "--data", str(data), "--max-drop", "1",
                                   "--plot", str(tmp_path / "f.png")])
    assert got.exit_code == 6 and "matplotlib" in got.output and "samples, policy" not in got.output
