"""The "Did you mean ...?" hint every name lookup in edgeexit gives."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(name: object, choices: Iterable[str], n: int | None = None, cutoff: float = 0.0) -> list[str]:
    """``choices`` whose similarity to ``name`` (difflib's ratio) is at least ``cutoff``, the most
    similar first (ties by name), at most ``n`` of them."""
    matcher = difflib.SequenceMatcher(b=str(name))
    scored = []
    for choice in choices:
        matcher.set_seq1(choice)
        ratio = matcher.ratio()
        if ratio >= cutoff:
            scored.append((-ratio, choice))
    return [choice for _, choice in sorted(scored)][:n]


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest choice, or an empty string when none is close."""
    near = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {near[0]!r}?" if near else ""
