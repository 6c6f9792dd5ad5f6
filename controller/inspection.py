"""What an artifact file is, checked the way a device will load it.

ONNX: onnx.checker, then an onnxruntime session (the loader's own reason is the
operator's error message); TFLite (recognised by its ``TFL3`` identifier): the
LiteRT interpreter (:mod:`controller.tflite`). The result is the signature
(names, dtypes, shapes), the precision of the weights, the opset and the oldest
runtime release that runs the file.

Precision is what the kernels compute in (what a device must support); the
weights may be stored in another (``storage``): fp16 weights dequantized to
float32 once run on any CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from controller.errors import InvalidModel
from controller.onnx_compat import lowest_ir_version, min_onnxruntime
from controller.tflite import inspect_tflite, is_tflite

FORMAT = "onnx"

_DTYPES = {
    "float": "float32",
    "double": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "str",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def _tensor_spec(arg: Any) -> TensorSpec:
    type_name: str = arg.type
    if not (type_name.startswith("tensor(") and type_name.endswith(")")):
        raise InvalidModel(f"{arg.name!r} is a {type_name}, not a tensor")
    element = type_name[len("tensor(") : -1]
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=_DTYPES.get(element, element), shape=shape)


def inspect_onnx(path: Path) -> Signature:
    """Check the file the way the agent will load it; raise InvalidModel with the loader's reason."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise InvalidModel(f"onnx.checker refused the model: {_first_line(exc)}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no public base class
        raise InvalidModel(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
    outputs = []
    for arg in session.get_outputs():
        try:
            outputs.append(_tensor_spec(arg))
        except InvalidModel as exc:
            raise InvalidModel(
                f"output {exc}; every output must be a tensor "
                "(for scikit-learn classifiers convert with options={id(model): {'zipmap': False}})"
            ) from None
    inputs = []
    for arg in session.get_inputs():
        try:
            inputs.append(_tensor_spec(arg))
        except InvalidModel as exc:
            raise InvalidModel(f"input {exc}; every input must be a tensor") from None
    return Signature(inputs=inputs, outputs=outputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


@dataclass(frozen=True)
class Inspected:
    """What a device needs to know about one artifact file."""

    format: str
    precision: str
    signature: Signature
    opset: int
    runtime: str
    runtime_version: str
    quantization: dict[str, Any] = field(default_factory=dict)
    # What most weight bytes are stored as; ``precision`` is what the kernels compute in.
    storage: str = ""
    # ONNX: the IR version the file states, and the lowest its content needs (controller.onnx_compat).
    ir_version: int = 0
    lowest_ir_version: int = 0


_QDQ_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul"}
)
_STORAGE: dict[int, str] = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8",
}


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and the tensors of Constant nodes (Paddle and PyTorch exports store weights so)."""
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    found[node.output[0]] = attr.t
    return found


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graph and every subgraph (If branches, Loop and Scan bodies): silero-vad keeps
    all its weights inside the branches of an If."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                found.extend(_graphs(sub))
    return found


def onnx_opset_and_precision(model: onnx.ModelProto) -> tuple[int, str, str]:
    """The default-domain opset, the precision the operators compute in and the one most
    weight bytes are stored in. fp16 weights that are Cast to float before use are storage
    only: the kernels run float32, as on a CPU without fp16."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    graphs = _graphs(model.graph)
    nodes = [n for g in graphs for n in g.node]
    ops = {n.op_type for n in nodes}
    constants = {name: t for g in graphs for name, t in _constants(g).items()}
    weight_bytes: dict[str, int] = {}
    for tensor in constants.values():
        if tensor.data_type in _STORAGE:
            size = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            weight_bytes[_STORAGE[tensor.data_type]] = weight_bytes.get(_STORAGE[tensor.data_type], 0) + size
    storage = max(weight_bytes, key=lambda p: weight_bytes[p]) if weight_bytes else "fp32"
    types = {t.data_type for t in constants.values()}
    if ops & _QDQ_OPS or (types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8} and "MatMulInteger" in ops):
        return opset, "int8", storage
    half = {n for n, t in constants.items() if t.data_type == onnx.TensorProto.FLOAT16}
    half |= {
        i.name for g in graphs for i in g.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    for node in nodes:
        if node.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute
        ):
            half.update(node.output)
    computes_half = any(
        node.op_type not in ("Cast", "Constant") and any(i in half for i in node.input) for node in nodes
    )
    return opset, "fp16" if computes_half else "fp32", storage


def inspect_artifact(path: Path) -> Inspected:
    with path.open("rb") as f:
        head = f.read(8)
    if is_tflite(head):
        info = inspect_tflite(path)
        quant = {t.name: t.quantization for t in [*info.inputs, *info.outputs] if t.quantization}
        return Inspected(
            format="tflite",
            precision=info.precision,
            signature=Signature(
                inputs=[TensorSpec(t.name, t.dtype, t.shape) for t in info.inputs],
                outputs=[TensorSpec(t.name, t.dtype, t.shape) for t in info.outputs],
            ),
            opset=0,
            runtime=info.runtime,
            # LiteRT reads every schema version it was built for: no minimum is known here.
            runtime_version="",
            quantization=quant,
            storage=info.storage,
        )
    signature = inspect_onnx(path)
    model = onnx.load(str(path), load_external_data=False)
    opset, precision, storage = onnx_opset_and_precision(model)
    ir_version = int(model.ir_version)
    return Inspected(
        FORMAT,
        precision,
        signature,
        opset,
        "onnxruntime",
        min_onnxruntime(opset, ir_version),
        storage=storage,
        ir_version=ir_version,
        lowest_ir_version=lowest_ir_version(model),
    )
