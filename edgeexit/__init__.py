"""edgeexit: early-exit neural networks as one ONNX graph per exit, run on the edge.

Importing this package (or ``edgeexit.runtime``) never imports torch, onnx, optimum or
transformers; the exporter lives in ``edgeexit.export``.
"""

from .errors import EdgeExitError as EdgeExitError

__version__ = "0.1.0"
