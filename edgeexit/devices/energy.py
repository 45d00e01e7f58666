"""Compatibility module: the energy meters live in ``edgeexit.devices.meters`` (``devices/meters/``).

``base`` holds the reading and the meter interface, ``sampler`` the background sampler,
``registry`` the registry (``_REGISTRY`` is the one dict the registry functions use: patch it
there), and ``rapl``, ``nvml``, ``jetson``, ``rpi5``, ``external`` and ``estimate`` one meter
family each.  Every name this module had before the split is re-exported here.
"""

from __future__ import annotations

from .meters.base import KINDS as KINDS
from .meters.base import CommandRunner as CommandRunner
from .meters.base import EnergyMeter as EnergyMeter
from .meters.base import EnergyMeterError as EnergyMeterError
from .meters.base import EnergyMeterWarning as EnergyMeterWarning
from .meters.base import EnergyReading as EnergyReading
from .meters.base import UnknownMeterError as UnknownMeterError
from .meters.base import _read_number as _read_number
from .meters.base import _root_only as _root_only
from .meters.base import _run_command as _run_command
from .meters.base import _SampledMeter as _SampledMeter
from .meters.base import integrate_power as integrate_power
from .meters.estimate import EstimateMeter as EstimateMeter
from .meters.external import ExternalMeter as ExternalMeter
from .meters.external import read_power_log as read_power_log
from .meters.jetson import _JETSON_FILES as _JETSON_FILES
from .meters.jetson import _JETSON_LABELS as _JETSON_LABELS
from .meters.jetson import _JETSON_TOTALS as _JETSON_TOTALS
from .meters.jetson import JetsonMeter as JetsonMeter
from .meters.jetson import _jetson_rails as _jetson_rails
from .meters.jetson import _Rail as _Rail
from .meters.nvml import NvmlMeter as NvmlMeter
from .meters.rapl import _RAPL_PACKAGE as _RAPL_PACKAGE
from .meters.rapl import RaplMeter as RaplMeter
from .meters.registry import _REGISTRY as _REGISTRY
from .meters.registry import M as M
from .meters.registry import create_meter as create_meter
from .meters.registry import detect_meters as detect_meters
from .meters.registry import get_meter as get_meter
from .meters.registry import list_meters as list_meters
from .meters.registry import measure_idle as measure_idle
from .meters.registry import register_meter as register_meter
from .meters.rpi5 import _PMIC_LINE as _PMIC_LINE
from .meters.rpi5 import Rpi5Meter as Rpi5Meter
from .meters.rpi5 import parse_pmic_adc as parse_pmic_adc
from .meters.sampler import Clock as Clock
from .meters.sampler import PeriodicSampler as PeriodicSampler
from .meters.sampler import T as T
