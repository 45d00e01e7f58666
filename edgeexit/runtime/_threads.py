"""onnxruntime session options for chained stage sessions.

Chained sessions take turns on the same cores.  The default is one intra-op thread
per session with spinning disabled: safe to embed (it never changes process-wide
state) and, measured on B-LeNet (see README), as fast as the alternatives at batch 1.
A process-wide global pool is an explicit opt-in of the host application, because
once it exists every later session in the process must opt in too or fail to build.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from ..errors import SessionError

_global_pool_sizes: tuple[int, int] | None = None


def use_global_thread_pool(intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
    """Create onnxruntime's process-wide thread pool (once per process).

    Call this in the host application before building any session, then build
    sessions with ``ExitSession(..., global_thread_pool=True)``.  Every other
    onnxruntime session that the process creates afterwards must also set
    ``SessionOptions.use_per_session_threads = False``.
    """
    global _global_pool_sizes
    sizes = (int(intra_op_threads), int(inter_op_threads))
    if _global_pool_sizes is not None:
        if sizes != _global_pool_sizes:
            raise SessionError(
                f"the global thread pool already exists with sizes {_global_pool_sizes}; it can be "
                "created once per process"
            )
        return
    ort.set_global_thread_pool_sizes(*sizes)
    _global_pool_sizes = sizes


@dataclass(frozen=True)
class ThreadSettings:
    """How a session's onnxruntime threads are set up (see the module docstring)."""

    threads: int = 1
    spinning: bool = False
    global_pool: bool = False

    def options(self) -> ort.SessionOptions:
        return session_options(self.threads, self.spinning, self.global_pool)


def session_options(threads: int, spinning: bool, global_pool: bool) -> ort.SessionOptions:
    if threads < 1:
        raise SessionError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if global_pool:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return so


def explain_session_failure(exc: Exception) -> str | None:
    """A user-facing explanation for onnxruntime's thread-pool errors, if it is one."""
    text = str(exc)
    if "use_per_session_threads must be false" in text:
        return (
            "this process already has an onnxruntime global thread pool (someone called "
            "set_global_thread_pool_sizes), so per-session pools are refused; build the session with "
            "global_thread_pool=True"
        )
    if "EnvCreatedWithGlobalThreadPools" in text:
        return (
            "global_thread_pool=True needs the process-wide pool to exist first; call "
            "edgeexit.runtime.use_global_thread_pool(intra_op_threads, inter_op_threads) once at start-up"
        )
    return None
