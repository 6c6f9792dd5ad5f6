"""A variant added to a version takes as many values per sample as the version, each sample
counted along the batch axis the version's signature gives (not always the first: a
recurrent state is (layers, batch, units))."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from controller.errors import ConflictError, InvalidModel
from controller.registry import Registry, UploadOptions
from controller.signature import InputRole, ModelSignature, OutputMeaning
from tests.unit.controller.helpers import Parts


def doubler(path: Path, shape: list[int | str]) -> Path:
    """y = 2 x over a (layers, batch, units) tensor."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_variant_is_measured_per_sample_along_the_signatures_batch_axis(tmp_path: Path) -> None:
    registry: Registry = Parts(tmp_path).registry
    signature = ModelSignature(
        [InputRole("x", "source", "float32", [2, -1, 8], "", 1)],
        [OutputMeaning("y", "", "float32", [2, -1, 8])],
    )
    version = doubler(tmp_path / "v.onnx", [2, "batch", 8])
    registry.upload("rnn", "1", version.open("rb"), {}, UploadOptions(task="regression"), signature=signature)
    # Batch of 1 on axis 1: 2 x 8 = 16 values per sample, as the version takes (refused only
    # because the version has an onnx-fp32 variant already, the uploaded file).
    fits = doubler(tmp_path / "fits.onnx", [2, 1, 8])
    with pytest.raises(ConflictError, match="already has a onnx-fp32 variant"):
        registry.add_variant("rnn", "1", fits.open("rb"))
    narrow = doubler(tmp_path / "narrow.onnx", [2, 1, 4])
    with pytest.raises(InvalidModel, match="input 0 takes 8 values per sample, version 1 takes 16"):
        registry.add_variant("rnn", "1", narrow.open("rb"))
