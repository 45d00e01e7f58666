"""``run`` and ``calibrate`` on a seq2seq package (MuE): image + question data, generated answers."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import click
import numpy as np

from .._logging import logger
from ..errors import InputFileError
from ._shared import emit_json, write_text_atomic


def load_seq2seq_data(path: Path, package: Any) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The package's inputs from an .npz, and reference answers ('answers', strings) if present.

    A token-id input may be given as strings instead (e.g. ``question``: "is it even"); they are
    turned into ids with the manifest's vocabulary."""
    from ..datafiles import load_input_file
    from ..errors import InputError
    from ..runtime.seq2seq import encode_texts

    inputs, _ = load_input_file(path, [i.name for i in package.inputs], ignore=("answers",))  # checks the file first
    for spec in package.inputs:
        value = inputs[spec.name]
        if value.dtype.kind == "U" and spec.dtype in ("int64", "int32"):
            if value.ndim != 1:
                raise InputFileError(f"{path}: {spec.name!r} as text must be a 1-D array of strings, one per "
                                     f"sample; got shape {value.shape}")
            try:
                ids = encode_texts(package.seq2seq, value.tolist(), int(spec.shape[1]), spec.name)
            except InputError as exc:
                raise InputFileError(f"{path}: {exc}") from None
            inputs[spec.name] = ids.astype(spec.dtype)
    with np.load(path, allow_pickle=False) as data:
        if "answers" not in data.files:
            return inputs, None
        raw = data["answers"]
    if raw.dtype.kind != "U" or raw.ndim != 1:
        raise InputFileError(f"{path}: 'answers' must be a 1-D array of strings, got {raw.dtype} {raw.shape}")
    answers = [str(a) for a in raw]
    n = next(iter(inputs.values())).shape[0]
    if len(answers) != n:
        raise InputFileError(f"{path}: 'answers' holds {len(answers)} strings for {n} samples; give one per sample")
    return inputs, answers


def run_seq2seq(session: Any, input_file: Path, output: Path | None, batch_size: int, show: int,
                as_json: bool) -> None:
    """``edgeexit run`` on a seq2seq package: generate an answer per sample, report exact matches."""
    inputs, answers = load_seq2seq_data(input_file, session.package)
    n = next(iter(inputs.values())).shape[0]
    texts: list[str] = []
    decoder_layers: list[float] = []
    encoder_layers: dict[str, list[int]] = {}
    for start in range(0, n, batch_size):
        out = session.generate({k: v[start:start + batch_size] for k, v in inputs.items()})
        texts += out.text
        decoder_layers += [float(np.mean(d)) for d in out.decoder_layers]
        for name, layers in out.encoder_layers.items():
            encoder_layers.setdefault(name, []).extend(int(v) for v in layers)
    correct = [t == a for t, a in zip(texts, answers)] if answers is not None else None
    if as_json or (output is not None and output.suffix.lower() == ".json"):
        emit_json("run", {"package": str(session.package.root), "samples": n, "answers": texts,
                          "encoder_layers": encoder_layers, "decoder_layers_per_token": decoder_layers,
                          "exact_match": None if correct is None else float(np.mean(correct))},
                  as_json, output if output is not None and output.suffix.lower() == ".json" else None)
        if as_json:
            return
    for i in range(min(show, n)):
        mark = "" if correct is None else ("  ok" if correct[i] else f"  (expected: {answers[i]})")  # type: ignore[index]
        click.echo(f"sample {i:>5}: {texts[i]!r}{mark}")
    if n > show:
        click.echo(f"... {n - show} more")
    means = ", ".join(f"{name} {np.mean(v):.2f}" for name, v in encoder_layers.items())
    click.echo(f"{n} samples; encoder layers per modality (mean): {means}; decoder layers per token (mean): "
               f"{np.mean(decoder_layers):.2f}")
    if correct is not None:
        click.echo(f"exact match: {np.mean(correct):.2%} ({sum(correct)}/{n})")
    if output is not None and output.suffix.lower() != ".json":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["sample", "answer", "decoder_layers_per_token"] + [f"encoder_layers_{m}" for m in
                                                                            encoder_layers])
        for i in range(n):
            writer.writerow([i, texts[i], f"{decoder_layers[i]:.3f}"] + [encoder_layers[m][i] for m in encoder_layers])
        write_text_atomic(output, buf.getvalue())
        click.echo(f"wrote {output}")


def calibrate_seq2seq_cli(package: Path, data_file: Path, max_drop: float, dry_run: bool, as_json: bool) -> None:
    """``edgeexit calibrate`` on a seq2seq package: the loosest MuE thresholds that keep at least
    (100 - max_drop) % of the exact match the package reaches with every exit off."""
    from ..calibrate_seq2seq import choose_thresholds, write_thresholds
    from ..runtime import ExitSession

    if not 0 <= max_drop < 100:
        raise click.UsageError(f"--max-drop is in accuracy points, from 0 to under 100; got {max_drop}")
    session = ExitSession(package)
    inputs, answers = load_seq2seq_data(data_file, session.package)
    if answers is None:
        raise InputFileError(f"{data_file} has no 'answers' (one reference answer string per sample); calibration "
                             "needs them to count exact matches")
    chosen, joint, full_acc = choose_thresholds(session, inputs, answers, 1 - max_drop / 100,
                                                log=logger.info)
    say = (lambda _line: None) if as_json else click.echo
    say(f"{len(answers)} samples; exact match with every exit off: {full_acc:.2%}; thresholds keeping "
        f">= {100 - max_drop:g}% of it: {chosen} (one joint encoder exit: {joint})")
    if not dry_run:
        write_thresholds(package, chosen)
        say(f"wrote the thresholds into {package}")
    if as_json:
        emit_json("calibrate", {"package": str(package), "samples": len(answers), "full_accuracy": full_acc,
                                "thresholds": chosen, "joint_encoder_threshold": joint, "written": not dry_run},
                  True, None)
