"""Training exit heads on a backbone that stays as it is, or fine-tuning both together.

``train_exit_heads`` trains the early exits of an ``EarlyExitModel`` whose stages (and final
exit, the model's own classifier) come from a trained network.  By default only the heads
learn: every stage and the final exit are frozen (no gradient) and in eval mode for the whole
run, so BatchNorm keeps its running statistics and Dropout is off, and the backbone answers
bit for bit what it answered before (DESIGN.md section 11: the package must still answer
what the unmodified model answers).  Each batch runs the stages once, without autograd, and
every head learns from its stage's carry.  ``joint=True`` fine-tunes stages and heads
together instead (loss: every early exit's cross-entropy plus ``final_weight`` times the
final exit's), the backbone optionally at a smaller learning rate.

Data is a ``torch.utils.data.DataLoader`` of (inputs, labels) or numpy arrays
``(inputs, labels)``, e.g. from an ``.npz`` file (``load_training_npz``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datafiles import load_input_file
from ..errors import InputError, InputFileError
from .model import EarlyExitModel, as_tuple


@dataclass(frozen=True)
class TrainReport:
    """What ``train_exit_heads`` did.

    ``accuracies[epoch][exit]`` is each exit's accuracy on the training batches of that epoch,
    measured as they were trained on (the final exit's too, trained only with ``joint``).
    """

    accuracies: tuple[tuple[float, ...], ...]
    seconds: float
    samples: int              # per epoch
    joint: bool

    @property
    def final(self) -> tuple[float, ...]:
        """Each exit's training accuracy in the last epoch."""
        return self.accuracies[-1]


def load_training_npz(path: str | os.PathLike[str],
                      input_names: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs keyed by name (in ``input_names`` order) and the labels of an ``.npz`` file that has a
    ``labels`` array, as ``train_exit_heads`` takes them; an ``InputFileError`` otherwise."""
    inputs, labels = load_input_file(path, input_names)
    if labels is None:
        raise InputFileError(f"{path} has no 'labels' array; training needs one integer label per sample "
                             "(np.savez(path, labels=y, **inputs))")
    return {name: inputs[name] for name in input_names}, labels


def train_exit_heads(
    model: EarlyExitModel,
    data: Any,
    *,
    epochs: int = 5,
    lr: float = 1e-2,   # small heads on frozen features: 1e-3 left them underfit in 5 epochs
    batch_size: int = 64,
    seed: int = 0,
    joint: bool = False,
    final_weight: float = 1.0,
    backbone_lr: float | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainReport:
    """Train the early exits of ``model`` on labelled data, the backbone frozen unless ``joint``.

    Args:
        model: the stages (a trained backbone, cut) and exits; the last exit is the model's
            own classifier and belongs to the backbone.
        data: a ``DataLoader`` yielding ``(inputs, labels)`` (inputs a tensor, a tuple of
            tensors or a dict of them, passed to stage 0 in order), or numpy
            ``(inputs, labels)``, inputs an array or a dict of arrays (``load_training_npz``),
            shuffled here in batches of ``batch_size``.
        epochs, lr: passes over the data and Adam's learning rate.
        seed: seeds torch and the shuffling: the same call gives bit-identical weights.
        joint: fine-tune stages and heads together: loss = the early exits' cross-entropies
            + ``final_weight`` x the final exit's, stages in train mode.
        backbone_lr: the stages' and final exit's learning rate with ``joint`` (default ``lr``).
        progress: called with the number of samples of each step (a progress bar's update).
        log: one line per epoch with every exit's training accuracy (None: silent).

    Returns:
        A ``TrainReport``; ``model`` is trained in place and left in eval mode.

    Example:
        >>> model = EarlyExitModel(stages, [head0, None, model_fc])     # doctest: +SKIP
        >>> report = train_exit_heads(model, load_training_npz("train.npz", ["image"]))  # doctest: +SKIP
        >>> report.final                                                 # doctest: +SKIP
        (0.71, 0.83, 0.92)
    """
    _check_settings(model, epochs, lr, batch_size, joint, final_weight, backbone_lr)
    say = log or (lambda _line: None)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    final_head = model.exit_modules[-1]
    heads = list(model.exit_modules[:-1])
    backbone = [*model.stages, final_head]
    backbone_ids = {id(p) for m in backbone for p in m.parameters()}
    head_params = [p for h in heads for p in h.parameters() if id(p) not in backbone_ids]
    if not joint and not head_params:
        raise InputError("the model has no early exit with parameters of its own to train; attach exit heads "
                         "first, or pass joint=True to fine-tune the whole model")
    if joint:
        groups = [{"params": [p for m in backbone for p in m.parameters()], "lr": backbone_lr or lr}]
        groups += [{"params": head_params, "lr": lr}] if head_params else []
        optimizer = torch.optim.Adam(groups)
    else:
        optimizer = torch.optim.Adam(head_params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    trainable = {id(p): p.requires_grad for p in parameters}
    start, history, samples = perf_counter(), [], 0
    try:
        for p in parameters:
            p.requires_grad_(joint or id(p) not in backbone_ids)
        for epoch in range(epochs):
            model.train(joint)
            for h in heads:
                h.train()
            correct, samples = np.zeros(model.num_exits), 0
            for inputs, labels in _batches(data, batch_size, shuffle, device):
                if joint:
                    logits = [_logits(out) for out in model(*inputs)]
                else:
                    logits = _heads_only(model, inputs)
                loss = sum((loss_fn(z, labels) for z in logits[:-1]), torch.zeros((), device=device))
                if joint:
                    loss = loss + final_weight * loss_fn(logits[-1], labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    correct += [int((z.argmax(dim=1) == labels).sum()) for z in logits]
                samples += len(labels)
                if progress is not None:
                    progress(len(labels))
            if samples == 0:
                raise InputError("the training data yielded no samples")
            history.append(tuple(float(c) / samples for c in correct))
            say(f"epoch {epoch + 1}/{epochs}: train accuracy per exit "
                + " ".join(f"{a:.2%}" for a in history[-1]) + (" (joint)" if joint else " (heads only)"))
    finally:
        for p in parameters:
            p.requires_grad_(trainable[id(p)])
        model.eval()
    return TrainReport(tuple(history), perf_counter() - start, samples, joint)


def _heads_only(model: EarlyExitModel, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every exit's logits: the stages and the final exit once without autograd (frozen, eval
    mode), each early head with autograd on its stage's carry."""
    carries: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for k, stage in enumerate(model.stages):
            carries.append(as_tuple(stage(*model.stage_args(k, inputs, carries))))
        final = _logits(model.exit_modules[-1](*carries[model.exit_stage_indices[-1]]))
    early = [_logits(head(*carries[k])) for k, head in zip(model.exit_stage_indices[:-1], model.exit_modules[:-1])]
    return [*early, final]


def _logits(out: Any) -> torch.Tensor:
    """A head's logits: its output, or the first of ``(logits, *signals)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_settings(model: EarlyExitModel, epochs: int, lr: float, batch_size: int, joint: bool,
                    final_weight: float, backbone_lr: float | None) -> None:
    if not isinstance(model, EarlyExitModel):
        raise InputError(f"model must be an EarlyExitModel, got {type(model).__name__}; build one with "
                         "EarlyExitModel(stages, exits)")
    problems = []
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        problems.append(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value in (("lr", lr), ("backbone_lr", backbone_lr)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(final_weight, (int, float)) and math.isfinite(final_weight) and final_weight >= 0):
        problems.append(f"final_weight must be a number >= 0, got {final_weight!r}")
    if not joint and (backbone_lr is not None or final_weight != 1.0):
        problems.append("backbone_lr and final_weight apply to joint fine-tuning only; pass joint=True with them")
    if problems:
        raise InputError("; ".join(problems))


def _batches(data: Any, batch_size: int, shuffle: torch.Generator,
             device: torch.device) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """(inputs, labels) per step: from a DataLoader as it yields them, or from numpy arrays in a
    fresh shuffled order each epoch."""
    if isinstance(data, torch.utils.data.DataLoader):
        for item in data:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InputError("a training DataLoader must yield (inputs, labels) pairs")
            yield _as_inputs(item[0], device), _as_labels(item[1], device)
        return
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputError(f"data must be a DataLoader or (inputs, labels) arrays, got {type(data).__name__}")
    raw, labels = data
    arrays = list(raw.values()) if isinstance(raw, Mapping) else [raw]
    arrays = [np.asarray(a) for a in arrays]
    y = np.asarray(labels)
    if not arrays or any(a.ndim == 0 or len(a) != len(y) for a in arrays) or y.ndim != 1:
        raise InputError(f"inputs and labels must hold the same number of samples along axis 0; got inputs "
                         f"{[a.shape for a in arrays]} and labels {y.shape}")
    order = torch.randperm(len(y), generator=shuffle).numpy()
    for begin in range(0, len(y), batch_size):
        rows = order[begin:begin + batch_size]
        yield (tuple(torch.from_numpy(np.ascontiguousarray(a[rows])).to(device) for a in arrays),
               _as_labels(torch.from_numpy(y[rows]), device))


def _as_inputs(value: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value.to(device),)
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.to(device) for v in value)
    raise InputError(f"training inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
                     f"{type(value).__name__}")


def _as_labels(value: Any, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(value)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices of shape (batch,), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return labels.to(device=device, dtype=torch.int64)
