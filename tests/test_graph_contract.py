"""Stage graphs that do not fit the manifest or each other are refused when the session is built
(GraphMismatchError naming stage, tensor and mismatch), at batch 1 and batch alike; an
onnxruntime failure while running is a SessionError naming the stage."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import TINY_IR_VERSION, TINY_MANIFEST, TINY_OPSET, TINY_W0, TINY_W1
from onnx import TensorProto, helper, numpy_helper

from edgeexit.errors import GraphMismatchError, SessionError
from edgeexit.package import write_package
from edgeexit.runtime import ExitSession

F, D = TensorProto.FLOAT, TensorProto.DOUBLE


def _value(name: str, elem: int, shape: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", TINY_OPSET)])
    model.ir_version = TINY_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def stage0(x_shape=("batch", 4), logits: tuple[int, list[Any]] | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["x"], ["carry0_0"]), helper.make_node("MatMul", ["x", "W0"], ["m"])]
    elem, shape = logits or (F, ["batch", 3])
    nodes.append(helper.make_node("Identity", ["m"], ["logits0"]) if elem == F else
                 helper.make_node("Cast", ["m"], ["logits0"], to=elem))
    return _model("stage0", nodes, [_value("x", F, list(x_shape))],
                  [_value("carry0_0", F, list(x_shape)), _value("logits0", elem, shape)],
                  [numpy_helper.from_array(TINY_W0, "W0")])


def stage1(carry: tuple[int, list[Any]] = (F, ["batch", 4]), w: np.ndarray = TINY_W1,
           tail: str | None = None, out: tuple[int, list[Any]] | None = None) -> onnx.ModelProto:
    elem, shape = carry
    nodes = [helper.make_node("Cast", ["carry0_0"], ["c"], to=F), helper.make_node("MatMul", ["c", "W1"], ["m"])]
    inits = [numpy_helper.from_array(w, "W1")]
    if tail == "reduce":
        nodes.append(helper.make_node("ReduceSum", ["m", "ax"], ["logits1"], keepdims=0))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    elif tail == "unsqueeze":
        nodes.append(helper.make_node("Unsqueeze", ["m", "ax"], ["logits1"]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    elif tail == "string":
        nodes.append(helper.make_node("Cast", ["m"], ["logits1"], to=TensorProto.STRING))
    elif tail == "reshape-pairs":   # runs only when the batch is even
        nodes.append(helper.make_node("Reshape", ["m", "pairs"], ["r"]))
        nodes.append(helper.make_node("Reshape", ["r", "back"], ["logits1"]))
        inits += [numpy_helper.from_array(np.array([2, -1], np.int64), "pairs"),
                  numpy_helper.from_array(np.array([-1, w.shape[1]], np.int64), "back")]
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["logits1"]))
    out_elem, out_shape = out or (F, ["batch", w.shape[1]])
    return _model("stage1", nodes, [_value("carry0_0", elem, shape)], [_value("logits1", out_elem, out_shape)], inits)


def _package(tmp_path: Path, s0: onnx.ModelProto, s1: onnx.ModelProto) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    onnx.save_model(s0, str(tmp_path / "src" / "stage0.onnx"))
    onnx.save_model(s1, str(tmp_path / "src" / "stage1.onnx"))
    return write_package(tmp_path / "p.eexit", copy.deepcopy(TINY_MANIFEST),
                         {f"stage{k}.onnx": tmp_path / "src" / f"stage{k}.onnx" for k in (0, 1)})


CASES = [
    ("carry-dtype", lambda: (stage0(), stage1(carry=(D, ["batch", 4]))), "input 'carry0_0' is tensor(double)"),
    ("carry-width", lambda: (stage0(), stage1(carry=(F, ["batch", 5]), w=np.ones((5, 3), np.float32))),
     "input 'carry0_0' is tensor(float) ['batch', 5], but stage 'stage0''s output is tensor(float) ['batch', 4]"),
    ("logits-rank-1", lambda: (stage0(), stage1(tail="reduce", out=(F, ["batch"]))), "have shape ['batch']"),
    ("logits-rank-3", lambda: (stage0(), stage1(tail="unsqueeze", out=(F, ["batch", 1, 3]))),
     "have shape ['batch', 1, 3]"),
    ("zero-classes", lambda: (stage0(), stage1(w=np.ones((4, 0), np.float32))), "at least one class"),
    ("fixed-batch-1", lambda: (stage0(x_shape=(1, 4)), stage1()), "input 'x' has shape [1, 4]"),
    ("string-logits", lambda: (stage0(), stage1(tail="string", out=(TensorProto.STRING, ["batch", 3]))),
     "are tensor(string)"),
    ("bool-logits-exit-0", lambda: (stage0(logits=(TensorProto.BOOL, ["batch", 3])), stage1()), "are tensor(bool)"),
    ("classes-differ", lambda: (stage0(), stage1(w=np.ones((4, 5), np.float32))),
     "have 5 classes, but the exit of stage 'stage0' has 3"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_graphs_that_do_not_fit_are_refused_when_the_session_is_built(tmp_path, make, fragment):
    path = _package(tmp_path, *make())
    with pytest.raises(GraphMismatchError) as info:
        ExitSession(path)
    assert fragment in str(info.value), str(info.value)
    assert "Re-export" in str(info.value)


def test_the_fitting_variant_loads_and_agrees_with_numpy(tmp_path):
    path = _package(tmp_path, stage0(), stage1())
    x = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    out = ExitSession(path).run(x, thresholds=[None])
    np.testing.assert_allclose(out.logits, x @ TINY_W1, rtol=1e-5, atol=1e-6)


def test_an_onnxruntime_failure_while_running_names_the_stage_at_batch_1_and_batch(tmp_path):
    path = _package(tmp_path, stage0(), stage1(tail="reshape-pairs"))
    sess = ExitSession(path)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(sess.run(x[:2], thresholds=[None]).logits, x[:2] @ TINY_W1, rtol=1e-5, atol=1e-6)
    for batch in (x[:1], x[:3]):          # an odd batch cannot be reshaped into pairs
        with pytest.raises(SessionError, match=r"stage 'stage1' \(stage1.onnx\) failed in onnxruntime"):
            sess.run(batch, thresholds=[None], engine="stages")
