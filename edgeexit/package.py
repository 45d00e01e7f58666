"""The exit package: a directory holding ``manifest.json`` and one ONNX file per stage.

This module reads, verifies and writes packages with the standard library and numpy
only.  The format is specified in ``docs/FORMAT.md``; the rules enforced here are the
MUST rules of that document.  Reading verifies everything that can be verified
without onnxruntime (format version, schema, file names, presence, size, sha256,
policy names) before any session is built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import _leftovers as leftovers
from ._archive import archive_bytes, is_archive, read_archive
from ._atomic import default_mode, exchange_paths, fsync_dir, output_errors, write_bytes_atomically
from ._manifest_json import MAX_MANIFEST_BYTES, decode_manifest
from .errors import (
    FileIntegrityError,
    ManifestSchemaError,
    MissingFileError,
    PackageError,
    PackageNotFoundError,
    UnsafePathError,
    UnsupportedFormatError,
)
from .policies import SIGNALS, get_policy

FORMAT_NAME = "edgeexit"
# Version 2 added the optional `calibration` history, `quantization` record and
# `stages[].cost.measured_ms`; version 3 added the optional `compiled` graph (the whole
# model as one ONNX graph deciding its exits in-graph); version 4 lets an early exit's
# threshold be null: that exit is disabled (not calibrated yet, or slower than the full
# model on the device it was calibrated on).  Versions 1-3 load unchanged.
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2, 3, 4, 5, 6, 7, 8})
SEQ2SEQ_VERSION = 5   # adds kind "seq2seq" (the `seq2seq` object); classifiers are still written as 4
# version 6 adds `seq2seq.encoder_exits` and `seq2seq.decoder_steps`: the encoder and a decoder step
# with in-graph exits (optional; 5 loads unchanged)
ENCODER_EXITS_VERSION = 6
# version 7 adds the optional `text` object: the package's own tokenizer for token-id inputs
TEXT_VERSION = 7
# version 8 adds `stages[].exit.signals`: exit outputs besides the logits (PALBERT's halting
# probability, JEI-DNN's gate value) that the q_exit and gate policies score
SIGNALS_VERSION = 8
DISABLED_EXITS_VERSION = 4
MANIFEST_NAME = "manifest.json"
KINDS = ("classifier", "seq2seq", "pipeline")
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


MAX_DIM = 2**31 - 1   # a fixed input dimension beyond this is no real model's (onnxruntime would try to allocate it)

@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name, shape (str for a symbolic axis)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ExitSpec:
    """The exit attached to a stage: its logits output, policy and threshold.

    ``threshold`` is ``None`` for the final exit, which always accepts, and (from format
    version 4) for an early exit that is disabled: no sample leaves there.
    """

    logits: str
    policy: str
    threshold: float | None
    signals: Mapping[str, str] = field(default_factory=dict)   # signal ("halt", "gate") -> output; version 8

    def output(self, reads: str) -> str | None:
        """The graph output a policy reading ``reads`` scores ("logits" or a signal), or None."""
        return self.logits if reads == "logits" else self.signals.get(reads)


@dataclass(frozen=True)
class StageSpec:
    """One stage graph: the tensors it reads, the carry it passes on, its exit."""

    name: str
    file: str
    inputs: tuple[str, ...]
    carry: tuple[str, ...]
    exit: ExitSpec | None
    cost: Mapping[str, Any]


@dataclass(frozen=True)
class FullModelSpec:
    """Optional single graph of the whole model without early exits (a baseline)."""

    file: str
    inputs: tuple[str, ...]
    logits: str
    cost: Mapping[str, Any]


COMPILED_OUTPUTS = ("logits", "exit_index", "score")



@dataclass(frozen=True)
class Seq2SeqSpec:
    """A seq2seq package's graphs and generation settings (format versions 5-6, FORMAT.md section 3.5)."""

    vocab: tuple[str, ...]
    pad: int
    bos: int
    eos: int
    max_answer: int
    heads: int
    head_dim: int
    width: int
    modalities: tuple[Mapping[str, Any], ...]   # name, input, embed and first (files), tokens, threshold
    encoder: tuple[str, ...]
    encoder_norm: str
    embed_answer: str
    decoder: tuple[Mapping[str, str], ...]      # step, kv (files)
    head: str
    decoder_threshold: float | None
    # the encoder with in-graph exits, per encoder exit mode ("per_modality", "joint"); version 6
    encoder_exits: Mapping[str, str] | None = None
    # one generated token at batch 1 with in-graph decoder exits, per kv mode ("drop", "copy_hidden"); version 6
    decoder_steps: Mapping[str, str] | None = None

    def graph_files(self) -> list[str]:
        return ([m["embed"] for m in self.modalities] + [m["first"] for m in self.modalities if "first" in m]
                + list(self.encoder) + [self.encoder_norm, self.embed_answer]
                + [f for d in self.decoder for f in (d["step"], d["kv"])] + [self.head]
                + list((self.encoder_exits or {}).values()) + list((self.decoder_steps or {}).values()))

@dataclass(frozen=True)
class TextSpec:
    """How text becomes a package's token-id inputs (format version 7, FORMAT.md section 3.6).

    ``tokenizer`` is a file of the package (a ``tokenizers`` JSON), verified like the graphs;
    ``ids`` and ``mask`` name the inputs it fills; texts are cut to ``max_tokens`` tokens."""

    tokenizer: str
    ids: str
    mask: str | None
    max_tokens: int
    pad_id: int


@dataclass(frozen=True)
class CompiledSpec:
    """Optional single graph of the whole early-exit model that decides its exits in-graph.

    ``policies`` are the exit policies compiled into the graph (one per exit); ``sources``
    maps each stage file to the sha256 it had when the graph was built from it.
    """

    file: str
    inputs: tuple[str, ...]
    thresholds: str
    policies: tuple[str, ...]
    outputs: Mapping[str, str]
    sources: Mapping[str, str]
    engines: Mapping[str, Any] | None = None   # the engine measured faster per regime on a device


@dataclass(frozen=True)
class Package:
    """A verified exit package on disk."""

    root: Path
    format_version: int
    kind: str
    name: str
    inputs: tuple[InputSpec, ...]
    labels: tuple[str, ...] | None
    stages: tuple[StageSpec, ...]
    full_model: FullModelSpec | None
    files: Mapping[str, Mapping[str, Any]]
    producer: Mapping[str, Any]
    manifest: Mapping[str, Any] = field(repr=False)
    calibration: Mapping[str, Any] | None = None
    quantization: Mapping[str, Any] | None = None
    compiled: CompiledSpec | None = None
    seq2seq: Seq2SeqSpec | None = None
    text: TextSpec | None = None
    # The verified bytes of each file, when loaded with keep_bytes=True or from an archive:
    # sessions are built from these, so the bytes that were hashed are the bytes that run.
    blobs: dict[str, bytes] | None = field(default=None, repr=False, compare=False)

    def file_path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        """A graph's verified bytes if they were kept, else its bytes on disk; refused
        (``UnsafePathError``) when a tensor in it lives in another file."""
        if self.blobs is not None and name in self.blobs:
            data = self.blobs[name]
        else:
            data = self.file_path(name).read_bytes()
        refuse_external_data(data, name, self.root)
        return data

    def read_verified(self, name: str) -> bytes:
        """A non-graph file's bytes (the tokenizer), checked against the manifest's size and sha256."""
        if self.blobs is not None and name in self.blobs:
            return self.blobs[name]
        check_file_name(name, self.root)
        try:
            with open(self.file_path(name), "rb") as f:
                data = f.read(int(self.files[name]["size"]) + 1)
        except OSError as exc:
            raise FileIntegrityError(f"{name!r} in {self.root} cannot be read ({exc.strerror or exc}); copy the "
                                     "package again or re-export it") from None
        _verify_bytes(self.root, name, self.files[name], data, True)
        return data

    @property
    def exit_stages(self) -> list[int]:
        """Indices of the stages that carry an exit, in order (the last one included)."""
        return [i for i, s in enumerate(self.stages) if s.exit is not None]

    @property
    def thresholds(self) -> list[float | None]:
        """The stored threshold of every early exit (all exits but the last); None: disabled."""
        return [self.stages[i].exit.threshold for i in self.exit_stages[:-1]]  # type: ignore[union-attr]

    @property
    def exits_disabled(self) -> bool:
        """True when the package has early exits and every one is disabled (it runs as the full model)."""
        return len(self.exit_stages) > 1 and all(t is None for t in self.thresholds)

    @property
    def policies(self) -> list[str]:
        return [self.stages[i].exit.policy for i in self.exit_stages]  # type: ignore[union-attr]


# --- reading ------------------------------------------------------------------------


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


def check_file_name(name: Any, root: Path, on_disk: bool = True) -> None:
    """Refuse names that could point outside the package directory."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"package file name {name!r} is not a non-empty string")
    if (
        os.path.isabs(name)
        or name.startswith(("/", "\\"))
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or ":" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise UnsafePathError(
            f"package file {name[:80]!r} is not a plain file name inside {root}: absolute paths, "
            "subfolders, '..', NUL bytes and names over 255 bytes are refused so a package cannot read files "
            "outside itself. "
            "Re-export the package so every file lies directly in its directory."
        )
    if on_disk and (root / name).is_symlink():
        raise UnsafePathError(
            f"package file {name!r} in {root} is a symbolic link; links are refused because they "
            "can point outside the package. Replace it with the real file (cp -L) and re-verify."
        )


def refuse_external_data(data: bytes, name: str, root: Path) -> None:
    """A package's ONNX graphs hold every byte themselves: onnxruntime would read a tensor's
    external file relative to the model (or, for bytes, to the current directory), unhashed."""
    from ._onnx_scan import ScanError, external_locations

    try:
        outside = external_locations(data)
    except ScanError as exc:
        raise FileIntegrityError(f"{name!r} in {root} is not a well-formed ONNX file ({exc}); re-export the "
                                 "package") from None
    if outside:
        raise UnsafePathError(
            f"{name!r} in {root} keeps tensor data in other file(s) {sorted(set(outside))[:5]}, which no hash in the "
            "manifest covers and which could be any file the process can read; packages refuse external data. "
            "Re-export, or save the graph with onnx.save(model, path, save_as_external_data=False)"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_bytes(root: Path, name: str, meta: Mapping[str, Any], data: bytes, verify_hashes: bool) -> None:
    if len(data) != meta["size"]:
        raise FileIntegrityError(
            f"{name!r} in {root} is {len(data)} bytes but the manifest says {meta['size']}; the file "
            "was truncated or replaced. Copy the package again or re-export it."
        )
    if verify_hashes:
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise FileIntegrityError(
                f"{name!r} in {root} has sha256 {digest[:16]}… but the manifest says {meta['sha256'][:16]}…; the "
                "file was modified or corrupted. Copy the package again or re-export it."
            )


def _read_verified(root: Path, files: Mapping[str, Any], blobs: Mapping[str, bytes] | None,
                   verify_hashes: bool) -> dict[str, bytes]:
    """Every listed file's bytes, read once and checked (from ``blobs`` for an archive, else from disk)."""
    out = {}
    for name, meta in files.items():
        check_file_name(name, root, on_disk=blobs is None)
        _schema(isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str)
                and type(meta.get("size")) is int, f"files[{name!r}]",
                "an object with sha256 (string) and size (integer)", meta)
        if blobs is not None:
            if name not in blobs:
                raise MissingFileError(f"packed package {root} lists {name!r} but does not hold it; pack it again")
            data = blobs[name]
        else:
            _verify_files(root, {name: meta}, verify_hashes=False)   # present, regular, not a link
            with open(root / name, "rb") as f:
                data = f.read(meta["size"] + 1)
        _verify_bytes(root, name, meta, data, verify_hashes)
        out[name] = data
    return out


def _verify_files(root: Path, files: Mapping[str, Any], verify_hashes: bool) -> None:
    for name, meta in files.items():
        check_file_name(name, root)
        _schema(isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str)
                and type(meta.get("size")) is int, f"files[{name!r}]",
                "an object with sha256 (string) and size (integer)", meta)
        path = root / name
        if not path.exists():
            raise MissingFileError(
                f"package {root} lists {name!r} but the file is missing; the package was copied "
                "incompletely. Copy the whole directory again or re-export it."
            )
        if not path.is_file():
            raise UnsafePathError(f"package entry {name!r} in {root} is not a regular file")
        size = path.stat().st_size
        if size != meta["size"]:
            raise FileIntegrityError(
                f"{name!r} in {root} is {size} bytes but the manifest says {meta['size']}; the file "
                "was truncated or replaced. Copy the package again or re-export it."
            )
        if verify_hashes:
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise FileIntegrityError(
                    f"{name!r} in {root} has sha256 {digest[:16]}… but the manifest says "
                    f"{meta['sha256'][:16]}…; the file was modified or corrupted. Copy the package "
                    "again or re-export it."
                )


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
    return ExitSpec(logits, policy, None if threshold is None else float(threshold), signals)


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
    for key in ("pad", "bos", "eos"):
        _schema(ints[key] < len(vocab), f"seq2seq.{key}", f"a token id below the vocabulary size {len(vocab)}",
                ints[key])
    names = {i.name for i in inputs}
    modalities = _field(raw, "modalities", "seq2seq")
    _schema(isinstance(modalities, list) and len(modalities) >= 1, "seq2seq.modalities", "a non-empty list",
            modalities)
    for j, m in enumerate(modalities):
        where = f"seq2seq.modalities[{j}]"
        _schema(isinstance(m, Mapping) and isinstance(m.get("name"), str) and m.get("input") in names
                and isinstance(m.get("embed"), str) and isinstance(m.get("first", ""), str), where,
                "an object with name, input (a model input), embed and first (file names)", m)
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
    _schema(ids in token_inputs, "text.ids", f"a 2-D integer input of the model ({sorted(token_inputs)})", ids)
    _schema(mask is None or (mask in token_inputs and mask != ids), "text.mask",
            "null or another 2-D integer input", mask)
    max_tokens, pad_id = raw.get("max_tokens"), raw.get("pad_id", 0)
    _schema(type(max_tokens) is int and 1 <= max_tokens <= MAX_DIM, "text.max_tokens", "a positive integer",
            max_tokens)
    _schema(type(pad_id) is int and pad_id >= 0, "text.pad_id", "a non-negative integer", pad_id)
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
    stale = [name for name, digest in sources.items()
             if not isinstance(files.get(name), Mapping) or files[name].get("sha256") != digest]
    if stale:
        raise ManifestSchemaError(
            f"the compiled graph {file!r} was built from other versions of {stale} than the package holds; it "
            "would not agree with the stage graphs. Rebuild it with `edgeexit compile PACKAGE`."
        )
    return CompiledSpec(file, names, thresholds, policies, dict(outputs), dict(sources),
                        None if engines is None else dict(engines))


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


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    root = Path(path)
    if not root.exists() and not leftovers.recover(root):
        raise PackageNotFoundError(
            f"no exit package at {root}; export one with `edgeexit export` or check the path"
        )
    if not root.is_dir():
        raise PackageNotFoundError(
            f"{root} is a file, but an exit package is a directory holding {MANIFEST_NAME} and the "
            "stage graphs; pass the directory"
        )
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink() or not mpath.is_file():
        raise PackageNotFoundError(
            f"{root} has no {MANIFEST_NAME} (or it is not a regular file); this directory is not an "
            "exit package. Export one with `edgeexit export`."
        )
    with open(mpath, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    return root, decode_manifest(data, str(mpath))


def load_package(path: str | os.PathLike[str] | bytes, *, verify_hashes: bool = True,
                 keep_bytes: bool = False) -> Package:
    """Read and verify an exit package; raises a ``PackageError`` subclass on any defect.

    Args:
        path: the package directory, a packed package file (``NAME.eexit.zip``, see
            ``pack_package``) or the bytes of one.
        verify_hashes: check every file's sha256 (sizes are always checked).
        keep_bytes: read every file once, verify those bytes and keep them in
            ``Package.blobs`` (always so for a packed package), so that whoever builds
            sessions from them runs exactly what was verified.

    Example:
        >>> pkg = load_package("lenet.eexit")          # doctest: +SKIP
        >>> [s.name for s in pkg.stages]               # doctest: +SKIP
        ['stage0', 'stage1']
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        return _load_packed(bytes(path), Path("<package in memory>"), verify_hashes)
    if Path(path).is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if is_archive(head):
            return _load_packed(Path(path).read_bytes(), Path(path), verify_hashes)
    root, manifest = read_manifest(path)
    package = parse_manifest(manifest, root)
    if not keep_bytes:
        _verify_files(root, package.files, verify_hashes)
        return package
    return replace(package, blobs=_read_verified(root, package.files, None, verify_hashes))


def _load_packed(data: bytes, where: Path, verify_hashes: bool) -> Package:
    manifest, members = read_archive(data, str(where))
    package = parse_manifest(manifest, where)
    return replace(package, blobs=_read_verified(where, package.files, members, verify_hashes))


def pack_package(path: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Pack a verified package directory into one file (``NAME.eexit.zip``), written atomically.

    ``ExitSession`` and ``load_package`` take the file or its bytes, for apps that ship the
    model inside their bundle.

    Example:
        >>> pack_package("lenet.eexit", "lenet.eexit.zip")            # doctest: +SKIP
        >>> ExitSession(open("lenet.eexit.zip", "rb").read())          # doctest: +SKIP
    """
    package = load_package(path, keep_bytes=True)
    assert package.blobs is not None
    manifest = (package.root / MANIFEST_NAME).read_bytes()
    data = archive_bytes(manifest, {name: package.blobs[name] for name in package.files})
    load_package(data)   # never write an archive this module would refuse to read
    write_bytes_atomically(output, data)
    return Path(output)


# --- writing ------------------------------------------------------------------------


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest: two-space indented JSON, key order kept, newline."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_package(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    files: Mapping[str, str | os.PathLike[str]],
    *,
    overwrite: bool = True,
) -> Path:
    """Write a package atomically: build it in a temporary sibling, then rename into place.

    ``files`` maps plain file names to source paths; their sha256 and size are added to
    the manifest's ``files`` table.  If anything fails, a previous package at ``path``
    is left untouched.  Returns the package path.
    """
    dest = Path(path)
    with output_errors(dest):
        return _write_package(dest, manifest, files, overwrite)


def _write_package(dest: Path, manifest: Mapping[str, Any], files: Mapping[str, str | os.PathLike[str]],
                   overwrite: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise PackageError(f"{dest} already exists; pass overwrite=True (CLI: --force) to replace it")
    if dest.exists() and not (dest / MANIFEST_NAME).is_file():
        raise PackageError(
            f"{dest} exists and is not an exit package; refusing to replace it. Pick another path."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{leftovers.tag()}-", dir=dest.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        table: dict[str, dict[str, Any]] = {}
        for name, src in files.items():
            check_file_name(name, tmp)
            if not Path(src).is_file():
                raise MissingFileError(f"cannot write {dest}: its file {name!r} should come from {src}, which does "
                                       "not exist (the export that made it failed or was cleaned up)")
            target = tmp / name
            shutil.copyfile(src, target)
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
            table[name] = {"sha256": sha256_file(target), "size": target.stat().st_size}
        full = dict(manifest)
        full["files"] = table
        parse_manifest(full, tmp)  # never write a manifest this module would refuse to read
        _write_bytes_synced(tmp / MANIFEST_NAME, manifest_bytes(full))
        fsync_dir(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _swap_into_place(tmp: Path, dest: Path) -> None:
    # A directory cannot be replaced by one rename.  Where the OS can exchange two paths in one
    # step (Linux renameat2), the new package and the old one swap places and the old one, now
    # at the temporary name, is deleted: there is no moment without a package at ``dest``.
    # Elsewhere the old one is moved aside first; a crash between the two renames leaves it
    # under .NAME.old-PID-*, which the next load of ``dest`` puts back (``leftovers.recover``).
    if dest.exists() and exchange_paths(tmp, dest):
        fsync_dir(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        leftovers.collect_siblings(dest)
        return
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{leftovers.tag()}-", dir=dest.parent))
        old.rmdir()
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    leftovers.collect_siblings(dest)


def set_thresholds(path: str | os.PathLike[str], thresholds: Sequence[float | None]) -> Package:
    """Write one threshold per early exit into a package's manifest (atomically); None disables that exit."""
    values = [None if t is None else float(t) for t in thresholds]

    def change(manifest: dict[str, Any]) -> None:
        early = [s for s in manifest["stages"][:-1] if s.get("exit") is not None]
        if len(early) != len(values):
            raise ManifestSchemaError(
                f"{len(values)} threshold(s) given but the package has {len(early)} early exit(s)"
            )
        for stage, t in zip(early, values):
            stage["exit"]["threshold"] = t
        if any(t is None for t in values):
            manifest["format_version"] = max(manifest["format_version"], DISABLED_EXITS_VERSION)

    return update_manifest(path, change)


def update_manifest(path: str | os.PathLike[str], change: Callable[[dict[str, Any]], None]) -> Package:
    """Apply ``change`` to a verified package's manifest and rewrite it atomically.

    The new manifest is validated before it replaces the old one (temp file +
    ``os.replace``), so a failure leaves the previous manifest in place.
    """
    package = load_package(path)
    manifest = json.loads(json.dumps(package.manifest))
    change(manifest)
    _verify_files(package.root, parse_manifest(manifest, package.root).files, verify_hashes=True)
    write_bytes_atomically(package.root / MANIFEST_NAME, manifest_bytes(manifest))
    leftovers.collect_files(package.root)
    return load_package(package.root)
