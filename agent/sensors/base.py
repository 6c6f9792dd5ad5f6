"""The source interface and the factory that opens one from a SourceSpec."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.errors import SourceError
from agent.tenants import SourceSpec


@dataclass(frozen=True)
class Sample:
    """What a source produced: ``image`` (HxWxC uint8 BGR), ``audio`` (float32 in [-1, 1],
    ``sample_rate`` set) or ``rows`` (float64, one row per reading)."""

    kind: str
    data: np.ndarray
    seq: int
    captured_at_ms: int
    sample_rate: int = 0


class Source(Protocol):
    def read(self) -> Sample | None:
        """The next sample; None when the source has ended; SourceError when it failed."""
        ...

    def close(self) -> None: ...


# Sources that replay a file: nothing is lost by waiting for the model, so at rate_hz 0 they
# are read as fast as it takes their samples, every one (a stateful model needs them all).
# Cameras, microphones, line streams (a serial port) and synthetic sensors are live: their
# newest sample is the one worth running, and the oldest waiting is dropped when behind.
REPLAYED_KINDS = frozenset({"video", "wav", "csv"})


def now_ms() -> int:
    return int(time.time() * 1000)


def open_source(spec: SourceSpec) -> Source:
    """Open the source a tenant declares; SourceError says why it cannot."""
    try:
        if spec.kind in ("video", "camera"):
            from agent.sensors.camera import CameraSource

            return CameraSource(spec)
        if spec.kind in ("wav", "microphone"):
            from agent.sensors.audio import MicrophoneSource, WavSource

            return WavSource(spec) if spec.kind == "wav" else MicrophoneSource(spec)
        if spec.kind in ("csv", "lines"):
            from agent.sensors.readings import CsvSource, LineSource

            return CsvSource(spec) if spec.kind == "csv" else LineSource(spec)
        if spec.kind == "synthetic":
            from agent.sensors.synthetic import SyntheticSource

            return SyntheticSource(spec)
    except ValueError as exc:
        raise SourceError(f"{spec.kind} source {spec.uri!r}: bad option: {exc}") from None
    raise SourceError(f"unknown source kind {spec.kind!r}")
