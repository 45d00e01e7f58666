"""attach_exits: exits on an unmodified network, cut at named layers of its fx graph.

The parity rule (DESIGN.md §11): every exit is its head on the model's own hooked activation,
the final exit is the model's output bit for bit, and the exported package answers what the
unmodified model answers with its exits disabled.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from torch import nn  # noqa: E402

from edgeexit.errors import ModelSpecError  # noqa: E402
from edgeexit.export import CutPoint, EarlyExitModel, attach_exits, cuttable_layers, export_package  # noqa: E402
from edgeexit.export.attach import TokenPool  # noqa: E402
from edgeexit.policies import get_policy  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

CLASSES = 10


# --- the networks, written as their authors would: no exits in sight ----------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SkipNet(nn.Module):
    """A skip connection that spans two cuts (``a``'s output is read after ``b`` and ``c``), a
    DenseNet-like concatenation, the input read again at the end, and a shape read across cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.dense = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(12 + 3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        a = self.a(x)
        y = self.c(self.b(a)) + a
        y = torch.cat([y, torch.relu(self.dense(y))], dim=1)
        features = torch.cat([y.mean(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)
        return self.fc(features.reshape(n, -1))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens).mean(dim=1))


CASES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "resnet": (SmallResNet, ["layer1", "layer2"]),
    "skips": (SkipNet, ["a", "b"]),
    "vit": (TinyViT, ["blocks.0", "blocks.1"]),
}


def _built(case: str) -> tuple[nn.Module, EarlyExitModel, torch.Tensor]:
    factory, cuts = CASES[case]
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():   # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    return model, attach_exits(model, cuts, example_inputs={"x": x}), x


def _hooked(model: nn.Module, layers: list[str], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's output in the unmodified model (a forward hook), and the model's output."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())) for name in layers]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[name] for name in layers], out


# --- parity in torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_exit_is_its_head_on_the_hooked_layer_and_the_last_is_the_model(case):
    model, exits, _ = _built(case)
    layers = CASES[case][1]
    x = torch.randn(6, 3, 16, 16)
    activations, expected = _hooked(model, layers, x)
    exits.eval()
    with torch.no_grad():
        got = exits(x)
        plain = model(x)
        for k, activation in enumerate(activations):
            head = exits.exit_at(k).head
            assert torch.allclose(got[k], head(activation), atol=1e-6), (case, k)
            assert got[k].shape == (6, CLASSES)
    assert torch.equal(got[-1], plain)
    assert torch.allclose(got[-1], expected, atol=1e-6)   # hooks may take another kernel (fast path off)
    assert exits.num_stages == len(layers) + 1 and exits.num_exits == len(layers) + 1


def test_the_model_is_not_modified_and_its_parameters_are_shared():
    model, exits, x = _built("resnet")
    assert not any(m.training for m in exits.modules())    # the new modules take the model's mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)
    exits.train()
    exits(x)            # train mode updates BatchNorm statistics: the model's own, shared
    exits.eval()
    model.eval()
    assert exits.stages[0].layer1.conv1.weight is model.layer1.conv1.weight
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(before)
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    assert type(model.layer1) is BasicBlock and not hasattr(model, "stages")


def test_the_skip_spanning_two_cuts_is_carried_by_both_stages():
    _, exits, x = _built("skips")
    with torch.no_grad():
        carry0 = exits.stages[0](x)
        carry1 = exits.stages[1](*carry0)
    # stage 0 hands on a's output (its exit reads it first) and the input, read again at the end;
    # stage 1 hands on b's output first, then, unchanged and in graph order, the input and a's output
    assert len(carry0) == 2 and torch.equal(carry0[1], x)
    assert len(carry1) == 3 and carry1[1] is carry0[1] and carry1[2] is carry0[0]


def test_automatic_heads_follow_the_layer_output():
    _, exits, _ = _built("resnet")
    head = exits.exit_at(0).head
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.AdaptiveAvgPool2d)
    assert head[2].in_features == 8 and head[2].out_features == CLASSES
    _, vit, x = _built("vit")
    assert isinstance(vit.exit_at(1).head[0], TokenPool) and vit.exit_at(1).head[0].token == "mean"
    first = attach_exits(TinyViT(), ["blocks.1"], example_inputs=(x,), token="first", classes=CLASSES)
    assert first.exit_at(0).head[0].token == "first"
    # a (batch, dim) layer gets a Linear
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(768, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    flat = attach_exits(mlp, ["2"], example_inputs={"x": x})
    assert isinstance(flat.exit_at(0).head, nn.Linear) and flat.exit_at(0).head.in_features == 32


def test_own_heads_are_used_and_checked():
    model, _, x = _built("resnet")
    mine = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))
    exits = attach_exits(model, ["layer2"], example_inputs={"x": x}, heads={"layer2": mine})
    assert exits.exit_at(0).head is mine
    with pytest.raises(ModelSpecError, match=r"missing \['layer1'\], not cut \['layer3'\]"):
        attach_exits(model, ["layer1"], example_inputs={"x": x}, heads={"layer3": mine})
    with pytest.raises(ModelSpecError, match="head for 'layer1' fails on its input of shape"):
        attach_exits(model, ["layer1"], example_inputs={"x": x}, heads={"layer1": mine})   # 16 features, not 8
    wide = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES + 1))
    with pytest.raises(ModelSpecError, match=r"returns \(4, 11\).*\(batch, classes\) = \(4, 10\)"):
        attach_exits(model, ["layer2"], example_inputs={"x": x}, heads={"layer2": wide})


class Masked(nn.Module):
    """An optional input left to its default, and an input name that is not forward's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        return self.fc(y.mean(dim=(2, 3)))


def test_inputs_left_to_their_defaults_and_names_given_in_order(tmp_path):
    torch.manual_seed(0)
    model = Masked().eval()
    x = torch.randn(3, 3, 16, 16)
    exits = attach_exits(model, ["conv"], example_inputs={"image": x}).eval()
    with torch.no_grad():
        assert torch.equal(exits(x)[-1], model(x))
    pkg = export_package(exits, {"image": x}, tmp_path / "m.eexit", compile=False, log=None)
    assert [i.name for i in pkg.inputs] == ["image"]
    np.testing.assert_allclose(ExitSession(pkg.root).run(x.numpy()).logits, model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_cuts_are_sorted_into_execution_order():
    model, _, x = _built("resnet")
    swapped = attach_exits(model, ["layer2", "layer1"], example_inputs={"x": x})
    assert [type(e.head[2]).__name__ for e in swapped.exit_modules[:2]] == ["Linear", "Linear"]
    assert swapped.exit_at(0).head[2].in_features == 8 and swapped.exit_at(1).head[2].in_features == 16


def test_cuttable_layers_lists_cut_points_in_order():
    model, _, x = _built("resnet")
    points = cuttable_layers(model, {"x": x})
    assert all(isinstance(p, CutPoint) for p in points)
    assert [p.order for p in points] == sorted(p.order for p in points)
    by_name = {p.name: p for p in points}
    assert by_name["layer1"].shape == (4, 8, 16, 16) and by_name["layer1"].kind == "BasicBlock"
    assert by_name["layer2"].dtype == "float32" and by_name["layer2"].carried == 1
    assert by_name["layer2.conv1"].carried == 2           # the block's shortcut input rides along
    assert "fc" not in by_name and "" not in by_name      # nothing after fc; the model itself is no layer
    vit_points = {p.name for p in cuttable_layers(TinyViT(), (x,))}
    assert {"blocks.0", "blocks.2", "patch"} <= vit_points and "blocks.0.linear1" not in vit_points


# --- refusals -----------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x + 1


class Odd(nn.Module):
    """A layer that returns a tuple, one never called, one that mixes samples, a dict output."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.pair = Pair()
        self.unused = nn.Linear(4, 4)
        self.batch_stats = nn.Identity()
        self.fc = nn.Linear(4, CLASSES)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        y, _ = self.pair(self.conv(x))
        centre = self.batch_stats(y.mean(dim=0))   # (4, H, W): statistics over the batch
        out = self.fc((self.conv2(y) - centre).mean(dim=(2, 3)))
        return {"logits": out} if self.as_dict else out


REFUSALS = [
    (Branchy, ["conv"], r"torch\.fx cannot trace Branchy: .*control flow.*torch\.fx\.wrap"),
    (SmallResNet, ["layer"], r"no layer 'layer'\. Did you mean 'layer1'\? Layers, nearest first: layer1, layer2, "
                             r"layer3, "),
    (SmallResNet, ["layr2"], r"no layer 'layr2'\. Did you mean 'layer2'\?"),
    (SmallResNet, ["fc"], r"cannot cut at 'fc': nothing is computed after it"),
    (SmallResNet, ["layer1", "layer1"], r"at names \['layer1'\] more than once"),
    (SmallResNet, ["stem", "stem.2"], r"cuts at 'stem' and 'stem\.2' fall at the same point"),
    (SmallResNet, [], r"non-empty list of layer names"),
    (TinyViT, ["blocks.0.linear1"], r"cannot cut at 'blocks\.0\.linear1': it is inside 'blocks\.0' "
                                    r"\(TransformerEncoderLayer\), which fx keeps as one op"),
    (Odd, ["unused"], r"cannot cut at 'unused': it is never called in forward"),
    (Odd, ["pair"], r"cannot cut at 'pair': it returns a tuple"),
    (Odd, ["batch_stats"], r"cannot cut at 'batch_stats': it returns a tensor of shape \(4, 14, 14\) without"),
    (Odd, ["conv2"], r"cannot cut at 'conv2': the value 'batch_stats' \(shape \(4, 14, 14\)\), made before the "
                     r"cut and read after it, has no batch axis 0"),
    (lambda: Odd(as_dict=True), ["conv"], r"Odd returns a dict; .*Wrap it"),
]


@pytest.mark.parametrize(("factory", "at", "message"), REFUSALS)
def test_cuts_that_cannot_be_made_are_typed_errors_naming_the_layer(factory, at, message):
    with pytest.raises(ModelSpecError, match=message):
        attach_exits(factory(), at, example_inputs={"x": torch.randn(2, 3, 16, 16)})


def test_classes_must_match_the_model_output():
    with pytest.raises(ModelSpecError, match="classes=3, but the model's output has 10 classes"):
        attach_exits(SmallResNet(), ["layer1"], example_inputs={"x": torch.randn(2, 3, 16, 16)}, classes=3)


# --- the exported package -----------------------------------------------------------------------


def _spread(sess: ExitSession, x: np.ndarray) -> list[float]:
    """Entropy thresholds that let about a third of the samples leave at each early exit."""
    policy = get_policy("entropy")
    return [float(np.quantile(policy.scores(logits), 0.35)) for logits in sess.run_all_exits(x)[:-1]]


@pytest.mark.parametrize("case", list(CASES))
def test_the_package_answers_what_the_unmodified_model_answers(case, tmp_path):
    model, exits, example = _built(case)
    pkg = export_package(exits, {"x": example}, tmp_path / f"{case}.eexit", log=None)
    assert not any(m.training for m in model.modules())   # the export left the model in eval mode
    assert pkg.thresholds == [None] * len(CASES[case][1]) and pkg.full_model is not None
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    exits.eval()
    with torch.no_grad():
        plain = model(x).numpy()
        torch_exits = [t.numpy() for t in exits(x)]
    sess = ExitSession(pkg.root)
    result = sess.run(x.numpy())
    np.testing.assert_allclose(result.logits, plain, rtol=1e-5, atol=1e-5)
    assert (result.exit_index == len(torch_exits) - 1).all()
    np.testing.assert_allclose(sess.run(x.numpy(), early_exits=False).logits, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(sess.run_all_exits(x.numpy()), torch_exits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    thresholds = _spread(sess, x.numpy())
    spread = sess.run(x.numpy(), thresholds=thresholds, engine="stages").exit_index
    assert len(set(spread.tolist())) == len(torch_exits), spread   # every exit takes some samples
    if not sess.has_compiled:
        pytest.skip("export made no compiled graph")
    for n in (1, 7, 64):
        compiled = sess.run(x[:n].numpy(), thresholds=thresholds, engine="compiled")
        stages = sess.run(x[:n].numpy(), thresholds=thresholds, engine="stages")
        np.testing.assert_array_equal(compiled.exit_index, stages.exit_index)
        np.testing.assert_allclose(compiled.logits, stages.logits, rtol=1e-5, atol=1e-6)
