"""A tenant's post-processing that names no output reads the one the model's signature calls
``scores``, not whatever output comes first.

Real pipeline, real onnxruntime: a classifier exported the way skl2onnx exports one, its
integer label first and its class probabilities second. Read from the first output, the
label would become a one-class score row and every result would say class 0.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import onnx
from edgefleet_proto import inference_pb2
from onnx import TensorProto, helper

from agent.pipeline import Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.postprocess import PostprocessSpec
from agent.signature import InputRole, ModelSignature, OutputMeaning
from agent.telemetry import PipelineStats
from agent.tenants import SourceSpec, TenantSpec
from tests.support.model_bytes import write_model

ROWS = 20


def label_first_classifier() -> bytes:
    """x: float32[1, 3] -> label: int64[1] (argmin, so a misread shows), probs: float32[1, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["x"], ["probs"], axis=1),
            helper.make_node("ArgMin", ["probs"], ["label"], axis=1, keepdims=0),
        ],
        "label_first",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=(InputRole("x", "source", "NC", 0, "float32", (1, 3)),),
        outputs=(
            OutputMeaning("label", "", "int64", (1,)),
            OutputMeaning("probs", "scores", "float32", (1, 3)),
        ),
    )


def test_classes_without_a_named_output_come_from_the_signatures_scores(tmp_path: Path) -> None:
    rows = np.tile(np.array([[0.0, 1.0, 5.0]], dtype=np.float32), (ROWS, 1))
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%g")
    published: queue.Queue[inference_pb2.Result] = queue.Queue()
    p = Pipelines(
        "dev-1",
        ModelPool(threads=1),
        1,
        PipelineStats(),
        lambda *a: None,
        lambda topic, payload: published.put(inference_pb2.Result.FromString(payload)),
        ResultHub(),
    )
    path = tmp_path / "label_first.onnx"
    digest = write_model(path, label_first_classifier())
    p.pool.put(
        ServingModel(
            "t",
            "clf",
            "1",
            digest,
            "onnxruntime",
            path,
            p.pool.load(digest, path, "onnxruntime"),
            signature(),
        )
    )
    p.start()
    spec = TenantSpec(
        "t",
        SourceSpec("csv", str(csv)),
        model="clf",
        queue=ROWS,
        results=frozenset({"mqtt"}),
        postprocess=PostprocessSpec(kind="classes", top_k=1),
    )
    p.apply((spec,))
    try:
        result = published.get(timeout=60)
    finally:
        p.apply(())
        p.stop(10)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and not result.classes:
        result = published.get(timeout=1)
    assert [c.index for c in result.classes] == [2], result
    assert abs(result.classes[0].score - float(np.exp(5) / np.exp([0.0, 1.0, 5.0]).sum())) < 1e-5
