"""Execution-provider selection: ask for what exists, and notice silent fallbacks.

onnxruntime only warns when a requested provider is missing from the installed wheel
and quietly runs on the CPU instead.  edgeexit checks both before and after building a
session and raises ``ProviderError`` unless the caller allowed the fallback.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from typing import Any

import onnxruntime as ort

from ..errors import EdgeExitError

ProviderSpec = str | tuple[str, dict[str, Any]]

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


class ProviderError(EdgeExitError, RuntimeError):
    """A requested execution provider is not available or was not used."""

    exit_code = 4


class ProviderFallbackWarning(UserWarning):
    """A requested provider was unavailable and the caller allowed falling back."""


def provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(
    requested: Sequence[ProviderSpec] | None, *, allow_fallback: bool = False
) -> list[ProviderSpec]:
    """Requested providers that the installed onnxruntime has, in order.

    Raises ``ProviderError`` naming the missing ones (with the available list) unless
    ``allow_fallback``; then warns and keeps the rest, ending with the CPU provider.
    """
    if not requested:
        return list(DEFAULT_PROVIDERS)
    available = available_providers()
    kept: list[ProviderSpec] = []
    missing: list[str] = []
    for spec in requested:
        name = provider_name(spec)
        if name in available:
            kept.append(spec)
        else:
            missing.append(name)
    if missing:
        hints = []
        for name in missing:
            near = difflib.get_close_matches(name, available, n=1)
            hints.append(name + (f" (did you mean {near[0]}?)" if near else ""))
        message = (
            f"execution provider(s) {', '.join(hints)} not in this onnxruntime build "
            f"{ort.__version__} (available: {', '.join(available)}). Install the matching wheel "
            "(e.g. onnxruntime-gpu for CUDA) or request an available provider"
        )
        if not allow_fallback:
            raise ProviderError(message + "; pass allow_fallback=True (on the command line: --allow-fallback) "
                                          "to run on the rest.")
        warnings.warn(message + "; falling back as allowed.", ProviderFallbackWarning, stacklevel=3)
    if not any(provider_name(p) == "CPUExecutionProvider" for p in kept):
        kept.append("CPUExecutionProvider")
    return kept


def check_session_providers(
    session: ort.InferenceSession, requested: Sequence[ProviderSpec], what: str, *, allow_fallback: bool
) -> None:
    """Fail (or warn) if the session silently ended up without the first requested provider."""
    wanted = provider_name(requested[0])
    used = session.get_providers()
    if wanted not in used:
        message = (
            f"{what}: asked for {wanted} but onnxruntime built the session on {used}; the provider "
            "failed to initialise (check its driver and libraries)"
        )
        if not allow_fallback:
            raise ProviderError(message + "; pass allow_fallback=True (on the command line: --allow-fallback) "
                                          "to accept this.")
        warnings.warn(message, ProviderFallbackWarning, stacklevel=3)
