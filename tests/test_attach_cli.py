"""``edgeexit attach MODULE:FACTORY``: a user's unmodified network and .npz data to a calibrated package.

Real parts: sklearn's 8x8 digits, a small residual network written as a user would (its own
module file, imported by the command), torch.fx cuts, the exporter, onnxruntime.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("sklearn")

from click.testing import CliRunner  # noqa: E402

from edgeexit.cli import cli  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)


    class DigitNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.layer1 = Block(8)
            self.layer2 = Block(8)
            self.layer3 = Block(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, image):
            x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(image)))))
            return self.fc(x.mean((2, 3)))


    def digitnet():
        torch.manual_seed(0)
        return DigitNet()
''')


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("attach-cli")
    (folder / "usernet.py").write_text(USER_MODULE)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, val = order[:600], order[600:900]
    np.savez(folder / "train.npz", image=x[train], labels=y[train])
    np.savez(folder / "val.npz", image=x[val], labels=y[val])
    return folder


def _invoke(folder, args):
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)


def test_dry_run_lists_the_layers_with_shapes_and_time_shares(user_folder):
    result = _invoke(user_folder, ["attach", "usernet:digitnet", "--train-data", "train.npz", "--dry-run"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:] if line.split()}
    for layer in ("stem", "layer1", "layer2", "layer3"):
        assert layer in rows, result.output
    assert "(2, 8, 8, 8)" in rows["layer2"]
    shares = [float(rows[layer].split()[-1].rstrip("%")) for layer in ("layer1", "layer2", "layer3")]
    assert 0 < shares[0] < shares[1] < shares[2] <= 100, shares   # time before grows along the network
    assert not (user_folder / "digitnet.eexit").exists()


def test_attach_trains_calibrates_and_answers_as_the_unmodified_model(user_folder):
    import usernet  # the command put the folder on sys.path, as python -m would

    result = _invoke(user_folder, ["attach", "usernet:digitnet", "--at", "layer1", "--at", "layer2",
                                   "--train-data", "train.npz", "--calibrate-data", "val.npz", "--epochs", "2",
                                   "--max-drop", "5", "-o", "digitnet.eexit"])
    assert result.exit_code == 0, result.output
    assert "train accuracy per exit" in result.output and "temperature" in result.output
    path = user_folder / "digitnet.eexit"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["full_model"]["file"] == "full.onnx" and len(manifest["stages"]) == 3
    model = usernet.digitnet().eval()   # the same seed: the backbone the package was cut from
    with np.load(user_folder / "val.npz") as val:
        images = val["image"]
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    sess = ExitSession(path)
    np.testing.assert_allclose(sess.run_full(images), want, rtol=1e-5, atol=1e-5)   # full.onnx: the model
    np.testing.assert_allclose(sess.run_all_exits(images)[-1], want, rtol=1e-5, atol=1e-5)
    out = sess.run(images)
    assert out.logits.shape == (300, 10)


def test_attach_refuses_what_it_cannot_do(user_folder):
    result = _invoke(user_folder, ["attach", "usernet:digitnet", "--at", "layer9", "--train-data", "train.npz",
                                   "-o", "x.eexit"])
    assert result.exit_code == 2 and "layer9" in result.output and "layer1" in result.output, result.output
    result = _invoke(user_folder, ["attach", "usernet:digitnet", "--at", "layer1", "-o", "x.eexit"])
    assert result.exit_code == 2 and "--train-data" in result.output
    result = _invoke(user_folder, ["attach", "usernet:nothing", "--at", "layer1", "--train-data", "train.npz",
                                   "-o", "x.eexit"])
    assert result.exit_code == 2 and "no callable 'nothing'" in result.output
    assert not (user_folder / "x.eexit").exists()


def test_attach_onnx_cuts_a_model_file_at_tensor_names(user_folder):
    import warnings

    import usernet

    model = usernet.digitnet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(user_folder / "digitnet.onnx"), dynamo=False,
                          input_names=["image"], dynamic_axes={"image": {0: "batch"}})
    result = _invoke(user_folder, ["attach", "digitnet.onnx", "--dry-run"])
    assert result.exit_code == 0, result.output
    tensors = [line.split()[0] for line in result.output.splitlines()[1:] if "Relu" in line]
    assert len(tensors) >= 3, result.output   # the stem's and each block's ReLU
    result = _invoke(user_folder, ["attach", "digitnet.onnx", "--at", tensors[1], "--at", tensors[2],
                                   "--train-data", "train.npz", "--calibrate-data", "val.npz", "--epochs", "2",
                                   "--max-drop", "5", "-o", "digitnet-onnx.eexit"])
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output
    path = user_folder / "digitnet-onnx.eexit"
    assert (path / "full.onnx").read_bytes() == (user_folder / "digitnet.onnx").read_bytes()   # the model as given
    with np.load(user_folder / "val.npz") as val:
        images = val["image"]
    sess = ExitSession(path)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(sess.run_all_exits(images)[-1], want, rtol=1e-5, atol=1e-5)
    assert sess.run(images).logits.shape == (300, 10)
