"""From an unmodified network and labelled data to an exit package: attach, train, export, scale.

``attach_package`` is what ``edgeexit attach MODULE:FACTORY`` runs: it cuts the model at the
named layers (``attach_exits``), trains the heads with the backbone frozen (or jointly,
``train_exit_heads``), exports every stage with ``full.onnx`` (the unmodified model) and the
compiled graph, and, given calibration data, fits one temperature per early exit on it and
reports each exit's expected calibration error before and after.  The exits stay disabled
until thresholds are chosen (``edgeexit calibrate``, or the command's ``--calibrate-data``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelSpecError
from .attach import attach_exits
from .exporter import export_package
from .train_heads import train_exit_heads


@dataclass(frozen=True)
class AttachReport:
    """What ``attach_package`` did, with the time each step took (seconds)."""

    package: Path
    cuts: tuple[str, ...]
    train_accuracy: tuple[float, ...]            # per exit, after the last epoch (the final exit: the model's)
    temperatures: tuple[float, ...] = ()         # per early exit, when calibration data was given
    ece_before: tuple[float, ...] = ()
    ece_after: tuple[float, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"exits after {', '.join(self.cuts)}; train accuracy per exit: "
               + ", ".join(f"{a:.2%}" for a in self.train_accuracy)]
        for k, (t, before, after) in enumerate(zip(self.temperatures, self.ece_before, self.ece_after)):
            out.append(f"exit {k} ({self.cuts[k]}): temperature {t:.3f}, expected calibration error "
                       f"{before:.4f} -> {after:.4f}")
        out.append("time: " + ", ".join(f"{step} {s:.1f} s" for step, s in self.seconds.items()))
        return out


def _tensors(inputs: Mapping[str, np.ndarray], rows: slice) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value[rows])) for name, value in inputs.items()}


def example_from(inputs: Mapping[str, np.ndarray], n: int = 2) -> dict[str, torch.Tensor]:
    """The first ``n`` samples of ``inputs`` as the example tensors a trace or export runs on."""
    return _tensors(inputs, slice(0, n))


def network_from(made: Any, where: str, weights: str | Path | None = None
                 ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """What a factory returned — a network, or (network, {input_name: example}) — checked, with
    ``weights`` (a state_dict file) loaded into it, in eval mode."""
    net, example = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"{where} returned {type(net).__name__}; it must return a torch.nn.Module, or "
                             "(module, {input_name: example_tensor})")
    if example is not None and not (isinstance(example, dict) and all(
            isinstance(v, torch.Tensor) for v in example.values())):
        raise ModelSpecError(f"{where}: the second value it returns must be {{input_name: example_tensor}}")
    if weights is not None:
        from .weights import read_tensors

        try:
            net.load_state_dict(read_tensors(weights))
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelSpecError(f"{weights} does not fit {where}: {first[:300]}") from None
    return net.eval(), example


def scale_temperatures(path: str | Path, inputs: Mapping[str, np.ndarray], labels: np.ndarray, *,
                       log: Callable[[str], None] | None = print) -> list[Any]:
    """Fit and store a temperature per exit (``calibrate_temperatures``), then rebuild the compiled
    graph, which divides by the temperatures it was built with; one ``TemperatureFit`` per exit."""
    from ..calibrate import calibrate_temperatures
    from ..package import load_package
    from .compile import compile_package

    fits = calibrate_temperatures(path, dict(inputs), np.asarray(labels))
    if load_package(path).compiled is not None:
        compile_package(path, log=log)
    return fits


def attach_package(model: nn.Module, at: Sequence[str], *, train: tuple[Mapping[str, np.ndarray], np.ndarray],
                   output: str | Path, calibration: tuple[Mapping[str, np.ndarray], np.ndarray] | None = None,
                   heads: str | Mapping[str, nn.Module] = "auto", token: str = "mean", epochs: int = 5,
                   lr: float = 1e-2, batch_size: int = 64, joint: bool = False, final_weight: float = 1.0,
                   seed: int = 0, labels: Sequence[str] | None = None, name: str | None = None,
                   policy: str = "entropy", overwrite: bool = False,
                   progress: Callable[[int], None] | None = None,
                   log: Callable[[str], None] | None = print) -> AttachReport:
    """Attach exits to ``model`` at ``at``, train them on ``train`` (inputs by name, labels), and
    write the package to ``output``; with ``calibration``, fit and store a temperature per exit.

    Example:
        >>> report = attach_package(resnet, ["layer2", "layer3"], train=(x, y), output="r.eexit")  # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    inputs, targets = train
    if len(targets) < 2:
        raise ModelSpecError(f"training data holds {len(targets)} sample(s); heads need at least 2 to train")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    example = _tensors(inputs, slice(0, 2))
    exits = attach_exits(model, at, example_inputs=example, heads=heads, token=token)
    seconds["attach"] = time.perf_counter() - start

    start = time.perf_counter()
    trained = train_exit_heads(exits, (dict(inputs), np.asarray(targets)), epochs=epochs, lr=lr,
                               batch_size=batch_size, seed=seed, joint=joint, final_weight=final_weight,
                               progress=progress, log=log)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    package = export_package(exits, example, output, policy=policy, thresholds=None, labels=list(labels or []) or None,
                             name=name or type(model).__name__, seed=seed, overwrite=overwrite, log=log)
    seconds["export"] = time.perf_counter() - start
    report = AttachReport(package=Path(package.root), cuts=tuple(at), train_accuracy=tuple(trained.final),
                          seconds=seconds)
    if calibration is None:
        return report

    start = time.perf_counter()
    fitted = scale_temperatures(package.root, *calibration, log=log)[:-1]   # the early exits
    seconds["temperatures"] = time.perf_counter() - start
    say("temperature per early exit (expected calibration error before -> after): " + ", ".join(
        f"{t:.3f} ({b:.4f} -> {a:.4f})" for t, b, a in fitted))
    return AttachReport(package=report.package, cuts=report.cuts, train_accuracy=report.train_accuracy,
                        temperatures=tuple(t for t, _, _ in fitted), ece_before=tuple(b for _, b, _ in fitted),
                        ece_after=tuple(a for _, _, a in fitted), seconds=seconds)

