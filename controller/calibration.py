"""Sample inputs and calibration sets: an .npz of named model inputs, checked against the
model's signature (:mod:`controller.signature`).

Each array holds the samples of one input in the model's own layout, stacked along the
batch axis the signature gives that input, which is not always the first: silero-vad's
recurrent state is ``(2, batch, 128)``. An input without a batch axis (or a scalar given
as a 0-d array) is fed unchanged with every sample (a sample rate); a scalar input may
also be given one value per sample (a 1-D array). A state input, and a constant whose
value the signature holds, may be left out: they are filled from the signature.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.errors import InvalidInputError
from controller.signature import InputRole, ModelSignature

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


def _filled(role: InputRole, count: int) -> tuple[np.ndarray, int | None] | None:
    """The array the signature gives an input left out of the file, with its batch axis;
    None when it gives none (a source, or a constant without a value)."""
    if role.role == "source" or (role.role == "constant" and not role.value):
        return None
    shape = [d if d >= 0 else 1 for d in role.shape]
    axis = role.axis if role.role == "state" else None
    if axis is not None:
        shape[axis] = count
    values = role.value or [0.0]
    if len(values) == 1:
        return np.full(shape, values[0], dtype=role.dtype), axis
    return np.asarray(values, dtype=role.dtype).reshape(shape), axis


def load_calibration(path: Path, signature: ModelSignature, what: str = "calibration") -> CalibrationSet:
    """Read the .npz at ``path`` and check it against ``signature`` (InvalidInputError naming
    the input and the mismatch); ``what`` names the file in messages."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidInputError(f"{what} set is not a readable .npz: {exc}") from None
    return checked_set(arrays, signature, what)


def checked_set(arrays: Mapping[str, np.ndarray], signature: ModelSignature, what: str) -> CalibrationSet:
    names = [i.name for i in signature.inputs]
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise InvalidInputError(
            f"{what} array {unknown[0]!r} is not an input of the model (its inputs: {names})"
        )
    axes: dict[str, int | None] = {}
    scalars: set[str] = set()
    counts: dict[str, int] = {}
    for name, array in arrays.items():
        role = signature.input(name)
        assert role is not None
        if array.dtype.name != role.dtype:
            raise InvalidInputError(
                f"{what} array {name!r} is {array.dtype.name}, the input wants {role.dtype}"
            )
        if not role.shape:
            if array.ndim > 1:
                raise InvalidInputError(
                    f"{what} array {name!r} has shape {list(array.shape)}; the input is a scalar: "
                    "give one value (a 0-d array) or one value per sample (a 1-D array)"
                )
            scalars.add(name)
            axes[name] = 0 if array.ndim == 1 else None
        else:
            axes[name] = _checked_axis(name, array, role, what)
        axis = axes[name]
        if axis is not None:
            counts[name] = array.shape[axis]
    if len(set(counts.values())) > 1 or 0 in counts.values():
        raise InvalidInputError(
            f"{what} arrays need the same, non-zero number of samples along their batch axes, got "
            + ", ".join(f"{n}: {c} (axis {axes[n]})" for n, c in sorted(counts.items()))
        )
    count = next(iter(counts.values()), 1)
    complete = dict(arrays)
    for role in signature.inputs:
        if role.name in complete:
            continue
        filled = _filled(role, count)
        if filled is None:
            kind = "a source" if role.role == "source" else "a constant with no value in the signature"
            raise InvalidInputError(
                f"{what} set lacks input {role.name!r} ({kind}): add it to the .npz"
                + ("" if role.role == "source" else " or set its value in the signature")
            )
        complete[role.name], axes[role.name] = filled
    return CalibrationSet(complete, axes, frozenset(scalars), count)


def synthesized(signature: ModelSignature) -> dict[str, np.ndarray]:
    """One sample made from the signature alone: sources zero with every free dimension 1,
    constants and states from their values (zero where the signature has none)."""
    arrays = {}
    for role in signature.inputs:
        filled = _filled(role, 1)
        if filled is None:
            filled = np.zeros([d if d >= 0 else 1 for d in role.shape], dtype=role.dtype), None
        arrays[role.name] = filled[0]
    return arrays


def _checked_axis(name: str, array: np.ndarray, role: InputRole, what: str) -> int | None:
    shape, axis = role.shape, role.axis
    if array.ndim != len(shape):
        raise InvalidInputError(
            f"{what} array {name!r} has {array.ndim} axes (shape {list(array.shape)}), "
            f"the input has {len(shape)} ({shape})"
        )
    for i, (have, dim) in enumerate(zip(array.shape, shape, strict=True)):
        if i != axis and dim >= 0 and have != dim:
            where = f"samples along axis {axis}" if axis is not None else "an input without a batch axis"
            raise InvalidInputError(
                f"{what} array {name!r} has shape {list(array.shape)}, the input is {shape} "
                f"(axis {i} must be {dim}; {where})"
            )
    return axis
