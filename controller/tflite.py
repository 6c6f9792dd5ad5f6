"""TFLite artifacts, inspected with the interpreter the agents run (LiteRT, or
tflite-runtime where LiteRT is not installed): input/output signature, the
quantization parameters of each, the precision the kernels compute in and the
precision the weights are stored in.

The two differ in real exports: MediaPipe stores weights as float16 and
dequantizes them once to float32 (float32 kernels, so a CPU without fp16 runs
it); the TFLite converter writes int8 models with float32 inputs and outputs
(QUANTIZE/DEQUANTIZE at the edges, int8 kernels inside)."""

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
    # What the kernels compute in: "fp32", "fp16" or "int8".
    precision: str
    runtime: str
    runtime_version: str
    # What most of the weight bytes are stored as.
    storage: str = ""


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
        input_details = interpreter.get_input_details()
        inputs = [_tensor(d) for d in input_details]
        outputs = [_tensor(d) for d in interpreter.get_output_details()]
        tensors = {int(d["index"]): d for d in interpreter.get_tensor_details()}
        # The only way the interpreter shows its operators (and what each reads); an
        # interpreter without it gets the precision from the tensors alone.
        ops_details = getattr(interpreter, "_get_ops_details", None)
        ops = list(ops_details()) if ops_details is not None else None
    except Exception as exc:  # the interpreter raises ValueError/RuntimeError with its own text
        raise InvalidModel(f"LiteRT cannot load the model: {str(exc).strip()[:2000]}") from None
    if not inputs or not outputs:
        raise InvalidModel("the TFLite model has no inputs or no outputs")
    graph_inputs = {int(d["index"]) for d in input_details}
    if ops is None:
        compute, storage = precision_from_tensors(tensors)
        return TfliteInfo(inputs, outputs, compute, runtime, version, storage)
    return TfliteInfo(
        inputs,
        outputs,
        compute_precision(ops, tensors),
        runtime,
        version,
        storage_precision(ops, tensors, graph_inputs),
    )


# Operators that only convert between storage and compute types; DELEGATE stands
# for the nodes a delegate took over, which are listed as well.
_CONVERSIONS = frozenset({"DEQUANTIZE", "QUANTIZE", "DELEGATE"})
_QUANTIZED = frozenset({"int8", "uint8", "int16"})


def _precision_of(detail: dict[str, Any]) -> str | None:
    dtype = np.dtype(detail["dtype"]).name
    if dtype in _QUANTIZED and len((detail.get("quantization_parameters") or {}).get("scales", [])):
        return "int8"
    if dtype == "float16":
        return "fp16"
    if dtype == "float32":
        return "fp32"
    return None  # indices, shapes, booleans: no precision


def compute_precision(ops: list[dict[str, Any]], tensors: dict[int, dict[str, Any]]) -> str:
    """The lowest precision any computing operator reads (quantized int8 < fp16 < fp32)."""
    seen: set[str] = set()
    for op in ops:
        if op["op_name"] in _CONVERSIONS:
            continue
        for index in op["inputs"]:
            if int(index) >= 0 and (p := _precision_of(tensors[int(index)])) is not None:
                seen.add(p)
    return next((p for p in ("int8", "fp16", "fp32") if p in seen), "fp32")


def precision_from_tensors(tensors: dict[int, dict[str, Any]]) -> tuple[str, str]:
    """(compute, storage) without the operator list: quantized tensors mean int8 kernels;
    float16 tensors beside float32 ones are weights dequantized for float32 kernels."""
    seen = {p for d in tensors.values() if (p := _precision_of(d)) is not None}
    if "int8" in seen:
        return "int8", "int8"
    if "fp16" in seen:
        return ("fp32" if "fp32" in seen else "fp16"), "fp16"
    return "fp32", "fp32"


def storage_precision(
    ops: list[dict[str, Any]], tensors: dict[int, dict[str, Any]], graph_inputs: set[int]
) -> str:
    """The precision of most constant bytes (tensors no operator produces and the graph does not take)."""
    produced = {int(i) for op in ops for i in op["outputs"]}
    consumed = {int(i) for op in ops if op["op_name"] != "DELEGATE" for i in op["inputs"] if int(i) >= 0}
    weight_bytes: dict[str, int] = {}
    for index in consumed - produced - graph_inputs:
        detail = tensors[index]
        precision = _precision_of(detail)
        if precision is not None:
            size = int(np.prod(detail["shape"])) * np.dtype(detail["dtype"]).itemsize
            weight_bytes[precision] = weight_bytes.get(precision, 0) + size
    return max(weight_bytes, key=lambda p: weight_bytes[p]) if weight_bytes else "fp32"
