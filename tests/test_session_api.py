"""ExitSession with onnxruntime's conventions: sess_options, NodeArg-like inputs and outputs,
providers, model metadata, close() and ``with``.  Compared against onnxruntime's own answers
for the package's stage graphs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from edgeexit.errors import InputError, SessionError, ThresholdError
from edgeexit.runtime import ExitSession

X = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32) * 3


def test_inputs_outputs_and_providers_look_like_onnxruntime_s(tiny_package):
    sess = ExitSession(tiny_package)
    stage0 = ort.InferenceSession(str(tiny_package / "stage0.onnx"), providers=["CPUExecutionProvider"])
    (arg,) = sess.get_inputs()
    (ref,) = stage0.get_inputs()
    assert (arg.name, arg.shape, arg.type) == (ref.name, ref.shape, ref.type) == ("x", ["batch", 4], "tensor(float)")
    outputs = sess.get_outputs()
    assert [(o.name, o.shape, o.type) for o in outputs] == [
        ("logits", ["batch", 3], "tensor(float)"), ("predictions", ["batch"], "tensor(int64)"),
        ("exit_index", ["batch"], "tensor(int64)"), ("scores", ["batch"], "tensor(double)")]
    result = sess.run(X)
    for o in outputs:   # every output named as the result field that holds it
        assert getattr(result, o.name).shape[0] == len(X)
    as_ort = sess.run(None, {"x": X})   # onnxruntime's call shape
    np.testing.assert_array_equal(as_ort.logits, result.logits)
    np.testing.assert_array_equal(as_ort.exit_index, result.exit_index)
    with pytest.raises(InputError, match=r"call run\(feed\) or run\(None, feed\)"):
        sess.run(["logits"], {"x": X})
    with pytest.raises(InputError, match="run needs the inputs"):
        sess.run(None)
    assert result.logits.dtype == np.float32 and result.exit_index.dtype == np.int64
    assert result.scores.dtype == np.float64
    assert sess.get_providers() == stage0.get_providers() == ["CPUExecutionProvider"]


def test_model_metadata(tiny_package):
    meta = ExitSession(tiny_package).get_modelmeta()
    assert meta.producer_name == "edgeexit" and meta.graph_name == "Tiny" and meta.version == 1
    custom = meta.custom_metadata_map
    assert custom["policies"] == "entropy,entropy" and custom["thresholds"] == "[0.5]" and custom["exits"] == "2"
    assert custom["labels"] == '["a", "b", "c"]' and custom["exits_disabled"] == "false"
    assert all(isinstance(v, str) for v in custom.values())   # as in onnxruntime's map


def test_labels_on_the_session_and_by_name_on_the_result(tiny_package):
    sess = ExitSession(tiny_package)
    assert sess.labels == ("a", "b", "c")
    for batch in (X[:1], X):   # the batch-1 fast path and the checked path
        result = sess.run(batch)
        assert result.labels == [("a", "b", "c")[i] for i in result.predictions]


def test_sess_options_apply_to_every_session(tiny_package):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ExitSession(tiny_package, sess_options=options)
    assert sess.thread_settings.threads == 1
    assert all(s.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
               for s in sess._stages)
    want = ExitSession(tiny_package).run(X)
    got = sess.run(X)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6)
    with pytest.raises(InputError, match="sess_options= sets the threads itself"):
        ExitSession(tiny_package, sess_options=options, threads=2)


def test_close_and_with(tiny_package):
    with ExitSession(tiny_package) as sess:
        assert sess.run(X[:1]).exit_index.shape == (1,)
    with pytest.raises(SessionError, match="was closed"):
        sess.run(X[:1])
    sess.close()   # twice is fine


def test_one_session_shared_by_threads_gives_the_serial_results(tiny_package):
    sess = ExitSession(tiny_package)
    chunks = [X[i:i + k] for i in range(0, 16, 4) for k in (1, 3)]
    serial = [sess.run(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(sess.run, chunks * 8))
    for want, got in zip(serial * 8, threaded):
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        np.testing.assert_array_equal(got.logits, want.logits)


# --- packed packages: one file, or bytes in memory ----------------------------------------------


def test_a_packed_package_runs_from_its_file_or_its_bytes(tiny_package, tmp_path):
    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.package import load_package, pack_package

    packed = tmp_path / "tiny.eexit.zip"
    result = CliRunner().invoke(cli, ["pack", str(tiny_package), "-o", str(packed)])
    assert result.exit_code == 0 and "2 files verified" in result.output
    again = pack_package(tiny_package, tmp_path / "again.eexit.zip")
    assert again.read_bytes() == packed.read_bytes()            # the same package packs to the same bytes
    want = ExitSession(tiny_package).run(X)
    for source in (packed, packed.read_bytes()):
        got = ExitSession(source).run(X)
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        np.testing.assert_array_equal(got.logits, want.logits)
    package = load_package(packed.read_bytes())
    assert package.name == "Tiny" and sorted(package.blobs) == ["stage0.onnx", "stage1.onnx"]
    shown = CliRunner().invoke(cli, ["inspect", str(packed)])
    assert shown.exit_code == 0 and "stage0" in shown.output


def test_damaged_or_forged_archives_are_refused(tiny_package, tmp_path):
    import zipfile

    from edgeexit.errors import ArchiveError, FileIntegrityError
    from edgeexit.package import pack_package

    data = pack_package(tiny_package, tmp_path / "t.eexit.zip").read_bytes()
    with pytest.raises(ArchiveError, match="not a zip archive"):
        ExitSession(b"PK\x03\x04" + b"\x00" * 64)
    flipped = bytearray(data)
    at = data.index(b"MatMul")                        # inside stage0.onnx (stored uncompressed)
    flipped[at] ^= 0x01
    with pytest.raises(ArchiveError, match="damaged"):   # the zip's own CRC notices
        ExitSession(bytes(flipped))
    forged = tmp_path / "forged.eexit.zip"           # a consistent zip whose stage differs from the manifest
    stage0 = bytearray((tiny_package / "stage0.onnx").read_bytes())
    stage0[stage0.index(b"MatMul")] ^= 0x01
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("manifest.json", (tiny_package / "manifest.json").read_bytes())
        archive.writestr("stage0.onnx", bytes(stage0))
        archive.writestr("stage1.onnx", (tiny_package / "stage1.onnx").read_bytes())
    with pytest.raises(FileIntegrityError, match="sha256"):
        ExitSession(forged)
    twice = tmp_path / "twice.eexit.zip"
    with zipfile.ZipFile(twice, "w") as archive, pytest.warns(UserWarning):
        archive.writestr("manifest.json", (tiny_package / "manifest.json").read_bytes())
        archive.writestr("stage0.onnx", b"x")
        archive.writestr("stage0.onnx", b"y")
    with pytest.raises(ArchiveError, match="twice"):
        ExitSession(twice)


def test_per_call_thresholds_are_checked_every_time_and_answer_like_a_fresh_session(tiny_package):
    """A per-call override's plan is built once and reused; reuse must not change answers or skip checks."""
    sess = ExitSession(tiny_package)
    for thresholds in ([0.3], [0.9], [0.3], [None], [0.3]):
        got = sess.run(X, thresholds=thresholds, engine="stages")
        fresh = ExitSession(tiny_package).run(X, thresholds=thresholds, engine="stages")
        np.testing.assert_array_equal(got.exit_index, fresh.exit_index)
        np.testing.assert_array_equal(got.logits, fresh.logits)
    with pytest.raises(ThresholdError):
        sess.run(X, thresholds=[0.3, 0.3])          # one early exit: one threshold
    with pytest.raises(ThresholdError):
        sess.run(X, thresholds=[float("nan")])
    by_array = sess.run(X, thresholds=np.array([0.3])).exit_index
    np.testing.assert_array_equal(by_array, sess.run(X, thresholds=[0.3]).exit_index)


def test_measure_is_per_thread_and_holds_under_concurrency(tiny_package):
    """8 threads, each in its own measure() block, each making its own number of calls at once:
    every block counts exactly its thread's calls and samples, and the estimate never fails."""
    import threading

    from edgeexit.devices.energy import EstimateMeter

    sess = ExitSession(tiny_package)
    barrier = threading.Barrier(8)
    results: dict[int, tuple[int, int, float, float]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            with sess.measure(EstimateMeter(20.0, 5.0, source="test figures")) as m:
                for _ in range(5 + 3 * t):
                    sess.run(X[: t + 1])
            results[t] = (m.calls, m.samples, m.inference_ms, m.latency_ms)
            assert m.energy_kind == "estimated" and m.energy_j > 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t, (calls, samples, inference_ms, latency_ms) in results.items():
        assert calls == 5 + 3 * t and samples == calls * (t + 1)
        assert 0 < inference_ms <= latency_ms
    with sess.measure() as outer:
        with pytest.raises(SessionError, match="nested in one thread"):
            with sess.measure():
                pass
        sess.run(X)
    assert outer.calls == 1 and outer.samples == len(X)
