"""Model files registered by the controller's unit tests."""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto, helper


def add_model(path: Path, dims: list[int | str] | None = None) -> Path:
    dims = dims if dims is not None else ["batch", 4]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Cast", ["sum"], ["ids"], to=7)],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, dims),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("ids", TensorProto.INT64, dims),
        ],
    )
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    return path
