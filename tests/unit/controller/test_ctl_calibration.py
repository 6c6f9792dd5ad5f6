"""Calibration sets in the model's own layout: scalars, batch axes that are not the first,
and the clear refusals of arrays that do not fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from controller.baselines import model_probabilities
from controller.calibration import load_calibration, synthesized
from controller.errors import InvalidInputError
from controller.inspection import TensorSpec
from controller.signature import infer_signature
from tests.support.models import digits_mlp, tflite_mlp

# silero-vad's signature: audio (batch, samples), recurrent state (2, batch, 128), sample rate scalar.
VAD = infer_signature(
    [
        TensorSpec("input", "float32", [-1, -1]),
        TensorSpec("state", "float32", [2, -1, 128]),
        TensorSpec("sr", "int64", []),
    ],
    [TensorSpec("output", "float32", [-1, 1]), TensorSpec("stateN", "float32", [-1, -1, -1])],
)


def save(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    return path


def test_a_scalar_input_and_a_batch_axis_in_the_middle(tmp_path: Path) -> None:
    audio = np.arange(3 * 576, dtype=np.float32).reshape(3, 576)
    state = np.stack([np.full((2, 128), i, np.float32) for i in range(3)], axis=1)  # (2, 3, 128)
    cal = load_calibration(save(tmp_path, input=audio, state=state, sr=np.array(16000)), VAD)
    assert cal.count == 3 and cal.batch_axes == {"input": 0, "state": 1, "sr": None}
    second = cal.sample(1, ["input", "state", "sr"])
    assert [a.shape for a in second] == [(1, 576), (2, 1, 128), ()]
    assert second[0][0, 0] == 576 and (second[1] == 1).all() and int(second[2]) == 16000
    per_sample = load_calibration(
        save(tmp_path, input=audio, state=state, sr=np.array([8000, 16000, 16000])), VAD
    )
    assert int(per_sample.feed(0)["sr"]) == 8000 and per_sample.feed(0)["sr"].shape == ()


def test_a_fixed_batch_of_one_takes_samples_along_it(tmp_path: Path) -> None:
    spec = infer_signature([TensorSpec("input", "float32", [1, 8, 8, 3])], [])
    cal = load_calibration(save(tmp_path, input=np.zeros((5, 8, 8, 3), np.float32)), spec)
    assert cal.count == 5 and cal.sample(4, ["input"])[0].shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"sr": np.zeros((1, 1), np.int64)}, "'sr' has shape [1, 1]; the input is a scalar"),
        ({"state": np.zeros((2, 4, 128), np.float32)}, "input: 3 (axis 0), state: 4 (axis 1)"),
        ({"state": np.zeros((2, 3, 64), np.float32)}, "axis 2 must be 128"),
        ({"state": np.zeros((3, 128), np.float32)}, "'state' has 2 axes (shape [3, 128]), the input has 3"),
        ({"sr": np.array(16000.0)}, "'sr' is float64, the input wants int64"),
        ({"speed": np.array(1.0)}, "array 'speed' is not an input of the model"),
    ],
)
def test_arrays_that_do_not_fit_are_refused_naming_the_input(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    good = {
        "input": np.zeros((3, 576), np.float32),
        "state": np.zeros((2, 3, 128), np.float32),
        "sr": np.array(16000),
    }
    with pytest.raises(InvalidInputError) as refused:
        load_calibration(save(tmp_path, **{**good, **arrays}), VAD)
    assert message in str(refused.value)


def test_a_left_out_state_and_constant_come_from_the_signature(tmp_path: Path) -> None:
    audio = np.zeros((3, 576), np.float32)
    with pytest.raises(
        InvalidInputError, match="lacks input 'sr' \\(a constant with no value in the signature\\)"
    ):
        load_calibration(save(tmp_path, input=audio), VAD)
    valued = replace(VAD, inputs=[replace(i, value=[16000.0]) if i.name == "sr" else i for i in VAD.inputs])
    cal = load_calibration(save(tmp_path, input=audio), valued)
    # The state fills its batch axis (axis 1) with one initial state per sample.
    assert cal.arrays["state"].shape == (2, 3, 128) and cal.batch_axes["state"] == 1
    assert int(cal.feed(2)["sr"]) == 16000 and cal.feed(2)["state"].shape == (2, 1, 128)
    one = synthesized(valued)
    assert {k: v.shape for k, v in one.items()} == {"input": (1, 1), "state": (2, 1, 128), "sr": ()}
    assert one["sr"].dtype == np.int64 and int(one["sr"]) == 16000


def test_reference_predictions_of_a_tflite_classifier_come_from_litert(tmp_path: Path) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    tfl = tflite_mlp(tmp_path / "mlp.tflite", mlp.layers)
    from_tflite = model_probabilities(tfl, mlp.samples[:30], 0)
    from_onnx = model_probabilities(mlp.path, mlp.samples[:30], 0)
    assert from_tflite is not None and from_onnx is not None
    np.testing.assert_allclose(from_tflite, from_onnx, atol=1e-4)
