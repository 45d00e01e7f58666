"""The docs run as written: every command and Python block of docs/COMPILE.md, and the exact
manifest of docs/FORMAT.md section 9."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeexit.export import export_package
from edgeexit.zoo import blenet

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding what the docs assume: lenet.eexit and digits.npz (real MNIST-5k digits)."""
    from edgeexit.datasets import mnist5k_splits

    folder = tmp_path_factory.mktemp("docs")
    images = mnist5k_splits(0).test.x[:64]
    torch.manual_seed(0)
    export_package(blenet(), {"image": torch.from_numpy(images[:4])}, folder / "lenet.eexit", thresholds=[2.0],
                   include_full_model=True, log=None)
    np.savez(folder / "digits.npz", image=images)
    return folder


def test_compile_md_commands_run_as_written(workdir):
    assert shutil.which("edgeexit"), "the edgeexit command must be installed (pip install -e .)"
    commands = [line.split("  #")[0].strip() for block in _blocks((DOCS / "COMPILE.md").read_text(), "bash")
                for line in block.splitlines() if line.strip()]
    assert len(commands) >= 4
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert (workdir / "lenet-compiled.onnx").is_file() and (workdir / "lenet-baked.onnx").is_file()


def test_compile_md_python_blocks_run_as_written(workdir):
    blocks = _blocks((DOCS / "COMPILE.md").read_text(), "python")
    assert len(blocks) >= 2
    for code in blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), "each block prints what it shows"


def test_devices_md_run_benchmark_example_runs_as_written(workdir):
    blocks = [b for b in _blocks((DOCS / "DEVICES.md").read_text(), "python") if "run_benchmark" in b]
    assert len(blocks) == 1
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{blocks[0]}\n{done.stdout}\n{done.stderr}"
    assert "vs full: speedup" in done.stdout and "speedup_mean" in done.stdout


def test_format_md_example_is_what_the_exporter_writes(tmp_path):
    text = (DOCS / "FORMAT.md").read_text()
    section = text[text.index("## 9. Example"):]
    documented = json.loads(_blocks(section, "json")[0])
    torch.manual_seed(0)
    package = export_package(blenet(), {"image": torch.randn(4, 1, 28, 28)}, tmp_path / "x.eexit", thresholds=[0.05],
                             labels=[str(i) for i in range(10)], name="blenet", include_full_model=True, log=None)
    written = json.loads((package.root / "manifest.json").read_text())

    def without_versions(m: dict) -> dict:
        # hashes and sizes depend on the torch/onnx versions, producer names them
        m = json.loads(json.dumps(m))
        m.pop("producer")
        for meta in m["files"].values():
            meta.pop("sha256"), meta.pop("size")
        m["compiled"].pop("sources")
        return m

    assert without_versions(written) == without_versions(documented)
    assert list(written) == list(documented)   # same key order
