"""Drift sketches: a telemetry window's inputs and outputs in fixed bins (numpy only).

The controller sends each tenant's model version a ``DriftSpec`` (bin edges
derived from the version's baseline) in the desired state; this module turns
what the model saw in a window into a ``DriftSketch`` for ``Telemetry.drift``.
Binning matches the controller's ``controller.drift.histogram``: interior edges,
with an underflow and an overflow bin, NaN and infinities left out.

How to wire it (the telemetry loop owns the window)::

    sketcher = Sketcher()                       # one per agent
    sketcher.set_specs(desired.drift_specs)     # on every desired state
    # per inference, in the tenant pipeline (cheap: one searchsorted per feature)
    sketcher.observe(tenant, model_name, model_version, inputs, probabilities)
    # when the telemetry window closes
    telemetry.drift.extend(sketcher.drain())

``inputs`` is the model's input batch, (N, F) for tabular models or
(N, C, H, W) for images (sketched as the per-sample mean of each channel);
``probabilities`` is the (N, classes) output, or None for a model without one.
A tenant whose model version has no spec is not sketched.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from edgefleet_proto import fleet_pb2

Key = tuple[str, str, str]


def features_of(inputs: npt.ArrayLike) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Samples x features, named as the controller names them (``f3``, ``ch0``)."""
    arr = np.asarray(inputs, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim == 2:
        return [f"f{i}" for i in range(arr.shape[1])], arr
    if arr.ndim == 4:
        means = arr.mean(axis=(2, 3))
        return [f"ch{i}" for i in range(means.shape[1])], means
    raise ValueError(f"inputs of shape {arr.shape}: expected (N, F) or (N, C, H, W)")


def bin_counts(values: npt.ArrayLike, edges: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    idx = np.searchsorted(edges, arr, side="right")
    counts: npt.NDArray[np.int64] = np.bincount(idx, minlength=edges.size + 1).astype(np.int64)
    return counts


@dataclass
class _Accumulator:
    spec: fleet_pb2.DriftSpec
    edges: dict[str, npt.NDArray[np.float64]]
    confidence_edges: npt.NDArray[np.float64]
    samples: int = 0
    features: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)
    classes: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    confidence: npt.NDArray[np.int64] | None = None

    @classmethod
    def for_spec(cls, spec: fleet_pb2.DriftSpec) -> _Accumulator:
        return cls(
            spec=spec,
            edges={h.name: np.asarray(h.edges, dtype=np.float64) for h in spec.features if h.edges},
            confidence_edges=np.asarray(spec.confidence_edges, dtype=np.float64),
            classes=np.zeros(spec.num_classes, np.int64),
        )

    def add(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None) -> None:
        names, matrix = features_of(inputs)
        for i, name in enumerate(names):
            edges = self.edges.get(name)
            if edges is None:
                continue
            counts = bin_counts(matrix[:, i], edges)
            acc = self.features.get(name)
            self.features[name] = counts if acc is None else acc + counts
        self.samples += matrix.shape[0]
        if probabilities is None:
            return
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.ndim == 1:
            probs = probs.reshape(1, -1)
        if probs.ndim != 2 or probs.shape[0] != matrix.shape[0] or probs.shape[1] == 0:
            raise ValueError(f"probabilities of shape {probs.shape} do not match {matrix.shape[0]} samples")
        predicted = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]).astype(np.int64)
        if predicted.size > self.classes.size:
            self.classes = np.pad(self.classes, (0, predicted.size - self.classes.size))
        self.classes[: predicted.size] += predicted
        if self.confidence_edges.size:
            conf = bin_counts(probs.max(axis=1), self.confidence_edges)
            self.confidence = conf if self.confidence is None else self.confidence + conf

    def sketch(self) -> fleet_pb2.DriftSketch:
        out = fleet_pb2.DriftSketch(
            tenant=self.spec.tenant,
            model_name=self.spec.model_name,
            model_version=self.spec.model_version,
            samples=self.samples,
            class_counts=[int(c) for c in self.classes],
        )
        for name in sorted(self.features):
            out.features.add(
                name=name, edges=self.edges[name].tolist(), counts=[int(c) for c in self.features[name]]
            )
        if self.confidence is not None:
            out.confidence.name = "confidence"
            out.confidence.edges.extend(self.confidence_edges.tolist())
            out.confidence.counts.extend(int(c) for c in self.confidence)
        return out


def build_sketch(
    spec: fleet_pb2.DriftSpec, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None = None
) -> fleet_pb2.DriftSketch:
    """One batch as a sketch (a pure function; :class:`Sketcher` adds batches up over a window)."""
    acc = _Accumulator.for_spec(spec)
    acc.add(inputs, probabilities)
    return acc.sketch()


class Sketcher:
    """Thread-safe per-window accumulation for every tenant with a spec."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[Key, fleet_pb2.DriftSpec] = {}
        self._windows: dict[Key, _Accumulator] = {}

    def set_specs(self, specs: Iterable[fleet_pb2.DriftSpec]) -> None:
        with self._lock:
            self._specs = {(s.tenant, s.model_name, s.model_version): s for s in specs}
            self._windows = {k: v for k, v in self._windows.items() if k in self._specs}

    def observe(
        self,
        tenant: str,
        model_name: str,
        model_version: str,
        inputs: npt.ArrayLike,
        probabilities: npt.ArrayLike | None = None,
    ) -> bool:
        """Add one inference; False when the model version has no spec (not sketched).

        Raises ValueError for inputs or probabilities of an unexpected shape,
        which the caller logs; the window keeps what it had.
        """
        key = (tenant, model_name, model_version)
        with self._lock:
            spec = self._specs.get(key)
            if spec is None:
                return False
            acc = self._windows.get(key) or _Accumulator.for_spec(spec)
            probe = _Accumulator.for_spec(spec)
            probe.add(inputs, probabilities)  # validates before the window is touched
            _fold(acc, probe)
            self._windows[key] = acc
            return True

    def drain(self) -> list[fleet_pb2.DriftSketch]:
        with self._lock:
            windows, self._windows = self._windows, {}
        return [windows[k].sketch() for k in sorted(windows) if windows[k].samples]


def _fold(into: _Accumulator, batch: _Accumulator) -> None:
    into.samples += batch.samples
    for name, counts in batch.features.items():
        acc = into.features.get(name)
        into.features[name] = counts if acc is None else acc + counts
    if batch.classes.size > into.classes.size:
        into.classes = np.pad(into.classes, (0, batch.classes.size - into.classes.size))
    into.classes[: batch.classes.size] += batch.classes
    if batch.confidence is not None:
        into.confidence = batch.confidence if into.confidence is None else into.confidence + batch.confidence
