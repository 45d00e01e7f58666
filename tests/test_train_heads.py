"""Training exit heads with the backbone frozen, or jointly: ``train_exit_heads``.

Heads-only training must leave the backbone bit for bit as it was (parameters, BatchNorm
running statistics, outputs), a seed must make training reproducible bit for bit, and joint
fine-tuning must move the backbone.  Data comes as numpy arrays, an ``.npz`` file or a
``DataLoader``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from edgeexit.errors import InputError, InputFileError  # noqa: E402
from edgeexit.export import EarlyExitModel, load_training_npz, train_exit_heads  # noqa: E402
from edgeexit.export.train_heads import TrainReport  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES = 3


def _backbone(seed: int = 0) -> EarlyExitModel:
    """A 'trained' backbone (BatchNorm with running statistics of its own, Dropout) with fresh exit
    heads after stages 0 and 1; the final exit is the backbone's own classifier."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3)),
              nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    exits = [nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 64, CLASSES)),
             nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, CLASSES)),
             nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))]
    model = EarlyExitModel(stages, exits)
    model.train()
    with torch.no_grad():   # running statistics that are not BatchNorm's defaults
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def _data(n: int = 192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is the quadrant with the largest mean: learnable by a linear head."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    for i, c in enumerate(y):
        x[i, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 1.5
    return x, y.astype(np.int64)


def _backbone_state(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    """Every stage's and the final exit's parameters and buffers (BatchNorm statistics included)."""
    parts = {f"stages.{k}": m for k, m in enumerate(model.stages)}
    parts["final"] = model.exit_modules[-1]
    return {f"{name}.{key}": value.clone() for name, m in parts.items() for key, value in m.state_dict().items()}


@torch.no_grad()
def _stage_outputs(model: EarlyExitModel, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    carries, outs = [], []
    for k, stage in enumerate(model.stages):
        carries.append((stage(*model.stage_args(k, (x,), carries)),))
        outs.append(carries[-1][0].clone())
    outs.append(model.exit_modules[-1](*carries[-1]).clone())
    return outs


def test_heads_only_training_leaves_the_backbone_bit_for_bit_as_it_was() -> None:
    model = _backbone()
    probe = torch.from_numpy(_data(16, seed=9)[0])
    state, outputs = _backbone_state(model), _stage_outputs(model, probe)
    heads_before = [p.clone() for h in model.exit_modules[:-1] for p in h.parameters()]
    assert any("running_mean" in k for k in state) and any("num_batches_tracked" in k for k in state)
    report = train_exit_heads(model, _data(), epochs=2, batch_size=32, log=None)
    after = _backbone_state(model)
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    for before, now in zip(outputs, _stage_outputs(model, probe)):
        assert torch.equal(before, now)
    heads_after = [p for h in model.exit_modules[:-1] for p in h.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, heads_after))   # the heads did learn
    assert not model.training and all(p.requires_grad for p in model.parameters())   # as it was given
    assert isinstance(report, TrainReport) and not report.joint and report.samples == 192


def test_the_stages_are_frozen_and_in_eval_mode_during_training() -> None:
    model = _backbone()
    seen = []

    def look(module: nn.Module, _inputs: object) -> None:
        seen.append((module.training, torch.is_grad_enabled(),
                     any(p.requires_grad for p in module.parameters())))

    hooks = [s.register_forward_pre_hook(look) for s in model.stages]
    hooks.append(model.exit_modules[-1].register_forward_pre_hook(look))
    train_exit_heads(model, _data(64), epochs=1, batch_size=32, log=None)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 4   # two batches: three stages and the final exit each run once per batch
    assert set(seen) == {(False, False, False)}


def test_a_seed_makes_training_bit_for_bit_reproducible() -> None:
    states = []
    for _ in range(2):
        model = _backbone()
        train_exit_heads(model, _data(), epochs=2, batch_size=24, seed=7, log=None)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = _backbone()
    train_exit_heads(other, _data(), epochs=2, batch_size=24, seed=8, log=None)
    assert not all(torch.equal(states[0][k], other.state_dict()[k]) for k in states[0])


def test_the_heads_learn_and_every_epoch_is_logged() -> None:
    model = _backbone()
    lines: list[str] = []
    done: list[int] = []
    report = train_exit_heads(model, _data(384), epochs=4, batch_size=32, lr=1e-2, log=lines.append,
                              progress=done.append)
    assert len(report.accuracies) == 4 and all(len(a) == 3 for a in report.accuracies)
    assert report.final == report.accuracies[-1] and report.seconds > 0
    assert report.accuracies[-1][0] > report.accuracies[0][0] and report.accuracies[-1][0] > 0.6
    assert report.accuracies[0][2] == report.accuracies[-1][2]   # the final exit is the frozen backbone's
    assert len(lines) == 4 and lines[0].startswith("epoch 1/4: train accuracy per exit ")
    assert lines[-1].endswith("(heads only)") and lines[-1].count("%") == 3
    assert sum(done) == 4 * 384 and max(done) == 32


def test_joint_fine_tuning_moves_the_backbone_at_its_own_learning_rate() -> None:
    model = _backbone()
    state = _backbone_state(model)
    lines: list[str] = []
    report = train_exit_heads(model, _data(), epochs=1, batch_size=32, joint=True, final_weight=2.0,
                              backbone_lr=1e-4, log=lines.append)
    after = _backbone_state(model)
    assert report.joint and lines[0].endswith("(joint)")
    weight = "stages.0.0.weight"
    assert not torch.equal(after[weight], state[weight])
    assert not torch.equal(after["stages.0.1.running_mean"], state["stages.0.1.running_mean"])   # train mode
    # Adam moves each weight by about the learning rate per step: 6 steps at 1e-4
    assert (after[weight] - state[weight]).abs().max() < 6 * 1e-4 * 1.5
    assert not model.training


def test_a_dataloader_and_an_npz_file_train_like_arrays(tmp_path: Path) -> None:
    x, y = _data(96)
    np.savez(tmp_path / "train.npz", image=x, labels=y)
    inputs, labels = load_training_npz(tmp_path / "train.npz", ["image"])
    assert list(inputs) == ["image"] and np.array_equal(labels, y)
    from_arrays, from_file = _backbone(), _backbone()
    train_exit_heads(from_arrays, (x, y), epochs=1, batch_size=32, log=None)
    train_exit_heads(from_file, (inputs, labels), epochs=1, batch_size=32, log=None)
    assert all(torch.equal(a, b) for a, b in zip(from_arrays.state_dict().values(),
                                                 from_file.state_dict().values()))
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    done: list[int] = []
    report = train_exit_heads(_backbone(), loader, epochs=2, log=None, progress=done.append)
    assert sum(done) == 2 * 96 and report.samples == 96
    dicts = DataLoader([({"image": torch.from_numpy(x[i])}, int(y[i])) for i in range(96)], batch_size=48)
    assert train_exit_heads(_backbone(), dicts, epochs=1, log=None).samples == 96


def test_an_npz_file_without_labels_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", image=_data(8)[0])
    with pytest.raises(InputFileError, match="no 'labels' array; training needs one integer label per sample"):
        load_training_npz(tmp_path / "x.npz", ["image"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"backbone_lr": 1e-4}, "apply to joint fine-tuning only"),
    ({"joint": True, "final_weight": -1.0}, "final_weight must be a number >= 0"),
])
def test_bad_settings_are_refused_before_any_step(kwargs: dict[str, object], message: str) -> None:
    model = _backbone()
    state = _backbone_state(model)
    with pytest.raises(InputError, match=message):
        train_exit_heads(model, _data(8), log=None, **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(v, _backbone_state(model)[k]) for k, v in state.items())


@pytest.mark.parametrize(("data", "message"), [
    ((np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64)), "same number of samples"),
    ((np.zeros((4, 1, 8, 8), np.float32), np.zeros(4)), "labels must be integer class indices"),
    ("train.npz", "data must be a DataLoader or \\(inputs, labels\\) arrays"),
])
def test_bad_data_is_refused(data: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        train_exit_heads(_backbone(), data, log=None)


def test_a_model_without_early_heads_needs_joint() -> None:
    model = EarlyExitModel([nn.Flatten()], [nn.Linear(64, CLASSES)])
    with pytest.raises(InputError, match="no early exit with parameters of its own"):
        train_exit_heads(model, _data(8), log=None)
    assert train_exit_heads(model, _data(8), joint=True, log=None).accuracies
