"""``edgeexit export hf MODEL_DIR``: exits on a Hugging Face model folder, trained on the user's data."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .._logging import logger


def _training_data(path: Path, modality: str, text_column: str, label_column: str
                   ) -> tuple[list[str] | None, np.ndarray | None, list[str]]:
    from ..datafiles import TABLE_SUFFIXES, load_input_file, load_labelled_texts
    from ..errors import InputFileError

    if modality == "text":
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise click.UsageError(f"--train-data {path}: a text model trains on labelled texts in a "
                                   f"{'/'.join(TABLE_SUFFIXES)} file (--text-column, --label-column)")
        texts, labels = load_labelled_texts(path, text_column, label_column)
        return texts, None, labels
    inputs, y = load_input_file(path, ["pixel_values"])
    if y is None:
        raise InputFileError(f"{path} has no 'labels' array; save np.savez(path, pixel_values=x, labels=y)")
    return None, inputs["pixel_values"], [str(int(v)) for v in y]


def export_hf_command(model_dir: str | None, output: Path, *, train_data: Path | None, text_column: str,
                      label_column: str, exits_at: tuple[int, ...], heads: str, finetune: bool, epochs: int | None,
                      max_tokens: int, batch_size: int, seed: int, policy: str, thresholds: tuple[float, ...],
                      name: str | None, compile_graph: bool, calibrate_data: Path | None, max_drop: float,
                      force: bool) -> None:
    """The work of ``export hf``; the checks of every export (output, --force) ran before."""
    from ..export.hf import export_hf, load_hf
    from .calibrate import run_calibration

    if model_dir is None:
        raise click.UsageError("export hf needs the model folder: edgeexit export hf MODEL_DIR -o PKG --train-data "
                               "train.csv")
    if train_data is None:
        raise click.UsageError("export hf trains the exit heads on your labelled data: pass --train-data "
                               "train.csv|tsv|jsonl (images: an .npz with pixel_values and labels)")
    modality = load_hf(model_dir).modality
    texts, images, labels = _training_data(train_data, modality, text_column, label_column)
    export_hf(model_dir, output, texts=texts, images=images, labels=labels, exits_at=list(exits_at) or None,
              pooling=heads, finetune=finetune, epochs=epochs or 60, max_tokens=max_tokens, batch_size=batch_size,
              policy=policy, thresholds=list(thresholds) or None, name=name,
              compile=None if compile_graph else False, seed=seed, overwrite=force, log=logger.info)
    if calibrate_data is not None:
        run_calibration(output, calibrate_data, max_drop=max_drop, text_column=text_column, label_column=label_column)
