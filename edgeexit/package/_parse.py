"""Turning a manifest dict into a ``Package``: schema checks only, no file is read.

``parse_manifest`` checks the format name and version, every field's type, the stage
wiring (each stage reads only model inputs and earlier carries; the last stage carries
the final exit), the policies, and the optional ``seq2seq``, ``text`` and ``compiled``
objects; each defect is a ``ManifestSchemaError`` (or ``UnsupportedFormatError``) that
names the field and says how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ManifestSchemaError, UnsupportedFormatError
from ..policies import SIGNALS, get_policy
from ._files import check_file_name
from ._spec import (
    COMPILED_OUTPUTS,
    DISABLED_EXITS_VERSION,
    DTYPES,
    ENCODER_EXITS_VERSION,
    FORMAT_NAME,
    KINDS,
    MAX_DIM,
    SEQ2SEQ_VERSION,
    SIGNALS_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    TEMPERATURE_VERSION,
    TEXT_VERSION,
    CompiledSpec,
    ExitSpec,
    FullModelSpec,
    InputSpec,
    Package,
    Seq2SeqSpec,
    StageSpec,
    TextSpec,
)


def _schema(cond: bool, where: str, expected: str, got: Any) -> None:
    if not cond:
        raise ManifestSchemaError(
            f"manifest field {where}: expected {expected}, got {got!r}. "
            "The manifest was edited by hand or written by another tool; re-export the package."
        )


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ManifestSchemaError(
            f"manifest is missing {where}.{key}; re-export the package with edgeexit export"
        )
    return obj[key]


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    _schema(isinstance(value, list) and all(isinstance(v, str) for v in value),
            where, "a list of strings", value)
    return tuple(value)


def _parse_exit(raw: Any, where: str, version: int) -> ExitSpec | None:
    if raw is None:
        return None
    _schema(isinstance(raw, Mapping), where, "an object or null", raw)
    logits = _field(raw, "logits", where)
    policy = _field(raw, "policy", where)
    threshold = raw.get("threshold")
    _schema(isinstance(logits, str), f"{where}.logits", "a string", logits)
    _schema(isinstance(policy, str), f"{where}.policy", "a string", policy)
    _schema(threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                  and math.isfinite(threshold)),
            f"{where}.threshold", "a finite number or null", threshold)
    pol = get_policy(policy)  # unknown policy -> UnknownPolicyError with the valid names
    signals = raw.get("signals")
    if signals is not None:
        _schema(version >= SIGNALS_VERSION, f"{where}.signals",
                f"absent in a version-{version} package (exit signals need format version {SIGNALS_VERSION})", signals)
        _schema(isinstance(signals, Mapping)
                and all(k in SIGNALS and isinstance(v, str) and v for k, v in signals.items())
                and len({logits, *signals.values()}) == len(signals) + 1, f"{where}.signals",
                f"an object mapping signals ({', '.join(SIGNALS)}) to distinct output names other than the logits",
                signals)
    signals = dict(signals or {})
    if pol.reads != "logits" and pol.reads not in signals:
        raise ManifestSchemaError(
            f"{where}: policy {policy!r} scores the exit's {pol.reads!r} signal, but this exit has "
            f"{'only the signals ' + str(sorted(signals)) if signals else 'no signals'}; re-export the model with "
            f"exit heads that return it, or choose a policy that reads the logits"
        )
    temperature = _temperature(raw.get("temperature"), f"{where}.temperature", version)
    return ExitSpec(logits, policy, None if threshold is None else float(threshold), signals, temperature)


def _temperature(value: Any, where: str, version: int) -> float:
    """An exit's temperature (format version 9): a positive finite number; absent or null is 1.0."""
    if value is None:
        return 1.0
    _schema(version >= TEMPERATURE_VERSION, where,
            f"absent in a version-{version} package (temperatures need format version {TEMPERATURE_VERSION})", value)
    _schema(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
            where, "a positive finite number (the logits are divided by it before the policy scores them)", value)
    return float(value)


def parse_manifest(manifest: Mapping[str, Any], root: Path) -> Package:
    """Turn a manifest dict into a ``Package`` (schema checks only, no file access)."""
    _schema(isinstance(manifest, Mapping), "<root>", "a JSON object", type(manifest).__name__)
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{root}: manifest format is {fmt!r}, expected {FORMAT_NAME!r}; this is not an edgeexit package"
        )
    version = manifest.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatError(
            f"{root}: package format_version {version!r} is not supported; this edgeexit reads "
            f"version(s) {sorted(SUPPORTED_FORMAT_VERSIONS)}. Upgrade edgeexit, or re-export the "
            "model with this version."
        )
    kind = _field(manifest, "kind", "manifest")
    _schema(kind in KINDS, "kind", f"one of {KINDS}", kind)
    name = _field(manifest, "name", "manifest")
    _schema(isinstance(name, str), "name", "a string", name)

    inputs = []
    raw_inputs = _field(manifest, "inputs", "manifest")
    _schema(isinstance(raw_inputs, list), "inputs", "a list of input objects", raw_inputs)
    for i, raw in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        iname, dtype, shape = (_field(raw, k, where) for k in ("name", "dtype", "shape"))
        _schema(isinstance(iname, str), f"{where}.name", "a string", iname)
        _schema(dtype in DTYPES, f"{where}.dtype", f"one of {DTYPES}", dtype)
        _schema(isinstance(shape, list) and len(shape) >= 1 and all(
            (isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM) or isinstance(d, str) for d in shape),
            f"{where}.shape", f"a list of axis names and positive ints up to {MAX_DIM}", shape)
        _schema(isinstance(shape[0], str), f"{where}.shape[0]", "a symbolic batch axis name", shape[0])
        inputs.append(InputSpec(iname, dtype, tuple(shape)))
    _schema(len(inputs) >= 1, "inputs", "at least one input", inputs)

    labels = manifest.get("labels")
    if labels is not None:
        labels = _str_list(labels, "labels")

    seq2seq = _parse_seq2seq(manifest, kind, version, inputs) if kind == "seq2seq" else None
    stages = []
    raw_stages = _field(manifest, "stages", "manifest")
    _schema(isinstance(raw_stages, list) and (len(raw_stages) > 0 or seq2seq is not None), "stages",
            "a non-empty list", raw_stages)
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        _schema(isinstance(raw, Mapping), where, "an object", raw)
        cost = raw.get("cost") or {}
        _schema(isinstance(cost, Mapping), f"{where}.cost", "an object", cost)
        sname, sfile = _field(raw, "name", where), _field(raw, "file", where)
        _schema(isinstance(sname, str), f"{where}.name", "a string", sname)
        if not isinstance(sfile, str):   # refused now, as every file name is below: later checks hash and sort names
            check_file_name(sfile, root)
        stages.append(
            StageSpec(
                name=sname,
                file=sfile,
                inputs=_str_list(_field(raw, "inputs", where), f"{where}.inputs"),
                carry=_str_list(_field(raw, "carry", where), f"{where}.carry"),
                exit=_parse_exit(raw.get("exit"), f"{where}.exit", version),
                cost=dict(cost),
            )
        )
    if stages:
        _check_stage_wiring(stages, inputs, version)

    full = manifest.get("full_model")
    full_spec = None
    if full is not None:
        _schema(isinstance(full, Mapping) and isinstance(full.get("logits"), str)
                and isinstance(full.get("cost") or {}, Mapping), "full_model",
                "an object with file, inputs, logits (string) and cost (object)", full)
        full_spec = FullModelSpec(
            file=_field(full, "file", "full_model"),
            inputs=_str_list(_field(full, "inputs", "full_model"), "full_model.inputs"),
            logits=_field(full, "logits", "full_model"),
            cost=dict(full.get("cost") or {}),
        )

    files = _field(manifest, "files", "manifest")
    _schema(isinstance(files, Mapping), "files", "an object", files)
    compiled = _parse_compiled(manifest.get("compiled"), version, inputs, stages, files)
    _schema(compiled is None or full_spec is None or compiled.file != full_spec.file, "compiled.file",
            "a file name of its own (not the full model's)", compiled and compiled.file)
    text = _parse_text(manifest.get("text"), version, inputs)
    referenced = [s.file for s in stages] + ([full_spec.file] if full_spec else []) + \
        ([compiled.file] if compiled else []) + (seq2seq.graph_files() if seq2seq else []) + \
        ([text.tokenizer] if text else [])
    for ref in referenced:
        check_file_name(ref, root)
        if ref not in files:
            raise ManifestSchemaError(
                f"manifest refers to {ref!r} but has no files[{ref!r}] entry with its sha256 and "
                "size; re-export the package"
            )
    producer = manifest.get("producer") or {}
    _schema(isinstance(producer, Mapping), "producer", "an object", producer)
    calibration = manifest.get("calibration")
    if calibration is not None:
        history = calibration.get("history") if isinstance(calibration, Mapping) else None
        _schema(isinstance(history, list) and all(isinstance(e, Mapping) for e in history),
                "calibration", "an object with a history list of objects", calibration)
    quantization = manifest.get("quantization")
    _schema(quantization is None or isinstance(quantization, Mapping), "quantization", "an object or null",
            quantization)
    if full_spec is not None:
        unknown = [n for n in full_spec.inputs if n not in {i.name for i in inputs}]
        _schema(not unknown, "full_model.inputs", "model input names", list(full_spec.inputs))
    return Package(
        root=root, format_version=version, kind=kind, name=name, inputs=tuple(inputs),
        labels=labels, stages=tuple(stages), full_model=full_spec, files=dict(files),
        producer=dict(producer), manifest=manifest, calibration=calibration, quantization=quantization,
        compiled=compiled, seq2seq=seq2seq, text=text,
    )


# The most answer positions a seq2seq package may declare (``seq2seq.max_answer``, <bos> included):
# generation keeps a key/value cache and a threshold schedule as long as the answer, so an absurd
# value (2**31 - 1) would take all memory.  An answer's positions index the decoder's answer-position
# table (MuE's is 9 long); 4096 leaves room for any encoder-decoder edgeexit runs on a device.
MAX_ANSWER = 4096


def _parse_seq2seq(manifest: Mapping[str, Any], kind: str, version: int, inputs: list[InputSpec]) -> Seq2SeqSpec:
    _schema(version >= SEQ2SEQ_VERSION, "format_version", f"{SEQ2SEQ_VERSION} or later for kind 'seq2seq'",
            version)
    raw = _field(manifest, "seq2seq", "manifest")
    _schema(isinstance(raw, Mapping), "seq2seq", "an object", raw)
    vocab = _str_list(_field(raw, "vocab", "seq2seq"), "seq2seq.vocab")
    ints = {}
    for key in ("pad", "bos", "eos", "max_answer", "heads", "head_dim", "width"):
        value = _field(raw, key, "seq2seq")
        _schema(type(value) is int and 0 <= value <= MAX_DIM, f"seq2seq.{key}", "a non-negative integer", value)
        ints[key] = value
    _schema(2 <= ints["max_answer"] <= MAX_ANSWER, "seq2seq.max_answer",
            f"an integer from 2 to {MAX_ANSWER} (answer positions, <bos> included: generation sizes its caches by "
            "it, so readers cap it)", ints["max_answer"])
    for key in ("pad", "bos", "eos"):
        _schema(ints[key] < len(vocab), f"seq2seq.{key}", f"a token id below the vocabulary size {len(vocab)}",
                ints[key])
    names = {i.name for i in inputs}
    modalities = _field(raw, "modalities", "seq2seq")
    _schema(isinstance(modalities, list) and len(modalities) >= 1, "seq2seq.modalities", "a non-empty list",
            modalities)
    for j, m in enumerate(modalities):
        where = f"seq2seq.modalities[{j}]"
        _schema(isinstance(m, Mapping) and isinstance(m.get("name"), str) and isinstance(m.get("input"), str)
                and m.get("input") in names and isinstance(m.get("embed"), str) and isinstance(m.get("first"), str)
                and type(m.get("tokens")) is int and 1 <= m["tokens"] <= MAX_DIM, where,
                "an object with name, input (a model input), embed and first (file names) and tokens (a positive "
                "integer)", m)
        _threshold_field(m.get("threshold"), f"{where}.threshold")
    encoder = _str_list(_field(raw, "encoder", "seq2seq"), "seq2seq.encoder")
    decoder = _field(raw, "decoder", "seq2seq")
    _schema(isinstance(decoder, list) and len(decoder) >= 1 and all(
        isinstance(d, Mapping) and isinstance(d.get("step"), str) and isinstance(d.get("kv"), str) for d in decoder),
        "seq2seq.decoder", "a non-empty list of {step, kv} file names", decoder)
    files = {key: _field(raw, key, "seq2seq") for key in ("encoder_norm", "embed_answer", "head")}
    for key, value in files.items():
        _schema(isinstance(value, str), f"seq2seq.{key}", "a file name", value)
    _schema(raw.get("policy", "similarity") == "similarity", "seq2seq.policy", "'similarity'", raw.get("policy"))
    _threshold_field(raw.get("decoder_threshold"), "seq2seq.decoder_threshold")
    in_graph = {}
    for key, modes in (("encoder_exits", ("per_modality", "joint")), ("decoder_steps", ("drop", "copy_hidden"))):
        value = raw.get(key)
        if value is not None:
            _schema(version >= ENCODER_EXITS_VERSION, "format_version",
                    f"{ENCODER_EXITS_VERSION} or later for seq2seq.{key}", version)
            _schema(isinstance(value, Mapping) and len(value) > 0 and set(value) <= set(modes)
                    and all(isinstance(f, str) for f in value.values()), f"seq2seq.{key}",
                    f"an object mapping {' and/or '.join(map(repr, modes))} to a file name", value)
        in_graph[key] = dict(value) if value else None
    return Seq2SeqSpec(vocab=vocab, modalities=tuple(dict(m) for m in modalities), encoder=encoder,
                       decoder=tuple(dict(d) for d in decoder), decoder_threshold=raw.get("decoder_threshold"),
                       encoder_exits=in_graph["encoder_exits"], decoder_steps=in_graph["decoder_steps"],
                       **files, **ints)


def _parse_text(raw: Any, version: int, inputs: list[InputSpec]) -> TextSpec | None:
    if raw is None:
        return None
    _schema(version >= TEXT_VERSION, "format_version", f"{TEXT_VERSION} or later for the text object", version)
    _schema(isinstance(raw, Mapping), "text", "an object", raw)
    token_inputs = {i.name for i in inputs if i.dtype in ("int64", "int32") and len(i.shape) == 2}
    tokenizer, ids, mask = raw.get("tokenizer"), raw.get("ids"), raw.get("mask")
    _schema(isinstance(tokenizer, str), "text.tokenizer", "a file name", tokenizer)
    _schema(isinstance(ids, str) and ids in token_inputs, "text.ids",
            f"a 2-D integer input of the model ({sorted(token_inputs)})", ids)
    _schema(mask is None or (isinstance(mask, str) and mask in token_inputs and mask != ids), "text.mask",
            "null or another 2-D integer input", mask)
    max_tokens, pad_id = raw.get("max_tokens"), raw.get("pad_id", 0)
    _schema(type(max_tokens) is int and 1 <= max_tokens <= MAX_DIM, "text.max_tokens", "a positive integer",
            max_tokens)
    _schema(type(pad_id) is int and 0 <= pad_id <= MAX_DIM, "text.pad_id",
            f"a non-negative integer up to {MAX_DIM} (a token id of the int32/int64 inputs)", pad_id)
    return TextSpec(tokenizer, ids, mask, max_tokens, pad_id)


def _threshold_field(value: Any, where: str) -> None:
    _schema(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                              and math.isfinite(value)), where, "a finite number or null", value)


def _parse_compiled(raw: Any, version: int, inputs: list[InputSpec], stages: list[StageSpec],
                    files: Mapping[str, Any]) -> CompiledSpec | None:
    if raw is None:
        return None
    _schema(version >= 3, "compiled", f"absent in a version-{version} package (it is a version-3 field)", raw)
    _schema(isinstance(raw, Mapping), "compiled", "an object", raw)
    file = _field(raw, "file", "compiled")
    _schema(isinstance(file, str) and file not in {s.file for s in stages}, "compiled.file",
            "a file name of its own (not a stage graph's)", file)
    names = _str_list(_field(raw, "inputs", "compiled"), "compiled.inputs")
    _schema(sorted(names) == sorted(i.name for i in inputs), "compiled.inputs",
            f"the model input names {[i.name for i in inputs]}", list(names))
    thresholds = _field(raw, "thresholds", "compiled")
    _schema(isinstance(thresholds, str) and thresholds != "" and thresholds not in names, "compiled.thresholds",
            "the name of the thresholds input (a non-empty string, not a model input name)", thresholds)
    policies = _str_list(_field(raw, "policies", "compiled"), "compiled.policies")
    num_exits = sum(1 for s in stages if s.exit is not None)
    _schema(len(policies) == num_exits, "compiled.policies", f"one policy per exit ({num_exits})", list(policies))
    for p in policies:
        get_policy(p)
    outputs = _field(raw, "outputs", "compiled")
    _schema(isinstance(outputs, Mapping) and sorted(outputs) == sorted(COMPILED_OUTPUTS)
            and all(isinstance(v, str) and v for v in outputs.values())
            and len(set(outputs.values())) == 3 and thresholds not in outputs.values(), "compiled.outputs",
            f"an object naming three distinct graph outputs {list(COMPILED_OUTPUTS)}, none of them the thresholds "
            "input", outputs)
    sources = _field(raw, "sources", "compiled")
    _schema(isinstance(sources, Mapping) and sorted(sources) == sorted(s.file for s in stages),
            "compiled.sources", "the sha256 of every stage file the graph was built from", sources)
    engines = raw.get("engines")
    _schema(engines is None or (isinstance(engines, Mapping) and all(
        engines.get(regime) in ("stages", "compiled") for regime in ("batch1", "batch"))), "compiled.engines",
        "null or an object whose batch1 and batch are 'stages' or 'compiled'", engines)
    raw_temperatures = raw.get("temperatures")
    if raw_temperatures is None:
        temperatures = (1.0,) * num_exits
    else:
        _schema(isinstance(raw_temperatures, list) and len(raw_temperatures) == num_exits
                and all(t is not None for t in raw_temperatures), "compiled.temperatures",
                f"a list of one temperature per exit ({num_exits})", raw_temperatures)
        temperatures = tuple(_temperature(t, "compiled.temperatures", version) for t in raw_temperatures)
    stale = [name for name, digest in sources.items()
             if not isinstance(files.get(name), Mapping) or files[name].get("sha256") != digest]
    if stale:
        raise ManifestSchemaError(
            f"the compiled graph {file!r} was built from other versions of {stale} than the package holds; it "
            "would not agree with the stage graphs. Rebuild it with `edgeexit compile PACKAGE`."
        )
    return CompiledSpec(file, names, thresholds, policies, dict(outputs), dict(sources),
                        None if engines is None else dict(engines), temperatures)


def _check_stage_wiring(stages: list[StageSpec], inputs: list[InputSpec], version: int) -> None:
    available = {i.name for i in inputs}
    for i, stage in enumerate(stages):
        clash = set(stage.exit.signals.values()) & (set(stage.carry) | available) if stage.exit else set()
        _schema(not clash, f"stages[{i}].exit.signals",
                "output names other than the stage's carry, the model inputs and earlier carries", sorted(clash))
        missing = [n for n in stage.inputs if n not in available]
        if missing:
            raise ManifestSchemaError(
                f"stage {i} ({stage.name}) reads {missing}, which no model input or earlier stage "
                f"provides (available: {sorted(available)}); re-export the package"
            )
        available.update(stage.carry)
    exits = [s for s in stages if s.exit is not None]
    policies = {s.exit.policy for s in exits if s.exit is not None}
    if len(policies) > 1 and any(get_policy(p).stateful for p in policies):
        raise ManifestSchemaError(
            f"the exits name the policies {sorted(policies)}; a stateful policy (patience, q_exit) carries its state "
            "through every exit, so all exits must name it; re-export with one policy"
        )
    if not exits or stages[-1].exit is None:
        raise ManifestSchemaError(
            "the last stage must carry the final exit (it always accepts); re-export the package"
        )
    if stages[-1].exit.threshold is not None:
        raise ManifestSchemaError(
            f"the final exit (stage {len(stages) - 1}) has threshold {stages[-1].exit.threshold}, but it "
            "always accepts; its threshold must be null"
        )
    for i, stage in enumerate(stages[:-1]):
        if stage.exit is not None and stage.exit.threshold is None and version < DISABLED_EXITS_VERSION:
            raise ManifestSchemaError(
                f"stage {i} ({stage.name}) has an early exit without a threshold; in a version-{version} "
                f"package only the last exit may omit it (a null threshold disables an exit from version "
                f"{DISABLED_EXITS_VERSION})"
            )
