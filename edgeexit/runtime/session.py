"""``ExitSession``: run an exit package stage by stage and stop at the first confident exit.

Why one file of ~900 lines: it is one class, and its methods are the public API (run,
runner, generate, tune_engines, measure, the onnxruntime-style getters). What does not need the
session's state already lives beside it: stages in ``_stage``, input checks in ``_inputs``,
the compiled engine and its timing in ``_engines``, results in ``_result``, threads in
``_threads``, the graphs' checks in ``_contract``, the one-function path of a batch-1 call in
``_fast``. The stage loop itself is ``_run_batch`` (and ``_run_one`` at batch 1), one screen each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from time import perf_counter_ns
from types import MappingProxyType
from typing import Any

import numpy as np
import onnxruntime as ort

from ..devices.meters import EnergyMeter, EstimateMeter, meter_for_profile
from ..devices.profiles import DeviceProfile, get_profile
from ..devices.providers import ProviderSpec, check_session_providers, resolve_providers
from ..errors import GraphMismatchError, InputError, PolicyError, SessionError
from ..package import Package, load_package
from ..policies import ExitPolicy, always_threshold, check_thresholds, get_policy, never_threshold, scale_logits
from ._contract import LOGITS_DTYPE, check_full_model, check_stage_graphs
from ._engines import (
    ENGINES,
    CompiledGraph,
    EngineTiming,
    calibrated_shares,
    disagreement,
    forced_paths,
    time_interleaved,
)
from ._fast import FastCall, compiled_one, full_model_one
from ._inputs import InputChecker, synthetic_inputs
from ._measure import Measurement
from ._metadata import PackageArg, PackageMetadata, package_inputs, package_metadata, result_outputs
from ._result import ExitResult
from ._split import StageSplit, carry_specs, check_carry, run_split
from ._stage import OrtRun, Stage, binding_device, direct_run, take
from ._threads import ThreadSettings, explain_session_failure
from .seq2seq import Generation, Seq2SeqRunner


@dataclass(frozen=True)
class _Plan:
    policies: tuple[ExitPolicy, ...]   # one per exit
    thresholds: tuple[float, ...]      # one per early exit
    compiled: bool = False             # the compiled graph has these policies
    threshold_array: np.ndarray | None = None   # float64, the compiled graph's input
    disabled: bool = False             # every early exit disabled: the call is the full model


@dataclass(frozen=True)
class _FullCall:
    run: OrtRun                        # full.onnx's session run (see direct_run)
    outputs: list[str]                 # [its logits]
    inputs: tuple[str, ...] | None     # None: the checked feeds are exactly its inputs
    widen: bool                        # its logits are narrower than the exits' widest dtype
    file: str


def _ort_call_shape(output_names: Any, input_feed: Any) -> Any:
    """``run(None, feed)``, as onnxruntime's ``InferenceSession.run`` is called, is ``run(feed)``."""
    if output_names is None and input_feed is not None:
        return input_feed
    if input_feed is None:
        raise InputError("run needs the inputs: run({name: array}) or, as onnxruntime is called, run(None, {name: "
                         "array})")
    raise InputError("ExitSession.run returns every output in one ExitResult (logits, predictions, exit_index, "
                     f"scores): call run(feed) or run(None, feed), not run({output_names!r}, feed)")


class ExitSession:
    """Runs an exit package with onnxruntime, stopping each sample at its first confident exit.

    Args:
        path: the package directory, a packed package (``NAME.eexit.zip``, see
            ``edgeexit.package.pack_package``) or its bytes, for apps that ship the model in
            their bundle.  Every file is read once and verified, and the sessions are built
            from those bytes: what was hashed is what runs.
        device: a device profile name (``cpu``, ``rpi4``, ``auto``...) or a ``DeviceProfile``;
            it supplies the defaults of the next four arguments.
        providers: execution providers in order (default: the profile's, else CPU).
        threads: intra-op threads per stage session (default: the profile's, else 1).
        spinning: let idle onnxruntime threads spin (default off: chained sessions take turns).
        global_thread_pool: use the process-wide pool created by
            ``edgeexit.runtime.use_global_thread_pool`` instead of per-session pools
            (default off: the pool is the host application's choice).
        allow_fallback: warn instead of failing when a requested provider is missing.
        check_finite: refuse inputs holding NaN/Inf.
        verify_hashes: check every file's sha256 when loading.
        io_binding: keep carries in device memory between stages (onnxruntime IOBinding);
            default: on for CUDA/TensorRT, off for the CPU (where plain runs are faster).
        engine: ``"auto"`` (the package's compiled graph when it has one and the call's
            policies are compiled in, else the stage loop; ``tune_engines`` refines the
            choice per batch-size regime), ``"compiled"`` or ``"stages"``.  Results are
            identical either way; see ``edgeexit.runtime._engines`` for the rule.
        sess_options: an ``onnxruntime.SessionOptions`` used for every session of the
            package (stages, compiled graph, full model): onnxruntime's own way to set
            threads, spinning and graph optimisation.  It replaces ``threads``,
            ``spinning`` and ``global_thread_pool``, which must then be left out.
        offload: an ``edgeexit.runtime.offload.Offload``: the stages from ``offload.from_stage``
            on run on a server (``edgeexit serve``) for the samples still running there, and
            ``run`` returns an ``OffloadResult`` (where each sample finished, bytes, network
            time); per-call overrides run locally.  See docs/OFFLOAD.md.

    Thread safety: ``run``, ``run_full`` and ``run_all_exits`` may be called from several
    threads at once on one session: onnxruntime sessions are thread-safe, and each call
    keeps its tensors, plan and result to itself.  ``measure()`` is per thread: a block
    counts the ``run`` calls its own thread makes, blocks in different threads may overlap,
    and each needs its own meter (the default makes one per block); a whole-device meter's
    energy then covers every thread's work during the block.  ``tune_engines`` and
    ``close`` change the session: call them when no other thread is using it.
    Sessions are closed by ``close()`` or by leaving a ``with ExitSession(...)`` block.

    Example:
        >>> sess = ExitSession("lenet.eexit")                    # doctest: +SKIP
        >>> out = sess.run(images)                               # doctest: +SKIP
        >>> out.predictions, out.exit_index                      # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        device: str | DeviceProfile | None = None,
        providers: Sequence[ProviderSpec] | None = None,
        threads: int | None = None,
        spinning: bool | None = None,
        global_thread_pool: bool | None = None,
        allow_fallback: bool = False,
        check_finite: bool = True,
        verify_hashes: bool = True,
        io_binding: bool | None = None,
        engine: str = "auto",
        sess_options: ort.SessionOptions | None = None,
        offload: Any = None,
    ) -> None:
        if engine not in ENGINES:
            raise InputError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
        if sess_options is not None and (threads, spinning, global_thread_pool) != (None, None, None):
            raise InputError("sess_options= sets the threads itself: leave threads=, spinning= and "
                             "global_thread_pool= out, or set them on the SessionOptions")
        self._sess_options = sess_options
        self._closed = False
        # every file read once and verified; sessions are built from those bytes, never reopened
        self.package: Package = load_package(path, verify_hashes=verify_hashes, keep_bytes=True)
        profile = get_profile(device) if isinstance(device, str) else device
        self.profile: DeviceProfile | None = profile
        if providers is None and profile is not None:
            providers = profile.providers
        self.providers = resolve_providers(providers, allow_fallback=allow_fallback)
        base = ThreadSettings(profile.threads, profile.spinning, profile.global_thread_pool) if profile \
            else ThreadSettings()
        self.thread_settings = ThreadSettings(
            threads if threads is not None else base.threads,
            spinning if spinning is not None else base.spinning,
            global_thread_pool if global_thread_pool is not None else base.global_pool,
        ) if sess_options is None else ThreadSettings(sess_options.intra_op_num_threads, False,
                                                        not sess_options.use_per_session_threads)
        self._allow_fallback = allow_fallback
        self._checker = InputChecker(self.package.inputs, check_finite=check_finite)
        self._labels: tuple[str, ...] | None = tuple(self.package.labels) if self.package.labels else None
        self.exit_stages = self.package.exit_stages
        self.num_exits = len(self.exit_stages)

        self._seq2seq: Seq2SeqRunner | None = None
        self._seq2seq_engine = "auto"
        self._tokenizer: Any = None
        self._stages: list[Stage] = []
        self._compiled: CompiledGraph | None = None
        self._compiled_stale: str | None = None   # why the package's compiled graph answers for no call
        self._full_session: ort.InferenceSession | None = None
        self._full_call: _FullCall | None = None   # how run() calls full.onnx, set up with its session
        self._plain_session: ort.InferenceSession | None = None
        self._measures = threading.local()   # the measure() block open in each thread, if any
        self._measures_open = 0              # how many threads have one open (run() looks only then)
        self._measures_lock = threading.Lock()
        self._fast_one: FastCall | None = None   # the package's own call at batch 1 (_fast.py), where it has one
        self._offloaded: Any = None              # offload.bind(...): runs the later stages on a server
        self._engine_choice: Mapping[str, str] = MappingProxyType({})
        if self.package.kind == "seq2seq":   # an encoder-decoder: generate(), not run()
            if offload is not None:
                raise InputError("offloading works on classifier and pipeline packages; this one is seq2seq")
            self.io_binding_device = None
            self._seq2seq = Seq2SeqRunner(self.package, self._build, in_graph=engine != "stages")
            self._seq2seq_engine = engine
            return

        device = binding_device(self.providers)
        if io_binding is not None:
            device = (device or "cpu") if io_binding else None
        self.io_binding_device = device
        stages = self.package.stages
        # tensors that exist after stage k and that a later stage still reads
        available = {i.name for i in self.package.inputs}
        keep_after = []
        for k, spec in enumerate(stages):
            available |= set(spec.carry)
            later = set().union(*(s.inputs for s in stages[k + 1:]))
            keep_after.append(tuple(sorted(available & later)))
        sessions = [self._build(spec.file, f"stage {k} ({spec.name})") for k, spec in enumerate(stages)]
        exits = check_stage_graphs(self.package, sessions)   # names, types, ranks, batch axes, classes: not mid-run
        self._stages = [
            Stage(spec, session, self.exit_stages.index(k) if spec.exit else None, keep_after[k], device)
            for k, (spec, session) in enumerate(zip(stages, sessions))]
        if exits.unknown:   # graphs that leave the class axis symbolic: their width is checked as they run
            exits = replace(exits, classes=exits.classes or self._probe_classes())
            for e in exits.unknown:
                self._stages[self.exit_stages[e]].expect_classes(exits.classes)  # type: ignore[arg-type]
        # every path returns the widest of the exits' dtypes: no exit's logits are rounded to another's
        self._exits = exits
        self._logits_dtype = exits.dtype
        self._widen = tuple(d != exits.dtype for d in exits.dtypes)   # per exit: cast at batch 1
        compiled_spec = self.package.compiled
        if engine == "compiled" and compiled_spec is None:
            raise SessionError(
                f"{self.package.root} has no compiled graph; add one with `edgeexit compile {self.package.root}` "
                "or use engine='auto'"
            )
        # a graph that divides by other temperatures than the exits' answers for no call: not even built
        if compiled_spec is not None and list(compiled_spec.temperatures) != self.package.temperatures:
            self._compiled_stale = self.package.compiled_stale
        if engine == "compiled" and self._compiled_stale:
            raise SessionError(f"the compiled graph of {self.package.root} is stale: {self._compiled_stale}; rebuild "
                               f"it with `edgeexit compile {self.package.root}` or use engine='auto'")
        if compiled_spec is not None and engine != "stages" and not self._compiled_stale:
            self._compiled = CompiledGraph(compiled_spec, self._build(compiled_spec.file, "the compiled graph"))
            self._compiled.check_names()
            self._compiled.check_outputs(exits)
        self._engine = engine
        # with every exit disabled, an "auto" session answers from full.onnx (one call)
        self._full_when_disabled = engine == "auto" and self.package.full_model is not None
        # engine per regime: batch 1, batch > 1 ("auto": compiled when usable, or what the last
        # calibration on a device measured faster, if it recorded that)
        recorded = compiled_spec.engines if compiled_spec is not None and engine == "auto" else None
        self._engine_choice = MappingProxyType({regime: (recorded or {}).get(regime, engine)
                                                for regime in ("batch1", "batch")})
        self._default_plan = self._make_plan(None, None)
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        never = tuple(never_threshold(p) for p in self._default_plan.policies[:-1])
        self._no_exit_plan = _Plan(self._default_plan.policies, never, disabled=True)
        if self._default_plan.disabled and self._full_when_disabled:
            self._full_setup()   # a package with its exits disabled runs as the full model: build it now
        self._check_compiled_answers()
        self._fast_one = self._fast_path()
        # offloading binds a runner from runtime/offload.py (which imports this module, not the reverse)
        if offload is not None:
            self._offloaded = offload.bind(self, path)

    # --- building ---------------------------------------------------------------

    def _build(self, file: str, what: str) -> ort.InferenceSession:
        settings = self.thread_settings
        graph = self.package.read(file)   # the verified bytes; a graph with external data is refused here
        try:
            session = ort.InferenceSession(graph, self._sess_options or settings.options(), providers=self.providers)
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail subclasses
            reason = explain_session_failure(exc) or str(exc).strip().splitlines()[0]
            raise SessionError(f"cannot build the onnxruntime session for {what}: {reason}") from None
        check_session_providers(session, self.providers, what, allow_fallback=self._allow_fallback)
        full = self.package.full_model
        if self.package.blobs is not None and (full is None or file != full.file):
            self.package.blobs.pop(file, None)   # onnxruntime holds the graph now; free the copy (full.onnx's
            #                                       bytes stay: baselines such as `bench` build their own session)
        return session

    def _probe_classes(self) -> int:
        """The class count where no graph fixes it and the manifest has no labels: what every exit
        answers for two synthetic samples (GraphMismatchError if they differ)."""
        widths = [lg.shape[1] if lg.ndim == 2 else 0 for lg in self.run_all_exits(
            synthetic_inputs(self.package.inputs, 2))]
        if len(set(widths)) != 1 or not widths[0]:
            raise GraphMismatchError(
                f"{self.package.root}: the exits answer over {widths} classes on synthetic samples (no exit graph "
                "fixes its class axis and the manifest has no labels); every exit answers over the same classes. "
                "Re-export the package.")
        return int(widths[0])

    def _check_compiled_answers(self, samples: int = 8) -> None:
        """Refuse a compiled graph that answers otherwise than the stage graphs (GraphMismatchError).

        Names, types and the ``sources`` hashes are claims a graph of another model makes as
        well, so before any call uses it the graph answers ``samples`` synthetic samples beside
        the stage graphs: at the package's thresholds (against the stage loop) and with each
        exit forced in turn (against that exit's outputs, from one pass of every stage).
        Measured (one onnxruntime thread, shared 2-core VM, best of 30 loads), it adds 1.0 ms to
        the 3.5 ms load of a two-stage package and 19 ms to the 17 ms load of B-ResNet (3 exits:
        4 compiled runs, 1 stage-loop run and 1 pass of every stage at batch 8; 4 samples would
        halve that).  A graph no call can use (other policies per exit, or logits narrower than
        the stages') is never run, so it is not checked.
        """
        graph = self._compiled
        if graph is None or graph.narrower:
            return
        uniform = graph.policies[0] if len(set(graph.policies)) == 1 else None
        plans = [self._default_plan] if self._default_plan.compiled else []
        if plans or uniform is not None:   # a stale graph still serves calls with policy=its policy
            try:
                plans += [self._make_plan(t, None if plans else uniform) for t in forced_paths(graph.policies)]
            except (InputError, PolicyError):   # that policy cannot score these exits: no call uses the graph
                return
        probes = synthetic_inputs(self.package.inputs, samples)
        outputs = self.exit_outputs(probes)
        for plan in plans:
            want = None if plan is self._default_plan else _forced_answer(outputs, plan, self._logits_dtype)
            if want is None:   # the package's thresholds (or a NaN score, which never exits): the stage loop decides
                want = self._run_batch(dict(probes), samples, plan, perf_counter_ns())
            assert plan.threshold_array is not None
            problem = disagreement(graph.answer(probes, plan.threshold_array), want, plan.thresholds)
            if problem:
                raise GraphMismatchError(
                    f"the compiled graph {graph.spec.file} does not answer like the package's stage graphs on "
                    f"{samples} synthetic samples at thresholds {list(plan.thresholds)}: {problem}. It was built "
                    f"from other graphs or altered; rebuild it with `edgeexit compile {self.package.root}`, or open "
                    "the session with engine='stages'.")

    def _make_plan(self, thresholds: Sequence[float | None] | None, policy: str | None) -> _Plan:
        specs = [self.package.stages[k].exit for k in self.exit_stages]
        # each exit's policy, scoring its logits divided by its temperature (format version 9)
        policies = tuple(_with_temperature(get_policy(policy or s.policy), s.temperature)  # type: ignore[union-attr]
                         for s in specs)
        if thresholds is None:
            if policy is not None and any(get_policy(s.policy) is not get_policy(policy)  # type: ignore[union-attr]
                                          for s in specs[:-1]):
                raise InputError(
                    f"policy={policy!r} differs from the package's {self.package.policies}; its stored "
                    "thresholds mean something else, so pass thresholds= with it"
                )
            thresholds = [s.threshold for s in specs[:-1]]  # type: ignore[union-attr,misc]
        for pol in {p.name: p for p in policies}.values():
            lacking = [e for e, s in enumerate(specs) if s.output(pol.reads) is None]  # type: ignore[union-attr]
            if lacking:
                raise InputError(
                    f"policy {pol.name!r} scores the exits' {pol.reads!r} signal, which exit(s) {lacking} of this "
                    "package do not output; use a policy that reads the logits (entropy, confidence, margin, "
                    "patience), or export the model with exit heads that return the signal (format version 8)"
                )
        checked = check_thresholds(policies[0], thresholds, self.num_exits - 1, allow_disabled=True)
        values = [never_threshold(p) if t is None else t for p, t in zip(policies, checked)]   # None: disabled
        compiled = self._compiled is not None and not self._compiled.narrower \
            and tuple(p.name for p in policies) == self._compiled.policies
        return _Plan(policies, tuple(values), compiled, np.array(values, dtype=np.float64),
                     disabled=bool(checked) and all(t is None for t in checked))

    def _plan_for(self, thresholds: Sequence[float | None] | None, policy: str | None) -> _Plan:
        """The plan of a per-call override, built once per distinct override (checking
        thresholds costs as much as a small stage, and calibration passes the same few)."""
        try:
            key = (None if thresholds is None else tuple((type(t), t) for t in thresholds), policy)
            plan = self._plans.get(key)
        except TypeError:   # unhashable thresholds (an array): build the plan each time
            return self._make_plan(thresholds, policy)
        if plan is None:
            plan = self._make_plan(thresholds, policy)
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # --- running ----------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._checker.names

    def run(
        self,
        inputs: np.ndarray | dict[str, np.ndarray] | None,
        input_feed: dict[str, np.ndarray] | None = None,
        *,
        thresholds: Sequence[float | None] | None = None,
        policy: str | None = None,
        early_exits: bool = True,
        engine: str | None = None,
    ) -> ExitResult:
        """Run a batch; each sample stops at its first exit whose policy fires.

        Args:
            inputs: ``{name: array}`` with a leading batch axis, or a bare array when the
                package has one input.  onnxruntime's call shape ``run(None, feed)`` works too
                (every output comes back, in the ``ExitResult``).
            thresholds: one per early exit, overriding the package's for this call (None
                disables that exit).
            policy: a registered policy name overriding the package's (needs thresholds).
            early_exits: False runs every stage and answers from the last exit (the
                package as a full model, for baselines; always the stage loop).
            engine: ``"compiled"`` or ``"stages"`` for this call; default: the session's
                choice for this batch size (see ``tune_engines``).

        The package's own call at batch 1 (no overrides) goes first through a one-function path
        (``runtime/_fast.py``: 1 to 5 us less per call); anything it does not take, the checked
        path answers, with the same results and the same typed errors.  ``runner`` binds
        overrides and keeps that path.
        """
        start = perf_counter_ns()
        if input_feed is not None or inputs is None:   # onnxruntime's run(output_names, input_feed)
            inputs = _ort_call_shape(inputs, input_feed)
        if self._offloaded is not None and thresholds is None and policy is None and early_exits and engine is None:
            return self._offloaded.run(inputs)   # type: ignore[no-any-return]
        fast = self._fast_one   # the package's own call at batch 1: one function, None where it does not apply
        result = fast(inputs, start) if fast is not None and thresholds is None and policy is None and early_exits \
            and engine is None else None
        if result is None:
            result = self._run_checked(inputs, thresholds, policy, early_exits, engine, start)
        result._class_names = self._labels
        if self._measures_open:
            current = getattr(self._measures, "block", None)
            if current is not None:
                current.record(result.logits.shape[0], result.total_ms)
        return result

    def _run_checked(self, inputs: np.ndarray | dict[str, np.ndarray], thresholds: Sequence[float | None] | None,
                     policy: str | None, early_exits: bool, engine: str | None, start: int) -> ExitResult:
        if self._closed:
            raise SessionError(f"this ExitSession of {self.package.root} was closed; open a new one")
        if self._seq2seq is not None:
            raise InputError(f"{self.package.root} is a seq2seq package: use generate(inputs, ...)")
        feeds, n = self._checker.feeds(inputs)
        if not early_exits:
            plan = self._no_exit_plan
        elif thresholds is None and policy is None:
            plan = self._default_plan
        else:
            plan = self._plan_for(thresholds, policy)
        if engine is None or engine == "auto":   # the session's choice; the stage loop where it cannot serve
            use = self._engine_choice["batch1" if n == 1 else "batch"]
        elif engine in ENGINES:
            use = engine
        else:
            raise InputError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
        if plan.disabled and early_exits and self._full_when_disabled and engine in (None, "auto"):
            return self._run_full_model(feeds, plan, start)
        if use != "stages" and early_exits and plan.compiled:
            return self._run_compiled(feeds, n, plan, start)
        if engine == "compiled" or (use == "compiled" and self._engine == "compiled"):
            raise InputError(self._why_not_compiled(early_exits, plan))
        return self._run_one(feeds, plan, start) if n == 1 else self._run_batch(feeds, n, plan, start)

    def _run_compiled(self, feeds: dict[str, np.ndarray], n: int, plan: _Plan, start: int) -> ExitResult:
        # One onnxruntime call.  After it the CPU caches hold the model, not numpy, so no numpy
        # runs here: the predictions and the count of non-finite scores are computed when read.
        assert self._compiled is not None and plan.threshold_array is not None
        logits, exit_index, scores = self._compiled.run(feeds, plan.threshold_array, n)
        return ExitResult(None, logits, exit_index, scores, (), None, (perf_counter_ns() - start) / 1e6, "compiled")

    def _run_full_model(self, feeds: dict[str, np.ndarray], plan: _Plan, start: int) -> ExitResult:
        # Every early exit disabled: the package's single full graph answers, as fast as the plain model.
        call = self._full_call or self._full_setup()
        try:
            logits = call.run(call.outputs, feeds if call.inputs is None else {n: feeds[n] for n in call.inputs},
                              None)[0]
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail subclasses
            raise SessionError(f"the full model {call.file} failed to run: {str(exc).strip()[:200]}") from None
        if call.widen:   # the stage loop's dtype, whichever engine answers
            logits = logits.astype(self._logits_dtype)
        # predictions, exit_index and scores are computed when first read: right after the onnxruntime
        # call every Python step runs cold, and an app that reads only the logits should not pay for them
        return ExitResult.of_full_model(logits, plan.policies[-1], self.num_exits - 1,
                                        (perf_counter_ns() - start) / 1e6)

    def plain_full_model(self) -> tuple[Any, str]:
        """A call of the plain model as a user would ship it, and its label: ``full.onnx`` in a bare
        onnxruntime session (built from the verified bytes, with this session's options and
        providers), or, without one, every stage with exits disabled.  The baseline that
        calibration and ``bench`` measure speedups against."""
        full = self.package.full_model
        if full is None:
            return (lambda x: self.run(x, early_exits=False)), "every stage, exits disabled"
        if self._plain_session is None:   # built once: calibration asks for it per engine and again to replay
            self._plain_session = ort.InferenceSession(
                self.package.read(full.file), self._sess_options or self.thread_settings.options(),
                providers=self.providers)
        bare = self._plain_session
        names, outputs = list(full.inputs), [full.logits]
        if len(names) == 1:
            name = names[0]
            return (lambda x: bare.run(outputs, {name: x if not isinstance(x, dict) else x[name]})), "full.onnx"
        return (lambda x: bare.run(outputs, {n: x[n] for n in names})), "full.onnx"

    def _full(self) -> ort.InferenceSession:
        full = self.package.full_model
        assert full is not None
        if self._full_session is None:
            session = self._build(full.file, "full model")
            check_full_model(self.package, session, self._exits)
            self._full_session = session
        return self._full_session

    def _full_setup(self) -> _FullCall:
        """What ``_run_full_model`` needs per call, worked out once: the session's run, and whether
        the checked feeds go in as they are and the logits come out in the stage loop's dtype."""
        full = self.package.full_model
        assert full is not None
        session = self._full()
        logits_type = next(o.type for o in session.get_outputs() if o.name == full.logits)
        self._full_call = _FullCall(
            direct_run(session), [full.logits], None if set(full.inputs) == set(self.input_names) else full.inputs,
            LOGITS_DTYPE[logits_type] != self._logits_dtype, full.file)
        return self._full_call

    def _why_not_compiled(self, early_exits: bool, plan: _Plan) -> str:
        if self._compiled is None and self._compiled_stale:
            return (f"the compiled graph of {self.package.root} is stale: {self._compiled_stale}; rebuild it with "
                    f"`edgeexit compile {self.package.root}`, or drop engine='compiled'")
        if self._compiled is None:
            return (f"engine='compiled' but {self.package.root} has no compiled graph (or the session was opened "
                    f"with engine='stages'); add one with `edgeexit compile {self.package.root}`")
        if not early_exits:
            return "early_exits=False runs the stage loop (the full-model baseline); drop engine='compiled'"
        if self._compiled.narrower:
            return (f"the compiled graph returns its logits as {self._compiled.logits_dtype}, narrower than the "
                    f"{self._logits_dtype} of this package's widest exit, so it would round some exits' logits; the "
                    "stage loop answers instead (drop engine='compiled')")
        return (f"the compiled graph decides with policies {list(self._compiled.policies)}, this call asks for "
                f"{[p.name for p in plan.policies]}; drop engine='compiled' (the stage loop runs it) or recompile")

    # --- onnxruntime's conventions ----------------------------------------------------

    def get_inputs(self) -> list[PackageArg]:
        """The package's inputs, shaped like ``InferenceSession.get_inputs()`` (name, shape, type)."""
        return package_inputs(self.package)

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The class names, index by index, where the package has them (also ``ExitResult.labels``)."""
        return self._labels

    def get_outputs(self) -> list[PackageArg]:
        """What ``run`` returns per sample, named as ``ExitResult``'s fields: ``logits``, ``predictions``,
        ``exit_index``, ``scores`` (NodeArg-like)."""
        return result_outputs(self.package, self._logits_dtype.name)

    def get_providers(self) -> list[str]:
        """The execution providers the sessions run on (as onnxruntime reports them)."""
        return list(self._stages[0].session.get_providers())

    def get_modelmeta(self) -> PackageMetadata:
        """The package's metadata, shaped like ``InferenceSession.get_modelmeta()``."""
        return package_metadata(self.package)

    def close(self) -> None:
        """Release every onnxruntime session of the package; later calls raise ``SessionError``."""
        self._closed = True
        self._fast_one = None
        self._stages.clear()
        self._compiled = None
        self._full_session = self._plain_session = self._full_call = None

    def __enter__(self) -> ExitSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def has_compiled(self) -> bool:
        """The package's compiled graph is loaded and computes the package's own policies."""
        return self._compiled is not None and self._default_plan.compiled

    @property
    def engine_choice(self) -> Mapping[str, str]:
        """The engine ``run`` takes by default per batch-size regime, ``{"batch1": ..., "batch": ...}``
        (``auto``, ``compiled`` or ``stages``); ``tune_engines`` sets it, and so may an app, whole."""
        return self._engine_choice

    @engine_choice.setter
    def engine_choice(self, choice: Mapping[str, str]) -> None:
        if set(choice) != {"batch1", "batch"} or not set(choice.values()) <= set(ENGINES):
            raise InputError(f"engine_choice must map 'batch1' and 'batch' to one of {', '.join(ENGINES)}; "
                             f"got {dict(choice)}")
        self._engine_choice = MappingProxyType(dict(choice))
        self._fast_one = self._fast_path()

    def _fast_path(self, plan: _Plan | None = None, engine: str | None = None) -> FastCall | None:
        """The one-function path (``_fast.py``) of a batch-1 call with ``plan`` (default: the
        package's own) and the call's ``engine``, where ``_run_checked`` would take one that it has:
        the exits disabled and ``full.onnx`` taking the package's one input, or the compiled
        graph.  None for the stage loop, several inputs or a closed session."""
        single = self._checker.single
        if single is None or self._closed or self._seq2seq is not None:
            return None
        name, shape, dtype, check_finite = single
        plan = plan or self._default_plan
        if plan.disabled and self._full_when_disabled and engine in (None, "auto"):
            call = self._full_call or self._full_setup()
            if call.inputs is not None or call.widen:
                return None
            return full_model_one(name, shape, dtype, check_finite, call.run, call.outputs[0], plan.policies[-1],
                                  self.num_exits - 1)
        graph = self._compiled
        use = self._engine_choice["batch1"] if engine in (None, "auto") else engine
        if graph is None or not plan.compiled or use == "stages" or graph.inputs != (name,):
            return None
        assert plan.threshold_array is not None
        return compiled_one(name, shape, dtype, check_finite, graph._ort_run, graph.outputs, graph.thresholds,
                            plan.threshold_array, graph.num_exits)

    def runner(self, thresholds: Sequence[float | None] | None = None, *, policy: str | None = None,
               engine: str | None = None) -> Callable[[np.ndarray | dict[str, np.ndarray]], ExitResult]:
        """``run`` with these arguments bound, as fast at batch 1 as the package's own call.

        A package written with ``thresholds`` (and ``policy``) answers its batch-1 calls through
        a one-function path (``runtime/_fast.py``) where it has one; ``run`` with the same
        values passed per call takes the checked path, a few microseconds more.  The runner
        takes the one-function path for those arguments: what calibration times a setting by.
        Results are identical to ``run(inputs, thresholds=..., policy=..., engine=...)``.

        Example:
            >>> off = sess.runner([None, None])        # doctest: +SKIP
            >>> off(x).engine                          # doctest: +SKIP
            'full'
        """
        fast = self._fast_path(self._plan_for(thresholds, policy), engine) if thresholds is not None or \
            policy is not None else self._fast_path(None, engine)
        run = functools.partial(self.run, thresholds=thresholds, policy=policy, engine=engine)
        if fast is None:
            return run

        def call(inputs: np.ndarray | dict[str, np.ndarray]) -> ExitResult:
            result = None if self._closed else fast(inputs, perf_counter_ns())
            if result is None:
                return run(inputs)
            if self._measures_open:
                current = getattr(self._measures, "block", None)
                if current is not None:
                    current.record(1, result.total_ms)
            return result

        return call

    def engine_for(self, batch_size: int) -> str:
        """The engine ``run`` takes by default for a batch of this size at the package's thresholds."""
        if self._default_plan.disabled and self._full_when_disabled:
            return "full"
        choice = self._engine_choice["batch1" if batch_size == 1 else "batch"]
        return "compiled" if choice != "stages" and self._default_plan.compiled else "stages"


    def tune_engines(self, inputs: np.ndarray | dict[str, np.ndarray] | None = None, *, batch_size: int = 64,
                     rounds: int = 300) -> list[EngineTiming]:
        """Time both engines and use the faster one per batch-size regime from now on.

        With ``inputs`` (your data, e.g. the calibration split), both engines run
        interleaved, call by call, on its samples at batch 1 and in batches of
        ``batch_size``, with the session's thresholds; the medians decide.  Without, the
        measurement needs no data: random inputs of the package's shapes run every exit
        path in turn (thresholds that send every sample to exit k), and each engine's
        time is the sum over paths weighted by the exit shares of the package's last
        calibration (equal shares if it has none).  Without a compiled graph there is
        nothing to choose.  Repeat it whenever the device or its load changes.

        Returns:
            One ``EngineTiming`` per regime (batch 1, then the larger batch): expected ms
            per call of each engine.

        Example:
            >>> sess = ExitSession("lenet.eexit")                       # doctest: +SKIP
            >>> [t.faster for t in sess.tune_engines(x_val)]            # doctest: +SKIP
            ['stages', 'compiled']
        """
        if self._compiled is None or not self._default_plan.compiled:
            return []
        if inputs is None:
            feeds, n = synthetic_inputs(self.package.inputs, batch_size), batch_size
        else:
            feeds, n = self._checker.feeds(inputs)
        engines = ("stages", "compiled")
        timings = []
        for size in (1, min(batch_size, n)):
            chunks = [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n - size + 1, size)]
            calls_per_engine = rounds if size == 1 else max(rounds // 20, 5)
            if inputs is not None:
                per_call = time_interleaved(
                    {e: functools.partial(self._timed_run, self.runner(engine=e)) for e in engines}, chunks,
                    calls_per_engine)
            else:
                paths = forced_paths([p.name for p in self._default_plan.policies])
                shares = calibrated_shares(self.package) or [1.0 / len(paths)] * len(paths)
                per_call = dict.fromkeys(engines, 0.0)
                for share, thresholds in zip(shares, paths):
                    path = time_interleaved(
                        {e: functools.partial(self._timed_run, self.runner(thresholds, engine=e)) for e in engines},
                        chunks, max(calls_per_engine // len(paths), 5))
                    for e in engines:
                        per_call[e] += share * path[e]
            timings.append(EngineTiming(size, per_call["stages"], per_call["compiled"]))
        if self._engine == "auto":   # a session opened with one engine keeps it
            self.engine_choice = {"batch1": timings[0].faster, "batch": timings[1].faster}
        return timings

    def _timed_run(self, run: Callable[[dict[str, np.ndarray]], ExitResult], feeds: dict[str, np.ndarray]) -> None:
        # ``run``: a runner, so each engine is timed as the package's own call pays for it
        measuring = getattr(self._measures, "block", None)
        self._measures.block = None   # tuning calls are not the caller's inferences
        try:
            run(feeds)
        finally:
            self._measures.block = measuring

    def _run_batch(self, tensors: dict[str, np.ndarray], n: int, plan: _Plan, start: int) -> ExitResult:
        stage_ms = [0.0] * len(self._stages)
        active = np.arange(n)                                   # original positions still running
        exit_index = np.empty(n, dtype=np.int64)
        scores = np.empty(n, dtype=np.float64)
        logits_out: np.ndarray | None = None
        states: dict[str, tuple[np.ndarray, ...]] = {}
        for k, stage in enumerate(self._stages):
            t0 = perf_counter_ns()
            outs = stage.run(tensors)
            stage_ms[k] = (perf_counter_ns() - t0) / 1e6
            tensors.update(zip(stage.outputs, outs))
            e = stage.exit_number
            if e is None:
                continue
            logits = outs[stage.logits_pos]
            policy = plan.policies[e]                           # scores logits / the exit's temperature
            scored = outs[stage.read_pos[policy.reads]]         # the logits, or the signal the policy reads
            s = policy.scores(scored) if policy.step is None else _stateful_scores(policy, states, scored)
            last = e == self.num_exits - 1
            leave = np.ones(len(active), dtype=bool) if last else policy.accepts(s, plan.thresholds[e])
            if logits_out is None:
                logits_out = np.empty((n, logits.shape[1]), dtype=self._logits_dtype)
            rows = active[leave]
            exit_index[rows], scores[rows], logits_out[rows] = e, s[leave], logits[leave]
            if last or leave.all():
                break
            if leave.any():                                     # compact: drop samples that left
                stay = ~leave
                active = active[stay]
                tensors = {name: take(tensors[name], stay) for name in stage.keep_after}
                if states:                                      # a stateful policy's rows go with them
                    states = {name: tuple(a[stay] for a in state) for name, state in states.items()}
        assert logits_out is not None
        return ExitResult(
            predictions=logits_out.argmax(axis=1), logits=logits_out, exit_index=exit_index,
            scores=scores, stage_ms=tuple(stage_ms), nonfinite_scores=int((~np.isfinite(scores)).sum()),
            total_ms=(perf_counter_ns() - start) / 1e6,
        )

    def _run_one(self, tensors: dict[str, np.ndarray], plan: _Plan, start: int) -> ExitResult:
        # Batch-1 fast path: no masks, no compaction, scalar policy scores, the result's arrays made when read.
        stage_ms = [0.0] * len(self._stages)
        last_exit = self.num_exits - 1
        states: dict[str, tuple[np.ndarray, ...]] = {}
        for k, stage in enumerate(self._stages):
            t0 = perf_counter_ns()
            outs = stage.run(tensors)
            stage_ms[k] = (perf_counter_ns() - t0) / 1e6
            e = stage.exit_number
            if e is not None:
                policy = plan.policies[e]                       # scores logits / the exit's temperature
                scored = outs[stage.read_pos[policy.reads]]     # (1, classes) logits, or (1, 1) signal
                score = policy.score_one(scored[0]) if policy.step is None \
                    else float(_stateful_scores(policy, states, scored)[0])
                if e == last_exit or policy.accepts_one(score, plan.thresholds[e]):
                    logits = outs[stage.logits_pos]
                    return ExitResult.of_one(logits.astype(self._logits_dtype) if self._widen[e] else logits, e,
                                             score, tuple(stage_ms), (perf_counter_ns() - start) / 1e6)
            tensors.update(zip(stage.outputs, outs))
        raise AssertionError("unreachable: the last stage always carries an accepting exit")

    @contextlib.contextmanager
    def measure(self, meter: EnergyMeter | None = None) -> Iterator[Measurement]:
        """Measure latency and energy of the ``run`` calls this thread makes inside the block.

        Per thread: calls from other threads are not counted, and other threads may hold
        blocks of their own at the same time (not nested within one thread).

        Args:
            meter: an energy meter; default: the first readable meter of the session's
                device profile (``cpu`` when none was given), else the profile's estimate.

        Example:
            >>> with sess.measure() as m:                          # doctest: +SKIP
            ...     sess.run(x)
            >>> m.latency_ms, m.energy_j, m.energy_kind            # doctest: +SKIP
        """
        if getattr(self._measures, "block", None) is not None:
            raise SessionError("measure() blocks cannot be nested in one thread; end the first block before "
                               "opening another (blocks in different threads may overlap)")
        if meter is None:
            meter, _ = meter_for_profile(self.profile or get_profile("cpu"))
        m = Measurement()
        meter.start()
        self._measures.block = m
        with self._measures_lock:
            self._measures_open += 1
        t0 = perf_counter_ns()
        try:
            yield m
        finally:
            m.latency_ms = (perf_counter_ns() - t0) / 1e6
            self._measures.block = None
            with self._measures_lock:
                self._measures_open -= 1
            reading = meter.stop(busy_seconds=min(m.inference_ms, m.latency_ms) / 1e3) \
                if isinstance(meter, EstimateMeter) else meter.stop()
            m.energy_j, m.energy_kind = reading.joules, reading.kind
            m.energy_source, m.energy_note = reading.source, reading.note

    def generate(self, inputs: dict[str, np.ndarray], *, max_new_tokens: int | None = None,
                 thresholds: dict[str, float | None] | None = None, kv: str = "drop",
                 encoder_exit: str = "per_modality", engine: str | None = None,
                 decay: float | None = None) -> Generation:
        """Generate answers with a seq2seq package (MuE's exits; see ``edgeexit.runtime.seq2seq``).

        Args:
            inputs: ``{name: array}`` for every package input (e.g. image and question ids).
            max_new_tokens: tokens to generate at most (default: the answer length trained).
            thresholds: overrides, by modality name (``"image"``, ``"text"``) and ``"decoder"``;
                None disables that exit.  Default: the package's.
            kv: what skipped decoder layers keep for a token: ``"drop"`` or ``"copy_hidden"``.
            encoder_exit: ``"per_modality"`` (MuE) or ``"joint"`` (the ablation: one similarity over
                all tokens, one threshold, ``thresholds["encoder"]``).
            engine: ``"auto"`` runs the encoder with in-graph exits where the package has it (one
                onnxruntime call instead of one per layer and modality); ``"stages"`` always runs
                the per-layer graphs; ``"compiled"`` insists on the in-graph one.  Default: the
                session's ``engine`` (a session opened with ``"stages"`` builds no in-graph graph).  The decoder step
                with in-graph exits runs at batch 1; a batch runs the per-layer decoder, which
                computes only the samples still in each layer.
            decay: CALM's decaying decoder threshold, its temperature: token t of at most N exits
                when the similarity exceeds ``clip(0.9 * threshold + 0.1 * exp(-decay * t / N))``.
                None (default): the same threshold for every token.
        """
        if self._closed:
            raise SessionError(f"this ExitSession of {self.package.root} was closed; open a new one")
        if self._seq2seq is None:
            raise InputError(f"{self.package.root} is a {self.package.kind} package: use run(); generate() is for "
                             "seq2seq packages")
        feeds, _n = self._checker.feeds(inputs)
        return self._seq2seq.generate(feeds, max_new_tokens=max_new_tokens, thresholds=thresholds, kv=kv,
                                      encoder_exit=encoder_exit, engine=engine or self._seq2seq_engine, decay=decay)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token-id inputs for ``texts`` with the tokenizer the package ships (format version 7,
        ``text``; needs the ``tokenizers`` package), padded to the longest text: pass the result
        to ``run``.  A package without one raises ``InputError``: feed token ids instead."""
        if self._tokenizer is None:
            from ._text import PackageTokenizer

            self._tokenizer = PackageTokenizer(self.package)
        return self._tokenizer(texts)  # type: ignore[no-any-return]

    def run_all_exits(self, inputs: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        """Logits of every exit for every sample (no early stopping), in exit order, as the graphs
        return them (not divided by any temperature).

        This is what calibration records: one pass through all stages.
        """
        return [outputs["logits"] for outputs in self.exit_outputs(inputs)]

    def exit_outputs(self, inputs: np.ndarray | dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every exit's outputs for every sample (no early stopping), in exit order: ``"logits"``
        and each signal the exit has (``"halt"``, ``"gate"``; format version 8)."""
        tensors, _ = self._checker.feeds(inputs)
        outputs = []
        for stage in self._stages:
            outs = stage.run(tensors)
            tensors.update(zip(stage.outputs, outs))
            if stage.exit_number is not None:
                outputs.append({what: outs[pos] for what, pos in stage.read_pos.items()})
        return outputs

    def run_stages(self, inputs: np.ndarray | dict[str, np.ndarray], *, first: int = 0,
                   stop: int | None = None) -> StageSplit:
        """Run stages ``first`` .. ``stop - 1`` with their exits at the package's thresholds (the
        stage loop of ``run``, cut in two for offloading: ``edgeexit.runtime.offload``).

        ``inputs`` are the package's inputs when ``first`` is 0, else the carry entering stage
        ``first`` (``carry_specs``).  Returns a ``StageSplit``: the samples that left and the
        carry of those still running.  Stateful policies (patience) cannot be split.
        """
        if self._closed or self._seq2seq is not None:
            raise SessionError(f"run_stages needs an open classifier session of {self.package.root}")
        stop = len(self._stages) if stop is None else stop
        plan = self._default_plan
        if not 0 <= first < stop <= len(self._stages):
            raise InputError(f"run_stages: need 0 <= first < stop <= {len(self._stages)}, got {first} and {stop}")
        if (first or stop < len(self._stages)) and any(p.step is not None for p in plan.policies):
            raise InputError(f"policies {self.package.policies}: a stateful policy cannot be split across machines")
        feeds, n = self._checker.feeds(inputs) if first == 0 else check_carry(carry_specs(self._stages, first),
                                                                              inputs)  # type: ignore[arg-type]
        return run_split(self._stages, plan.policies, plan.thresholds, self._logits_dtype, dict(feeds), n, first,
                         stop)

    def run_full(self, inputs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Logits of the whole model with every early exit disabled (the baseline).

        Uses the package's ``full_model`` graph when it has one, else runs every stage.
        """
        full = self.package.full_model
        if full is None:
            return self.run(inputs, early_exits=False).logits
        feeds, _ = self._checker.feeds(inputs)
        call = self._full_call or self._full_setup()
        return call.run(call.outputs, {n: feeds[n] for n in full.inputs}, None)[0]  # type: ignore[no-any-return]


def describe(session: ExitSession) -> dict[str, Any]:
    """Providers and thread settings actually in use (for reports)."""
    settings = session.thread_settings
    return {
        "providers": session._stages[0].session.get_providers(),
        "threads": settings.threads,
        "spinning": settings.spinning,
        "global_thread_pool": settings.global_pool,
    }


def _forced_answer(outputs: list[dict[str, np.ndarray]], plan: _Plan, dtype: np.dtype[Any]) -> ExitResult | None:
    """What the stage loop answers when ``plan`` forces every sample to one exit (that exit's
    threshold passes everything, the ones before it are disabled), from every exit's ``outputs``;
    None when a score there is not finite (such a sample goes on: let the stage loop decide)."""
    forced = [e for e, t in enumerate(plan.thresholds) if t == always_threshold(plan.policies[e])]
    e = forced[0] if forced else len(plan.policies) - 1
    policy = plan.policies[e]
    logits, scores = outputs[e]["logits"].astype(dtype), policy.scores(outputs[e][policy.reads])
    if not np.isfinite(scores).all():
        return None
    return ExitResult(predictions=logits.argmax(axis=1), logits=logits, exit_index=np.full(len(logits), e, np.int64),
                      scores=scores, stage_ms=(), nonfinite_scores=0, total_ms=0.0)


def _with_temperature(policy: ExitPolicy, temperature: float) -> ExitPolicy:
    """``policy`` scoring logits divided by ``temperature`` in float64 (as the compiled graph divides
    them), or ``policy`` itself where nothing is divided (temperature 1, or a policy that reads a
    signal).  Built once per plan, so a call pays nothing when every temperature is 1; the logits
    a result returns stay the graphs' own (the argmax is the same for any temperature > 0)."""
    if temperature == 1.0 or policy.reads != "logits":
        return policy
    step = policy.step
    return replace(
        policy,
        batch_score=lambda z: policy.batch_score(scale_logits(z, temperature)),
        row_score=lambda row: policy.row_score([v / temperature for v in row]),
        step=None if step is None else (lambda state, z: step(state, scale_logits(z, temperature))),
    )


def _stateful_scores(policy: ExitPolicy, states: dict[str, tuple[np.ndarray, ...]], logits: np.ndarray) -> np.ndarray:
    """A stateful policy's scores at this exit for the rows still running (``states`` holds each
    policy's state for those rows, updated here; the caller compacts it with the batch)."""
    assert policy.initial is not None and policy.step is not None
    state = states.get(policy.name)
    scores, states[policy.name] = policy.step(state if state is not None else policy.initial(len(logits)), logits)
    return scores
