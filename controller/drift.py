"""Drift math: population stability index and KL divergence over histogram sketches.

Pure code (numpy, no I/O). A *sketch* summarises one telemetry window of one
tenant's model version on one device: a histogram per input feature (or image
channel statistic), the counts of predicted classes, and a histogram of the top
class's confidence. Every histogram of a model version uses the same fixed bin
edges (its :class:`SketchSpec`), with an underflow and an overflow bin around
them, so sketches add up bin by bin: a fleet-wide window is the sum of the
devices' sketches, and a production baseline the sum of the first N windows.

PSI and KL compare proportions; an empty bin would make them infinite, so every
proportion is floored at ``epsilon`` and renormalised (the usual smoothing).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.errors import InvalidDriftInput

EPSILON = 1e-4
DEFAULT_BINS = 10
# Conventional reading of PSI: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.
PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
CONFIDENCE_EDGES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))


@dataclass(frozen=True)
class SketchSpec:
    """The fixed bin edges of a model version's sketches (interior edges, ascending)."""

    features: Mapping[str, tuple[float, ...]]
    confidence_edges: tuple[float, ...] = CONFIDENCE_EDGES
    num_classes: int = 0

    def __post_init__(self) -> None:
        for name, edges in [*self.features.items(), ("confidence", self.confidence_edges)]:
            if not edges or any(not math.isfinite(e) for e in edges):
                raise InvalidDriftInput(f"bin edges of {name!r} must be a non-empty list of finite numbers")
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise InvalidDriftInput(f"bin edges of {name!r} must be strictly increasing")
        if self.num_classes < 0:
            raise InvalidDriftInput("num_classes must not be negative")

    def to_json(self) -> dict[str, object]:
        return {
            "features": {k: list(v) for k, v in self.features.items()},
            "confidence_edges": list(self.confidence_edges),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> SketchSpec:
        try:
            features = {str(k): tuple(float(e) for e in v) for k, v in dict(doc["features"]).items()}  # type: ignore[call-overload]
            confidence = tuple(float(e) for e in doc.get("confidence_edges", CONFIDENCE_EDGES))  # type: ignore[attr-defined]
            return cls(features, confidence, int(doc.get("num_classes", 0)))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDriftInput(f"invalid sketch spec: {exc}") from None


@dataclass(frozen=True)
class Sketch:
    """Bin counts of one window (or of a sum of windows)."""

    samples: int
    features: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    classes: tuple[int, ...] = ()
    confidence: tuple[int, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "features": {k: list(v) for k, v in self.features.items()},
            "classes": list(self.classes),
            "confidence": list(self.confidence),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Sketch:
        try:
            return cls(
                samples=int(doc["samples"]),  # type: ignore[call-overload]
                features={str(k): tuple(int(c) for c in v) for k, v in dict(doc.get("features", {})).items()},  # type: ignore[call-overload]
                classes=tuple(int(c) for c in doc.get("classes", ())),  # type: ignore[attr-defined]
                confidence=tuple(int(c) for c in doc.get("confidence", ())),  # type: ignore[attr-defined]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDriftInput(f"invalid sketch: {exc}") from None


@dataclass(frozen=True)
class Divergence:
    psi: float
    kl: float


@dataclass(frozen=True)
class DriftScore:
    """A window against the baseline. ``psi``/``kl`` are what a policy compares with
    its threshold: the larger of the features' mean, the predicted classes' and the
    confidence's divergence. The features' mean, not their max: with tens of
    features and a few hundred samples a window, the max of the per-feature PSIs
    is mostly sampling noise; the parts (and ``worst_feature``) say where it moved."""

    samples: int
    psi: float
    kl: float
    features: Mapping[str, Divergence]
    prediction: Divergence | None
    confidence: Divergence | None

    def worst_feature(self) -> str:
        if not self.features:
            return ""
        return max(self.features.items(), key=lambda kv: kv[1].psi)[0]

    def to_json(self) -> dict[str, object]:
        def div(d: Divergence | None) -> dict[str, float] | None:
            return None if d is None else {"psi": d.psi, "kl": d.kl}

        return {
            "samples": self.samples,
            "psi": self.psi,
            "kl": self.kl,
            "worst_feature": self.worst_feature(),
            "features": {k: div(v) for k, v in sorted(self.features.items())},
            "prediction": div(self.prediction),
            "confidence": div(self.confidence),
        }


def proportions(counts: Sequence[float], epsilon: float = EPSILON) -> npt.NDArray[np.float64]:
    """Counts -> proportions with every bin floored at ``epsilon``, summing to 1."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidDriftInput("a histogram needs at least one bin")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise InvalidDriftInput("histogram counts must be finite and not negative")
    total = arr.sum()
    p = arr / total if total > 0 else np.full(arr.size, 1.0 / arr.size)
    p = np.maximum(p, epsilon)
    result: npt.NDArray[np.float64] = p / p.sum()
    return result


def _aligned(expected: Sequence[float], actual: Sequence[float]) -> None:
    if len(expected) != len(actual):
        raise InvalidDriftInput(f"histograms have {len(expected)} and {len(actual)} bins: edges differ")


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population stability index sum((a - e) * ln(a / e)); 0 for identical distributions."""
    _aligned(expected, actual)
    e, a = proportions(expected, epsilon), proportions(actual, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def kl_divergence(p_counts: Sequence[float], q_counts: Sequence[float], epsilon: float = EPSILON) -> float:
    """KL(P || Q) in nats, P the window and Q the baseline."""
    _aligned(p_counts, q_counts)
    p, q = proportions(p_counts, epsilon), proportions(q_counts, epsilon)
    return float(np.sum(p * np.log(p / q)))


def divergence(baseline: Sequence[int], window: Sequence[int], epsilon: float = EPSILON) -> Divergence:
    return Divergence(psi=psi(baseline, window, epsilon), kl=kl_divergence(window, baseline, epsilon))


def _pad(counts: Sequence[int], size: int) -> tuple[int, ...]:
    return tuple(counts) + (0,) * (size - len(counts))


def merge(sketches: Iterable[Sketch]) -> Sketch:
    """Bin-wise sum: a fleet-wide window, or a baseline from production windows."""
    samples = 0
    features: dict[str, list[int]] = {}
    classes: list[int] = []
    confidence: list[int] = []
    for s in sketches:
        samples += s.samples
        for name, counts in s.features.items():
            acc = features.setdefault(name, [0] * len(counts))
            if len(acc) != len(counts):
                raise InvalidDriftInput(
                    f"feature {name!r} has {len(acc)} and {len(counts)} bins: edges differ"
                )
            for i, c in enumerate(counts):
                acc[i] += c
        for target, counts in ((classes, s.classes), (confidence, s.confidence)):
            target.extend([0] * (len(counts) - len(target)))
            for i, c in enumerate(counts):
                target[i] += c
    return Sketch(samples, {k: tuple(v) for k, v in features.items()}, tuple(classes), tuple(confidence))


def score(baseline: Sketch, window: Sketch, epsilon: float = EPSILON) -> DriftScore:
    """Compare a window with the baseline, component by component.

    A component present on one side only is skipped: a device that sketches
    fewer features (an older agent) still gets scored on those it sends.
    """
    features = {
        name: divergence(baseline.features[name], counts, epsilon)
        for name, counts in window.features.items()
        if name in baseline.features and sum(counts) > 0
    }
    prediction = None
    if baseline.classes and window.classes and sum(window.classes) > 0:
        size = max(len(baseline.classes), len(window.classes))
        prediction = divergence(_pad(baseline.classes, size), _pad(window.classes, size), epsilon)
    confidence = None
    if baseline.confidence and window.confidence and sum(window.confidence) > 0:
        confidence = divergence(baseline.confidence, window.confidence, epsilon)
    parts = [d for d in (prediction, confidence) if d is not None]
    if features:
        n = len(features)
        parts.append(
            Divergence(
                psi=sum(d.psi for d in features.values()) / n, kl=sum(d.kl for d in features.values()) / n
            )
        )
    return DriftScore(
        samples=window.samples,
        psi=max((d.psi for d in parts), default=0.0),
        kl=max((d.kl for d in parts), default=0.0),
        features=features,
        prediction=prediction,
        confidence=confidence,
    )


# -- baselines ---------------------------------------------------------------


def quantile_edges(values: npt.ArrayLike, bins: int = DEFAULT_BINS) -> tuple[float, ...]:
    """Interior edges putting about the same share of ``values`` in each bin.

    Repeated quantiles (a feature that is often exactly 0) collapse into one
    edge; a constant feature gets one edge at its value.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise InvalidDriftInput("cannot derive bin edges from no finite values")
    if bins < 2:
        raise InvalidDriftInput("at least 2 bins are needed")
    qs = np.quantile(arr, np.linspace(0, 1, bins + 1)[1:-1])
    edges = tuple(float(e) for e in np.unique(qs))
    return edges or (float(arr[0]),)


def histogram(values: npt.ArrayLike, edges: Sequence[float]) -> tuple[int, ...]:
    """Counts in len(edges) + 1 bins: (-inf, e0), [e0, e1), ..., [e_last, inf).

    The agent's builder (agent/drift_sketch.py) bins the same way; a test checks
    that the two agree.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), arr, side="right")
    return tuple(int(c) for c in np.bincount(idx, minlength=len(edges) + 1))


# Channel counts of images (gray, colour, colour with alpha).
IMAGE_CHANNELS = (1, 3, 4)


def image_layout(shape: Sequence[int]) -> str:
    """``nhwc`` or ``nchw`` for an image batch of this shape: the one of axes 1 and 3 whose
    size is a channel count; ``nchw`` when both or neither are (the ONNX convention)."""
    first, last = shape[1] in IMAGE_CHANNELS, shape[3] in IMAGE_CHANNELS
    return "nhwc" if last and not first else "nchw"


# Raw audio frames are sketched by the energy in this many equal bands of their spectrum.
AUDIO_BANDS = 8


def audio_bands(frames: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(N, T) raw audio frames -> (N, AUDIO_BANDS): log10 of the mean power in each of
    AUDIO_BANDS equal slices of the frame's spectrum (DC left out). Where a sound sits in
    frequency, and how loud, is what drifts in audio; single sample positions say nothing.

    The agent (agent/drift_sketch.py) computes the same features."""
    arr = np.asarray(frames, dtype=np.float64)
    power = np.abs(np.fft.rfft(arr, axis=1)[:, 1:]) ** 2 / max(arr.shape[1], 1)
    bands = np.array_split(power, AUDIO_BANDS, axis=1)
    out: npt.NDArray[np.float64] = np.log10(
        np.stack([b.mean(axis=1) if b.shape[1] else np.zeros(len(arr)) for b in bands], axis=1) + 1e-12
    )
    return out


def feature_matrix(inputs: npt.ArrayLike, layout: str = "") -> tuple[list[str], npt.NDArray[np.float64]]:
    """Samples x features: rows by column (``f0``, ``f1``...); raw audio frames (N, T) of layout
    ``nt`` by the energy in each band of their spectrum (``f0``..., :func:`audio_bands`);
    windows of rows or audio frames (N, T, F) by the mean of each feature or band over the
    window (``f0``...); images by the per-sample mean of each channel (``ch0``...), on axis 1
    for ``nchw`` and on the last axis for ``nhwc`` (without a layout, :func:`image_layout`
    tells them apart).

    The agent's sketches (agent/drift_sketch.py) compute the same features."""
    arr = np.asarray(inputs, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim == 2 and layout.lower() == "nt":
        return [f"f{i}" for i in range(AUDIO_BANDS)], audio_bands(arr)
    if arr.ndim == 2:
        return [f"f{i}" for i in range(arr.shape[1])], arr
    if arr.ndim == 3:
        means = arr.mean(axis=1)
        return [f"f{i}" for i in range(means.shape[1])], means
    if arr.ndim == 4:
        layout = layout.lower() or image_layout(arr.shape)
        if layout not in ("nchw", "nhwc"):
            raise InvalidDriftInput(f"image layout {layout!r}: expected nchw or nhwc")
        means = arr.mean(axis=(1, 2) if layout == "nhwc" else (2, 3))
        return [f"ch{i}" for i in range(means.shape[1])], means
    raise InvalidDriftInput(f"inputs of shape {arr.shape}: expected (N, F), (N, T, F) or an image batch")


def reference_baseline(
    inputs: npt.ArrayLike,
    probabilities: npt.ArrayLike | None = None,
    bins: int = DEFAULT_BINS,
    layout: str = "",
) -> tuple[SketchSpec, Sketch]:
    """Spec and baseline sketch from a reference data set uploaded with a model version.

    Edges are the reference's quantiles, so each baseline bin holds about the
    same share and PSI reacts evenly across the range.
    """
    names, matrix = feature_matrix(inputs, layout)
    if matrix.shape[0] < bins:
        raise InvalidDriftInput(f"a reference data set needs at least {bins} samples, got {matrix.shape[0]}")
    spec_features = {name: quantile_edges(matrix[:, i], bins) for i, name in enumerate(names)}
    classes: tuple[int, ...] = ()
    confidence: tuple[int, ...] = ()
    num_classes = 0
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[0] != matrix.shape[0]:
            raise InvalidDriftInput(
                f"probabilities of shape {probs.shape} do not match {matrix.shape[0]} samples"
            )
        num_classes = probs.shape[1]
        classes = tuple(int(c) for c in np.bincount(probs.argmax(axis=1), minlength=num_classes))
        confidence = histogram(probs.max(axis=1), CONFIDENCE_EDGES)
    spec = SketchSpec(spec_features, CONFIDENCE_EDGES, num_classes)
    sketch = Sketch(
        samples=int(matrix.shape[0]),
        features={name: histogram(matrix[:, i], spec_features[name]) for i, name in enumerate(names)},
        classes=classes,
        confidence=confidence,
    )
    return spec, sketch


def production_baseline(windows: Sequence[Sketch], needed: int) -> Sketch | None:
    """The sum of the first ``needed`` windows, or None while fewer have arrived."""
    if needed < 1:
        raise InvalidDriftInput("a production baseline needs at least one window")
    if len(windows) < needed:
        return None
    return merge(windows[:needed])


# -- aggregation over time ---------------------------------------------------


def bucket_start_ms(window_end_ms: int, bucket_ms: int) -> int:
    """The fleet-wide window a device window belongs to (by its end, epoch-aligned)."""
    return (window_end_ms - 1) // bucket_ms * bucket_ms


def consecutive_above(scores: Sequence[float], threshold: float) -> int:
    """How many of the newest scores (last in the list) are above the threshold, in a row."""
    run = 0
    for value in reversed(scores):
        if value <= threshold:
            break
        run += 1
    return run
