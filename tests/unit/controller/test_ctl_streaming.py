"""Stateful models are judged on a stream with their state carried, not on independent samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from controller.inspection import TensorSpec
from controller.model_runner import Runner
from controller.optimize import Workload, validate
from controller.streaming import state_pairs


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


def test_state_inputs_are_paired_with_the_outputs_that_feed_them() -> None:
    vad_in = [TensorSpec("input", "float32", [-1, -1]), TensorSpec("state", "float32", [2, -1, 128])]
    vad_out = [TensorSpec("output", "float32", [-1, 1]), TensorSpec("stateN", "float32", [-1, -1, -1])]
    assert state_pairs(vad_in, vad_out) == {"state": "stateN"}
    lstm_in = [TensorSpec("x", "float32", [-1, 8]), TensorSpec("h0", "float32", [1, -1, 16])]
    lstm_in.append(TensorSpec("c0", "float32", [1, -1, 16]))
    lstm_out = [TensorSpec("hn", "float32", [1, -1, 16]), TensorSpec("cn", "float32", [1, -1, 16])]
    assert state_pairs(lstm_in, lstm_out) == {"h0": "hn", "c0": "cn"}
    # A name that matches but could not be fed back (rank or dtype) is no state.
    assert state_pairs([TensorSpec("s", "float32", [1, 4])], [TensorSpec("sN", "float32", [4])]) == {}
    assert state_pairs([TensorSpec("s", "float32", [1])], [TensorSpec("sN", "int64", [1])]) == {}


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
