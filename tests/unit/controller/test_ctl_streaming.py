"""Stateful models are judged on a stream with their state carried, not on independent samples."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from controller.inspection import TensorSpec
from controller.model_runner import Runner
from controller.optimize import Workload, validate
from controller.signature import infer_signature
from controller.streaming import feedback, state_pairs


def accumulator(path: Path, leak: float) -> Path:
    """y = x + s and sN = leak * s + x: from a zero state every leak gives the same y."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "s"], ["y"]),
            helper.make_node("Mul", ["s", "leak"], ["kept"]),
            helper.make_node("Add", ["kept", "x"], ["sN"]),
        ],
        "acc",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("sN", TensorProto.FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array(np.array(leak, np.float32), "leak")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_feedback_follows_the_signature_not_the_names() -> None:
    inputs = [TensorSpec("x", "float32", [1, 4]), TensorSpec("s", "float32", [1, 4])]
    outputs = [TensorSpec("y", "float32", [1, 4]), TensorSpec("sN", "float32", [1, 4])]
    inferred = infer_signature(inputs, outputs)
    assert state_pairs(inferred) == {"s": "sN"} and feedback(inferred) == {1: 1}
    # An operator who says the state comes from y is followed; one who says s is a
    # constant turns the feedback off.
    from_y = replace(inferred, inputs=[inferred.inputs[0], replace(inferred.inputs[1], from_output="y")])
    assert feedback(from_y) == {1: 0}
    constant = replace(
        inferred, inputs=[inferred.inputs[0], replace(inferred.inputs[1], role="constant", from_output="")]
    )
    assert state_pairs(constant) == {} and feedback(constant) == {}


def test_a_variant_that_drifts_only_through_its_state_fails_on_the_stream(tmp_path: Path) -> None:
    reference = Runner(accumulator(tmp_path / "ref.onnx", 1.0), "onnx")
    leaky = Runner(accumulator(tmp_path / "leaky.onnx", 0.5), "onnx")
    rng = np.random.default_rng(0)
    samples = [[rng.random((1, 4), dtype=np.float32), np.zeros((1, 4), np.float32)] for _ in range(20)]
    independent = Workload(samples, {}, {})
    assert validate(independent.outputs(reference), independent.outputs(leaky), "regression", 0.99).passed
    stream = Workload(samples, {1: 1}, {"s": "sN"})
    expected = stream.outputs(reference)
    np.testing.assert_allclose(expected[0][-1], np.sum([s[0][0] for s in samples], axis=0), rtol=1e-5)
    verdict = validate(expected, stream.outputs(leaky), "regression", 0.99)
    assert not verdict.passed and "below the gate" in verdict.reason
    assert stream.report() == {"streaming": {"state": {"s": "sN"}, "steps": 20}}
