"""examples/node/run_compiled.js (onnxruntime-node) must agree with ExitSession on real data.

A B-LeNet trained briefly on MNIST-5k is exported with its compiled graph.  Its exit-0
threshold sits in the widest gap between the exit-0 scores of the calibration and test
splits together, so a float difference between two onnxruntime builds (Python's and
node's) cannot flip an exit decision, and both exits are used.  The node example then
runs the whole test split, given as .npz and as raw float32, through the package, the
bare compiled graph with --thresholds, and a graph with the thresholds baked in.

Needs `node` and `cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci`; skipped
without them unless EDGEEXIT_REQUIRE_NODE=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgeexit.datasets import mnist5k_splits  # noqa: E402
from edgeexit.export import export_package  # noqa: E402
from edgeexit.package import set_thresholds  # noqa: E402
from edgeexit.policies import get_policy  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402
from edgeexit.zoo import example_images, get_model  # noqa: E402
from edgeexit.zoo.train import train_early_exit  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
SCRIPT = EXAMPLE / "run_compiled.js"
NODE = shutil.which("node")
POLICY = "entropy"   # exits when score < threshold
SEED = 0


def _node_missing() -> str | None:
    if NODE is None:
        return "`node` is not on PATH"
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        return ("examples/node/node_modules/onnxruntime-node is missing; install it with "
                "`cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci`")
    return None


@pytest.fixture(scope="module", autouse=True)
def node_available() -> None:
    missing = _node_missing()
    if missing is None:
        return
    if os.environ.get("EDGEEXIT_REQUIRE_NODE") == "1":
        pytest.fail(f"EDGEEXIT_REQUIRE_NODE=1 but {missing}")
    pytest.skip(f"node example not runnable: {missing} (set EDGEEXIT_REQUIRE_NODE=1 to fail instead)")


def _gap_threshold(cal_scores: np.ndarray, test_scores: np.ndarray) -> tuple[float, float]:
    """Midpoint of the widest gap between neighbouring scores with 20-80 % of samples below it."""
    s = np.sort(np.concatenate([cal_scores, test_scores]))
    lo, hi = int(0.2 * len(s)), int(0.8 * len(s))
    gaps = np.diff(s[lo:hi + 1])
    j = lo + int(np.argmax(gaps))
    return float((s[j] + s[j + 1]) / 2), float(s[j + 1] - s[j])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The package, its threshold, the test split as .npz and .f32, and Python's results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = mnist5k_splits(SEED)
        net = get_model("blenet", seed=SEED)
        train_early_exit(net, splits.train.x, splits.train.y, epochs=2, seed=SEED)
        root = tmp_path_factory.mktemp("node_example")
        pkg = root / "blenet.eexit"
        export_package(net, example_images(4, SEED), pkg, policy=POLICY, thresholds=[0.5],
                       labels=[str(i) for i in range(10)], seed=SEED, compile=True, log=None)
    finally:
        torch.set_num_threads(before)

    pol = get_policy(POLICY)
    stages = ExitSession(pkg, engine="stages")
    cal0 = pol.scores(stages.run_all_exits(splits.calibration.x)[0])
    test0 = pol.scores(stages.run_all_exits(splits.test.x)[0])
    threshold, gap = _gap_threshold(cal0, test0)
    assert gap > 1e-3 * threshold, f"scores too dense to place a safe threshold: gap {gap:.3g} at {threshold:.4g}"
    set_thresholds(pkg, [threshold])

    x = splits.test.x
    npz, raw = root / "test.npz", root / "test.f32"
    np.savez(npz, image=x, labels=splits.test.y)
    np.ascontiguousarray(x, dtype="<f4").tofile(raw)
    want = ExitSession(pkg).run(x)
    loop = ExitSession(pkg, engine="stages").run(x)
    np.testing.assert_array_equal(want.exit_index, loop.exit_index)
    shares = np.bincount(want.exit_index, minlength=2) / len(x)
    assert 0.05 < shares[0] < 0.95, f"the threshold should use both exits, got exit shares {shares}"
    return {"pkg": pkg, "root": root, "threshold": threshold, "npz": npz, "raw": raw, "want": want, "n": len(x)}


def _node(*args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    proc = subprocess.run([NODE, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"node failed ({proc.returncode}): {proc.stderr}"
    return proc


def _assert_matches(trained: dict[str, Any], proc: subprocess.CompletedProcess[str], out_json: Path) -> None:
    want, n = trained["want"], trained["n"]
    got = json.loads(out_json.read_text())
    assert len(got["predictions"]) == len(got["exit_index"]) == len(got["scores"]) == n
    np.testing.assert_array_equal(np.array(got["predictions"]), want.predictions)
    np.testing.assert_array_equal(np.array(got["exit_index"]), want.exit_index)
    np.testing.assert_allclose(np.array(got["scores"], dtype=np.float64), want.scores, rtol=1e-6, atol=0)
    # stdout: a header, one "index prediction exit_index score" line per sample, a summary
    lines = proc.stdout.splitlines()
    assert lines[0] == "index prediction exit_index score" and len(lines) == n + 2
    rows = np.array([line.split() for line in lines[1:-1]], dtype=np.float64)
    np.testing.assert_array_equal(rows[:, 0], np.arange(n))
    np.testing.assert_array_equal(rows[:, 1], want.predictions)
    np.testing.assert_array_equal(rows[:, 2], want.exit_index)
    counts = np.bincount(want.exit_index, minlength=2)
    assert lines[-1].startswith(f"{n} samples")
    assert f"exit 0: {100 * counts[0] / n:.1f}% ({counts[0]})" in lines[-1]
    assert f"exit 1: {100 * counts[1] / n:.1f}% ({counts[1]})" in lines[-1]


@pytest.mark.parametrize(("data", "batch"), [("npz", 256), ("raw", 100)])
def test_package_matches_exit_session(trained: dict[str, Any], tmp_path: Path, data: str, batch: int) -> None:
    out = tmp_path / "out.json"
    proc = _node(trained["pkg"], trained[data], "--batch-size", batch, "--json", out)
    assert f"thresholds [{trained['threshold']!r}]" in proc.stdout.splitlines()[-1]
    _assert_matches(trained, proc, out)


def test_bare_compiled_graph_with_thresholds(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = _node(trained["pkg"] / "compiled.onnx", trained["raw"], "--thresholds", repr(trained["threshold"]),
                 "--json", out)
    _assert_matches(trained, proc, out)
    refused = _node(trained["pkg"] / "compiled.onnx", trained["raw"], check=False)
    assert refused.returncode == 2 and "--thresholds" in refused.stderr


def test_baked_graph(trained: dict[str, Any], tmp_path: Path) -> None:
    baked = tmp_path / "baked.onnx"
    subprocess.run([sys.executable, "-m", "edgeexit", "compile", str(trained["pkg"]), "-o", str(baked),
                    "--bake-thresholds"], check=True, capture_output=True, text=True, timeout=120)
    out = tmp_path / "out.json"
    proc = _node(baked, trained["npz"], "--json", out)
    assert "thresholds baked in" in proc.stdout.splitlines()[-1]
    _assert_matches(trained, proc, out)
    # onnxruntime-node would silently ignore a feed for the baked constant: refused instead
    refused = _node(baked, trained["npz"], "--thresholds", "0.5", check=False)
    assert refused.returncode == 2 and "baked in" in refused.stderr


def _short_f32(root: Path, pkg: Path) -> Path:
    path = root / "short.f32"
    path.write_bytes(bytes(1000))
    return path


def _compressed_npz(root: Path, pkg: Path) -> Path:
    path = root / "compressed.npz"
    np.savez_compressed(path, image=np.zeros((2, 1, 28, 28), np.float32))
    return path


def _float64_npz(root: Path, pkg: Path) -> Path:
    path = root / "f64.npz"
    np.savez(path, image=np.zeros((2, 1, 28, 28), np.float64))
    return path


def _no_compiled_graph(root: Path, pkg: Path) -> Path:
    plain = root / "plain.eexit"
    plain.mkdir()
    manifest = json.loads((pkg / "manifest.json").read_text())
    del manifest["compiled"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    return plain


@pytest.mark.parametrize(("make", "message", "code"), [
    (_short_f32, "not a whole number of float32 samples", 2),
    (_compressed_npz, "numpy.savez_compressed", 2),
    (_float64_npz, "<f8", 2),
    (_no_compiled_graph, "has no compiled graph", 3),
])
def test_errors_are_one_line(trained: dict[str, Any], tmp_path: Path, make: Any, message: str, code: int) -> None:
    made = make(tmp_path, trained["pkg"])
    target, data = (made, trained["npz"]) if made.is_dir() else (trained["pkg"], made)
    proc = _node(target, data, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_readme_commands_run_as_written(tmp_path):
    """examples/node/README.md, every command but the npm install (run by CI before the tests):
    in a copy of the example folder that shares node_modules."""
    import re

    for name in ("run_compiled.js", "package.json"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(EXAMPLE / "node_modules", target_is_directory=True)
    blocks = re.findall(r"```bash\n(.*?)```", (EXAMPLE / "README.md").read_text(), flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    install = [c for c in commands if "npm ci" in c]
    assert len(install) == 1 and len(commands) >= 6
    for command in commands:
        if command in install:
            continue
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["predictions"]) == len(results["exit_index"]) == 1000


def test_a_package_with_its_exits_disabled(trained: dict[str, Any], tmp_path: Path) -> None:
    """A null threshold (format 4) becomes one no score passes: every sample reaches the last exit."""
    pkg = tmp_path / "off.eexit"
    shutil.copytree(trained["pkg"], pkg)
    set_thresholds(pkg, [None])
    out = tmp_path / "off.json"
    _node(pkg, trained["npz"], "--json", out)
    got = json.loads(out.read_text())
    want = ExitSession(pkg).run(np.load(trained["npz"])["image"])
    assert want.engine == "full" and (want.exit_index == 1).all()
    assert got["exit_index"] == [1] * len(want.exit_index)
    np.testing.assert_array_equal(got["predictions"], want.predictions)
