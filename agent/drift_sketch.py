"""Drift sketches: a telemetry window's inputs and outputs in fixed bins (numpy only).

The controller sends each tenant's model version a ``DriftSpec`` (bin edges
derived from the version's baseline) in the desired state; this module turns
what the model saw in a window into a ``DriftSketch`` for ``Telemetry.drift``.
Binning matches the controller's ``controller.drift.histogram``: interior edges,
with an underflow and an overflow bin, NaN and infinities left out.

The agent wires it in :mod:`agent.observe`::

    sketcher = Sketcher()                       # one per agent
    sketcher.set_specs(desired.drift_specs)     # on every desired state
    # per inference (pipelines and gRPC Infer)
    sketcher.observe(tenant, model_name, model_version, inputs, probabilities, layout)
    # when the telemetry window closes
    telemetry.drift.extend(sketcher.drain())

``inputs`` is the model's input batch: (N, F) rows, sketched per feature;
(N, T, F) windows of rows or audio frames x bands, sketched per feature or
band as its mean over the window; images, sketched as the per-sample mean of
each channel, on axis 1 for ``nchw`` and on the last axis for ``nhwc``. A
pipeline knows its images' layout (its preprocessing makes them); for a gRPC
caller's image the spec's channel count tells which axis holds the channels.
The controller's ``controller.drift.feature_matrix`` computes the same features.
``probabilities`` is the (N, classes) output, or None for a model without one.
A tenant whose model version has no spec is not sketched.

Observing is per inference, so a spec is compiled once into one padded edge
matrix: a batch is binned for every feature in a handful of numpy calls
whatever the number of features, instead of one ``searchsorted`` per feature.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from edgefleet_proto import fleet_pb2

Key = tuple[str, str, str]
# The axes an image's per-channel mean is taken over, by layout.
LAYOUTS = {"nchw": (2, 3), "nhwc": (1, 2)}
Floats = npt.NDArray[np.float64]
Counts = npt.NDArray[np.int64]


# Raw audio frames are sketched by the energy in this many equal bands of their spectrum
# (the controller's controller.drift.AUDIO_BANDS; a contract test keeps them in step).
AUDIO_BANDS = 8


def audio_bands(frames: npt.ArrayLike) -> Floats:
    """(N, T) raw audio frames -> (N, AUDIO_BANDS): log10 of the mean power in each of
    AUDIO_BANDS equal slices of the frame's spectrum (DC left out), as the controller's
    baselines compute it (controller.drift.audio_bands)."""
    arr = np.asarray(frames, dtype=np.float64)
    power = np.abs(np.fft.rfft(arr, axis=1)[:, 1:]) ** 2 / max(arr.shape[1], 1)
    bands = np.array_split(power, AUDIO_BANDS, axis=1)
    out: Floats = np.log10(
        np.stack([b.mean(axis=1) if b.shape[1] else np.zeros(len(arr)) for b in bands], axis=1) + 1e-12
    )
    return out


def features_of(inputs: npt.ArrayLike, layout: str = "nchw") -> tuple[str, Floats]:
    """Samples x features and the prefix the controller names them with (``f3``, ``ch0``);
    ``layout`` (``nchw`` or ``nhwc``, either case as a model signature writes it) says where
    an image's channels are, and ``nt`` that rows are raw audio frames, sketched per band of
    their spectrum."""
    layout = layout.lower()
    arr = np.asarray(inputs)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim == 2 and layout == "nt":
        return "f", audio_bands(arr)
    if arr.ndim == 2:
        return "f", arr.astype(np.float64, copy=False)
    if arr.ndim == 3:
        return "f", arr.mean(axis=1, dtype=np.float64)
    if arr.ndim == 4:
        if layout not in LAYOUTS:
            raise ValueError(f"image layout {layout!r}: expected nchw or nhwc")
        # Averaged in float64 without first copying the whole image to float64.
        return "ch", arr.mean(axis=LAYOUTS[layout], dtype=np.float64)
    raise ValueError(f"inputs of shape {arr.shape}: expected (N, F), (N, T, F) or an image batch")


def image_layout(shape: tuple[int, ...], channels: int) -> str:
    """Where a spec of ``channels`` channel features finds them in an image batch of ``shape``.

    ValueError when neither or both of axes 1 and 3 have that size (the batch cannot be
    sketched against this spec without its layout)."""
    first, last = shape[1] == channels, shape[3] == channels
    if first != last:
        return "nchw" if first else "nhwc"
    raise ValueError(
        f"an image batch of shape {list(shape)} against a spec of {channels} channels: "
        f"{'neither' if not first else 'both'} of axes 1 and 3 hold {channels} channels; "
        "give the layout (nchw or nhwc)"
    )


def bin_counts(values: npt.ArrayLike, edges: Floats) -> Counts:
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    idx = np.searchsorted(edges, arr, side="right")
    counts: Counts = np.bincount(idx, minlength=edges.size + 1).astype(np.int64)
    return counts


def probabilities_of(outputs: Mapping[str, np.ndarray], scores: str) -> Floats | None:
    """The (N, classes) class distribution in the output ``scores`` (the one the model's signature
    calls its scores; "" when it names none), or None when there is none: no output is picked by
    its name or shape. Rows that are not distributions (logits) are softmaxed, as the controller
    does for baselines.
    """
    chosen = outputs.get(scores) if scores else None
    if chosen is None or not np.issubdtype(chosen.dtype, np.floating):
        return None
    probs = np.asarray(chosen, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        return None
    if probs.min() < 0 or float(np.abs(probs.sum(axis=1) - 1.0).max()) > 1e-3:
        shifted = np.exp(probs - probs.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    return probs


@dataclass(frozen=True)
class _Compiled:
    """A spec as arrays: for each feature prefix, the input columns and their edges padded with +inf."""

    spec: fleet_pb2.DriftSpec
    names: dict[str, list[str]]
    columns: dict[str, npt.NDArray[np.intp]]
    edges: dict[str, Floats]  # (features, max edges), +inf past a feature's own edges
    widths: dict[str, npt.NDArray[np.intp]]  # each feature's edge count
    confidence_edges: Floats

    # Where each feature's bins start in the flat counts (features x (max edges + 1)).
    offsets: dict[str, npt.NDArray[np.intp]]

    @property
    def slots(self) -> dict[str, int]:
        return {p: e.shape[0] * (e.shape[1] + 1) for p, e in self.edges.items()}

    @classmethod
    def of(cls, spec: fleet_pb2.DriftSpec) -> _Compiled:
        names: dict[str, list[str]] = {"f": [], "ch": []}
        columns: dict[str, list[int]] = {"f": [], "ch": []}
        rows: dict[str, list[list[float]]] = {"f": [], "ch": []}
        for h in spec.features:
            prefix = "ch" if h.name.startswith("ch") else "f"
            index = h.name[len(prefix) :]
            if not h.edges or not index.isdigit() or not h.name.startswith(prefix):
                continue
            names[prefix].append(h.name)
            columns[prefix].append(int(index))
            rows[prefix].append(list(h.edges))
        edges, widths = {}, {}
        for prefix, table in rows.items():
            width = max((len(r) for r in table), default=0)
            edges[prefix] = np.array([r + [np.inf] * (width - len(r)) for r in table], np.float64).reshape(
                len(table), width
            )
            widths[prefix] = np.array([len(r) for r in table], np.intp)
        return cls(
            spec,
            names,
            {p: np.array(c, np.intp) for p, c in columns.items()},
            edges,
            widths,
            np.asarray(spec.confidence_edges, dtype=np.float64),
            {p: np.arange(e.shape[0], dtype=np.intp) * (e.shape[1] + 1) for p, e in edges.items()},
        )


@dataclass(frozen=True)
class _Bins:
    """Where one batch falls: flat indices into a window's counts (computed without the window)."""

    prefix: str
    columns: int
    samples: int
    features: npt.NDArray[np.intp]  # flat (feature, bin) indices of finite values
    classes: npt.NDArray[np.intp]
    num_classes: int
    confidence: npt.NDArray[np.intp] | None


def _bins(
    c: _Compiled, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None, layout: str = ""
) -> _Bins:
    """Bin a batch against a compiled spec; ValueError for shapes that do not fit. An image
    batch without its ``layout`` is read the way the spec's channel count fits it."""
    arr = np.asarray(inputs)
    if arr.ndim == 4 and not layout:
        channels = int(c.columns["ch"].max()) + 1 if c.columns["ch"].size else 0
        layout = image_layout(arr.shape, channels) if channels else "nchw"
    prefix, matrix = features_of(arr, layout)
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.ndim == 1:
            probs = probs.reshape(1, -1)
        if probs.ndim != 2 or probs.shape[0] != matrix.shape[0] or probs.shape[1] == 0:
            raise ValueError(f"probabilities of shape {probs.shape} do not match {matrix.shape[0]} samples")
    cols, table = c.columns[prefix], c.edges[prefix]
    flat = np.zeros(0, np.intp)
    if cols.size:
        present = cols < matrix.shape[1]
        if not present.all():
            cols, table = cols[present], table[present]
            offsets = c.offsets[prefix][present]
        else:
            offsets = c.offsets[prefix]
        values = matrix[:, cols]  # (N, features)
        # Edges <= value is searchsorted(side="right"); the +inf padding never counts.
        flat = (offsets + (table <= values[:, :, None]).sum(axis=2)).ravel()
        finite = np.isfinite(values).ravel()
        if not finite.all():
            flat = flat[finite]
    classes, confidence, num_classes = np.zeros(0, np.intp), None, 0
    if probs is not None:
        classes, num_classes = probs.argmax(axis=1), probs.shape[1]
        if c.confidence_edges.size:
            top = probs.max(axis=1)
            confidence = np.searchsorted(c.confidence_edges, top[np.isfinite(top)], side="right")
    return _Bins(prefix, matrix.shape[1], matrix.shape[0], flat, classes, num_classes, confidence)


def _bump(counts: Counts, indices: npt.NDArray[np.intp], weight: int = 1) -> None:
    if indices.size == 1:
        counts[int(indices[0])] += weight  # one sample: no bincount
    elif indices.size:
        counts += np.bincount(indices, minlength=counts.size)[: counts.size] * weight


@dataclass
class _Window:
    """One window of one model version: counts laid out like the compiled edge matrix."""

    compiled: _Compiled
    samples: int = 0
    features: dict[str, Counts] = field(default_factory=dict)  # flat (feature x bins) per prefix
    # The widest input seen per prefix: features past it were never in the inputs.
    columns: dict[str, int] = field(default_factory=dict)
    classes: Counts = field(default_factory=lambda: np.zeros(0, np.int64))
    confidence: Counts | None = None

    def add(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None, layout: str = "") -> None:
        self.apply(_bins(self.compiled, inputs, probabilities, layout))

    def apply(self, b: _Bins, weight: int = 1) -> None:
        """Count the batch; each of its samples stands for ``weight`` inferences (see Sketcher.observe)."""
        c = self.compiled
        if b.features.size or b.prefix in self.features:
            grid = self.features.get(b.prefix)
            if grid is None:
                grid = self.features[b.prefix] = np.zeros(c.slots[b.prefix], np.int64)
            _bump(grid, b.features, weight)
        if c.columns[b.prefix].size:
            self.columns[b.prefix] = max(self.columns.get(b.prefix, 0), b.columns)
        self.samples += b.samples * weight
        if b.num_classes > self.classes.size:
            self.classes = np.pad(self.classes, (0, b.num_classes - self.classes.size))
        _bump(self.classes, b.classes, weight)
        if b.confidence is not None:
            if self.confidence is None:
                self.confidence = np.zeros(c.confidence_edges.size + 1, np.int64)
            _bump(self.confidence, b.confidence, weight)

    def sketch(self) -> fleet_pb2.DriftSketch:
        c = self.compiled
        spec = c.spec
        out = fleet_pb2.DriftSketch(
            tenant=spec.tenant,
            model_name=spec.model_name,
            model_version=spec.model_version,
            samples=self.samples,
            class_counts=[int(n) for n in self.classes],
        )
        named = []
        for prefix, flat in self.features.items():
            table = c.edges[prefix]
            grid = flat.reshape(table.shape[0], table.shape[1] + 1)
            for i, name in enumerate(c.names[prefix]):
                if c.columns[prefix][i] >= self.columns.get(prefix, 0):
                    continue
                width = int(c.widths[prefix][i])
                named.append((name, table[i, :width], grid[i, : width + 1]))
        for name, edges, counts in sorted(named, key=lambda t: t[0]):
            out.features.add(name=name, edges=edges.tolist(), counts=[int(n) for n in counts])
        if self.confidence is not None:
            out.confidence.name = "confidence"
            out.confidence.edges.extend(c.confidence_edges.tolist())
            out.confidence.counts.extend(int(n) for n in self.confidence)
        return out


def _window(spec: fleet_pb2.DriftSpec | _Compiled) -> _Window:
    compiled = spec if isinstance(spec, _Compiled) else _Compiled.of(spec)
    return _Window(compiled, classes=np.zeros(compiled.spec.num_classes, np.int64))


def build_sketch(
    spec: fleet_pb2.DriftSpec,
    inputs: npt.ArrayLike,
    probabilities: npt.ArrayLike | None = None,
    layout: str = "",
) -> fleet_pb2.DriftSketch:
    """One batch as a sketch (a pure function; :class:`Sketcher` adds batches up over a window)."""
    window = _window(spec)
    window.add(inputs, probabilities, layout)
    return window.sketch()


class Sketcher:
    """Thread-safe per-window accumulation for every tenant with a spec."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[Key, _Compiled] = {}
        self._windows: dict[Key, _Window] = {}

    def set_specs(self, specs: Iterable[fleet_pb2.DriftSpec]) -> None:
        compiled = {(s.tenant, s.model_name, s.model_version): s for s in specs}
        with self._lock:
            kept = {k: v for k, v in self._specs.items() if k in compiled and v.spec == compiled[k]}
            self._specs = {k: kept.get(k) or _Compiled.of(s) for k, s in compiled.items()}
            self._windows = {k: v for k, v in self._windows.items() if self._specs.get(k) is v.compiled}

    def wants(self, tenant: str, model_name: str, model_version: str) -> bool:
        """Whether that model version has a spec (a cheap check before any work per inference)."""
        return (tenant, model_name, model_version) in self._specs

    def observe(
        self,
        tenant: str,
        model_name: str,
        model_version: str,
        inputs: npt.ArrayLike,
        probabilities: npt.ArrayLike | None = None,
        layout: str = "",
        weight: int = 1,
    ) -> bool:
        """Add a batch of inferences; False when the model version has no spec (not sketched).
        ``layout`` (``nchw``/``nhwc``) places an image's channels; without it the spec's
        channel count does. Each sample counts ``weight`` times, in the bins and in
        ``samples``: a sample drawn with probability 1/weight stands for the inferences that
        were not drawn, so a window's counts estimate every inference's without bias, and a
        device that samples weighs as much in the fleet's merged window as one that does not.

        Raises ValueError for inputs or probabilities of an unexpected shape,
        which the caller logs; the window keeps what it had.
        """
        key = (tenant, model_name, model_version)
        compiled = self._specs.get(key)
        if compiled is None:
            return False
        bins = _bins(compiled, inputs, probabilities, layout)  # outside the lock: workers bin in parallel
        with self._lock:
            if self._specs.get(key) is not compiled:
                return False  # the spec changed meanwhile: this batch belongs to no window
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _window(compiled)
            window.apply(bins, weight)
            return True

    def drain(self) -> list[fleet_pb2.DriftSketch]:
        with self._lock:
            windows, self._windows = self._windows, {}
        return [windows[k].sketch() for k in sorted(windows) if windows[k].samples]
