"""The torch-free runtime: load an exit package and run it with onnxruntime."""

from ._result import ExitResult as ExitResult
from ._threads import use_global_thread_pool as use_global_thread_pool
from .session import ExitSession as ExitSession
