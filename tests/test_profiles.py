"""Device profiles: presets, detection on fake device trees, and provider checks through ExitSession."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeexit.devices import ProviderError, ProviderFallbackWarning
from edgeexit.devices.profiles import (
    PRESETS,
    DeviceProfile,
    PowerFigures,
    UnknownProfileError,
    detect,
    get_profile,
    list_profiles,
)
from edgeexit.runtime import ExitSession


def _fake_root(tmp_path: Path, model: str | None = None, tegra: bool = False) -> Path:
    if model is not None:
        (tmp_path / "proc" / "device-tree").mkdir(parents=True)
        (tmp_path / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    if tegra:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    return tmp_path


@pytest.mark.parametrize(
    ("model", "tegra", "providers", "expected"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", False, ["CPUExecutionProvider"], "rpi5"),
        ("Raspberry Pi 4 Model B Rev 1.4", False, ["CPUExecutionProvider"], "rpi4"),
        (None, True, ["CUDAExecutionProvider", "CPUExecutionProvider"], "jetson"),
        (None, False, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt"),
        (None, False, ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
        ("Generic ARM board", False, ["CPUExecutionProvider"], "cpu"),
        (None, False, ["CPUExecutionProvider"], "cpu"),
    ],
)
def test_detection_on_fake_devices(tmp_path, model, tegra, providers, expected):
    found = detect(root=_fake_root(tmp_path, model, tegra), providers=providers, machine="aarch64")
    assert found.profile == expected
    assert found.reason


def test_auto_on_this_machine_is_a_known_preset():
    assert get_profile("auto").name in PRESETS


def test_every_preset_is_valid_and_listed():
    assert set(list_profiles()) == {*PRESETS, "auto"}
    for name, profile in PRESETS.items():
        assert get_profile(name) is profile and profile.name == name
        assert profile.provider_names[-1] == "CPUExecutionProvider"
        assert profile.energy_meters[-1] == "estimate" and profile.power.source


def test_unknown_profile_names_the_valid_ones_and_the_nearest():
    with pytest.raises(UnknownProfileError) as info:
        get_profile("rpi")
    message = str(info.value)
    assert "valid profiles: cpu, rpi4, rpi5, jetson, cuda, tensorrt, auto" in message
    assert "Did you mean 'rpi4'?" in message or "Did you mean 'rpi5'?" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"providers": ()}, "at least one execution provider"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"energy_meters": ("rapl",)}, "estimate must be the last"),
    ],
)
def test_invalid_profiles_are_refused(kwargs, fragment):
    base = {"name": "x", "description": "", "providers": ("CPUExecutionProvider",), "threads": 1,
            "power": PowerFigures(1.0, 2.0, "test")}
    with pytest.raises(ValueError, match=fragment):
        DeviceProfile(**{**base, **kwargs})
    with pytest.raises(ValueError, match="idle_watts <= busy_watts"):
        PowerFigures(3.0, 2.0, "test")


@pytest.mark.parametrize("name", ["cpu", "rpi4", "rpi5"])
def test_cpu_profiles_build_sessions(tiny_package, name):
    sess = ExitSession(tiny_package, device=name)
    assert sess.profile is PRESETS[name] and sess.providers == ["CPUExecutionProvider"]
    assert sess.run(np.ones((2, 4), np.float32)).predictions.shape == (2,)


@pytest.mark.parametrize("name", ["jetson", "cuda", "tensorrt"])
def test_gpu_profiles_fail_loudly_without_the_provider(tiny_package, name):
    with pytest.raises(ProviderError, match="not in this onnxruntime build"):
        ExitSession(tiny_package, device=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sess = ExitSession(tiny_package, device=name, allow_fallback=True)
    assert any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
    assert sess.providers == ["CPUExecutionProvider"]


def test_explicit_arguments_override_the_profile(tiny_package):
    sess = ExitSession(tiny_package, device="cuda", providers=["CPUExecutionProvider"], threads=2)
    assert sess.providers == ["CPUExecutionProvider"] and sess.thread_settings.threads == 2
