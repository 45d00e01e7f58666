"""Every failure a user (or a hostile file) can cause in the CLI ends in one typed line and its
exit code, before any work is wasted; real filesystem faults come from a real tmpfs."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _models import tiny_inputs

from edgeexit.cli import cli

THRESHOLDS = ["--threshold", "0.9", "--threshold", "0.7"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("failures") / "tiny.eexit"
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(path), "--policy", "confidence",
                                      *THRESHOLDS, "-q"])
    assert result.exit_code == 0, result.output
    return path


def _one_line_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    ("make", "fragment"),
    [(lambda p: np.savez(p / "in.npz", x=np.array([{"a": 1}] * 3, dtype=object)), "needs unpickling"),
     (lambda p: np.save(p / "in.npy", np.float32(1.0)), "a single number (a 0-d array)"),
     (lambda p: (p / "in.npy").mkdir(), "is a folder"),
     (lambda p: (p / "in.npy").write_bytes(os.urandom(256).replace(b"\x93", b"x")), "is not an .npy or .npz file")],
    ids=["object-array", "0-d", "folder", "random-bytes"],
)
def test_bad_input_files_are_one_line_input_errors(package, tmp_path, make, fragment):
    make(tmp_path)
    name = next(p.name for p in tmp_path.iterdir() if p.name.startswith("in."))
    _one_line_error(_run("run", package, tmp_path / name), 2, "InputFileError", fragment)


@pytest.mark.parametrize(
    ("output", "fragment"),
    [(lambda p: p / "a-file" / "out.csv", "is a file, not a folder"),
     (lambda p: p, "is an existing folder"),
     (lambda p: p / ("r" * 300 + ".csv"), "the name is 304 characters")],
    ids=["parent-is-a-file", "existing-folder", "name-too-long"],
)
def test_bad_outputs_fail_before_any_inference(package, tmp_path, output, fragment):
    (tmp_path / "a-file").write_text("not a folder")
    np.savez(tmp_path / "x.npz", x=tiny_inputs(5))
    result = _run("run", package, tmp_path / "x.npz", "-o", output(tmp_path))
    _one_line_error(result, 8, "OutputError", fragment)
    assert "samples" not in result.output        # it stopped before running anything


def test_output_into_a_missing_folder_creates_it(package, tmp_path):
    np.savez(tmp_path / "x.npz", x=tiny_inputs(5))
    result = _run("run", package, tmp_path / "x.npz", "-o", tmp_path / "new" / "deeper" / "out.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "deeper" / "out.csv").read_text().startswith("predictions,exit_index,scores")


def test_weights_with_a_pickle_payload_are_refused_without_running_it(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("PAYLOAD RAN",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    done = subprocess.run(["edgeexit", "export", "blenet", "--weights", str(tmp_path / "evil.pt"), "-o",
                           str(tmp_path / "x.eexit")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "PAYLOAD RAN" not in done.stdout + done.stderr
    assert "Error: InputFileError" in done.stderr and "never does" in done.stderr
    assert "weights_only=False" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.eexit").exists()


@pytest.mark.parametrize(("command", "module", "extra"),
                         [(["export", "blenet", "-o", "x.eexit", "--train"], "torch", "export"),
                          (["quantize", "PKG", "-o", "q.eexit", "--data", "d.npz"], "onnx", "onnx")])
def test_a_missing_extra_names_the_extra_to_install(package, tmp_path, command, module, extra):
    np.savez(tmp_path / "d.npz", x=tiny_inputs(8))
    args = [str(package) if a == "PKG" else a for a in command]
    code = (f"import sys; sys.modules[{module!r}] = None; from edgeexit.cli import cli; "
            f"cli({args!r}, prog_name='edgeexit')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 6, done.stdout + done.stderr
    assert f"Error: MissingExtraError: this command needs {module}, from the '{extra}' extra" in done.stderr
    assert f"pip install 'edgeexit[{extra}]'" in done.stderr and "Traceback" not in done.stderr


# --- real filesystem faults ------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (skips, saying why, where mounting is not permitted)."""
    where = Path("/tmp") / f"edgeexit-tmpfs-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root or "
                    "CAP_SYS_ADMIN, as on the CI machine")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def _litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def test_a_full_filesystem_is_an_output_error_and_leaves_nothing(package, tmp_path):
    np.savez(tmp_path / "x.npz", x=tiny_inputs(2000))
    with _tmpfs("256k") as fs:
        _fill(fs)
        result = _run("run", package, tmp_path / "x.npz", "-o", fs / "out.npz")
        _one_line_error(result, 8, "OutputError", "filesystem is full")
        assert not (fs / "out.npz").exists() and _litter(fs) == []
        result = _run("export", "_models:factory", "-o", fs / "p.eexit", *THRESHOLDS, "-q")
        _one_line_error(result, 8, "OutputError", "filesystem is full")
        assert not (fs / "p.eexit").exists() and _litter(fs) == []


def test_a_read_only_filesystem_is_an_output_error_before_any_work(package, tmp_path):
    np.savez(tmp_path / "x.npz", x=tiny_inputs(5))
    with _tmpfs("1m") as fs:
        subprocess.run(["cp", "-r", str(package), str(fs / "tiny.eexit")], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        result = _run("run", package, tmp_path / "x.npz", "-o", fs / "out.csv")
        _one_line_error(result, 8, "OutputError", "read-only")
        assert "samples" not in result.output
        result = _run("calibrate", fs / "tiny.eexit", "--data", tmp_path / "x.npz", "--max-drop", "1")
        assert result.exit_code in (2, 8), result.output   # no labels (2), or the read-only package (8)
        assert "Traceback" not in result.output
        result = _run("compile", fs / "tiny.eexit")
        _one_line_error(result, 8, "OutputError", "read-only")
        # the package on the read-only mount still loads and runs
        assert _run("run", fs / "tiny.eexit", tmp_path / "x.npz").exit_code == 0


def test_pickle_module_is_not_what_reads_inputs(tmp_path, monkeypatch):
    """np.load runs with allow_pickle=False: a pickled .npy never reaches pickle.loads."""
    from edgeexit.datafiles import load_input_file
    from edgeexit.errors import InputFileError

    np.save(tmp_path / "p.npy", np.array([object()], dtype=object), allow_pickle=True)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    with pytest.raises(InputFileError, match="unpickling"):
        load_input_file(tmp_path / "p.npy", ["x"])
