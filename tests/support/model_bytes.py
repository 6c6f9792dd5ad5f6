"""ONNX models built in the test run, so every test has real model files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(seed: int = 0, n_in: int = 4, n_out: int = 3) -> bytes:
    """y = relu(x @ W + b), x: float32[N, n_in] -> y: float32[N, n_out]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        f"linear_{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_model(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def memory_hungry_model(n_in: int = 256, gib: float = 1.5) -> bytes:
    """A model of a few hundred bytes whose every run fills ``gib`` GiB of memory.

    y = x + sum(ConstantOfShape([gib GiB of float32 ones])): the constant is too large for
    onnxruntime to fold at load, so each inference allocates and fills it. Under a memory
    limit below that, the kernel's OOM killer ends the process running it.
    """
    count = int(gib * (1 << 30)) // 4
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], value=ones),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        "memory_hungry",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_in])],
        [numpy_helper.from_array(np.array([count], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def batch_hungry_model(n_in: int = 256, mib_per_row: int = 8) -> bytes:
    """A model that fills ``mib_per_row`` MiB of memory for each row of its batch.

    y = x + sum(ConstantOfShape([rows * mib_per_row MiB of float32 ones])): a staging smoke
    inference (one row) passes, a large batch served later is what gets the process
    OOM-killed, as a model that only fails on real input would.
    """
    per_row = mib_per_row * (1 << 20) // 4
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "first"], ["rows"], axis=0),
            helper.make_node("Mul", ["rows", "per_row"], ["count"]),
            helper.make_node("ConstantOfShape", ["count"], ["big"], value=ones),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        "batch_hungry",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_in])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "first"),
            numpy_helper.from_array(np.array([per_row], np.int64), "per_row"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
