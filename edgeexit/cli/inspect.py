"""``edgeexit inspect``: a package's stages, shapes, exits, policies, thresholds, costs and hashes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import takewhile
from pathlib import Path
from typing import Any

import click

from .._logging import logging_options
from ._shared import check_outputs, check_suffix, emit_json


def _objective_words(objective: Any) -> str:
    """The objective as the user typed it: --max-drop and --target-accuracy in points and percent."""
    kind, value = _key(objective, "kind"), _key(objective, "value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind == "max_drop":
            return f"max drop {value * 100:g} points"
        if kind == "target_accuracy":
            return f"target accuracy {value * 100:g} %"
        if kind == "latency_budget":
            return f"latency budget {value:g}"
    return f"{_shown(kind)} {_shown(value)}"


@click.command()
@logging_options()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a structured view of the package as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the structured view as JSON to this file.")
@click.option("--manifest", "raw", is_flag=True, help="Print the package's manifest.json as it is.")
def inspect(package: Path, as_json: bool, output: Path | None, raw: bool) -> None:
    """Show a package's stages, shapes, exits, policies, thresholds, costs and hashes."""
    check_outputs(output)
    check_suffix(output, (".json",))
    from ..package import load_package

    pkg = load_package(package)
    if raw:
        click.echo(json.dumps(pkg.manifest, indent=2, ensure_ascii=False))
        return
    if as_json or output is not None:
        emit_json("inspect", _package_view(pkg), as_json, output)
        if as_json:
            return
    click.echo(f"{pkg.root}: {pkg.kind} {pkg.name!r}, format version {pkg.format_version}")
    prod = ", ".join(f"{k} {v}" for k, v in pkg.producer.items())
    click.echo(f"producer: {prod}")
    for inp in pkg.inputs:
        click.echo(f"input {inp.name}: {inp.dtype} ({', '.join(str(d) for d in inp.shape)})")
    if pkg.labels:
        click.echo(f"labels: {len(pkg.labels)} ({', '.join(pkg.labels[:10])}{'…' if len(pkg.labels) > 10 else ''})")
    if pkg.text is not None:
        click.echo(f"text: tokenizer {pkg.text.tokenizer} (shipped) fills {pkg.text.ids}"
                   f"{' and ' + pkg.text.mask if pkg.text.mask else ''}, up to {pkg.text.max_tokens} tokens; "
                   "edgeexit run takes a .txt file, one text per line")
    if pkg.seq2seq is not None:
        _inspect_seq2seq(pkg)
        return
    w = max(8, *(len(s.name) + 2 for s in pkg.stages))
    r = max(18, *(len(",".join(s.inputs)) + 2 for s in pkg.stages))
    c = max(14, *(len(",".join(s.carry)) + 2 for s in pkg.stages))
    scaled = any(t != 1.0 for t in pkg.temperatures)   # a temperature column only where one says something
    click.echo(f"{'stage':<{w}}{'reads':<{r}}{'carry':<{c}}{'exit':<10}{'policy':<12}{'threshold':>10}"
               + (f"{'temp.':>8}" if scaled else "") + f"{'params':>10}{'MFLOPs':>9}{'bytes':>10}  sha256")
    exit_no = 0
    for spec in pkg.stages:
        ex = spec.exit
        exit_col = "-" if ex is None else f"exit {exit_no}"
        last = spec is pkg.stages[-1]
        thr = "-" if ex is None else (("always" if last else "disabled") if ex.threshold is None
                                      else f"{ex.threshold:.4g}")
        if ex is not None:
            exit_no += 1
        meta = pkg.files[spec.file]
        click.echo(
            f"{spec.name:<{w}}{','.join(spec.inputs):<{r}}{','.join(spec.carry) or '-':<{c}}{exit_col:<10}"
            f"{ex.policy if ex else '-':<12}{thr:>10}"
            + ((f"{ex.temperature:>8.4g}" if ex else f"{'-':>8}") if scaled else "")
            + f"{_shown(spec.cost.get('params', 0), '>10')}"
            f"{_shown(spec.cost.get('flops', 0), '>9.3f', 1e6)}{meta['size']:>10}  {meta['sha256'][:12]}"
        )
    signals = sorted({signal for s in pkg.stages if s.exit is not None for signal in s.exit.signals})
    if signals:
        click.echo(f"exit signals: {', '.join(signals)} (policies q_exit and gate score them; format version 8)")
    if pkg.quantization:
        q_stages = pkg.quantization.get("stages")
        modes = (", ".join(f"{_shown(_key(q, 'name'))} {_shown(_key(q, 'mode'))}" for q in q_stages)
                 if isinstance(q_stages, list) else _shown(q_stages))
        status = _shown(_key(pkg.quantization.get("thresholds"), "status"))
        click.echo(f"quantization: {pkg.quantization.get('method')} ({modes}); thresholds {status}")
    if pkg.calibration and pkg.calibration.get("history"):
        last = pkg.calibration["history"][-1]
        state = "reverted" if last.get("reverted") else "current"
        objective = last.get("objective")
        click.echo(f"calibration: {len(pkg.calibration['history'])} entr(y/ies); last ({state}) "
                   f"{last.get('created')} on {last.get('device')}: {_objective_words(objective)}, "
                   f"accuracy {_shown(last.get('validation_accuracy'), '.2%')} "
                   f"on {_shown(last.get('samples'))} samples, expected {_shown(last.get('expected_cost'), '.4g')} "
                   f"{_shown(last.get('cost_unit'))}")
    if pkg.exits_disabled:
        runs = "ExitSession runs full.onnx" if pkg.full_model else "ExitSession runs every stage (no full.onnx)"
        click.echo(f"early exits: DISABLED (no thresholds: not calibrated, or slower than the full model where it "
                   f"was calibrated); {runs}. Enable them with edgeexit calibrate.")
    if pkg.compiled:
        meta = pkg.files[pkg.compiled.file]
        click.echo(f"compiled graph: {pkg.compiled.file}, policies {', '.join(pkg.compiled.policies)}, "
                   f"input {pkg.compiled.thresholds!r} (float64, {len(pkg.thresholds)}), {meta['size']} bytes  "
                   f"{meta['sha256'][:12]}" + ("" if pkg.compiled_stale is None else
                                               f"; STALE: {pkg.compiled_stale}, so ExitSession runs the stage "
                                               "loop (edgeexit compile PACKAGE)"))
    if pkg.full_model:
        meta = pkg.files[pkg.full_model.file]
        click.echo(f"full model: {pkg.full_model.file}, {_shown(pkg.full_model.cost.get('params', 0))} params, "
                   f"{_shown(pkg.full_model.cost.get('flops', 0), '.3f', 1e6)} MFLOPs, {meta['size']} bytes  "
                   f"{meta['sha256'][:12]}")


# Costs, the quantization record and the calibration history are informational: readers check only
# that they are objects (docs/FORMAT.md 3, 3.1, 3.3), so a package another tool wrote may hold anything
# there. inspect shows what is there instead of failing on it; --json passes the values through as they are.


def _key(obj: Any, key: str) -> Any:
    """``obj[key]`` when ``obj`` is an object holding it, else None (shown as ``?``)."""
    return obj.get(key) if isinstance(obj, Mapping) else None


def _shown(value: Any, spec: str = "", scale: float = 1.0) -> str:
    """A manifest value for display: a number formatted with ``spec`` (after dividing by ``scale``),
    ``?`` where the value is missing, anything else as its JSON text, cut to 40 characters."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value / scale if scale != 1.0 else value, spec)
    text = "?" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 40 else text[:39] + "…"
    return format(text, "".join(takewhile(lambda ch: ch in "<>^" or ch.isdigit(), spec)))   # its width only


def _package_view(pkg: Any) -> dict[str, Any]:
    """A package described for machines: what ``inspect`` prints, as data."""
    exit_no, stages = 0, []
    for spec in pkg.stages:
        exit_info = None
        if spec.exit is not None:
            last = spec is pkg.stages[-1]
            exit_info = {"index": exit_no, "logits": spec.exit.logits, "policy": spec.exit.policy,
                         "threshold": spec.exit.threshold, "temperature": spec.exit.temperature,
                         "signals": dict(spec.exit.signals),
                         "state": "final" if last else ("disabled" if spec.exit.threshold is None else "enabled")}
            exit_no += 1
        stages.append({"name": spec.name, "file": spec.file, "reads": list(spec.inputs), "carry": list(spec.carry),
                       "exit": exit_info, "cost": dict(spec.cost), **pkg.files[spec.file]})
    history = (pkg.calibration or {}).get("history") or []
    return {
        "package": str(pkg.root), "name": pkg.name, "kind": pkg.kind, "format_version": pkg.format_version,
        "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in pkg.inputs],
        "labels": list(pkg.labels) if pkg.labels else None, "stages": stages,
        "text": None if pkg.text is None else {"tokenizer": pkg.text.tokenizer, "ids": pkg.text.ids,
                                               "mask": pkg.text.mask, "max_tokens": pkg.text.max_tokens},
        "thresholds": pkg.thresholds, "policies": pkg.policies, "exits_disabled": pkg.exits_disabled,
        "full_model": None if pkg.full_model is None else {
            "file": pkg.full_model.file, **pkg.files[pkg.full_model.file]},
        "compiled": None if pkg.compiled is None else {
            "file": pkg.compiled.file, "policies": list(pkg.compiled.policies), "thresholds": pkg.compiled.thresholds,
            "temperatures": list(pkg.compiled.temperatures), "stale": pkg.compiled_stale is not None,
            "engines": pkg.compiled.engines,
            **pkg.files[pkg.compiled.file]},
        "quantization": pkg.quantization, "calibration": history[-1] if history else None,
        "producer": dict(pkg.producer),
    }


# --- calibrate ---------------------------------------------------------------------


def _inspect_seq2seq(pkg: Any) -> None:
    spec = pkg.seq2seq

    def state(t: float | None) -> str:
        return "disabled" if t is None else f"exits when similarity > {t:g}"

    click.echo(f"seq2seq (MuE exits, cosine similarity of each layer's output and input): vocabulary "
               f"{len(spec.vocab)}, answers up to {spec.max_answer - 1} tokens, width {spec.width}, "
               f"{spec.heads} heads")
    for m in spec.modalities:
        click.echo(f"encoder, {m['name']} ({m['input']}, {_shown(m.get('tokens'))} tokens): "
                   f"{len(spec.encoder)} shared layers, {state(m.get('threshold'))}")
    click.echo(f"decoder: {len(spec.decoder)} layers with a key/value cache, shared head; per token "
               f"{state(spec.decoder_threshold)}")
    modes = sorted(spec.encoder_exits or {})
    click.echo("encoder with in-graph exits (one onnxruntime call): " + (", ".join(modes) if modes else
               "none (format version 5: the encoder runs one call per layer and modality)"))
    click.echo(f"{'file':<26}{'bytes':>10}  sha256")
    for name in spec.graph_files():
        meta = pkg.files[name]
        click.echo(f"{name:<26}{meta['size']:>10,}  {meta['sha256'][:16]}…")
