"""Export: graphs checked, onnxruntime against torch on two batch sizes, failures named, atomic."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from _models import tiny_inputs, tiny_model  # noqa: E402
from torch import nn  # noqa: E402

from edgeexit.errors import ExportValidationError, ModelSpecError, ThresholdError  # noqa: E402
from edgeexit.export import EarlyExitModel, export_package  # noqa: E402
from edgeexit.package import load_package  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

EXAMPLE = {"x": torch.from_numpy(tiny_inputs(4))}


class _Drifts(nn.Module):
    """Returns x * (number of calls): the traced graph freezes the count, torch does not."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float(self.calls)


def _drifting_model() -> EarlyExitModel:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    return EarlyExitModel(stages=[nn.Identity(), _Drifts(), nn.Identity()],
                          exits=[head, None, nn.Sequential(nn.Flatten(), _Drifts())])


def test_export_writes_a_verified_package_with_costs(tmp_path):
    lines: list[str] = []
    model = tiny_model()
    pkg = export_package(model, EXAMPLE, tmp_path / "m.eexit", policy="margin", thresholds=[0.3, 0.2],
                         labels=list("abcde"), include_full_model=True, log=lines.append)
    assert [s.name for s in pkg.stages] == ["stage0", "stage1", "stage2", "stage3"]
    assert [s.exit is not None for s in pkg.stages] == [True, False, True, True]
    assert pkg.thresholds == [0.3, 0.2] and pkg.policies == ["margin"] * 3
    assert pkg.stages[1].carry == ("carry1_0", "carry1_1")  # the tuple carry
    assert pkg.stages[2].inputs == ("carry1_0", "carry1_1")
    assert pkg.labels == tuple("abcde") and pkg.inputs[0].shape == ("batch", 1, 8, 8)
    # one validation line per output, each within tolerance
    outputs = [(s.name, o) for s in pkg.stages for o in (*s.carry, *([s.exit.logits] if s.exit else []))]
    outputs.append(("full", "logits"))
    for stage, out in outputs:
        assert any(stage in line and f" {out} " in line and line.rstrip().endswith("ok") for line in lines), out
    # parameter counts are exact; FLOPs: conv 1->4 3x3 on 8x8 = 2*4*64*9
    stage0_params = sum(p.numel() for p in model.stages[0].parameters()) + sum(
        p.numel() for p in model.exit_at(0).parameters())
    assert pkg.stages[0].cost["params"] == stage0_params
    assert pkg.stages[0].cost["flops"] >= 2 * 4 * 64 * 9
    assert 0 < pkg.stages[0].cost["exit_flops"] < pkg.stages[0].cost["flops"]
    for stage in pkg.stages:
        onnx.checker.check_model(str(pkg.file_path(stage.file)), full_check=True)
    producer = pkg.producer
    assert producer["edgeexit"] and producer["opset"] == 18 and producer["exporter"] == "torchscript"


def test_dynamo_exporter_gives_the_same_outputs(tmp_path):
    model = tiny_model()
    a = export_package(model, EXAMPLE, tmp_path / "ts.eexit", thresholds=[0.5, 0.5], log=None)
    b = export_package(model, EXAMPLE, tmp_path / "dyn.eexit", thresholds=[0.5, 0.5], dynamo=True, log=None)
    assert b.producer["exporter"] == "dynamo"
    x = tiny_inputs(9, seed=5)
    for got, want in zip(ExitSession(b.root).run_all_exits(x), ExitSession(a.root).run_all_exits(x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_validation_failure_names_every_failing_output_and_keeps_the_old_package(tmp_path):
    path = tmp_path / "p.eexit"
    export_package(tiny_model(), EXAMPLE, path, thresholds=[0.5, 0.5], log=None)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    lines: list[str] = []
    with pytest.raises(ExportValidationError) as info:
        export_package(_drifting_model(), {"x": torch.rand(4, 1, 8, 8)}, path, thresholds=[0.5], log=lines.append,
                       include_full_model=False, overwrite=True)
    message = str(info.value)
    assert "stage1/carry1_0" in message and "stage2/logits2" in message and "2 output(s)" in message
    assert "stage0/logits0" not in message
    assert any("FAILED" in line for line in lines) and any(line.rstrip().endswith("ok") for line in lines)
    after = {f.name: f.read_bytes() for f in path.iterdir()}
    assert after == before, "a failed export must leave the previous package untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["p.eexit"], "no temporary directories left behind"
    load_package(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EarlyExitModel(stages=[nn.Identity()], exits=[None]), "last stage needs an exit"),
        (lambda: EarlyExitModel(stages=[nn.Identity(), nn.Identity()], exits=[nn.Identity()]),
         "2 stages and 1 exits"),
        (lambda: EarlyExitModel(stages=[], exits=[]), "at least one stage"),
        (lambda: EarlyExitModel(stages=[lambda x: x], exits=[nn.Identity()]), "must be a torch.nn.Module"),
    ],
)
def test_invalid_models_are_refused(make, message):
    with pytest.raises(ModelSpecError, match=message):
        make()


def test_example_inputs_need_a_batch_of_two(tmp_path):
    with pytest.raises(ModelSpecError, match="batch of at least 2"):
        export_package(tiny_model(), {"x": torch.rand(1, 1, 8, 8)}, tmp_path / "p", thresholds=[0.1, 0.1], log=None)
    assert not (tmp_path / "p").exists()


def test_threshold_count_must_match_early_exits(tmp_path):
    with pytest.raises(ThresholdError, match="expected 2 threshold"):
        export_package(tiny_model(), EXAMPLE, tmp_path / "p", thresholds=[0.1], log=None)


def test_manifest_is_canonical_json(tmp_path):
    pkg = export_package(tiny_model(), EXAMPLE, tmp_path / "p.eexit", thresholds=[0.1, 0.2], log=None)
    text = (pkg.root / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    assert manifest["format"] == "edgeexit" and manifest["format_version"] == 4
    assert set(manifest["files"]) == {"stage0.onnx", "stage1.onnx", "stage2.onnx", "stage3.onnx", "full.onnx",
                                      "compiled.onnx"}   # full.onnx by default: the baseline of every speedup


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_model_exports_in_eval_mode_and_keeps_its_state(tmp_path, training):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model = EarlyExitModel(
        stages=[nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU()),
                nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))],
        exits=[nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), nn.Sequential(nn.Flatten(), nn.Linear(256, 3))],
    )
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pkg = export_package(model, EXAMPLE, tmp_path / "bn.eexit", thresholds=[0.5], include_full_model=True, log=None)
    assert model.training is training and all(m.training is training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"export changed {key}"
    x = tiny_inputs(16, seed=9)
    model.eval()
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    for got, ref in zip(ExitSession(pkg.root).run_all_exits(x), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


class _SplitStage(torch.nn.Module):
    """Stage 0 of a model with a skip tensor: returns (features, skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return h, h * 2 - 1


class _UsesFirstOnly(torch.nn.Module):
    """Stage 1 receives (h, skip) but reads only h: the exporter drops the unused graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h, skip):
        return torch.relu(self.lin(h))


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, h, *rest):
        return self.lin(h)


class _TupleTaker(torch.nn.Module):
    """The wrong convention: takes the carry tuple as one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, carry):
        return self.lin(carry[0])


def test_a_stage_that_ignores_part_of_its_carry_exports_and_runs_like_torch(tmp_path):
    import onnxruntime as ort

    from edgeexit.export import EarlyExitModel
    from edgeexit.runtime import ExitSession

    torch.manual_seed(0)
    model = EarlyExitModel([_SplitStage(), _UsesFirstOnly()], [_Head(), _Head()]).eval()
    package = export_package(model, {"x": torch.randn(4, 4)}, tmp_path / "skip.eexit", thresholds=[0.9], log=None)
    stage1 = ort.InferenceSession(str(package.root / "stage1.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in stage1.get_inputs()] == ["carry0_0", "carry0_1"] == list(package.stages[1].inputs)
    x = torch.randn(33, 4)
    with torch.no_grad():
        h, skip = model.stages[0](x)
        logits = [model.exit_at(0)(h, skip), model.exit_at(1)(model.stages[1](h, skip))]
    for engine in ("stages", "compiled"):
        for thresholds in ([None], [10.0]):   # every sample to the last exit; every sample at exit 0
            out = ExitSession(package.root).run(x.numpy(), thresholds=thresholds, engine=engine)
            want = logits[1] if thresholds == [None] else logits[0]
            np.testing.assert_allclose(out.logits, want.numpy(), rtol=1e-4, atol=1e-5)


def test_a_forward_that_takes_the_carry_tuple_as_one_argument_is_a_model_spec_error(tmp_path):
    from edgeexit.errors import ModelSpecError
    from edgeexit.export import EarlyExitModel

    model = EarlyExitModel([_SplitStage(), _TupleTaker()], [_Head(), _Head()])
    with pytest.raises(ModelSpecError, match=r"a tuple carry \(a, b\) arrives as forward\(self, a, b\)"):
        export_package(model, {"x": torch.randn(4, 4)}, tmp_path / "t.eexit", thresholds=[0.5], log=None)
    assert not (tmp_path / "t.eexit").exists()
