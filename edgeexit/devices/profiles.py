"""Device profiles: which providers, threads and energy meter to use on a kind of device.

Profiles are frozen presets looked up by name (``cpu``, ``rpi4``, ``rpi5``, ``jetson``,
``cuda``, ``tensorrt``) or detected with ``auto``.  The power figures are only used for
the *estimated* energy when no meter can be read; each says where it comes from.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from .._names import did_you_mean
from ..errors import EdgeExitError
from .providers import ProviderSpec, available_providers, provider_name


class UnknownProfileError(EdgeExitError, KeyError):
    """No device profile of that name."""

    exit_code = 2

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PowerFigures:
    """Idle and busy power of the whole device, for energy estimates, and their source."""

    idle_watts: float
    busy_watts: float
    source: str

    def __post_init__(self) -> None:
        if not (0 <= self.idle_watts <= self.busy_watts):
            raise ValueError(f"need 0 <= idle_watts <= busy_watts, got {self.idle_watts}, {self.busy_watts}")


@dataclass(frozen=True)
class DeviceProfile:
    """How edgeexit runs on one kind of device.

    Attributes:
        name: preset name.
        description: one line for ``edgeexit devices``.
        providers: onnxruntime execution providers in order, with options.
        threads: intra-op threads per stage session.
        global_thread_pool: share one process-wide pool between the chained sessions
            (the host application must create it; see ``use_global_thread_pool``).
        spinning: let idle onnxruntime threads spin.
        energy_meters: meter names in order of preference; the estimate is always last.
        power: figures for the estimate when no meter can be read.
    """

    name: str
    description: str
    providers: tuple[ProviderSpec, ...]
    threads: int
    power: PowerFigures
    energy_meters: tuple[str, ...] = ("estimate",)
    global_thread_pool: bool = False
    spinning: bool = False
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError(f"profile {self.name!r} needs at least one execution provider")
        if self.threads < 1:
            raise ValueError(f"profile {self.name!r}: threads must be >= 1, got {self.threads}")
        if self.energy_meters[-1:] != ("estimate",):
            raise ValueError(f"profile {self.name!r}: the estimate must be the last energy meter")

    @property
    def provider_names(self) -> list[str]:
        return [provider_name(p) for p in self.providers]


# Why one thread: the stages of an exit package are small graphs run one after another;
# on the 2-core x86 machine edgeexit is developed on, one intra-op thread without spinning
# was as fast as two threads for B-LeNet at batch 1 and never fights the host app for cores
# (README, "Threads").  Raise `threads` for wide stages.
PRESETS: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "cpu", "generic CPU (x86-64 or arm64) with onnxruntime's CPU provider",
            ("CPUExecutionProvider",), threads=1, energy_meters=("rapl", "estimate"),
            power=PowerFigures(5.0, 20.0, "generic placeholder for a small x86 box; measure yours and pass "
                                         "your own PowerFigures"),
        ),
        DeviceProfile(
            "rpi4", "Raspberry Pi 4 (64-bit OS), CPU provider; no on-board power sensor",
            ("CPUExecutionProvider",), threads=1, energy_meters=("external", "estimate"),
            power=PowerFigures(2.7, 6.4, "Raspberry Pi 4B whole-board figures commonly measured at the USB-C "
                                         "input (idle ~2.7 W, all cores busy ~6.4 W)"),
            notes=("the Pi 4 cannot measure its own power: use a USB meter's CSV log (external meter)",),
        ),
        DeviceProfile(
            "rpi5", "Raspberry Pi 5 (64-bit OS), CPU provider; PMIC rails via vcgencmd",
            ("CPUExecutionProvider",), threads=1, energy_meters=("rpi5", "external", "estimate"),
            power=PowerFigures(2.7, 7.5, "Raspberry Pi 5 whole-board figures commonly measured at the USB-C "
                                         "input (idle ~2.7 W, all cores busy ~7.5 W)"),
        ),
        DeviceProfile(
            "jetson", "NVIDIA Jetson (JetPack onnxruntime-gpu wheel), CUDA then CPU; INA3221 rails",
            ("CUDAExecutionProvider", "CPUExecutionProvider"), threads=1, energy_meters=("jetson", "estimate"),
            power=PowerFigures(5.0, 15.0, "Jetson Orin Nano 15 W power mode (NVIDIA's nominal budget)"),
        ),
        DeviceProfile(
            "cuda", "NVIDIA GPU with onnxruntime-gpu, CUDA then CPU; NVML energy counter",
            ("CUDAExecutionProvider", "CPUExecutionProvider"), threads=1, energy_meters=("nvml", "estimate"),
            power=PowerFigures(30.0, 250.0, "generic data-centre GPU board power; NVML measures the real value"),
        ),
        DeviceProfile(
            "tensorrt", "NVIDIA GPU with TensorRT, then CUDA, then CPU; NVML energy counter",
            ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), threads=1,
            energy_meters=("nvml", "estimate"),
            power=PowerFigures(30.0, 250.0, "generic data-centre GPU board power; NVML measures the real value"),
        ),
    )
}


def list_profiles() -> list[str]:
    """Preset names plus ``auto``."""
    return [*PRESETS, "auto"]


def get_profile(name: str, *, root: Path = Path("/")) -> DeviceProfile:
    """A preset by name, or the detected one for ``auto``; unknown names list the valid ones."""
    if name == "auto":
        return detect_profile(root=root)
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown device profile {name!r}; valid profiles: {', '.join(list_profiles())}."
            + did_you_mean(name, list_profiles())
        ) from None


@dataclass(frozen=True)
class Detection:
    """What ``auto`` saw, for ``edgeexit devices``."""

    profile: str
    machine: str
    model: str | None
    jetson: bool
    providers: tuple[str, ...]
    reason: str


def detect(*, root: Path = Path("/"), providers: list[str] | None = None, machine: str | None = None) -> Detection:
    """Detect the device: a Pi from the device-tree model, a Jetson from nv_tegra_release,
    a CUDA machine from onnxruntime's providers, else a plain CPU."""
    machine = machine or platform.machine()
    providers = available_providers() if providers is None else providers
    model = None
    model_file = root / "proc" / "device-tree" / "model"
    try:
        model = model_file.read_bytes().rstrip(b"\x00\n").decode("utf-8", "replace")
    except OSError:
        pass
    jetson = (root / "etc" / "nv_tegra_release").is_file()
    if model and "Raspberry Pi 5" in model:
        name, why = "rpi5", f"device-tree model {model!r}"
    elif model and "Raspberry Pi 4" in model:
        name, why = "rpi4", f"device-tree model {model!r}"
    elif jetson:
        name, why = "jetson", "/etc/nv_tegra_release exists"
    elif "TensorrtExecutionProvider" in providers:
        name, why = "tensorrt", "onnxruntime has TensorrtExecutionProvider"
    elif "CUDAExecutionProvider" in providers:
        name, why = "cuda", "onnxruntime has CUDAExecutionProvider"
    else:
        name, why = "cpu", f"{machine} CPU, no Raspberry Pi, Jetson or GPU provider found"
    return Detection(name, machine, model, jetson, tuple(providers), why)


def detect_profile(*, root: Path = Path("/")) -> DeviceProfile:
    return PRESETS[detect(root=root).profile]
