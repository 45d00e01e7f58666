"""The export side: early-exit model -> exit package (torch); int8 quantization and compiling (no torch).

Names load on first use, so ``edgeexit.export.quantize`` and ``edgeexit.export.compile`` can
run where torch is absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compile import compile_package as compile_package
    from .exporter import export_package as export_package
    from .model import EarlyExitModel as EarlyExitModel
    from .quantize import quantize_package as quantize_package
    from .seq2seq_model import EncoderDecoderDescription as EncoderDecoderDescription

_LAZY = {"export_package": "exporter", "EarlyExitModel": "model", "quantize_package": "quantize",
         "compile_package": "compile", "EncoderDecoderDescription": "seq2seq_model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EarlyExitModel", "EncoderDecoderDescription", "compile_package", "export_package", "quantize_package"]
