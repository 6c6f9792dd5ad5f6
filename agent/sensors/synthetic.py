"""Seeded random samples, for tests and for trying a tenant without hardware."""

from __future__ import annotations

import numpy as np

from agent.sensors.base import Sample, now_ms
from agent.tenants import SourceSpec


class SyntheticSource:
    def __init__(self, spec: SourceSpec) -> None:
        self.shape = tuple(int(d) for d in spec.option("shape", "32,32,3").split(","))
        self.kind = spec.option("sample_kind", "image" if len(self.shape) == 3 else "rows")
        if self.kind not in ("image", "audio", "rows"):
            raise ValueError(f"sample_kind must be image, audio or rows, got {self.kind!r}")
        self.count = int(spec.number("count", 0))
        self.rate = 16000 if self.kind == "audio" else 0
        self._rng = np.random.default_rng(int(spec.number("seed", 0)))
        self._seq = 0

    def read(self) -> Sample | None:
        if self.count and self._seq >= self.count:
            return None
        data: np.ndarray
        if self.kind == "image":
            data = self._rng.integers(0, 256, self.shape, dtype=np.uint8)
        elif self.kind == "audio":
            data = self._rng.uniform(-1, 1, self.shape).astype(np.float32)
        else:
            data = self._rng.standard_normal(self.shape)
        sample = Sample(self.kind, data, self._seq, now_ms(), self.rate)
        self._seq += 1
        return sample

    def close(self) -> None:
        return None
