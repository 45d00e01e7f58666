"""Where a network spends its time, layer by layer, measured in onnxruntime.

``attach --dry-run`` shows, for every layer that can be cut, the share of the unmodified
model's time spent before the cut: what the samples leaving at that exit skip is the rest.
The model is exported once as it is (``torch.onnx.export``, TorchScript exporter, which names
each node after the module that made it: ``/layer1/layer1.0/conv1/Conv``), run with
onnxruntime's profiler, and each node's kernel time is summed up to the last node of the layer.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import ExportError


def module_of(node_name: str) -> str:
    """The qualified name of the module that made an exported node: ``/layer1/layer1.0/conv1/Conv``
    -> ``layer1.0.conv1`` (the exporter writes children of containers qualified, attributes bare)."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def _inside(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def time_shares(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], layers: Sequence[str], *,
                runs: int = 30, threads: int = 1) -> dict[str, float | None]:
    """For each of ``layers`` (module names, in execution order), the share of the model's
    onnxruntime kernel time spent up to and including that layer's last node; None for a layer the
    export folded into another (a BatchNorm into its Conv) or left no node of its own."""
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-layer-times-{os.getpid()}-") as tmp:
        path = Path(tmp) / "model.onnx"
        names = list(example_inputs)
        args = tuple(example_inputs[n] for n in names)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
                torch.onnx.export(model, args, str(path), input_names=names, dynamo=False, opset_version=18,
                                  dynamic_axes={n: {0: "batch"} for n in names})
        except Exception as exc:
            raise ExportError(f"torch.onnx.export could not export {type(model).__name__} to time its layers: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc!r}") from None
        finally:
            model.train(was_training)
        order = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # one kernel per node
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {n: example_inputs[n].detach().cpu().numpy() for n in names}
        for _ in range(runs):
            session.run(None, feeds)
        events: list[dict[str, Any]] = json.loads(Path(session.end_profiling()).read_text())
    spent: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            spent[node] = spent.get(node, 0.0) + float(event.get("dur", 0))
    total = sum(spent.values())
    cumulative = np.cumsum([spent.get(n, 0.0) for n in order]) / total if total else np.zeros(len(order))
    shares: dict[str, float | None] = {}
    for layer in layers:
        last = max((i for i, n in enumerate(order) if _inside(module_of(n), layer)), default=None)
        shares[layer] = None if last is None else float(cumulative[last])
    return shares
