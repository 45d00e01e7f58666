"""WordNet's noun definitions as a labelled text task: the parser on text in data.noun's format,
and the real Debian files (wordnet-base) when installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeexit.errors import DataError, InputError
from edgeexit.zoo.wordnet import CATEGORIES, load_wordnet, parse_data_noun, wordnet_dir, wordnet_splits

SAMPLE = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license. | not a synset
00015388 03 n 01 animal 0 001 @ 00004475 n 0000 | a living organism characterized by voluntary movement
02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"
02121620 05 n 01 cat 0 001 @ 02120997 n 0000 | feline mammal usually having thick soft fur;  "cats purr"; "b"
07609840 13 n 01 dessert 0 001 @ 07557434 n 0000 | a dish served as the last course of a meal
04379243 06 n 01 table 0 001 @ 03405725 n 0000 | a piece of furniture having a smooth flat top
09999999 06 n 01 twin 0 000 | a member of the genus Canis
00030358 04 n 01 act 0 001 @ 00001930 n 0000 | something that people do or cause to happen
"""


def test_definitions_are_parsed_without_examples_or_the_licence():
    parsed = parse_data_noun(SAMPLE)
    assert parsed == [
        ("noun.Tops", "a living organism characterized by voluntary movement"),
        ("noun.animal", "a member of the genus Canis"),
        ("noun.animal", "feline mammal usually having thick soft fur"),
        ("noun.food", "a dish served as the last course of a meal"),
        ("noun.artifact", "a piece of furniture having a smooth flat top"),
        ("noun.artifact", "a member of the genus Canis"),
        ("noun.act", "something that people do or cause to happen"),
    ]


def test_categories_keep_a_repeated_definition_once(tmp_path, monkeypatch):
    (tmp_path / "data.noun").write_text(SAMPLE)
    monkeypatch.setenv("EDGEEXIT_WORDNET_DIR", str(tmp_path))
    texts, labels = load_wordnet(("noun.animal", "noun.food", "noun.artifact"))
    assert texts == ["a member of the genus Canis", "feline mammal usually having thick soft fur",
                     "a dish served as the last course of a meal", "a piece of furniture having a smooth flat top"]
    assert labels.tolist() == [0, 0, 1, 2]
    with pytest.raises(InputError, match=r"unknown WordNet noun categories \['noun\.dogs'\]"):
        load_wordnet(("noun.dogs",))
    with pytest.raises(InputError, match=r"the splits ask for 13,000 definitions"):
        wordnet_splits(0, ("noun.animal", "noun.food"))
    monkeypatch.setenv("EDGEEXIT_WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        load_wordnet()


def _count_by_hand(path: Path) -> dict[int, set[str]]:
    """Distinct definitions per lexicographer file number, read with plain string splitting."""
    found: dict[int, set[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(" ") or " | " not in line:
            continue
        number = int(line.split(" ")[1])
        gloss = line.split(" | ", 1)[1]
        quotes = [i for i in range(len(gloss)) if gloss[i] == '"' and gloss[:i].rstrip().endswith(";")]
        cut = min(quotes or [len(gloss)])
        definition = " ".join(gloss[:cut].rstrip().removesuffix(";").split()).strip(" ;")
        if definition:
            found.setdefault(number, set()).add(definition)
    return found


def test_the_real_wordnet_splits_are_large_disjoint_and_stratified():
    path = wordnet_dir() / "data.noun"
    if not path.is_file():
        pytest.skip("WordNet is not installed (apt-get install wordnet-base)")
    texts, labels = load_wordnet()
    by_hand = _count_by_hand(path)
    numbers = {"noun.animal": 5, "noun.plant": 20, "noun.food": 13, "noun.artifact": 6, "noun.person": 18}
    assert set(texts) == set().union(*(by_hand[numbers[c]] for c in CATEGORIES))
    for c, name in enumerate(CATEGORIES):     # a definition in two files belongs to the first
        earlier = set().union(set(), *(by_hand[numbers[n]] for n in CATEGORIES[:c]))
        assert {t for t, y in zip(texts, labels) if y == c} == by_hand[numbers[name]] - earlier
    splits = wordnet_splits(0)
    assert (len(splits.train), len(splits.test)) == (3000, 8000) and abs(len(splits.calibration) - 2000) <= 3
    parts = [set(splits.train.texts), set(splits.calibration.texts), set(splits.test.texts)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    share = np.bincount(labels) / len(labels)
    label_of = dict(zip(texts, labels.tolist()))
    for split in (splits.train, splits.calibration, splits.test):
        np.testing.assert_allclose(np.bincount(split.labels, minlength=5) / len(split), share, atol=0.002)
        assert [label_of[t] for t in split.texts] == split.labels.tolist()
    again = wordnet_splits(0)
    assert again.test.texts == splits.test.texts and wordnet_splits(1).test.texts != splits.test.texts
