"""Int8 packages: graphs really quantized, names kept, close to fp32, calibrated per stage, atomic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from _models import tiny_inputs, tiny_model  # noqa: E402
from torch import nn  # noqa: E402

from edgeexit.calibrate import record_exits, shared_threshold  # noqa: E402
from edgeexit.errors import (  # noqa: E402
    EmptyBatchError,
    ExportError,
    InputDtypeError,
    InputNameError,
    InputShapeError,
    OutputError,
    PackageError,
)
from edgeexit.export import EarlyExitModel, export_package  # noqa: E402
from edgeexit.export import quantize as q  # noqa: E402
from edgeexit.package import load_package, sha256_file, update_manifest  # noqa: E402
from edgeexit.runtime import ExitSession  # noqa: E402

MLP_IN = 32
X4 = np.zeros((8, 4), dtype=np.float32)  # a batch for the conftest package (input x: [batch, 4])


def _mlp() -> EarlyExitModel:
    """Linear layers only (exported as Gemm): the dynamic path.  ~45k weights, so int8 shrinks it."""
    torch.manual_seed(4)
    stages = [nn.Sequential(nn.Linear(MLP_IN, 128), nn.ReLU()), nn.Sequential(nn.Linear(128, 128), nn.ReLU()),
              nn.Sequential(nn.Linear(128, 128), nn.ReLU())]
    exits = [nn.Linear(128, 5), None, nn.Linear(128, 5)]
    return EarlyExitModel(stages=stages, exits=exits).eval()


def _pipeline() -> EarlyExitModel:
    """Convs; stage 2 reads stage 0's carry (not the previous stage's), stage 1 passes nothing on."""
    torch.manual_seed(5)
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 64, 5))
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())]
    exits = [head, nn.Sequential(nn.Flatten(), nn.Linear(4 * 64, 5)), nn.Sequential(nn.Flatten(), nn.Linear(256, 5))]
    return EarlyExitModel(stages=stages, exits=exits, reads=["inputs", 0, 0]).eval()


def _mlp_inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, MLP_IN)).astype(np.float32)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, EarlyExitModel]]:
    """fp32 packages exported once per module: conv (tuple carry), mlp (Gemm only), pipeline."""
    root = tmp_path_factory.mktemp("fp32")
    out = {}
    for name, model, example, thresholds in (
        ("conv", tiny_model(), tiny_inputs(4), [0.123, 0.234]),
        ("mlp", _mlp(), _mlp_inputs(4, 0), [0.345]),
        ("pipeline", _pipeline(), tiny_inputs(4), [0.456, 0.567]),
    ):
        export_package(model, {"x": torch.from_numpy(example)}, root / f"{name}.eexit", thresholds=thresholds,
                       include_full_model=name != "pipeline", log=None)
        out[name] = (root / f"{name}.eexit", model)
    return out


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _io(path: Path) -> tuple[list[str], list[str]]:
    g = onnx.load(str(path)).graph
    return [i.name for i in g.input], [o.name for o in g.output]


def _close(fp32: list[np.ndarray], int8: list[np.ndarray]) -> None:
    for a, b in zip(fp32, int8, strict=True):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.mean() > 0.99 and cos.min() > 0.95, (cos.mean(), cos.min())
        assert (a.argmax(1) == b.argmax(1)).mean() > 0.95


# --- the two paths ------------------------------------------------------------------------


def test_conv_package_is_static_qdq_and_close_to_fp32(packages, tmp_path):
    src, _ = packages["conv"]
    lines: list[str] = []
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", tiny_inputs(300, seed=2), log=lines.append)
    fp32 = load_package(src)
    quant = pkg.manifest["quantization"]
    assert quant["method"] == "int8" and quant["tool"].startswith("onnxruntime.quantization ")
    assert [s["mode"] for s in quant["stages"]] == ["static_qdq"] * 4
    assert all(s["per_channel"] and s["calibration_samples"] == 300 and s["activation_type"] == "uint8"
               for s in quant["stages"])
    assert quant["calibration"]["samples"] == 300 and quant["weight_type"] == "int8"
    assert quant["full_model"]["mode"] == "static_qdq"
    fp32_graphs = [s.file for s in fp32.stages] + [fp32.full_model.file]
    assert quant["source_sha256"] == {f: fp32.files[f]["sha256"] for f in fp32_graphs}
    # the compiled graph is rebuilt from the int8 stages, not copied from the fp32 package
    assert fp32.compiled is not None and pkg.compiled is not None
    assert pkg.compiled.sources == {s.file: pkg.files[s.file]["sha256"] for s in pkg.stages}
    assert pkg.files["compiled.onnx"]["sha256"] != fp32.files["compiled.onnx"]["sha256"]
    # the manifest is the fp32 one plus the record: same stages, names, thresholds
    assert pkg.stages == fp32.stages and pkg.full_model == fp32.full_model and pkg.thresholds == [0.123, 0.234]
    assert quant["thresholds"] == {"status": "copied_from_fp32", "values": [0.123, 0.234]}
    assert any("copied from the fp32 package" in line and "recalibrate" in line for line in lines)
    for stage in (*fp32.stages, fp32.full_model):
        path = pkg.file_path(stage.file)
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(path), stage.file
        assert _io(path) == _io(fp32.file_path(stage.file))
    x = tiny_inputs(200, seed=7)
    session = ExitSession(pkg.root)                          # the runtime's graph-name check passes
    _close(ExitSession(src).run_all_exits(x), session.run_all_exits(x))
    _close([ExitSession(src).run_full(x)], [session.run_full(x)])


def test_a_relative_package_path_quantizes_as_an_absolute_one(packages, tmp_path, monkeypatch):
    """The README's own command names the package relative to the working folder; the graphs'
    pre-processing must find them there (it runs from a work folder of its own)."""
    src, _ = packages["conv"]
    monkeypatch.chdir(src.parent)
    lines: list[str] = []
    x = tiny_inputs(64, seed=2)
    q.quantize_package(Path(src.name), tmp_path / "relative.eexit", x, log=lines.append)
    assert not [line for line in lines if "skipped" in line], lines
    q.quantize_package(src.resolve(), tmp_path / "absolute.eexit", x, log=None)
    for f in sorted(p.name for p in (tmp_path / "absolute.eexit").glob("*.onnx")):
        assert (tmp_path / "relative.eexit" / f).read_bytes() == (tmp_path / "absolute.eexit" / f).read_bytes(), f


def test_mlp_package_is_dynamic_smaller_and_close_to_fp32(packages, tmp_path):
    src, _ = packages["mlp"]
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", _mlp_inputs(64, 1), log=None)
    quant = pkg.manifest["quantization"]
    assert [s["mode"] for s in quant["stages"]] == ["dynamic"] * 3
    assert all(s["calibration_samples"] == 0 for s in quant["stages"])  # dynamic needs no calibration
    assert quant["calibration"] is None
    assert quant["full_model"]["mode"] == "dynamic"
    for name in pkg.files:
        ops = _ops(pkg.file_path(name))
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops and "Gemm" not in ops, (name, ops)
        assert pkg.files[name]["size"] < 0.45 * load_package(src).files[name]["size"], name
    x = _mlp_inputs(200, 8)
    _close(ExitSession(src).run_all_exits(x), ExitSession(pkg.root).run_all_exits(x))


@pytest.mark.parametrize(("name", "mode", "want", "ops"), [
    ("mlp", "static", "static_qdq", {"QuantizeLinear", "DequantizeLinear"}),
    ("conv", "dynamic", "dynamic", {"ConvInteger", "DynamicQuantizeLinear"}),
])
def test_mode_can_be_forced(packages, tmp_path, name, mode, want, ops):
    src, _ = packages[name]
    x = _mlp_inputs(64, 1) if name == "mlp" else tiny_inputs(64, seed=2)
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", x, mode=mode, log=None)
    assert {s["mode"] for s in pkg.manifest["quantization"]["stages"]} == {want}
    assert ops <= _ops(pkg.file_path("stage0.onnx"))
    ExitSession(pkg.root).run_all_exits(x[:3])


@pytest.mark.parametrize(("activation_type", "zero_point"), [("uint8", np.uint8), ("int8", np.int8)])
def test_activation_type_of_static_stages(packages, tmp_path, activation_type, zero_point):
    src, _ = packages["pipeline"]
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", tiny_inputs(64, seed=2), activation_type=activation_type,
                             log=None)
    assert {s["activation_type"] for s in pkg.manifest["quantization"]["stages"]} == {activation_type}
    model = onnx.load(str(pkg.file_path("stage0.onnx")))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    input_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert inits[input_q.input[2]].dtype == zero_point


def test_graph_without_matmul_or_conv_stays_fp32():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])])
    model = onnx.helper.make_model(graph)
    assert [q.choose_mode(model, m) for m in q.MODES] == ["none"] * 3


def test_helper_built_matmul_package_quantizes(tiny_package, tmp_path):
    """The conftest package (onnx.helper, opset 17, an Identity carry): dynamic, names kept."""
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    pkg = q.quantize_package(tiny_package, tmp_path / "int8.eexit", x, log=None)
    assert [s["mode"] for s in pkg.manifest["quantization"]["stages"]] == ["dynamic", "dynamic"]
    assert pkg.manifest["quantization"]["full_model"] is None
    got, want = ExitSession(pkg.root).run_all_exits(x), ExitSession(tiny_package).run_all_exits(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=0.1 * np.abs(b).max())


def test_timings_of_the_fp32_graphs_are_dropped_and_the_history_kept(tiny_package, tmp_path):
    def timed(manifest):
        manifest["stages"][0]["cost"]["measured_ms"] = 0.5
        manifest["calibration"] = {"history": [{"thresholds": [0.5]}]}

    update_manifest(tiny_package, timed)
    lines: list[str] = []
    pkg = q.quantize_package(tiny_package, tmp_path / "int8.eexit", X4 + 1, log=lines.append)
    assert pkg.format_version == 4 and pkg.calibration == {"history": [{"thresholds": [0.5]}]}
    assert "measured_ms" not in pkg.stages[0].cost and pkg.stages[0].cost["flops"] == 24
    assert any("measured_ms of ['stage0']" in line for line in lines)
    assert any("kept the calibration history (1 entry" in line for line in lines)
    assert any(line.startswith("  stage0: ") and " bytes; " in line for line in lines)   # what changed, per stage


def test_quantize_recalibrates_with_the_objective_the_user_chose(packages, tmp_path):
    import shutil

    from edgeexit.calibrate import apply_calibration, calibrate_thresholds

    src = tmp_path / "fp32.eexit"
    shutil.copytree(packages["conv"][0], src)
    x = tiny_inputs(300, seed=2)
    labels = ExitSession(src, engine="stages").run(x, early_exits=False).predictions
    chosen = calibrate_thresholds(ExitSession(src), x, labels, target_accuracy=0.9, stage_costs=[1, 1, 1, 1])
    apply_calibration(src, chosen, device="cpu")
    lines: list[str] = []
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", x, calibration_labels=labels, log=lines.append)
    history = pkg.calibration["history"]
    assert len(history) == 2 and history[0]["thresholds"] == chosen.thresholds       # the fp32 entry, kept
    assert history[1]["objective"] == history[0]["objective"] == {"kind": "target_accuracy", "value": 0.9, "z": 0.0}
    record = pkg.quantization["thresholds"]
    assert record["method"] == "calibrate_thresholds" and record["fp32_values"] == chosen.thresholds
    assert record["objective"]["kind"] == "target_accuracy" and history[1]["cost_unit"] == "ms"
    assert any("recalibrating with the fp32 calibration's objective (target_accuracy 0.9" in line for line in lines)
    # an explicit max_drop asks for the shared-threshold rule instead
    other = q.quantize_package(src, tmp_path / "shared.eexit", x, calibration_labels=labels, max_drop=0.01, log=None)
    assert other.quantization["thresholds"]["method"] == "shared_threshold"


# --- calibration data per stage -------------------------------------------------------


@torch.no_grad()
def _torch_stage_inputs(model: EarlyExitModel, x: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """What each stage reads, computed independently in torch."""
    carries: list[tuple[torch.Tensor, ...]] = []
    reads = []
    for k, stage in enumerate(model.stages):
        args = model.stage_args(k, (torch.from_numpy(x),), carries)
        reads.append(tuple(a.numpy() for a in args))
        out = stage(*args)
        carries.append(out if isinstance(out, tuple) else (out,))
    return reads


@pytest.mark.parametrize("name", ["conv", "pipeline"])
def test_each_static_stage_is_calibrated_on_the_fp32_tensors_it_reads(packages, tmp_path, monkeypatch, name):
    src, model = packages[name]
    seen: dict[str, list[dict[str, np.ndarray]]] = {}
    real = q.quantize_static

    def spy(model_input, model_output, reader, **kwargs):
        batches = list(iter(reader.get_next, None))
        seen[Path(model_output).name] = batches
        reader.rewind()
        return real(model_input, model_output, reader, **kwargs)

    monkeypatch.setattr(q, "quantize_static", spy)
    x = tiny_inputs(150, seed=3)
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", x, max_calibration_samples=130, log=None)
    expected = _torch_stage_inputs(model, x[:130])
    for k, stage in enumerate(pkg.stages):
        batches = seen[stage.file]
        assert [set(b) for b in batches] == [set(stage.inputs)] * len(batches)
        assert [len(next(iter(b.values()))) for b in batches] == [64, 64, 2]  # capped at 130 samples
        first = batches[0]
        for tensor_name, want in zip(stage.inputs, expected[k], strict=True):
            np.testing.assert_allclose(first[tensor_name], want[:64], rtol=1e-4, atol=1e-5)
            whole = np.concatenate([b[tensor_name] for b in batches])
            np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-5)
    if name == "pipeline":
        assert pkg.stages[2].inputs == ("carry0_0",) and pkg.stages[1].carry == ()
    else:
        assert pkg.stages[2].inputs == ("carry1_0", "carry1_1")   # the tuple carry of a stage with no exit
        np.testing.assert_allclose(seen["full.onnx"][0]["x"], x[:64])


def test_reader_batches_and_rewinds():
    reader = q.ArrayCalibrationReader({"a": np.arange(10.0)[:, None]}, batch_size=4)
    assert len(reader) == 3
    assert [b["a"].ravel().tolist() for b in iter(reader.get_next, None)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    reader.rewind()
    assert reader.get_next()["a"].shape == (4, 1)


# --- thresholds -------------------------------------------------------------------------


def _labels(src: Path, x: np.ndarray) -> np.ndarray:
    """Labels the fp32 model mostly gets right: its own last exit, 10 % flipped."""
    y = ExitSession(src).run_all_exits(x)[-1].argmax(1)
    flip = np.random.default_rng(0).random(len(y)) < 0.1
    return np.where(flip, (y + 1) % 5, y)


def test_labelled_calibration_recalibrates_before_writing(packages, tmp_path):
    src, _ = packages["conv"]
    x = tiny_inputs(400, seed=11)
    y = _labels(src, x)
    lines: list[str] = []
    pkg = q.quantize_package(src, tmp_path / "int8.eexit", x, calibration_labels=y, max_calibration_samples=200,
                             log=lines.append)
    record = pkg.manifest["quantization"]["thresholds"]
    assert record["status"] == "recalibrated" and record["samples"] == 400 and record["fp32_values"] == [0.123, 0.234]
    want, _, _ = shared_threshold(record_exits(ExitSession(pkg.root), x, y), 0.003)
    assert pkg.thresholds == [want, want] != [0.123, 0.234]
    assert record["values"] == pkg.thresholds
    assert not any("copied from the fp32 package" in line for line in lines)
    assert any(line.startswith("recalibrated entropy thresholds on 400") for line in lines)


def test_recalibrate_shared_threshold_updates_the_manifest(packages, tmp_path):
    src, _ = packages["mlp"]
    x = _mlp_inputs(300, 12)
    y = _labels(src, x)
    dst = q.quantize_package(src, tmp_path / "int8.eexit", x, log=None).root
    update = q.recalibrate_shared_threshold(dst, x, y, max_drop=0.01, log=None)
    assert update.previous == (0.345,) and update.samples == 300
    reloaded = load_package(dst)                              # hashes still verify
    assert reloaded.thresholds == [update.threshold] != [0.345]
    assert reloaded.manifest["quantization"]["thresholds"]["status"] == "recalibrated"
    want, acc, shares = shared_threshold(record_exits(ExitSession(dst), x, y), 0.01)
    assert update.threshold == want and update.accuracy == acc and update.exit_shares == tuple(shares)


# --- errors and atomicity -------------------------------------------------------------


@pytest.mark.parametrize(("inputs", "kwargs", "error", "message"), [
    (X4[:0], {}, EmptyBatchError, "empty batch"),
    ({"image": X4}, {}, InputNameError, "unknown input(s) 'image'"),
    ({"X": X4}, {}, InputNameError, "did you mean 'x'?"),
    (X4.astype(np.float64), {}, InputDtypeError, "expected dtype float32"),
    (X4[:, :3], {}, InputShapeError, "axis 1 must be 4"),
    (X4, {"calibration_labels": np.zeros(7)}, InputShapeError, "one label per calibration sample"),
    (X4, {"mode": "statc"}, q.QuantizationOptionError, "did you mean 'static'?"),
    (X4, {"activation_type": "uint4"}, q.QuantizationOptionError, "choose one of uint8, int8"),
    (X4, {"max_calibration_samples": 0}, q.QuantizationOptionError, "must be >= 1"),
])
def test_bad_arguments_raise_typed_errors(tiny_package, tmp_path, inputs, kwargs, error, message):
    with pytest.raises(error) as info:
        q.quantize_package(tiny_package, tmp_path / "int8.eexit", inputs, log=None, **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / "int8.eexit").exists()


def test_destination_must_differ_from_source(tiny_package):
    before = sha256_file(tiny_package / "manifest.json")
    for dst in (tiny_package, tiny_package / ".." / tiny_package.name, tiny_package / "inner.eexit"):
        with pytest.raises(q.QuantizationOptionError, match="write the int8 package elsewhere") as info:
            q.quantize_package(tiny_package, dst, X4, log=None)
        assert isinstance(info.value, ExportError) and isinstance(info.value, ValueError)
    assert sha256_file(tiny_package / "manifest.json") == before
    assert not (tiny_package / "inner.eexit").exists()


def test_a_quantized_package_is_not_quantized_again(tiny_package, tmp_path):
    once = q.quantize_package(tiny_package, tmp_path / "once.eexit", X4 + 1, log=None)
    with pytest.raises(q.QuantizationOptionError, match="already quantized"):
        q.quantize_package(once.root, tmp_path / "twice.eexit", X4 + 1, log=None)


def test_missing_source_is_a_package_error(tmp_path):
    with pytest.raises(PackageError):
        q.quantize_package(tmp_path / "nope.eexit", tmp_path / "int8.eexit", X4, log=None)


def test_existing_destination_is_kept_without_overwrite(tiny_package, tmp_path):
    dst = q.quantize_package(tiny_package, tmp_path / "int8.eexit", X4 + 1, log=None).root
    before = _snapshot(dst)
    with pytest.raises(OutputError, match="already exists"):
        q.quantize_package(tiny_package, dst, X4 - 1, overwrite=False, log=None)
    assert _snapshot(dst) == before


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


FAILURES = {
    "quantize": "simulated onnxruntime failure",
    "checker": "renamed a graph input or output",
    "recalibrate": "simulated recalibration failure",
}


@pytest.mark.parametrize("where", list(FAILURES))
def test_a_failed_quantization_leaves_the_existing_destination_intact(tiny_package, tmp_path, monkeypatch, where):
    dst = q.quantize_package(tiny_package, tmp_path / "int8.eexit", X4 + 1, log=None).root
    before = _snapshot(dst)

    def broken_quantizer(*args, **kwargs):
        raise RuntimeError("simulated onnxruntime failure")

    def broken_recalibration(*args, **kwargs):
        raise q.QuantizationError("simulated recalibration failure")

    def renaming_quantizer(model_input, model_output, **kwargs):
        model = onnx.load(str(model_input))
        old = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = ["renamed" if o == old else o for o in node.output]
        model.graph.output[0].name = "renamed"
        onnx.save(model, str(model_output))

    if where == "recalibrate":
        monkeypatch.setattr(q, "recalibrate_shared_threshold", broken_recalibration)
    else:
        monkeypatch.setattr(q, "quantize_dynamic", broken_quantizer if where == "quantize" else renaming_quantizer)
    with pytest.raises(q.QuantizationError) as info:
        q.quantize_package(tiny_package, dst, X4 - 1, calibration_labels=np.zeros(8, dtype=np.int64),
                           overwrite=True, log=None)
    assert FAILURES[where] in str(info.value)
    assert _snapshot(dst) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left
    load_package(dst)


# --- the export-side module stays torch-free -------------------------------------------


def test_quantize_module_imports_no_torch():
    """Load quantize.py without ``edgeexit/export/__init__.py`` (which imports the torch exporter)."""
    path = Path(q.__file__)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys, types
        import edgeexit
        parent = types.ModuleType("edgeexit.export")
        parent.__path__ = [{str(path.parent)!r}]
        sys.modules["edgeexit.export"] = parent
        spec = importlib.util.spec_from_file_location("edgeexit.export.quantize", {str(path)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        assert callable(module.quantize_package)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
