"""The inputs of the staging smoke inference: the version's sample, else made from its signature.

Real models refuse zeros with every free dimension set to 1 (silero-vad pads its
input by reflection and needs a sample rate it knows), so a version may carry sample
inputs: an .npz of named arrays in the model's own shapes, any batch axis, scalars
allowed. Staging runs the first item along each input's batch axis (as the
signature names it; an input without one is run whole). Without a sample the inputs
are made from the signature (constants and state initial values as declared, source
inputs zeros, free dimensions 1); without a signature either, zeros. A sample that
does not load or does not fit the model is refused with the input and the mismatch named.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

from agent.errors import ModelError
from agent.runtime import TensorSpec
from agent.signature import CONSTANT, NO_AXIS, STATE, ModelSignature


def zeros(spec: TensorSpec) -> np.ndarray:
    return np.zeros(tuple(d if d > 0 else 1 for d in spec.shape), dtype=np.dtype(spec.dtype))


def synthesize(inputs: Sequence[TensorSpec], signature: ModelSignature | None) -> dict[str, np.ndarray]:
    """One valid-looking input per model input: constants and state from the signature, else zeros."""
    out = {}
    for spec in inputs:
        role = signature.input(spec.name) if signature is not None else None
        if role is not None and role.role in (CONSTANT, STATE):
            feed = role.feed()
            if not feed.shape and spec.shape:
                # A signature without a shape takes the model's.
                feed = replace(feed, shape=tuple(d if d > 0 else 1 for d in spec.shape))
            out[spec.name] = feed.initial().astype(np.dtype(spec.dtype), copy=False)
        else:
            out[spec.name] = zeros(spec)
    return out


def load(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a sample .npz (no pickled objects)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, NpzFile):
            raise ValueError("it holds one unnamed array (.npy), not named arrays")
        with loaded as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"the sample {path.name} is not a readable .npz of arrays: {exc}") from None


def first_item(array: np.ndarray, axis: int) -> np.ndarray:
    """The first item along ``axis``, the axis kept (a batch of one); the array as is without one."""
    if axis == NO_AXIS or not 0 <= axis < array.ndim or array.shape[axis] <= 1:
        return array
    return np.take(array, [0], axis=axis)


def fit(name: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """``array`` as input ``name`` of the model, or a ModelError naming the mismatch."""
    if array.ndim != len(spec.shape):
        raise ModelError(
            f"sample input {name!r} has shape {list(array.shape)}, the model wants {len(spec.shape)} "
            f"dimensions {list(spec.shape)}"
        )
    wrong = [
        i
        for i, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True))
        if want >= 0 and have != want
    ]
    if wrong:
        raise ModelError(
            f"sample input {name!r} has shape {list(array.shape)}, the model wants {list(spec.shape)} "
            f"(axis {wrong[0]} differs)"
        )
    want = np.dtype(spec.dtype)
    if array.dtype != want:
        if not np.can_cast(array.dtype, want, casting="same_kind"):
            raise ModelError(f"sample input {name!r} is {array.dtype}, the model wants {want}")
        array = array.astype(want)
    return array


def staging_inputs(
    inputs: Sequence[TensorSpec], signature: ModelSignature | None, sample: Path | None
) -> dict[str, np.ndarray]:
    """What the staging smoke inference runs."""
    original = signature
    if signature is not None:
        # A variant may name its inputs otherwise than the uploaded model, whose names the
        # signature and the sample use: it takes them by position (ModelSignature.bound).
        signature = signature.bound([s.name for s in inputs], [o.name for o in signature.outputs])
    made = synthesize(inputs, signature)
    if sample is None:
        return made
    arrays = load(sample)
    if original is not None and signature is not original:
        arrays = {
            spec.name: arrays[role.name]
            for spec, role in zip(inputs, original.inputs, strict=True)
            if spec.name not in arrays and role.name in arrays
        } | arrays
    out = {}
    for spec in inputs:
        role = signature.input(spec.name) if signature is not None else None
        if spec.name not in arrays:
            if role is not None and role.role in (CONSTANT, STATE):
                # The signature says what a constant or a state starts as; the sample need not.
                out[spec.name] = made[spec.name]
                continue
            raise ModelError(
                f"the sample has no input {spec.name!r} (it has {sorted(arrays)}; "
                f"the model wants {[s.name for s in inputs]})"
            )
        array = arrays[spec.name]
        if array.ndim == len(spec.shape):
            array = first_item(array, role.batch_axis if role is not None else NO_AXIS)
        out[spec.name] = fit(spec.name, array, spec)
    return out
