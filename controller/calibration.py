"""Calibration sets: the operator's .npz of named model inputs, checked against the signature."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from controller.errors import InvalidInputError
from controller.inspection import TensorSpec

MAX_CALIBRATION_BYTES = 256 * 1024 * 1024


def load_calibration(path: Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The operator's .npz: one array per model input, samples along the first axis."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidInputError(f"calibration set is not a readable .npz: {exc}") from None
    want = {s.name: s for s in inputs}
    if set(arrays) != set(want):
        raise InvalidInputError(
            f"calibration set has arrays {sorted(arrays)}, the model's inputs are {sorted(want)}"
        )
    counts = set()
    for name, array in arrays.items():
        spec = want[name]
        if array.dtype.name != spec.dtype:
            raise InvalidInputError(
                f"calibration array {name!r} is {array.dtype.name}, the input wants {spec.dtype}"
            )
        if array.ndim != len(spec.shape) or any(
            w >= 0 and h != w for h, w in zip(array.shape[1:], spec.shape[1:], strict=False)
        ):
            raise InvalidInputError(
                f"calibration array {name!r} has shape {list(array.shape)}, the input is {spec.shape} "
                "(samples along the first axis)"
            )
        counts.add(array.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise InvalidInputError(
            f"calibration arrays need the same, non-zero number of samples, got {sorted(counts)}"
        )
    return arrays
