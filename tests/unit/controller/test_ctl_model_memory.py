"""What loading a model holds, estimated from the file without loading it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from controller.errors import InvalidModel
from controller.model_memory import check_onnx, check_tflite
from controller.tflite import interpreter_module
from tests.support.models import dense_of_size, expanding_onnx, sine_float_tflite

MiB = 1024 * 1024
GiB = 1024 * MiB


def _save(path: Path, nodes: list[onnx.NodeProto], inits: list[TensorProto] | None = None) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits or [],
    )
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    return path


def test_a_constant_of_shape_folded_at_load_counts_and_is_refused_over_the_bound(tmp_path: Path) -> None:
    bomb = expanding_onnx(tmp_path / "bomb.onnx", 256 * MiB)  # 1 GiB of float32
    estimate = check_onnx(bomb, 2 * GiB)
    assert estimate.folded == GiB and estimate.largest_what.startswith("ConstantOfShape")
    with pytest.raises(InvalidModel, match=r"ConstantOfShape node 'big' produces tensor 'big' of 1.0 GiB"):
        check_onnx(bomb, 512 * MiB)


def test_tile_of_a_constant_and_expand_at_run_time_are_sized_statically(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((1000, 1000), np.float32), "w")
    reps = numpy_helper.from_array(np.array([100, 10], np.int64), "reps")
    tiled = _save(
        tmp_path / "tile.onnx",
        [helper.make_node("Tile", ["w", "reps"], ["t"]), helper.make_node("Add", ["x", "t"], ["y"])],
        [w, reps],
    )
    with pytest.raises(InvalidModel, match=r"Tile node .* of 3.7 GiB"):
        check_onnx(tiled, 2 * GiB)
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape")
    expanded = _save(tmp_path / "expand.onnx", [helper.make_node("Expand", ["x", "shape"], ["y"])], [shape])
    with pytest.raises(InvalidModel, match=r"Expand node .* of 37.3 GiB"):
        check_onnx(expanded, 2 * GiB)


def test_weights_are_summed_and_the_largest_is_named(tmp_path: Path) -> None:
    dense = dense_of_size(tmp_path / "dense.onnx", 8)
    assert check_onnx(dense, GiB).weights == 8 * MiB
    with pytest.raises(InvalidModel, match=r"weights 8.0 MiB.*largest: initializer 'w' of 8.0 MiB.*4.0 MiB"):
        check_onnx(dense, 4 * MiB)


def test_big_constant_nodes_and_subgraph_weights_count(tmp_path: Path) -> None:
    big = numpy_helper.from_array(np.zeros((4 * MiB // 4,), np.float32))
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["inner"], value=big)],
        "then",
        [],
        [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    model = _save(
        tmp_path / "if.onnx",
        [
            helper.make_node("Constant", [], ["c"], value=big),
            helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=branch),
            helper.make_node("Add", ["c", "picked"], ["s"]),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [cond],
    )
    # Two 4 MiB constants in the branches, one outside, and their sum folded at load.
    assert check_onnx(model, GiB).weights == 12 * MiB + 1


def test_weights_in_an_external_file_are_refused(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((1024,), np.float32), "w")
    path = _save(tmp_path / "ext.onnx", [helper.make_node("Add", ["x", "w"], ["y"])], [w])
    model = onnx.load(str(path))
    # As a hostile file would: pointing at another file on the controller's disk.
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../controller.toml")
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModel, match=r"initializer 'w' keeps its data in an external file"):
        check_onnx(path, GiB)


def test_a_file_that_is_not_onnx_is_refused_by_name(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidModel, match="onnx cannot parse the model"):
        check_onnx(junk, GiB)


def test_tflite_tensors_are_summed_from_the_interpreter_table() -> None:
    module, _, _ = interpreter_module()
    model = sine_float_tflite()
    assert 0 < check_tflite(model, GiB, module.Interpreter) < MiB
    with pytest.raises(InvalidModel, match="more than the 16 bytes"):
        check_tflite(model, 16, module.Interpreter)
