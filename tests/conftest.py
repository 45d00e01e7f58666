"""Shared fixtures: a tiny, valid exit package built without torch.

The package has two stages::

    stage0.onnx:  x [batch, 4] --Identity--> carry0_0 [batch, 4]
                  x [batch, 4] --MatMul W0--> logits0 [batch, 3]
    stage1.onnx:  carry0_0 [batch, 4] --MatMul W1--> logits1 [batch, 3]

Graphs are built with ``onnx.helper`` (imported lazily, so a runtime-only install
without onnx still collects every other test) and written with
``edgeexit.package.write_package``, exactly as the exporter does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeexit.package import write_package

TINY_OPSET = 17
TINY_IR_VERSION = 8  # old enough for every onnxruntime that edgeexit supports

# Fixed weights: W0 makes stage 0 confident when x is large and one-hot-ish.
TINY_W0 = np.array(
    [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [1.0, 1.0, 1.0]], dtype=np.float32
)
TINY_W1 = np.array(
    [[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [-1.0, 0.0, 1.5], [0.25, 0.25, 0.25]], dtype=np.float32
)

TINY_MANIFEST: dict[str, Any] = {
    "format": "edgeexit",
    "format_version": 1,
    "kind": "classifier",
    "name": "Tiny",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
    "labels": ["a", "b", "c"],
    "stages": [
        {
            "name": "stage0",
            "file": "stage0.onnx",
            "inputs": ["x"],
            "carry": ["carry0_0"],
            "exit": {"logits": "logits0", "policy": "entropy", "threshold": 0.5},
            "cost": {"params": 12, "flops": 24, "exit_flops": 24},
        },
        {
            "name": "stage1",
            "file": "stage1.onnx",
            "inputs": ["carry0_0"],
            "carry": [],
            "exit": {"logits": "logits1", "policy": "entropy", "threshold": None},
            "cost": {"params": 12, "flops": 24, "exit_flops": 24},
        },
    ],
    "full_model": None,
    "preprocessing": None,
    "producer": {
        "edgeexit": "0.1.0", "torch": "none", "onnx": "test", "onnxruntime": "test",
        "opset": TINY_OPSET, "exporter": "onnx.helper",
    },
}


def _stage_model(stage: int) -> Any:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def value(name: str, width: int) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])

    if stage == 0:
        nodes = [
            helper.make_node("Identity", ["x"], ["carry0_0"]),
            helper.make_node("MatMul", ["x", "W0"], ["logits0"]),
        ]
        graph = helper.make_graph(
            nodes, "stage0", [value("x", 4)], [value("carry0_0", 4), value("logits0", 3)],
            initializer=[numpy_helper.from_array(TINY_W0, "W0")],
        )
    else:
        nodes = [helper.make_node("MatMul", ["carry0_0", "W1"], ["logits1"])]
        graph = helper.make_graph(
            nodes, "stage1", [value("carry0_0", 4)], [value("logits1", 3)],
            initializer=[numpy_helper.from_array(TINY_W1, "W1")],
        )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], producer_name="edgeexit-tests"
    )
    model.ir_version = TINY_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_sources(folder: Path) -> dict[str, Path]:
    """Write the two stage graphs into ``folder``; returns ``{file name: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in (0, 1):
        path = folder / f"stage{k}.onnx"
        path.write_bytes(_stage_model(k).SerializeToString())
        out[path.name] = path
    return out


@pytest.fixture(scope="module")
def torch_one_thread() -> Any:
    """torch on one thread for a module: small models on a shared machine run faster and
    bit-for-bit reproducibly.  Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_manifest() -> dict[str, Any]:
    """A fresh copy of the tiny package's manifest (without the ``files`` table)."""
    return copy.deepcopy(TINY_MANIFEST)


@pytest.fixture
def tiny_sources(tmp_path: Path) -> dict[str, Path]:
    """``{file name: path}`` of the tiny package's stage graphs, outside any package."""
    return write_tiny_sources(tmp_path / "sources")


@pytest.fixture
def tiny_package_factory(
    tmp_path: Path, tiny_sources: dict[str, Path]
) -> Callable[..., Path]:
    """``make(name="tiny.eexit", change=None)``: write a tiny package under ``tmp_path``.

    ``change(manifest)`` may edit the manifest in place before it is written (it must
    stay valid: ``write_package`` refuses manifests that it could not read back).
    """

    def make(name: str = "tiny.eexit", change: Callable[[dict[str, Any]], None] | None = None) -> Path:
        manifest = copy.deepcopy(TINY_MANIFEST)
        if change is not None:
            change(manifest)
        return write_package(tmp_path / name, manifest, tiny_sources)

    return make


@pytest.fixture
def tiny_package(tiny_package_factory: Callable[..., Path]) -> Path:
    """Path of a valid two-stage exit package (entropy policy, threshold 0.5)."""
    return tiny_package_factory()
