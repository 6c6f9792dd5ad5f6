"""A gRPC caller's image is sketched in the layout the model version's signature gives its
source input, even where its shape alone cannot tell. Real onnxruntime session, no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2
from onnx import TensorProto, helper, numpy_helper

from agent.api import InferenceApi
from agent.observe import Observer
from agent.pool import ModelPool, ServingModel
from agent.signature import InputRole, ModelSignature
from agent.telemetry import Inferences, InferenceStats, PipelineStats
from agent.tensors import from_numpy
from tests.support.model_bytes import write_model

# Three rows of eight pixels in three colours: axes 1 and 3 both have 3 entries.
SHAPE = (3, 8, 3)


def nhwc_model() -> bytes:
    weights = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["colour"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["colour", "w"], ["probabilities0"]),
            helper.make_node("Softmax", ["probabilities0"], ["probabilities"], axis=1),
        ],
        "nhwc",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Context:
    def invocation_metadata(self) -> list[tuple[str, str]]:
        return []

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        raise AssertionError(f"{code}: {details}")


@pytest.mark.parametrize("layout", ["NHWC", ""], ids=["signed", "unsigned"])
def test_a_called_image_is_sketched_in_its_signature_layout(tmp_path: Path, layout: str) -> None:
    spec = fleet_pb2.DriftSpec(tenant="app", model_name="m", model_version="1", num_classes=4)
    for i in range(3):
        spec.features.add(name=f"ch{i}", edges=[0.5])
    observer = Observer("dev-1")
    observer.configure(fleet_pb2.DesiredState(drift_specs=[spec]))
    pool = ModelPool(threads=1)
    path = tmp_path / "m.onnx"
    digest = write_model(path, nhwc_model())
    signature = ModelSignature(inputs=(InputRole("image", layout=layout, batch_axis=0),))
    pool.put(
        ServingModel(
            "app", "m", "1", digest, "onnxruntime", path, pool.load(digest, path, "onnxruntime"), signature
        )
    )
    api = InferenceApi(pool, Inferences(InferenceStats(), PipelineStats()), lambda: True, observer=observer)

    # Red is bright, green and blue dark: per colour channel, ch0 lands above the edge.
    image = np.zeros((1, *SHAPE), np.float32)
    image[..., 0] = 1.0
    request = inference_pb2.InferRequest(tenant="app", inputs={"image": from_numpy(image, "image")})
    api.Infer(request, Context())

    sketches = observer.drain_sketches()
    if layout:
        (sketch,) = sketches
        assert {h.name: list(h.counts) for h in sketch.features} == {
            "ch0": [0, 1],
            "ch1": [1, 0],
            "ch2": [1, 0],
        }
    else:
        # Without a layout the shape cannot say where the channels are: not sketched, not guessed.
        assert sketches == [] and observer.failures == 1
