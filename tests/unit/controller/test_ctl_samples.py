"""Sample inputs give the signature's constants their values: one value every sample agrees on."""

from __future__ import annotations

import numpy as np

from controller.calibration import checked_set
from controller.samples import MAX_CONSTANT_VALUES, with_sample_constants
from controller.signature import InputRole, ModelSignature, OutputMeaning

SIGNATURE = ModelSignature(
    [
        InputRole("input", "source", "float32", [-1, -1], "NT", 0),
        InputRole("sr", "constant", "int64", []),
        InputRole("gains", "constant", "float32", [-1]),
    ],
    [OutputMeaning("output", "scores", "float32", [-1, 1])],
)


def values(arrays: dict[str, np.ndarray]) -> dict[str, list[float]]:
    checked = checked_set(arrays, SIGNATURE, "sample")
    return {i.name: i.value for i in with_sample_constants(SIGNATURE, checked).inputs}


def test_a_constant_takes_the_one_value_the_samples_hold() -> None:
    audio = np.zeros((4, 576), np.float32)
    got = values({"input": audio, "sr": np.array(16000, np.int64), "gains": np.full(3, 0.5, np.float32)})
    assert got == {"input": [], "sr": [16000.0], "gains": [0.5]}
    # One value per sample, all the same: that value.
    assert values({"input": audio, "sr": np.full(4, 8000, np.int64), "gains": np.ones(3, np.float32)})[
        "sr"
    ] == [8000.0]
    # A vector of different values is kept whole.
    assert values({"input": audio, "sr": np.array(8000, np.int64), "gains": np.arange(3, dtype=np.float32)})[
        "gains"
    ] == [0.0, 1.0, 2.0]


def test_samples_that_disagree_or_a_constant_too_long_leave_the_value_to_the_samples() -> None:
    audio = np.zeros((4, 576), np.float32)
    differing = np.array([8000, 16000, 16000, 8000], np.int64)
    long = np.arange(MAX_CONSTANT_VALUES + 1, dtype=np.float32)
    got = values({"input": audio, "sr": differing, "gains": long})
    assert got == {"input": [], "sr": [], "gains": []}
