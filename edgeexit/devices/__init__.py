"""Device support: execution-provider selection (profiles and energy meters come later)."""

from .providers import ProviderError as ProviderError
from .providers import ProviderFallbackWarning as ProviderFallbackWarning
from .providers import available_providers as available_providers
from .providers import resolve_providers as resolve_providers
