"""Sample inputs of a model version: the operator's .npz, or one synthesized from the signature.

Samples travel with a version: devices fetch them by digest like an artifact and run them
as the staging smoke inference; the controller validates variants on them and, when no
calibration set was given, calibrates int8 variants with them.

What is stored is the checked set made complete (a state or constant left out of the
file is filled from the signature), so a device needs nothing but the file and the
signature. Without an operator's file, one sample is synthesized: sources zero with
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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from controller.calibration import MAX_CALIBRATION_BYTES, load_calibration, synthesized
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
    # The operator's file as uploaded (kept as the calibration set); None when synthesized.
    raw: Path | None = None


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
        else:
            arrays = synthesized(signature)
            _save(complete, arrays)
            _save(first, arrays)
            count, origin, raw = 1, SYNTHESIZED, None
        try:
            check_runs(model, first, order, memory_limit)
        except InvalidModel as exc:
            raise InvalidModel(f"{exc}{_NO_SAMPLES_HINT if origin == SYNTHESIZED else ''}") from None
        yield Samples(complete, count, origin, raw)
