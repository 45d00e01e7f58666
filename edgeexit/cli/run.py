"""``edgeexit run``: a package on an input file, per-sample results and exit shares."""

from __future__ import annotations

from pathlib import Path

import click

from .._logging import logger, logging_options
from ._shared import check_outputs, check_suffix, emit_json, say_wrote


@click.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the results to .npz (with logits), .csv or .json.")
@click.option("--threshold", "thresholds", type=float, multiple=True, help="Override one early exit's threshold.")
@click.option("--policy", default=None, help="Override the package's exit policy (with --threshold).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Samples per ExitSession.run call.")
@click.option("--show", default=10, show_default=True, help="Print this many per-sample lines.")
@click.option("--engine", type=click.Choice(["auto", "compiled", "stages"]), default="auto", show_default=True,
              help="auto: the compiled graph when the package has one and the policy is compiled in.")
@click.option("--device", default=None, help="Device profile (cpu, rpi4, rpi5, jetson, cuda, tensorrt, auto); "
              "default: onnxruntime's CPU provider, 1 thread.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per session (default: the profile's).")
@click.option("--allow-fallback", is_flag=True, help="Warn instead of failing when a provider is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (and accuracy) as one JSON object on stdout.")
def run(package: Path, input_file: Path, output: Path | None, thresholds: tuple[float, ...], policy: str | None,
        batch_size: int, show: int, engine: str, device: str | None, threads: int | None,
        allow_fallback: bool, as_json: bool) -> None:
    """Run PACKAGE on INPUT (.npy, or .npz with arrays named after the inputs and optional labels; .txt, one
    text per line, for a package that ships its tokenizer)."""
    check_outputs(output)   # before any inference: a bad -o must not waste the run
    check_suffix(output, (".npz", ".csv", ".json"))
    import numpy as np

    from ..datafiles import load_input_file, save_results_atomic
    from ..runtime import ExitSession
    from ..runtime._image import image_settings, pixels_from_images

    session = ExitSession(package, engine=engine, device=device, threads=threads, allow_fallback=allow_fallback)
    if session.package.kind == "seq2seq":
        from ._seq2seq import run_seq2seq

        if thresholds or policy:
            raise click.UsageError("--threshold/--policy apply to classifier packages; seq2seq thresholds are "
                                   "in the package (ExitSession.generate(thresholds=...) from Python)")
        run_seq2seq(session, input_file, output, batch_size, show, as_json)
        return
    if input_file.suffix.lower() == ".txt":     # one text per line, through the package's tokenizer
        from ..datafiles import load_text_lines

        texts = load_text_lines(input_file)
        n, labels = len(texts), None

        def batch_at(start: int) -> dict[str, np.ndarray]:
            return session.tokenize(texts[start:start + batch_size])
    else:
        inputs, labels = load_input_file(input_file, session.input_names)
        settings = image_settings(session.package.manifest)
        if settings is not None and len(inputs) == 1:   # raw uint8 images: the shipped processor settings
            name, array = next(iter(inputs.items()))
            if array.dtype == np.uint8:
                inputs = {name: pixels_from_images(array, settings)}
        n = next(iter(inputs.values())).shape[0]

        def batch_at(start: int) -> dict[str, np.ndarray]:
            return {k: v[start:start + batch_size] for k, v in inputs.items()}
    parts = [session.run(batch_at(start), thresholds=list(thresholds) or None, policy=policy)
             for start in range(0, max(n, 1), batch_size)]
    predictions = np.concatenate([p.predictions for p in parts])
    exit_index = np.concatenate([p.exit_index for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    names = session.package.labels
    shares = np.bincount(exit_index, minlength=session.num_exits) / n
    nonfinite = sum(p.nonfinite_scores for p in parts)
    json_file = output if output is not None and output.suffix.lower() == ".json" else None
    if as_json or json_file is not None:
        emit_json("run", {
            "package": str(package), "input": str(input_file), "samples": n, "engine": parts[0].engine,
            "exit_shares": shares.tolist(), "nonfinite_scores": nonfinite,
            "accuracy": None if labels is None else float((predictions == labels).mean()),
            "predictions": predictions.tolist(), "exit_index": exit_index.tolist(), "scores": scores.tolist(),
        }, as_json, json_file)
    if not as_json:
        for i in range(min(show, n)):
            label = f"  ({names[predictions[i]]})" if names and predictions[i] < len(names) else ""
            click.echo(f"sample {i:>5}: prediction {predictions[i]}{label}  exit {exit_index[i]}  "
                       f"score {scores[i]:.4g}")
        if n > show:
            click.echo(f"... {n - show} more")
        click.echo(f"{n} samples; exit shares: " + ", ".join(f"exit {e}: {s:.1%}" for e, s in enumerate(shares)))
        if labels is not None:
            click.echo(f"accuracy: {(predictions == labels).mean():.2%} ({int((predictions == labels).sum())}/{n})")
    if nonfinite:
        logger.warning(f"warning: {nonfinite} non-finite exit score(s); those samples did not exit early")
    if output is not None and json_file is None:
        arrays = {"predictions": predictions, "exit_index": exit_index, "scores": scores}
        if output.suffix.lower() == ".npz":
            arrays["logits"] = np.concatenate([p.logits for p in parts])
        save_results_atomic(output, arrays)
        say_wrote(output, as_json)


# --- inspect ------------------------------------------------------------------------
