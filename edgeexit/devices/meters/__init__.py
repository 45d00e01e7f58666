"""Energy meters: one interface over RAPL, NVML, Jetson rails, the Pi 5 PMIC, external meters and estimates.

Every meter is started before the work and stopped after it; ``stop()`` returns an
``EnergyReading`` that says how many joules, over how many seconds, whether they were
``measured`` or ``estimated`` and where they came from.  Counters (RAPL, NVML's total
energy) are read twice; power sensors (Jetson INA3221, Pi 5 PMIC, an external command)
are sampled in a background thread and integrated with the trapezoid rule.

Meters are registered by name::

    >>> from edgeexit.devices.meters import create_meter
    >>> meter = create_meter("estimate", busy_watts=6.0, idle_watts=2.5, source="rpi5 profile")
    >>> with meter:
    ...     pass  # run the inferences here
    >>> meter.reading.kind
    'estimated'

``base`` holds the reading and the meter interface, ``sampler`` the background sampler,
``registry`` the registry, ``choose`` the choice of a meter for a device profile, and one
module per meter family registers that family.  These modules import numpy and the standard
library only; ``pynvml`` (nvidia-ml-py) is imported inside the NVML meter when it is used.
"""

# The family modules register their meters on import; this order is the registration order.
# isort: off
from .rapl import RaplMeter as RaplMeter
from .nvml import NvmlMeter as NvmlMeter
from .jetson import JetsonMeter as JetsonMeter
from .rpi5 import Rpi5Meter as Rpi5Meter
from .rpi5 import parse_pmic_adc as parse_pmic_adc
from .external import ExternalMeter as ExternalMeter
from .external import read_power_log as read_power_log
from .estimate import EstimateMeter as EstimateMeter
# isort: on
from .base import KINDS as KINDS
from .base import CommandRunner as CommandRunner
from .base import EnergyMeter as EnergyMeter
from .base import EnergyMeterError as EnergyMeterError
from .base import EnergyMeterWarning as EnergyMeterWarning
from .base import EnergyReading as EnergyReading
from .base import UnknownMeterError as UnknownMeterError
from .base import integrate_power as integrate_power
from .choose import meter_for_profile as meter_for_profile
from .registry import create_meter as create_meter
from .registry import detect_meters as detect_meters
from .registry import get_meter as get_meter
from .registry import list_meters as list_meters
from .registry import measure_idle as measure_idle
from .registry import register_meter as register_meter
from .sampler import Clock as Clock
from .sampler import PeriodicSampler as PeriodicSampler
