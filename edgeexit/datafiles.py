"""Input files for ``edgeexit run`` (and ``bench``/``calibrate``): ``.npy`` and ``.npz``.

An ``.npz`` holds one array per package input, named after it, and optionally
``labels``.  A single-input package also takes a ``.npy`` or an ``.npz`` holding one
lone array (plus, optionally, ``labels``).  Pickled objects are never loaded.  A package
that ships its tokenizer also takes a UTF-8 text file, one text per line (``load_text_lines``),
and labelled texts as a table: ``.csv``, ``.tsv`` or ``.jsonl`` with a text and a label column
(``load_labelled_texts``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ._atomic import replace_atomically
from ._names import did_you_mean
from .errors import InputFileError

LABELS_KEY = "labels"
# The longest line ``load_text_lines`` takes, in characters: far more than any package reads (texts
# are cut to max_tokens tokens), small enough that one line never costs more than a few MiB.
MAX_LINE_CHARS = 1 << 20
_UNDECODED = re.compile("[\udc80-\udcff]")   # what errors="surrogateescape" makes of a byte that is not UTF-8


def _batch_array(array: np.ndarray, path: Path, name: str) -> np.ndarray:
    if array.ndim == 0:
        raise InputFileError(
            f"{path}: {name!r} is a single number (a 0-d array); inputs have a leading batch axis, "
            "e.g. np.save(path, x[None]) for one sample"
        )
    return array


def load_input_file(
    path: str | os.PathLike[str], input_names: Sequence[str], ignore: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays keyed by input name, and the labels if the file has them (arrays named in
    ``ignore`` are left out, e.g. a seq2seq file's reference answers)."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{p} is a folder; pass an .npy or .npz file")
    if not p.is_file():
        raise InputFileError(f"input file {p} does not exist")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise InputFileError(f"cannot read {p}: {exc.strerror or exc}") from None
    if magic not in (b"\x93NUMPY",) and not magic.startswith(b"PK"):
        raise InputFileError(
            f"{p} is not an .npy or .npz file (it starts with {magic!r}, not numpy's b'\\x93NUMPY' or a zip's "
            "b'PK'); save arrays with np.save / np.savez"
        )
    try:
        data = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise InputFileError(f"{p}: cannot read it without unpickling objects ({exc}); save plain arrays") from None
    except Exception as exc:
        raise InputFileError(f"{p} is not a readable .npy/.npz file: {exc}") from None
    if isinstance(data, np.ndarray):
        if len(input_names) != 1:
            raise InputFileError(
                f"{p} holds one array but the package has inputs {list(input_names)}; save an .npz with "
                "one array per input name (np.savez(path, **{name: array}))"
            )
        return {input_names[0]: _batch_array(data, p, input_names[0])}, None
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:   # an object array needs pickle, which is never loaded
        raise InputFileError(f"{p}: an array in it needs unpickling ({exc}); save numeric arrays only") from None
    except Exception as exc:    # a damaged member: zlib/zipfile/format errors
        raise InputFileError(f"{p} is a damaged .npz file: {exc}") from None
    labels = arrays.pop(LABELS_KEY, None)
    for key in ignore:
        arrays.pop(key, None)
    if set(arrays) == set(input_names):
        inputs = arrays
    elif len(input_names) == 1 and len(arrays) == 1:
        inputs = {input_names[0]: next(iter(arrays.values()))}
    else:
        missing = sorted(set(input_names) - set(arrays))
        unknown = sorted(set(arrays) - set(input_names))
        raise InputFileError(
            f"{p} has arrays {sorted(arrays)} but the package needs {list(input_names)} "
            f"(missing {missing}, unknown {unknown}); name the arrays after the inputs, plus optional "
            f"{LABELS_KEY!r}"
        )
    inputs = {name: _batch_array(array, p, name) for name, array in inputs.items()}
    n = next(iter(inputs.values())).shape[0] if next(iter(inputs.values())).ndim else 0
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != n:
            raise InputFileError(
                f"{p}: 'labels' has shape {labels.shape} but the inputs hold {n} samples; "
                "give one integer label per sample"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputFileError(f"{p}: 'labels' must be integers, got dtype {labels.dtype}")
    return inputs, labels


def load_text_lines(path: str | os.PathLike[str]) -> list[str]:
    """The lines of a UTF-8 text file, one input text each (``\\n``, ``\\r\\n`` or ``\\r`` ends a line), so
    result row i is line i + 1.  Blank lines at the end are dropped; a blank line before a text is refused
    (it would shift every later row), as is a line over ``MAX_LINE_CHARS`` characters, naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"input file {p} does not exist" if not p.exists() else f"{p} is not a file")
    texts: list[str] = []
    blank: list[int] = []
    try:   # a BOM is no text; undecodable bytes come through as surrogates, to be named with their line
        with open(p, encoding="utf-8-sig", errors="surrogateescape") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 2), ""), start=1):
                text = line[:-1] if line.endswith("\n") else line
                if len(text) > MAX_LINE_CHARS:
                    raise InputFileError(
                        f"{p}: line {number} has over {MAX_LINE_CHARS:,} characters, the most a line may hold; a "
                        "package reads only its first max_tokens tokens anyway. Cut the line, or split it into "
                        "several texts, one per line"
                    )
                bad = _UNDECODED.search(text)
                if bad is not None:
                    raise InputFileError(f"{p} is not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} on line "
                                         f"{number}); save it as UTF-8")
                if text.strip():
                    if blank:
                        raise InputFileError(
                            f"{p}: line {blank[0]} is blank{f' (and {len(blank) - 1} more)' if len(blank) > 1 else ''}"
                            "; results are one row per line, so a blank line would shift every later row. Remove "
                            "blank lines, or put a text on them")
                    texts.append(text.strip())
                else:
                    blank.append(number)
    except OSError as exc:
        raise InputFileError(f"cannot read {p}: {exc.strerror or exc}") from None
    if not texts:
        raise InputFileError(f"{p} holds no text; write one input text per line")
    return texts


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def _table_rows(p: Path) -> list[dict[str, object]]:
    suffix = p.suffix.lower()
    with open(p, encoding="utf-8-sig", newline="") as f:
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"{p}: line {number} is not JSON ({exc.msg}); write one JSON object per "
                                         "line") from None
                if not isinstance(row, dict):
                    raise InputFileError(f"{p}: line {number} is not a JSON object; write one object per line, "
                                         'e.g. {"text": "...", "label": "..."}')
                rows.append(row)
            return rows
        return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))


def load_labelled_texts(path: str | os.PathLike[str], text_column: str = "text",
                        label_column: str = "label") -> tuple[list[str], list[str]]:
    """Texts and their labels (as strings) from a ``.csv``, ``.tsv`` (with a header row) or ``.jsonl``
    file; every row needs a non-blank text and a label, and a row that lacks one is named."""
    p = Path(path)
    if p.suffix.lower() not in TABLE_SUFFIXES:
        raise InputFileError(f"{p}: labelled texts come as {', '.join(TABLE_SUFFIXES)} (a header row naming the "
                             f"{text_column!r} and {label_column!r} columns)")
    if not p.is_file():
        raise InputFileError(f"input file {p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        rows = _table_rows(p)
    except UnicodeDecodeError:
        raise InputFileError(f"{p} is not UTF-8 text; save it as UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise InputFileError(f"cannot read {p}: {exc}") from None
    if not rows:
        raise InputFileError(f"{p} holds no rows; write a header row, then one labelled text per row")
    columns = [str(c) for c in rows[0] if c is not None]
    for what, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise InputFileError(f"{p} has no {what} column {column!r}; its columns: {columns}."
                                 f"{did_you_mean(column, columns)} Pass --{what}-column NAME")
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if p.suffix.lower() != ".jsonl" else 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(f"{p}: row {number} has no text in column {text_column!r}; every row needs one")
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            raise InputFileError(f"{p}: row {number} has no label in column {label_column!r}; every row needs one")
        texts.append(text.strip())
        labels.append(str(label).strip())
    return texts, labels


def label_indices(values: Sequence[str], names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class indices of ``values`` and the class names: by name where ``names`` are given (an
    integer in range is taken as an index when it is no name), else the sorted distinct values."""
    if names is None:
        distinct = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit()
                                                      else 0, v))
        names = list(distinct)
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        if v in index:
            out[i] = index[v]
        elif v.isdigit() and int(v) < len(names):
            out[i] = int(v)
        else:
            raise InputFileError(f"label {v!r} (row {i + 1} of the data) is not one of the model's classes "
                                 f"{list(names)[:20]}.{did_you_mean(v, names)}")
    return out, list(names)


def save_results_atomic(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``.npz`` or ``.csv`` results via a temp file + ``os.replace``."""
    dest = Path(path)
    suffix = dest.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise InputFileError(f"output {dest} must end in .npz or .csv")

    def write(f: BinaryIO) -> None:
        if suffix == ".npz":
            np.savez(f, **dict(arrays))  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
            return
        cols = {k: v for k, v in arrays.items() if v.ndim == 1}
        table = np.column_stack([v.astype(np.float64) if v.dtype.kind == "f" else v for v in cols.values()])
        fmt = ["%.6g" if v.dtype.kind == "f" else "%d" for v in cols.values()]
        np.savetxt(f, table, delimiter=",", header=",".join(cols), comments="", fmt=fmt)

    return replace_atomically(dest, write)
