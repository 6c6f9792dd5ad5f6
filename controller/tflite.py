"""TFLite artifacts, inspected with the interpreter the agents run (LiteRT, or
tflite-runtime where LiteRT is not installed): input/output signature, the
quantization parameters of each, and the precision of the weights."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.errors import InvalidModel

MAGIC = b"TFL3"


@dataclass(frozen=True)
class TfliteTensor:
    name: str
    dtype: str
    shape: list[int]
    # Per-tensor (scale, zero point) of a quantized tensor; empty when float.
    quantization: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class TfliteInfo:
    inputs: list[TfliteTensor]
    outputs: list[TfliteTensor]
    precision: str
    runtime: str
    runtime_version: str


def is_tflite(head: bytes) -> bool:
    """A TFLite flatbuffer carries its file identifier at bytes 4..8."""
    return head[4:8] == MAGIC


def interpreter_module() -> tuple[Any, str, str]:
    """(interpreter module, runtime name, version) of the first runtime that imports."""
    for module, runtime, package in (
        ("ai_edge_litert.interpreter", "litert", "ai_edge_litert"),
        ("tflite_runtime.interpreter", "litert", "tflite_runtime"),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        version = str(getattr(importlib.import_module(package), "__version__", ""))
        return mod, runtime, version
    raise InvalidModel("TFLite models need ai-edge-litert (or tflite-runtime) on the controller")


def _tensor(detail: dict[str, Any]) -> TfliteTensor:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    params = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in params.get("scales", [])]
    quant = (
        {"scales": scales, "zero_points": [float(z) for z in params.get("zero_points", [])]} if scales else {}
    )
    return TfliteTensor(
        name=str(detail["name"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=[int(d) if d >= 0 else -1 for d in shape],
        quantization=quant,
    )


def inspect_tflite(path: Path) -> TfliteInfo:
    mod, runtime, version = interpreter_module()
    try:
        interpreter = mod.Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        inputs = [_tensor(d) for d in interpreter.get_input_details()]
        outputs = [_tensor(d) for d in interpreter.get_output_details()]
        dtypes = {np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    except Exception as exc:  # the interpreter raises ValueError/RuntimeError with its own text
        raise InvalidModel(f"LiteRT cannot load the model: {str(exc).strip()[:2000]}") from None
    if not inputs or not outputs:
        raise InvalidModel("the TFLite model has no inputs or no outputs")
    if dtypes & {"int8", "uint8"}:
        precision = "int8"
    elif "float16" in dtypes:
        precision = "fp16"
    else:
        precision = "fp32"
    return TfliteInfo(inputs, outputs, precision, runtime, version)
