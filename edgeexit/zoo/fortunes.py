"""A real labelled text task that exists offline: Debian's ``fortunes`` quotations by category.

The ``fortunes`` package (``apt-get install fortunes``) installs its quotations under
``/usr/share/games/fortunes``, one file per category, entries separated by a line holding
``%``.  The task: given a quotation, name its category.  The default categories are the
five topical ones the package sorts real quotations into — computers, science, literature,
politics, food — about 2,800 quotations.

Each entry is read as UTF-8 (the ``.u8`` file where the package has one), its whitespace
collapsed, and an attribution line (one starting with ``--``) dropped, so the model reads the
quotation rather than a name; entries that repeat (in one category or across two) are kept
once, in the first category that has them, and empty ones are skipped.  Splits are seeded and
stratified by category: 60 % train, 20 % calibration, 20 % test.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "science", "literature", "politics", "food")
SPLIT = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: np.ndarray      # int64 category index

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextSplits:
    train: TextSplit
    calibration: TextSplit
    test: TextSplit
    categories: tuple[str, ...]


def fortunes_dir() -> Path:
    """The folder of Debian's fortunes (``EDGEEXIT_FORTUNES_DIR`` overrides it)."""
    return Path(os.environ.get("EDGEEXIT_FORTUNES_DIR", FORTUNES_DIR))


def parse_fortunes(text: str) -> list[str]:
    """The quotations of one fortunes file: entries between ``%`` lines, attribution lines
    (starting with ``--``) dropped, whitespace collapsed."""
    quotes = []
    for entry in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
        lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
        quote = " ".join(" ".join(lines).split())
        if quote:
            quotes.append(quote)
    return quotes


def load_fortunes(categories: tuple[str, ...] = CATEGORIES, folder: Path | None = None) -> tuple[list[str], np.ndarray]:
    """Every quotation of ``categories`` (deduplicated) and its category index."""
    root = folder or fortunes_dir()
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for index, name in enumerate(categories):
        path = root / f"{name}.u8" if (root / f"{name}.u8").is_file() else root / name
        if not path.is_file():
            raise DataError(f"{path} does not exist: install Debian's fortunes (apt-get install fortunes), or "
                                 "point EDGEEXIT_FORTUNES_DIR at a folder holding its category files")
        for quote in parse_fortunes(path.read_bytes().decode("utf-8", errors="replace")):
            if quote not in seen:
                seen.add(quote)
                texts.append(quote)
                labels.append(index)
    return texts, np.array(labels, dtype=np.int64)


def fortunes_splits(seed: int = 0, categories: tuple[str, ...] = CATEGORIES, folder: Path | None = None) -> TextSplits:
    """Seeded splits, stratified by category (60 / 20 / 20)."""
    texts, labels = load_fortunes(categories, folder)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in range(len(categories)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = round(SPLIT[0] * len(idx)), round((SPLIT[0] + SPLIT[1]) * len(idx))
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:])):
            part.extend(chunk.tolist())
    made = []
    for part in parts:
        order = rng.permutation(np.array(part, dtype=np.int64))
        made.append(TextSplit([texts[i] for i in order], labels[order]))
    return TextSplits(made[0], made[1], made[2], categories=tuple(categories))
