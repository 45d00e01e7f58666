"""Pipelines: stages that read the model input or an earlier carry (CBNet-style fallback)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _models import reference_decisions, safe_thresholds, tiny_inputs  # noqa: E402
from torch import nn  # noqa: E402

from edgeexit.errors import ModelSpecError  # noqa: E402
from edgeexit.export import EarlyExitModel, export_package  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402


def _pipeline() -> EarlyExitModel:
    """converter -> light classifier (exit) ; fallback on the ORIGINAL input -> final exit."""
    torch.manual_seed(3)
    converter = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))
    light = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    light_exit = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    with torch.no_grad():
        light_exit[1].weight.mul_(20)
    fallback = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    trunk = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    final = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    return EarlyExitModel(stages=[converter, light, fallback, trunk], exits=[None, light_exit, None, final],
                          reads=["inputs", 0, "inputs", 2]).eval()


def test_pipeline_package_wiring_and_decisions_equal_torch(tmp_path):
    model = _pipeline()
    x = tiny_inputs(200, seed=4)
    (threshold,) = safe_thresholds_for_pipeline(model, x)
    pkg = export_package(model, {"x": torch.from_numpy(tiny_inputs(4))}, tmp_path / "p.eexit",
                         policy="entropy", thresholds=[threshold], include_full_model=True, log=None)
    assert pkg.kind == "pipeline"
    assert [s.inputs for s in pkg.stages] == [("x",), ("carry0_0",), ("x",), ("carry2_0",)]
    assert [s.carry for s in pkg.stages] == [("carry0_0",), (), ("carry2_0",), ()]
    ref = reference_decisions(model, x, "entropy", [threshold])
    assert set(np.unique(ref[0])) == {0, 1}, "both paths must be taken"
    sess = ExitSession(pkg.root)
    result = sess.run(x)
    np.testing.assert_array_equal(result.exit_index, ref[0])
    np.testing.assert_array_equal(result.predictions, ref[1])
    for i in range(20):
        one = sess.run(x[i:i + 1])
        assert one.exit_index[0] == ref[0][i] and one.predictions[0] == ref[1][i]
    # the fallback path ran on the original input: the full graph is fallback + trunk + final only
    with torch.no_grad():
        want = model.exit_at(3)(model.stages[3](model.stages[2](torch.from_numpy(x)))).numpy()
    np.testing.assert_allclose(sess.run_full(x), want, rtol=1e-4, atol=1e-4)
    bound = ExitSession(pkg.root, io_binding=True).run(x)  # OrtValue carries, compacted on the host
    np.testing.assert_array_equal(bound.exit_index, ref[0])
    np.testing.assert_allclose(bound.logits, result.logits, rtol=1e-6, atol=1e-6)
    light_only = sess.run(x, thresholds=[1e9], engine="stages")
    assert (light_only.exit_index == 0).all() and light_only.stage_ms[2:] == (0.0, 0.0)


def safe_thresholds_for_pipeline(model, x):
    # the light exit is exit 0 of the model's exits; reuse the gap-finding helper
    return safe_thresholds(model, x, "entropy", [0.5])


@pytest.mark.parametrize(
    ("reads", "fragment"),
    [(["inputs", 1, "inputs", 2], "earlier stage"), (["inputs", 0], "one entry per stage"),
     (["x", 0, "inputs", 2], "earlier stage")],
)
def test_bad_reads_are_refused(reads, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        EarlyExitModel(stages=[nn.Identity()] * 4, exits=[None, nn.Identity(), None, nn.Identity()], reads=reads)


def test_a_stage_nobody_reads_without_an_exit_is_refused():
    with pytest.raises(ModelSpecError, match="would be dead"):
        EarlyExitModel(stages=[nn.Identity()] * 3, exits=[None, None, nn.Identity()], reads=["inputs", "inputs", 1])
