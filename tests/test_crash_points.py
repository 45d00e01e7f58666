"""Kill a writer at every step of publishing a package, updating its manifest and quantizing it:
the path then always holds a package that verifies completely (the old one or the new one),
and what the dead writer left behind is collected by the next writer (or put back by the next
load, where a previous package was moved aside).

A child process runs the operation with every file-system step wrapped (each file copied in,
each manifest written, each rename, replace and exchange); at step N it dies with
``os._exit`` before or after the step, as a SIGKILL would leave it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgeexit.package import load_package, set_thresholds, write_package

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import os, shutil, sys, json
sys.path.insert(0, {tests!r})
import numpy as np
import edgeexit.package._write as pkg   # the module whose steps are wrapped
step, when, fallback, op, dest = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
count = [0]

def hook(fn):
    def wrapped(*args, **kwargs):
        count[0] += 1
        if when == "before" and count[0] == step:
            os._exit(137)
        out = fn(*args, **kwargs)
        if when == "after" and count[0] == step:
            os._exit(137)
        return out
    return wrapped

os.rename, os.replace, shutil.copyfile = hook(os.rename), hook(os.replace), hook(shutil.copyfile)
pkg._write_bytes_synced = hook(pkg._write_bytes_synced)
pkg.exchange_paths = (lambda a, b: False) if fallback else hook(pkg.exchange_paths)
if op == "publish":
    from conftest import TINY_MANIFEST, write_tiny_sources
    manifest = json.loads(json.dumps(TINY_MANIFEST))
    manifest["stages"][0]["exit"]["threshold"] = 0.7
    pkg.write_package(dest, manifest, write_tiny_sources(__import__("pathlib").Path(sys.argv[6])), overwrite=True)
elif op == "update":
    pkg.set_thresholds(dest, [0.7])
elif op == "quantize":
    from _models import tiny_inputs
    from edgeexit.export.quantize import quantize_package
    quantize_package(sys.argv[6], dest, {{"x": tiny_inputs(64)}}, overwrite=True, log=None)
print("STEPS", count[0])
"""


def _child(tmp_path: Path, step: int, when: str, fallback: bool, op: str, dest: Path, extra: str = "") -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    path = os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": path}   # this checkout's edgeexit
    done = subprocess.run([sys.executable, str(script), str(step), when, "1" if fallback else "0", op, str(dest),
                           extra], capture_output=True, text=True, timeout=300, env=env)
    if step == 0:
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split("STEPS")[-1])
    assert done.returncode in (0, 137), done.stderr
    return done.returncode


def _litter(dest: Path) -> list[str]:
    siblings = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    inside = [p.name for p in dest.iterdir() if p.name.endswith(".tmp")] if dest.is_dir() else []
    return siblings + inside


def _thresholds(dest: Path) -> list[float | None]:
    return load_package(dest).thresholds   # verifies every file's size and sha256


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("op", ["publish", "update"])
def test_a_killed_writer_leaves_a_verified_package_and_no_litter(tiny_package, tmp_path, op, fallback):
    (tmp_path / "tmp").mkdir()
    sources = tmp_path / "child-sources"
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "tiny.eexit"
    subprocess.run(["cp", "-r", str(tiny_package), str(dest)], check=True)
    steps = _child(tmp_path, 0, "before", fallback, op, dest, str(sources))
    assert steps >= (3 if op == "publish" else 1)
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    for step in range(1, steps + 1):
        for when in ("before", "after"):
            subprocess.run(["cp", "-r", str(tiny_package), str(dest)], check=True)
            _child(tmp_path, step, when, fallback, op, dest, str(sources))
            got = _thresholds(dest)
            assert got in ([0.5], [0.7]), (step, when, got)
            # the next writer collects what the dead one left
            set_thresholds(dest, [0.9])
            if op == "publish":
                write_package(dest, json.loads((dest / "manifest.json").read_text()) | {"files": {}},
                              {n: dest / n for n in ("stage0.onnx", "stage1.onnx")}, overwrite=True)
            assert _litter(dest) == [], (step, when, _litter(dest))
            assert _thresholds(dest) == [0.9]
            subprocess.run(["rm", "-rf", str(dest)], check=True)


def test_a_load_puts_back_a_package_moved_aside_by_a_killed_writer(tiny_package, tmp_path):
    """Without an atomic exchange, a kill between the two renames leaves no package at the path."""
    (tmp_path / "tmp").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "tiny.eexit"
    subprocess.run(["cp", "-r", str(tiny_package), str(dest)], check=True)
    steps = _child(tmp_path, 0, "before", True, "publish", dest, str(tmp_path / "src"))
    # find the kill that lands between "old package moved aside" and "new package moved in"
    for step in range(1, steps + 1):
        if not dest.exists():
            break
        subprocess.run(["rm", "-rf", str(dest)], check=True)
        subprocess.run(["cp", "-r", str(tiny_package), str(dest)], check=True)
        _child(tmp_path, step, "after", True, "publish", dest, str(tmp_path / "src"))
    assert not dest.exists(), "no step left the path empty: the test no longer covers the gap"
    assert [p.name for p in work.iterdir() if p.name.startswith(".tiny.eexit.old-")]
    assert _thresholds(dest) == [0.5]          # the load put the previous package back, verified
    assert not [p.name for p in work.iterdir() if p.name.startswith(".tiny.eexit.old-")]


def test_a_killed_quantize_leaves_no_work_folder_after_the_next_one(tmp_path):
    pytest.importorskip("onnx")
    from _models import tiny_inputs, tiny_model

    from edgeexit.export import export_package
    from edgeexit.export.quantize import quantize_package

    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    src = tmp_path / "src.eexit"
    export_package(tiny_model(), {"x": __import__("torch").from_numpy(tiny_inputs(4))}, src, thresholds=[0.5, 0.5],
                   policy="confidence", log=None)
    dest = tmp_path / "q.eexit"
    steps = _child(tmp_path, 0, "before", False, "quantize", dest, str(src))
    killed_any = False
    for step in sorted({1, steps // 2, steps}):   # first copy, mid-publish, last rename (each run ~5 s)
        code = _child(tmp_path, step, "before", False, "quantize", dest, str(src))
        killed_any |= code == 137
        if dest.exists():
            assert load_package(dest).quantization is not None   # a complete int8 package, verified
    assert killed_any
    assert [p.name for p in work_tmp.iterdir() if p.name.startswith("edgeexit-quantize-")], \
        "the killed quantizations left their work folders (what the next one must collect)"
    before = tempfile.tempdir
    tempfile.tempdir = str(work_tmp)
    try:
        quantize_package(src, dest, {"x": tiny_inputs(64)}, overwrite=True, log=None)
    finally:
        tempfile.tempdir = before
    assert [p.name for p in work_tmp.iterdir() if p.name.startswith("edgeexit-quantize-")] == []
    assert _litter(dest) == [] and load_package(dest).quantization is not None
    assert np.isfinite(load_package(dest).thresholds[0])


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    from edgeexit._atomic import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from-a").write_text("a")
    (tmp_path / "b" / "from-b").write_text("b")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this OS or filesystem has no atomic exchange; the two-rename fallback is tested above")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from-b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]


def test_leftovers_of_live_writers_are_kept(tiny_package, tmp_path):
    from edgeexit import _leftovers

    dest = tmp_path / "tiny.eexit"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = {str(os.getpid()), "1"}          # this process, and init
    for pid in (*live, dead):
        (tmp_path / f".tiny.eexit.tmp-{pid}-abcd").mkdir()
        (dest / f".manifest.json.{pid}-abcd1234.tmp").write_text("{}")
    assert _leftovers.collect_siblings(dest) == [f".tiny.eexit.tmp-{dead}-abcd"]
    assert _leftovers.collect_files(dest) == [f".manifest.json.{dead}-abcd1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        f".tiny.eexit.tmp-{pid}-abcd" for pid in live)
