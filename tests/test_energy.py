"""Energy meters against fake sysfs trees, fake command output and a fake NVML module.

The fakes stand in for hardware this machine lacks; the meters' own discovery, parsing,
sampling and integration code runs unchanged.  Sampled meters get a fake clock, so
integrals are exact (the trapezoid rule is exact for constant and linear power) however
many samples the thread happens to take.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeexit.devices.energy import (
    EnergyMeter,
    EnergyMeterError,
    EnergyMeterWarning,
    EnergyReading,
    EstimateMeter,
    ExternalMeter,
    JetsonMeter,
    NvmlMeter,
    PeriodicSampler,
    RaplMeter,
    Rpi5Meter,
    UnknownMeterError,
    create_meter,
    detect_meters,
    get_meter,
    integrate_power,
    list_meters,
    measure_idle,
    parse_pmic_adc,
    read_power_log,
    register_meter,
)
from edgeexit.devices.meters import registry
from edgeexit.errors import EdgeExitError

# Each registered meter must appear here and have tests named test_<name>_*.
EXERCISED = {"rapl", "nvml", "jetson", "rpi5", "external", "estimate"}
WINDOW_S = 0.05
FAST = 0.005
trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --- helpers ------------------------------------------------------------------------------


class FakeClock:
    """Advances ``step`` seconds per call; ``on_call[n]`` runs before the n-th call returns."""

    def __init__(self, start: float = 10.0, step: float = 0.01) -> None:
        self.now = start
        self.step = step
        self.calls = 0
        self.on_call: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
            self.now += self.step
            hook = self.on_call.get(self.calls)
            if hook is not None:
                hook()
            return self.now


def wait_for_calls(clock: FakeClock, n: int, timeout_s: float = 5.0) -> None:
    """Wait until the sampler thread has called the clock ``n`` times."""
    deadline = time.monotonic() + timeout_s
    while clock.calls < n:
        assert time.monotonic() < deadline, f"the sampler called the clock {clock.calls} < {n} times"
        time.sleep(FAST)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_sampler_threads_left() -> Iterator[None]:
    yield
    alive = [t.name for t in threading.enumerate() if t.name == "edgeexit-sampler"]
    assert alive == [], "a sampler thread was not joined"


@pytest.fixture
def deny_read(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """``deny(path)``: reading ``path`` raises PermissionError, as for a non-root user.

    Tests run as root, where ``chmod 000`` does not stop reads, so the denial is made here.
    """
    denied: set[Path] = set()
    original = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    return denied.add


# --- integrate_power -----------------------------------------------------------------------


def test_integrate_power_constant_over_a_clipped_window() -> None:
    assert integrate_power([0, 1, 2, 3], [4, 4, 4, 4], 0.5, 2.5) == pytest.approx(8.0)


def test_integrate_power_matches_numpy_over_the_sample_span() -> None:
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.001, 0.1, size=200))
    watts = rng.uniform(1.0, 20.0, size=200)
    expected = trapezoid(watts, times)
    assert integrate_power(times, watts, times[0], times[-1]) == pytest.approx(expected, rel=1e-12)


def test_integrate_power_interpolates_the_edges_by_hand() -> None:
    # power 3 W at 100.5 (between 1 and 5), 5 W at 102.5 (between 2 and 8):
    # 0.5*(3+5)/2 + 1*(5+2)/2 + 0.5*(2+5)/2 = 2 + 3.5 + 1.75
    assert integrate_power([100, 101, 102, 103], [1, 5, 2, 8], 100.5, 102.5) == pytest.approx(7.25)


def test_integrate_power_of_a_ramp_is_exact_inside_one_interval() -> None:
    assert integrate_power([0.0, 10.0], [0.0, 10.0], 2.0, 4.0) == pytest.approx(6.0)  # ∫ t dt from 2 to 4


def test_integrate_power_of_an_empty_window_is_zero() -> None:
    assert integrate_power([0.0, 1.0], [5.0, 5.0], 0.5, 0.5) == 0.0


@pytest.mark.parametrize(
    ("times", "watts", "t0", "t1", "match"),
    [
        ([0, 1], [1, 1], -0.1, 1.0, "cover"),
        ([0, 1], [1, 1], 0.0, 1.1, "cover"),
        ([0, 1], [1, 1], 1.0, 0.5, "after its end"),
        ([1, 0], [1, 1], 0.0, 1.0, "non-decreasing"),
        ([0, 1, 2], [1, 1], 0.0, 1.0, "equally long"),
        ([0, 1], [1, np.nan], 0.0, 1.0, "finite"),
        ([], [], 0.0, 0.0, "non-empty"),
    ],
)
def test_integrate_power_refuses_bad_input(times: list, watts: list, t0: float, t1: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        integrate_power(times, watts, t0, t1)


# --- the sampler and the reading -------------------------------------------------------------


def test_sampler_samples_at_start_in_the_thread_and_at_stop() -> None:
    clock = FakeClock()
    sampler = PeriodicSampler(lambda: 2.0, interval_s=FAST, clock=clock)
    sampler.start()
    wait_for_calls(clock, 3)
    samples = sampler.stop()
    assert len(samples) == clock.calls >= 4
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)
    assert not sampler.running


def test_sampler_drops_failed_reads_and_keeps_the_first_error() -> None:
    values: Iterator[float | None] = iter([1.0, None])

    def read() -> float | None:
        value = next(values, 3.0)
        if value == 3.0 and not sampler.first_error:
            raise OSError("sensor gone")
        return value

    sampler = PeriodicSampler(read, interval_s=FAST)
    sampler.start()
    time.sleep(WINDOW_S)
    samples = sampler.stop()
    assert sampler.dropped >= 2  # the None and the OSError
    assert sampler.first_error == "OSError: sensor gone"
    assert samples[0][1] == 1.0


def test_sampler_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="> 0"):
        PeriodicSampler(lambda: 1.0, interval_s=0)


def test_reading_per_inference_and_summary() -> None:
    reading = EnergyReading(joules=12.0, seconds=4.0, kind="measured", source="rapl", interval_s=0.001, samples=2)
    assert reading.per_inference(100) == pytest.approx(0.12)
    assert reading.watts == pytest.approx(3.0)
    assert "measured" in reading.summary() and "rapl" in reading.summary()
    with pytest.raises(ValueError, match="positive"):
        reading.per_inference(0)


@pytest.mark.parametrize(("field", "value"), [("kind", "guessed"), ("joules", float("nan")), ("seconds", -1.0)])
def test_reading_validates_its_fields(field: str, value: object) -> None:
    fields = {"joules": 1.0, "seconds": 1.0, "kind": "measured", "source": "x", "interval_s": 0.1, "samples": 2}
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        EnergyReading(**fields)  # type: ignore[arg-type]


# --- registry ----------------------------------------------------------------------------


def test_every_registered_meter_is_exercised() -> None:
    assert set(list_meters()) == EXERCISED
    for name in list_meters():
        assert any(test.startswith(f"test_{name}_") for test in globals()), f"no test_{name}_* test"


def test_registry_lists_sorted_names_and_builds_meters() -> None:
    assert list_meters() == sorted(EXERCISED)
    assert get_meter("rapl") is RaplMeter
    meter = create_meter("estimate", busy_watts=5.0, source="test")
    assert isinstance(meter, EstimateMeter) and meter.kind == "estimated"


def test_registry_refuses_a_duplicate_name() -> None:
    class Impostor(RaplMeter):
        name = "rapl"

    with pytest.raises(EnergyMeterError, match="'rapl' is already registered"):
        register_meter(Impostor)
    assert get_meter("rapl") is RaplMeter


def test_registry_adds_a_new_meter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Constant(EstimateMeter):
        name = "constant"

    register_meter(Constant)
    assert "constant" in list_meters()


def test_unknown_meter_lists_names_and_suggests_the_nearest() -> None:
    with pytest.raises(UnknownMeterError) as info:
        get_meter("rapll")
    message = str(info.value)
    assert "unknown energy meter 'rapll'" in message
    assert "estimate, external, jetson, nvml, rapl, rpi5" in message
    assert "Did you mean 'rapl'?" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, EdgeExitError)


def test_detect_meters_probes_every_backend(tmp_path: Path) -> None:
    rapl_root = make_rapl_tree(tmp_path / "powercap")
    jetson_root = tmp_path / "drivers"
    write(jetson_root / "ina3221" / "1-0040" / "iio:device0" / "in_power0_input", "5000\n")
    log = write(tmp_path / "log.csv", "timestamp,watts\n1,2\n")
    found = detect_meters({
        "rapl": {"root": rapl_root},
        "jetson": {"root": jetson_root},
        "rpi5": {"run_command": lambda argv: PMIC_TEXT},
        "nvml": {"nvml": FakeNvml()},
        "external": {"csv_path": log},
    })
    assert [name for name, _, _ in found] == sorted(EXERCISED)
    assert all(ok for _, ok, _ in found), found


def test_detect_meters_reports_missing_hardware_without_raising(tmp_path: Path) -> None:
    found = dict((name, (ok, why)) for name, ok, why in detect_meters({
        "rapl": {"root": tmp_path}, "jetson": {"root": tmp_path}, "nvml": {"nvml": FakeNvml(init_fails=True)},
        "rpi5": {"run_command": missing_command},
    }))
    assert found["estimate"][0] is True
    for name in ("external", "jetson", "nvml", "rapl", "rpi5"):
        assert found[name][0] is False and found[name][1].startswith(name), found[name]


def test_detect_meters_refuses_an_unknown_name() -> None:
    with pytest.raises(UnknownMeterError, match="Did you mean 'jetson'"):
        detect_meters({"jetsn": {}})


# --- lifecycle (the base class, through the estimate meter) -------------------------------------


def test_estimate_stop_before_start_and_double_start_fail() -> None:
    meter = EstimateMeter(busy_watts=1.0, source="test")
    with pytest.raises(EnergyMeterError, match="before start"):
        meter.stop()
    meter.start()
    with pytest.raises(EnergyMeterError, match="twice"):
        meter.start()
    meter.stop()


def test_estimate_as_a_context_manager_keeps_the_reading() -> None:
    clock = iter([0.0, 3.0]).__next__
    with EstimateMeter(busy_watts=2.0, idle_watts=1.0, source="datasheet", clock=clock) as meter:
        pass
    assert meter.reading is not None
    assert meter.reading.joules == pytest.approx(6.0)
    assert meter.reading.seconds == pytest.approx(3.0)


# --- RAPL ------------------------------------------------------------------------------------

RAPL_MAX = 262_143_328_850


def make_rapl_tree(root: Path, domains: int = 2) -> Path:
    for d in range(domains):
        zone = root / f"intel-rapl:{d}"
        write(zone / "name", f"package-{d}\n")
        write(zone / "energy_uj", "1000000\n")
        write(zone / "max_energy_range_uj", f"{RAPL_MAX}\n")
        write(zone / f"intel-rapl:{d}:0" / "energy_uj", "5\n")  # a subzone: must be ignored
        write(root / f"intel-rapl:{d}:0" / "energy_uj", "7\n")
    write(root / "intel-rapl-mmio:0" / "energy_uj", "9\n")  # not a package domain either
    return root


def set_uj(root: Path, domain: int, value: int) -> None:
    (root / f"intel-rapl:{domain}" / "energy_uj").write_text(f"{value}\n")


def test_rapl_sums_package_domains_and_ignores_subzones(tmp_path: Path) -> None:
    root = make_rapl_tree(tmp_path)
    meter = RaplMeter(root=root, clock=iter([10.0, 12.0]).__next__)
    assert meter.available() == (True, "2 package domain(s): intel-rapl:0 (package-0), intel-rapl:1 (package-1)")
    meter.start()
    set_uj(root, 0, 3_500_000)
    set_uj(root, 1, 1_250_000)
    (root / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")
    reading = meter.stop()
    assert reading.joules == pytest.approx(2.75)
    assert reading.seconds == pytest.approx(2.0)
    assert (reading.kind, reading.interval_s, reading.idle_subtracted_j) == ("measured", 0.001, 0.0)
    assert "wrapped" not in reading.note
    assert RaplMeter.whole_board is False


def test_rapl_counter_wrap_around(tmp_path: Path) -> None:
    root = make_rapl_tree(tmp_path, domains=1)
    set_uj(root, 0, RAPL_MAX - 1000)
    meter = RaplMeter(root=root)
    meter.start()
    set_uj(root, 0, 500)
    reading = meter.stop()
    assert reading.joules == pytest.approx(1500 / 1e6)
    assert "counter wrapped in 1 domain(s)" in reading.note


def test_rapl_root_only_counter(tmp_path: Path, deny_read: Callable[[Path], None]) -> None:
    root = make_rapl_tree(tmp_path, domains=1)
    deny_read(root / "intel-rapl:0" / "energy_uj")
    ok, why = RaplMeter(root=root).available()
    assert not ok
    assert "readable by root only" in why
    assert f"sudo chmod a+r {root}/intel-rapl:*/energy_uj" in why
    with pytest.raises(EnergyMeterError, match="run as root"):
        RaplMeter(root=root).start()


def test_rapl_missing_and_malformed(tmp_path: Path) -> None:
    ok, why = RaplMeter(root=tmp_path / "absent").available()
    assert not ok and "no RAPL package domain" in why
    with pytest.raises(EnergyMeterError, match="no RAPL package domain"):
        RaplMeter(root=tmp_path / "absent").start()
    root = make_rapl_tree(tmp_path / "tree", domains=1)
    set_uj(root, 0, 0)
    (root / "intel-rapl:0" / "energy_uj").write_text("garbage\n")
    ok, why = RaplMeter(root=root).available()
    assert not ok and "cannot read a counter" in why


# --- NVML ---------------------------------------------------------------------------------


class FakeNvml:
    """The functions of ``pynvml`` that the meter calls, over a simulated GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, counter: bool = True, init_fails: bool = False, power_mw: int = 150_000) -> None:
        self.counter = counter
        self.init_fails = init_fails
        self.power_mw = power_mw
        self.energy_mj = 1_000_000
        self.open = 0
        self.power_calls = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        if index != 0:
            raise self.NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: object) -> bytes:
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        self.power_calls += 1
        return self.power_mw


def test_nvml_total_energy_counter() -> None:
    nvml = FakeNvml()
    meter = NvmlMeter(nvml=nvml, clock=iter([0.0, 4.0]).__next__)
    assert meter.available() == (True, "NVML GPU 0 (Fake GPU): total-energy counter")
    meter.start()
    nvml.energy_mj += 2_500
    reading = meter.stop()
    assert reading.joules == pytest.approx(2.5)
    assert reading.seconds == pytest.approx(4.0)
    assert reading.source == "NVML GPU 0 (Fake GPU) nvmlDeviceGetTotalEnergyConsumption"
    assert reading.interval_s == pytest.approx(0.1)
    assert nvml.open == 0 and nvml.power_calls == 0


def test_nvml_falls_back_to_sampling_power() -> None:
    nvml = FakeNvml(counter=False, power_mw=150_000)
    clock = FakeClock()
    meter = NvmlMeter(nvml=nvml, interval_s=FAST, clock=clock)
    ok, why = meter.available()
    assert ok and "power usage sampled" in why
    meter.start()
    wait_for_calls(clock, 3)
    reading = meter.stop()
    assert reading.joules == pytest.approx(150.0 * reading.seconds)
    assert reading.seconds > 0 and reading.samples >= 3
    assert reading.source.endswith("nvmlDeviceGetPowerUsage")
    assert "total-energy counter not supported" in reading.note
    assert nvml.open == 0


def test_nvml_dropped_power_sample_warns() -> None:
    nvml = FakeNvml(counter=False, power_mw=20_000)
    clock = FakeClock()
    read = nvml.nvmlDeviceGetPowerUsage

    def flaky(handle: object) -> int:
        if clock.calls == 2:
            raise FakeNvml.NVMLError("GPU is lost")
        return read(handle)

    nvml.nvmlDeviceGetPowerUsage = flaky  # type: ignore[method-assign]
    meter = NvmlMeter(nvml=nvml, interval_s=FAST, clock=clock)
    meter.start()
    wait_for_calls(clock, 4)
    with pytest.warns(EnergyMeterWarning, match="0 malformed value.* and 1 sample"):
        reading = meter.stop()
    assert "1 sample(s) dropped (NVMLError: GPU is lost)" in reading.note
    assert reading.joules == pytest.approx(20.0 * reading.seconds)


def test_nvml_not_available() -> None:
    ok, why = NvmlMeter(nvml=FakeNvml(init_fails=True)).available()
    assert not ok and "NVIDIA driver" in why
    ok, why = NvmlMeter(device_index=3, nvml=FakeNvml()).available()
    assert not ok and "no GPU at index 3" in why
    with pytest.raises(EnergyMeterError, match="cannot initialise NVML"):
        NvmlMeter(nvml=FakeNvml(init_fails=True)).start()


def test_nvml_without_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    ok, why = NvmlMeter().available()
    assert not ok and "pip install nvidia-ml-py" in why


def test_nvml_releases_the_thread_and_handle_on_error() -> None:
    nvml = FakeNvml(counter=False)
    with pytest.raises(ZeroDivisionError), NvmlMeter(nvml=nvml, interval_s=FAST):
        1 / 0  # noqa: B018
    assert nvml.open == 0


# --- Jetson --------------------------------------------------------------------------------


def jetson_scheme_a(root: Path) -> None:  # in_powerN_input (mW) + in_powerN_label
    dev = root / "ina3221" / "1-0040" / "iio:device0"
    write(dev / "in_power0_input", "5000\n")
    write(dev / "in_power0_label", "VDD_IN\n")
    write(dev / "in_power1_input", "2000\n")
    write(dev / "in_power1_label", "VDD_CPU_GPU_CV\n")


def jetson_scheme_b(root: Path) -> None:  # in_voltageN_input (mV) x in_currentN_input (mA)
    dev = root / "ina3221" / "6-0040" / "iio:device0"
    write(dev / "in_voltage0_input", "5000\n")
    write(dev / "in_current0_input", "1000\n")
    write(dev / "rail_name_0", "POM_5V_IN\n")
    write(dev / "in_voltage1_input", "5000\n")
    write(dev / "in_current1_input", "300\n")
    write(dev / "in1_label", "POM_5V_GPU\n")


def jetson_scheme_c(root: Path) -> None:  # old ina3221x, no total rail: summed
    dev = root / "ina3221x" / "6-0040" / "iio:device0"
    write(dev / "in_power0_input", "3000\n")
    write(dev / "rail_name_0", "VDD_SYS_GPU\n")
    write(dev / "in_power1_input", "2000\n")
    write(dev / "rail_name_1", "VDD_SYS_CPU\n")


def jetson_hwmon(root: Path) -> None:  # JetPack 5+: inN_input (mV) x currN_input (mA)
    dev = root / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    write(dev / "in1_input", "5000\n")
    write(dev / "curr1_input", "1000\n")
    write(dev / "in1_label", "VDD_IN\n")
    write(dev / "in7_input", "40\n")  # a sum channel without current: not a rail
    write(dev / "in7_label", "sum of shunt voltages\n")
    write(dev / "in2_input", "0\n")
    write(dev / "curr2_input", "0\n")
    write(dev / "in2_label", "NC\n")  # not connected


@pytest.mark.parametrize(
    ("make", "watts", "how"),
    [
        (jetson_scheme_a, 5.0, "total input rail VDD_IN"),
        (jetson_scheme_b, 5.0, "total input rail POM_5V_IN"),
        (jetson_scheme_c, 5.0, "sum of rails VDD_SYS_GPU, VDD_SYS_CPU (no VDD_IN / POM_5V_IN total rail found)"),
        (jetson_hwmon, 5.0, "total input rail VDD_IN"),
    ],
    ids=["in_power", "voltage_x_current", "ina3221x_sum", "hwmon"],
)
def test_jetson_schemes_integrate_constant_power(
    tmp_path: Path, make: Callable[[Path], None], watts: float, how: str
) -> None:
    make(tmp_path)
    clock = FakeClock()
    meter = JetsonMeter(root=tmp_path, interval_s=FAST, clock=clock)
    assert meter.available() == (True, how)
    meter.start()
    wait_for_calls(clock, 4)
    reading = meter.stop()
    assert reading.joules == pytest.approx(watts * reading.seconds)
    assert reading.seconds == pytest.approx(clock.step * (reading.samples - 1))
    assert reading.note.startswith(how)
    assert reading.kind == "measured" and JetsonMeter.whole_board


def test_jetson_malformed_value_is_skipped_with_a_counted_warning(tmp_path: Path) -> None:
    jetson_scheme_a(tmp_path)
    rail = tmp_path / "ina3221" / "1-0040" / "iio:device0" / "in_power0_input"
    clock = FakeClock()
    clock.on_call = {2: lambda: rail.write_text("garbage\n"), 4: lambda: rail.write_text("5000\n")}
    meter = JetsonMeter(root=tmp_path, interval_s=FAST, clock=clock)
    meter.start()
    wait_for_calls(clock, 5)
    with pytest.warns(EnergyMeterWarning, match="2 malformed value"):
        reading = meter.stop()
    assert reading.skipped == 2
    assert reading.samples == clock.calls - 2
    assert reading.joules == pytest.approx(5.0 * reading.seconds)
    assert "2 sample(s) dropped" in reading.note


def test_jetson_missing_rails(tmp_path: Path) -> None:
    ok, why = JetsonMeter(root=tmp_path).available()
    assert not ok and "no INA3221 driver" in why
    write(tmp_path / "ina3221" / "1-0040" / "uevent", "DRIVER=ina3221\n")
    write(tmp_path / "ina3221" / "1-0040" / "in_power0_label", "VDD_IN\n")  # a label without a value
    ok, why = JetsonMeter(root=tmp_path).available()
    assert not ok and "exposes no rail" in why
    with pytest.raises(EnergyMeterError, match="exposes no rail"):
        JetsonMeter(root=tmp_path).start()


def test_jetson_unreadable_rail(tmp_path: Path, deny_read: Callable[[Path], None]) -> None:
    jetson_scheme_a(tmp_path)
    deny_read(tmp_path / "ina3221" / "1-0040" / "iio:device0" / "in_power0_input")
    ok, why = JetsonMeter(root=tmp_path).available()
    assert not ok and "readable by root only" in why and "chmod a+r" in why
    with pytest.raises(EnergyMeterError, match="first power reading"):
        JetsonMeter(root=tmp_path, interval_s=FAST).start()


def test_jetson_idle_subtraction_and_measure_idle(tmp_path: Path) -> None:
    jetson_scheme_a(tmp_path)
    idle = measure_idle(JetsonMeter(root=tmp_path, interval_s=FAST, clock=FakeClock()), 0.02)
    assert idle == pytest.approx(5.0)
    meter = JetsonMeter(root=tmp_path, interval_s=FAST, idle_watts=2.0, clock=FakeClock())
    with meter:
        time.sleep(0.02)
    reading = meter.reading
    assert reading is not None
    assert reading.idle_subtracted_j == pytest.approx(2.0 * reading.seconds)
    assert reading.joules == pytest.approx(3.0 * reading.seconds)
    assert "idle 2 W" in reading.note and "subtracted" in reading.note
    # measuring idle undoes a configured subtraction
    assert measure_idle(meter, 0.02) == pytest.approx(5.0)


def test_jetson_unlabelled_channels_of_two_chips_are_both_counted(tmp_path: Path) -> None:
    for chip in ("1-0040", "1-0041"):
        write(tmp_path / "ina3221x" / chip / "iio:device0" / "in_power0_input", "1500\n")
    ok, how = JetsonMeter(root=tmp_path).available()
    assert ok and how.startswith(
        "sum of rails ina3221x/1-0040/iio:device0/channel0, ina3221x/1-0041/iio:device0/channel0"
    )


def test_jetson_refuses_a_bad_idle_figure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="idle_watts must be finite and >= 0"):
        JetsonMeter(root=tmp_path, idle_watts=-1.0)


def test_jetson_context_manager_joins_the_thread_on_error(tmp_path: Path) -> None:
    jetson_scheme_a(tmp_path)
    with pytest.raises(ZeroDivisionError), JetsonMeter(root=tmp_path, interval_s=FAST):
        1 / 0  # noqa: B018


# --- Raspberry Pi 5 -------------------------------------------------------------------------

PMIC_TEXT = """\
     3V7_WL_SW_A current(0)=0.10000000A
       3V3_SYS_A current(1)=0.05000000A
        1V8_SYS_A current(2)=0.20000000A
       DDR_VDD2_A current(3)=0.02000000A
       VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
       3V3_SYS_V volt(9)=3.30000000V
        1V8_SYS_V volt(10)=1.80000000V
       DDR_VDD2_V volt(11)=1.10000000V
       VDD_CORE_V volt(15)=0.90000000V
         EXT5V_V volt(24)=5.10000000V
          BATT_V volt(25)=0.00000000V
"""
PMIC_WATTS = 0.1 * 3.7 + 0.05 * 3.3 + 0.2 * 1.8 + 0.02 * 1.1 + 2.0 * 0.9


def test_rpi5_parse_pairs_current_with_volt_by_rail() -> None:
    rails, bad = parse_pmic_adc(PMIC_TEXT)
    assert bad == 0
    assert sorted(rails) == ["1V8_SYS", "3V3_SYS", "3V7_WL_SW", "DDR_VDD2", "VDD_CORE"]  # EXT5V, BATT unpaired
    assert rails["VDD_CORE"] == pytest.approx(1.8)
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)


def test_rpi5_parse_counts_malformed_lines() -> None:
    bad_lines = ["garbage", "   VDD_X_A current(30)=abcA", "   VDD_Y_V volt(31)=1.2.3V", "  VDD_Z_A current(32)=1.0V"]
    text = PMIC_TEXT + "\n".join(bad_lines) + "\n\n"
    rails, bad = parse_pmic_adc(text)
    assert bad == 4
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)


def test_rpi5_constant_power() -> None:
    calls: list[tuple[str, ...]] = []

    def run(argv: object) -> str:
        calls.append(tuple(argv))  # type: ignore[arg-type]
        return PMIC_TEXT

    clock = FakeClock()
    meter = Rpi5Meter(run_command=run, interval_s=FAST, clock=clock)
    assert meter.available() == (True, "5 PMIC rail(s) via `vcgencmd pmic_read_adc`")
    meter.start()
    wait_for_calls(clock, 4)
    reading = meter.stop()
    assert set(calls) == {("vcgencmd", "pmic_read_adc")}
    assert reading.joules == pytest.approx(PMIC_WATTS * reading.seconds)
    assert reading.note.startswith("Σ V·I over 5 PMIC rail(s)")
    assert Rpi5Meter.whole_board


def test_rpi5_ramp_power_matches_the_integral() -> None:
    clock = FakeClock(start=0.0, step=0.01)

    def run(argv: object) -> str:  # 5 V at 1 + 2t amps: P = 5 + 10 t
        return f"  VDD_CORE_A current(7)={1 + 2 * clock.now:.10f}A\n  VDD_CORE_V volt(15)=5.0V\n"

    meter = Rpi5Meter(run_command=run, interval_s=FAST, clock=clock)
    meter.start()
    wait_for_calls(clock, 6)
    reading = meter.stop()
    t1 = clock.now
    t0 = t1 - reading.seconds
    assert reading.joules == pytest.approx(5 * (t1 - t0) + 5 * (t1**2 - t0**2), rel=1e-7)
    times = np.linspace(t0, t1, reading.samples)
    assert reading.joules == pytest.approx(trapezoid(5 + 10 * times, times), rel=1e-7)


def test_rpi5_malformed_lines_and_missing_rails_are_counted() -> None:
    clock = FakeClock()
    broken = PMIC_TEXT.replace("VDD_CORE_A current(7)=2.00000000A", "VDD_CORE_A current(7)=??A")
    outputs = {3: broken}

    def run(argv: object) -> str:
        return outputs.get(clock.calls, PMIC_TEXT)

    meter = Rpi5Meter(run_command=run, interval_s=FAST, clock=clock)
    meter.start()
    wait_for_calls(clock, 5)
    with pytest.warns(EnergyMeterWarning, match="1 malformed value"):
        reading = meter.stop()
    assert reading.skipped == 1
    assert "1 sample(s) dropped" in reading.note  # the sample without VDD_CORE would under-count
    assert reading.joules == pytest.approx(PMIC_WATTS * reading.seconds)


@pytest.mark.parametrize(
    ("run", "why"),
    [
        (lambda argv: missing_command(argv), "vcgencmd not found"),
        (lambda argv: "error=1 error_msg=\"Command not registered\"\n", "no current/voltage pair"),
        (lambda argv: failing_command(argv), "failed"),
    ],
    ids=["no-vcgencmd", "not-a-pi5", "command-fails"],
)
def test_rpi5_not_available(run: Callable[[object], str], why: str) -> None:
    ok, reason = Rpi5Meter(run_command=run).available()
    assert not ok and why in reason


def missing_command(argv: object) -> str:
    raise FileNotFoundError(2, "No such file or directory", "vcgencmd")


def failing_command(argv: object) -> str:
    import subprocess

    raise subprocess.CalledProcessError(255, ["vcgencmd"])


# --- external meters -----------------------------------------------------------------------


def test_external_csv_interpolates_the_window_edges(tmp_path: Path) -> None:
    log = write(tmp_path / "usb.csv", "timestamp,watts\n100,1\n101,5\n102,2\n103,8\n")
    meter = ExternalMeter(csv_path=log, clock=iter([100.5, 102.5]).__next__)
    assert meter.available() == (True, f"CSV power log {log}: 4 row(s)")
    meter.start()
    reading = meter.stop()
    assert reading.joules == pytest.approx(7.25)
    assert reading.seconds == pytest.approx(2.0)
    assert reading.samples == 2 and reading.interval_s == pytest.approx(1.0)
    assert "edges interpolated" in reading.note


def test_external_csv_ramp_against_numpy(tmp_path: Path) -> None:
    times = np.arange(0.0, 10.01, 0.25) + 1_700_000_000.0
    watts = 3.0 + 0.5 * (times - times[0])
    rows = "".join(f"{float(t)!r},{float(w)!r},extra\n" for t, w in zip(times, watts))
    log = write(tmp_path / "log.csv", "Timestamp, Watts ,note\n" + rows)
    meter = ExternalMeter(csv_path=log, clock=iter([times[4], times[20]]).__next__)
    meter.start()
    reading = meter.stop()
    assert reading.joules == pytest.approx(trapezoid(watts[4:21], times[4:21]), rel=1e-12)


def test_external_csv_skips_malformed_rows(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "timestamp,watts\n0,2\nabc,3\n1,\n1.5,nan\n\n2\n2,2\n4,2\n")
    times, watts, bad = read_power_log(log)
    assert list(times) == [0, 2, 4] and list(watts) == [2, 2, 2] and bad == 4
    meter = ExternalMeter(csv_path=log, clock=iter([1.0, 3.0]).__next__)
    meter.start()
    with pytest.warns(EnergyMeterWarning, match="4 malformed"):
        reading = meter.stop()
    assert reading.joules == pytest.approx(4.0) and reading.skipped == 4


def test_external_csv_needs_a_header_and_coverage(tmp_path: Path) -> None:
    headless = write(tmp_path / "headless.csv", "100,1\n101,2\n")
    with pytest.raises(EnergyMeterError, match="needs a header with columns 'timestamp'"):
        ExternalMeter(csv_path=headless).start()
    ok, why = ExternalMeter(csv_path=tmp_path / "absent.csv").available()
    assert not ok and "cannot read the power log" in why
    short = write(tmp_path / "short.csv", "timestamp,watts\n100,1\n101,2\n")
    meter = ExternalMeter(csv_path=short, clock=iter([100.5, 101.5]).__next__, wait_s=0)
    meter.start()
    with pytest.raises(EnergyMeterError, match=r"covers \[100.000, 101.000\] but the window is \[100.500, 101.500\]"):
        meter.stop()


def test_external_command_is_sampled_with_idle_subtraction() -> None:
    clock = FakeClock()
    outputs = {3: "n/a\n"}
    meter = ExternalMeter(
        command="usbmeter --watts", run_command=lambda argv: outputs.get(clock.calls, "12.5 W\n"),
        interval_s=FAST, idle_watts=2.5, clock=clock,
    )
    assert meter.command == ["usbmeter", "--watts"]
    meter.start()
    wait_for_calls(clock, 5)
    with pytest.warns(EnergyMeterWarning, match="1 malformed"):
        reading = meter.stop()
    assert reading.joules == pytest.approx(10.0 * reading.seconds)
    assert reading.idle_subtracted_j == pytest.approx(2.5 * reading.seconds)
    assert reading.source == "command `usbmeter --watts`"


def test_external_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ExternalMeter()
    with pytest.raises(ValueError, match="exactly one"):
        ExternalMeter(csv_path=tmp_path / "x.csv", command="meter")


# --- estimate -------------------------------------------------------------------------------


def test_estimate_assumes_busy_for_the_whole_window() -> None:
    meter = EstimateMeter(busy_watts=6.0, idle_watts=2.0, source="rpi5 profile", clock=iter([0.0, 2.0]).__next__)
    assert meter.available()[0] is True
    meter.start()
    reading = meter.stop()
    assert (reading.joules, reading.kind, reading.samples) == (pytest.approx(12.0), "estimated", 0)
    assert reading.source == "estimate from rpi5 profile"
    assert "busy the whole window" in reading.note


def test_estimate_with_busy_seconds() -> None:
    meter = EstimateMeter(busy_watts=6.0, idle_watts=2.0, source="datasheet", clock=iter([0.0, 2.0, 5.0, 6.0]).__next__)
    meter.start()
    assert meter.stop(busy_seconds=0.5).joules == pytest.approx(6.0 * 0.5 + 2.0 * 1.5)
    meter.start()
    with pytest.raises(ValueError, match="exceeds the window"):
        meter.stop(busy_seconds=2.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        meter.stop(busy_seconds=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"busy_watts": 5.0, "source": ""}, "where the busy/idle watts come from"),
        ({"busy_watts": -1.0, "source": "x"}, "busy_watts must be finite"),
        ({"busy_watts": 1.0, "idle_watts": float("inf"), "source": "x"}, "idle_watts must be finite"),
    ],
)
def test_estimate_validates_its_figures(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EstimateMeter(**kwargs)


def test_meters_share_the_interface() -> None:
    for name in list_meters():
        cls = get_meter(name)
        assert issubclass(cls, EnergyMeter) and cls.name == name
        assert cls.kind == ("estimated" if name == "estimate" else "measured")
