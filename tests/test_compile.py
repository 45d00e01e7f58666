"""Compiled exits: one ONNX graph that decides exits in-graph must agree with the stage loop.

The stage loop (``ExitSession(engine="stages")``) is the reference semantics; its own
agreement with torch is tested in test_runtime.py.  Every model here is compared at
batch 1, 7 and 64 with the package's thresholds, "never exit", "always exit" and per-exit
thresholds from the score distribution (placed in gaps between scores, so a float
difference between two onnxruntime graphs cannot flip a decision).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _models import tiny_inputs, tiny_model
from click.testing import CliRunner

from edgeexit.cli import cli
from edgeexit.errors import CompileError, InputError, ManifestSchemaError, NonFiniteInputError, SessionError
from edgeexit.export import export_package
from edgeexit.export.compile import THRESHOLDS_INPUT, bake_thresholds, build_compiled_model, compile_package
from edgeexit.package import load_package, parse_manifest, read_manifest, update_manifest, write_package
from edgeexit.policies import get_policy
from edgeexit.runtime import ExitSession
from edgeexit.zoo import get_model
from edgeexit.zoo.cbnet import ConvertingAutoencoder, cbnet_model

BATCHES = (1, 7, 64)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _images(n: int, seed: int = 0) -> np.ndarray:
    from edgeexit.datasets import mnist5k_splits

    return mnist5k_splits(seed).test.x[:n]


def _gap_thresholds(session: ExitSession, x: np.ndarray, policy: str, quantiles: list[float]) -> list[float]:
    """Per-exit thresholds near score quantiles, in the widest gap between neighbouring scores."""
    pol = get_policy(policy)
    out = []
    for logits, q in zip(session.run_all_exits(x)[:-1], quantiles):
        s = np.sort(pol.scores(logits))
        lo, hi = int(len(s) * max(q - 0.3, 0)), int(len(s) * min(q + 0.3, 1))
        window = s[lo:max(hi, lo + 2)]
        j = int(np.argmax(np.diff(window)))
        assert window[j + 1] - window[j] > 1e-6, "scores too dense for a threshold no rounding can flip"
        out.append(float(window[j] + window[j + 1]) / 2)
    return out


def _never(policies: list[str]) -> list[None]:
    return [None for _ in policies[:-1]]      # a disabled exit (a finite threshold no score passes is refused)


def _always(policies: list[str]) -> list[float]:
    return [-1e300 if get_policy(p).direction == "higher" else 1e300 for p in policies[:-1]]


def _assert_same(compiled, stages) -> None:
    assert compiled.engine == "compiled" and stages.engine == "stages"
    np.testing.assert_array_equal(compiled.exit_index, stages.exit_index)
    np.testing.assert_array_equal(compiled.predictions, stages.predictions)
    np.testing.assert_allclose(compiled.logits, stages.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(compiled.scores, stages.scores, atol=1e-9, rtol=1e-9)
    assert compiled.nonfinite_scores == stages.nonfinite_scores


# --- the models -------------------------------------------------------------------


def _export(model, example: np.ndarray, path: Path, input_name: str, thresholds, policy="entropy", **kw) -> Path:
    export_package(model, {input_name: torch.from_numpy(example)}, path, policy=policy, thresholds=thresholds,
                   log=None, **kw)
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """Exported once per module: B-LeNet, B-ResNet, CBNet's pipeline, a tuple-carry model."""
    root = tmp_path_factory.mktemp("compiled")
    images = _images(64)
    out = {}
    torch.manual_seed(0)
    blenet = get_model("blenet", seed=0)
    out["blenet"] = (_export(blenet, images[:4], root / "blenet.eexit", "image", [1.0], include_full_model=True),
                     images)
    out["bresnet"] = (_export(get_model("bresnet", seed=1), images[:4], root / "bresnet.eexit", "image",
                              [1.0, 1.0], policy="confidence"), images)
    torch.manual_seed(2)
    ae = ConvertingAutoencoder(64, 32, 16)
    with torch.no_grad():
        ae.net[-1].weight.mul_(30.0)   # untrained, it maps every image to nearly one grey image
    pipeline = cbnet_model(blenet, ae, fallback=True)
    out["cbnet"] = (_export(pipeline, images[:4], root / "cbnet.eexit", "image", [1.0]), images)
    x = tiny_inputs(64, seed=3)
    out["tuple"] = (_export(tiny_model(), x[:4], root / "tuple.eexit", "x", [0.5, 0.5], policy="margin"), x)
    return out


@pytest.mark.parametrize("name", ["blenet", "bresnet", "cbnet", "tuple"])
def test_compiled_graph_agrees_with_the_stage_loop(packages, name):
    path, x = packages[name]
    package = load_package(path)
    assert package.compiled is not None and package.format_version == 4
    compiled = ExitSession(path, engine="compiled")
    stages = ExitSession(path, engine="stages")
    policies = package.policies
    spread = _gap_thresholds(stages, x, policies[0], [0.5] * len(package.thresholds))
    never = _never(policies)
    used_every_exit = False
    for thresholds in (None, never, _always(policies), spread):
        for n in BATCHES:
            got, want = compiled.run(x[:n], thresholds=thresholds), stages.run(x[:n], thresholds=thresholds)
            _assert_same(got, want)
            if thresholds is spread and n == 64:
                used_every_exit = bool((np.bincount(want.exit_index, minlength=compiled.num_exits) > 0).all())
    assert used_every_exit or name == "tuple", "the spread thresholds should send samples to every exit"


def test_auto_engine_takes_the_compiled_graph_and_falls_back_for_other_policies(packages):
    path, x = packages["blenet"]
    sess = ExitSession(path)
    assert sess.run(x[:1]).engine == "compiled" and sess.run(x[:7]).engine == "compiled"
    assert sess.run(x[:1], engine="stages").engine == "stages"
    other = sess.run(x[:7], policy="confidence", thresholds=[0.5])
    assert other.engine == "stages"      # the graph computes entropy: the stage loop runs confidence
    assert sess.run(x[:7], early_exits=False).engine == "stages"
    with pytest.raises(InputError, match="policies"):
        sess.run(x[:7], policy="confidence", thresholds=[0.5], engine="compiled")
    with pytest.raises(InputError, match="early_exits=False"):
        sess.run(x[:7], early_exits=False, engine="compiled")


@pytest.mark.parametrize("with_data", [True, False])
def test_tune_engines_times_both_and_records_the_choice(packages, with_data):
    path, x = packages["blenet"]
    sess = ExitSession(path)
    timings = sess.tune_engines(x if with_data else None, batch_size=32, rounds=40)
    assert [t.batch_size for t in timings] == [1, 32]
    assert all(t.stages_ms > 0 and t.compiled_ms > 0 for t in timings)
    assert sess.engine_choice == {"batch1": timings[0].faster, "batch": timings[1].faster}
    assert sess.run(x[:1]).engine == timings[0].faster and sess.run(x[:7]).engine == timings[1].faster
    assert sess.engine_for(1) == timings[0].faster


def test_forced_paths_send_every_sample_to_each_exit(packages):
    from edgeexit.runtime._engines import forced_paths

    path, x = packages["bresnet"]
    sess = ExitSession(path)
    paths = forced_paths(load_package(path).policies)
    for k, thresholds in enumerate(paths):
        for engine in ("stages", "compiled"):
            assert (sess.run(x[:7], thresholds=thresholds, engine=engine).exit_index == k).all()


def test_nonfinite_inputs(packages):
    path, x = packages["blenet"]
    bad = x[:7].copy()
    bad[2, 0, 3, 3] = np.nan
    bad[5, 0, 0, 0] = np.inf
    with pytest.raises(NonFiniteInputError):
        ExitSession(path).run(bad)      # refused before either engine runs
    compiled = ExitSession(path, engine="compiled", check_finite=False)
    stages = ExitSession(path, engine="stages", check_finite=False)
    always = _always(load_package(path).policies)
    for thresholds in (None, always):
        got, want = compiled.run(bad, thresholds=thresholds), stages.run(bad, thresholds=thresholds)
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        # a NaN score never exits: the poisoned rows reach the last exit even when everything else leaves
        assert got.exit_index[2] == got.exit_index[5] == compiled.num_exits - 1
        assert np.isnan(got.scores[[2, 5]]).all() and got.nonfinite_scores == want.nonfinite_scores >= 2
        ok = np.isfinite(want.logits).all(axis=1)
        np.testing.assert_allclose(got.logits[ok], want.logits[ok], atol=1e-5)
        one = compiled.run(bad[2:3], thresholds=thresholds)
        assert one.exit_index[0] == compiled.num_exits - 1 and one.nonfinite_scores == 1


def test_scores_at_infinite_logits_match_numpy(tmp_path):
    """-inf and +inf logits: the in-graph scores follow the numpy policies (NaN never exits)."""
    logits = np.array([[0.0, -np.inf, 1.0], [np.inf, 0.0, 0.0], [-np.inf, -np.inf, -np.inf], [3.0, 3.0, 3.0]])
    from onnx import TensorProto, helper

    from edgeexit.export.compile import _Names, _Scope, _score

    for policy in ("confidence", "entropy", "margin"):
        scope = _Scope(_Names(["z"]), 18)
        out = _score(scope, "z", policy, 3)
        graph = helper.make_graph(scope.nodes, "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3])],
                                  [helper.make_tensor_value_info(out, TensorProto.DOUBLE, [4])],
                                  initializer=scope.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model, full_check=True)
        got = ort.InferenceSession(model.SerializeToString()).run(None, {"z": logits.astype(np.float32)})[0]
        with np.errstate(all="ignore"):
            want = get_policy(policy).scores(logits.astype(np.float32))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=policy)


def test_graph_passes_the_full_checker_and_runs_with_every_optimization(packages):
    path, x = packages["bresnet"]
    package = load_package(path)
    model = onnx.load(str(path / package.compiled.file))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image", THRESHOLDS_INPUT]
    assert [o.name for o in model.graph.output] == ["logits", "exit_index", "score"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path / package.compiled.file), options, providers=["CPUExecutionProvider"])
    thresholds = np.array(package.thresholds, np.float64)
    logits, exit_index, score = session.run(None, {"image": x, THRESHOLDS_INPUT: thresholds})
    want = ExitSession(path, engine="stages").run(x)
    np.testing.assert_array_equal(exit_index, want.exit_index)
    np.testing.assert_allclose(logits, want.logits, atol=1e-5)
    assert exit_index.dtype == np.int64 and score.dtype == np.float64


def test_weights_are_embedded_once_inside_the_branch_that_runs_them(packages):
    path, _ = packages["bresnet"]
    package = load_package(path)
    model = onnx.load(str(path / package.compiled.file))
    stage_bytes = sum(package.files[s.file]["size"] for s in package.stages)
    assert package.files[package.compiled.file]["size"] < 1.1 * stage_bytes

    def weights(graph: onnx.GraphProto) -> list[str]:
        found = [i.name for i in graph.initializer if i.name.startswith("s")]
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    found += weights(attr.g)
        return found

    names = weights(model.graph)
    assert len(names) == len(set(names))
    # stage 0's weights in the main graph, stage 1's only inside the first If's branch
    assert any(n.startswith("s0/") for n in (i.name for i in model.graph.initializer))
    assert not any(i.name.startswith(("s1/", "s2/")) for i in model.graph.initializer)


# --- the package format -------------------------------------------------------------


def test_thresholds_stay_in_the_manifest_so_calibration_never_touches_the_graph(packages, tmp_path):
    import shutil

    path = tmp_path / "copy.eexit"
    shutil.copytree(packages["blenet"][0], path)
    x = packages["blenet"][1]
    before = (path / "compiled.onnx").read_bytes()
    from edgeexit.package import set_thresholds

    set_thresholds(path, [0.3])
    assert (path / "compiled.onnx").read_bytes() == before
    _assert_same(ExitSession(path, engine="compiled").run(x), ExitSession(path, engine="stages").run(x))


def test_a_stale_compiled_graph_is_refused(packages, tmp_path):
    import shutil

    path = tmp_path / "stale.eexit"
    shutil.copytree(packages["blenet"][0], path)
    _, manifest = read_manifest(path)
    manifest["compiled"]["sources"]["stage1.onnx"] = "0" * 64
    with pytest.raises(ManifestSchemaError, match="edgeexit compile"):
        parse_manifest(manifest, path)
    _, manifest = read_manifest(path)
    manifest["format_version"] = 2
    with pytest.raises(ManifestSchemaError, match="version-3 field"):
        parse_manifest(manifest, path)


def test_a_compiled_graph_of_another_policy_is_not_used(packages, tmp_path):
    import shutil

    path = tmp_path / "recalibrated.eexit"
    shutil.copytree(packages["blenet"][0], path)
    update_manifest(path, lambda m: [s["exit"].update(policy="confidence") for s in m["stages"] if s.get("exit")])
    x = packages["blenet"][1]
    sess = ExitSession(path)
    assert sess.run(x[:7]).engine == "stages"
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0 and "STALE" in result.output
    compile_package(path, log=None)
    assert ExitSession(path).run(x[:7]).engine == "compiled"
    assert load_package(path).compiled.policies == ("confidence", "confidence")


def test_export_can_skip_compiling_and_engine_compiled_then_says_how(tmp_path):
    x = tiny_inputs(4)
    path = _export(tiny_model(), x, tmp_path / "plain.eexit", "x", [0.5, 0.5], compile=False)
    assert load_package(path).compiled is None
    assert ExitSession(path).run(x).engine == "stages"
    with pytest.raises(SessionError, match="edgeexit compile"):
        ExitSession(path, engine="compiled")
    compile_package(path, log=None)
    assert ExitSession(path).run(x).engine == "compiled"


def test_a_model_without_early_exits_cannot_be_compiled(tmp_path):
    from edgeexit.export import EarlyExitModel

    model = EarlyExitModel(stages=[torch.nn.Flatten()], exits=[torch.nn.Linear(64, 3)]).eval()
    path = _export(model, tiny_inputs(4), tmp_path / "single.eexit", "x", [])
    assert load_package(path).compiled is None           # compile=None: skipped, not an error
    with pytest.raises(CompileError, match="no early exit"):
        build_compiled_model(load_package(path))
    with pytest.raises(CompileError, match="no early exit"):
        _export(model, tiny_inputs(4), tmp_path / "forced.eexit", "x", [], compile=True)


# --- standalone graphs and the CLI --------------------------------------------------------


def test_standalone_and_baked_graphs(packages, tmp_path):
    path, x = packages["blenet"]
    want = ExitSession(path, engine="stages").run(x)
    runner = CliRunner()
    plain, baked = tmp_path / "plain.onnx", tmp_path / "baked.onnx"
    assert runner.invoke(cli, ["compile", str(path), "-o", str(plain)]).exit_code == 0
    result = runner.invoke(cli, ["compile", str(path), "-o", str(baked), "--bake-thresholds"])
    assert result.exit_code == 0, result.output
    assert "baked in" in result.output
    s_plain = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    s_baked = ort.InferenceSession(str(baked), providers=["CPUExecutionProvider"])
    assert [i.name for i in s_baked.get_inputs()] == ["image"]
    assert s_baked.get_overridable_initializers() == []     # a constant, not an input default
    thresholds = np.array(load_package(path).thresholds, np.float64)
    for outs in (s_plain.run(None, {"image": x, THRESHOLDS_INPUT: thresholds}), s_baked.run(None, {"image": x})):
        np.testing.assert_array_equal(outs[1], want.exit_index)
        np.testing.assert_allclose(outs[0], want.logits, atol=1e-5)
    assert load_package(path).compiled is not None      # -o leaves the package as it was


def test_cli_compile_errors_are_typed(tmp_path, packages):
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", str(packages["blenet"][0]), "--bake-thresholds"])
    assert result.exit_code == 2 and "-o FILE.onnx" in result.output
    x = tiny_inputs(4)
    from edgeexit.export import EarlyExitModel

    model = EarlyExitModel(stages=[torch.nn.Flatten()], exits=[torch.nn.Linear(64, 3)]).eval()
    single = _export(model, x, tmp_path / "single.eexit", "x", [])
    result = runner.invoke(cli, ["compile", str(single)])
    assert result.exit_code == 5 and "CompileError" in result.output and "no early exit" in result.output
    result = runner.invoke(cli, ["compile", str(tmp_path / "missing.eexit")])
    assert result.exit_code == 3 and "PackageNotFoundError" in result.output


def test_cli_compile_adds_the_graph_to_the_package_atomically(tmp_path):
    x = tiny_inputs(8)
    path = _export(tiny_model(), x[:4], tmp_path / "t.eexit", "x", [0.5, 0.5], compile=False)
    result = CliRunner().invoke(cli, ["compile", str(path)])
    assert result.exit_code == 0, result.output
    package = load_package(path)
    assert package.format_version == 4 and package.files["compiled.onnx"]["sha256"] == hashlib.sha256(
        (path / "compiled.onnx").read_bytes()).hexdigest()
    assert package.compiled.sources == {s.file: package.files[s.file]["sha256"] for s in package.stages}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.eexit"]   # no temporary siblings left
    listed = json.loads((path / "manifest.json").read_text())["compiled"]
    assert listed["thresholds"] == THRESHOLDS_INPUT and listed["outputs"] == {
        "logits": "logits", "exit_index": "exit_index", "score": "score"}
    result = CliRunner().invoke(cli, ["run", str(path), str(_npz(tmp_path, x)), "--engine", "compiled"])
    assert result.exit_code == 0, result.output


def _npz(folder: Path, x: np.ndarray) -> Path:
    path = folder / "x.npz"
    np.savez(path, x=x)
    return path


def test_bake_thresholds_refuses_a_graph_without_the_input(packages):
    path, _ = packages["blenet"]
    model = build_compiled_model(load_package(path))
    baked = bake_thresholds(model, [0.1])
    with pytest.raises(CompileError, match="no 'thresholds' input"):
        bake_thresholds(baked, [0.1])


def test_bench_reports_both_engines_against_the_full_model(packages, tmp_path):
    from edgeexit.bench import BenchConfig, format_table, run_benchmark
    from edgeexit.devices.energy import EstimateMeter
    from edgeexit.devices.thermal import ThrottleMonitor

    path, x = packages["blenet"]
    sess = ExitSession(path)
    assert sess.engine_for(1) == "compiled"
    monitor = ThrottleMonitor(tmp_path / "no-thermal", run_command=lambda argv: "", interval_s=None)
    config = BenchConfig(batch=1, duration_s=0.05, windows=2, warmup_s=0.01)
    meter = EstimateMeter(10.0, 2.0, source="test figures")
    report = run_benchmark(sess, {"image": x}, np.zeros(len(x), np.int64), config, meter,
                           compare_full=True, thermal=monitor)
    names = [c.name for c in report.contenders]
    assert names == ["early exit, compiled", "full model (one graph)", "early exit, stage loop"]
    compiled, _, loop = (c.summary for c in report.contenders)
    assert compiled["exit_shares"] == loop["exit_shares"] and compiled["accuracy"] == loop["accuracy"]
    text = format_table(report)
    assert "early exit, compiled vs full" in text and "early exit, stage loop vs full" in text
    sess.engine_choice = {"batch1": "stages", "batch": "stages"}
    report = run_benchmark(sess, {"image": x}, None, config, meter, thermal=monitor)
    assert [c.name for c in report.contenders] == ["early exit, stage loop", "early exit, compiled"]
    assert report.ratios() is None   # no full model measured


def test_compiled_graph_describes_itself_and_packages_are_readable_by_others(packages, tmp_path):
    import stat

    path, _ = packages["blenet"]
    props = {p.key: p.value for p in onnx.load(str(path / "compiled.onnx")).metadata_props}
    assert props["edgeexit.policies"] == "entropy,entropy" and props["edgeexit.exits"] == "2"
    baked = bake_thresholds(onnx.load(str(path / "compiled.onnx")), [0.25])
    assert {p.key: p.value for p in baked.metadata_props}["edgeexit.thresholds"] == "baked: 0.25"
    # mkdtemp/mkstemp make 0700/0600; a package gets the modes of any file the user writes
    mask = os.umask(0o022)
    os.umask(mask)
    copy = tmp_path / "copy.eexit"
    write_package(copy, {k: v for k, v in read_manifest(path)[1].items() if k != "files"},
                  {name: path / name for name in load_package(path).files})
    from edgeexit.package import set_thresholds

    set_thresholds(copy, [0.5])   # rewrites manifest.json through a temporary file
    assert stat.S_IMODE(copy.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((copy / "manifest.json").stat().st_mode) == 0o666 & ~mask


def test_calibrate_records_the_faster_engine_per_regime(packages, tmp_path):
    import shutil

    from edgeexit.calibrate import record_engine_choice

    path = tmp_path / "calibrated.eexit"
    shutil.copytree(packages["blenet"][0], path)
    x = _images(200)
    timings = record_engine_choice(path, x, device="cpu")
    assert [t.batch_size for t in timings] == [1, 64]
    engines = load_package(path).compiled.engines
    assert engines["batch_size"] == 64 and engines["device"] == "cpu"
    faster = ["compiled" if c <= s else "stages" for s, c in zip(engines["stages_ms"], engines["compiled_ms"])]
    assert [engines["batch1"], engines["batch"]] == faster
    sess = ExitSession(path)
    assert sess.engine_choice == {"batch1": engines["batch1"], "batch": engines["batch"]}
    assert sess.run(x[:1]).engine == engines["batch1"]
    assert ExitSession(path, engine="compiled").run(x[:1]).engine == "compiled"   # an explicit engine wins
    _, manifest = read_manifest(path)
    manifest["compiled"]["engines"]["batch1"] = "fastest"
    with pytest.raises(ManifestSchemaError, match=r"compiled\.engines"):
        parse_manifest(manifest, path)


# --- review findings: names, dtypes, graphs, engines, writes ---------------------------------


@pytest.mark.parametrize("input_name", ["thresholds", "score"])
def test_model_inputs_named_like_the_graph_io_get_other_names(tmp_path, input_name):
    x = tiny_inputs(64, seed=5)
    path = _export(tiny_model(), x[:4], tmp_path / "named.eexit", input_name, [0.5, 0.5])
    package = load_package(path)
    assert package.compiled is not None and package.compiled.inputs == (input_name,)
    assert input_name not in (package.compiled.thresholds, *package.compiled.outputs.values())
    _assert_same(ExitSession(path, engine="compiled").run({input_name: x}),
                 ExitSession(path, engine="stages").run({input_name: x}))


def test_export_without_a_compiled_graph_when_compiling_fails_by_default(tmp_path, monkeypatch):
    import edgeexit.export.exporter as exporter

    def broken(*_args, **_kwargs):
        raise CompileError("simulated: the checker refused the graph")

    monkeypatch.setattr(exporter, "compile_package", broken)
    lines: list[str] = []
    export_package(tiny_model(), {"x": torch.from_numpy(tiny_inputs(4))}, tmp_path / "a.eexit",
                   thresholds=[0.5, 0.5], log=lines.append)
    assert load_package(tmp_path / "a.eexit").compiled is None
    assert any(line.startswith("not compiled (simulated") for line in lines)
    with pytest.raises(CompileError, match="simulated"):
        export_package(tiny_model(), {"x": torch.from_numpy(tiny_inputs(4))}, tmp_path / "b.eexit",
                       thresholds=[0.5, 0.5], compile=True, log=None)


def test_stage_graphs_listing_their_weights_as_inputs_compile(tiny_package):
    stage0 = onnx.load(str(tiny_package / "stage0.onnx"))
    weight = stage0.graph.initializer[0]
    stage0.graph.input.append(onnx.helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    onnx.save(stage0, str(tiny_package / "stage0.onnx"))
    _, manifest = read_manifest(tiny_package)
    manifest.pop("files")
    rebuilt = write_package(tiny_package.parent / "weights-as-inputs.eexit", manifest,
                            {f: tiny_package / f for f in ("stage0.onnx", "stage1.onnx")})
    compile_package(rebuilt, log=None)
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32) * 3
    _assert_same(ExitSession(rebuilt, engine="compiled").run(x), ExitSession(rebuilt, engine="stages").run(x))


class _Half(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).to(torch.float16)


def test_exits_with_different_logits_dtypes_decide_on_their_own_logits(tmp_path):
    from edgeexit.export import EarlyExitModel

    model = tiny_model()
    model = EarlyExitModel(stages=list(model.stages), exits=[_Half(model.exit_at(0)), None, model.exit_at(2),
                                                             model.exit_at(3)]).eval()
    x = tiny_inputs(64, seed=9)
    path = _export(model, x[:4], tmp_path / "half.eexit", "x", [0.5, 0.5])
    stages = ExitSession(path, engine="stages")
    logits = stages.run_all_exits(x)
    assert logits[0].dtype == np.float16 and logits[1].dtype == np.float32
    spread = _gap_thresholds(stages, x, "entropy", [0.4, 0.5])
    for thresholds in (None, spread):
        got = ExitSession(path, engine="compiled").run(x, thresholds=thresholds)
        want = stages.run(x, thresholds=thresholds)
        assert got.logits.dtype == want.logits.dtype == np.float32   # the widest exit's: no exit is rounded
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12)   # exit 2 scored in float32, not float16


def test_engine_names_are_checked_and_forced_sessions_keep_their_engine(packages):
    path, x = packages["blenet"]
    sess = ExitSession(path)
    with pytest.raises(InputError, match="engine='stage'"):
        sess.run(x[:1], engine="stage")
    sess.engine_choice = {"batch1": "stages", "batch": "compiled"}
    assert sess.run(x[:1], engine="auto").engine == "stages" and sess.run(x[:7], engine="auto").engine == "compiled"
    # a tuned or recorded choice of the compiled graph still lets the stage loop serve what it cannot
    sess.engine_choice = {"batch1": "compiled", "batch": "compiled"}
    assert sess.run(x[:7], early_exits=False).engine == "stages"
    assert sess.run(x[:1], policy="confidence", thresholds=[0.5]).engine == "stages"
    np.testing.assert_allclose(sess.run_full(x[:3]), ExitSession(path, engine="stages").run_full(x[:3]))
    forced = ExitSession(path, engine="compiled")
    timings = forced.tune_engines(x, batch_size=16, rounds=20)
    assert len(timings) == 2 and forced.engine_choice == {"batch1": "compiled", "batch": "compiled"}
    with forced.measure() as m:
        forced.tune_engines(None, batch_size=8, rounds=10)
        forced.run(x[:3])
    assert m.samples == 3    # the tuning calls are not counted as the caller's inferences


def test_compiling_in_place_keeps_other_files_follows_links_and_swaps_files(packages, tmp_path):
    import shutil

    real = tmp_path / "real.eexit"
    shutil.copytree(packages["tuple"][0], real)
    (real / "NOTES.txt").write_text("kept")
    link = tmp_path / "link.eexit"
    link.symlink_to(real, target_is_directory=True)
    before = {f: (real / f).read_bytes() for f in ("stage0.onnx", "stage3.onnx")}
    compile_package(link, log=None)
    assert link.is_symlink() and (real / "NOTES.txt").read_text() == "kept"
    package = load_package(real)
    assert package.compiled.file == "compiled-next.onnx" and not (real / "compiled.onnx").exists()
    assert all((real / f).read_bytes() == b for f, b in before.items())
    compile_package(real, log=None)
    assert load_package(real).compiled.file == "compiled.onnx" and not (real / "compiled-next.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.eexit", "real.eexit"]   # no temporary siblings
    x = packages["tuple"][1]
    _assert_same(ExitSession(real, engine="compiled").run(x), ExitSession(real, engine="stages").run(x))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(file="stage0.onnx"), "a file name of its own"),
    (lambda c: c["outputs"].update(score="logits"), "three distinct"),
    (lambda c: c.update(thresholds=""), "non-empty"),
    (lambda c: c.update(thresholds="score"), "none of them the thresholds"),
])
def test_compiled_entries_that_cannot_work_are_refused(packages, change, message):
    path, _ = packages["blenet"]
    _, manifest = read_manifest(path)
    change(manifest["compiled"])
    with pytest.raises(ManifestSchemaError, match=message):
        parse_manifest(manifest, path)


def test_a_compiled_graph_whose_names_differ_from_the_manifest_is_refused_at_load(packages, tmp_path):
    import shutil

    from edgeexit.errors import GraphMismatchError

    path = tmp_path / "renamed.eexit"
    shutil.copytree(packages["blenet"][0], path)
    update_manifest(path, lambda m: m["compiled"]["outputs"].update(score="the_score"))
    with pytest.raises(GraphMismatchError, match="edgeexit compile"):
        ExitSession(path)
    assert ExitSession(path, engine="stages").run(packages["blenet"][1][:3]).engine == "stages"


# --- calibration against the full model, on the engine the runtime uses ------------------------


def test_exit_paths_are_timed_end_to_end_against_the_full_model(packages):
    from edgeexit.calibrate import measure_exit_paths

    path, x = packages["blenet"]
    sess = ExitSession(path)
    times = measure_exit_paths(sess, x, samples=16, repeats=3)
    assert len(times.path_ms) == 2 and all(ms > 0 for ms in times.path_ms) and times.full_ms > 0
    assert times.engine == sess.engine_for(1) == "compiled" and times.full_model == "full.onnx"
    # the paths it timed are the exit paths: thresholds that send every sample to exit k (comparing
    # their times would be a timed test, and this VM's speed drifts by more than B-LeNet's stage 1)
    from edgeexit.runtime._engines import forced_paths

    for k, thresholds in enumerate(forced_paths(sess.package.policies)):
        assert (sess.run(x[:8], thresholds=thresholds).exit_index == k).all()
    stages = ExitSession(path, engine="stages")
    assert measure_exit_paths(stages, x, samples=4, repeats=1).engine == "stages"


def test_calibration_costs_exit_paths_against_the_full_model_and_replays_the_choice(packages):
    from edgeexit.calibrate import CalibrationError, calibrate_thresholds, replay_calibration

    path, x = packages["blenet"]
    sess = ExitSession(path)
    labels = ExitSession(path, engine="stages").run(x, early_exits=False).predictions
    result = calibrate_thresholds(sess, x, labels, max_drop=0.05)
    # both engines were timed; the one whose exit paths give the cheaper choice decides
    assert result.engine in ("stages", "compiled") and result.full_model == "full.onnx" and result.cost_unit == "ms"
    assert len(result.exit_costs) == 2 and result.cost_source.startswith("measured: median batch-1 ms of ExitSession")
    assert result.expected_cost == pytest.approx(float(np.dot(result.shares, result.exit_costs)))
    assert result.speedup == pytest.approx(result.full_cost / result.expected_cost)
    entry = result.entry()
    assert entry["exit_costs"] == result.exit_costs and entry["engine"] == result.engine
    assert result.disabled_cost is not None and entry["disabled_cost"] == result.disabled_cost
    replay = replay_calibration(sess, x, labels, result, samples=16)
    assert replay.accuracy == pytest.approx(result.accuracy) and replay.shares == pytest.approx(result.shares)
    assert replay.mean_ms > 0 and replay.full_mean_ms > 0 and replay.samples_timed == 16
    from dataclasses import replace

    wrong = replace(result, shares=[result.shares[1], result.shares[0]]) if result.shares[0] != result.shares[1] \
        else replace(result, accuracy=result.accuracy + 0.5)
    with pytest.raises(CalibrationError, match="nothing was written"):
        replay_calibration(sess, x, labels, wrong, samples=4)


def test_calibrate_says_when_the_exits_lose_to_the_full_model(packages, tmp_path):
    import shutil

    path = tmp_path / "slow.eexit"
    shutil.copytree(packages["blenet"][0], path)
    x = _images(200)
    # untrained: the first exit rarely agrees with the last, so a zero drop keeps most samples
    # on the deep path, which costs more than the single full graph
    labels = ExitSession(path, engine="stages").run(x, early_exits=False).predictions
    np.savez(tmp_path / "val.npz", image=x, labels=labels)
    result = CliRunner().invoke(cli, ["calibrate", str(path), "--data", str(tmp_path / "val.npz"),
                                      "--max-drop", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "for the full model (full.onnx)" in result.output and "replayed on the calibration data" in result.output
    assert "the exits under this objective do not pay on this device" in result.output
    assert "Writing the package with its early exits disabled: it runs full.onnx" in result.output
    package = load_package(path)
    assert package.exits_disabled and package.format_version == 4
    assert package.calibration["history"][-1]["exits_disabled"].startswith(("expected", "replayed"))
    sess = ExitSession(path)
    out = sess.run(x[:5])
    assert out.engine == "full" and (out.exit_index == 1).all() and sess.engine_for(1) == "full"
    np.testing.assert_allclose(out.logits, sess.run_full(x[:5]))
    shown = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert "early exits: DISABLED" in shown and "disabled" in shown.split("stage0", 1)[1].splitlines()[0]
    result = CliRunner().invoke(cli, ["calibrate", str(path), "--revert"])
    assert result.exit_code == 0 and load_package(path).thresholds == load_package(packages["blenet"][0]).thresholds


def test_a_package_with_its_exits_disabled_runs_as_the_full_model(tmp_path):
    from edgeexit.export import EarlyExitModel  # noqa: F401  (the export extra is what this needs)
    from edgeexit.package import set_thresholds
    from edgeexit.policies import get_policy as policy_of

    x = _images(64)
    torch.manual_seed(3)
    path = _export(get_model("bresnet", seed=3), x[:4], tmp_path / "off.eexit", "image", None)
    package = load_package(path)
    assert package.thresholds == [None, None] and package.exits_disabled and package.full_model is not None
    assert package.compiled is not None           # compiled all the same: thresholds are an input
    sess = ExitSession(path)
    for n in (1, 7):
        out = sess.run(x[:n])
        assert out.engine == "full" and (out.exit_index == 2).all() and out.stage_ms == ()
        np.testing.assert_allclose(out.logits, sess.run_full(x[:n]))
        np.testing.assert_allclose(out.scores, policy_of("entropy").scores(out.logits))
        # read lazily, the same answer as the stage loop running every stage with its exits disabled
        loop = ExitSession(path, engine="stages").run(x[:n], thresholds=[None, None])
        np.testing.assert_array_equal(out.predictions, out.logits.argmax(axis=1))
        np.testing.assert_array_equal(out.predictions, loop.predictions)
        assert out.exit_index.dtype == loop.exit_index.dtype and (out.exit_index == loop.exit_index).all()
        np.testing.assert_allclose(out.scores, loop.scores, rtol=1e-5)
        assert out.nonfinite_scores == loop.nonfinite_scores == 0 and out.exit_counts(3).tolist() == [0, 0, n]
    # explicit engines and per-call thresholds still run the exits
    stages, compiled = ExitSession(path, engine="stages"), ExitSession(path, engine="compiled")
    assert (stages.run(x[:7]).exit_index == 2).all() and (compiled.run(x[:7]).exit_index == 2).all()
    spread = _gap_thresholds(stages, x, "entropy", [0.5, 0.5])
    _assert_same(sess.run(x, thresholds=spread, engine="compiled"), stages.run(x, thresholds=spread))
    # one exit disabled, one enabled: both engines agree, and nobody leaves at the disabled one
    half = [None, spread[1]]
    got, want = compiled.run(x, thresholds=half), stages.run(x, thresholds=half)
    _assert_same(got, want)
    assert (got.exit_index != 0).all()
    set_thresholds(path, spread)
    assert not load_package(path).exits_disabled and ExitSession(path).run(x[:1]).engine != "full"


def test_set_thresholds_with_a_disabled_exit_raises_the_format_version(tiny_package):
    from edgeexit.package import set_thresholds

    assert load_package(tiny_package).format_version == 1
    package = set_thresholds(tiny_package, [None])
    assert package.format_version == 4 and package.exits_disabled
    out = ExitSession(tiny_package).run(np.ones((3, 4), np.float32))
    assert out.engine == "stages" and (out.exit_index == 1).all()   # no full.onnx here: every stage runs


def test_the_bytes_that_were_hashed_are_the_bytes_that_run(packages, tmp_path):
    import shutil

    path = tmp_path / "swapped.eexit"
    shutil.copytree(packages["blenet"][0], path)
    x = packages["blenet"][1][:5]
    want = ExitSession(path, engine="stages").run_full(x)
    sess = ExitSession(path)                       # verifies and keeps every file's bytes
    (path / "full.onnx").write_bytes((path / "stage1.onnx").read_bytes())   # swapped after verification
    (path / "compiled.onnx").write_bytes(b"not a graph")
    np.testing.assert_allclose(sess.run_full(x), want, rtol=1e-5)   # built later, from the verified bytes
    assert sess.run(x, engine="compiled").engine == "compiled"
