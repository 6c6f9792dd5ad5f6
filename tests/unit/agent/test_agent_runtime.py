from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from agent.errors import InferenceError, InvalidInput, ModelLoadError, UnsupportedRuntime
from agent.runtime import InputCheck, OnnxRuntimeBackend, TensorSpec, backend_for, check_inputs
from tests.support.model_bytes import linear_model


def iris_like() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def sklearn_model(tmp_path: Path, zipmap: bool) -> Path:
    x, y = iris_like()
    clf = LogisticRegression(max_iter=200).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)
    path = tmp_path / f"clf-{zipmap}.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


def test_linear_model_matches_onnxruntime_directly(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(linear_model(1, 8, 3))
    model = OnnxRuntimeBackend().load(path)
    assert model.inputs == [TensorSpec("x", "float32", (-1, 8))]
    assert model.outputs == [TensorSpec("y", "float32", (-1, 3))]
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(model.run({"x": x})["y"], expected)


def test_sklearn_classifier_without_zipmap_serves_label_and_probabilities(tmp_path: Path) -> None:
    model = OnnxRuntimeBackend(threads=1).load(sklearn_model(tmp_path, zipmap=False))
    assert [(o.name, o.dtype) for o in model.outputs] == [("label", "int64"), ("probabilities", "float32")]
    x, _ = iris_like()
    out = model.run({"X": x[:7]}, ["probabilities"])
    assert list(out) == ["probabilities"] and out["probabilities"].shape == (7, 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_non_tensor_outputs_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"output 'output_probability' has type seq\(map"):
        OnnxRuntimeBackend().load(sklearn_model(tmp_path, zipmap=True))


def test_garbage_file_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"cannot load bad\.onnx"):
        OnnxRuntimeBackend().load(path)


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({}, (), r"missing \['x'\]"),
        ({"x": np.zeros((1, 8), np.float32), "z": np.zeros(1)}, (), r"unexpected \['z'\]"),
        ({"x": np.zeros((1, 8), np.float64)}, (), "is float64, the model wants float32"),
        ({"x": np.zeros((1, 7), np.float32)}, (), r"has shape \[1, 7\], the model wants \[-1, 8\]"),
        ({"x": np.zeros(8, np.float32)}, (), r"has shape \[8\]"),
        ({"x": np.zeros((1, 8), np.float32)}, ("nope",), r"unknown output\(s\) \['nope'\]"),
    ],
)
def test_bad_inputs_are_invalid_input(
    tmp_path: Path, inputs: dict[str, np.ndarray], outputs: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(linear_model(1, 8, 3))
    model = OnnxRuntimeBackend().load(path)
    with pytest.raises(InvalidInput, match=message):
        model.run(inputs, outputs)


def test_backend_lookup() -> None:
    assert backend_for("onnxruntime").name == "onnxruntime"
    assert backend_for("", "onnx").name == "onnxruntime"
    assert backend_for("", "tflite").name == "litert"
    with pytest.raises(UnsupportedRuntime, match="'tensorrt' for format 'onnx' is not available"):
        backend_for("tensorrt", "onnx")


def sqrt_model(path: Path) -> Path:
    """y = sqrt(x): NaN for every negative x, as a model with a broken weight gives on real inputs."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    return path


def test_an_output_holding_nan_is_a_failed_inference_naming_the_output(tmp_path: Path) -> None:
    model = OnnxRuntimeBackend().load(sqrt_model(tmp_path / "sqrt.onnx"))
    np.testing.assert_array_equal(model.run({"x": np.array([[1, 4, 9]], np.float32)})["y"], [[1, 2, 3]])
    with pytest.raises(InferenceError, match=r"output 'y' holds NaN in 2 of its 3 values"):
        model.run({"x": np.array([[-1, 4, -9]], np.float32)})


def test_the_input_check_worked_out_at_load_refuses_and_admits_what_check_inputs_does() -> None:
    specs = [
        TensorSpec("x", "float32", (-1, 8)),
        TensorSpec("n", "int64", ()),
        TensorSpec("img", "uint8", (1, -1, 4)),
    ]
    check = InputCheck(specs)
    x, n, img = np.zeros((3, 8), np.float32), np.array(2, np.int64), np.zeros((1, 5, 4), np.uint8)
    check({"x": x, "n": n, "img": img})
    check({"x": x, "n": np.ones((2, 2), np.int64), "img": img[:, :2]})
    with pytest.raises(
        InvalidInput, match=r"input 'img' has shape \[2, 5, 4\], the model wants \[1, -1, 4\]"
    ):
        check({"x": x, "n": n, "img": np.zeros((2, 5, 4), np.uint8)})
    specs = specs[:2]
    check = InputCheck(specs)
    # Only the byte order differs: admitted, as the name-based check always did.
    check({"x": x.astype(">f4"), "n": n})
    for inputs, message in [
        ({"x": x}, r"missing \['n'\]"),
        ({"x": x, "m": n}, r"missing \['n'\], unexpected \['m'\]"),
        ({"x": x.astype(np.float64), "n": n}, "is float64, the model wants float32"),
        ({"x": np.zeros((3, 7), np.float32), "n": n}, r"has shape \[3, 7\], the model wants \[-1, 8\]"),
        ({"x": np.zeros((1, 3, 8), np.float32), "n": n}, r"has shape \[1, 3, 8\]"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            check(inputs)
        with pytest.raises(InvalidInput, match=message):
            check_inputs(specs, inputs)
