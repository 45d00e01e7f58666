"""Exits on a model held only as model.onnx: cut at tensor names, heads trained on recorded features.

Parity, as DESIGN.md §11 states it: with every exit disabled the package answers exactly what
onnxruntime answers on the original file; every exit equals its head applied in torch to the
tensor recorded at its cut; the stage graphs chained reproduce the original output; the stage
loop and the compiled graph agree when thresholds spread the samples over the exits.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402

from edgeexit.errors import ModelSpecError  # noqa: E402
from edgeexit.export.attach_onnx import (  # noqa: E402
    attach_onnx_exits,
    cut_onnx,
    record_cut_features,
    train_cut_heads,
)
from edgeexit.policies import get_policy  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

Feeds = dict[str, np.ndarray]


class SkipNet(nn.Module):
    """stem -> conv1 -> conv2 -> conv3 (+ a 1x1 projection of the stem: a skip over both cuts) -> fc."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, k: int = 3, relu: bool = True) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.BatchNorm2d(o), *([nn.ReLU()] if relu else []))

        self.stem, self.conv1, self.conv2 = block(3, 8), block(8, 8), block(8, 8)
        self.conv3, self.proj = block(8, 8, relu=False), block(8, 8, 1, relu=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        return self.fc(torch.relu(self.conv3(self.conv2(self.conv1(a))) + self.proj(a)).mean((2, 3)))


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path


def _outputs(path: Path, op: str) -> list[str]:
    return [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def skipnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = SkipNet()
    for m in net.modules():   # BatchNorm statistics that matter, as in a trained network
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return _export(net, torch.randn(2, 3, 12, 12), tmp_path_factory.mktemp("skipnet") / "model.onnx")


def _rows(feeds: Feeds, rows: Any) -> Feeds:
    return {k: v[rows] for k, v in feeds.items()}


def _chain(stages: Any, feeds: Feeds) -> np.ndarray:
    tensors = dict(feeds)
    for stage in stages:
        session = ort.InferenceSession(stage.model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = list(stage.carry) or [stage.logits]
        tensors.update(zip(names, session.run(names, {n: tensors[n] for n in stage.inputs})))
    return tensors[stages[-1].logits]  # type: ignore[no-any-return]


def check_parity(package: Path, model: Path, feeds: Feeds, labels: np.ndarray, at: list[str], kinds: list[str],
                 mask: np.ndarray | None = None) -> dict[str, float]:
    """Every parity of the package against the original model and the torch heads; the max differences."""
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    sess = ExitSession(package)
    diffs: dict[str, float] = {}

    plain = sess.run(feeds)   # every exit disabled: full.onnx, the original file
    assert plain.engine == "full" and (plain.exit_index == len(at)).all()
    np.testing.assert_array_equal(plain.logits, original)
    loop = sess.run(feeds, early_exits=False, engine="stages")   # the stage graphs chained
    diffs["stage loop, exits off vs model.onnx"] = float(np.abs(loop.logits - original).max())
    np.testing.assert_allclose(loop.logits, original, rtol=1e-5, atol=1e-5)

    cut = cut_onnx(model, at)
    features = record_cut_features(cut, feeds)
    heads = train_cut_heads(features, labels, kinds, cut.classes, mask=mask, epochs=2, seed=0)
    exits = sess.run_all_exits(feeds)
    assert len(exits) == len(at) + 1
    with torch.no_grad():
        for k, head in enumerate(heads):
            want = head(torch.from_numpy(features[k]), None if mask is None else torch.from_numpy(mask)).numpy()
            diffs[f"exit {k} vs torch head"] = float(np.abs(exits[k] - want).max())
            np.testing.assert_allclose(exits[k], want, rtol=1e-5, atol=1e-5)
    diffs["last exit vs model.onnx"] = float(np.abs(exits[-1] - original).max())
    np.testing.assert_allclose(exits[-1], original, rtol=1e-5, atol=1e-5)

    policy = get_policy("entropy")
    scores = [policy.scores(logits) for logits in exits[:-1]]
    thresholds = [float(np.quantile(s, 0.35)) for s in scores]
    accepted = np.stack([policy.accepts(s, t) for s, t in zip(scores, thresholds)] + [np.ones(len(original), bool)])
    expected = accepted.argmax(axis=0)
    assert set(expected.tolist()) == set(range(len(at) + 1)), expected   # every exit takes some samples
    n = len(original)
    runs = [sess.run(_rows(feeds, slice(i, i + 1)), thresholds=thresholds, engine="stages") for i in range(8)]
    runs += [sess.run(_rows(feeds, slice(0, size)), thresholds=thresholds, engine="stages") for size in (7, n)]
    for run, rows in zip(runs, [slice(i, i + 1) for i in range(8)] + [slice(0, 7), slice(0, n)]):
        np.testing.assert_array_equal(run.exit_index, expected[rows])
        want = np.stack([exits[e][i] for i, e in zip(range(n)[rows], expected[rows])])
        np.testing.assert_allclose(run.logits, want, rtol=1e-5, atol=1e-5)
    assert sess.has_compiled   # attach_onnx_exits compiles where it can, as export_package does
    worst = 0.0
    for size in (1, 7, n):
        compiled = sess.run(_rows(feeds, slice(0, size)), thresholds=thresholds, engine="compiled")
        stages = sess.run(_rows(feeds, slice(0, size)), thresholds=thresholds, engine="stages")
        np.testing.assert_array_equal(compiled.exit_index, stages.exit_index)
        np.testing.assert_allclose(compiled.logits, stages.logits, rtol=1e-5, atol=1e-6)
        worst = max(worst, float(np.abs(compiled.logits - stages.logits).max()))
    diffs["compiled vs stage loop"] = worst
    return diffs


def test_skipnet_package_answers_as_the_model_and_its_heads(skipnet: Path, tmp_path: Path) -> None:
    relus = _outputs(skipnet, "Relu")   # stem, conv1, conv2, after the add
    at = [relus[2], relus[1]]           # any order: cuts are sorted by the graph
    x = np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, 64)
    lines: list[str] = []
    pkg = attach_onnx_exits(skipnet, at, {"image": x}, y, tmp_path / "skipnet.eexit", epochs=2, log=lines.append)
    assert pkg.thresholds == [None, None] and pkg.full_model is not None
    assert (pkg.root / "full.onnx").read_bytes() == skipnet.read_bytes()
    assert any("max |onnxruntime - the original model| = 0.00e+00" in line for line in lines), lines
    diffs = check_parity(pkg.root, skipnet, {"image": x}, y, [relus[1], relus[2]], ["avgpool", "avgpool"])
    print(diffs)


def test_skip_tensor_is_carried_across_both_cuts_and_the_chain_is_the_model(skipnet: Path) -> None:
    relus = _outputs(skipnet, "Relu")
    cut = cut_onnx(skipnet, [relus[1], relus[2]])
    assert [s.sources for s in cut.stages[:-1]] == [(relus[1], relus[0]), (relus[2], relus[0])]
    assert cut.stages[0].inputs == ("image",) and cut.stages[1].inputs == cut.stages[0].carry
    assert cut.classes == 4 and cut.feature_shapes == ((8, 12, 12), (8, 12, 12))
    for stage in cut.stages:   # symbolic batch axis everywhere
        for value in [*stage.model.graph.input, *stage.model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param, value
    x = np.random.default_rng(2).standard_normal((5, 3, 12, 12)).astype(np.float32)
    original = ort.InferenceSession(str(skipnet), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(_chain(cut.stages, {"image": x}), original, rtol=1e-6, atol=1e-6)


def _if_model() -> onnx.ModelProto:
    """x -> sigmoid -> squashed; If(sum(squashed) > 0.5: relu(x) else: -x) + squashed -> MatMul W -> logits.
    The branches read x from the outer scope, after the cut at ``squashed``."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["then_relu"]),
                              helper.make_node("Identity", ["then_relu"], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["batch", 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["batch", 4])])
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [helper.make_node("Sigmoid", ["x"], ["squashed"]),
             helper.make_node("ReduceMean", ["squashed"], ["average"], keepdims=0),
             helper.make_node("Greater", ["average", "half"], ["positive"]),
             helper.make_node("If", ["positive"], ["branch"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Add", ["branch", "squashed"], ["hidden"]),
             helper.make_node("MatMul", ["hidden", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                                           onnx.numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_input_an_if_reads_after_the_cut_is_carried_to_it() -> None:
    model = _if_model()
    cut = cut_onnx(model, ["squashed"])
    assert cut.stages[0].inputs == ("x",) and cut.stages[0].sources == ("squashed", "x")
    assert [s.model.ir_version for s in cut.stages] == [8, 8]
    assert [s.model.opset_import[0].version for s in cut.stages] == [17, 17]
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal((6, 4)).astype(np.float32), np.full((2, 4), -3, np.float32)):  # both branches
        original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(_chain(cut.stages, {"x": x}), original.run(None, {"x": x})[0])


def _output_3d(tmp: Path) -> Path:
    class Wide(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x).reshape(x.shape[0], 2, -1).sum(2, keepdim=True)

    return _export(Wide(), torch.randn(2, 4), tmp / "wide.onnx")


@pytest.mark.parametrize(("at", "message"), [
    (["/conv1/conv1.2/Relu_outptu_0"], r"no node of the model outputs a tensor named '/conv1/conv1.2/Relu_outptu_0'"
                                       r"; a cut is a node output\. Nearest names: \['/conv1/conv1.2/Relu_output_0'"),
    (["image"], "cut 'image' is a model input"),
    (["fc.weight"], r"cut 'fc.weight' is an initializer \(a weight\)"),
    (["/proj/proj.0/Conv_output_0", "/conv1/conv1.2/Relu_output_0"],
     "cuts '/proj/proj.0/Conv_output_0' and '/conv1/conv1.2/Relu_output_0' lie on parallel branches"),
    (["/conv1/conv1.2/Relu_output_0", "/conv1/conv1.2/Relu_output_0"], "at names a tensor twice"),
    (["logits"], "is the model's output"),
])
def test_cuts_that_cannot_be_made_are_typed_errors(skipnet: Path, at: list[str], message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        cut_onnx(skipnet, at)


def test_a_cut_inside_a_subgraph_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="cut 'then_relu' lies inside a subgraph of node 'if'"):
        cut_onnx(_if_model(), ["then_relu"])


def test_a_model_whose_output_is_not_batch_by_classes_is_refused(tmp_path: Path) -> None:
    model = _output_3d(tmp_path)
    relu = _outputs(model, "Relu")[0]
    with pytest.raises(ModelSpecError, match=r"the model's output 'logits' has shapes \[\(2, 2, 1\), \(3, 2, 1\)\]"):
        cut_onnx(model, [relu])


def test_attach_refuses_inputs_and_labels_that_do_not_fit(skipnet: Path, tmp_path: Path) -> None:
    x = np.zeros((8, 3, 12, 12), np.float32)
    relu = _outputs(skipnet, "Relu")[1]
    with pytest.raises(ModelSpecError, match=r"inputs names \['img'\], which the model does not have"):
        attach_onnx_exits(skipnet, [relu], {"img": x}, np.zeros(8, int), tmp_path / "a.eexit", log=None)
    with pytest.raises(ModelSpecError, match=r"labels must be 8 integers in \[0, 4\)"):
        attach_onnx_exits(skipnet, [relu], {"image": x}, np.full(8, 4), tmp_path / "a.eexit", log=None)
    with pytest.raises(ModelSpecError, match="head 'mean' reads 3-D tensors; cut 0 is 4-D"):
        attach_onnx_exits(skipnet, [relu], {"image": x}, np.zeros(8, int), tmp_path / "a.eexit", heads="mean",
                          log=None)
    assert not (tmp_path / "a.eexit").exists()


# --- MiniLM exported by optimum (about 20 s: optimum's export is half of it) -----------------


def test_minilm_exported_by_optimum(tmp_path: Path) -> None:
    main_export = pytest.importorskip("optimum.exporters.onnx").main_export
    from edgeexit.errors import MissingExtraError
    from edgeexit.zoo.bert_exits import minilm_dir

    try:
        folder = minilm_dir()
    except MissingExtraError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)   # the sequence-classification head optimum adds starts random
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(model_name_or_path=str(folder), output=tmp_path / "optimum", task="text-classification",
                    library_name="transformers")
    model = tmp_path / "optimum" / "model.onnx"
    at = [f"/bert/encoder/layer.{i}/output/LayerNorm/LayerNormalization_output_0" for i in (1, 3)]  # after 2, 4

    rng = np.random.default_rng(0)
    n, tokens = 64, 12
    mask = (np.arange(tokens) < rng.integers(3, tokens + 1, n)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1000, 20000, (n, tokens)), 0).astype(np.int64)
    ids[:, 0] = 101
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    labels = rng.integers(0, 2, n)
    pkg = attach_onnx_exits(model, at, feeds, labels, tmp_path / "minilm.eexit", epochs=2, log=None)
    assert [s.carry[:1] for s in pkg.stages[:-1]] == [("carry0_0",), ("carry1_0",)]
    diffs = check_parity(pkg.root, model, feeds, labels, at, ["masked_mean", "masked_mean"], mask=mask)
    print(diffs)
