"""``edgeexit bench``: latency, throughput and energy of a package against its plain full model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .._logging import logger, logging_options, quiet
from ._shared import check_outputs, check_suffix, classifier_only, emit_json, say_wrote, write_text_atomic


def _pick_meter(profile: Any, meter: str | None, meter_log: Path | None, meter_command: str | None) -> Any:
    from ..devices import create_meter, meter_for_profile

    options: dict[str, dict[str, Any]] = {}
    if meter_log is not None:
        options["external"] = {"csv_path": str(meter_log)}
    elif meter_command is not None:
        options["external"] = {"command": meter_command}
    if meter is None and options:
        meter = "external"
    if meter is None:
        chosen, skipped = meter_for_profile(profile, options)
        for why in skipped:
            logger.info(f"meter skipped: {why}")
        return chosen
    if meter == "external" and "external" not in options:
        raise click.UsageError("--meter external needs --meter-log FILE.csv or --meter-command CMD")
    if meter == "estimate":
        from ..devices.meters import EstimateMeter

        p = profile.power
        return EstimateMeter(p.busy_watts, p.idle_watts, source=f"profile {profile.name}: {p.source}")
    return create_meter(meter, **options.get(meter, {}))


@click.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_file", type=click.Path(path_type=Path), help=".npy/.npz as for `run`.")
@click.option("--dataset", type=click.Choice(["mnist5k"]), help="A built-in dataset (its seeded test split).")
@click.option("--device", default="auto", show_default=True, help="Device profile (cpu, rpi4, rpi5, jetson, cuda, "
              "tensorrt, auto).")
@click.option("--batch-size", "--batch", "batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Samples per call; whole batches only (--batch: the old name).")
@click.option("--duration", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per measurement window.")
@click.option("--windows", default=3, show_default=True, type=click.IntRange(min=1), help="Windows per contender.")
@click.option("--warmup", default=2.0, show_default=True, type=click.FloatRange(min=0), help="Warm-up seconds.")
@click.option("--compare", type=click.Choice(["full", "none"]), default="full", show_default=True,
              help="full: also measure the plain full model, interleaved window by window, and report every speedup "
                   "against it; none: the package alone.")
@click.option("--full-model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The full-model ONNX file to compare with (default: the package's full.onnx if it has one, "
                   "else the package with early exits off).")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per stage session (default: the "
              "profile's).")
@click.option("--meter", default=None, help="Energy meter to use (default: the profile's first readable one).")
@click.option("--meter-log", type=click.Path(path_type=Path), help="CSV log (timestamp,watts) of an external meter.")
@click.option("--meter-command", help="Command printing the current watts (external meter).")
@click.option("--idle-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0),
              help="Quiet seconds to measure idle power for whole-board meters (0: don't subtract).")
@click.option("--allow-fallback", is_flag=True, help="Warn instead of failing when a provider is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout.")
@click.option("-o", "--output", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON to this file (.json).")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), help="Write the results as CSV.")
def bench(package: Path, data_file: Path | None, dataset: str | None, device: str, batch: int, duration: float,
          windows: int, warmup: float, compare: str | None, full_model: Path | None, meter: str | None,
          meter_log: Path | None, meter_command: str | None, idle_seconds: float, allow_fallback: bool,
          as_json: bool, json_out: Path | None, csv_out: Path | None, threads: int | None) -> None:
    """Measure latency, throughput and energy of PACKAGE on this device."""
    check_outputs(json_out, csv_out)
    check_suffix(json_out, (".json",))
    check_suffix(csv_out, (".csv",), "--csv")
    classifier_only(package, "bench")
    from ..bench import BenchConfig, csv_rows, format_table, run_benchmark
    from ..devices import create_meter, get_profile, measure_idle
    from ..runtime import ExitSession

    if (data_file is None) == (dataset is None):
        raise click.UsageError("pass exactly one of --data FILE or --dataset mnist5k")
    if full_model is not None and compare != "full":
        raise click.UsageError("--full-model names the model to compare with; it does not go with --compare none")
    profile = get_profile(device)
    session = ExitSession(package, device=profile, allow_fallback=allow_fallback, threads=threads)
    if dataset == "mnist5k":
        from ..datasets import mnist5k_splits

        test = mnist5k_splits().test
        inputs: dict[str, Any] = {session.input_names[0]: test.x}
        labels: Any = test.y
    else:
        from ..datafiles import load_input_file

        assert data_file is not None  # exactly one of --data / --dataset was checked above
        inputs, labels = load_input_file(data_file, session.input_names)
    energy = _pick_meter(profile, meter, meter_log, meter_command)
    if energy.whole_board and idle_seconds > 0:
        logger.info(f"measuring idle power for {idle_seconds:g} s (whole-board meter) ...")
        idle = measure_idle(energy, idle_seconds)
        opts = {"csv_path": str(meter_log)} if meter_log else ({"command": meter_command} if meter_command else {})
        energy = create_meter(energy.name, idle_watts=idle, **opts)
        logger.info(f"idle {idle:.3f} W will be subtracted from every window")
    config = BenchConfig(batch=batch, duration_s=duration, windows=windows, warmup_s=warmup)
    contenders = (2 if compare == "full" else 1) + (session.engine_for(batch) != "full" and session.has_compiled)
    total = duration * windows * contenders
    with click.progressbar(length=int(total * 10), label="benchmarking", file=sys.stderr, hidden=quiet()) as bar:
        report = run_benchmark(session, inputs, labels, config, energy, compare_full=compare == "full",
                               full_model=full_model, progress=lambda s: bar.update(int(s * 10)))
    if not as_json:
        click.echo(format_table(report))
    emit_json("bench", report.to_dict(), as_json, json_out)
    if csv_out is not None:
        import csv
        import io

        rows = csv_rows(report)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(csv_out, buf.getvalue())
        say_wrote(csv_out, as_json)
    if not report.valid:
        sys.exit(7)
