"""The exit-package format: every refusal, atomic writes, and the golden manifest.

Refusals must happen before onnxruntime builds any session: each refusal test replaces
``onnxruntime.InferenceSession`` with a function that fails the test.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

import edgeexit.errors as errors_module
from edgeexit.errors import (
    ArchiveError,
    EdgeExitError,
    FileIntegrityError,
    GraphMismatchError,
    ManifestParseError,
    ManifestSchemaError,
    MissingFileError,
    OutputError,
    PackageError,
    PackageNotFoundError,
    UnknownPolicyError,
    UnsafePathError,
    UnsupportedFormatError,
)
from edgeexit.package import (
    FORMAT_VERSION,
    load_package,
    parse_manifest,
    update_manifest,
    write_package,
)
from edgeexit.policies import list_policies
from edgeexit.runtime import ExitSession

GOLDEN = Path(__file__).parent / "golden" / "manifest_v4.json"
GOLDEN_V3 = Path(__file__).parent / "golden" / "manifest_v3.json"
GOLDEN_V2 = Path(__file__).parent / "golden" / "manifest_v2.json"
GOLDEN_V1 = Path(__file__).parent / "golden" / "manifest_v1.json"
REGENERATE_ENV = "EDGEEXIT_REGENERATE_GOLDEN"


# --- helpers ---------------------------------------------------------------------------------


def edit_manifest(package: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change manifest.json in place with no validation, as a hand edit or another tool would."""
    path = package / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings that write_package may create next to package ``name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def no_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything builds an onnxruntime session."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"an onnxruntime session was built before the package was verified: {args[:1]}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _stage(k: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda m: m["stages"][k]


# --- the tiny package itself -------------------------------------------------------------------


def test_tiny_package_loads_and_runs(tiny_package: Path) -> None:
    package = load_package(tiny_package)
    assert [s.name for s in package.stages] == ["stage0", "stage1"]
    assert package.thresholds == [0.5]
    assert package.policies == ["entropy", "entropy"]
    assert sorted(package.files) == ["stage0.onnx", "stage1.onnx"]
    session = ExitSession(tiny_package)
    x = np.array([[5, 0, 0, 0], [0.1, 0.1, 0.1, 0.1], [0, 0, 3, 0]], dtype=np.float32)
    result = session.run(x)
    assert result.exit_index.tolist() == [0, 1, 0]
    assert result.predictions.tolist() == [0, 2, 2]
    one = session.run(x[1:2])
    assert one.exit_index.tolist() == [1]


def test_no_sessions_fixture_really_blocks_sessions(tiny_package: Path, no_sessions: None) -> None:
    # the positive control for every refusal test below
    with pytest.raises(pytest.fail.Exception, match="session was built"):
        ExitSession(tiny_package)


# --- refusals ------------------------------------------------------------------------------------


def _move_outside(package: Path, name: str, outside: str) -> None:
    """Replace files[name] by an entry for ``outside`` pointing at a real copy of the file."""
    target = Path(outside) if os.path.isabs(outside) else package / outside
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package / name, target)

    def change(m: dict[str, Any]) -> None:
        m["files"][outside] = m["files"].pop(name)
        for stage in m["stages"]:
            if stage["file"] == name:
                stage["file"] = outside

    edit_manifest(package, change)


def _damage_missing_file(pkg: Path) -> Path:
    (pkg / "stage1.onnx").unlink()
    return pkg


def _damage_size(pkg: Path) -> Path:
    with open(pkg / "stage1.onnx", "ab") as f:
        f.write(b"\0")
    return pkg


def _damage_hash(pkg: Path) -> Path:
    data = bytearray((pkg / "stage1.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / "stage1.onnx").write_bytes(bytes(data))
    return pkg


def _damage_parent_dir(pkg: Path) -> Path:
    _move_outside(pkg, "stage1.onnx", "../x")
    return pkg


def _damage_absolute(pkg: Path) -> Path:
    _move_outside(pkg, "stage1.onnx", str(pkg.parent / "outside.onnx"))
    return pkg


def _damage_subfolder(pkg: Path) -> Path:
    _move_outside(pkg, "stage1.onnx", "sub/x.onnx")
    return pkg


def _damage_backslash(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(1)(m).update(file="sub\\x.onnx"))
    return pkg


def _damage_symlink(pkg: Path) -> Path:
    outside = pkg.parent / "outside.onnx"
    (pkg / "stage1.onnx").rename(outside)
    (pkg / "stage1.onnx").symlink_to(outside)  # same bytes: only the link itself is wrong
    return pkg


def _damage_not_regular(pkg: Path) -> Path:
    (pkg / "stage1.onnx").unlink()
    (pkg / "stage1.onnx").mkdir()
    return pkg


def _damage_format_version(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(format_version=99))
    return pkg


def _damage_format_version_missing(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.pop("format_version"))
    return pkg


def _damage_format_name(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(format="onnx-bundle"))
    return pkg


def _damage_not_json(pkg: Path) -> Path:
    (pkg / "manifest.json").write_text('{"format": "edgeexit", ', encoding="utf-8")
    return pkg


def _damage_not_utf8(pkg: Path) -> Path:
    (pkg / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    return pkg


def _damage_missing_manifest(pkg: Path) -> Path:
    (pkg / "manifest.json").unlink()
    return pkg


def _damage_manifest_symlink(pkg: Path) -> Path:
    outside = pkg.parent / "manifest-elsewhere.json"
    (pkg / "manifest.json").rename(outside)
    (pkg / "manifest.json").symlink_to(outside)
    return pkg


def _damage_path_is_file(pkg: Path) -> Path:
    return pkg / "stage0.onnx"


def _damage_path_missing(pkg: Path) -> Path:
    return pkg.parent / "nowhere.eexit"


def _damage_unknown_policy(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(0)(m)["exit"].update(policy="entrop"))
    return pkg


def _damage_archive_folder(pkg: Path) -> Path:
    import zipfile

    packed = pkg.parent / "folder.eexit.zip"
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("manifest.json", (pkg / "manifest.json").read_bytes())
        archive.writestr("sub/stage0.onnx", (pkg / "stage0.onnx").read_bytes())
    return packed


def _damage_no_threshold(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(0)(m)["exit"].update(threshold=None))
    return pkg


def _damage_threshold_type(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(0)(m)["exit"].update(threshold="high"))
    return pkg


def _damage_threshold_nan(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(0)(m)["exit"].update(threshold=float("nan")))
    return pkg


def _damage_format_version_list(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(format_version=[1]))
    return pkg


def _damage_format_version_float(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(format_version=1.0))
    return pkg


def _damage_inputs_type(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(inputs=5))
    return pkg


def _damage_cost_type(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(0)(m).update(cost=[1, 2]))
    return pkg


def _damage_producer_type(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(producer=[1]))
    return pkg


def _damage_unavailable_tensor(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(1)(m).update(inputs=["carry9_9"]))
    return pkg


def _damage_last_stage_without_exit(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: _stage(1)(m).update(exit=None))
    return pkg


def _damage_files_entry_missing(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m["files"].pop("stage1.onnx"))
    return pkg


def _damage_files_entry_shape(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m["files"]["stage1.onnx"].pop("sha256"))
    return pkg


def _damage_kind(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m.update(kind="regressor"))
    return pkg


def _damage_batch_axis(pkg: Path) -> Path:
    edit_manifest(pkg, lambda m: m["inputs"][0].update(shape=[1, 4]))
    return pkg


REFUSALS: list[tuple[str, Callable[[Path], Path], type[Exception], list[str]]] = [
    ("missing-file", _damage_missing_file, MissingFileError,
     ["lists 'stage1.onnx' but the file is missing", "copied incompletely"]),
    ("size-mismatch", _damage_size, FileIntegrityError,
     ["'stage1.onnx'", "bytes but the manifest says", "truncated or replaced"]),
    ("hash-mismatch", _damage_hash, FileIntegrityError,
     ["'stage1.onnx'", "has sha256", "the file was modified or corrupted"]),
    ("parent-dir", _damage_parent_dir, UnsafePathError,
     ["package file '../x' is not a plain file name", "'..', NUL bytes"]),
    ("absolute-path", _damage_absolute, UnsafePathError,
     ["outside.onnx' is not a plain file name", "absolute paths"]),
    ("subfolder", _damage_subfolder, UnsafePathError,
     ["package file 'sub/x.onnx' is not a plain file name", "subfolders"]),
    ("backslash", _damage_backslash, UnsafePathError, ["is not a plain file name"]),
    ("symlink", _damage_symlink, UnsafePathError,
     ["package file 'stage1.onnx'", "is a symbolic link", "cp -L"]),
    ("not-a-regular-file", _damage_not_regular, UnsafePathError,
     ["package entry 'stage1.onnx'", "is not a regular file"]),
    ("format-version-99", _damage_format_version, UnsupportedFormatError,
     ["package format_version 99 is not supported", "reads version(s) [1, 2, 3, 4, 5, 6, 7, 8, 9]",
      "Upgrade edgeexit"]),
    ("format-version-missing", _damage_format_version_missing, UnsupportedFormatError,
     ["format_version None is not supported"]),
    ("format-name", _damage_format_name, UnsupportedFormatError,
     ["manifest format is 'onnx-bundle', expected 'edgeexit'", "this is not an edgeexit package"]),
    ("manifest-not-json", _damage_not_json, ManifestParseError,
     ["manifest.json is not valid JSON", "Re-export the package"]),
    ("manifest-not-utf8", _damage_not_utf8, ManifestParseError, ["is not UTF-8 text"]),
    ("missing-manifest", _damage_missing_manifest, PackageNotFoundError,
     ["has no manifest.json", "this directory is not an exit package"]),
    ("manifest-symlink", _damage_manifest_symlink, PackageNotFoundError,
     ["has no manifest.json (or it is not a regular file)"]),
    ("path-is-a-file", _damage_path_is_file, PackageNotFoundError,
     ["stage0.onnx is a file", "pass the directory"]),
    ("path-missing", _damage_path_missing, PackageNotFoundError,
     ["no exit package at", "nowhere.eexit"]),
    ("unknown-policy", _damage_unknown_policy, UnknownPolicyError,
     ["unknown exit policy 'entrop'", f"registered policies: {', '.join(list_policies())}.",
      "Did you mean 'entropy'?"]),
    ("archive-with-a-folder", _damage_archive_folder, ArchiveError, ["holds 'sub/stage0.onnx'",
                                                                     "plain file names only"]),
    ("early-exit-without-threshold", _damage_no_threshold, ManifestSchemaError,
     ["stage 0 (stage0) has an early exit without a threshold", "only the last exit may omit it"]),
    ("threshold-not-a-number", _damage_threshold_type, ManifestSchemaError,
     ["manifest field stages[0].exit.threshold: expected a finite number or null, got 'high'"]),
    ("threshold-nan", _damage_threshold_nan, ManifestParseError,  # a bare NaN is not JSON
     ["holds NaN (not JSON"]),
    ("format-version-list", _damage_format_version_list, UnsupportedFormatError,
     ["format_version [1] is not supported"]),
    ("format-version-float", _damage_format_version_float, UnsupportedFormatError,
     ["format_version 1.0 is not supported"]),
    ("inputs-not-a-list", _damage_inputs_type, ManifestSchemaError,
     ["manifest field inputs: expected a list of input objects, got 5"]),
    ("cost-not-an-object", _damage_cost_type, ManifestSchemaError,
     ["manifest field stages[0].cost: expected an object, got [1, 2]"]),
    ("producer-not-an-object", _damage_producer_type, ManifestSchemaError,
     ["manifest field producer: expected an object, got [1]"]),
    ("unavailable-tensor", _damage_unavailable_tensor, ManifestSchemaError,
     ["stage 1 (stage1) reads ['carry9_9']", "which no model input or earlier stage provides",
      "available: ['carry0_0', 'x']"]),
    ("last-stage-without-exit", _damage_last_stage_without_exit, ManifestSchemaError,
     ["the last stage must carry the final exit"]),
    ("files-entry-missing", _damage_files_entry_missing, ManifestSchemaError,
     ["manifest refers to 'stage1.onnx' but has no files['stage1.onnx'] entry"]),
    ("files-entry-without-sha256", _damage_files_entry_shape, ManifestSchemaError,
     ["manifest field files['stage1.onnx']", "sha256 (string) and size (integer)"]),
    ("unknown-kind", _damage_kind, ManifestSchemaError,
     ["manifest field kind: expected one of ('classifier', 'seq2seq', 'pipeline'), got 'regressor'"]),
    ("fixed-batch-axis", _damage_batch_axis, ManifestSchemaError,
     ["inputs[0].shape[0]: expected a symbolic batch axis name, got 1"]),
]


@pytest.mark.parametrize(
    ("damage", "error", "fragments"),
    [pytest.param(d, e, f, id=i) for i, d, e, f in REFUSALS],
)
def test_refusals_come_before_any_session(
    tiny_package: Path, no_sessions: None,
    damage: Callable[[Path], Path], error: type[Exception], fragments: list[str],
) -> None:
    path = damage(tiny_package)
    for load in (load_package, ExitSession):
        with pytest.raises(EdgeExitError) as info:
            load(path)
        assert type(info.value) is error, f"{load.__name__}: {type(info.value).__name__}: {info.value}"
        for fragment in fragments:
            assert fragment in str(info.value), f"{load.__name__}: {fragment!r} not in {info.value}"


def test_every_package_error_class_has_a_refusal() -> None:
    tested = {e for _, _, e, _ in REFUSALS} | {GraphMismatchError}
    expected = {cls for cls in vars(errors_module).values()
                if isinstance(cls, type) and issubclass(cls, PackageError) and cls is not PackageError}
    assert expected <= tested, f"untested package errors: {sorted(c.__name__ for c in expected - tested)}"


def test_skipping_hashes_still_checks_sizes(tiny_package: Path, no_sessions: None) -> None:
    _damage_hash(tiny_package)
    assert load_package(tiny_package, verify_hashes=False).name == "Tiny"
    _damage_size(tiny_package)
    with pytest.raises(FileIntegrityError, match="bytes but the manifest says"):
        load_package(tiny_package, verify_hashes=False)


# --- graph mismatch (found once sessions exist) ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param(lambda m: _stage(1)(m).update(inputs=["x"]),
                     ["stage 'stage1' (stage1.onnx)", "the manifest declares inputs ['x']",
                      "the graph has inputs ['carry0_0']"], id="stage-input-differs"),
        pytest.param(lambda m: _stage(0)(m)["exit"].update(logits="logits_zero"),
                     ["stage 'stage0'", "outputs ['carry0_0', 'logits_zero']",
                      "outputs ['carry0_0', 'logits0']"], id="exit-output-differs"),
        pytest.param(lambda m: _stage(0)(m).update(carry=["carry0_0", "carry0_1"]),
                     ["stage 'stage0'", "['carry0_0', 'carry0_1', 'logits0']"], id="extra-carry"),
    ],
)
def test_graph_mismatch(
    tiny_package_factory: Callable[..., Path], change: Callable[[dict[str, Any]], None], fragments: list[str],
) -> None:
    path = tiny_package_factory(change=change)  # write_package recomputes the hashes
    load_package(path)  # the manifest alone is consistent
    with pytest.raises(GraphMismatchError) as info:
        ExitSession(path)
    for fragment in [*fragments, "from different exports). Re-export the package."]:
        assert fragment in str(info.value)


# --- atomic writes ----------------------------------------------------------------------------------


WriteArgs = tuple[dict[str, Any], dict[str, Path]]


def _bad_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[..., WriteArgs]:
    def make(manifest: dict[str, Any], sources: dict[str, Path], tmp: Path) -> WriteArgs:
        change(manifest)
        return manifest, sources
    return make


def _bad_files(change: Callable[[dict[str, Path], Path], dict[str, Path]]) -> Callable[..., WriteArgs]:
    def make(manifest: dict[str, Any], sources: dict[str, Path], tmp: Path) -> WriteArgs:
        return manifest, change(dict(sources), tmp)
    return make


FAILED_WRITES = [
    pytest.param(_bad_files(lambda s, t: {**s, "stage1.onnx": t / "does-not-exist.onnx"}),
                 FileNotFoundError, id="missing-source-file"),
    pytest.param(_bad_files(lambda s, t: {**s, "../evil.onnx": s["stage0.onnx"]}),
                 UnsafePathError, id="unsafe-file-name"),
    pytest.param(_bad_manifest(lambda m: _stage(0)(m)["exit"].update(policy="entrop")),
                 UnknownPolicyError, id="unknown-policy"),
    pytest.param(_bad_manifest(lambda m: m.update(format_version=99)),
                 UnsupportedFormatError, id="unknown-format-version"),
    pytest.param(_bad_manifest(lambda m: _stage(1)(m).update(file="stage2.onnx")),
                 ManifestSchemaError, id="file-not-written"),
    pytest.param(_bad_manifest(lambda m: _stage(0)(m)["exit"].update(threshold=float("nan"))),
                 ManifestSchemaError, id="nan-threshold"),
]


@pytest.mark.parametrize(("make", "error"), FAILED_WRITES)
def test_failed_write_keeps_the_previous_package(
    tiny_package: Path, tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path], tmp_path: Path,
    make: Callable[..., WriteArgs], error: type[Exception],
) -> None:
    before = snapshot(tiny_package)
    manifest, files = make(tiny_manifest, tiny_sources, tmp_path)
    with pytest.raises(error):
        write_package(tiny_package, manifest, files, overwrite=True)
    assert snapshot(tiny_package) == before
    assert load_package(tiny_package).thresholds == [0.5]
    assert leftovers(tmp_path, tiny_package.name) == []


def test_failed_write_to_a_new_path_leaves_nothing(
    tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path], tmp_path: Path,
) -> None:
    manifest = tiny_manifest
    manifest["format_version"] = 99
    with pytest.raises(UnsupportedFormatError):
        write_package(tmp_path / "new.eexit", manifest, tiny_sources)
    assert not (tmp_path / "new.eexit").exists()
    assert leftovers(tmp_path, "new.eexit") == []


def test_crash_while_swapping_restores_the_previous_package(
    tiny_package: Path, tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = snapshot(tiny_package)
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if ".tmp-" in Path(src).name:  # the old package was moved aside; the new one fails to land
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr("edgeexit.package._write.exchange_paths", lambda a, b: False)   # the two-rename fallback
    manifest = tiny_manifest
    _stage(0)(manifest)["exit"]["threshold"] = 0.1
    with pytest.raises(OSError, match="simulated crash"):
        write_package(tiny_package, manifest, tiny_sources, overwrite=True)
    monkeypatch.undo()
    assert snapshot(tiny_package) == before
    assert leftovers(tmp_path, tiny_package.name) == []


def test_overwrite_replaces_the_package_cleanly(
    tiny_package: Path, tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path], tmp_path: Path,
) -> None:
    manifest = tiny_manifest
    _stage(0)(manifest)["exit"]["threshold"] = 0.125
    write_package(tiny_package, manifest, tiny_sources, overwrite=True)
    assert load_package(tiny_package).thresholds == [0.125]
    assert leftovers(tmp_path, tiny_package.name) == []


def test_overwrite_false_refuses(
    tiny_package: Path, tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path],
) -> None:
    before = snapshot(tiny_package)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        write_package(tiny_package, tiny_manifest, tiny_sources, overwrite=False)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):   # the default: never replace
        write_package(tiny_package, tiny_manifest, tiny_sources)
    assert snapshot(tiny_package) == before


def test_write_refuses_to_replace_a_directory_that_is_not_a_package(
    tmp_path: Path, tiny_manifest: dict[str, Any], tiny_sources: dict[str, Path],
) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputError, match="exists and is not an exit package; refusing to replace it"):
        write_package(precious, tiny_manifest, tiny_sources, overwrite=True)
    assert snapshot(precious) == {"holiday.jpg": b"\xff\xd8"}


def test_update_manifest_changes_the_threshold(tiny_package: Path, no_sessions: None) -> None:
    graphs = {k: v for k, v in snapshot(tiny_package).items() if k != "manifest.json"}
    returned = update_manifest(tiny_package, lambda m: _stage(0)(m)["exit"].update(threshold=0.25))
    assert returned.thresholds == [0.25]
    assert load_package(tiny_package).thresholds == [0.25]
    after = snapshot(tiny_package)
    assert sorted(after) == ["manifest.json", *sorted(graphs)]  # no temp file left
    assert {k: v for k, v in after.items() if k != "manifest.json"} == graphs


def test_update_manifest_is_seen_by_a_new_session(tiny_package: Path) -> None:
    x = np.array([[0.1, 0.1, 0.1, 0.1]], dtype=np.float32)  # entropy ~1.1: goes on at 0.5
    assert ExitSession(tiny_package).run(x).exit_index.tolist() == [1]
    update_manifest(tiny_package, lambda m: _stage(0)(m)["exit"].update(threshold=2.0))
    assert ExitSession(tiny_package).run(x).exit_index.tolist() == [0]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param(lambda m: _stage(0)(m)["exit"].update(policy="entrop"), UnknownPolicyError,
                     id="unknown-policy"),
        pytest.param(lambda m: m.update(format_version=99), UnsupportedFormatError, id="format-version"),
        pytest.param(lambda m: _stage(0)(m)["exit"].update(threshold="high"), ManifestSchemaError,
                     id="threshold-not-a-number"),
        pytest.param(lambda m: _stage(0)(m)["exit"].update(threshold=None), ManifestSchemaError,
                     id="threshold-removed"),
        pytest.param(lambda m: _stage(1)(m).update(file="../stage1.onnx"), UnsafePathError, id="unsafe-file"),
        pytest.param(lambda m: _stage(0)(m)["exit"].update(threshold=float("nan")), ManifestSchemaError,
                     id="nan-threshold"),
        pytest.param(lambda m: _stage(0)(m)["exit"].update(threshold=float("inf")), ManifestSchemaError,
                     id="inf-threshold"),
        pytest.param(lambda m: m["nonexistent"]["key"], KeyError, id="change-itself-fails"),
    ],
)
def test_invalid_update_leaves_the_manifest_untouched(
    tiny_package: Path, change: Callable[[dict[str, Any]], None], error: type[Exception],
) -> None:
    before = snapshot(tiny_package)
    with pytest.raises(error):
        update_manifest(tiny_package, change)
    assert snapshot(tiny_package) == before


def test_crash_while_replacing_the_manifest_leaves_it_untouched(
    tiny_package: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = snapshot(tiny_package)

    def replace(src: Any, dst: Any) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        update_manifest(tiny_package, lambda m: _stage(0)(m)["exit"].update(threshold=0.25))
    monkeypatch.undo()
    assert snapshot(tiny_package) == before


# --- the golden manifest ------------------------------------------------------------------------------

GOLDEN_FILES = {
    "stage0.onnx": b"fixed bytes standing in for the stage 0 graph\n",
    "stage1.onnx": b"fixed bytes standing in for the stage 1 graph\n",
    "full.onnx": b"fixed bytes standing in for the whole model\n",
    "compiled.onnx": b"fixed bytes standing in for the compiled graph\n",
}


def _sha(name: str) -> str:
    return hashlib.sha256(GOLDEN_FILES[name]).hexdigest()


def golden_manifest() -> dict[str, Any]:
    # Spelled out in full (not derived from the conftest package) so that nothing but a
    # change of the format or of write_package can move the golden bytes.
    return {
        "format": "edgeexit",
        "format_version": 4,
        "kind": "classifier",
        "name": "GoldenNet",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "labels": ["zéro", "one", "two"],  # non-ASCII is written as UTF-8, not \u escapes
        "stages": [
            {
                "name": "stage0", "file": "stage0.onnx", "inputs": ["x"], "carry": ["carry0_0"],
                "exit": {"logits": "logits0", "policy": "entropy", "threshold": 0.5},
                "cost": {"params": 12, "flops": 24, "exit_flops": 24, "measured_ms": 0.0125},
            },
            {
                "name": "stage1", "file": "stage1.onnx", "inputs": ["carry0_0"], "carry": [],
                "exit": {"logits": "logits1", "policy": "entropy", "threshold": None},
                "cost": {"params": 12, "flops": 24, "exit_flops": 24},
            },
        ],
        "full_model": {
            "file": "full.onnx", "inputs": ["x"], "logits": "logits", "cost": {"params": 24, "flops": 48},
        },
        "preprocessing": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
        "producer": {
            "edgeexit": "0.1.0", "torch": "2.4.0", "onnx": "1.16.0", "onnxruntime": "1.17.0",
            "opset": 18, "exporter": "torchscript",
        },
        "calibration": {"history": [{
            "created": "2026-11-28T19:00:00+00:00", "device": "cpu", "previous_thresholds": [0.25],
            "previous_policies": ["entropy", "entropy"], "policy": "entropy", "thresholds": [0.5],
            "objective": {"kind": "max_drop", "value": 0.003, "z": 1.645}, "method": "exhaustive",
            "samples": 1000, "validation_accuracy": 0.97, "full_accuracy": 0.971,
            "expected_shares": [0.9, 0.1], "expected_cost": 0.031, "full_cost": 0.0625, "cost_unit": "ms",
            "cost_source": "measured", "stage_costs": [0.0125, 0.05],
        }]},
        "quantization": None,
        "compiled": {
            "file": "compiled.onnx", "inputs": ["x"], "thresholds": "thresholds",
            "policies": ["entropy", "entropy"],
            "outputs": {"logits": "logits", "exit_index": "exit_index", "score": "score"},
            "sources": {"stage0.onnx": _sha("stage0.onnx"), "stage1.onnx": _sha("stage1.onnx")},
        },
    }


def test_format_version_is_four() -> None:
    assert FORMAT_VERSION == 4


def test_version_3_golden_still_loads(tmp_path: Path) -> None:
    manifest = json.loads(GOLDEN_V3.read_text(encoding="utf-8"))
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == 3 and package.compiled is not None and package.thresholds == [0.5]


def test_a_null_early_threshold_disables_the_exit_from_version_4(tmp_path: Path) -> None:
    manifest = golden_manifest()
    manifest["files"] = {name: {"sha256": _sha(name), "size": len(data)} for name, data in GOLDEN_FILES.items()}
    manifest["stages"][0]["exit"]["threshold"] = None
    package = parse_manifest(manifest, tmp_path)
    assert package.thresholds == [None] and package.exits_disabled
    manifest["format_version"] = 3
    with pytest.raises(ManifestSchemaError, match="disables an exit from version 4"):
        parse_manifest(manifest, tmp_path)


def test_version_2_golden_still_loads(tmp_path: Path) -> None:
    manifest = json.loads(GOLDEN_V2.read_text(encoding="utf-8"))
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == 2 and package.compiled is None
    assert package.calibration is not None and package.thresholds == [0.5]


def test_version_1_golden_still_loads(tmp_path: Path) -> None:
    manifest = json.loads(GOLDEN_V1.read_text(encoding="utf-8"))
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == 1 and package.calibration is None and package.quantization is None
    assert package.thresholds == [0.5]


def test_golden_manifest_is_byte_identical(tmp_path: Path) -> None:
    sources = {}
    for name, data in GOLDEN_FILES.items():
        sources[name] = tmp_path / "src" / name
        sources[name].parent.mkdir(exist_ok=True)
        sources[name].write_bytes(data)
    package = write_package(tmp_path / "golden.eexit", golden_manifest(), sources)
    written = (package / "manifest.json").read_bytes()

    if os.environ.get(REGENERATE_ENV) == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(written)
    expected = GOLDEN.read_bytes()
    if written != expected:
        diff = "".join(difflib.unified_diff(
            expected.decode("utf-8").splitlines(keepends=True),
            written.decode("utf-8").splitlines(keepends=True),
            fromfile=str(GOLDEN), tofile="written by write_package",
        ))
        pytest.fail(
            "manifest.json differs from the golden file. If the format changed on purpose, bump "
            f"FORMAT_VERSION, document it in docs/FORMAT.md and rerun with {REGENERATE_ENV}=1.\n{diff}"
            + ("" if diff.strip() else f"\n(bytes differ only in whitespace/encoding: {written!r})")
        )


def test_golden_manifest_parses(tmp_path: Path) -> None:
    manifest = json.loads(GOLDEN.read_text(encoding="utf-8"))
    package = parse_manifest(manifest, tmp_path)
    assert package.format_version == FORMAT_VERSION == manifest["format_version"]
    assert package.name == "GoldenNet"
    assert package.labels == ("zéro", "one", "two")
    assert package.thresholds == [0.5]
    assert package.full_model is not None and package.full_model.file == "full.onnx"
    assert package.compiled is not None and package.compiled.policies == ("entropy", "entropy")
    assert package.compiled.sources["stage1.onnx"] == package.files["stage1.onnx"]["sha256"]
    assert package.calibration is not None and package.calibration["history"][0]["previous_thresholds"] == [0.25]
    assert sorted(package.files) == sorted(GOLDEN_FILES)
    assert "zéro".encode() in GOLDEN.read_bytes()



def _version(manifest_text: str, value: str) -> str:
    changed = re.sub(r'"format_version": \d+', lambda _m: '"format_version": ' + value, manifest_text, count=1)
    assert changed != manifest_text
    return changed


def _raw_manifest(package: Path, text: str) -> None:
    (package / "manifest.json").write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [(lambda m: "[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),
     (lambda m: _version(m, "9" * 100_000), "an integer of 100000 digits"),
     (lambda m: _version(m, "1e400"), "beyond float64"),
     (lambda m: _version(m, "NaN"), "NaN (not JSON"),
     (lambda m: _version(m, '1, "format_version": 1'), "'format_version' twice"),
     (lambda m: m + " " * (16 << 20), "over the 16,777,216 a manifest may have")],
    ids=["deep-nesting", "huge-int", "1e400", "nan", "duplicate-key", "oversized"],
)
def test_hostile_manifest_json_is_a_parse_error(tiny_package: Path, tmp_path: Path, make, fragment) -> None:
    pkg = tmp_path / "p.eexit"
    shutil.copytree(tiny_package, pkg)
    original = (pkg / "manifest.json").read_text()
    _raw_manifest(pkg, make(original))
    with pytest.raises(ManifestParseError) as info:
        load_package(pkg)
    assert fragment in str(info.value)


def test_unbounded_input_dims_and_long_file_names_are_schema_errors(tiny_package: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "p.eexit"
    shutil.copytree(tiny_package, pkg)
    edit_manifest(pkg, lambda m: m["inputs"][0].__setitem__("shape", ["batch", 2**40]))
    with pytest.raises(ManifestSchemaError, match=r"inputs\[0\].shape"):
        load_package(pkg)
    shutil.rmtree(pkg)
    shutil.copytree(tiny_package, pkg)
    long = "s" * 300 + ".onnx"

    def rename(m: dict[str, Any]) -> None:
        old = m["stages"][0]["file"]
        m["stages"][0]["file"] = long
        m["files"][long] = m["files"].pop(old)
    edit_manifest(pkg, rename)
    with pytest.raises(UnsafePathError, match="names over 255 bytes"):
        load_package(pkg)
