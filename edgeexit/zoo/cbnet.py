"""CBNet (Mahmud et al.): a converting autoencoder makes hard digits easy for a light classifier.

The converter is a dense autoencoder, 784 -> h1 -> h2 -> h3 -> 784 with a sigmoid output,
trained with binary cross-entropy so that every training image of class c maps to ONE
fixed "easy" image of class c (its *exemplar*).  The light classifier is B-LeNet's
conv1 + branch 1, i.e. the first exit of a trained BranchyNet LeNet, unchanged.

Exemplars: for each class c, the training image of class c that the trained B-LeNet's
first exit classifies as c with the lowest entropy -Σ p ln p (float64 softmax; ties go
to the lowest index; if the first exit gets no image of class c right, the lowest-entropy
image of class c).  Only the TRAIN split is looked at.

Exported as a ``pipeline`` package (beyond the paper, which has no way back for an image
the autoencoder converted badly)::

    stage0 "converter"  reads image      -> carry0_0 (the converted image)
    stage1 "light"      reads carry0_0   -> light exit (entropy policy, calibrated threshold)
    stage2 "fallback"   reads image      -> carry2_0 (B-LeNet conv1 on the ORIGINAL image)
    stage3 "trunk"      reads carry2_0   -> final exit (the rest of the full LeNet)

so exit 0 is the light path and exit 1 the fallback path, and ``full.onnx`` is the full
LeNet on the original image.  ``fallback=False`` exports only stages 0-1 (the paper's
CBNet: the light exit is the final exit and always accepts).

Example:
    >>> build = build_cbnet(seed=0)                                   # doctest: +SKIP
    >>> export_cbnet(build, "cbnet.eexit").threshold                  # doctest: +SKIP
    >>> ExitSession("cbnet.eexit").run(images).exit_index             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets import MNIST_PREPROCESSING, Split, Splits, load_digits8, mnist5k_splits, split
from ..errors import DataError, ModelSpecError
from ..export.model import EarlyExitModel
from ..measure import LatencyStats
from . import read_tensors
from .blenet import blenet as make_blenet
from .quickstart import time_batch1_many
from .train import train_early_exit

ProgressFactory = Callable[[str, int], Any]

# Defaults from the paper's search space (h1 ∈ {784, 512}, h2 ∈ {384, 256}, h3 ∈ {128, 64, 32}):
# the smallest choice in every layer.  The target of every image is one of only ten
# exemplars, so the code has to carry little more than the class and capacity is not what
# limits accuracy; the cost is what CBNet is about, and it is dominated by the first and last
# layers (784·h1 and h3·784 multiply-adds), so 512 and 32 are the cheap ends.  (512, 256, 32)
# is 0.57 M multiply-adds per image, about half of the full LeNet's 1.14 M; (784, 384, 128)
# would be 1.06 M, as much as the LeNet it is meant to shortcut.
DEFAULT_SIZES = (512, 256, 32)
SEARCH_SPACE = ((784, 512), (384, 256), (128, 64, 32))
DATASETS = ("mnist5k", "digits")
IMAGE_SHAPE = (1, 28, 28)
DIGITS_PREPROCESSING = {
    "layout": "NCHW", "pixel_scale": 1 / 16, "source": "sklearn load_digits",
    "resize": "8x8 -> 20x20 bilinear (align_corners=False), zero-padded by 4 to 28x28 (MNIST's 20x20 box)",
}
WEIGHTS_FORMAT = "edgeexit-cbnet-1"


# --- the converter ---------------------------------------------------------------------


class ConvertingAutoencoder(nn.Module):
    """Dense autoencoder 784 -> h1 -> h2 -> h3 -> 784 (ReLU between, sigmoid out).

    Input and output are (N, 1, 28, 28) images in [0, 1].  ``logits`` gives the output
    before the sigmoid (training uses the numerically safe ``BCEWithLogitsLoss``).

    Example:
        >>> ae = ConvertingAutoencoder()
        >>> ae(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, h1: int = DEFAULT_SIZES[0], h2: int = DEFAULT_SIZES[1], h3: int = DEFAULT_SIZES[2]) -> None:
        super().__init__()
        sizes = (h1, h2, h3)
        if not all(type(h) is int and h > 0 for h in sizes):
            raise ModelSpecError(
                f"autoencoder sizes must be positive integers, got {sizes}; the paper's search space is "
                f"h1 in {SEARCH_SPACE[0]}, h2 in {SEARCH_SPACE[1]}, h3 in {SEARCH_SPACE[2]}"
            )
        self.sizes = sizes
        pixels = math.prod(IMAGE_SHAPE)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(pixels, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, h3), nn.ReLU(),
            nn.Linear(h3, pixels),
        )
        self.out = nn.Sequential(nn.Sigmoid(), nn.Unflatten(1, IMAGE_SHAPE))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the sigmoid, flat: (N, 784)."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))


# --- exemplars and training ---------------------------------------------------------------


def _check_blenet(model: EarlyExitModel) -> None:
    if not (isinstance(model, EarlyExitModel) and model.num_stages == 2 and model.exit_stage_indices == [0, 1]
            and model.reads == ["inputs", 0]):
        raise ModelSpecError(
            "CBNet needs a B-LeNet-shaped EarlyExitModel (2 stages in a chain, an exit after each: conv1 + "
            "branch 1, then the trunk + final classifier), e.g. edgeexit.zoo.blenet() trained with "
            f"train_early_exit; got {type(model).__name__}"
        )


@torch.no_grad()
def first_exit_logits(blenet: EarlyExitModel, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """B-LeNet's first-exit logits (conv1 + branch 1) for images ``x``, float32 (N, classes)."""
    _check_blenet(blenet)
    was_training = blenet.training
    blenet.eval()
    try:
        conv1, branch1 = blenet.stages[0], blenet.exit_at(0)
        assert branch1 is not None
        out = [branch1(conv1(torch.from_numpy(x[s:s + batch_size]))).numpy() for s in range(0, len(x), batch_size)]
    finally:
        blenet.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def entropy(logits: np.ndarray) -> np.ndarray:
    """-Σ p ln p of the softmax of each row, in float64 (the ``entropy`` policy's score)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=1)


def pick_exemplars(blenet: EarlyExitModel, x: np.ndarray, y: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Index into ``x`` of each class's exemplar: the image the first exit is most sure of.

    For class c: among the images labelled c that the first exit also predicts as c, the
    one with the lowest first-exit entropy (ties: the lowest index); if the first exit gets
    none of them right, the lowest-entropy image labelled c.  Pass the TRAIN split.

    Returns an int64 array of shape (num_classes,).
    """
    y = np.asarray(y)
    if len(x) != len(y):
        raise DataError(f"pick_exemplars got {len(x)} images and {len(y)} labels")
    logits = first_exit_logits(blenet, x)
    scores, predicted = entropy(logits), logits.argmax(axis=1)
    picked = np.empty(num_classes, dtype=np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if members.size == 0:
            raise DataError(f"class {c} has no image in the split given to pick_exemplars; every class needs one")
        right = members[predicted[members] == c]
        pool = right if right.size else members
        picked[c] = pool[np.argmin(scores[pool])]  # argmin returns the first (lowest index) minimum
    return picked


def train_converter(
    ae: ConvertingAutoencoder,
    x: np.ndarray,
    y: np.ndarray,
    exemplars: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ConvertingAutoencoder:
    """Train the converter so that every image of class c becomes ``x[exemplars[c]]``.

    Binary cross-entropy between the output and the class exemplar, Adam with a one-cycle
    learning rate (as ``train_early_exit``), seeded shuffling: the same seed, data and
    thread count give the same weights.  ``progress`` is called with the number of
    samples after each step.
    """
    y = np.asarray(y)
    exemplars = np.asarray(exemplars)
    if y.size and (y.min() < 0 or y.max() >= len(exemplars)):
        raise DataError(f"labels run from {y.min()} to {y.max()} but {len(exemplars)} exemplars were given")
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    xt = torch.from_numpy(x)
    targets = torch.from_numpy(x[exemplars]).flatten(1)      # (classes, 784), in [0, 1]
    yt = torch.from_numpy(y)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps))
    loss_fn = nn.BCEWithLogitsLoss()
    ae.train()
    for _ in range(epochs):
        order = torch.from_numpy(gen.permutation(len(y)))
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(ae.logits(xt[idx]), targets[yt[idx]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress(len(idx))
    return ae.eval()


# --- the pipeline model ------------------------------------------------------------------


def cbnet_model(blenet: EarlyExitModel, ae: nn.Module, *, fallback: bool = True) -> EarlyExitModel:
    """CBNet as an ``EarlyExitModel`` sharing B-LeNet's trained modules (no copies).

    With ``fallback``: stages [converter, light conv1, fallback conv1, trunk], exits
    [None, branch 1, None, final], ``reads=["inputs", 0, "inputs", 2]`` -- the light conv1
    reads the converted image, the fallback conv1 (the same module) the original one.
    Without: stages [converter, light conv1], exits [None, branch 1].
    """
    _check_blenet(blenet)
    conv1, trunk = blenet.stages[0], blenet.stages[1]
    branch1, final = blenet.exit_at(0), blenet.exit_at(1)
    if not fallback:
        return EarlyExitModel(stages=[ae, conv1], exits=[None, branch1]).eval()
    return EarlyExitModel(stages=[ae, conv1, conv1, trunk], exits=[None, branch1, None, final],
                          reads=["inputs", 0, "inputs", 2]).eval()


# --- data ---------------------------------------------------------------------------------


def resize_digits(x8: np.ndarray) -> np.ndarray:
    """sklearn's 8x8 digits as MNIST-like 28x28 images.

    Bilinear upsampling 8x8 -> 20x20 (``align_corners=False``), then 4 zero pixels on each
    side: MNIST centres its digits in a 20x20 box inside 28x28.  Values stay in [0, 1].
    """
    t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x8, dtype=np.float32)),
                                        size=(20, 20), mode="bilinear", align_corners=False)
    t = torch.nn.functional.pad(t, (4, 4, 4, 4))
    return np.ascontiguousarray(t.clamp(0.0, 1.0).numpy(), dtype=np.float32)


def digits28_splits(seed: int = 0) -> Splits:
    """sklearn digits resized to 28x28 (``resize_digits``): 1,197 train / 300 calibration / 300 test, seeded."""
    x8, y = load_digits8()
    return split(resize_digits(x8), y, seed=seed, calibration=300, test=300)


def dataset_splits(dataset: str, seed: int = 0) -> Splits:
    """Seeded splits of ``mnist5k`` (3,000/1,000/1,000) or ``digits`` (1,197/300/300)."""
    if dataset == "mnist5k":
        return mnist5k_splits(seed)
    if dataset == "digits":
        return digits28_splits(seed)
    raise DataError(f"unknown dataset {dataset!r}; CBNet trains on one of {', '.join(DATASETS)}")


# --- building, saving, exporting ---------------------------------------------------------


@contextlib.contextmanager
def _no_bar(_label: str, _length: int) -> Iterator[Any]:
    class _Bar:
        def update(self, _n: int) -> None:
            pass
    yield _Bar()


@dataclass(frozen=True)
class CBNetBuild:
    """A trained CBNet: the B-LeNet, the converter, the exemplars and the data they came from.

    ``exemplars`` index ``splits.train``.
    """

    blenet: EarlyExitModel
    converter: ConvertingAutoencoder
    exemplars: np.ndarray
    splits: Splits
    dataset: str
    seed: int
    epochs: dict[str, int] = field(default_factory=dict)

    def model(self, fallback: bool = True) -> EarlyExitModel:
        return cbnet_model(self.blenet, self.converter, fallback=fallback)

    def exemplar_images(self) -> np.ndarray:
        """The ten target images, (classes, 1, 28, 28)."""
        return self.splits.train.x[self.exemplars]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the weights and how they were made to one ``.pt`` file (tensors and plain values only)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save({
            "format": WEIGHTS_FORMAT, "dataset": self.dataset, "seed": self.seed, "epochs": dict(self.epochs),
            "sizes": list(self.converter.sizes), "exemplars": torch.from_numpy(self.exemplars),
            "blenet": self.blenet.state_dict(), "converter": self.converter.state_dict(),
        }, tmp)
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CBNetBuild:
        """Read a file written by ``save``; the splits are rebuilt from its dataset and seed."""
        saved = read_tensors(path, "a CBNet weights file written by CBNetBuild.save")
        if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
            raise ModelSpecError(
                f"{path} is not a CBNet weights file written by CBNetBuild.save (format {WEIGHTS_FORMAT!r}); "
                "build one with build_cbnet(...).save(path)"
            )
        try:
            blenet = make_blenet()
            blenet.load_state_dict(saved["blenet"])
            ae = ConvertingAutoencoder(*saved["sizes"])
            ae.load_state_dict(saved["converter"])
            return cls(blenet=blenet.eval(), converter=ae.eval(), exemplars=saved["exemplars"].numpy(),
                       splits=dataset_splits(saved["dataset"], saved["seed"]), dataset=saved["dataset"],
                       seed=saved["seed"], epochs=dict(saved["epochs"]))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:   # keys missing or odd
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelSpecError(f"{path} says it is a CBNet weights file but does not fit CBNet "
                                 f"({type(exc).__name__}: {first[:200]}); build one with build_cbnet(...).save(path)"
                                 ) from None


def build_cbnet(
    *,
    seed: int = 0,
    dataset: str = "mnist5k",
    blenet_epochs: int = 20,
    ae_epochs: int = 30,
    sizes: Sequence[int] = DEFAULT_SIZES,
    blenet: EarlyExitModel | None = None,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] | None = print,
) -> CBNetBuild:
    """Train B-LeNet (unless a trained ``blenet`` is given), pick the exemplars, train the converter.

    Args:
        seed: seeds the splits, the initial weights and the shuffling.
        dataset: ``mnist5k`` (MNIST-5k, 3,000 train) or ``digits`` (sklearn digits resized
            to 28x28, 1,197 train); see ``dataset_splits``.
        blenet_epochs, ae_epochs: training epochs of the two networks (``blenet_epochs`` is
            only recorded when a trained ``blenet`` is given).
        sizes: the converter's (h1, h2, h3).
        blenet: a B-LeNet already trained on this dataset's train split (skips its training).
        progress: ``progress(label, total) -> context manager with .update(n)`` (e.g. a
            click progress bar), as ``run_quickstart`` takes.
        log: where one-line summaries go (None: silent).

    Example:
        >>> build = build_cbnet(seed=0, blenet_epochs=20, ae_epochs=30)   # doctest: +SKIP
    """
    bar = progress or _no_bar
    say = log or (lambda _line: None)
    splits = dataset_splits(dataset, seed)
    train = splits.train
    if blenet is None:
        torch.manual_seed(seed)
        blenet = make_blenet()
        with bar(f"training B-LeNet ({blenet_epochs} epochs)", blenet_epochs * len(train)) as b:
            train_early_exit(blenet, train.x, train.y, epochs=blenet_epochs, seed=seed, progress=b.update)
    else:
        _check_blenet(blenet)
        blenet.eval()
    exemplars = pick_exemplars(blenet, train.x, train.y)
    say(f"exemplars (train indices, lowest first-exit entropy per class): {exemplars.tolist()}")
    torch.manual_seed(seed)
    ae = ConvertingAutoencoder(*sizes)
    with bar(f"training the converter {tuple(sizes)} ({ae_epochs} epochs)", ae_epochs * len(train)) as b:
        train_converter(ae, train.x, train.y, exemplars, epochs=ae_epochs, seed=seed, progress=b.update)
    return CBNetBuild(blenet=blenet.eval(), converter=ae, exemplars=exemplars, splits=splits, dataset=dataset,
                      seed=seed, epochs={"blenet": blenet_epochs, "converter": ae_epochs})


@dataclass(frozen=True)
class CBNetExport:
    """What ``export_cbnet`` wrote: the package, its light-exit threshold and how it was chosen."""

    package: Path
    fallback: bool
    threshold: float | None
    calibration: dict[str, Any] | None


STAGE_NAMES = ("converter", "light", "fallback", "trunk")


def export_cbnet(
    build: CBNetBuild,
    path: str | os.PathLike[str],
    *,
    fallback: bool = True,
    threshold: float | None = None,
    max_drop: float = 0.003,
    calibration: Split | None = None,
    name: str | None = None,
    dynamo: bool = False,
    compile: bool | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> CBNetExport:
    """Export CBNet as a pipeline package (with ``fallback``) or as the paper's CBNet (without).

    With ``fallback`` and no ``threshold``, the light exit's entropy threshold is the most
    permissive one whose accuracy drop against the full LeNet (the fallback exit) stays
    within ``max_drop`` on the calibration split (``shared_threshold``), and ``full.onnx``
    holds the full LeNet.  Stages are named ``converter``, ``light``, ``fallback``,
    ``trunk`` in the manifest, which also gets a ``cbnet`` entry (paths, exemplars, sizes).
    """
    from ..calibrate import record_exits, shared_threshold
    from ..export import export_package
    from ..package import update_manifest
    from ..runtime import ExitSession

    if threshold is not None and not fallback:
        raise ModelSpecError("threshold= applies to the fallback variant only: without fallback the light exit "
                             "is the final exit and always accepts")
    if threshold is not None and not math.isfinite(threshold):
        raise ModelSpecError(f"threshold must be finite, got {threshold}")
    model = build.model(fallback=fallback)
    example = {"image": torch.from_numpy(build.splits.train.x[:8])}
    preprocessing = MNIST_PREPROCESSING if build.dataset == "mnist5k" else DIGITS_PREPROCESSING
    export_package(model, example, path, policy="entropy", thresholds=[0.0] if fallback else [],
                   labels=[str(i) for i in range(10)], name=name or ("cbnet" if fallback else "cbnet-light"),
                   include_full_model=fallback, preprocessing=preprocessing, seed=build.seed, dynamo=dynamo,
                   compile=compile, overwrite=overwrite, log=log)
    cal_info = None
    if fallback and threshold is None:
        cal = calibration or build.splits.calibration
        records = record_exits(ExitSession(path), cal.x, cal.y)
        threshold, cal_acc, shares = shared_threshold(records, max_drop)
        cal_info = {"samples": len(cal), "max_drop": max_drop, "threshold": threshold, "accuracy": cal_acc,
                    "full_lenet_accuracy": records.full_accuracy, "path_shares": [float(s) for s in shares]}
        if log is not None:
            log(f"calibration split: light-exit entropy threshold {threshold:.4g} keeps accuracy {cal_acc:.1%} "
                f"(full LeNet {records.full_accuracy:.1%}); paths light/fallback {np.round(shares, 3).tolist()}")
    reads = {"converter": "image", "light": "carry0_0 (the converted image)"}
    if fallback:
        reads |= {"fallback": "image (the original, not the converted one)", "trunk": "carry2_0"}

    def _describe(manifest: dict[str, Any]) -> None:
        for stage, stage_name in zip(manifest["stages"], STAGE_NAMES):
            stage["name"] = stage_name
        if fallback:
            manifest["stages"][1]["exit"]["threshold"] = threshold
        manifest["cbnet"] = {
            "paths": {"light": "exit 0: converter -> light"} | (
                {"fallback": "exit 1: fallback -> trunk, on the original image"} if fallback else {}),
            "reads": reads,
            "converter_sizes": list(build.converter.sizes),
            "exemplars": {"split": "train", "indices": build.exemplars.tolist(),
                          "rule": "per class, the train image the B-LeNet first exit classifies right with "
                                  "the lowest entropy"},
            "dataset": build.dataset, "seed": build.seed,
        }
    update_manifest(path, _describe)
    return CBNetExport(Path(path), fallback, threshold, cal_info)


# --- quickstart -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CBNetQuickstartReport:
    """Test-split figures of the full LeNet, CBNet and CBNet with fallback, batch 1."""

    dataset: str
    packages: dict[str, Path]          # "cbnet" (with fallback), "cbnet-light"
    weights: Path                      # CBNetBuild.save file: B-LeNet, converter, exemplars
    sizes: tuple[int, int, int]        # train / calibration / test
    converter_sizes: tuple[int, ...]
    exemplars: list[int]
    threshold: float
    accuracy: dict[str, float]         # "full", "light", "fallback"
    path_shares: list[float]           # CBNet with fallback: [light, fallback]
    latency: dict[str, LatencyStats]   # "full", "light", "fallback"

    def speedup_p50(self, which: str) -> float:
        return self.latency["full"].p50 / self.latency[which].p50

    def lines(self) -> list[str]:
        """The report as printable lines (what ``edgeexit quickstart --model cbnet`` shows)."""
        train_n, cal_n, test_n = self.sizes
        out = [f"CBNet on {self.dataset} ({train_n} train / {cal_n} calibration / {test_n} test); "
               f"test split, batch 1, CPU, 1 thread; converter {self.converter_sizes}",
               f"{'':<30}{'accuracy':>9}{'light':>8}{'fallback':>9}{'p50 ms':>9}{'p95 ms':>9}{'speedup':>9}"]
        rows = [("full LeNet (onnxruntime)", "full", "-", "100.0%"),
                ("CBNet (converter + light)", "light", "100.0%", "-"),
                ("CBNet + fallback", "fallback", f"{self.path_shares[0]:.1%}", f"{self.path_shares[1]:.1%}")]
        for label, key, light, fb in rows:
            s = self.latency[key]
            out.append(f"{label:<30}{self.accuracy[key]:>9.1%}{light:>8}{fb:>9}{s.p50:>9.3f}{s.p95:>9.3f}"
                       f"{self.speedup_p50(key):>8.2f}x")
        out.append(f"light-exit entropy threshold {self.threshold:.4g} (calibration split); exemplars "
                   f"(train indices) {self.exemplars}")
        out.append("packages: " + ", ".join(str(p) for p in self.packages.values()) + f"; weights: {self.weights}")
        return out


def run_cbnet_quickstart(
    *,
    blenet_epochs: int = 20,
    ae_epochs: int = 30,
    seed: int = 0,
    dataset: str = "mnist5k",
    output_dir: str | Path = "edgeexit-quickstart",
    max_drop: float = 0.003,
    sizes: Sequence[int] = DEFAULT_SIZES,
    progress: ProgressFactory = _no_bar,
    log: Callable[[str], None] = print,
) -> CBNetQuickstartReport:
    """Train B-LeNet and the converter, export CBNet with and without fallback, time the test split.

    Writes ``OUTPUT_DIR/cbnet.eexit`` (with fallback; its ``full.onnx`` is the full LeNet),
    ``OUTPUT_DIR/cbnet-light.eexit`` (the paper's CBNet) and ``OUTPUT_DIR/cbnet.pt`` (the
    trained weights, for ``CBNetBuild.load``).
    """
    import onnxruntime as ort

    from ..runtime import ExitSession
    from ..runtime._threads import session_options

    # one thread: these models are too small to gain from more, and one thread makes the
    # trained weights bit-for-bit reproducible on a given machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build = build_cbnet(seed=seed, dataset=dataset, blenet_epochs=blenet_epochs, ae_epochs=ae_epochs, sizes=sizes,
                            progress=progress, log=log)
    finally:
        torch.set_num_threads(previous)
    out = Path(output_dir)
    weights = build.save(out / "cbnet.pt")
    with_fb = export_cbnet(build, out / "cbnet.eexit", fallback=True, max_drop=max_drop, overwrite=True, log=log)
    light = export_cbnet(build, out / "cbnet-light.eexit", fallback=False, overwrite=True, log=log)
    assert with_fb.threshold is not None
    fb_session, light_session = ExitSession(with_fb.package), ExitSession(light.package)
    full = ort.InferenceSession(str(with_fb.package / "full.onnx"), session_options(1, False, False),
                                providers=["CPUExecutionProvider"])
    test = build.splits.test
    full_pred = full.run(None, {"image": test.x})[0].argmax(axis=1)
    light_pred = light_session.run(test.x).predictions
    fb_result = fb_session.run(test.x)
    stats = time_batch1_many(
        [lambda s: full.run(None, {"image": s}), light_session.run, fb_session.run], test.x, progress=progress)
    return CBNetQuickstartReport(
        dataset=dataset, packages={"cbnet": with_fb.package, "cbnet-light": light.package}, weights=weights,
        sizes=(len(build.splits.train), len(build.splits.calibration), len(test)),
        converter_sizes=tuple(build.converter.sizes), exemplars=build.exemplars.tolist(),
        threshold=with_fb.threshold,
        accuracy={"full": float((full_pred == test.y).mean()), "light": float((light_pred == test.y).mean()),
                  "fallback": float((fb_result.predictions == test.y).mean())},
        path_shares=(np.bincount(fb_result.exit_index, minlength=2) / len(test)).tolist(),
        latency=dict(zip(("full", "light", "fallback"), stats)),
    )
