"""Golden manifests of format versions 5 to 9 still parse, and each version's fields are refused
in a manifest that claims an older version.

The goldens are the manifest.json of real tiny packages (``tests/golden/make_goldens.py``): v5 and v6
a MuE seq2seq export (v6 with the in-graph encoder exits and decoder steps, v5 without them), v7 a
small BERT classifier with its own tokenizer (the ``text`` object) and a dynamic token axis, v8 the
same BERT whose exits also return PALBERT's ``halt`` and JEI-DNN's ``gate`` signals, v9 a B-LeNet
whose exits have temperatures, its compiled graph rebuilt to divide by them.  As for
versions 1-4, only the manifest is kept and parsed with ``parse_manifest``; the graphs are not.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgeexit.errors import ManifestSchemaError
from edgeexit.package import (
    ENCODER_EXITS_VERSION,
    SEQ2SEQ_VERSION,
    SIGNALS_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    TEMPERATURE_VERSION,
    TEXT_VERSION,
    Seq2SeqSpec,
    TextSpec,
    parse_manifest,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
SHA256 = re.compile(r"[0-9a-f]{64}")


def golden(version: int) -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / f"manifest_v{version}.json").read_text(encoding="utf-8"))


def _check_files_table(files: dict[str, Any]) -> None:
    """Every entry of a real export's files table: a 64-hex sha256 and a positive size."""
    assert files
    for name, meta in files.items():
        assert SHA256.fullmatch(meta["sha256"]), name
        assert type(meta["size"]) is int and meta["size"] > 0, name


def test_the_version_constants_are_the_goldens_versions() -> None:
    assert (SEQ2SEQ_VERSION, ENCODER_EXITS_VERSION, TEXT_VERSION, SIGNALS_VERSION, TEMPERATURE_VERSION) == \
        (5, 6, 7, 8, 9)
    assert SUPPORTED_FORMAT_VERSIONS == frozenset(range(1, 10))
    for version in (5, 6, 7, 8, 9):
        assert golden(version)["format_version"] == version


def _check_seq2seq_common(spec: Seq2SeqSpec, package: Any) -> None:
    assert isinstance(spec, Seq2SeqSpec)
    assert spec.vocab[:3] == ("<pad>", "<bos>", "<eos>") and len(set(spec.vocab)) == len(spec.vocab) == 34
    assert (spec.pad, spec.bos, spec.eos) == (0, 1, 2)
    assert spec.max_answer == 9
    assert (spec.width, spec.heads, spec.head_dim) == (16, 2, 8) and spec.heads * spec.head_dim == spec.width
    assert [m["name"] for m in spec.modalities] == ["image", "text"]
    assert [m["input"] for m in spec.modalities] == [i.name for i in package.inputs] == ["image", "question"]
    assert [m["threshold"] for m in spec.modalities] == [0.9, None]
    assert [m["tokens"] for m in spec.modalities] == [16, 5]
    assert [m["first"] for m in spec.modalities] == ["encoder0_image.onnx", "encoder0_text.onnx"]
    assert spec.encoder == ("encoder0.onnx", "encoder1.onnx")
    assert spec.decoder == ({"step": "decoder0.onnx", "kv": "decoder0_kv.onnx"},
                            {"step": "decoder1.onnx", "kv": "decoder1_kv.onnx"})
    assert (spec.encoder_norm, spec.embed_answer, spec.head) == ("encoder_norm.onnx", "embed_answer.onnx", "head.onnx")
    assert spec.decoder_threshold == 0.95
    # a seq2seq package has no stages, labels, full model, compiled graph or text
    assert package.kind == "seq2seq" and package.stages == () and package.labels is None
    assert package.full_model is None and package.compiled is None and package.text is None
    assert package.inputs[0].shape == ("batch", 1, 28, 28) and package.inputs[1].dtype == "int64"
    # every file of the package is one of its graphs, and every graph has its sha256 and size
    assert len(spec.graph_files()) == len(set(spec.graph_files()))
    assert sorted(spec.graph_files()) == sorted(package.files)
    _check_files_table(dict(package.files))


def test_version_5_golden_parses_as_a_seq2seq_package_without_in_graph_exits(tmp_path: Path) -> None:
    manifest = golden(5)
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == 5 and package.name == "mue-golden"
    spec = package.seq2seq
    assert spec is not None
    _check_seq2seq_common(spec, package)
    assert spec.encoder_exits is None and spec.decoder_steps is None
    assert "encoder_exits" not in manifest["seq2seq"] and "decoder_steps" not in manifest["seq2seq"]
    assert len(package.files) == 13


def test_version_6_golden_parses_with_the_encoder_exits_and_decoder_steps(tmp_path: Path) -> None:
    package = parse_manifest(golden(6), tmp_path)
    assert package.format_version == 6 and package.name == "mue-golden"
    spec = package.seq2seq
    assert spec is not None
    _check_seq2seq_common(spec, package)
    assert spec.encoder_exits == {"per_modality": "encoder_exits.onnx", "joint": "encoder_exits_joint.onnx"}
    assert spec.decoder_steps == {"drop": "decoder_step_drop.onnx", "copy_hidden": "decoder_step_copy_hidden.onnx"}
    # version 6 is version 5 plus the four in-graph graphs; the per-layer graphs are the same bytes
    v5 = parse_manifest(golden(5), tmp_path)
    extra = set(package.files) - set(v5.files)
    assert extra == set(spec.encoder_exits.values()) | set(spec.decoder_steps.values())
    assert set(v5.files) < set(package.files)
    assert all(package.files[name] == meta for name, meta in v5.files.items())


def test_version_7_golden_parses_with_its_tokenizer_and_a_dynamic_token_axis(tmp_path: Path) -> None:
    package = parse_manifest(golden(7), tmp_path)
    assert package.format_version == 7 and package.kind == "classifier" and package.seq2seq is None
    assert package.text == TextSpec(tokenizer="tokenizer.json", ids="input_ids", mask="attention_mask",
                                    max_tokens=16, pad_id=0)
    assert isinstance(package.text, TextSpec)
    assert [(i.name, i.dtype, i.shape) for i in package.inputs] == [
        ("input_ids", "int64", ("batch", "tokens")), ("attention_mask", "int64", ("batch", "tokens"))]
    assert package.labels == ("neg", "neutral", "pos")
    assert [s.file for s in package.stages] == ["stage0.onnx", "stage1.onnx"]
    assert package.stages[0].inputs == ("input_ids", "attention_mask")
    assert package.thresholds == [0.5] and package.policies == ["entropy", "entropy"]
    assert package.full_model is not None and package.full_model.inputs == ("input_ids", "attention_mask")
    assert package.compiled is not None
    assert all(package.compiled.sources[f] == package.files[f]["sha256"] for f in ("stage0.onnx", "stage1.onnx"))
    # the tokenizer is a file of the package, hashed like the graphs, and not a graph
    graphs = {s.file for s in package.stages} | {package.full_model.file, package.compiled.file}
    assert sorted(package.files) == sorted(graphs | {"tokenizer.json"})
    _check_files_table(dict(package.files))


# --- a newer version's field in an older version's manifest is refused ------------------------------


def _v5_with_in_graph_exits(version: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """The v5 golden given the v6 golden's ``keys`` (and their files), claiming ``version``."""
    manifest, v6 = golden(5), golden(6)
    for key in keys:
        manifest["seq2seq"][key] = copy.deepcopy(v6["seq2seq"][key])
        for file in v6["seq2seq"][key].values():
            manifest["files"][file] = dict(v6["files"][file])
    manifest["format_version"] = version
    return manifest


@pytest.mark.parametrize("key", ["encoder_exits", "decoder_steps"])
def test_a_version_5_manifest_with_a_version_6_field_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ManifestSchemaError, match=rf"6 or later for seq2seq\.{key}"):
        parse_manifest(_v5_with_in_graph_exits(5, (key,)), tmp_path)
    # the very same manifest is fine once it says version 6: the version is what was refused
    accepted = parse_manifest(_v5_with_in_graph_exits(6, (key,)), tmp_path)
    assert getattr(accepted.seq2seq, key) == golden(6)["seq2seq"][key]


def test_the_v6_golden_relabelled_version_5_is_refused(tmp_path: Path) -> None:
    manifest = golden(6)
    manifest["format_version"] = 5
    with pytest.raises(ManifestSchemaError, match=r"format_version: expected 6 or later for seq2seq\.encoder_exits"):
        parse_manifest(manifest, tmp_path)


def test_a_seq2seq_manifest_below_version_5_is_refused(tmp_path: Path) -> None:
    manifest = golden(5)
    manifest["format_version"] = 4
    with pytest.raises(ManifestSchemaError, match="5 or later for kind 'seq2seq'"):
        parse_manifest(manifest, tmp_path)


def _v6_with_text(version: int) -> dict[str, Any]:
    """The v6 golden given a ``text`` object filling its question input, with the v7 golden's tokenizer."""
    manifest, v7 = golden(6), golden(7)
    manifest["text"] = {"tokenizer": "tokenizer.json", "ids": "question", "mask": None, "max_tokens": 5, "pad_id": 0}
    manifest["files"]["tokenizer.json"] = dict(v7["files"]["tokenizer.json"])
    manifest["format_version"] = version
    return manifest


def test_a_version_6_manifest_with_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestSchemaError, match="7 or later for the text object"):
        parse_manifest(_v6_with_text(6), tmp_path)
    accepted = parse_manifest(_v6_with_text(7), tmp_path)
    assert accepted.text == TextSpec("tokenizer.json", "question", None, 5, 0)
    assert accepted.seq2seq is not None and accepted.seq2seq.encoder_exits is not None


@pytest.mark.parametrize("version", [4, 5, 6])
def test_the_v7_golden_relabelled_older_is_refused(tmp_path: Path, version: int) -> None:
    manifest = golden(7)
    manifest["format_version"] = version
    with pytest.raises(ManifestSchemaError, match="7 or later for the text object"):
        parse_manifest(manifest, tmp_path)
    del manifest["text"]
    del manifest["files"]["tokenizer.json"]
    assert parse_manifest(manifest, tmp_path).text is None   # without its text object it is a valid classifier


# --- version 8: exit signals -----------------------------------------------------------------------------


def test_version_8_golden_parses_with_the_exits_signals(tmp_path: Path) -> None:
    package = parse_manifest(golden(8), tmp_path)
    assert package.format_version == 8 and package.policies == ["q_exit", "q_exit"] and package.thresholds == [0.5]
    assert [s.exit.signals for s in package.stages] == [{"halt": "halt0", "gate": "gate0"},
                                                        {"halt": "halt1", "gate": "gate1"}]
    assert package.stages[0].exit.output("halt") == "halt0" and package.stages[1].exit.output("logits") == "logits1"
    assert package.text is not None and package.compiled is None    # q_exit runs on the stage loop
    assert [len(s.carry) for s in package.stages] == [3, 0]          # hidden, mask, pooled hidden before layer 1
    _check_files_table(dict(package.files))


@pytest.mark.parametrize("version", [4, 7])
def test_signals_in_a_manifest_below_version_8_are_refused(tmp_path: Path, version: int) -> None:
    manifest = golden(8)
    manifest["format_version"] = version
    with pytest.raises(ManifestSchemaError, match=rf"absent in a version-{version} package \(exit signals need"):
        parse_manifest(manifest, tmp_path)


def _v8(change: Any) -> dict[str, Any]:
    manifest = golden(8)
    change(manifest)
    return manifest


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["stages"][0]["exit"]["signals"].pop("halt"),
     r"policy 'q_exit' scores the exit's 'halt' signal, but this exit has only the signals \['gate'\]"),
    (lambda m: m["stages"][0]["exit"].pop("signals"), r"policy 'q_exit' scores the exit's 'halt' signal, but this "
                                                      r"exit has no signals"),
    (lambda m: m["stages"][0]["exit"]["signals"].update(halt="attention_mask"),
     r"output names other than the stage's carry, the model inputs and earlier carries"),
    (lambda m: m["stages"][1]["exit"]["signals"].update(gate="carry0_0"),
     r"output names other than the stage's carry, the model inputs and earlier carries"),
    (lambda m: m["stages"][0]["exit"]["signals"].update(gate="logits0"), r"distinct output names other than the "
                                                                         r"logits"),
    (lambda m: m["stages"][0]["exit"]["signals"].update(lam="x"), r"signals \(halt, gate\)"),
    (lambda m: m["stages"][1]["exit"].update(policy="entropy"),
     r"a stateful policy \(patience, q_exit\) carries its state through every exit"),
], ids=["missing-halt", "no-signals", "clashes-with-input", "clashes-with-carry", "same-as-logits",
        "unknown-signal", "mixed-with-stateful"])
def test_bad_signals_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(ManifestSchemaError, match=message):
        parse_manifest(_v8(change), tmp_path)


# --- version 9: temperatures -----------------------------------------------------------------------------


def test_version_9_golden_parses_with_the_exits_temperatures(tmp_path: Path) -> None:
    manifest = golden(9)
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == 9 and package.kind == "classifier" and package.name == "blenet-temperature-golden"
    assert package.temperatures == [1.5, 0.8] and [s.exit.temperature for s in package.stages] == [1.5, 0.8]
    assert package.thresholds == [0.05] and package.policies == ["entropy", "entropy"]
    # the temperature is the last key of each exit: set_temperatures appended it to the exported manifest
    assert [list(s["exit"]) for s in manifest["stages"]] == [["logits", "policy", "threshold", "temperature"]] * 2
    # the compiled graph was rebuilt after the temperatures were set: it divides by the same ones
    assert package.compiled is not None and package.compiled.temperatures == (1.5, 0.8)
    assert package.compiled.file == "compiled-next.onnx" and package.compiled_stale is None
    assert all(package.compiled.sources[f] == package.files[f]["sha256"] for f in ("stage0.onnx", "stage1.onnx"))
    assert sorted(package.files) == ["compiled-next.onnx", "full.onnx", "stage0.onnx", "stage1.onnx"]
    _check_files_table(dict(package.files))


@pytest.mark.parametrize("version", [3, 4, 8])   # a compiled graph needs 3
def test_temperatures_in_a_manifest_below_version_9_are_refused(tmp_path: Path, version: int) -> None:
    manifest = golden(9)
    manifest["format_version"] = version
    with pytest.raises(ManifestSchemaError, match=rf"stages\[0\]\.exit\.temperature: expected absent in a "
                                                  rf"version-{version} package \(temperatures need format version 9"):
        parse_manifest(manifest, tmp_path)
    for stage in manifest["stages"]:
        del stage["exit"]["temperature"]
    with pytest.raises(ManifestSchemaError, match=rf"compiled\.temperatures: expected absent in a version-{version}"):
        parse_manifest(manifest, tmp_path)   # the compiled graph's record of them is a version-9 field as well
    del manifest["compiled"]["temperatures"]
    parse_manifest(manifest, tmp_path)       # without them it is a valid package of that version


def _v9(change: Any) -> dict[str, Any]:
    manifest = golden(9)
    change(manifest)
    return manifest


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["stages"][0]["exit"].update(temperature=0), r"stages\[0\]\.exit\.temperature: expected a positive"),
    (lambda m: m["stages"][1]["exit"].update(temperature=-0.8), r"stages\[1\]\.exit\.temperature: expected a pos"),
    (lambda m: m["stages"][0]["exit"].update(temperature=True), r"exit\.temperature: expected a positive finite"),
    (lambda m: m["stages"][0]["exit"].update(temperature="1.5"), r"exit\.temperature: expected a positive finite"),
    (lambda m: m["compiled"].update(temperatures=[1.5]), r"compiled\.temperatures: expected a list of one "
                                                         r"temperature per exit \(2\)"),
    (lambda m: m["compiled"].update(temperatures=[1.5, None]), r"compiled\.temperatures: expected a list of one"),
    (lambda m: m["compiled"].update(temperatures=[1.5, 0.0]), r"compiled\.temperatures: expected a positive finite"),
    (lambda m: m["compiled"].update(temperatures={"0": 1.5}), r"compiled\.temperatures: expected a list"),
], ids=["zero", "negative", "bool", "string", "compiled-short", "compiled-null", "compiled-zero", "compiled-object"])
def test_bad_temperatures_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(ManifestSchemaError, match=message):
        parse_manifest(_v9(change), tmp_path)


def test_a_null_temperature_reads_as_1_and_marks_the_compiled_graph_stale(tmp_path: Path) -> None:
    package = parse_manifest(_v9(lambda m: m["stages"][1]["exit"].update(temperature=None)), tmp_path)
    assert package.temperatures == [1.5, 1.0]
    assert package.compiled_stale == ("it divides the exits' logits by the temperatures [1.5, 0.8], the exits now "
                                      "have [1.5, 1.0]")
