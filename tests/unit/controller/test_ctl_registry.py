from __future__ import annotations

import io
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from controller.artifacts import ArtifactStore
from controller.errors import InvalidInputError, InvalidModel, ModelNotFound, TooLargeError, VersionExists
from controller.inspection import TensorSpec, inspect_onnx
from controller.registry import Registry
from controller.store import Store
from tests.support.model_files import add_model


def sequence_output_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
    )
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    return path


def unknown_op_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    onnx.checker.check_model(model)  # the checker has no opinion on custom domains
    path.write_bytes(model.SerializeToString())
    return path


def test_signature_records_names_dtypes_and_free_dims(tmp_path: Path) -> None:
    signature = inspect_onnx(add_model(tmp_path / "add.onnx"))
    assert signature.inputs == [TensorSpec("a", "float32", [-1, 4]), TensorSpec("b", "float32", [-1, 4])]
    assert signature.outputs == [TensorSpec("sum", "float32", [-1, 4]), TensorSpec("ids", "int64", [-1, 4])]


def test_not_an_onnx_file_is_refused_with_the_checkers_reason(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not a model")
    with pytest.raises(InvalidModel, match=r"onnx\.checker"):
        inspect_onnx(path)


def test_a_model_onnxruntime_cannot_load_is_refused_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match=r"onnxruntime cannot load the model.*Frobnicate"):
        inspect_onnx(unknown_op_model(tmp_path / "custom.onnx"))


def test_non_tensor_outputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match=r"output 'seq' is a seq.*not a tensor.*zipmap"):
        inspect_onnx(sequence_output_model(tmp_path / "seq.onnx"))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(Store(tmp_path / "c.db"), ArtifactStore(tmp_path / "artifacts", 1024), 1_000_000)


def test_upload_stores_version_and_artifact(registry: Registry, tmp_path: Path) -> None:
    data = add_model(tmp_path / "add.onnx").read_bytes()
    created = registry.upload("adder", "1.0", io.BytesIO(data), {"owner": "me"})
    assert (created.name, created.version, created.size, created.format) == (
        "adder",
        "1.0",
        len(data),
        "onnx",
    )
    assert created.metadata == {"owner": "me"}
    assert registry.artifacts.path(created.digest).read_bytes() == data
    assert registry.get("adder", "1.0") == created
    [summary] = registry.all()
    assert summary.name == "adder" and [v.version for v in summary.versions] == ["1.0"]
    with pytest.raises(VersionExists, match=r"adder version 1\.0"):
        registry.upload("adder", "1.0", io.BytesIO(data), {})
    # Same bytes under another version share the artifact.
    assert registry.upload("adder", "1.1", io.BytesIO(data), {}).digest == created.digest


def test_refused_uploads_store_nothing(registry: Registry, tmp_path: Path) -> None:
    bad = [
        b"",
        b"garbage",
        sequence_output_model(tmp_path / "s.onnx").read_bytes(),
        unknown_op_model(tmp_path / "u.onnx").read_bytes(),
    ]
    for data in bad:
        with pytest.raises(InvalidModel):
            registry.upload("m", "1", io.BytesIO(data), {})
    registry.max_upload_bytes = 10
    with pytest.raises(TooLargeError):
        registry.upload("m", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    for name, version in (("bad name!", "1"), ("m", ""), ("m", "../1")):
        with pytest.raises(InvalidInputError):
            registry.upload(name, version, io.BytesIO(b""), {})
    assert registry.all() == []
    assert list(registry.artifacts.root.iterdir()) == []
    with pytest.raises(ModelNotFound):
        registry.get("m", "1")
