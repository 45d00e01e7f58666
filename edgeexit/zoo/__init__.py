"""Reference early-exit models (need torch) and their training recipes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .._names import did_you_mean
from ..errors import ModelSpecError
from ..export.model import EarlyExitModel
from ..export.weights import read_tensors as read_tensors
from .blenet import blenet as blenet
from .bresnet import bresnet as bresnet

ZOO: dict[str, Callable[[], EarlyExitModel]] = {"blenet": blenet, "bresnet": bresnet}


def load_weights(model: EarlyExitModel, path: str) -> EarlyExitModel:
    """Load a state_dict saved with ``torch.save(model.state_dict(), path)``."""
    from ..errors import InputFileError

    state = read_tensors(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} does not fit this model: {first[:300]}") from None
    return model.eval()


def save_weights(model: EarlyExitModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` atomically (``load_weights`` reads it back)."""
    import torch

    from .._atomic import replace_atomically

    return replace_atomically(path, lambda f: torch.save(model.state_dict(), f))


def example_images(n: int = 4, seed: int = 0) -> dict[str, object]:
    """Example inputs for exporting a 28x28 zoo model: ``{"image": tensor (n, 1, 28, 28)}``."""
    import torch

    return {"image": torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))}


def get_model(name: str, seed: int | None = None) -> EarlyExitModel:
    """An untrained zoo model by name; ``seed`` makes its initial weights reproducible."""
    import torch

    if name not in ZOO:
        raise ModelSpecError(
            f"unknown zoo model {name!r}; available: {', '.join(sorted(ZOO))}." + did_you_mean(name, ZOO)
        )
    if seed is not None:
        torch.manual_seed(seed)
    return ZOO[name]()
