"""Offloading (issue 22): the wire format, the split stage loop, and a real Ray Serve on 127.0.0.1.

One Ray (2 CPUs) and one Serve deployment serve the whole module; the test that stops the server
runs last.  The package is ``_models.tiny_model()`` with thresholds that send about a quarter of
the samples out at the device's exit (stage 0) and the rest to the server (stages 2 and 3).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeexit.errors import InputError, MessageTooLargeError, OffloadError, WireFormatError
from edgeexit.runtime import ExitSession, wire
from edgeexit.runtime.offload import PACKAGE_HEADER, STAGE_HEADER, Offload, OffloadSession, manifest_sha256

torch = pytest.importorskip("torch")
_models = pytest.importorskip("_models")

# ray's own imports raise pydantic's and its own deprecation notices
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydantic.*", "ignore::DeprecationWarning:ray.*")

K = 2            # the server runs stages 2 and 3 (exits 1 and 2); the device stages 0 and 1 (exit 0)
TOKEN = "test-token-0123456789"
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from edgeexit.export import export_package

    model = _models.tiny_model()
    x = _models.tiny_inputs(64, seed=3)
    thresholds = _models.safe_thresholds(model, x, "entropy", [0.3, 0.5])
    path = tmp_path_factory.mktemp("offload") / "tiny.eexit"
    export_package(model, {"x": torch.from_numpy(_models.tiny_inputs(4))}, path, thresholds=thresholds, log=None)
    return path


@pytest.fixture(scope="module")
def x():
    return _models.tiny_inputs(64, seed=3)


@pytest.fixture(scope="module")
def local(package):
    """The stage loop on the device: what every offloaded answer must equal."""
    with ExitSession(package, engine="stages") as session:
        yield session


@pytest.fixture(scope="module")
def reference(local, x):
    result = local.run(x)
    counts = np.bincount(result.exit_index, minlength=3)
    assert counts[0] > 0 and counts[1:].sum() > 0, counts   # some leave on the device, some go on
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(package):
    pytest.importorskip("ray")
    from edgeexit import serve

    url = serve.start(package, K, TOKEN, max_batch=8, batch_wait_ms=20, port=_free_port(), num_cpus=2,
                      max_bytes=MAX_BODY)
    deadline = time.monotonic() + 60
    while True:   # the proxy answers once the replica is up
        try:
            if _get(url, "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    yield url
    serve.stop()


def _get(url: str, route: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(url + route, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace"), dict(response.getheaders())
    finally:
        conn.close()


def _same(got, want, rows=slice(None)):
    """Logits, exits and predictions bit for bit, and the stage loop's (batch) scores."""
    np.testing.assert_array_equal(got.logits, want.logits[rows])
    np.testing.assert_array_equal(got.exit_index, want.exit_index[rows])
    np.testing.assert_array_equal(got.predictions, want.predictions[rows])
    np.testing.assert_array_equal(got.scores, want.scores[rows])


# --- without a server ------------------------------------------------------------------


def test_the_wire_format_round_trips_every_allowed_dtype():
    rng = np.random.default_rng(0)
    tensors = {dt: (rng.standard_normal((3, 2)) * 10).astype(dt) for dt in wire.DTYPES if dt != "bool"}
    tensors["bool"] = rng.integers(0, 2, (2, 5)).astype(bool)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["big-endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    back, meta = wire.decode(wire.encode(tensors, {"k": 1}))
    assert meta == {"k": 1} and list(back) == list(tensors)
    for name, array in tensors.items():
        assert back[name].shape == array.shape and np.array_equal(back[name], array)
        assert back[name].dtype == array.dtype.newbyteorder("=")


@pytest.mark.parametrize(("mangle", "words"), [
    (lambda b: b[:-3], "cut short"),
    (lambda b: b + b"\0", "after its last tensor"),
    (lambda b: b[:2], "shorter than its 4-byte"),
    (lambda b: (70000).to_bytes(4, "little") + b[4:], "over the limit"),
    (lambda b: (len(b)).to_bytes(4, "little") + b[4:], "ends inside its header"),
    (lambda b: _header(b, lambda h: h["tensors"][0].update(dtype="object")), "'object' is not allowed"),
    (lambda b: _header(b, lambda h: h["tensors"][0].update(dtype="<U4")), "is not allowed"),
    (lambda b: _header(b, lambda h: h["tensors"][0].update(shape=[2, -3])), "must be a list"),
    (lambda b: _header(b, lambda h: h["tensors"][0].update(shape=[2.0, 3])), "must be a list"),
    (lambda b: _header(b, lambda h: h["tensors"].append(dict(h["tensors"][0]))), "appears twice"),
    (lambda b: _header(b, lambda h: h.update(extra=1)), "nothing else"),
    (lambda b: _header(b, lambda h: h.update(meta={"a": [1]})), "flat object"),
    (lambda b: (9).to_bytes(4, "little") + b"not json!" + b[4:], "not UTF-8 JSON"),
    (lambda b: (len(b"\x80\x81")).to_bytes(4, "little") + b"\x80\x81", "not UTF-8 JSON"),
])
def test_malformed_messages_are_refused_typed_with_a_reason(mangle, words):
    good = wire.encode({"a": np.ones((2, 3), np.float32)})
    with pytest.raises(WireFormatError, match=words.replace("(", r"\(")) as info:
        wire.decode(mangle(good))
    assert isinstance(info.value, InputError)


def _header(message: bytes, change) -> bytes:
    size = int.from_bytes(message[:4], "little")
    header = json.loads(message[4:4 + size])
    change(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "little") + raw + message[4 + size:]


def test_bool_bytes_other_than_0_and_1_and_oversized_messages_are_refused():
    message = bytearray(wire.encode({"m": np.array([True, False, True])}))
    message[-2] = 7
    with pytest.raises(WireFormatError, match="other than 0 and 1"):
        wire.decode(bytes(message))
    with pytest.raises(MessageTooLargeError, match="over the limit of 100"):
        wire.decode(wire.encode({"a": np.ones(100, np.float32)}), max_bytes=100)
    with pytest.raises(WireFormatError, match="cannot hold"):
        wire.encode({"a": np.array(["text"])})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_split_stage_loop_answers_like_the_whole_one(local, reference, x, k):
    head = local.run_stages(x, stop=k)
    tail = local.run_stages(wire.decode(wire.encode(head.carry))[0], first=k)
    assert sorted([*head.done, *head.rest[tail.done]]) == list(range(len(x)))   # each sample once
    logits, exits, scores = np.empty_like(reference.logits), np.empty(len(x), np.int64), np.empty(len(x))
    for rows, part in ((head.done, head), (head.rest[tail.done], tail)):
        logits[rows], exits[rows], scores[rows] = part.logits, part.exit_index, part.scores
    assert np.array_equal(logits, reference.logits) and np.array_equal(exits, reference.exit_index)
    assert np.array_equal(scores, reference.scores)


def test_a_carry_that_does_not_fit_stage_k_is_refused_typed(local, x):
    carry = local.run_stages(x[:4], stop=K).carry
    with pytest.raises(InputError, match="carry must be exactly"):
        local.run_stages({"carry1_0": carry["carry1_0"]}, first=K)
    with pytest.raises(InputError, match="expected float32, got float64"):
        local.run_stages({**carry, "carry1_1": carry["carry1_1"].astype(np.float64)}, first=K)
    with pytest.raises(InputError, match="expected shape"):
        local.run_stages({**carry, "carry1_0": carry["carry1_0"][:, :3]}, first=K)
    with pytest.raises(InputError, match="0 <= first < stop <= 4"):
        local.run_stages(x, first=4)


def test_the_runtime_side_of_offloading_never_imports_ray():
    code = ("import sys, edgeexit.runtime.offload, edgeexit.runtime.wire; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'onnx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unreachable_server_falls_back_or_fails_typed_within_its_timeout(package, reference, x):
    url = f"http://127.0.0.1:{_free_port()}"   # nothing listens there
    offload = Offload(url, from_stage=K, token=TOKEN, timeout_s=1.0, retries=1)
    client = OffloadSession(package, offload)
    result = client.run(x)
    _same(result, reference)
    went_on = reference.exit_index > 0
    assert (result.where == np.where(went_on, "local", "device")).all()
    assert result.attempts == 2 and "unreachable" in result.error
    strict = OffloadSession(package, Offload(url, from_stage=K, token=TOKEN, timeout_s=1.0, retries=0,
                                             fallback=False))
    with pytest.raises(OffloadError, match="unreachable"):
        strict.run(x)


def test_a_server_that_never_answers_costs_at_most_the_timeout_per_attempt(package, reference, x):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)   # accepts connections (the kernel does), never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = OffloadSession(package, Offload(url, from_stage=K, token=TOKEN, timeout_s=0.5, retries=1))
        t0 = time.perf_counter()
        result = client.run(x)
        assert time.perf_counter() - t0 < 2 * 0.5 + 1.0
        _same(result, reference)
        assert result.attempts == 2 and "timed out" in result.error
    finally:
        listener.close()


# --- a real Ray Serve on 127.0.0.1 ---------------------------------------------------------


def test_health_and_metadata_say_the_package_the_stages_and_the_carry(server, package, local):
    status, body = _get(server, "/health")
    digest = manifest_sha256(package, local.package)
    assert status == 200 and json.loads(body) == {"status": "ok", "package": digest, "from_stage": K}
    meta = json.loads(_get(server, "/metadata")[1])
    assert meta["package"] == digest and meta["stages"] == ["stage2", "stage3"] and meta["exits"] == [1, 2]
    assert meta["carry"] == [{"name": "carry1_0", "dtype": "float32", "shape": ["batch", 6, 8, 8]},
                             {"name": "carry1_1", "dtype": "float32", "shape": ["batch", 6]}]
    assert _get(server, "/health", token=None)[0] == 401 and _get(server, "/metadata", token="nope")[0] == 401


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def test_rays_own_ports_listen_on_loopback_only(server):
    """The GCS, the raylet, the workers and the dashboard agent; no dashboard at all.  Ray Serve's
    replica gRPC port is bound to every interface by Ray itself (docs/OFFLOAD.md, "Ports")."""
    psutil = pytest.importorskip("psutil")
    outside = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.pid or _loopback(conn.laddr.ip):
            continue
        try:
            name = " ".join(psutil.Process(conn.pid).cmdline())[:200]
        except psutil.Error:
            continue
        if ("ray" in name or "gcs_server" in name) and "ServeReplica" not in name:
            outside.append((conn.laddr, name))
    assert not outside, outside


def test_offloaded_answers_equal_local_ones_bit_for_bit(server, package, local, reference, x):
    client = OffloadSession(package, Offload(server, from_stage=K, token=TOKEN, timeout_s=10))
    for i in range(16):   # batch 1: logits, exits and predictions as run() gives them at batch 1
        got, one = client.run(x[i:i + 1]), local.run(x[i:i + 1])
        for field in ("logits", "exit_index", "predictions"):
            np.testing.assert_array_equal(getattr(got, field), getattr(one, field))
        np.testing.assert_array_equal(got.scores, reference.scores[i:i + 1])   # the stage loop's batch scores
        np.testing.assert_allclose(got.scores, one.scores, rtol=1e-14)          # run() scores one row in Python
        assert got.where[0] == ("device" if reference.exit_index[i] == 0 else "server"), got.error
    for rows in (slice(0, 7), slice(7, 64), slice(None)):
        got = client.run(x[rows])
        _same(got, reference, rows)
        went_on = reference.exit_index[rows] > 0
        assert (got.where == np.where(went_on, "server", "device")).all()
        assert got.bytes_sent > 0 and got.bytes_received > 0 and got.network_ms > 0 and got.error is None
        assert got.bytes_sent == len(wire.encode({n: np.zeros((int(went_on.sum()), *s), np.float32)
                                                  for n, s in (("carry1_0", (6, 8, 8)), ("carry1_1", (6,)))},
                                                 {"from_stage": K}))
        assert got.labels == [str(i) for i in got.predictions] or got.labels is None


def test_an_exit_session_with_offload_runs_the_later_stages_on_the_server(server, package, reference, x):
    offload = Offload(server, from_stage=K, token=TOKEN, timeout_s=10)
    with ExitSession(package, engine="stages", offload=offload) as session:
        got = session.run(x)
        _same(got, reference, slice(None))
        assert (got.where == np.where(reference.exit_index > 0, "server", "device")).all() and got.error is None
        mine = session.run(x, engine="stages")   # a per-call override runs here, all of it
        assert not hasattr(mine, "where")
        np.testing.assert_array_equal(mine.predictions, reference.predictions)


def test_concurrent_devices_are_answered_correctly_and_batched(server, package, reference, x):
    client = OffloadSession(package, Offload(server, from_stage=K, token=TOKEN, timeout_s=20))
    rng = np.random.default_rng(7)
    jobs = [sorted(rng.choice(64, size=int(rng.integers(1, 5)), replace=False).tolist()) for _ in range(8 * 40)]

    def device(job: list[int]):
        return job, client.run(x[job])

    with ThreadPoolExecutor(8) as pool:   # 8 devices, 320 requests
        answers = list(pool.map(device, jobs))
    batches = []
    for job, got in answers:
        _same(got, reference, job)
        assert "local" not in set(got.where), got.error
        if got.server_batch is not None:
            batches.append(got.server_batch)
    seen = json.loads(_get(server, "/metadata")[1])["batches"]
    assert max(batches) > 1 and max(int(b) for b in seen) > 1, (batches, seen)


@pytest.mark.parametrize("case", ["no token", "wrong token", "wrong package", "wrong stage", "wrong dtype",
                                  "wrong shape", "wrong name", "missing tensor", "truncated", "not a message",
                                  "oversized"])
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_keeps_serving(server, package, local, reference, x,
                                                                           case):
    carry = local.run_stages(x[:8], stop=K).carry
    headers = {"Authorization": f"Bearer {TOKEN}", PACKAGE_HEADER: manifest_sha256(package, local.package),
               STAGE_HEADER: str(K), "Content-Type": wire.CONTENT_TYPE}
    body = wire.encode(carry)
    expect, words = 400, ""
    if case == "no token":
        del headers["Authorization"]
        expect, words = 401, "bearer token"
    elif case == "wrong token":
        headers["Authorization"] = "Bearer " + TOKEN[:-1] + "x"
        expect, words = 401, "bearer token"
    elif case == "wrong package":
        headers[PACKAGE_HEADER] = "0" * 64
        expect, words = 409, "runs package"
    elif case == "wrong stage":
        headers[STAGE_HEADER] = "1"
        expect, words = 409, "runs stages from 2"
    elif case == "wrong dtype":
        body, words = wire.encode({**carry, "carry1_1": carry["carry1_1"].astype(np.float64)}), "expected float32"
    elif case == "wrong shape":
        body, words = wire.encode({**carry, "carry1_0": carry["carry1_0"][:, :, :4]}), "expected shape"
    elif case == "wrong name":
        body, words = wire.encode({"carry1_0": carry["carry1_0"], "c": carry["carry1_1"]}), "carry must be exactly"
    elif case == "missing tensor":
        body, words = wire.encode({"carry1_0": carry["carry1_0"]}), "missing ['carry1_1']"
    elif case == "truncated":
        body, words = body[:-10], "cut short"
    elif case == "not a message":
        body, words = b"\x05\x00\x00\x00hello", "not UTF-8 JSON"
    elif case == "oversized":
        body = wire.encode({**carry, "carry1_0": np.zeros((MAX_BODY // 1536 + 1, 6, 8, 8), np.float32)})
        expect, words = 413, "over the limit"
    status, text, _ = _post(server, body, headers)
    assert status == expect and words in text, (status, text)
    client = OffloadSession(package, Offload(server, from_stage=K, token=TOKEN, timeout_s=10))
    got = client.run(x[:8])   # still serving
    _same(got, reference, slice(0, 8))
    assert "local" not in set(got.where)


def test_a_device_refused_by_the_server_falls_back_and_says_why(server, package, reference, x):
    refused = OffloadSession(package, Offload(server, from_stage=K, token="wrong", timeout_s=10, retries=3))
    got = refused.run(x)
    _same(got, reference)
    assert got.attempts == 1 and "401" in got.error and set(got.where[reference.exit_index > 0]) == {"local"}
    with pytest.raises(OffloadError, match="401"):
        OffloadSession(package, Offload(server, from_stage=K, token="wrong", fallback=False)).run(x)


def test_stopping_the_server_mid_run_loses_and_duplicates_nothing(server, package, reference, x):
    """Runs last: it stops the server.  Devices keep calling while it goes away."""
    from edgeexit import serve

    client = OffloadSession(package, Offload(server, from_stage=K, token=TOKEN, timeout_s=3, retries=0))
    stop, answers, failures = threading.Event(), [], []

    def device(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set() or len(answers) < 40:
            job = sorted(rng.choice(64, size=int(rng.integers(1, 6)), replace=False).tolist())
            try:
                answers.append((job, client.run(x[job])))
            except Exception as exc:   # any failure at all is the test's failure
                failures.append(exc)
                return
            if len(answers) > 400:
                return

    threads = [threading.Thread(target=device, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    while len(answers) < 20:
        time.sleep(0.05)
    serve.stop(shutdown_ray=False)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    places = set()
    for job, got in answers:
        _same(got, reference, job)                 # every sample answered, once, in its place, correctly
        assert len(got.where) == len(job)
        places |= set(got.where)
    assert {"server", "local"} <= places, places
    strict = OffloadSession(package, Offload(server, from_stage=K, token=TOKEN, timeout_s=1, fallback=False))
    t0 = time.perf_counter()
    with pytest.raises(OffloadError):
        strict.run(x)
    assert time.perf_counter() - t0 < 2 * 1 + 1.5


def test_the_serve_command_refuses_a_missing_token_or_split_before_starting_ray(package, tmp_path):
    from click.testing import CliRunner

    from edgeexit.cli import cli

    empty = tmp_path / "token"
    empty.write_text("")
    result = CliRunner().invoke(cli, ["serve", str(package), "--from-stage", "2", "--token-file", str(empty)])
    assert result.exit_code == 2 and "token file" in result.output and "is empty" in result.output
    empty.write_text("secret\n")
    result = CliRunner().invoke(cli, ["serve", str(package), "--from-stage", "4", "--token-file", str(empty)])
    assert result.exit_code == 2 and "1 <= K <= 3" in result.output
    result = CliRunner().invoke(cli, ["serve", str(package), "--from-stage", "2", "--token-file",
                                      str(tmp_path / "missing")])
    assert result.exit_code == 2 and "cannot read the token file" in result.output
