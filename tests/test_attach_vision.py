"""Parity of attached exits on real architectures: torchvision ResNet-18, MobileNetV3-Small and a
ViT, timm ConvNeXt and EfficientNet, with random weights (nothing downloads), each cut at two
places, exported and run with onnxruntime.

For each: every exit equals its head on the unmodified model's hooked activation; the final exit
is the model's own output bit for bit (torch) and within float rounding (onnxruntime); with its
exits disabled the package answers what the model answers; the compiled graph answers like the
stage loop at batch 1, 7 and 64.  Inputs are small (32-64 px) to keep the file near a minute.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
pytest.importorskip("onnx")

from test_attach import _hooked, _spread  # noqa: E402

from edgeexit.export import attach_exits, export_package  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

CLASSES = 10
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=CLASSES), ["layer2", "layer3"], 64),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=CLASSES),
                           ["features.3", "features.8"], 64),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=CLASSES),
            ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2"], 32),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES),
                      ["stages.1", "stages.2"], 64),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=CLASSES),
                        ["blocks.2", "blocks.4"], 64),
}


def _inputs(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_exits_on_a_real_architecture_match_the_unmodified_model(name, tmp_path):
    make, cuts, size = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    exits = attach_exits(model, cuts, example_inputs={"image": _inputs(2, size, 1)}).eval()
    x = _inputs(64, size, 2)
    activations, _ = _hooked(model, cuts, x[:8])
    with torch.no_grad():
        got = exits(x[:8])
        for k, activation in enumerate(activations):
            assert torch.allclose(got[k], exits.exit_at(k).head(activation), atol=1e-5), (name, k)
        assert torch.equal(got[-1], model(x[:8]))              # the final exit is the model, bit for bit
        torch_exits = [t.numpy() for t in exits(x)]
        want = model(x).numpy()

    pkg = export_package(exits, {"image": _inputs(2, size, 1)}, tmp_path / f"{name}.eexit", log=None)
    sess = ExitSession(pkg.root)
    images = x.numpy()
    np.testing.assert_allclose(sess.run(images).logits, want, rtol=1e-4, atol=1e-4)   # exits disabled: the model
    for got_exit, want_exit in zip(sess.run_all_exits(images), torch_exits, strict=True):
        np.testing.assert_allclose(got_exit, want_exit, rtol=1e-4, atol=1e-4)
    thresholds = _spread(sess, images)
    assert sess.has_compiled, f"{name}: export made no compiled graph"
    for n in (1, 7, 64):
        compiled = sess.run(images[:n], thresholds=thresholds, engine="compiled")
        stages = sess.run(images[:n], thresholds=thresholds, engine="stages")
        np.testing.assert_array_equal(compiled.exit_index, stages.exit_index)
        np.testing.assert_allclose(compiled.logits, stages.logits, rtol=1e-5, atol=1e-5)
    assert len(set(sess.run(images, thresholds=thresholds).exit_index.tolist())) == len(cuts) + 1


def test_exits_on_an_onnx_export_of_a_torchvision_network(tmp_path):
    """What a user holding only model.onnx does: torchvision's ResNet-18 exported by torch, then cut
    at two tensor names of the ONNX graph (the last ReLU of layer2 and of layer3)."""
    import warnings

    import onnxruntime as ort

    from edgeexit.export import attach_onnx_exits
    from edgeexit.export.attach_onnx import cuttable_tensors

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES).eval()
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (_inputs(2, 64, 1),), str(path), dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch"}})
    names = [name for name, op, _ in cuttable_tensors(path) if op == "Relu"]
    cuts = [[n for n in names if n.startswith(f"/{layer}/")][-1] for layer in ("layer2", "layer3")]
    x = _inputs(64, 64, 2).numpy()
    labels = np.random.default_rng(0).integers(0, CLASSES, len(x))
    pkg = attach_onnx_exits(path, cuts, {"image": x}, labels, tmp_path / "r.eexit", epochs=1, log=None)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    sess = ExitSession(pkg.root)
    np.testing.assert_array_equal(sess.run(x).logits, want)                    # exits disabled: full.onnx, as given
    np.testing.assert_allclose(sess.run_all_exits(x)[-1], want, rtol=1e-5, atol=1e-5)   # the stages chained
    thresholds = _spread(sess, x)
    assert len(set(sess.run(x, thresholds=thresholds, engine="stages").exit_index.tolist())) == 3
