"""Int8 exit packages: quantize every stage graph with ``onnxruntime.quantization``.

A stage whose compute ops are matrix products only (MatMul/Gemm: MLPs, transformer
layers) is quantized dynamically: int8 weights, activations quantized at run time, no
calibration data needed.  A stage with a convolution is quantized statically in QDQ
format: activation ranges come from calibration data, and each stage is calibrated on
exactly the tensors it reads in the fp32 package, i.e. the model inputs or the carries
that the fp32 stages before it produce.  The optional ``full.onnx`` baseline is
quantized by the same rule so that benchmarks compare int8 with int8.

Dynamic quantization computes each activation's scale at run time over the whole tensor,
so a sample's int8 outputs depend slightly on the other samples in its batch (and
``ExitSession`` changes the batch between stages when samples leave); static QDQ scales
are fixed, with no such dependence.

Quantization shifts exit scores, so the fp32 thresholds no longer mean what they did:
pass labelled data (``calibration_labels``) to recalibrate them before the package is
written, or call ``recalibrate_shared_threshold`` afterwards.  The manifest records the
quantization in a top-level ``quantization`` object, including whether the thresholds
were recalibrated.

This module needs onnx and onnxruntime but never torch, so it can run on a device.

Why one file of ~620 lines: it is one loop over the stages (choose the mode, calibrate on exactly
the tensors the stage reads, quantize, check against fp32, write), plus the threshold
recalibration that must follow it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from .. import _leftovers as leftovers
from ..errors import ExportError, InputShapeError
from ..package import (
    FORMAT_VERSION,
    Package,
    check_replaceable,
    load_package,
    read_manifest,
    update_manifest,
    write_package,
)
from ..runtime._inputs import InputChecker
from ..runtime._threads import session_options

MODES = ("auto", "dynamic", "static")
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# MinMax calibration keeps every intermediate tensor of every batch it sees; a few hundred
# samples fix the activation ranges of a small CNN, and more mostly costs time and memory.
DEFAULT_MAX_CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
MATMUL_OPS = frozenset({"MatMul", "Gemm"})


class QuantizationError(ExportError):
    """onnxruntime.quantization failed, or produced a graph that does not fit the package."""


class QuantizationOptionError(QuantizationError, ValueError):
    """An option of ``quantize_package`` is invalid (mode, types, destination path)."""

    exit_code = 2


# --- calibration data ---------------------------------------------------------------


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds ``{name: array}`` to onnxruntime's calibrator in batches of ``batch_size``.

    Example:
        >>> reader = ArrayCalibrationReader({"carry0_0": c0}, batch_size=64)   # doctest: +SKIP
        >>> first = reader.get_next()                                         # doctest: +SKIP
    """

    def __init__(self, feeds: Mapping[str, np.ndarray], batch_size: int = CALIBRATION_BATCH) -> None:
        self.feeds = dict(feeds)
        self.samples = len(next(iter(self.feeds.values())))
        self.batch_size = max(1, int(batch_size))
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.samples, self.batch_size):
            yield {name: a[start:start + self.batch_size] for name, a in self.feeds.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)


def check_calibration_inputs(
    package: Package, inputs: Mapping[str, np.ndarray] | np.ndarray, max_samples: int | None = None
) -> dict[str, np.ndarray]:
    """Validated model inputs for calibration (typed ``InputError``s), cut to ``max_samples``."""
    feeds, n = InputChecker(package.inputs).feeds(inputs)  # names, dtype, shape, empty, finite
    if max_samples is not None:
        if max_samples < 1:
            raise QuantizationOptionError(f"max_calibration_samples must be >= 1, got {max_samples}")
        n = min(n, max_samples)
    return {name: np.ascontiguousarray(a[:n]) for name, a in feeds.items()}


def stage_calibration_data(
    package: Package, inputs: Mapping[str, np.ndarray], batch_size: int = CALIBRATION_BATCH
) -> list[dict[str, np.ndarray]]:
    """What each fp32 stage reads, stage by stage: ``[{tensor name: array (n, ...)}]``.

    Every stage of the fp32 package runs on ``inputs`` (validated model inputs) in
    batches, following the manifest's ``inputs``/``carry`` names, with no early exit;
    stage k's entry holds exactly the tensors stage k reads, each a model input or an
    earlier stage's carry.
    """
    n = len(next(iter(inputs.values())))
    specs = package.stages
    read_later = [set().union(*(s.inputs for s in specs[k + 1:])) for k in range(len(specs))]
    per_stage: list[dict[str, list[np.ndarray]]] = [{name: [] for name in s.inputs} for s in specs]
    sessions = [_session(package.file_path(s.file)) for s in specs]
    for start in range(0, n, batch_size):
        tensors = {name: a[start:start + batch_size] for name, a in inputs.items()}
        for k, (spec, session) in enumerate(zip(specs, sessions)):
            for name in spec.inputs:
                per_stage[k][name].append(tensors[name])
            if spec.carry and read_later[k]:
                tensors.update(zip(spec.carry, session.run(list(spec.carry),
                                                            {name: tensors[name] for name in spec.inputs})))
    return [{name: np.concatenate(parts) for name, parts in stage.items()} for stage in per_stage]


# --- one graph --------------------------------------------------------------------------


def choose_mode(model: onnx.ModelProto, mode: str = "auto") -> str:
    """``"dynamic"``, ``"static_qdq"`` or ``"none"`` (no Conv/MatMul/Gemm to quantize) for a graph."""
    ops = {node.op_type for node in model.graph.node}
    if not ops & (CONV_OPS | MATMUL_OPS):
        return "none"
    if mode == "dynamic":
        return "dynamic"
    if mode == "static":
        return "static_qdq"
    return "static_qdq" if ops & CONV_OPS else "dynamic"


def _session(path: str | os.PathLike[str]) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1, False, False), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class _Job:
    """One graph to quantize: the fp32 file, the names it must keep, its calibration feeds."""

    name: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    feeds: dict[str, np.ndarray]


@contextlib.contextmanager
def _temp_files_in(folder: Path) -> Iterator[None]:
    """Point ``tempfile`` at ``folder`` (the PID-named work folder) for onnxruntime.quantization's
    own temporary folders (``pre.quant.*``, ``ort.quant.*``): in the shared temp dir they carry no
    process id, so a killed quantize's would never be collected; inside the work folder they go with
    it (``leftovers.collect_work_dirs``).  A process-wide change, like the ``chdir`` below."""
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


def _preprocess(src: Path, dst: Path, say: Callable[[str], None], name: str) -> Path:
    # Shape inference + onnxruntime's basic graph optimizations, as onnxruntime recommends
    # before quantizing; a graph it cannot handle is quantized as exported.
    # onnxruntime's symbolic shape inference, when it cannot finish, dumps sym_shape_infer_temp.onnx
    # and its external-data files into the working directory: run it from the work folder, so
    # nothing lands in the caller's (a process-wide change, as quantizing is a tool's job, not a
    # device app's)
    here = os.getcwd()
    source, target = src.resolve(), dst.resolve()   # before the chdir: a relative path means the caller's folder
    try:
        os.chdir(target.parent)
        with _temp_files_in(target.parent):
            quant_pre_process(str(source), str(target))
    except Exception as exc:
        say(f"  {name:<10} pre-processing skipped ({str(exc).strip().splitlines()[0][:120]})")
        return src
    finally:
        os.chdir(here)
    return dst


def _quantize_graph(
    job: _Job, src: Path, folder: Path, mode: str, per_channel: bool, activation: str, say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    fp32 = onnx.load(str(src), load_external_data=False)
    chosen = choose_mode(fp32, mode)
    samples = len(next(iter(job.feeds.values())))
    entry: dict[str, Any] = {
        "name": job.name, "file": job.file, "mode": chosen,
        "per_channel": per_channel if chosen != "none" else False,
        # dynamic quantization always uses uint8 activations, scaled per call
        "activation_type": {"none": None, "dynamic": "uint8"}.get(chosen, activation),
        "calibration_samples": samples if chosen == "static_qdq" else 0,
    }
    if chosen == "none":
        say(f"  {job.name:<10} no Conv/MatMul/Gemm: kept in fp32")
        return src, entry
    out = folder / job.file
    started = time.perf_counter()
    pre = _preprocess(src, folder / f"pre-{job.file}", say, job.name)
    try:
        with _temp_files_in(folder):
            if chosen == "dynamic":
                quantize_dynamic(pre, out, per_channel=per_channel, weight_type=QuantType.QInt8)
            else:
                reader = ArrayCalibrationReader(job.feeds)
                quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=ACTIVATION_TYPES[activation], weight_type=QuantType.QInt8)
    except Exception as exc:
        raise QuantizationError(
            f"onnxruntime.quantization failed on {job.name} ({job.file}, {chosen}): {exc}. Try "
            f"mode={'dynamic' if chosen == 'static_qdq' else 'static'!r}, or per_channel=False."
        ) from exc
    _check_quantized(job, out)
    took = time.perf_counter() - started
    say(f"  {job.name:<10} {chosen:<10} {src.stat().st_size:>9,} -> {out.stat().st_size:>9,} bytes"
        f"{f'  ({samples} calibration samples)' if chosen == 'static_qdq' else ''}  {took:.1f} s")
    _compare(job, src, out, say)
    return out, entry


def _check_quantized(job: _Job, path: Path) -> None:
    try:
        model = onnx.load(str(path), load_external_data=False)
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        onnx.checker.check_model(model)
    except Exception as exc:
        raise QuantizationError(f"{job.name}: the quantized graph does not pass onnx.checker: {exc}") from exc
    if external:
        raise QuantizationError(f"{job.name}: the quantized graph keeps {external[:3]} as external data, "
                                "which exit packages refuse")
    inputs = sorted(i.name for i in model.graph.input)
    outputs = {o.name for o in model.graph.output}
    missing = [o for o in job.outputs if o not in outputs]
    if inputs != sorted(job.inputs) or missing:
        raise QuantizationError(
            f"{job.name}: the quantized graph has inputs {inputs} and outputs {sorted(outputs)}, but the "
            f"manifest needs inputs {sorted(job.inputs)} and outputs {list(job.outputs)}; onnxruntime."
            "quantization renamed a graph input or output. Report it with the onnxruntime version."
        )


def _compare(job: _Job, fp32: Path, int8: Path, say: Callable[[str], None]) -> None:
    """One line per output: how far int8 is from fp32 on the first calibration batch."""
    feeds = {name: a[:CALIBRATION_BATCH] for name, a in job.feeds.items()}
    names = list(job.outputs)
    ref = _session(fp32).run(names, feeds)
    try:
        got = _session(int8).run(names, feeds)
    except Exception as exc:
        raise QuantizationError(f"{job.name}: onnxruntime cannot run the quantized graph: {exc}") from exc
    for name, r, g in zip(names, ref, got):
        if not np.isfinite(g).all():
            raise QuantizationError(f"{job.name}: the quantized graph's output {name!r} holds NaN/Inf")
        diff = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        agree = ""
        if r.ndim == 2 and r.shape[1] > 1:
            agree = f", argmax agreement {float((r.argmax(1) == g.argmax(1)).mean()):.1%}"
        say(f"    {name:<14} max |int8 - fp32| = {diff:.2e} (max |fp32| {scale:.2e}){agree}  (n={len(r)})")


# --- the package ------------------------------------------------------------------------


def _check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents:
        raise QuantizationOptionError(
            f"the destination {dst} is {'the source package' if s == d else 'inside the source package'} "
            f"{src}; write the int8 package elsewhere (e.g. {src.with_name(src.stem + '-int8' + src.suffix)})"
        )


def _check_option(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        near = difflib.get_close_matches(str(value), list(valid), n=1)
        raise QuantizationOptionError(
            f"unknown {what} {value!r}; choose one of {', '.join(valid)}"
            + (f" (did you mean {near[0]!r}?)" if near else "")
        )


def _int8_manifest(package: Package, say: Callable[[str], None]) -> dict[str, Any]:
    """The source manifest without what described the fp32 graphs only (files, timings, calibrations)."""
    manifest = copy.deepcopy(dict(package.manifest))
    manifest.pop("files", None)
    manifest.pop("compiled", None)  # built from the fp32 stages; recompiled from the int8 ones
    # the `quantization` record is a version-2 field; a later version (a shipped tokenizer: 7) stays
    manifest["format_version"] = max(int(manifest["format_version"]), FORMAT_VERSION)
    stale = []
    for where, cost in [(s.get("name"), s.get("cost")) for s in manifest["stages"]] + [
            ("full_model", (manifest.get("full_model") or {}).get("cost"))]:
        if isinstance(cost, dict) and cost.pop("measured_ms", None) is not None:
            stale.append(where)
    if stale:
        say(f"dropped the fp32 measured_ms of {stale}: int8 graphs run at other speeds; re-measure them")
    history = (manifest.get("calibration") or {}).get("history") or []
    if history:
        say(f"kept the calibration history ({len(history)} entr{'y' if len(history) == 1 else 'ies'}, measured on the "
            "fp32 graphs); recalibrating on the int8 graphs appends to it")
    return manifest


def quantize_package(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration_inputs: Mapping[str, np.ndarray] | np.ndarray,
    *,
    mode: str = "auto",
    per_channel: bool = True,
    activation_type: str = "uint8",
    max_calibration_samples: int = DEFAULT_MAX_CALIBRATION_SAMPLES,
    calibration_labels: np.ndarray | None = None,
    max_drop: float | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> Package:
    """Write an int8 copy of the fp32 exit package ``src`` at ``dst`` and return it.

    Args:
        src: the fp32 package (it is only read).
        dst: the int8 package to write (atomically).  Must differ from ``src``.  Something
            already there is an ``OutputError`` (before any work), unless it is an exit package
            and ``overwrite`` is True: that one is replaced once everything succeeded.
        calibration_inputs: model inputs ``{name: array}`` (a bare array for a one-input
            package), e.g. the calibration split; static stages are calibrated on the
            first ``max_calibration_samples`` samples, fed through the fp32 stages.
        mode: ``"auto"`` (Conv in the graph: static QDQ, else dynamic), or ``"dynamic"`` /
            ``"static"`` for every graph.  Graphs without Conv/MatMul/Gemm stay fp32.
        per_channel: per-output-channel weight scales (more accurate, same speed).
        activation_type: ``"uint8"`` (U8S8: uint8 activations, int8 weights; the fast
            kernels of x86 AVX2/AVX-512-VNNI) or ``"int8"`` (S8S8, onnxruntime's default;
            slower than fp32 on the x86 CPU we measured, see benchmarks/bench_int8.py).
            On AVX2 CPUs without VNNI, U8S8 can saturate; compare accuracy there.
        calibration_labels: labels of ``calibration_inputs``; when given, the thresholds
            are recalibrated on the int8 graphs (``recalibrate_shared_threshold``, every
            calibration sample) before the package is written.  Without them the fp32
            thresholds are copied, the manifest says so and a line is logged.
        max_drop: recalibrate one shared threshold within this accuracy drop (a fraction).
            Default (None): the objective of the fp32 package's live calibration when it has
            one (its thresholds are searched again per exit, timed on this device, and the
            entry is added to the kept history); else a shared threshold within 0.003.
        overwrite: replace an exit package at ``dst``.  Anything else there (a file, a folder
            that is not an exit package) is never replaced.
        log: where progress lines go (None: silent).

    Raises:
        QuantizationOptionError: bad ``mode``/``activation_type``, ``dst`` equal to ``src``.
        InputError: calibration inputs with wrong names, dtype, shape, empty or non-finite.
        QuantizationError: onnxruntime.quantization failed or changed the graph's names.
        PackageError: ``src`` is not a valid package.
        OutputError: ``dst`` exists and is not an exit package, or is one and ``overwrite`` is
            False.

    Example:
        >>> quantize_package("lenet.eexit", "lenet-int8.eexit", x_cal,
        ...                  calibration_labels=y_cal)                     # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    _check_option(mode, MODES, "mode")
    _check_option(activation_type, tuple(ACTIVATION_TYPES), "activation_type")
    src_path, dst_path = Path(src), Path(dst)
    package = load_package(src_path)
    _check_paths(package.root, dst_path)
    check_replaceable(dst_path, overwrite=overwrite)   # before any work: never replaces what is not ours
    previous = package.manifest.get("quantization")
    if previous is not None:
        raise QuantizationOptionError(
            f"{src_path} is already quantized ({previous.get('method')}); "
            "quantize the fp32 package it was made from"
        )
    feeds = check_calibration_inputs(package, calibration_inputs, max_calibration_samples)
    labelled: tuple[Mapping[str, np.ndarray] | np.ndarray, np.ndarray] | None = None
    if calibration_labels is not None:
        labels = np.asarray(calibration_labels)
        all_feeds, n_all = InputChecker(package.inputs).feeds(calibration_inputs)
        if labels.shape != (n_all,):
            raise InputShapeError(
                f"calibration_labels has shape {labels.shape}, expected ({n_all},): one label per "
                "calibration sample"
            )
        labelled = (all_feeds, labels)

    n = len(next(iter(feeds.values())))
    say(f"quantizing {package.root} -> {dst_path} (int8, mode={mode}, per_channel={per_channel}, "
        f"activations {activation_type}; {n} calibration sample(s), fed through the fp32 stages)")
    per_stage = stage_calibration_data(package, feeds)
    jobs = [
        _Job(s.name, s.file, s.inputs,
             tuple(s.carry) + ((s.exit.logits, *s.exit.signals.values()) if s.exit else ()), per_stage[k])
        for k, s in enumerate(package.stages)
    ]
    full = package.full_model
    if full is not None:
        jobs.append(_Job("full", full.file, full.inputs, (full.logits,), {i: feeds[i] for i in full.inputs}))

    leftovers.collect_work_dirs("quantize")   # work folders of quantizes that were killed
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-quantize-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        files: dict[str, Path] = {}
        entries: dict[str, dict[str, Any]] = {}
        for job in jobs:
            files[job.file], entries[job.file] = _quantize_graph(
                job, package.file_path(job.file), folder, mode, per_channel, activation_type, say)
        if package.text is not None:     # the tokenizer travels unchanged
            (folder / package.text.tokenizer).write_bytes(package.read_verified(package.text.tokenizer))
            files[package.text.tokenizer] = folder / package.text.tokenizer

        manifest = _int8_manifest(package, say)
        manifest["quantization"] = {
            "method": "int8",
            "tool": f"onnxruntime.quantization {ort.__version__}",
            "weight_type": "int8",
            "calibration": {"method": "minmax", "samples": n, "fed": "each stage the tensors the fp32 stages "
                            "before it produce"} if any(e["mode"] == "static_qdq" for e in entries.values()) else None,
            "stages": [entries[s.file] for s in package.stages],
            "full_model": entries[full.file] if full is not None else None,
            "source_sha256": {job.file: package.files[job.file]["sha256"] for job in jobs},
            "thresholds": {"status": "copied_from_fp32", "values": package.thresholds},
        }
        staging = write_package(folder / "staging.eexit", manifest, files)
        if package.compiled is not None:   # first, so a timed recalibration times the engine that will run
            from .compile import compile_package

            say("recompiling compiled.onnx from the int8 stage graphs")
            compile_package(staging, log=say)
        kept = live_calibration(package) if max_drop is None else None
        if labelled is None:
            say(f"thresholds {package.thresholds} were copied from the fp32 package; quantization shifts exit "
                f"scores, so recalibrate them: recalibrate_shared_threshold({str(dst_path)!r}, x_cal, y_cal)")
        elif kept is not None:
            _recalibrate_as_before(staging, labelled, kept, package.thresholds, say)
        else:
            recalibrate_shared_threshold(staging, *labelled, max_drop=0.003 if max_drop is None else max_drop,
                                         log=say)
        for line in what_changed(package, load_package(staging)):
            say(line)
        _, final = read_manifest(staging)
        write_package(dst_path, final, {name: staging / name for name in final.pop("files")}, overwrite=overwrite)
    say(f"wrote {dst_path}")
    return load_package(dst_path)


# --- thresholds ---------------------------------------------------------------------


def live_calibration(package: Package) -> Mapping[str, Any] | None:
    """The newest calibration-history entry that was not reverted, if any."""
    history = (package.calibration or {}).get("history") or []
    live = [e for e in history if isinstance(e, Mapping) and not e.get("reverted") and e.get("objective")]
    return live[-1] if live else None


def _recalibrate_as_before(staging: Path, labelled: tuple[Any, np.ndarray], entry: Mapping[str, Any],
                           fp32_thresholds: Sequence[float | None], say: Callable[[str], None]) -> None:
    """Search the int8 package's thresholds again with the objective the user chose for the fp32 one."""
    from ..calibrate import apply_calibration, calibrate_thresholds, replay_calibration, why_disable_exits
    from ..runtime import ExitSession

    objective = entry["objective"]
    kind, value, z = objective["kind"], float(objective["value"]), float(objective.get("z") or 1.645)
    say(f"recalibrating with the fp32 calibration's objective ({kind} {value:g}, policy {entry.get('policy')}), "
        "timed on the int8 graphs here")
    x, y = labelled
    session = ExitSession(staging)
    session.tune_engines(x)
    result = calibrate_thresholds(
        session, x, y, z=z, policy=entry.get("policy"), max_drop=value if kind == "max_drop" else None,
        target_accuracy=value if kind == "target_accuracy" else None,
        latency_budget=value if kind == "latency_budget" else None)
    replay = replay_calibration(session, x, y, result)
    slower = why_disable_exits(result, replay)
    apply_calibration(staging, result, disable_exits=slower)

    def record(manifest: dict[str, Any]) -> None:
        manifest["quantization"]["thresholds"] = {
            "status": "recalibrated", "method": "calibrate_thresholds", "objective": dict(objective),
            "policy": result.policy, "samples": result.samples,
            "values": [None] * len(result.thresholds) if slower else result.thresholds,
            "accuracy": result.accuracy, "last_exit_accuracy": result.full_accuracy,
            "exit_shares": result.shares, "speedup_vs_full": result.speedup, "fp32_values": list(fp32_thresholds),
        }

    update_manifest(staging, record)
    say(f"int8 thresholds {[round(t, 6) for t in result.thresholds]} (fp32: {list(fp32_thresholds)}): accuracy "
        f"{result.accuracy:.2%} (last exit {result.full_accuracy:.2%}), {result.speedup:.2f}x the int8 full model "
        f"expected, {replay.speedup:.2f}x replayed" + (f"; exits disabled: {slower}" if slower else ""))


def what_changed(fp32: Package, int8: Package) -> list[str]:
    """One line per stage: bytes, nodes (the quantize/dequantize ones named) and measured ms, fp32 -> int8."""
    lines = ["what quantization changed, per stage (fp32 -> int8):"]
    for before, after in zip(fp32.stages, int8.stages):
        old, new = (onnx.load(str(p.file_path(s.file)), load_external_data=False).graph
                    for p, s in ((fp32, before), (int8, after)))
        qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in new.node)
        size = (fp32.files[before.file]["size"], int8.files[after.file]["size"])
        ms = (before.cost.get("measured_ms"), after.cost.get("measured_ms"))
        timed = f"; {ms[0]:.4f} -> {ms[1]:.4f} ms" if None not in ms else ""
        grew = []
        if size[1] > size[0]:
            grew.append("bigger")
        if None not in ms and ms[1] > ms[0]:   # type: ignore[operator]
            grew.append("slower")
        why = (f" ({' and '.join(grew)}: {qdq} quantize/dequantize node(s) added around "
               f"{sum(n.op_type in CONV_OPS | {'MatMul', 'Gemm'} for n in old.node)} Conv/MatMul/Gemm; on small "
               "layers the conversions cost more than int8 arithmetic saves)" if grew else "")
        lines.append(f"  {before.name}: {size[0]:,} -> {size[1]:,} bytes; {len(old.node)} -> {len(new.node)} nodes"
                     f"{timed}{why}")
    return lines


@dataclass(frozen=True)
class ThresholdUpdate:
    """What ``recalibrate_shared_threshold`` chose and what it replaced."""

    package: Package
    previous: tuple[float | None, ...]
    threshold: float | None          # None: the package has no early exit
    accuracy: float                  # early-exit accuracy on the calibration data
    full_accuracy: float             # last exit's accuracy on the same data
    exit_shares: tuple[float, ...]
    samples: int


def recalibrate_shared_threshold(
    package_path: str | os.PathLike[str],
    x_cal: Mapping[str, np.ndarray] | np.ndarray,
    y_cal: np.ndarray,
    max_drop: float = 0.003,
    *,
    z: float = 1.645,
    log: Callable[[str], None] | None = print,
) -> ThresholdUpdate:
    """Choose one threshold for every early exit on labelled data and write it into the package.

    Runs the package as it is (int8 graphs included) through every stage
    (``calibrate.record_exits``), takes the most permissive shared threshold whose accuracy
    drop vs the last exit stays within ``max_drop`` at confidence ``z``
    (``calibrate.shared_threshold``), and rewrites the manifest atomically
    (``package.update_manifest``).  A quantized package's ``quantization.thresholds``
    records that its thresholds were recalibrated.

    Example:
        >>> recalibrate_shared_threshold("lenet-int8.eexit", x_cal, y_cal)   # doctest: +SKIP
    """
    from ..calibrate import record_exits, shared_threshold
    from ..runtime import ExitSession

    say = log or (lambda _line: None)
    session = ExitSession(package_path)
    previous = tuple(session.package.thresholds)
    records = record_exits(session, x_cal, np.asarray(y_cal))
    n = int(records.labels.size)
    if session.num_exits < 2:
        say(f"{package_path}: no early exit, nothing to recalibrate")
        return ThresholdUpdate(session.package, previous, None, records.full_accuracy, records.full_accuracy,
                               (1.0,), n)
    threshold, accuracy, shares = shared_threshold(records, max_drop, z)

    def change(manifest: dict[str, Any]) -> None:
        for stage in manifest["stages"][:-1]:
            if stage.get("exit") is not None:
                stage["exit"]["threshold"] = threshold
        quantization = manifest.get("quantization")
        if isinstance(quantization, dict):
            old = quantization.get("thresholds") or {}
            quantization["thresholds"] = {
                "status": "recalibrated", "method": "shared_threshold", "policy": records.policy,
                "max_drop": max_drop, "z": z, "samples": n, "values": [threshold] * len(previous),
                "accuracy": accuracy, "last_exit_accuracy": records.full_accuracy,
                "exit_shares": [float(s) for s in shares],
                "fp32_values": old.get("fp32_values", old.get("values", list(previous))),
            }

    updated = update_manifest(package_path, change)
    say(f"recalibrated {records.policy} thresholds on {n} labelled samples: {list(previous)} -> {threshold:.6g} "
        f"(accuracy {accuracy:.2%} vs last exit {records.full_accuracy:.2%}, exit shares "
        f"{[round(float(s), 3) for s in shares]})")
    return ThresholdUpdate(updated, previous, threshold, accuracy, records.full_accuracy,
                           tuple(float(s) for s in shares), n)
