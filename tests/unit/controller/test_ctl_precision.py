"""Compute precision (what the interpreter runs) apart from weight storage, for TFLite and ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from controller.inspection import inspect_artifact
from controller.optimize import quantize
from controller.profiles import parse_profile
from controller.registry import FP16
from controller.tflite import precision_from_tensors
from controller.variants import Candidate, choose

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"


def _tflite(path: Path, weights: str, io_float: bool = True) -> Path:
    """float32 input -> [QUANTIZE] -> FULLY_CONNECTED -> [DEQUANTIZE] -> float32 output.

    ``weights``: "fp16" (float16 constants, DEQUANTIZE to float32 before the op, as
    MediaPipe ships), "int8" (a fully-quantized op; with ``io_float`` QUANTIZE/DEQUANTIZE
    at the edges, as the TFLite converter writes for float I/O) or "fp32".
    """
    import flatbuffers
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as s

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    buffers: list[Any] = [s.BufferT()]
    tensors: list[Any] = []
    ops: list[tuple[int, list[int], list[int]]] = []
    codes = [s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.DEQUANTIZE, s.BuiltinOperator.QUANTIZE]

    def tensor(name: str, shape: list[int], ttype: int, data: np.ndarray | None = None, q: Any = None) -> int:
        t = s.TensorT()
        t.name, t.type, t.shape, t.quantization = name, ttype, shape, q
        buf = s.BufferT()
        if data is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8).tolist()
        buffers.append(buf)
        t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def quant(scale: float, zero: int) -> Any:
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint = [scale], [zero]
        return q

    f32, f16, i8, i32 = s.TensorType.FLOAT32, s.TensorType.FLOAT16, s.TensorType.INT8, s.TensorType.INT32
    int8_io = weights == "int8" and not io_float
    first = tensor("input", [1, 4], i8 if int8_io else f32, q=quant(0.05, 0) if int8_io else None)
    current = first
    if weights == "int8":
        if io_float:
            q_in = tensor("input_q", [1, 4], i8, q=quant(0.05, 0))
            ops.append((2, [current], [q_in]))
            current = q_in
        w_scale = float(np.abs(w).max()) / 127
        wt = tensor("w", [3, 4], i8, np.round(w / w_scale).astype(np.int8), quant(w_scale, 0))
        bt = tensor("b", [3], i32, np.round(b / (0.05 * w_scale)).astype(np.int32), quant(0.05 * w_scale, 0))
        out = tensor("fc", [1, 3], i8, q=quant(0.1, 0))
        ops.append((0, [current, wt, bt], [out]))
        current = out
        if io_float:
            deq = tensor("output", [1, 3], f32)
            ops.append((1, [current], [deq]))
            current = deq
    elif weights == "fp16":
        w16 = tensor("w16", [3, 4], f16, w.astype(np.float16))
        b16 = tensor("b16", [3], f16, b.astype(np.float16))
        w32, b32 = tensor("w", [3, 4], f32), tensor("b", [3], f32)
        ops += [(1, [w16], [w32]), (1, [b16], [b32])]
        out = tensor("output", [1, 3], f32)
        ops.append((0, [current, w32, b32], [out]))
        current = out
    else:
        out = tensor("output", [1, 3], f32)
        ops.append((0, [current, tensor("w", [3, 4], f32, w), tensor("b", [3], f32, b)], [out]))
        current = out
    operators = []
    for code, inputs, outputs in ops:
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outputs
        if code == 0:
            op.builtinOptionsType, op.builtinOptions = (
                s.BuiltinOptions.FullyConnectedOptions,
                s.FullyConnectedOptionsT(),
            )
        operators.append(op)
    opcodes = []
    for builtin in codes:
        c = s.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = builtin
        c.version = 4 if weights == "int8" else (3 if builtin == s.BuiltinOperator.DEQUANTIZE else 1)
        opcodes.append(c)
    subgraph = s.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = tensors, [first], [current]
    subgraph.operators, subgraph.name = operators, "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, opcodes, [subgraph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


@pytest.mark.parametrize(
    ("weights", "io_float", "compute", "storage", "input_dtype"),
    [
        ("fp16", True, "fp32", "fp16", "float32"),  # weights dequantized once: float32 kernels
        ("int8", True, "int8", "int8", "float32"),  # int8 kernels behind float I/O
        ("int8", False, "int8", "int8", "int8"),
        ("fp32", True, "fp32", "fp32", "float32"),
    ],
)
def test_tflite_compute_precision_is_told_apart_from_weight_storage(
    tmp_path: Path, weights: str, io_float: bool, compute: str, storage: str, input_dtype: str
) -> None:
    inspected = inspect_artifact(_tflite(tmp_path / "m.tflite", weights, io_float))
    assert (inspected.precision, inspected.storage) == (compute, storage)
    assert inspected.signature.inputs[0].dtype == input_dtype


def _onnx_matmul(path: Path, weights_fp16: bool) -> Path:
    """y = x @ W; with ``weights_fp16`` W is stored as float16 and Cast to float before use."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes, inits = [], []
    if weights_fp16:
        inits.append(numpy_helper.from_array(w.astype(np.float16), "w16"))
        nodes.append(helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_onnx_fp16_storage_with_float_compute_is_fp32(tmp_path: Path) -> None:
    inspected = inspect_artifact(_onnx_matmul(tmp_path / "w16.onnx", weights_fp16=True))
    assert (inspected.precision, inspected.storage) == ("fp32", "fp16")
    quantize(FP16, _onnx_matmul(tmp_path / "f.onnx", False), tmp_path / "half.onnx", None, False)
    half = inspect_artifact(tmp_path / "half.onnx")
    assert (half.precision, half.storage) == ("fp16", "fp16")


def test_cpu_only_profiles_take_a_float_model_whose_weights_are_stored_in_fp16(tmp_path: Path) -> None:
    inspected = inspect_artifact(_tflite(tmp_path / "m.tflite", "fp16"))
    pi = parse_profile((PROFILES / "raspberry-pi-4-4gb.toml").read_text()).device_class()
    candidate = Candidate(
        "tflite-fp32", "tflite", inspected.precision, "ready", 1000, 0, (1, 4), reference=True
    )
    assert choose([candidate], pi).variant == "tflite-fp32"


@pytest.mark.parametrize(
    ("weights", "io_float", "expected"),
    [("fp16", True, ("fp32", "fp16")), ("int8", True, ("int8", "int8")), ("fp32", True, ("fp32", "fp32"))],
)
def test_an_interpreter_without_its_operator_list_still_tells_precisions_apart(
    tmp_path: Path, weights: str, io_float: bool, expected: tuple[str, str]
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(_tflite(tmp_path / "m.tflite", weights, io_float)))
    interpreter.allocate_tensors()
    assert precision_from_tensors({d["index"]: d for d in interpreter.get_tensor_details()}) == expected
