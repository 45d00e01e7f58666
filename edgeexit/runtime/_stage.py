"""One stage session, run plainly or with IOBinding so carries stay on the accelerator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import GraphMismatchError, SessionError
from ..package import StageSpec

# Providers whose carries can stay in device memory between stages, and the device name
# onnxruntime's IOBinding uses for them.
_DEVICE_OF = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def binding_device(providers: list[Any]) -> str | None:
    """The device carries should stay on, or None when plain numpy runs are best (CPU)."""
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return _DEVICE_OF.get(first)


OrtRun = Callable[[list[str], dict[str, Any], Any], list[Any]]


def direct_run(session: ort.InferenceSession) -> OrtRun:
    """``session``'s C++ ``run(output_names, feeds, run_options)``, called without the Python
    around it in ``InferenceSession.run``, where none of that Python can matter; else ``session.run``.

    That Python costs 1 to 2.5 us a call (measured in ``benchmarks/bench_overhead.py``): it
    lists the feeds to report missing inputs (the runtime's feeds always hold every input, and
    the C++ run refuses a missing one too), checks the ownership of ``OrtValue`` feeds (the CPU
    path passes numpy arrays), WebGPU graph capture, and retries on the fallback providers
    after an execution-provider failure.  So it is skipped only for a session on the CPU
    provider alone, and only where the binding has the attribute (``_sess``, in every
    onnxruntime release the runtime supports); results are the same bit for bit (tested).
    """
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    if run is None or session.get_providers() != ["CPUExecutionProvider"]:
        return session.run  # type: ignore[no-any-return]
    return run  # type: ignore[no-any-return]


def take(value: Any, rows: np.ndarray) -> np.ndarray:
    """``value[rows]`` for a numpy array or an OrtValue (copied to the host first)."""
    if isinstance(value, ort.OrtValue):
        value = value.numpy()
    return value[rows]


class Stage:
    """A stage session, the names it reads and writes, and how to run it.

    With ``device`` set (``"cuda"``), ``run`` binds the carry outputs to device memory and
    returns them as ``OrtValue``s that the next stage binds directly, so they never cross
    to the host; only the exit's logits and signals come back as numpy.  Without it, ``run`` is a plain
    ``session.run`` on numpy arrays, which is faster on the CPU.
    """

    def __init__(self, spec: StageSpec, session: ort.InferenceSession, exit_number: int | None,
                 keep_after: tuple[str, ...], device: str | None = None) -> None:
        self.spec = spec
        self.session = session
        self.inputs = spec.inputs
        signals = sorted(spec.exit.signals.items()) if spec.exit else []
        self.outputs = list(spec.carry) + ([spec.exit.logits] if spec.exit else []) + [out for _, out in signals]
        self.exit_number = exit_number            # None: this stage has no exit
        self.logits_pos = len(spec.carry)
        # where each exit output a policy may score sits in ``run``'s result ("logits", or a signal)
        self.read_pos = {"logits": self.logits_pos,
                         **{sig: self.logits_pos + 1 + i for i, (sig, _) in enumerate(signals)}}
        self.keep_after = keep_after              # tensors later stages still read
        self.device = device
        self._ort_run = direct_run(session)
        self.run = self._run_plain if device is None else self._run_bound
        self.check_classes: int | None = None

    def expect_classes(self, classes: int) -> None:
        """Check the exit's class width on every run: for an exit whose graph leaves the class axis
        symbolic, so that a (batch, 1) output is an error, never broadcast over the classes."""
        self.check_classes = classes
        self._run_unchecked = self._run_plain if self.device is None else self._run_bound
        self.run = self._run_checking_classes

    def _run_checking_classes(self, tensors: dict[str, Any]) -> list[Any]:
        outs = self._run_unchecked(tensors)
        shape = outs[self.logits_pos].shape
        if len(shape) != 2 or shape[1] != self.check_classes:
            assert self.spec.exit is not None
            raise GraphMismatchError(
                f"stage {self.spec.name!r} ({self.spec.file}): exit logits {self.spec.exit.logits!r} came out with "
                f"shape {tuple(shape)}, but the package answers over {self.check_classes} classes (its graph does "
                "not fix the class axis, so this is checked as it runs); the manifest and the graphs do not belong "
                "together. Re-export the package.")
        return outs

    def _run_plain(self, tensors: dict[str, Any]) -> list[Any]:
        try:
            return self._ort_run(self.outputs, {name: tensors[name] for name in self.inputs}, None)
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail/InvalidArgument
            raise self.failure(exc) from None

    def failure(self, exc: Exception) -> SessionError:
        """An onnxruntime failure of this stage as a typed error naming the stage."""
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        return SessionError(f"stage {self.spec.name!r} ({self.spec.file}) failed in onnxruntime on inputs "
                            f"{list(self.inputs)}: {first[:300]}")

    def _run_bound(self, tensors: dict[str, Any]) -> list[Any]:
        try:
            return self._run_bound_unchecked(tensors)
        except Exception as exc:
            raise self.failure(exc) from None

    def _run_bound_unchecked(self, tensors: dict[str, Any]) -> list[Any]:
        io = self.session.io_binding()
        for name in self.inputs:
            value = tensors[name]
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, value)
        for name in self.spec.carry:
            io.bind_output(name, self.device)
        exit_outputs = self.outputs[self.logits_pos:]
        for name in exit_outputs:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outs: list[Any] = list(io.get_outputs())
        for pos in range(self.logits_pos, len(outs)):
            outs[pos] = outs[pos].numpy()
        return outs
