"""Text to token-id inputs with a package's own tokenizer (the ``tokenizers`` package, optional).

The runtime-only install runs packages on token ids; where ``tokenizers`` is installed, a
package that ships its tokenizer (format version 7, ``text``) also takes text.  The tokenizer
is built from the verified bytes of the package's file, like the graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError, MissingExtraError
from ..package import Package

# A text is cut to ``max_tokens * MAX_CHARS_PER_TOKEN`` characters before it is tokenized, so one
# huge line costs no more than a text of that length (a 54 MB line took 66 s and 5.9 GB).  The
# first ``max_tokens`` tokens only differ from the uncut text's when they average over 64
# characters each (long runs of spaces, or words a WordPiece vocabulary turns into [UNK] anyway).
MAX_CHARS_PER_TOKEN = 64
# what a caller or the interpreter means to stop with; every other BaseException from the tokenizers
# library is its Rust code panicking (pyo3's PanicException derives from BaseException)
_STOPS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def load_tokenizer_bytes(data: bytes, max_tokens: int) -> Any:
    """A ``tokenizers.Tokenizer`` from JSON bytes, truncating to ``max_tokens``, no padding."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MissingExtraError("text input needs the tokenizers package (pip install tokenizers); without it, "
                                "pass token ids") from exc
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except _STOPS:
        raise
    except BaseException as exc:   # a bare Exception for a malformed file; a PanicException (BaseException) too
        raise InputError(f"the tokenizer file is not a tokenizers JSON file: {str(exc)[:200]}") from None
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def encode_batch(tokenizer: Any, texts: Sequence[str], pad_id: int = 0,
                 dtype: np.dtype | type = np.int64, truncated: list[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (n, longest), padded with ``pad_id``; each text is cut to
    ``MAX_CHARS_PER_TOKEN`` characters per token the tokenizer keeps before it is tokenized.
    ``truncated``, where given, gets the indices of the texts cut to ``max_tokens``."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string; wrap it: [text]")
    if len(texts) == 0:
        raise InputError("no texts given; pass at least one")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"texts must be strings; item(s) {bad[:10]} are not")
    cut = getattr(tokenizer, "truncation", None)
    limit = cut["max_length"] if isinstance(cut, dict) and "max_length" in cut else None
    if limit:   # tokenizers truncates only after tokenizing the whole text: cut it first (time, memory)
        if truncated is not None:
            truncated.extend(i for i, t in enumerate(texts) if len(t) > limit * MAX_CHARS_PER_TOKEN)
        texts = [t[:limit * MAX_CHARS_PER_TOKEN] for t in texts]
    try:
        encodings = tokenizer.encode_batch(list(texts))
    except _STOPS:
        raise
    except BaseException as exc:   # bare exceptions (a vocabulary without [UNK]); a regex that gives up panics
        raise InputError(f"the tokenizer could not encode the texts: {str(exc)[:200]}") from None
    rows = [e.ids[:limit] if limit else e.ids for e in encodings]   # added specials never exceed max_tokens
    if truncated is not None:
        cut_here = set(truncated)
        truncated.extend(i for i, e in enumerate(encodings) if i not in cut_here and getattr(e, "overflowing", None))
    length = max(1, max(len(r) for r in rows))
    ids = np.full((len(encodings), length), pad_id, dtype)
    mask = np.zeros((len(encodings), length), dtype)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


class PackageTokenizer:
    """The tokenizer a package ships, turning texts into its token-id inputs."""

    def __init__(self, package: Package) -> None:
        if package.text is None:
            raise InputError(f"{package.root} ships no tokenizer (no 'text' in its manifest): pass token ids, or "
                             "re-export it with export_package(..., text={'tokenizer': ...})")
        self.spec = package.text
        self.dtypes = {i.name: np.dtype(i.dtype) for i in package.inputs}
        self.tokenizer = load_tokenizer_bytes(package.read_verified(self.spec.tokenizer), self.spec.max_tokens)
        self.warned = False

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        cut: list[int] = []
        ids, mask = encode_batch(self.tokenizer, texts, self.spec.pad_id, self.dtypes[self.spec.ids], cut)
        if cut and not self.warned:   # once per session: a long file would repeat it on every batch
            self.warned = True
            logging.getLogger("edgeexit").warning(
                f"warning: {len(cut)} text(s) of this batch (the first: number {cut[0] + 1} in it) are longer than "
                f"the package's {self.spec.max_tokens} tokens and were cut; later batches are not reported")
        feeds = {self.spec.ids: ids}
        if self.spec.mask is not None:
            feeds[self.spec.mask] = mask.astype(self.dtypes[self.spec.mask])
        return feeds
