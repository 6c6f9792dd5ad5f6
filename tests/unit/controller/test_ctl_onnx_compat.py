"""Which ONNX files an ONNX Runtime release reads, and a file lowered to the IR version its
content needs: real onnxruntime releases (the suite's, and the Python 3.10 one in .venv310,
1.23, which reads IR 11 at most), models written by the installed onnx (IR 14)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from controller.onnx_compat import (
    ir_version_of,
    lowest_ir_version,
    max_ir_version,
    min_onnxruntime,
    write_lowered,
)
from tests.support.models import digits_mlp

PY310 = Path(__file__).resolve().parents[3] / ".venv310" / "bin" / "python"


def relu(opset: int, ir_version: int, initializer: onnx.TensorProto | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [initializer] if initializer is not None else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def test_what_each_onnxruntime_release_reads() -> None:
    # Measured with each release's wheel: 1.20 reads IR 10 and opset 21, 1.23 (the last with a
    # Python 3.10 wheel) IR 11 and opset 23, 1.24 IR 13, 1.32 IR 14.
    assert [max_ir_version(v) for v in ("1.16.3", "1.20.1", "1.22.0", "1.23.2", "1.24.4", "1.32.0")] == [
        9, 10, 10, 11, 13, 14,
    ]  # fmt: skip
    assert max_ir_version("1.40.0") is None  # newer than the table: not refused for its IR
    assert min_onnxruntime(17, 8) == "1.12"
    assert min_onnxruntime(17, 14) == "1.32"
    assert min_onnxruntime(22, 10) == "1.21"  # 1.20 refuses opset 22
    assert min_onnxruntime(21, 11) == "1.23"


def test_the_lowest_ir_version_follows_opsets_types_and_functions() -> None:
    assert lowest_ir_version(relu(17, 14)) == 8
    assert lowest_ir_version(relu(21, 14)) == 10
    assert lowest_ir_version(relu(13, 5)) == 5  # never above the file's own
    fp8 = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [1], [1.0])
    assert lowest_ir_version(relu(17, 14, fp8)) == 9
    int4 = helper.make_tensor("w", TensorProto.INT4, [2], [1, 2])
    assert lowest_ir_version(relu(17, 14, int4)) == 10
    with_function = relu(13, 14)
    with_function.functions.add(name="f", domain="local")
    assert lowest_ir_version(with_function) == 8
    newer_type = numpy_helper.from_array(np.zeros(1, np.float32), "w")
    newer_type.data_type = 27  # a type the lowering table does not know: the file's own
    assert lowest_ir_version(relu(17, 14, newer_type)) == 14


def test_a_lowered_copy_differs_only_in_its_header_and_loads_where_the_original_does_not(
    tmp_path: Path,
) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    assert ir_version_of(mlp.path) == 14  # what the installed onnx writes
    lowered = tmp_path / "mlp-ir8.onnx"
    write_lowered(mlp.path, lowered, 8)
    original, copy = onnx.load(str(mlp.path)), onnx.load(str(lowered))
    assert ir_version_of(lowered) == copy.ir_version == 8
    original.ir_version = 8
    assert copy == original  # the graph and weights as they were
    onnx.checker.check_model(copy)
    if not PY310.exists():
        pytest.skip("no .venv310 (the Python 3.10 agent environment, onnxruntime 1.23)")
    script = (
        "import sys, onnxruntime as ort\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        ort.InferenceSession(p, providers=['CPUExecutionProvider']); print('loads')\n"
        "    except Exception as e:\n"
        "        print(str(e).splitlines()[0][-80:])\n"
    )
    out = subprocess.run(
        [str(PY310), "-c", script, str(mlp.path), str(lowered)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "max supported IR version: 11" in out[0] and out[1] == "loads", out
