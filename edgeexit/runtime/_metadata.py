"""What ``ExitSession`` says about itself in onnxruntime's terms: NodeArg-like inputs and
outputs, and ModelMetadata-like package metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..package import Package

# numpy dtype name -> the type string onnxruntime's NodeArg.type uses
_ORT_TYPE = {"float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)",
             "int64": "tensor(int64)", "int32": "tensor(int32)", "int8": "tensor(int8)",
             "uint8": "tensor(uint8)", "bool": "tensor(bool)"}


@dataclass(frozen=True)
class PackageArg:
    """An input or output of ``ExitSession.run``, shaped like ``onnxruntime.NodeArg``.

    ``shape`` holds ints for fixed sizes and strings for symbolic axes (``"batch"``);
    ``type`` is onnxruntime's spelling (``"tensor(float)"``).
    """

    name: str
    shape: list[int | str]
    type: str


@dataclass(frozen=True)
class PackageMetadata:
    """The package as ``onnxruntime.ModelMetadata`` would describe a model."""

    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


def package_inputs(package: Package) -> list[PackageArg]:
    return [PackageArg(i.name, list(i.shape), _ORT_TYPE[i.dtype]) for i in package.inputs]


def result_outputs(package: Package, logits_dtype: str) -> list[PackageArg]:
    """What ``run`` returns per sample, named as the fields of ``ExitResult``: logits, predictions,
    exit_index, scores (the compiled graph's own outputs are logits, exit_index and score)."""
    classes: int | str = len(package.labels) if package.labels else "classes"
    return [
        PackageArg("logits", ["batch", classes], _ORT_TYPE.get(logits_dtype, f"tensor({logits_dtype})")),
        PackageArg("predictions", ["batch"], "tensor(int64)"),
        PackageArg("exit_index", ["batch"], "tensor(int64)"),
        PackageArg("scores", ["batch"], "tensor(double)"),
    ]


def package_metadata(package: Package) -> PackageMetadata:
    producer = package.producer
    custom = {
        "kind": package.kind,
        "policies": ",".join(package.policies),
        "thresholds": json.dumps(package.thresholds),
        "exits": str(len(package.exit_stages)),
        "stages": ",".join(s.name for s in package.stages),
        "labels": json.dumps(list(package.labels)) if package.labels else "",
        "full_model": package.full_model.file if package.full_model else "",
        "compiled": package.compiled.file if package.compiled else "",
        "exits_disabled": str(package.exits_disabled).lower(),
    }
    custom.update({f"producer.{k}": str(v) for k, v in producer.items()})
    return PackageMetadata(
        producer_name="edgeexit", graph_name=package.name, domain="",
        description=f"exit package ({package.kind}) with {len(package.exit_stages)} exits",
        graph_description=str(package.root), version=package.format_version, custom_metadata_map=custom,
    )
