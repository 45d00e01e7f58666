"""NVIDIA GPU energy from NVML: the total-energy counter, else sampled power usage."""

from __future__ import annotations

from typing import Any

from .base import EnergyMeter, EnergyMeterError
from .registry import register_meter
from .sampler import Clock, PeriodicSampler


@register_meter
class NvmlMeter(EnergyMeter):
    """GPU energy from NVML: the total-energy counter (Volta and newer), else sampled power.

    ``nvmlDeviceGetTotalEnergyConsumption`` (mJ) updates every 20–100 ms, so windows
    should last seconds.  Where it is not supported, ``nvmlDeviceGetPowerUsage`` (mW) is
    sampled every ``interval_s`` and integrated.  Needs ``pip install nvidia-ml-py``;
    ``nvml=`` takes any object with the same functions (another binding, or a test fake).
    """

    name = "nvml"
    _COUNTER_PERIOD_S = 0.1

    def __init__(
        self, device_index: int = 0, *, nvml: Any = None, interval_s: float = 0.02, clock: Clock | None = None
    ) -> None:
        super().__init__(source=f"NVML GPU {device_index}", interval_s=interval_s, clock=clock)
        self.device_index = device_index
        self._nvml = nvml
        self._sample_interval_s = float(interval_s)
        self._handle: Any = None
        self._sampler: PeriodicSampler[float] | None = None

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml  # optional: nvidia-ml-py
            except ImportError:
                raise EnergyMeterError(
                    "nvml: the NVML binding is not installed; `pip install nvidia-ml-py` (needs an NVIDIA driver)"
                ) from None
            self._nvml = pynvml
        return self._nvml

    def _errors(self, nvml: Any) -> tuple[type[BaseException], ...]:
        return (getattr(nvml, "NVMLError", OSError), AttributeError)

    def _open(self) -> tuple[Any, str]:
        """Init NVML and get the device; returns the handle and its description."""
        nvml = self._module()
        errors = self._errors(nvml)
        try:
            nvml.nvmlInit()
        except errors as exc:
            raise EnergyMeterError(f"nvml: cannot initialise NVML ({exc}); is the NVIDIA driver loaded?") from None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            gpu = nvml.nvmlDeviceGetName(handle)
        except errors as exc:
            nvml.nvmlShutdown()
            raise EnergyMeterError(f"nvml: no GPU at index {self.device_index} ({exc})") from None
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        return handle, f"NVML GPU {self.device_index} ({gpu})"

    def _counter_mj(self, handle: Any) -> int | None:
        nvml = self._module()
        try:
            return int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self._errors(nvml):
            return None

    def available(self) -> tuple[bool, str]:
        try:
            handle, what = self._open()
        except EnergyMeterError as exc:
            return False, str(exc)
        nvml = self._module()
        try:
            if self._counter_mj(handle) is not None:
                return True, f"{what}: total-energy counter"
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except self._errors(nvml) as exc:
                return False, f"nvml: {what} reports neither total energy nor power usage ({exc})"
            return True, f"{what}: power usage sampled (no total-energy counter on this GPU)"
        finally:
            nvml.nvmlShutdown()

    def _read_watts(self) -> float:
        return self._module().nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _begin(self) -> None:
        self._handle, what = self._open()
        self._start_mj = self._counter_mj(self._handle)
        if self._start_mj is not None:
            self.source = f"{what} nvmlDeviceGetTotalEnergyConsumption"
            self.interval_s = self._COUNTER_PERIOD_S
            self._t0 = self._clock()
            return
        self.source = f"{what} nvmlDeviceGetPowerUsage"
        self.interval_s = self._sample_interval_s
        self._sampler = PeriodicSampler(self._read_watts, self.interval_s, self._clock)
        self._sampler.start()
        if not self._sampler.samples:
            why = self._sampler.first_error
            self._abort()
            raise EnergyMeterError(f"nvml: cannot read power usage from {what} ({why})")

    def _finish(self) -> tuple[float, float, int, list[str]]:
        try:
            if self._sampler is None:
                end_mj = self._counter_mj(self._handle)
                seconds = self._clock() - self._t0
                if end_mj is None or self._start_mj is None or end_mj < self._start_mj:
                    raise EnergyMeterError(f"nvml: the total-energy counter of {self.source} failed or went back")
                note = "total-energy counter (mJ), updated every 20–100 ms: windows under ~10 s are coarse"
                return (end_mj - self._start_mj) / 1000.0, seconds, 2, [note, "GPU only"]
            joules, seconds, samples, notes = self._integrate(self._sampler)
            fallback = "total-energy counter not supported, power usage sampled (NVML may average it over 1 s)"
            return joules, seconds, samples, [fallback, *notes, "GPU only"]
        finally:
            self._sampler = None
            self._module().nvmlShutdown()

    def _abort(self) -> None:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        self._sampler = None
        self._module().nvmlShutdown()
