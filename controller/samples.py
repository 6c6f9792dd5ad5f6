"""Sample inputs of a model version: the operator's .npz, or one synthesized from the signature.

Samples travel with a version: devices fetch them by digest like an artifact and run them
as the staging smoke inference; the controller validates variants on them and, when no
calibration set was given, calibrates int8 variants with them.

What is stored is the checked set made complete (a state or constant left out of the
file is filled from the signature), so a device needs nothing but the file and the
signature; and a constant the signature gives no value takes the one the samples hold
(silero-vad's sample rate), so a tenant fed from the signature runs as the samples did. Without an operator's file, one sample is synthesized: sources zero with
every free dimension 1, constants and states from the signature. Either way the model
is run once on the first sample at upload, in the memory-limited checker process, so a
model that cannot run on what a device would feed it is refused at once with the
runtime's reason instead of failing later on every device.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from controller.calibration import MAX_CALIBRATION_BYTES, CalibrationSet, load_calibration, synthesized
from controller.errors import InvalidModel, TooLargeError
from controller.model_check import check_runs
from controller.signature import ModelSignature

MAX_SAMPLE_BYTES = MAX_CALIBRATION_BYTES
# The artifact format a sample file is stored and served as.
SAMPLE_FORMAT = "npz"
UPLOADED, SYNTHESIZED = "uploaded", "synthesized"
_NO_SAMPLES_HINT = (
    "; no sample inputs were uploaded, so it was run on zeros with every free dimension 1: "
    "upload sample inputs in the model's own shapes (an .npz of named arrays, `--samples`) "
    "or set constant values in the signature"
)


@dataclass(frozen=True)
class Samples:
    """A checked, complete sample file (temporary until stored) and what it holds."""

    path: Path
    count: int
    origin: str
    # The signature to store with them: constants the signature left without a value
    # take the one value the samples hold for them.
    signature: ModelSignature
    # The operator's file as uploaded (kept as the calibration set); None when synthesized.
    raw: Path | None = None


# A constant longer than this stays in the samples only (a signature is sent with every assignment).
MAX_CONSTANT_VALUES = 64


def _one_value(checked: CalibrationSet, name: str) -> list[float] | None:
    """The value every sample gives input ``name`` (one number when all its elements agree),
    None when samples differ or it is too long to carry in a signature."""
    array, axis = checked.arrays[name], checked.batch_axes[name]
    if axis is None:
        values = array.reshape(-1)
    else:
        first = np.take(array, [0], axis=axis)
        if not all(np.array_equal(first, np.take(array, [i], axis=axis)) for i in range(1, checked.count)):
            return None
        values = first.reshape(-1)
    if values.size and np.all(values == values[0]):
        values = values[:1]
    if not 0 < values.size <= MAX_CONSTANT_VALUES:
        return None
    return [float(v) for v in values]


def with_sample_constants(signature: ModelSignature, checked: CalibrationSet) -> ModelSignature:
    """``signature`` with each constant it gives no value (a sample rate) taking the one the
    samples hold, so a device feeds a tenant what the model was checked with."""
    roles = []
    for role in signature.inputs:
        if role.role == "constant" and not role.value and role.name in checked.arrays:
            value = _one_value(checked, role.name)
            if value is not None:
                role = replace(role, value=value)
        roles.append(role)
    return ModelSignature(roles, signature.outputs)


def _save(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with path.open("wb") as out:
        np.savez(out, **arrays)  # type: ignore[arg-type]
        out.flush()
        os.fsync(out.fileno())


def _copy_bounded(source: BinaryIO, target: Path) -> None:
    size = 0
    with target.open("wb") as out:
        while data := source.read(1024 * 1024):
            size += len(data)
            if size > MAX_SAMPLE_BYTES:
                raise TooLargeError(f"sample inputs exceed {MAX_SAMPLE_BYTES} bytes")
            out.write(data)


@contextmanager
def prepared_samples(
    source: BinaryIO | None,
    signature: ModelSignature,
    model: Path,
    memory_limit: int,
    work_dir: Path,
    what: str = "sample",
) -> Iterator[Samples]:
    """The operator's samples (``source``) checked against ``signature``, or one synthesized;
    the model at ``model`` run once on the first. InvalidInputError / InvalidModel name the
    problem (``what`` names the file). The yielded files are removed on exit: store them before."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".samples-", dir=work_dir) as tmp:
        complete, first = Path(tmp) / "samples.npz", Path(tmp) / "first.npz"
        order = [i.name for i in signature.inputs]
        if source is not None:
            uploaded = Path(tmp) / "uploaded.npz"
            _copy_bounded(source, uploaded)
            checked = load_calibration(uploaded, signature, what)
            _save(complete, checked.arrays)
            _save(first, checked.feed(0))
            count, origin, raw = checked.count, UPLOADED, uploaded
            signature = with_sample_constants(signature, checked)
        else:
            arrays = synthesized(signature)
            _save(complete, arrays)
            _save(first, arrays)
            count, origin, raw = 1, SYNTHESIZED, None
        try:
            check_runs(model, first, order, memory_limit)
        except InvalidModel as exc:
            raise InvalidModel(f"{exc}{_NO_SAMPLES_HINT if origin == SYNTHESIZED else ''}") from None
        yield Samples(complete, count, origin, signature, raw)
