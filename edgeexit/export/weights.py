"""Reading a weights file without running code: ``torch.load(weights_only=True)`` and typed refusals."""

from __future__ import annotations

import os
from typing import Any


def read_tensors(path: str | os.PathLike[str], what: str = "a plain state_dict of tensors") -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (nothing unpickled runs).

    Anything else — a pickle of objects, an empty or truncated file — is an ``InputFileError``
    that never advises ``weights_only=False``: that would run the file's code."""
    import pickle
    import warnings

    import torch

    from ..errors import InputFileError

    try:
        with warnings.catch_warnings():   # a plain pickle (not torch.save's) is refused below; no aside about it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError,
            IndexError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first:   # torch's advice to unpickle anyway: never repeat it
            first = "it holds Python objects, not only tensors"
        raise InputFileError(
            f"{path} is not {what} ({first[:160]}); loading it would run pickled code, which edgeexit never "
            "does. Save weights with torch.save(model.state_dict(), path)"
        ) from None
