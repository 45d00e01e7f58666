"""The "Did you mean ...?" hint every name lookup in edgeexit gives."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest choice, or an empty string when none is close."""
    near = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {near[0]!r}?" if near else ""
