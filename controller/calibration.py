"""Calibration sets: the operator's .npz of named model inputs, checked against the signature.

Each array holds the samples of one input in the model's own layout, stacked along
that input's batch axis, which is not always the first: silero-vad's recurrent state
is ``(2, batch, 128)``. The batch axis of an input is the first free dimension of its
shape, else the first dimension of size 1; an input with neither (or a scalar given as
a 0-d array) is a constant, fed unchanged with every sample (a sample rate). A scalar
input may also be given one value per sample (a 1-D array).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.errors import InvalidInputError
from controller.inspection import TensorSpec

MAX_CALIBRATION_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CalibrationSet:
    arrays: dict[str, np.ndarray]
    # Per input: the axis its samples are stacked along, or None for a constant input.
    batch_axes: dict[str, int | None]
    # Inputs whose model shape is a scalar: one sample is ``array[i]``, not a slice.
    scalars: frozenset[str]
    count: int

    @classmethod
    def stacked(cls, arrays: Mapping[str, np.ndarray]) -> CalibrationSet:
        """Arrays whose samples all lie along the first axis (a set not read from a file)."""
        counts = {a.shape[0] for a in arrays.values()}
        if len(counts) != 1:
            raise InvalidInputError(f"arrays need the same number of samples, got {sorted(counts)}")
        return cls(dict(arrays), dict.fromkeys(arrays, 0), frozenset(), counts.pop())

    def sample(self, index: int, order: Sequence[str]) -> list[np.ndarray]:
        """Sample ``index`` as the model takes it (batch axis kept, of size 1), inputs in ``order``."""
        return [self._one(name, index) for name in order]

    def feed(self, index: int) -> dict[str, np.ndarray]:
        return {name: self._one(name, index) for name in self.arrays}

    def samples(self, order: Sequence[str], limit: int) -> list[list[np.ndarray]]:
        return [self.sample(i, order) for i in range(min(limit, self.count))]

    def _one(self, name: str, index: int) -> np.ndarray:
        array, axis = self.arrays[name], self.batch_axes[name]
        if axis is None:
            return array
        if name in self.scalars:
            return np.asarray(array[index])
        return np.take(array, [index], axis=axis)


def batch_axis(spec: TensorSpec) -> int | None:
    """The axis a batch of ``spec`` grows along: the first free one, else the first of size 1."""
    for wanted in (-1, 1):
        if wanted in spec.shape:
            return spec.shape.index(wanted)
    return None


def load_calibration(
    path: Path, inputs: list[TensorSpec], batch_axes: Mapping[str, int | None] | None = None
) -> CalibrationSet:
    """Read and check the operator's .npz; ``batch_axes`` overrides the batch axis per input."""
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
    axes: dict[str, int | None] = {}
    scalars: set[str] = set()
    counts: dict[str, int] = {}
    for name, array in arrays.items():
        spec = want[name]
        if array.dtype.name != spec.dtype:
            raise InvalidInputError(
                f"calibration array {name!r} is {array.dtype.name}, the input wants {spec.dtype}"
            )
        if not spec.shape:
            if array.ndim > 1:
                raise InvalidInputError(
                    f"calibration array {name!r} has shape {list(array.shape)}; the input is a scalar: "
                    "give one value (a 0-d array) or one value per sample (a 1-D array)"
                )
            scalars.add(name)
            axes[name] = 0 if array.ndim == 1 else None
        else:
            axes[name] = _checked_axis(name, array, spec, (batch_axes or {}).get(name, batch_axis(spec)))
        axis = axes[name]
        if axis is not None:
            counts[name] = array.shape[axis]
    if len(set(counts.values())) > 1 or 0 in counts.values():
        raise InvalidInputError(
            "calibration arrays need the same, non-zero number of samples along their batch axes, got "
            + ", ".join(f"{n}: {c} (axis {axes[n]})" for n, c in sorted(counts.items()))
        )
    count = next(iter(counts.values()), 1)
    return CalibrationSet(arrays, axes, frozenset(scalars), count)


def _checked_axis(name: str, array: np.ndarray, spec: TensorSpec, axis: int | None) -> int | None:
    if array.ndim != len(spec.shape):
        raise InvalidInputError(
            f"calibration array {name!r} has {array.ndim} axes (shape {list(array.shape)}), "
            f"the input has {len(spec.shape)} ({spec.shape})"
        )
    if axis is not None and not 0 <= axis < array.ndim:
        raise InvalidInputError(f"batch axis {axis} of {name!r} is outside its {array.ndim} axes")
    for i, (have, dim) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if i != axis and dim >= 0 and have != dim:
            where = f"samples along axis {axis}" if axis is not None else "a constant input"
            raise InvalidInputError(
                f"calibration array {name!r} has shape {list(array.shape)}, the input is {spec.shape} "
                f"(axis {i} must be {dim}; {where})"
            )
    return axis
