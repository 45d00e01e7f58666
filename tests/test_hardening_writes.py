"""Writers never destroy what they did not write, and collect what their killed predecessors left.

1. A package writer (``export_package``, ``quantize_package``, ``edgeexit export``/``quantize``)
   replaces only an exit package, and from Python only when asked (``overwrite=True``).
2. ``compile_package`` refuses a graph name the package already uses for something else.
3. Temporary folders and files of killed writers (``edgeexit-fp32-PID-*`` of ``export --quantize``,
   ``.NAME.zip.PID-*.tmp`` of ``pack``, onnxruntime's ``pre.quant.*`` of ``quantize``) are
   collected by the next writer of the same kind; those of live writers are kept.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from _models import tiny_inputs, tiny_model  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from edgeexit.cli import cli  # noqa: E402
from edgeexit.errors import CompileError, OutputError  # noqa: E402
from edgeexit.export import export_package  # noqa: E402
from edgeexit.export.compile import compile_package  # noqa: E402
from edgeexit.export.quantize import quantize_package  # noqa: E402
from edgeexit.package import (  # noqa: E402
    load_package,
    manifest_bytes,
    pack_package,
    read_manifest,
    set_thresholds,
)
from edgeexit.runtime import ExitSession  # noqa: E402

TESTS = Path(__file__).resolve().parent
X4 = np.zeros((8, 4), dtype=np.float32)   # inputs of the conftest package (x: [batch, 4])
EXAMPLE = {"x": torch.from_numpy(tiny_inputs(4))}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny torch model exported once (no compiled graph), to copy from."""
    return export_package(tiny_model(), EXAMPLE, tmp_path_factory.mktemp("fp32") / "tiny.eexit",
                          thresholds=[0.5, 0.5], compile=False, log=None).root


def _web_app(folder: Path) -> Path:
    """A folder that is not ours but holds a manifest.json: a web app."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "app.js").write_text("console.log('hi')\n")
    (folder / "README.md").write_text("# my app\n")
    (folder / "manifest.json").write_text(json.dumps({"name": "My app", "start_url": "/", "display": "standalone"}))
    return folder


# --- 1. never delete what edgeexit did not write -------------------------------------


def _export(dest: Path, **kw: Any) -> Any:
    return export_package(tiny_model(), EXAMPLE, dest, thresholds=[0.5, 0.5], compile=False, log=None, **kw)


def _quantize(dest: Path, source: Path, **kw: Any) -> Any:
    return quantize_package(source, dest, X4 + 1, log=None, **kw)


WRITERS: dict[str, Callable[..., Any]] = {"export_package": _export, "quantize_package": _quantize}


def _write(writer: str, dest: Path, tiny_package: Path, **kw: Any) -> Any:
    return _export(dest, **kw) if writer == "export_package" else _quantize(dest, tiny_package, **kw)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_python_writers_refuse_a_folder_that_is_not_an_exit_package_even_with_overwrite(
        writer, tiny_package, tmp_path):
    app = _web_app(tmp_path / "app")
    before = _snapshot(app)
    with pytest.raises(OutputError) as info:
        _write(writer, app, tiny_package, overwrite=True)
    message = str(info.value)
    assert f"{app} exists and is not an exit package" in message
    assert "src/" in message and "README.md" in message and "manifest.json" in message
    assert "edgeexit replaces only exit packages" in message and "choose another path or remove it" in message
    assert info.value.exit_code == 8
    assert _snapshot(app) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".app.")] == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_python_writers_do_not_replace_an_exit_package_unless_asked(writer, tiny_package, fp32, tmp_path):
    dest = tmp_path / "out.eexit"
    subprocess.run(["cp", "-r", str(fp32), str(dest)], check=True)
    set_thresholds(dest, [0.125, 0.125])
    before = _snapshot(dest)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True") as info:
        _write(writer, dest, tiny_package)
    assert info.value.exit_code == 8
    assert _snapshot(dest) == before
    _write(writer, dest, tiny_package, overwrite=True)     # asked: replaced
    replaced = load_package(dest)
    assert replaced.thresholds != [0.125, 0.125]
    assert (replaced.quantization is not None) == (writer == "quantize_package")


@pytest.mark.parametrize("what", ["a file", "a foreign manifest", "an unreadable manifest", "a link"])
def test_export_refuses_every_other_kind_of_destination(what, fp32, tmp_path):
    dest = tmp_path / "out.eexit"
    if what == "a file":
        dest.write_text("notes\n")
    elif what == "a link":
        dest.symlink_to(fp32, target_is_directory=True)
    else:
        dest.mkdir()
        (dest / "manifest.json").write_text('{"format": "onnx-bundle", "version": 1}' if what == "a foreign manifest"
                                            else "{not json")
    before = dest.read_bytes() if dest.is_file() else _snapshot(dest)
    lines: list[str] = []
    with pytest.raises(OutputError, match="is not an exit package"):
        export_package(tiny_model(), EXAMPLE, dest, thresholds=[0.5, 0.5], overwrite=True, log=lines.append)
    assert lines == []                      # refused before any work
    assert (dest.read_bytes() if dest.is_file() else _snapshot(dest)) == before
    assert dest.is_symlink() == (what == "a link")


def test_a_damaged_package_of_ours_may_be_replaced_when_asked(fp32, tmp_path):
    dest = tmp_path / "out.eexit"
    subprocess.run(["cp", "-r", str(fp32), str(dest)], check=True)
    (dest / "stage0.onnx").unlink()                     # damaged: a listed file is missing
    _, manifest = read_manifest(dest)
    manifest["stages"] = "broken"                      # and its schema is broken, but it says "edgeexit"
    (dest / "manifest.json").write_bytes(manifest_bytes(manifest))
    _export(dest, overwrite=True)
    assert load_package(dest).thresholds == [0.5, 0.5]


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_cli_force_refuses_a_folder_that_is_not_an_exit_package(command, fp32, tmp_path):
    app = _web_app(tmp_path / "app")
    before = _snapshot(app)
    np.savez(tmp_path / "cal.npz", x=tiny_inputs(16))
    args = (["export", "_models:factory", "-o", str(app), "--threshold", "0.5", "--threshold", "0.5"]
            if command == "export" else ["quantize", str(fp32), "-o", str(app), "--data", str(tmp_path / "cal.npz")])
    for force in ([], ["--force"]):
        result = CliRunner().invoke(cli, [*args, *force])
        assert result.exit_code == 8, result.output
        assert "OutputError" in result.output and "is not an exit package" in result.output
        assert "src/" in result.output and "Traceback" not in result.output
        assert "exporting" not in result.output     # refused before any work
    assert _snapshot(app) == before


def test_cli_force_still_replaces_an_exit_package(fp32, tmp_path):
    dest = tmp_path / "out.eexit"
    subprocess.run(["cp", "-r", str(fp32), str(dest)], check=True)
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(dest), "--threshold", "0.25",
                                      "--threshold", "0.25", "--no-compile"])
    assert result.exit_code == 2 and "--force" in result.output
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(dest), "--threshold", "0.25",
                                      "--threshold", "0.25", "--no-compile", "--force"])
    assert result.exit_code == 0, result.output
    assert load_package(dest).thresholds == [0.25, 0.25]


# --- 2. compile never destroys a working package -----------------------------------------


def _rename_file(package: Path, old: str, new: str) -> None:
    """Rename one of the package's files consistently (the file, the files table, what names it)."""
    _, manifest = read_manifest(package)
    (package / old).rename(package / new)
    manifest["files"] = {new if k == old else k: v for k, v in manifest["files"].items()}
    for spec in [*manifest["stages"], manifest.get("full_model") or {}, manifest.get("compiled") or {}]:
        if spec.get("file") == old:
            spec["file"] = new
    if manifest.get("compiled"):
        manifest["compiled"]["sources"] = {new if k == old else k: v
                                           for k, v in manifest["compiled"]["sources"].items()}
    (package / "manifest.json").write_bytes(manifest_bytes(manifest))


@pytest.mark.parametrize("case", ["stage named compiled.onnx", "full model named compiled-next.onnx"])
def test_compile_refuses_a_name_the_package_uses_for_something_else(case, fp32, tmp_path):
    dest = tmp_path / "p.eexit"
    subprocess.run(["cp", "-r", str(fp32), str(dest)], check=True)
    if case == "stage named compiled.onnx":
        _rename_file(dest, "stage1.onnx", "compiled.onnx")
        taken, user = "compiled.onnx", "stage 'stage1'"
    else:
        compile_package(dest, log=None)                  # compiled.onnx is the compiled graph
        _rename_file(dest, "full.onnx", "compiled-next.onnx")
        taken, user = "compiled-next.onnx", "full model"
    load_package(dest)                                   # a valid package
    x = tiny_inputs(9, seed=3)
    want = ExitSession(dest, engine="stages").run(x)
    before = _snapshot(dest)
    with pytest.raises(CompileError) as info:
        compile_package(dest, log=None)
    assert f"{taken!r}" in str(info.value) and user in str(info.value)
    assert _snapshot(dest) == before
    got = ExitSession(dest, engine="stages").run(x)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    result = CliRunner().invoke(cli, ["compile", str(dest)])
    assert result.exit_code == CompileError.exit_code and "CompileError" in result.output, result.output
    assert _snapshot(dest) == before


def test_compile_to_a_file_refuses_a_file_of_the_package(fp32, tmp_path):
    dest = tmp_path / "p.eexit"
    subprocess.run(["cp", "-r", str(fp32), str(dest)], check=True)
    compile_package(dest, log=None)
    before = _snapshot(dest)
    for name in ("stage0.onnx", "manifest.json", "compiled.onnx"):
        with pytest.raises(CompileError, match=f"{name!r}"):
            compile_package(dest, output=dest / name, log=None)
    assert _snapshot(dest) == before


# --- 3. litter of killed writers ---------------------------------------------------------


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp dir this process's writers use, private to the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_export_quantize_collects_fp32_folders_of_dead_exports(temp_dir, tmp_path, monkeypatch):
    import edgeexit.cli.export as cli_export

    dead, live = _dead_pid(), os.getpid()
    for pid in (dead, live):
        (temp_dir / f"edgeexit-fp32-{pid}-abcd1234" / "fp32.eexit").mkdir(parents=True)
    foreign = temp_dir / "edgeexit-fp32-notapid"
    foreign.mkdir()
    seen: list[str] = []
    real = cli_export.quantize_package_file

    def spy(src: Path, *args: Any, **kwargs: Any) -> None:
        seen.append(src.parent.name)
        real(src, *args, **kwargs)

    monkeypatch.setattr(cli_export, "quantize_package_file", spy)
    np.savez(tmp_path / "cal.npz", x=tiny_inputs(16))
    result = CliRunner().invoke(cli, ["export", "_models:factory", "-o", str(tmp_path / "q.eexit"), "--threshold",
                                      "0.5", "--threshold", "0.5", "--no-compile", "--quantize", "int8", "--data",
                                      str(tmp_path / "cal.npz")])
    assert result.exit_code == 0, result.output
    assert load_package(tmp_path / "q.eexit").quantization is not None
    assert len(seen) == 1 and re.fullmatch(rf"edgeexit-fp32-{live}-.+", seen[0])   # the writer's pid in its name
    assert sorted(p.name for p in temp_dir.iterdir() if p.name.startswith("edgeexit-fp32-")) == sorted(
        [f"edgeexit-fp32-{live}-abcd1234", "edgeexit-fp32-notapid"])


def test_pack_collects_temporary_files_of_dead_packs(tiny_package, tmp_path):
    out = tmp_path / "packed" / "p.eexit.zip"
    out.parent.mkdir()
    dead, live = _dead_pid(), os.getpid()
    litter = {pid: out.parent / f".p.eexit.zip.{pid}-abcd1234.tmp" for pid in (dead, live)}
    for path in litter.values():
        path.write_bytes(b"PK half an archive")
    other = out.parent / f".notes.txt.{dead}-abcd1234.tmp"   # another file's: not pack's to collect
    other.write_text("x")
    pack_package(tiny_package, out)
    assert load_package(out).thresholds == [0.5]
    assert not litter[dead].exists()
    assert litter[live].exists() and other.exists()
    result = CliRunner().invoke(cli, ["pack", str(tiny_package), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, litter[live].name, other.name])


CHILD = r"""
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np
import onnx
import edgeexit.export.quantize as q
real_load, inside = onnx.load, [False]

def pre_process(*args, **kwargs):   # onnxruntime's pre-processing, killed once its temp folder exists
    inside[0] = True
    return real_pre_process(*args, **kwargs)

def load(*args, **kwargs):
    if inside[0]:
        os._exit(137)
    return real_load(*args, **kwargs)

real_pre_process, q.quant_pre_process, onnx.load = q.quant_pre_process, pre_process, load
q.quantize_package(sys.argv[1], sys.argv[2], np.ones((8, 4), np.float32), overwrite=True, log=None)
"""


def test_a_killed_quantize_leaves_no_pre_quant_folder_after_the_next_one(tiny_package, temp_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    path = os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TMPDIR": str(temp_dir), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(script), str(tiny_package), str(tmp_path / "q.eexit")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 137, done.stderr
    left = [str(p.relative_to(temp_dir)) for p in temp_dir.rglob("pre.quant.*")]
    assert left, "the killed quantize left no pre-processing folder: the test no longer covers it"
    live = temp_dir / f"edgeexit-quantize-{os.getpid()}-abcd1234" / "pre.quant.live"
    live.mkdir(parents=True)
    quantize_package(tiny_package, tmp_path / "q.eexit", X4 + 1, overwrite=True, log=None)
    assert [str(p.relative_to(temp_dir)) for p in temp_dir.rglob("pre.quant.*")] == [
        str(live.relative_to(temp_dir))]
    assert load_package(tmp_path / "q.eexit").quantization is not None
