"""The export side: early-exit model -> exit package (torch); exits attached to a network we did not
write (torch.fx); int8 quantization and compiling (no torch).

Names load on first use, so ``edgeexit.export.quantize`` and ``edgeexit.export.compile`` can
run where torch is absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attach import CutPoint as CutPoint
    from .attach import attach_exits as attach_exits
    from .attach import cuttable_layers as cuttable_layers
    from .attach_onnx import attach_onnx_exits as attach_onnx_exits
    from .attach_onnx import cut_onnx as cut_onnx
    from .compile import compile_package as compile_package
    from .exporter import export_package as export_package
    from .model import EarlyExitModel as EarlyExitModel
    from .quantize import quantize_package as quantize_package
    from .seq2seq_model import EncoderDecoderDescription as EncoderDecoderDescription
    from .train_heads import load_training_npz as load_training_npz
    from .train_heads import train_exit_heads as train_exit_heads

_LAZY = {"attach_exits": "attach", "cuttable_layers": "attach", "CutPoint": "attach",
         "attach_onnx_exits": "attach_onnx", "cut_onnx": "attach_onnx",
         "export_package": "exporter", "EarlyExitModel": "model", "quantize_package": "quantize",
         "compile_package": "compile", "EncoderDecoderDescription": "seq2seq_model",
         "train_exit_heads": "train_heads", "load_training_npz": "train_heads"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CutPoint", "EarlyExitModel", "EncoderDecoderDescription", "attach_exits", "attach_onnx_exits",
           "compile_package", "cut_onnx",
           "cuttable_layers", "export_package", "load_training_npz", "quantize_package", "train_exit_heads"]
