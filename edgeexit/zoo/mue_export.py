"""``edgeexit export mue``'s work: the zoo's MuE model, from saved weights or trained here, exported
as a seq2seq package."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..export.seq2seq import export_mue
from . import load_weights, save_weights
from .mue import MuEConfig, MuEModel, train_mue
from .mue_quickstart import EPOCHS as MUE_EPOCHS
from .mue_task import mnist_qa_splits


def export_zoo_mue(output: Path, *, weights: Path | None, epochs: int | None, seed: int,
                   thresholds: Sequence[float] | None, overwrite: bool, log: Callable[[str], None],
                   say: Callable[[str], None], progress: Callable[[str, int], Any] | None = None) -> None:
    """Export the zoo's MuE to ``output``: its weights from ``weights``, or trained here for ``epochs``
    (default ``MUE_EPOCHS``) and saved beside ``output``; ``thresholds`` are the image, text and
    decoder similarity thresholds, or None to leave the exits disabled."""
    torch.manual_seed(seed)
    model = MuEModel(MuEConfig())
    if weights is not None:
        load_weights(model, str(weights))   # type: ignore[arg-type]
    else:
        splits = mnist_qa_splits(seed)
        log(f"training mue on {len(splits.train):,} question-answer pairs ({epochs or MUE_EPOCHS} epochs)")
        rounds = epochs or MUE_EPOCHS
        if progress is None:
            history = train_mue(model, splits, epochs=rounds, seed=seed)
        else:   # a progress bar over every training sample of every epoch
            with progress("training mue", rounds * len(splits.train)) as bar:
                history = train_mue(model, splits, epochs=rounds, seed=seed, progress=bar.update)
        log(f"training loss per epoch: {', '.join(f'{h:.3f}' for h in history)}")
        weights_file = save_weights(model, output.parent / f"{output.name.removesuffix('.eexit')}.pt")  # type: ignore[arg-type]
        say(f"saved the trained weights to {weights_file} (export again with --weights {weights_file})")
    enc = (thresholds[0], thresholds[1]) if thresholds else (None, None)
    export_mue(model, output, encoder_thresholds=enc, decoder_threshold=thresholds[2] if thresholds else None,
               overwrite=overwrite, log=log)
