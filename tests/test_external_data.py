"""A package's graphs hold every byte themselves: a tensor stored in another file (inside the
package but unlisted, or anywhere else) is refused with a package error before any session is
built.  The wire-format scanner is checked against onnx's own walk over every tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import TINY_MANIFEST, write_tiny_sources
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, set_external_data, uses_external_data

from edgeexit._onnx_scan import ScanError, external_locations
from edgeexit.cli import cli
from edgeexit.errors import UnsafePathError
from edgeexit.package import load_package, write_package
from edgeexit.runtime import ExitSession


def _onnx_view(model: onnx.ModelProto) -> list[str]:
    """Independent reference: onnx's own walk over initializers and attribute tensors, subgraphs included."""
    out = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            out.append(next((e.value for e in t.external_data if e.key == "location"), "?"))
    return sorted(out)


def _with_external_stage(tmp_path: Path, location: str, write_file: bool) -> Path:
    sources = write_tiny_sources(tmp_path / "src")
    model = onnx.load(str(sources["stage1.onnx"]))
    tensor = model.graph.initializer[0]
    data = numpy_helper.to_array(tensor).tobytes()
    if write_file:
        (tmp_path / "src" / location).write_bytes(data)
    set_external_data(tensor, location=location, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    onnx.save_model(model, str(sources["stage1.onnx"]))
    assert _onnx_view(model) == [location] == external_locations(sources["stage1.onnx"].read_bytes())
    path = tmp_path / "ext.eexit"
    write_package(path, copy.deepcopy(TINY_MANIFEST), sources)
    if write_file:   # the weights lie inside the package folder, but the manifest does not list them
        (path / location).write_bytes(data)
    return path


@pytest.mark.parametrize(("location", "write_file"), [("weights.bin", True), ("../../etc/hostname", False)],
                         ids=["unlisted-file-inside", "path-outside"])
def test_external_data_is_refused_before_any_session(tmp_path, location, write_file):
    path = _with_external_stage(tmp_path, location, write_file)
    assert load_package(path).files       # sizes and hashes of the listed files still match
    with pytest.raises(UnsafePathError, match="packages refuse external data"):
        ExitSession(path)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 4), np.float32))
    result = CliRunner().invoke(cli, ["run", str(path), str(x)])
    assert result.exit_code == 3 and "UnsafePathError" in result.output and "Traceback" not in result.output


def test_the_scanner_finds_external_tensors_in_subgraphs_and_attributes():
    def external(name: str, location: str) -> TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], np.zeros(1, np.float32).tobytes(), raw=True)
        set_external_data(t, location=location)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        return t

    then_graph = helper.make_graph([helper.make_node("Constant", [], ["c"], value=external("c", "inner.bin"))],
                                   "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["w"], ["c2"])], "else", [],
                                   [helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        [external("w", "outer.bin"), helper.make_tensor("plain", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(graph)
    assert sorted(external_locations(model.SerializeToString())) == _onnx_view(model) == ["inner.bin", "outer.bin"]
    clean = helper.make_model(helper.make_graph([], "g", [], [], [helper.make_tensor("p", TensorProto.FLOAT, [1],
                                                                                      [1.0])]))
    assert external_locations(clean.SerializeToString()) == _onnx_view(clean) == []
    with pytest.raises(ScanError):
        external_locations(model.SerializeToString()[:-3])
