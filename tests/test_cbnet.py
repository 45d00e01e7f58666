"""CBNet: converter + light exit, with and without the fallback to the full LeNet.

Everything here trains for seconds on sklearn's real digits (resized to 28x28) with
small converter sizes; the real recipe on MNIST-5k is the slow test at the end.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _models import reference_decisions, tiny_model  # noqa: E402

from edgeexit.calibrate import record_exits, shared_threshold  # noqa: E402
from edgeexit.errors import DataError, InputDtypeError, InputShapeError, ModelSpecError  # noqa: E402
from edgeexit.package import load_package  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402
from edgeexit.zoo.blenet import blenet  # noqa: E402
from edgeexit.zoo.cbnet import (  # noqa: E402
    DEFAULT_SIZES,
    CBNetBuild,
    ConvertingAutoencoder,
    build_cbnet,
    cbnet_model,
    digits28_splits,
    export_cbnet,
    first_exit_logits,
    pick_exemplars,
    resize_digits,
    train_converter,
)

SIZES = (64, 32, 16)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def build() -> CBNetBuild:
    return build_cbnet(seed=0, dataset="digits", blenet_epochs=2, ae_epochs=20, sizes=SIZES, log=None)


@pytest.fixture(scope="module")
def exported(build, tmp_path_factory):
    """Both variants exported once; the validation lines kept for the parity test."""
    folder = tmp_path_factory.mktemp("cbnet")
    lines: dict[str, list[str]] = {"fallback": [], "light": []}
    with_fb = export_cbnet(build, folder / "cbnet.eexit", fallback=True, log=lines["fallback"].append)
    light = export_cbnet(build, folder / "cbnet-light.eexit", fallback=False, log=lines["light"].append)
    return with_fb, light, lines


def _torch_light_logits(build: CBNetBuild, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        converted = build.converter(torch.from_numpy(x))
        return build.blenet.exit_at(0)(build.blenet.stages[0](converted))


def _torch_entropy(logits: torch.Tensor) -> np.ndarray:
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).numpy()


def _gap_threshold(scores: np.ndarray, lo_q: float = 0.3, hi_q: float = 0.7) -> float:
    """A threshold in the widest gap between sorted scores in a quantile window, so that
    onnxruntime-vs-torch float differences cannot flip a decision."""
    s = np.sort(scores)
    window = s[int(len(s) * lo_q):int(len(s) * hi_q)]
    gaps = np.diff(window)
    j = int(np.argmax(gaps))
    assert gaps[j] > 1e-6 * max(1.0, window[j]), "scores too dense for a safe threshold"
    return float((window[j] + window[j + 1]) / 2)


# --- the converter -------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [DEFAULT_SIZES, (784, 384, 128), SIZES])
def test_converter_maps_images_to_images_in_unit_range(sizes):
    torch.manual_seed(0)
    ae = ConvertingAutoencoder(*sizes).eval()
    x = torch.cat([torch.rand(3, 1, 28, 28), torch.full((1, 1, 28, 28), 1e4), torch.full((1, 1, 28, 28), -1e4)])
    with torch.no_grad():
        out = ae(x)
    assert out.shape == (5, 1, 28, 28) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("sizes", [(0, 256, 32), (512, -1, 32), (512, 256, 3.5)])
def test_converter_refuses_bad_sizes(sizes):
    with pytest.raises(ModelSpecError, match="search space"):
        ConvertingAutoencoder(*sizes)


def test_train_converter_is_deterministic_and_reports_progress(build):
    x, y = build.splits.train.x[:96], build.splits.train.y[:96]
    exemplars = np.array([np.flatnonzero(y == c)[0] for c in range(10)])
    states, seen = [], []
    for _ in range(2):
        torch.manual_seed(5)
        ae = ConvertingAutoencoder(*SIZES)
        train_converter(ae, x, y, exemplars, epochs=2, batch_size=32, seed=3, progress=seen.append)
        states.append(ae.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert sum(seen) == 2 * 2 * len(y)


def test_trained_converter_moves_images_towards_their_exemplar(build):
    x, y = build.splits.train.x, build.splits.train.y
    targets = build.exemplar_images().reshape(10, -1)
    with torch.no_grad():
        out = build.converter(torch.from_numpy(x)).numpy().reshape(len(x), -1)
    nearest = ((out[:, None, :] - targets[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y).mean() > 0.5


def test_train_converter_refuses_labels_without_exemplar():
    with pytest.raises(DataError, match="exemplars"):
        train_converter(ConvertingAutoencoder(*SIZES), np.zeros((4, 1, 28, 28), np.float32),
                        np.array([0, 1, 2, 3]), np.array([0, 1]), epochs=1)


# --- exemplars -----------------------------------------------------------------------


def test_pick_exemplars_equals_brute_force():
    torch.manual_seed(1)
    model = blenet().eval()
    rng = np.random.default_rng(2)
    x = rng.random((120, 1, 28, 28)).astype(np.float32)
    logits = []
    with torch.no_grad():
        for i in range(len(x)):  # one sample at a time, independent of the batched helper
            logits.append(model.exit_at(0)(model.stages[0](torch.from_numpy(x[i:i + 1])))[0].numpy())
    predicted = np.array([int(np.argmax(row)) for row in logits])
    # half the labels agree with the first exit (the "classified right" rule), half are random
    # (classes with no right answer fall back to the lowest entropy of the class)
    y = np.where(np.arange(len(x)) % 2 == 0, predicted, rng.integers(0, 10, len(x)))
    y[:10] = np.arange(10)  # every class present

    def entropy(row: np.ndarray) -> float:
        z = [float(v) for v in row]
        m = max(z)
        total = sum(math.exp(v - m) for v in z)
        return -sum(math.exp(v - m) / total * (v - m - math.log(total)) for v in z)

    want = []
    for c in range(10):
        members = [i for i in range(len(x)) if y[i] == c]
        right = [i for i in members if predicted[i] == c]
        best = None
        for i in right or members:
            if best is None or entropy(logits[i]) < entropy(logits[best]):
                best = i
        want.append(best)
    got = pick_exemplars(model, x, y)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert {int(c) for c in np.unique(y[np.flatnonzero(predicted == y)])} != set(range(10)), \
        "the fallback rule (no right answer in a class) should be exercised"


def test_pick_exemplars_needs_every_class():
    with pytest.raises(DataError, match="class 9"):
        pick_exemplars(blenet().eval(), np.zeros((9, 1, 28, 28), np.float32), np.arange(9))


def test_build_exemplars_come_from_the_train_split(build):
    train = build.splits.train
    np.testing.assert_array_equal(train.y[build.exemplars], np.arange(10))
    np.testing.assert_array_equal(build.exemplars, pick_exemplars(build.blenet, train.x, train.y))
    ent = first_exit_logits(build.blenet, train.x)
    assert ent.shape == (len(train), 10)


# --- the model -----------------------------------------------------------------------


def test_cbnet_model_shares_blenet_modules(build):
    m = cbnet_model(build.blenet, build.converter)
    assert m.reads == ["inputs", 0, "inputs", 2]
    assert m.stages[1] is m.stages[2] is build.blenet.stages[0]
    assert m.exit_at(1) is build.blenet.exit_at(0) and m.exit_at(3) is build.blenet.exit_at(1)
    light = cbnet_model(build.blenet, build.converter, fallback=False)
    assert light.num_stages == 2 and light.num_exits == 1


def test_cbnet_model_refuses_a_non_blenet(build):
    with pytest.raises(ModelSpecError, match="B-LeNet"):
        cbnet_model(tiny_model(), build.converter)


# --- export and runtime --------------------------------------------------------------


def test_export_parity_lines_are_ok_for_converter_and_light(exported):
    _, _, lines = exported
    for variant, graphs in (("fallback", ("stage0", "stage1", "stage2", "stage3", "full")),
                            ("light", ("stage0", "stage1"))):
        parity = [line for line in lines[variant] if "max |onnxruntime - torch|" in line]
        assert {line.split()[0] for line in parity} == set(graphs)
        assert all(line.rstrip().endswith("ok") for line in parity), parity


def test_manifest_states_what_each_stage_reads(build, exported):
    with_fb, light, _ = exported
    pkg = load_package(with_fb.package)
    assert pkg.kind == "pipeline"
    assert [s.name for s in pkg.stages] == ["converter", "light", "fallback", "trunk"]
    assert [s.inputs for s in pkg.stages] == [("image",), ("carry0_0",), ("image",), ("carry2_0",)]
    assert pkg.full_model is not None and pkg.full_model.inputs == ("image",)
    assert pkg.manifest["cbnet"]["exemplars"]["indices"] == build.exemplars.tolist()
    assert pkg.thresholds == [with_fb.threshold]
    pkg_light = load_package(light.package)
    assert [s.name for s in pkg_light.stages] == ["converter", "light"]
    assert pkg_light.full_model is None and light.threshold is None


def test_stored_threshold_is_the_calibrated_one(build, exported):
    with_fb, _, _ = exported
    cal = build.splits.calibration
    records = record_exits(ExitSession(with_fb.package), cal.x, cal.y)
    threshold, accuracy, _ = shared_threshold(records, 0.003)
    assert with_fb.threshold == threshold and with_fb.calibration["accuracy"] == accuracy


@pytest.mark.parametrize("quantiles", [(0.3, 0.7), (0.0, 0.2), (0.8, 1.0)])
def test_pipeline_decisions_equal_torch(build, exported, quantiles):
    with_fb, _, _ = exported
    x = build.splits.test.x
    t = _gap_threshold(_torch_entropy(_torch_light_logits(build, x)), *quantiles)
    model = build.model(fallback=True)
    exit_index, predictions, _, _ = reference_decisions(model, x, "entropy", [t])
    session = ExitSession(with_fb.package)
    result = session.run(x, thresholds=[t])
    np.testing.assert_array_equal(result.exit_index, exit_index)
    np.testing.assert_array_equal(result.predictions, predictions)
    for i in range(0, len(x), 7):
        one = session.run(x[i:i + 1], thresholds=[t])
        assert (one.exit_index[0], one.predictions[0]) == (exit_index[i], predictions[i])


def test_fallback_is_taken_exactly_when_the_light_exit_is_not_confident(build, exported):
    with_fb, _, _ = exported
    x = build.splits.test.x
    light_logits = _torch_light_logits(build, x)
    scores = _torch_entropy(light_logits)
    t = _gap_threshold(scores)
    session = ExitSession(with_fb.package, engine="stages")   # stage_ms shows which stages ran
    result = session.run(x, thresholds=[t])
    fallback = scores >= t
    assert 0 < fallback.sum() < len(x), "both paths must be taken"
    np.testing.assert_array_equal(result.exit_index == 1, fallback)
    # light path: the light exit's answer; fallback path: the full LeNet on the ORIGINAL image
    with torch.no_grad():
        full = build.blenet(torch.from_numpy(x))[1]
    want = np.where(fallback, full.argmax(1).numpy(), light_logits.argmax(1).numpy())
    np.testing.assert_array_equal(result.predictions, want)
    np.testing.assert_allclose(session.run_full(x), full.numpy(), rtol=1e-4, atol=1e-4)
    light_only = result.exit_index == 0
    assert result.stage_ms[1] > 0 and result.stage_ms[3] > 0
    assert session.run(x[light_only][:1], thresholds=[t]).stage_ms[2:] == (0.0, 0.0)


def test_light_only_variant_always_exits_at_the_light_exit(build, exported):
    _, light, _ = exported
    x = build.splits.test.x
    session = ExitSession(light.package)
    result = session.run(x)
    assert session.num_exits == 1 and (result.exit_index == 0).all()
    np.testing.assert_array_equal(result.predictions, _torch_light_logits(build, x).argmax(1).numpy())
    one = session.run(x[:1])
    assert one.exit_index[0] == 0 and one.predictions[0] == result.predictions[0]


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda x: x.astype(np.float64), InputDtypeError),
        (lambda x: x[:1].astype(np.float64), InputDtypeError),
        (lambda x: (x * 255).astype(np.uint8), InputDtypeError),
        (lambda x: x[:, :, :27], InputShapeError),
        (lambda x: x[:1, :, :, :27], InputShapeError),
        (lambda x: x[:, 0], InputShapeError),
        (lambda x: np.concatenate([x, x], axis=1), InputShapeError),
    ],
)
def test_bad_input_gives_typed_errors(build, exported, variant, make, error):
    session = ExitSession(exported[variant].package)
    with pytest.raises(error):
        session.run(np.ascontiguousarray(make(build.splits.test.x[:4])))


# --- data and weights ----------------------------------------------------------------


def test_digits_are_resized_like_mnist():
    splits = digits28_splits(0)
    assert (len(splits.train), len(splits.calibration), len(splits.test)) == (1197, 300, 300)
    x = splits.test.x
    assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    border = np.ones((28, 28), bool)
    border[4:24, 4:24] = False
    assert (x[:, 0][:, border] == 0).all(), "the digit sits in MNIST's central 20x20 box"
    again = digits28_splits(0)
    np.testing.assert_array_equal(again.test.y, splits.test.y)
    assert not np.array_equal(digits28_splits(1).test.y, splits.test.y)
    ones = resize_digits(np.ones((1, 1, 8, 8), np.float32))
    np.testing.assert_allclose(ones[0, 0, 4:24, 4:24], 1.0, rtol=0, atol=1e-6)


def test_unknown_dataset_is_refused():
    with pytest.raises(DataError, match="mnist5k, digits"):
        build_cbnet(dataset="cifar", log=None)


def test_weights_round_trip(build, tmp_path):
    path = build.save(tmp_path / "cbnet.pt")
    loaded = CBNetBuild.load(path)
    assert loaded.dataset == "digits" and loaded.converter.sizes == SIZES
    np.testing.assert_array_equal(loaded.exemplars, build.exemplars)
    np.testing.assert_array_equal(loaded.splits.test.y, build.splits.test.y)
    x = torch.from_numpy(build.splits.test.x[:16])
    with torch.no_grad():
        for a, b in zip(loaded.model()(x), build.model()(x)):
            assert torch.equal(a, b)


def test_loading_something_else_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(blenet().state_dict(), path)
    with pytest.raises(ModelSpecError, match=r"CBNetBuild\.save"):
        CBNetBuild.load(path)


# --- the real recipe (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_quickstart_on_mnist5k(tmp_path):
    from edgeexit.zoo.cbnet import run_cbnet_quickstart

    report = run_cbnet_quickstart(blenet_epochs=5, ae_epochs=10, seed=0, output_dir=tmp_path, log=lambda _l: None)
    assert report.sizes == (3000, 1000, 1000)
    assert report.accuracy["full"] > 0.9 and report.accuracy["light"] > 0.85
    assert report.accuracy["fallback"] >= report.accuracy["light"] - 0.01
    assert abs(sum(report.path_shares) - 1) < 1e-9
    assert all((p / "manifest.json").is_file() for p in report.packages.values())
    assert len(report.lines()) == 7 and report.weights.is_file()


def test_export_cbnet_from_the_cli(build, tmp_path):
    from click.testing import CliRunner

    from edgeexit.cli import cli

    weights = build.save(tmp_path / "cbnet.pt")
    out = tmp_path / "cbnet.eexit"
    result = CliRunner().invoke(cli, ["export", "cbnet", "--weights", str(weights), "-o", str(out),
                                      "--threshold", "0.2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "pipeline" and manifest["stages"][1]["exit"]["threshold"] == 0.2
    light = tmp_path / "light.eexit"
    result = CliRunner().invoke(cli, ["export", "cbnet", "--weights", str(weights), "-o", str(light),
                                      "--no-full-model"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((light / "manifest.json").read_text())["stages"]) == 2
    result = CliRunner().invoke(cli, ["export", "cbnet", "-o", str(tmp_path / "x.eexit")])
    assert result.exit_code == 2 and "cbnet needs weights" in result.output
