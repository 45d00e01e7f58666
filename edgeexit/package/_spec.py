"""What an exit package's manifest holds: the format constants and frozen dataclasses.

The format name and versions (which version added what), the file name of the manifest,
the known kinds and input dtypes, and one frozen dataclass per part of a manifest
(``InputSpec``, ``ExitSpec``, ``StageSpec``, ``FullModelSpec``, ``Seq2SeqSpec``,
``TextSpec``, ``CompiledSpec``) gathered in ``Package``, a verified package on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FileIntegrityError
from ._files import _verify_bytes, check_file_name, refuse_external_data

FORMAT_NAME = "edgeexit"
# Version 2 added the optional `calibration` history, `quantization` record and
# `stages[].cost.measured_ms`; version 3 added the optional `compiled` graph (the whole
# model as one ONNX graph deciding its exits in-graph); version 4 lets an early exit's
# threshold be null: that exit is disabled (not calibrated yet, or slower than the full
# model on the device it was calibrated on).  Versions 1-3 load unchanged.
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9})
SEQ2SEQ_VERSION = 5   # adds kind "seq2seq" (the `seq2seq` object); classifiers are still written as 4
# version 6 adds `seq2seq.encoder_exits` and `seq2seq.decoder_steps`: the encoder and a decoder step
# with in-graph exits (optional; 5 loads unchanged)
ENCODER_EXITS_VERSION = 6
# version 7 adds the optional `text` object: the package's own tokenizer for token-id inputs
TEXT_VERSION = 7
# version 8 adds `stages[].exit.signals`: exit outputs besides the logits (PALBERT's halting
# probability, JEI-DNN's gate value) that the q_exit and gate policies score
SIGNALS_VERSION = 8
# version 9 adds `stages[].exit.temperature`: the exit's logits are divided by it before a policy
# scores them (temperature scaling), and `compiled.temperatures`, those the compiled graph divides by
TEMPERATURE_VERSION = 9
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
    version 4) for an early exit that is disabled: no sample leaves there.  ``temperature``
    (format version 9) divides the logits before a policy that reads them scores them; 1.0
    when the manifest gives none.
    """

    logits: str
    policy: str
    threshold: float | None
    signals: Mapping[str, str] = field(default_factory=dict)   # signal ("halt", "gate") -> output; version 8
    temperature: float = 1.0                                     # version 9

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
    maps each stage file to the sha256 it had when the graph was built from it;
    ``temperatures`` are those the graph divides each exit's logits by (one per exit, 1.0
    where the manifest gives none; format version 9).
    """

    file: str
    inputs: tuple[str, ...]
    thresholds: str
    policies: tuple[str, ...]
    outputs: Mapping[str, str]
    sources: Mapping[str, str]
    engines: Mapping[str, Any] | None = None   # the engine measured faster per regime on a device
    temperatures: tuple[float, ...] = ()        # one per exit


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

    @property
    def temperatures(self) -> list[float]:
        """Every exit's temperature, the final exit's included (1.0: the logits are scored as they are)."""
        return [self.stages[i].exit.temperature for i in self.exit_stages]  # type: ignore[union-attr]

    @property
    def compiled_stale(self) -> str | None:
        """Why the compiled graph cannot answer for the package's exits as they are now (it computes other
        policies or other temperatures: rebuild it with ``edgeexit compile``), or None."""
        if self.compiled is None:
            return None
        if list(self.compiled.temperatures) != self.temperatures:
            return (f"it divides the exits' logits by the temperatures {list(self.compiled.temperatures)}, the exits "
                    f"now have {self.temperatures}")
        if list(self.compiled.policies) != self.policies:
            return f"it computes the policies {list(self.compiled.policies)}, the exits now use {self.policies}"
        return None
