"""Device support: execution providers, device profiles, energy meters, throttling."""

from .meters import EnergyMeter as EnergyMeter
from .meters import EnergyMeterError as EnergyMeterError
from .meters import EnergyReading as EnergyReading
from .meters import create_meter as create_meter
from .meters import detect_meters as detect_meters
from .meters import list_meters as list_meters
from .meters import measure_idle as measure_idle
from .meters import meter_for_profile as meter_for_profile
from .profiles import DeviceProfile as DeviceProfile
from .profiles import PowerFigures as PowerFigures
from .profiles import UnknownProfileError as UnknownProfileError
from .profiles import detect as detect
from .profiles import get_profile as get_profile
from .profiles import list_profiles as list_profiles
from .providers import ProviderError as ProviderError
from .providers import ProviderFallbackWarning as ProviderFallbackWarning
from .providers import available_providers as available_providers
from .providers import resolve_providers as resolve_providers
from .thermal import ThermalReport as ThermalReport
from .thermal import ThrottleMonitor as ThrottleMonitor
