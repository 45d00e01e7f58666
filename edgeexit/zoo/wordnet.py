"""A larger labelled text task that exists offline: WordNet's noun definitions by lexicographer file.

Debian's ``wordnet-base`` (``apt-get install wordnet-base``) installs WordNet 3.0 under
``/usr/share/wordnet``.  In ``data.noun`` every synset names the lexicographer file its
lexicographers filed it in (``noun.animal``, ``noun.plant``, ``noun.food``...; the numbers are
WordNet's ``lexnames``) and carries a gloss: a definition, often followed by example
sentences in quotes.  The task: given the definition alone (no headword, no examples), name
the file.  The default categories are five topical ones, 40,369 distinct definitions in all:
animal, plant, food, artifact and person.

Definitions that repeat are kept once, in the first of the categories (in the order given)
that has them.  The splits are
seeded and stratified by category, with sizes chosen for the benchmark: a small training set
is enough for linear heads on a frozen encoder, and the test split is large enough that a
1-point accuracy difference can be told from noise (3,000 train / 2,000 calibration / 8,000
test by default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError
from .fortunes import TextSplit, TextSplits

WORDNET_DIR = Path("/usr/share/wordnet")
# WordNet 3.0's lexicographer file numbers (lexnames(5WN)) of the noun files
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time",
}
CATEGORIES = ("noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.person")
SIZES = (3000, 2000, 8000)
_DATA_LINE = re.compile(r"^\d{8} (\d{2}) n ")
_EXAMPLES = re.compile(r';\s*"')     # the examples after a definition: ; "..."


def wordnet_dir() -> Path:
    """The folder of WordNet's database files (``EDGEEXIT_WORDNET_DIR`` overrides it)."""
    return Path(os.environ.get("EDGEEXIT_WORDNET_DIR", WORDNET_DIR))


def parse_data_noun(text: str) -> list[tuple[str, str]]:
    """(lexicographer file, definition) of every synset in a ``data.noun`` text; the licence
    header (lines starting with spaces) is skipped, and the examples after the definition
    (``; "..."``) are dropped."""
    out = []
    for line in text.splitlines():
        match = _DATA_LINE.match(line)
        if match is None or " | " not in line:
            continue
        gloss = line.split(" | ", 1)[1]
        definition = " ".join(_EXAMPLES.split(gloss, maxsplit=1)[0].split()).strip(" ;")
        lexname = LEXNAMES.get(int(match.group(1)))
        if definition and lexname is not None:
            out.append((lexname, definition))
    return out


def load_wordnet(categories: tuple[str, ...] = CATEGORIES, folder: Path | None = None) -> tuple[list[str], np.ndarray]:
    """Every definition of ``categories`` (deduplicated) and its category index."""
    unknown = [c for c in categories if c not in LEXNAMES.values()]
    if unknown:
        raise InputError(f"unknown WordNet noun categories {unknown}; choose among {sorted(LEXNAMES.values())}")
    path = (folder or wordnet_dir()) / "data.noun"
    if not path.is_file():
        raise DataError(f"{path} does not exist: install Debian's WordNet (apt-get install wordnet-base), or "
                             "point EDGEEXIT_WORDNET_DIR at a folder holding data.noun")
    per_category: dict[str, list[str]] = {name: [] for name in categories}
    for lexname, definition in parse_data_noun(path.read_bytes().decode("utf-8", errors="replace")):
        if lexname in per_category:
            per_category[lexname].append(definition)
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for index, name in enumerate(categories):     # a repeated definition goes to the first category listed
        for definition in per_category[name]:
            if definition not in seen:
                seen.add(definition)
                texts.append(definition)
                labels.append(index)
    return texts, np.array(labels, dtype=np.int64)


def wordnet_splits(seed: int = 0, categories: tuple[str, ...] = CATEGORIES, sizes: tuple[int, int, int] = SIZES,
                   folder: Path | None = None) -> TextSplits:
    """Seeded train / calibration / test splits of ``sizes``, each stratified by category (in
    proportion to the categories' sizes)."""
    texts, labels = load_wordnet(categories, folder)
    if sum(sizes) > len(texts):
        raise InputError(f"the splits ask for {sum(sizes):,} definitions; categories {list(categories)} hold "
                         f"{len(texts):,}")
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=len(categories))
    # each split's size shared among the categories in proportion, rounded by largest remainder so
    # the sizes are exact
    quotas = []
    for size in sizes:
        exact = size * counts / len(labels)
        take = np.floor(exact).astype(np.int64)
        take[np.argsort(take - exact, kind="stable")[:size - int(take.sum())]] += 1
        quotas.append(take)
    parts: list[list[int]] = [[], [], []]
    for c in range(len(categories)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for part, take in zip(parts, quotas):
            part.extend(idx[start:start + int(take[c])].tolist())
            start += int(take[c])
    made = []
    for part in parts:
        order = rng.permutation(np.array(part, dtype=np.int64))
        made.append(TextSplit([texts[i] for i in order], labels[order]))
    return TextSplits(made[0], made[1], made[2], categories=tuple(categories))
