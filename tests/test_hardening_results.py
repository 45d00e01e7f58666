"""No silently wrong results: a package whose graphs do not answer what its manifest says is
refused when the session is built, or fails with a typed error, and never gives an answer
that depends on the batch size or the engine.

- exits whose logits have different float dtypes: every path returns the widest dtype;
- a compiled graph is checked by more than its names: output types and shapes at load, its
  answers against the stage loop on synthetic probes at load, and its exit indices per call;
- an exit whose class width onnxruntime cannot tell is checked when it runs, never broadcast;
- a seq2seq package's graphs are checked against its manifest (vocabulary, width, heads).

Every package here is real: graphs built with ``onnx.helper`` or exported from torch, run by
onnxruntime.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import TINY_MANIFEST, TINY_W0
from onnx import TensorProto, helper, numpy_helper
from test_graph_contract import _model

from edgeexit.errors import EdgeExitError, GraphMismatchError, InputError, SessionError
from edgeexit.package import read_manifest, sha256_file, write_package
from edgeexit.runtime import ExitSession

F16, F32, F64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE
NUMPY = {F16: np.float16, F32: np.float32, F64: np.float64}
ORT_NAME = {np.dtype(np.float16): "tensor(float16)", np.dtype(np.float32): "tensor(float)",
            np.dtype(np.float64): "tensor(double)"}


def _stage0(elem: int = F32, w0: np.ndarray = TINY_W0) -> onnx.ModelProto:
    """x -> carry0_0 (= x) and logits0 = x @ W0, returned as ``elem``."""
    nodes = [helper.make_node("Identity", ["x"], ["carry0_0"]), helper.make_node("MatMul", ["x", "W0"], ["m"]),
             helper.make_node("Cast", ["m"], ["logits0"], to=elem)]
    return _model("stage0", nodes, [helper.make_tensor_value_info("x", F32, ["batch", 4])],
                  [helper.make_tensor_value_info("carry0_0", F32, ["batch", 4]),
                   helper.make_tensor_value_info("logits0", elem, ["batch", 3])],
                  [numpy_helper.from_array(w0, "W0")])


def _near_ties(elem: int) -> np.ndarray:
    """Columns 1 + (0, 2d, d) with d a few units of ``elem``'s rounding: the argmax (column 1)
    survives in ``elem`` and is lost in any narrower float."""
    d = 8 * float(np.finfo(NUMPY[elem]).eps)
    return np.tile(np.array([1.0, 1.0 + 2 * d, 1.0 + d]), (4, 1))


def _stage1(elem: int = F32, w1: np.ndarray | None = None, tail: list[Any] | None = None,
            out_shape: list[Any] | None = None) -> onnx.ModelProto:
    """logits1 = carry @ W1, computed in float64 for a float64 exit (float32 otherwise), returned as
    ``elem``; ``tail`` nodes may turn ``l`` into ``logits1`` instead of the plain Cast."""
    work = F64 if elem == F64 else F32
    w = _near_ties(elem) if w1 is None else w1
    nodes = [helper.make_node("Cast", ["carry0_0"], ["c"], to=work),
             helper.make_node("MatMul", ["c", "W1"], ["l"])]
    nodes += tail if tail is not None else [helper.make_node("Cast", ["l"], ["logits1"], to=elem)]
    return _model("stage1", nodes, [helper.make_tensor_value_info("carry0_0", F32, ["batch", 4])],
                  [helper.make_tensor_value_info("logits1", elem, out_shape or ["batch", w.shape[1]])],
                  [numpy_helper.from_array(w.astype(NUMPY[work]), "W1")])


def _write(folder: Path, graphs: dict[str, onnx.ModelProto], manifest: dict[str, Any] | None = None,
           name: str = "p.eexit") -> Path:
    src = folder / f"src-{name}"
    src.mkdir(parents=True, exist_ok=True)
    for file, graph in graphs.items():
        onnx.save_model(graph, str(src / file))
    manifest = copy.deepcopy(manifest or TINY_MANIFEST)
    manifest.pop("files", None)
    return write_package(folder / name, manifest, {file: src / file for file in graphs})


def _samples(n: int = 6) -> np.ndarray:
    """Positive inputs: odd rows one-hot (they leave at exit 0), even rows flat (they go on to exit 1)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.3, 0.5, (n, 4)).astype(np.float32)
    x[1::2, :3] += 3.0 * np.eye(3, dtype=np.float32)[np.arange(n // 2) % 3]
    return x


# --- a. exits with different logits dtypes -----------------------------------------------------------

MIXES = [(a, b) for a in (F16, F32, F64) for b in (F16, F32, F64)]
MIX_IDS = [f"{np.dtype(NUMPY[a]).name}-{np.dtype(NUMPY[b]).name}" for a, b in MIXES]


@pytest.mark.parametrize(("first", "second"), MIXES, ids=MIX_IDS)
def test_results_never_depend_on_the_batch_size_whatever_the_exits_dtypes(tmp_path, first, second):
    path = _write(tmp_path, {"stage0.onnx": _stage0(first), "stage1.onnx": _stage1(second)})
    sess = ExitSession(path, engine="stages")
    x = _samples()
    widest = np.result_type(NUMPY[first], NUMPY[second])
    batch = sess.run(x)
    assert set(batch.exit_index.tolist()) == {0, 1}, "the samples should use both exits"
    assert batch.logits.dtype == widest
    exits = sess.run_all_exits(x)
    want = np.where(batch.exit_index[:, None] == 0, exits[0].astype(widest), exits[1].astype(widest))
    np.testing.assert_array_equal(batch.logits, want)              # no exit's logits rounded to another's dtype
    np.testing.assert_array_equal(batch.predictions[batch.exit_index == 1], 1)   # the near-tie kept its argmax
    for i in range(len(x)):
        one = sess.run(x[i:i + 1])
        assert one.logits.dtype == widest, f"sample {i}: batch 1 gives {one.logits.dtype}, the batch {widest}"
        np.testing.assert_array_equal(one.logits[0], batch.logits[i])
        assert one.predictions[0] == batch.predictions[i] and one.exit_index[0] == batch.exit_index[i]
    assert sess.get_outputs()[0].type == ORT_NAME[np.dtype(widest)]


@pytest.mark.parametrize(("first", "second"), MIXES, ids=MIX_IDS)
def test_the_compiled_graph_gives_the_dtype_of_the_stage_loop(tmp_path, first, second):
    from edgeexit.export.compile import compile_package

    path = _write(tmp_path, {"stage0.onnx": _stage0(first), "stage1.onnx": _stage1(second)})
    compile_package(path, check_samples=0, log=None)
    x = _samples()
    stages = ExitSession(path, engine="stages").run(x)
    assert stages.logits.dtype == np.result_type(NUMPY[first], NUMPY[second])
    auto = ExitSession(path)
    assert auto.has_compiled
    for n in (1, len(x)):
        got = auto.run(x[:n], engine="compiled")
        assert got.logits.dtype == stages.logits.dtype      # the widest exit's, whichever exit answers
        np.testing.assert_array_equal(got.exit_index, stages.exit_index[:n])
        np.testing.assert_array_equal(got.predictions, stages.predictions[:n])
        np.testing.assert_array_equal(got.logits, stages.logits[:n])


@pytest.mark.parametrize(("first", "second"), [m for m in MIXES if np.dtype(NUMPY[m[0]]).itemsize
                                               < np.dtype(NUMPY[m[1]]).itemsize])
def test_a_compiled_graph_that_rounds_a_wider_exit_is_not_used(tmp_path, monkeypatch, first, second):
    # compiled graphs of earlier versions returned exit 0's dtype: one that rounds a wider exit's
    # logits in-graph must not answer (the stage loop does, and engine="compiled" says why)
    from edgeexit.export import compile as compiler

    path = _write(tmp_path, {"stage0.onnx": _stage0(first), "stage1.onnx": _stage1(second)})
    monkeypatch.setattr(compiler, "_widest_logits_type", lambda package, models: first)
    compiler.compile_package(path, check_samples=0, log=None)
    x = _samples()
    stages = ExitSession(path, engine="stages").run(x)
    auto = ExitSession(path)
    assert not auto.has_compiled
    got = auto.run(x)
    assert got.engine == "stages" and got.logits.dtype == stages.logits.dtype
    with pytest.raises(InputError, match=r"narrower than .*float"):
        auto.run(x, engine="compiled")


def _full(elem: int) -> onnx.ModelProto:
    """The whole model in one graph, as ``full.onnx``: stage 1 reading ``x`` (stage 0 passes it on)."""
    graph = copy.deepcopy(_stage1(elem))
    graph.graph.input[0].name = "x"
    graph.graph.node[0].input[0] = "x"
    return graph


@pytest.mark.parametrize(("first", "second"), MIXES, ids=MIX_IDS)
def test_the_full_model_gives_the_dtype_of_the_stage_loop(tmp_path, first, second):
    manifest = copy.deepcopy(TINY_MANIFEST)
    manifest.update(format_version=4, full_model={"file": "full.onnx", "inputs": ["x"], "logits": "logits1"})
    manifest["stages"][0]["exit"]["threshold"] = None        # every early exit disabled: full.onnx answers
    graphs = {"stage0.onnx": _stage0(first), "stage1.onnx": _stage1(second), "full.onnx": _full(second)}
    sess = ExitSession(_write(tmp_path, graphs, manifest))
    x = _samples()
    for n in (1, len(x)):
        got, want = sess.run(x[:n]), sess.run(x[:n], engine="stages")
        assert got.engine == "full" and want.engine == "stages"
        assert got.logits.dtype == want.logits.dtype == np.result_type(NUMPY[first], NUMPY[second])
        np.testing.assert_array_equal(got.logits, want.logits)


@pytest.mark.parametrize(("wrong", "classes", "elem", "rank", "name"), [
    ("five-classes", 5, F32, 2, "logits1"), ("int64-logits", 3, TensorProto.INT64, 2, "logits1"),
    ("3-d-logits", 3, F32, 3, "logits1"), ("other-output-name", 3, F32, 2, "scores")])
def test_a_full_model_that_does_not_answer_like_the_exits_is_refused(tmp_path, wrong, classes, elem, rank, name):
    # full.onnx answers every call while the exits are disabled: its logits of another width were
    # returned as they were (the package "had" 5 classes at batch 1 and 3 at exit 1)
    manifest = copy.deepcopy(TINY_MANIFEST)
    manifest.update(format_version=4, full_model={"file": "full.onnx", "inputs": ["x"], "logits": "logits1"})
    manifest["stages"][0]["exit"]["threshold"] = None
    nodes = [helper.make_node("MatMul", ["x", "W"], ["l"]), helper.make_node("Cast", ["l"], ["c"], to=elem)]
    nodes.append(helper.make_node("Unsqueeze", ["c", "axes"], [name]) if rank == 3 else
                 helper.make_node("Identity", ["c"], [name]))
    full = _model("full", nodes, [helper.make_tensor_value_info("x", F32, ["batch", 4])],
                  [helper.make_tensor_value_info(name, elem, ["batch", classes] + [1] * (rank - 2))],
                  [numpy_helper.from_array(np.ones((4, classes), np.float32), "W"),
                   numpy_helper.from_array(np.array([2], np.int64), "axes")])
    graphs = {"stage0.onnx": _stage0(F32), "stage1.onnx": _stage1(F32), "full.onnx": full}
    with pytest.raises(GraphMismatchError, match=r"full model full\.onnx"):
        ExitSession(_write(tmp_path, graphs, manifest))


# --- b. a compiled graph is checked by what it answers, not only by its names ---------------------


def _compile(tmp_path: Path, name: str, seed: int | None = None) -> Path:
    """A tiny package with its compiled graph; ``seed`` gives it other weights (another model)."""
    from edgeexit.export.compile import compile_package

    rng = np.random.default_rng(seed)
    w0 = TINY_W0 if seed is None else rng.standard_normal((4, 3)).astype(np.float32) * 4
    w1 = None if seed is None else rng.standard_normal((4, 3))
    path = _write(tmp_path, {"stage0.onnx": _stage0(F32, w0), "stage1.onnx": _stage1(F32, w1)}, name=name)
    compile_package(path, log=None)
    return path


def _with_graph(path: Path, graph: onnx.ModelProto, tmp_path: Path, name: str = "edited.eexit") -> Path:
    """``path``'s package with ``graph`` as its compiled graph; the manifest's ``sources`` still
    name the stage files, as a copied or edited graph would leave them."""
    _, manifest = read_manifest(path)
    file = manifest["compiled"]["file"]
    files: dict[str, Path] = {f: path / f for f in manifest.pop("files") if f != file}
    files[file] = tmp_path / f"{name}.onnx"
    onnx.save_model(graph, str(files[file]))
    return write_package(tmp_path / name, manifest, files)


def _compiled_graph(path: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    _, manifest = read_manifest(path)
    return onnx.load(str(path / manifest["compiled"]["file"])), manifest["compiled"]["outputs"]


def _rewire(graph: onnx.ModelProto, output: str, nodes: list[Any], elem: int, shape: list[Any]) -> onnx.ModelProto:
    """``output`` recomputed by ``nodes`` from what the graph computed (``{output}_was``)."""
    graph = copy.deepcopy(graph)
    for node in graph.graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = f"{output}_was"
    graph.graph.node.extend(nodes)
    declared = next(o for o in graph.graph.output if o.name == output)
    declared.CopyFrom(helper.make_tensor_value_info(output, elem, shape))
    return graph


def test_a_compiled_graph_of_another_model_is_refused_at_load(tmp_path):
    mine, other = _compile(tmp_path, "mine.eexit"), _compile(tmp_path, "other.eexit", seed=5)
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    theirs = ExitSession(other, engine="compiled").run(x)
    assert (theirs.exit_index != ExitSession(mine, engine="stages").run(x).exit_index).any()   # another model
    swapped = _with_graph(mine, _compiled_graph(other)[0], tmp_path)
    with pytest.raises(GraphMismatchError, match=r"does not answer like the package's stage graphs") as info:
        ExitSession(swapped)
    assert "edgeexit compile" in str(info.value) and "engine='stages'" in str(info.value)
    np.testing.assert_array_equal(ExitSession(swapped, engine="stages").run(x).exit_index,
                                  ExitSession(mine, engine="stages").run(x).exit_index)   # the way out works
    assert ExitSession(mine).run(x).engine == "compiled"     # the genuine graph still loads and is used


def _plus(output: str, value: int) -> list[Any]:
    return [helper.make_node("Constant", [], [f"{output}_k"], value=numpy_helper.from_array(np.array(value, np.int64))),
            helper.make_node("Add", [f"{output}_was", f"{output}_k"], [output])]


def _cast(output: str, to: int) -> list[Any]:
    return [helper.make_node("Cast", [f"{output}_was"], [output], to=to)]


OUTPUT_CASES = [   # (which output, how it is rewired, declared type and shape, what the error says)
    ("exit_index-out-of-range", "exit_index", lambda o: _plus(o, 5), TensorProto.INT64, ["batch"],
     r"sends samples to exits \[5, 6\] of a package with 2"),
    ("exit_index-float", "exit_index", lambda o: _cast(o, F32), F32, ["batch"], "output 'exit_index'"),
    ("score-float32", "score", lambda o: _cast(o, F32), F32, ["batch"], "output 'score'"),
    ("logits-3d", "logits", lambda o: [
        helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Unsqueeze", [f"{o}_was", "ax"], [o])], F32, ["batch", 1, 3], "output 'logits'"),
    ("logits-extra-class", "logits", lambda o: [helper.make_node("Concat", [f"{o}_was", f"{o}_was"], [o], axis=1)],
     F32, ["batch", 6], r"output 'logits' .* shape \[batch, 3\]"),
    ("logits-float64", "logits", lambda o: _cast(o, F64), F64, ["batch", 3], "output 'logits'"),
    ("logits-permuted", "logits", lambda o: [helper.make_node("Neg", [f"{o}_was"], [o])], F32, ["batch", 3],
     "the logits differ"),
]


@pytest.mark.parametrize(("output", "nodes", "elem", "shape", "message"), [c[1:] for c in OUTPUT_CASES],
                         ids=[c[0] for c in OUTPUT_CASES])
def test_compiled_outputs_that_do_not_fit_the_manifest_are_refused_at_load(tmp_path, output, nodes, elem, shape,
                                                                           message):
    path = _compile(tmp_path, "mine.eexit")
    graph, names = _compiled_graph(path)
    edited = _with_graph(path, _rewire(graph, names[output], nodes(names[output]), elem, shape), tmp_path)
    with pytest.raises(GraphMismatchError, match=message):
        ExitSession(edited)


def test_exit_indices_out_of_range_are_an_error_on_every_call(tmp_path):
    """A graph that answers the probes right but sends some other input to a seventh exit."""
    path = _compile(tmp_path, "mine.eexit")
    graph, names = _compiled_graph(path)
    o = names["exit_index"]
    nodes = [helper.make_node("Constant", [], ["col"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Gather", ["x", "col"], ["x0"], axis=1),
             helper.make_node("Constant", [], ["big"], value=numpy_helper.from_array(np.array(100, np.float32))),
             helper.make_node("Greater", ["x0", "big"], ["odd"]),
             helper.make_node("Constant", [], ["seven"], value=numpy_helper.from_array(np.array(7, np.int64))),
             helper.make_node("Where", ["odd", "seven", f"{o}_was"], [o])]
    sess = ExitSession(_with_graph(path, _rewire(graph, o, nodes, TensorProto.INT64, ["batch"]), tmp_path))
    x = _samples(6)
    assert sess.run(x).engine == "compiled"              # loads: the probes never reach x > 100
    np.testing.assert_array_equal(sess.run(x).exit_index, ExitSession(path, engine="stages").run(x).exit_index)
    x[2, 0] = 1000.0
    for batch in (x, x[2:3]):
        with pytest.raises(SessionError, match=r"sent samples to exits \[(0, )?(1, )?7\]; this package has exits 0 to"):
            sess.run(batch)


# --- c. an exit whose class width the graph leaves open ------------------------------------------------


def _one_column() -> list[Any]:
    """Exit 1's logits summed into one column (batch, 1), reshaped to a shape computed at run time
    (w / w), so onnxruntime cannot tell the width and reports what the graph declares."""
    def const(name: str, value: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))

    return [const("ax", [1]), helper.make_node("ReduceSum", ["l", "ax"], ["sum"], keepdims=1),
            helper.make_node("Shape", ["l"], ["shape"]), helper.make_node("Gather", ["shape", "ax"], ["w"]),
            helper.make_node("Div", ["w", "w"], ["one"]), const("rows", [-1]),
            helper.make_node("Concat", ["rows", "one"], ["target"], axis=0),
            helper.make_node("Reshape", ["sum", "target"], ["logits1"])]


def _reported(graph: onnx.ModelProto, output: int = 0) -> list[Any]:
    """The shape onnxruntime reports for one of the graph's outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.get_outputs()[output].shape)


def _symbolic(graph: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The graph with ``output`` reshaped to its own width computed at run time (w / (w / w)), so
    onnxruntime cannot tell the class axis, which the graph declares symbolic."""
    def const(name: str, value: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))

    was = f"{output}_was"
    nodes = [const("sym_ax", [1]), helper.make_node("Shape", [was], ["sym_shape"]),
             helper.make_node("Gather", ["sym_shape", "sym_ax"], ["sym_w"]),
             helper.make_node("Div", ["sym_w", "sym_w"], ["sym_one"]),
             helper.make_node("Div", ["sym_w", "sym_one"], ["sym_width"]), const("sym_rows", [-1]),
             helper.make_node("Concat", ["sym_rows", "sym_width"], ["sym_target"], axis=0),
             helper.make_node("Reshape", [was, "sym_target"], [output])]
    elem = next(o for o in graph.graph.output if o.name == output).type.tensor_type.elem_type
    return _rewire(graph, output, nodes, elem, ["batch", "classes"])


@pytest.mark.parametrize("width", ["k", None], ids=["symbolic", "none"])
def test_an_exit_of_unknown_width_is_checked_when_it_runs_never_broadcast(tmp_path, width):
    stage1 = _stage1(F32, tail=_one_column(), out_shape=["batch", width])
    assert not isinstance(_reported(stage1)[1], int)      # onnxruntime cannot tell the width
    sess = ExitSession(_write(tmp_path, {"stage0.onnx": _stage0(), "stage1.onnx": stage1}))
    x = _samples(6)
    leave_first = x[1::2]                                   # every sample leaves at exit 0: nothing to check
    assert sess.run(leave_first).exit_index.tolist() == [0, 0, 0]
    for batch in (x, x[:1]):                                # exit 1 runs: its (batch, 1) logits are refused
        with pytest.raises(GraphMismatchError, match=r"exit logits 'logits1' came out with shape \(\d, 1\), but the "
                                                     r"package answers over 3 classes"):
            sess.run(batch)


def test_exits_of_unknown_width_everywhere_are_probed_at_load(tmp_path):
    manifest = copy.deepcopy(TINY_MANIFEST)
    manifest["labels"] = None
    fine = {"stage0.onnx": _symbolic(_stage0(), "logits0"), "stage1.onnx": _symbolic(_stage1(F32), "logits1")}
    assert [_reported(g, -1)[1] for g in fine.values()] == ["classes", "classes"]
    sess = ExitSession(_write(tmp_path, fine, manifest, name="fine.eexit"))
    assert sess.run(_samples(6)).logits.shape == (6, 3)
    narrow = {"stage0.onnx": fine["stage0.onnx"], "stage1.onnx": _stage1(F32, tail=_one_column(),
                                                                         out_shape=["batch", "k"])}
    with pytest.raises(GraphMismatchError, match=r"the exits answer over \[3, 1\] classes"):
        ExitSession(_write(tmp_path, narrow, manifest, name="narrow.eexit"))


# --- d. seq2seq graphs against their manifest ----------------------------------------------------------


@pytest.fixture(scope="module")
def mue(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from edgeexit.export.seq2seq import export_mue
    from edgeexit.zoo.mue import MuEConfig, MuEModel

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MuEModel(MuEConfig(width=32, heads=4, ff=64, encoder_layers=2, decoder_layers=2)).eval()
    try:
        return export_mue(model, tmp_path_factory.mktemp("mue") / "mue.eexit", log=None).root
    finally:
        torch.set_num_threads(before)


def _mue_inputs(n: int = 3) -> dict[str, np.ndarray]:
    from edgeexit.zoo.mue_task import QUESTIONS, encode

    rng = np.random.default_rng(7)
    return {"image": rng.random((n, 1, 28, 28), dtype=np.float32),
            "question": np.stack([encode(QUESTIONS["digit"], 5)] * n)}


def _edited(root: Path, tmp_path: Path, change: Any) -> Path:
    copy_ = tmp_path / "edited.eexit"
    shutil.copytree(root, copy_)
    manifest = json.loads((copy_ / "manifest.json").read_text())
    change(manifest["seq2seq"])
    for file, entry in manifest["files"].items():      # files unchanged; rehashed all the same
        entry["sha256"] = sha256_file(copy_ / file)
    (copy_ / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return copy_


SEQ2SEQ_CASES = [
    ("vocab-one-more", lambda s: s["vocab"].append("extra"),
     r"decoder layer 0 \(decoder0.onnx\): output 'logits' is tensor\(float\) \['batch', 1, 34\], but .* a vocabulary "
     r"of 35 make it tensor\(float\) \[\?, \?, 35\]"),
    ("width-one-less", lambda s: s.update(width=31),
     r"output 'hidden' is tensor\(float\) \['batch', 16, 32\], but the manifest's width 31"),
    ("heads-and-head-dim-swapped", lambda s: s.update(heads=8, head_dim=4),
     r"input 'past_key' is tensor\(float\) \['batch', 4, 'past', 8\], but .* heads 8, head_dim 4"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in SEQ2SEQ_CASES], ids=[c[0] for c in SEQ2SEQ_CASES])
def test_seq2seq_graphs_that_do_not_fit_the_manifest_are_refused_at_load(mue, tmp_path, change, message):
    edited = _edited(mue, tmp_path, change)
    with pytest.raises(GraphMismatchError, match=message) as info:
        ExitSession(edited)
    assert "Re-export" in str(info.value)
    assert ExitSession(mue).generate(_mue_inputs(), max_new_tokens=3).tokens   # the genuine package runs


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in SEQ2SEQ_CASES], ids=[c[0] for c in SEQ2SEQ_CASES])
def test_generation_never_leaks_an_untyped_error_for_a_mismatch(mue, tmp_path, monkeypatch, change, message):
    """Past the load check (as for a mismatch the graphs' symbolic dims hide), still a typed error:
    what numpy finds is a GraphMismatchError, what onnxruntime finds a SessionError naming the layer."""
    from edgeexit.runtime import seq2seq

    monkeypatch.setattr(seq2seq, "check_seq2seq_graphs", lambda *_args: None, raising=False)
    sess = ExitSession(_edited(mue, tmp_path, change), engine="stages")
    with pytest.raises(EdgeExitError) as info:
        sess.generate(_mue_inputs(), max_new_tokens=3)
    if isinstance(info.value, SessionError):
        assert "decoder layer 0 failed in onnxruntime" in str(info.value)
    else:
        assert isinstance(info.value, GraphMismatchError), repr(info.value)
        assert "do not fit the manifest" in str(info.value) and "Re-export" in str(info.value)
