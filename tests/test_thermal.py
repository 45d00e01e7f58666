"""Throttle detection against fake thermal zones and fake ``vcgencmd get_throttled`` output."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeexit.devices import thermal
from edgeexit.devices.thermal import THROTTLE_BITS, ThrottleMonitor, decode_throttled, parse_throttled


class StepClock:
    """Advances 0.01 s per call; ``on_call[n]`` runs before the n-th call returns."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0
        self.on_call: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
            self.now += 0.01
            if hook := self.on_call.get(self.calls):
                hook()
            return self.now


@pytest.fixture(autouse=True)
def no_sampler_threads_left() -> Iterator[None]:
    yield
    assert [t for t in threading.enumerate() if t.name == "edgeexit-sampler"] == []


def make_zones(root: Path) -> Path:
    """thermal_zone0: cpu-thermal at 45 °C, passive trip 80 °C; thermal_zone1: gpu at 40 °C, no passive trip."""
    zone0 = root / "thermal_zone0"
    zone0.mkdir(parents=True)
    (zone0 / "type").write_text("cpu-thermal\n")
    (zone0 / "temp").write_text("45000\n")
    (zone0 / "trip_point_0_type").write_text("passive\n")
    (zone0 / "trip_point_0_temp").write_text("80000\n")
    (zone0 / "trip_point_1_type").write_text("critical\n")
    (zone0 / "trip_point_1_temp").write_text("90000\n")
    zone1 = root / "thermal_zone1"
    zone1.mkdir()
    (zone1 / "type").write_text("gpu-thermal\n")
    (zone1 / "temp").write_text("40000\n")
    (zone1 / "trip_point_0_type").write_text("hot\n")
    (zone1 / "trip_point_0_temp").write_text("30000\n")
    (root / "cooling_device0").mkdir()
    return root


def throttled_runner(*values: int) -> Callable[[object], str]:
    outputs = iter(values)

    def run(argv: object) -> str:
        assert tuple(argv) == ("vcgencmd", "get_throttled")  # type: ignore[arg-type]
        return f"throttled={next(outputs):#x}\n"

    return run


# --- decode_throttled ------------------------------------------------------------------------


@pytest.mark.parametrize("bit", sorted(THROTTLE_BITS))
def test_decode_each_known_bit(bit: int) -> None:
    assert decode_throttled(1 << bit) == [THROTTLE_BITS[bit]]


def test_decode_the_documented_bits() -> None:
    assert THROTTLE_BITS == {
        0: "under-voltage detected",
        1: "arm frequency capped",
        2: "currently throttled",
        3: "soft temperature limit active",
        16: "under-voltage has occurred",
        17: "arm frequency capping has occurred",
        18: "throttling has occurred",
        19: "soft temperature limit has occurred",
    }


def test_decode_combinations_and_unknown_bits() -> None:
    assert decode_throttled(0) == []
    assert decode_throttled(0x50005) == [
        "under-voltage detected", "currently throttled", "under-voltage has occurred", "throttling has occurred",
    ]
    assert decode_throttled(1 << 4 | 1) == ["under-voltage detected", "unknown bit 4"]
    with pytest.raises(ValueError, match="unsigned"):
        decode_throttled(-1)


@pytest.mark.parametrize(
    ("text", "value"),
    [("throttled=0x50005\n", 0x50005), ("throttled=0x0", 0), ("throttled=7", 7), ("error=2", None), ("", None)],
)
def test_parse_throttled(text: str, value: int | None) -> None:
    assert parse_throttled(text) == value


# --- ThrottleMonitor ---------------------------------------------------------------------------


def test_quiet_window_is_not_throttled(tmp_path: Path) -> None:
    monitor = ThrottleMonitor(make_zones(tmp_path), run_command=throttled_runner(0, 0), interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert not report.throttled and report.reasons == []
    assert report.max_temp_c == pytest.approx(45.0)
    assert report.get_throttled == (0, 0)
    assert report.zones == {
        "thermal_zone0": {"type": "cpu-thermal", "start_c": 45.0, "stop_c": 45.0, "max_c": 45.0,
                          "passive_trip_c": 80.0},
        "thermal_zone1": {"type": "gpu-thermal", "start_c": 40.0, "stop_c": 40.0, "max_c": 40.0,
                          "passive_trip_c": None},
    }
    assert "2 thermal zone(s)" in report.note


def test_zone_that_reaches_its_passive_trip_point(tmp_path: Path) -> None:
    root = make_zones(tmp_path)
    monitor = ThrottleMonitor(root, run_command=throttled_runner(0, 0), interval_s=None)
    monitor.start()
    (root / "thermal_zone0" / "temp").write_text("82500\n")
    report = monitor.stop()
    assert report.throttled
    assert report.reasons == [
        "thermal_zone0 (cpu-thermal) reached 82.5 °C, at or above its passive trip point 80.0 °C"
    ]
    assert report.max_temp_c == pytest.approx(82.5)


def test_sampling_catches_a_peak_between_start_and_stop(tmp_path: Path) -> None:
    root = make_zones(tmp_path)
    temp = root / "thermal_zone0" / "temp"
    clock = StepClock()
    clock.on_call = {2: lambda: temp.write_text("85000\n"), 3: lambda: temp.write_text("45000\n")}
    monitor = ThrottleMonitor(root, run_command=throttled_runner(0, 0), interval_s=0.005, clock=clock)
    with monitor:
        while clock.calls < 3:
            threading.Event().wait(0.005)
    report = monitor.report
    assert report is not None and report.throttled
    assert report.zones["thermal_zone0"]["max_c"] == pytest.approx(85.0)
    assert report.zones["thermal_zone0"]["stop_c"] == pytest.approx(45.0)


@pytest.mark.parametrize(
    ("start", "stop", "throttled", "reasons"),
    [
        (0x0, 0x0, False, []),
        (0x0, 0x50005, True, [
            "vcgencmd: under-voltage detected (at stop)",
            "vcgencmd: currently throttled (at stop)",
            "vcgencmd: under-voltage has occurred during the window",
            "vcgencmd: throttling has occurred during the window",
        ]),
        (0x50000, 0x50000, False, []),  # sticky bits from before the window
        (0x40004, 0x40000, True, ["vcgencmd: currently throttled (at start)"]),
        (0x8, 0x8, True, ["vcgencmd: soft temperature limit active (at start and stop)"]),
        (0x20000, 0xA0000, True, ["vcgencmd: soft temperature limit has occurred during the window"]),
        (0x0, 0x2, True, ["vcgencmd: arm frequency capped (at stop)"]),
    ],
)
def test_get_throttled_transitions(tmp_path: Path, start: int, stop: int, throttled: bool, reasons: list[str]) -> None:
    monitor = ThrottleMonitor(tmp_path, run_command=throttled_runner(start, stop), interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert report.throttled is throttled
    assert report.reasons == reasons
    assert report.get_throttled == (start, stop)
    assert report.max_temp_c is None


def test_sticky_bits_from_before_the_window_are_noted(tmp_path: Path) -> None:
    monitor = ThrottleMonitor(tmp_path, run_command=throttled_runner(0x50000, 0x50000), interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert "already set before the window (since boot): under-voltage has occurred, throttling has occurred" in (
        report.note
    )


def test_nothing_to_check_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thermal.shutil, "which", lambda name: None)
    monitor = ThrottleMonitor(tmp_path / "absent", interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert not report.throttled and report.max_temp_c is None and report.get_throttled is None
    assert "throttling could not be checked" in report.note


def test_failing_or_odd_vcgencmd_is_noted_not_raised(tmp_path: Path) -> None:
    def fails(argv: object) -> str:
        raise FileNotFoundError(2, "No such file or directory", "vcgencmd")

    monitor = ThrottleMonitor(make_zones(tmp_path), run_command=fails, interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert report.get_throttled is None and "`vcgencmd get_throttled` failed" in report.note
    monitor = ThrottleMonitor(tmp_path, run_command=lambda argv: "error=2 error_msg=...\n", interval_s=None)
    monitor.start()
    assert "printed no throttled=0x" in monitor.stop().note


def test_malformed_zone_is_skipped(tmp_path: Path) -> None:
    root = make_zones(tmp_path)
    (root / "thermal_zone1" / "temp").write_text("hot\n")
    (root / "thermal_zone0" / "trip_point_0_temp").write_text("?\n")
    monitor = ThrottleMonitor(root, run_command=throttled_runner(0, 0), interval_s=None)
    monitor.start()
    report = monitor.stop()
    assert report.zones["thermal_zone1"]["max_c"] is None
    assert report.zones["thermal_zone0"]["passive_trip_c"] is None
    assert report.max_temp_c == pytest.approx(45.0)


def test_monitor_order_and_error_handling(tmp_path: Path) -> None:
    monitor = ThrottleMonitor(make_zones(tmp_path), run_command=throttled_runner(0, 0, 0), interval_s=0.005)
    with pytest.raises(RuntimeError, match="before start"):
        monitor.stop()
    with pytest.raises(ZeroDivisionError), monitor:
        1 / 0  # noqa: B018
    assert monitor.report is None  # no report; the autouse fixture checks the thread was joined
    monitor.start()  # usable again after the failed window
    assert not monitor.stop().throttled
