"""``edgeexit calibrate``: one threshold per early exit from labelled data, timed on this device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from .._logging import logger, logging_options
from ._shared import check_outputs, check_suffix, emit_json, package_kind


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_file", type=click.Path(path_type=Path),
              help="Labelled validation data (.npz with the inputs and 'labels'; for a package that ships its "
                   "tokenizer also .csv/.tsv/.jsonl labelled texts); never the test data.")
@click.option("--text-column", default="text", show_default=True, help="A table's text column.")
@click.option("--label-column", default="label", show_default=True, help="A table's label column.")
@click.option("--max-drop", type=float, help="Accuracy points you may lose vs the last exit (0.5 = half a point).")
@click.option("--target-accuracy", type=float, help="Accuracy to keep, in percent (e.g. 97.5).")
@click.option("--latency-budget-ms", type=float, help="Expected ms per sample; maximise accuracy within it.")
@click.option("--confidence-z", "--confidence", "z", default=1.645, show_default=True, type=click.FloatRange(min=0),
              help="One-sided z of the --max-drop bound: 1.645 is 95 %, 0 the point estimate (--confidence: the old "
                   "name).")
@click.option("--device", default="auto", show_default=True, help="Device profile whose sessions are timed.")
@click.option("--flops", is_flag=True, help="Use the manifest's FLOPs instead of timing the stages here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Save the frontier as a PNG.")
@click.option("--dry-run", is_flag=True, help="Print the choice without writing it into the package.")
@click.option("--revert", is_flag=True, help="Restore the thresholds the last calibration replaced.")
@logging_options(verbose_help="Also print the whole accuracy/cost frontier, and debug detail.", expose_verbose=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the same JSON object to this file (.json).")
def calibrate(package: Path, data_file: Path | None, text_column: str, label_column: str, max_drop: float | None,
              target_accuracy: float | None,
              latency_budget_ms: float | None, z: float, device: str, flops: bool, plot: Path | None,
              dry_run: bool, revert: bool, verbose: bool, as_json: bool, output: Path | None) -> None:
    """Choose one threshold per early exit from labelled data, timed on this device."""
    check_outputs(plot, output)
    check_suffix(output, (".json",))
    check_suffix(plot, (".png",), "--plot")
    if plot is not None:   # before the calibration, not after it
        import importlib.util

        from ..errors import MissingExtraError

        if importlib.util.find_spec("matplotlib") is None:
            raise MissingExtraError("--plot needs matplotlib, from the 'dev' extra: pip install 'edgeexit[dev]' (or "
                                    "pip install matplotlib); or drop --plot")
    if package_kind(package) == "seq2seq":
        from ._seq2seq import calibrate_seq2seq_cli

        if data_file is None or max_drop is None or target_accuracy is not None or latency_budget_ms is not None \
                or revert or plot is not None or flops:
            raise click.UsageError("a seq2seq package calibrates with --data QA.npz (with 'answers') and --max-drop "
                                   "POINTS only")
        calibrate_seq2seq_cli(package, data_file, max_drop, dry_run, as_json)
        return
    from ..calibrate import revert_calibration

    if revert:
        pkg = revert_calibration(package)
        click.echo(f"restored thresholds {pkg.thresholds} ({pkg.policies[0]}) in {package}")
        return
    if data_file is None:
        raise click.UsageError("pass --data VAL.npz (labelled validation data), or --revert")
    objectives = [o for o in (max_drop, target_accuracy, latency_budget_ms) if o is not None]
    if len(objectives) != 1:
        raise click.UsageError(
            "pass exactly one of --max-drop POINTS, --target-accuracy PERCENT or --latency-budget-ms MS"
        )
    if latency_budget_ms is not None and flops:
        raise click.UsageError("--latency-budget-ms needs timed stages; drop --flops")
    run_calibration(package, data_file, max_drop=max_drop, target_accuracy=target_accuracy,
               latency_budget_ms=latency_budget_ms, z=z, device=device, flops=flops, plot=plot, dry_run=dry_run,
               verbose=verbose, as_json=as_json, text_column=text_column, label_column=label_column,
               output=output)


def load_labelled_data(session: Any, data_file: Path, text_column: str = "text", label_column: str = "label"
                       ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs and labels from an ``.npz``, or, for a package that ships its tokenizer, labelled texts in a
    ``.csv``/``.tsv``/``.jsonl`` table (tokenized with it, padded to the longest; labels matched to the
    package's class names, or taken as indices)."""
    from ..datafiles import TABLE_SUFFIXES, label_indices, load_input_file, load_labelled_texts
    from ..errors import InputFileError

    if data_file.suffix.lower() not in TABLE_SUFFIXES:
        return load_input_file(data_file, session.input_names)
    if session.package.text is None:
        raise InputFileError(f"{data_file}: a table of labelled texts needs a package that ships its tokenizer; "
                             f"{session.package.root} takes arrays: pass an .npz with 'labels'")
    texts, values = load_labelled_texts(data_file, text_column, label_column)
    names = session.package.labels
    if not names and not all(v.isdigit() for v in values):
        raise InputFileError(f"{data_file}: {session.package.root} has no class names, so its labels must be class "
                             "indices 0, 1, …")
    labels = label_indices(values, names)[0] if names else np.array([int(v) for v in values], np.int64)
    return session.tokenize(texts), labels


def run_calibration(package: Path, data_file: Path, *, max_drop: float | None, target_accuracy: float | None = None,
               latency_budget_ms: float | None = None, z: float = 1.645, device: str = "auto", flops: bool = False,
               plot: Path | None = None, dry_run: bool = False, verbose: bool = False, as_json: bool = False,
               text_column: str = "text", label_column: str = "label", output: Path | None = None) -> None:
    """The calibration flow of `edgeexit calibrate` (also run by `export --calibrate-data`)."""
    from ..calibrate import (
        apply_calibration,
        calibrate_thresholds,
        record_engine_choice,
        replay_calibration,
        why_disable_exits,
    )
    from ..devices import get_profile
    from ..runtime import ExitSession

    if max_drop is not None and not (0 <= max_drop < 100):   # the user's own units in the message
        raise click.UsageError(f"--max-drop is in accuracy points, from 0 to under 100 (0.5 = half a point); "
                               f"got {max_drop:g}")
    if target_accuracy is not None and not (0 < target_accuracy <= 100):
        raise click.UsageError(f"--target-accuracy is a percentage, above 0 and up to 100; got {target_accuracy:g}")
    profile = get_profile(device)
    session = ExitSession(package, device=profile)
    inputs, labels = load_labelled_data(session, data_file, text_column, label_column)
    result = calibrate_thresholds(
        session, inputs, labels, max_drop=None if max_drop is None else max_drop / 100,
        target_accuracy=None if target_accuracy is None else target_accuracy / 100,
        latency_budget=latency_budget_ms, z=z, measure=not flops,
    )
    say = (lambda _line: None) if as_json else click.echo
    costs = (f"exit paths {', '.join(f'{c:.4g}' for c in result.exit_costs or [])} {result.cost_unit} and the full "
             f"model {result.full_cost:.4g} {result.cost_unit}" if result.engine else
             "stages " + ", ".join(f"{c:.4g}" for c in result.stage_costs) + f" {result.cost_unit}")
    say(f"{result.samples} samples, policy {result.policy}, {result.method} search over "
        f"{result.evaluated} choices; costs ({result.cost_source}): {costs}")
    if verbose:
        say(_format_frontier(result))
    else:
        say(f"frontier: {len(result.frontier)} non-dominated choice(s) (--verbose lists them)")
    say(f"chosen thresholds {[round(t, 6) for t in result.thresholds]}: accuracy {result.accuracy:.2%} "
               f"(last exit {result.full_accuracy:.2%}), expected {result.expected_cost:.4g} {result.cost_unit} vs "
               f"{result.full_cost:.4g} for the full model ({result.full_model}): {result.speedup:.2f}x, "
               f"exit shares {[round(s, 3) for s in result.shares]}")
    replay = None
    if result.cost_unit == "ms":
        replay = replay_calibration(session, inputs, labels, result)
        say(f"replayed on the calibration data: accuracy and exit shares as computed; {replay.mean_ms:.4f} ms "
                   f"vs the full model {replay.full_mean_ms:.4f} ms per sample (mean of {replay.samples_timed} "
                   f"samples' medians at batch 1, interleaved): {replay.speedup:.2f}x measured, "
                   f"{result.speedup:.2f}x expected")
    slower = why_disable_exits(result, replay)
    if slower:
        runs = ("it runs full.onnx" if session.package.full_model is not None else
                "it runs every stage; export with the full model (the default) to run the single full graph")
        logger.warning(f"warning: the exits under this objective do not pay on this device: {slower}. "
                       f"{'Writing the package with its early exits disabled: ' + runs if not dry_run else ''}"
                       " (a looser objective may still win; --revert undoes it)")
    measured = replay.speedup if replay is not None else result.speedup
    if result.cost_unit == "ms" and not slower and measured < 1:
        logger.warning(f"warning: the chosen exits run at {measured:.2f}x the plain model on this device, and "
                       "disabling them would be slower still: the runtime's own cost per call is more than the exits "
                       "save here")
    if plot is not None:
        _save_frontier_plot(result, plot)
        say(f"wrote {plot}")
    engines = []
    if dry_run:
        say("dry run: the package was not changed")
    else:
        apply_calibration(package, result, device=profile.name, disable_exits=slower)
        say(f"wrote {'disabled early exits' if slower else 'the thresholds'} into {package} (the previous "
            "thresholds are kept; undo with --revert)")
        chosen = result.engine if result.engine in ("stages", "compiled") else None
        engines = record_engine_choice(package, inputs, device=profile, batch1=chosen)
        words = {"compiled": "compiled graph", "stages": "stage loop"}
        for t in engines:
            runs = chosen if t.batch_size == 1 and chosen else t.faster
            why = " (the engine whose exit paths were timed faster above)" if runs != t.faster else ""
            say(f"batch {t.batch_size}: stage loop {t.stages_ms:.4f} ms, compiled graph {t.compiled_ms:.4f} ms "
                f"per call -> ExitSession runs the {words[runs]}{why}")
    if as_json or output is not None:
        import dataclasses

        emit_json("calibrate", {
            "package": str(package), "device": profile.name,
            **result.entry(), "speedup_vs_full": result.speedup,
            "replay": None if replay is None else {**dataclasses.asdict(replay), "speedup_vs_full": replay.speedup},
            "exits_disabled": slower, "written": not dry_run,
            "engines": [dataclasses.asdict(t) | {"faster": t.faster} for t in engines],
            "frontier": [dataclasses.asdict(p) for p in result.frontier],
        }, as_json, output)




# --- bench and devices ---------------------------------------------------------------


def _format_frontier(result: Any) -> str:
    unit = result.cost_unit
    lines = [f"{'':2}{'accuracy':>9}{'expected ' + unit:>16}{'vs full':>9}  {'meets':<7}{'exit shares':<24}thresholds"]
    for p in result.frontier:
        mark = "*" if list(p.thresholds) == result.thresholds else " "
        shares = " ".join(f"{s:.3f}" for s in p.shares)
        thr = ", ".join(f"{t:.6g}" for t in p.thresholds)
        lines.append(f"{mark:2}{p.accuracy:>9.2%}{p.expected_cost:>16.4f}{result.full_cost / p.expected_cost:>8.2f}x"
                     f"  {'yes' if p.feasible else 'no':<7}{shares:<24}{thr}")
    cheaper = [p for p in result.frontier if p.expected_cost < result.expected_cost and p.accuracy >= result.accuracy]
    if cheaper:
        lines.append(f"{len(cheaper)} row(s) above the choice are cheaper and as accurate on these samples but do not "
                     f"meet the objective: the drop bound also counts the samples they lose and win "
                     f"({result.objective['kind']} {result.objective['value']}, z {result.objective['z']})")
    return "\n".join(lines)


def _save_frontier_plot(result: Any, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p.expected_cost for p in result.frontier]
    ys = [100 * p.accuracy for p in result.frontier]
    ax.step(xs, ys, where="post", marker="o", label="Pareto frontier")
    for p, x, y in zip(result.frontier, xs, ys):
        ax.annotate(", ".join(f"{t:.3g}" for t in p.thresholds), (x, y), textcoords="offset points", xytext=(4, -10),
                    fontsize=6, color="dimgrey")
    ax.scatter([result.expected_cost], [100 * result.accuracy], s=120, facecolors="none", edgecolors="red",
               label="chosen", zorder=3)
    ax.axhline(100 * result.full_accuracy, color="grey", linestyle=":", label="last exit only")
    ax.axvline(result.full_cost, color="black", linestyle="--", label=f"full model ({result.full_model})")
    kind, value = result.objective["kind"], float(result.objective["value"])
    if kind == "latency_budget":
        ax.axvline(value, color="tab:orange", linestyle="-.", label="latency budget")
    elif kind == "target_accuracy":
        ax.axhline(100 * value, color="tab:orange", linestyle="-.", label="target accuracy")
    else:
        ax.axhline(100 * (result.full_accuracy - value), color="tab:orange", linestyle="-.",
                   label=f"last exit - {100 * value:g} pt")
    ax.set_xlim(0, max(result.full_cost, *xs) * 1.05)
    ax.set_xlabel(f"expected cost per sample ({result.cost_unit}); labels: thresholds")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"calibration frontier ({result.policy}, {result.samples} samples)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    from .._atomic import replace_atomically

    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
