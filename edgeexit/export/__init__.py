"""The export side (needs torch and onnx): early-exit model -> exit package."""

from .exporter import export_package as export_package
from .model import EarlyExitModel as EarlyExitModel
