"""Drift baselines and the devices' drift sketches, scored with controller.drift.

A model version's baseline is either computed from a reference data set
uploaded for it (bin edges at the reference's quantiles) or taken from its
first N sketched windows in production (edges given by the operator). The
baseline's spec (bin edges) is what the devices sketch with.

Scores are computed when read: per device for each of its windows, and
fleet-wide per ``bucket_s`` window from the sum of every device's sketches in it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as
from edgefleet_proto.tenancy import tenant_or_default

from controller import drift
from controller.calibration import CalibrationSet, load_calibration
from controller.drift import Sketch, SketchSpec
from controller.errors import BaselineNotFound, ControllerError, InvalidDriftInput, InvalidModel
from controller.model_check import limit_data_segment, run_checker
from controller.model_runner import Runner, file_format
from controller.settings import DEFAULT_MAX_MODEL_MEMORY_BYTES
from controller.signature import ModelSignature
from controller.store import Store
from controller.streaming import feedback

if TYPE_CHECKING:
    from controller.registry import ModelVersion

log = logging.getLogger(__name__)

SOURCES = ("reference", "production")
MAX_WINDOWS = 2000
# A model's predictions on its calibration set run in a checker process limited to this
# (closed_loop passes 4 x max_model_memory_bytes), for at most this long.
PREDICTION_MEMORY_BYTES = 4 * DEFAULT_MAX_MODEL_MEMORY_BYTES
PREDICTION_TIMEOUT_S = 600.0
# Class probabilities sent back from it: samples x classes as float64.
MAX_PREDICTION_BYTES = 64 << 20


@dataclass(frozen=True)
class Baseline:
    model_name: str
    model_version: str
    source: str
    windows_needed: int
    spec: SketchSpec
    sketch: Sketch | None
    created_at: float

    @property
    def ready(self) -> bool:
        return self.sketch is not None


@dataclass(frozen=True)
class WindowScore:
    window_start_ms: int
    window_end_ms: int
    devices: int
    score: drift.DriftScore

    def to_json(self) -> dict[str, object]:
        return {
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
            "devices": self.devices,
            **self.score.to_json(),
        }


def sketch_from_proto(msg: fleet_pb2.DriftSketch, spec: SketchSpec | None = None) -> Sketch:
    """A wire sketch as counts. With a spec, a feature binned with other edges
    (a device still on an older spec) is left out rather than compared bin by bin."""
    check_shape(msg)
    features = {
        h.name: tuple(h.counts)
        for h in msg.features
        if spec is None or tuple(h.edges) == spec.features.get(h.name, tuple(h.edges))
    }
    return Sketch(msg.samples, features, tuple(msg.class_counts), tuple(msg.confidence.counts))


def check_shape(msg: fleet_pb2.DriftSketch) -> None:
    for h in msg.features:
        if len(h.counts) != len(h.edges) + 1:
            raise InvalidDriftInput(f"feature {h.name!r}: {len(h.counts)} counts for {len(h.edges)} edges")
    if msg.HasField("confidence") and len(msg.confidence.counts) != len(msg.confidence.edges) + 1:
        raise InvalidDriftInput("confidence histogram: counts do not match edges")


def stored_sketch(blob: bytes, spec: SketchSpec | None = None) -> Sketch:
    """A sketch row (wire bytes, checked at ingest) as counts."""
    return sketch_from_proto(decode_as(fleet_pb2.DriftSketch, bytes(blob)), spec)


def spec_message(tenant: str, model_name: str, model_version: str, spec: SketchSpec) -> fleet_pb2.DriftSpec:
    """The DriftSpec for a device's desired state."""
    msg = fleet_pb2.DriftSpec(
        tenant=tenant,
        model_name=model_name,
        model_version=model_version,
        confidence_edges=list(spec.confidence_edges),
        num_classes=spec.num_classes,
    )
    for name, edges in spec.features.items():
        msg.features.add(name=name, edges=list(edges))
    return msg


class Baselines:
    def __init__(self, store: Store, bucket_s: int, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bucket_ms = bucket_s * 1000
        self.clock = clock

    # -- ingest ---------------------------------------------------------------

    def observe(self, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> None:
        self.observe_many([(device_id, msg, received_at)])

    def observe_many(self, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]) -> None:
        """Store the windows' drift sketches, in one statement."""
        rows = []
        for device_id, msg, received_at in windows:
            # Kept as the wire bytes: converting to counts costs more than the rest of
            # the ingest together, and most windows are only ever read in aggregate.
            for sk in msg.drift:
                try:
                    check_shape(sk)
                except InvalidDriftInput as exc:
                    log.warning(
                        "drift sketch rejected device=%s model=%s version=%s reason=%s",
                        device_id,
                        sk.model_name,
                        sk.model_version,
                        exc,
                    )
                    continue
                rows.append(
                    (
                        device_id,
                        tenant_or_default(sk.tenant),
                        sk.model_name,
                        sk.model_version,
                        msg.window_start_ms,
                        msg.window_end_ms,
                        received_at,
                        sk.samples,
                        sk.SerializeToString(),
                    )
                )
        self.store.insert_many(
            "drift_sketches",
            (
                "device_id", "tenant", "model_name", "model_version", "window_start_ms", "window_end_ms",
                "received_at", "samples", "sketch",
            ),
            rows,
        )  # fmt: skip

    # -- baselines --------------------------------------------------------------

    def set_reference(
        self,
        model_name: str,
        model_version: str,
        inputs: npt.ArrayLike,
        probabilities: npt.ArrayLike | None,
        bins: int = drift.DEFAULT_BINS,
        layout: str = "",
    ) -> Baseline:
        """``layout`` (``nchw``/``nhwc``) is where an image's channels are; without it the
        shape tells (:func:`controller.drift.image_layout`)."""
        spec, sketch = drift.reference_baseline(inputs, probabilities, bins, layout)
        return self._save(model_name, model_version, "reference", 0, spec, sketch)

    def set_production(self, model_name: str, model_version: str, windows: int, spec: SketchSpec) -> Baseline:
        if not 1 <= windows <= MAX_WINDOWS:
            raise InvalidDriftInput(f"windows must be between 1 and {MAX_WINDOWS}, not {windows}")
        return self._save(model_name, model_version, "production", windows, spec, None)

    def _save(
        self, name: str, version: str, source: str, windows: int, spec: SketchSpec, sketch: Sketch | None
    ) -> Baseline:
        now = self.clock()
        self.store.execute(
            "INSERT INTO drift_baselines (model_name, model_version, source, windows_needed, spec, sketch,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (model_name, model_version) DO UPDATE SET source = excluded.source,"
            " windows_needed = excluded.windows_needed, spec = excluded.spec, sketch = excluded.sketch,"
            " updated_at = excluded.updated_at",
            (
                name,
                version,
                source,
                windows,
                json.dumps(spec.to_json()),
                None if sketch is None else json.dumps(sketch.to_json()),
                now,
                now,
            ),
        )
        log.info(
            "drift baseline set model=%s version=%s source=%s windows=%d", name, version, source, windows
        )
        return self.get(name, version)

    def get(self, model_name: str, model_version: str) -> Baseline:
        row = self.store.query_one(
            "SELECT * FROM drift_baselines WHERE model_name = ? AND model_version = ?",
            (model_name, model_version),
        )
        if row is None:
            raise BaselineNotFound(f"model {model_name} version {model_version} has no drift baseline")
        baseline = Baseline(
            model_name=model_name,
            model_version=model_version,
            source=row["source"],
            windows_needed=row["windows_needed"],
            spec=SketchSpec.from_json(json.loads(row["spec"])),
            sketch=Sketch.from_json(json.loads(row["sketch"])) if row["sketch"] else None,
            created_at=row["created_at"],
        )
        if baseline.sketch is None:
            return self._complete(baseline)
        return baseline

    def _complete(self, baseline: Baseline) -> Baseline:
        """A production baseline becomes fixed once its first N windows are in."""
        rows = self.store.query(
            "SELECT sketch FROM drift_sketches WHERE model_name = ? AND model_version = ?"
            " ORDER BY window_end_ms, id LIMIT ?",
            (baseline.model_name, baseline.model_version, baseline.windows_needed),
        )
        sketch = drift.production_baseline(
            [stored_sketch(r["sketch"], baseline.spec) for r in rows], baseline.windows_needed
        )
        if sketch is None:
            return baseline
        self.store.execute(
            "UPDATE drift_baselines SET sketch = ?, updated_at = ? WHERE model_name = ? AND model_version = ?"
            " AND sketch IS NULL",
            (json.dumps(sketch.to_json()), self.clock(), baseline.model_name, baseline.model_version),
        )
        log.info(
            "drift baseline fixed from production model=%s version=%s windows=%d",
            baseline.model_name,
            baseline.model_version,
            baseline.windows_needed,
        )
        return Baseline(**{**baseline.__dict__, "sketch": sketch})

    def all(self) -> list[Baseline]:
        rows = self.store.query("SELECT model_name, model_version FROM drift_baselines ORDER BY 1, 2")
        return [self.get(r["model_name"], r["model_version"]) for r in rows]

    # -- scores -------------------------------------------------------------------

    def _windows(self, name: str, version: str, since_ms: int, device_id: str | None) -> list[dict[str, Any]]:
        sql = (
            "SELECT device_id, window_start_ms, window_end_ms, sketch FROM drift_sketches"
            " WHERE model_name = ? AND model_version = ? AND window_end_ms > ?"
        )
        params: list[object] = [name, version, since_ms]
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        return self.store.query(sql + " ORDER BY window_end_ms, id", params)

    def _scorable(self, name: str, version: str) -> Baseline | None:
        baseline = self.get(name, version)
        return baseline if baseline.sketch is not None else None

    def fleet_scores(self, name: str, version: str, since_ms: int = 0) -> list[WindowScore]:
        """One score per fleet-wide window: every device's sketches in it added up."""
        baseline = self._scorable(name, version)
        if baseline is None or baseline.sketch is None:
            return []
        buckets: dict[int, list[Sketch]] = defaultdict(list)
        devices: dict[int, set[str]] = defaultdict(set)
        for r in self._windows(name, version, since_ms, None):
            start = drift.bucket_start_ms(int(r["window_end_ms"]), self.bucket_ms)
            buckets[start].append(stored_sketch(r["sketch"], baseline.spec))
            devices[start].add(str(r["device_id"]))
        return [
            WindowScore(
                start,
                start + self.bucket_ms,
                len(devices[start]),
                drift.score(baseline.sketch, drift.merge(s)),
            )
            for start, s in sorted(buckets.items())
        ]

    def device_scores(self, name: str, version: str, device_id: str, since_ms: int = 0) -> list[WindowScore]:
        baseline = self._scorable(name, version)
        if baseline is None or baseline.sketch is None:
            return []
        return [
            WindowScore(
                int(r["window_start_ms"]),
                int(r["window_end_ms"]),
                1,
                drift.score(baseline.sketch, stored_sketch(r["sketch"], baseline.spec)),
            )
            for r in self._windows(name, version, since_ms, device_id)
        ]

    def latest_by_device(self, name: str, version: str, since_ms: int = 0) -> dict[str, WindowScore]:
        """Each device's newest window score (the per-device view of the fleet)."""
        baseline = self._scorable(name, version)
        if baseline is None or baseline.sketch is None:
            return {}
        newest: dict[str, dict[str, Any]] = {}
        for r in self._windows(name, version, since_ms, None):
            newest[str(r["device_id"])] = r
        return {
            device: WindowScore(
                int(r["window_start_ms"]),
                int(r["window_end_ms"]),
                1,
                drift.score(baseline.sketch, stored_sketch(r["sketch"], baseline.spec)),
            )
            for device, r in sorted(newest.items())
        }

    def versions_with_sketches(self, since_ms: int) -> Sequence[tuple[str, str]]:
        rows = self.store.query(
            "SELECT DISTINCT d.model_name, d.model_version FROM drift_sketches d JOIN drift_baselines b"
            " ON b.model_name = d.model_name AND b.model_version = d.model_version"
            " WHERE d.window_end_ms > ? ORDER BY 1, 2",
            (since_ms,),
        )
        return [(r["model_name"], r["model_version"]) for r in rows]


class Calibrations(Protocol):
    """What the registry offers: where a version's calibration set is, and the version (its signature)."""

    def calibration_path(self, digest: str) -> Path: ...

    def get(self, name: str, version: str) -> ModelVersion: ...


def model_probabilities(
    model: Path, inputs: npt.NDArray[Any], scores: int | None
) -> npt.NDArray[np.float64] | None:
    """Class probabilities of a single-input classifier (ONNX or TFLite) on ``inputs``: its output
    at index ``scores`` (softmaxed when its rows are not already distributions); None if that
    is None or not a row of classes per sample."""
    return sample_probabilities(model, [[inputs[i : i + 1]] for i in range(len(inputs))], scores)


def sample_probabilities(
    model: Path,
    samples: Sequence[Sequence[np.ndarray]],
    scores: int | None,
    feedback: Mapping[int, int] | None = None,
    memory_limit: int = PREDICTION_MEMORY_BYTES,
) -> npt.NDArray[np.float64] | None:
    """Class probabilities on ``samples`` (each one sample's inputs in the model's order), as one
    stream with ``feedback`` ({input: output} carried from step to step) for a stateful model:
    the output at index ``scores``, the one the version's signature calls its scores (None: the
    signature names none, so there are no classes to predict and the model is not run).

    The model runs in a checker process limited to ``memory_limit`` bytes (controller.model_check),
    never in the controller: what a model allocates on each sample is bounded by no upload check."""
    if scores is None:
        return None
    try:
        probs = run_checker(
            _probabilities_in_child,
            (str(model), [list(s) for s in samples], scores, dict(feedback or {}), memory_limit),
            memory_limit,
            PREDICTION_TIMEOUT_S,
            "predicting on the calibration set with",
        )
    except InvalidModel as exc:  # the baseline goes without classes
        log.warning("reference predictions unavailable model=%s error=%s", model.name, exc)
        return None
    return probs if probs is None else np.asarray(probs, dtype=np.float64)


def _probabilities_in_child(
    model: str,
    samples: list[list[np.ndarray]],
    scores: int,
    feedback: dict[int, int],
    memory_limit: int,
    conn: Connection,
) -> None:
    limit_data_segment(memory_limit)
    try:
        try:
            # The runtime the file's format needs (LiteRT for .tflite), one sample at a time:
            # a TFLite model's batch is usually fixed at 1.
            runner = Runner(Path(model), file_format(Path(model)))
            outputs = runner.run_sequence(samples, feedback) if feedback else runner.run_all(samples)
        # onnxruntime and LiteRT raise their own types: the text is the reason.
        except Exception as exc:
            conn.send(("invalid", (str(exc).strip() or type(exc).__name__)[:2000]))
            return
        probs = _probabilities(outputs[scores], len(samples)) if scores < len(outputs) else None
        if probs is not None and probs.nbytes > MAX_PREDICTION_BYTES:
            conn.send(("invalid", f"its class probabilities would take {probs.nbytes} bytes"))
            return
        conn.send(("ok", probs))
    except MemoryError:
        conn.send(("memory", None))
    finally:
        conn.close()


def _probabilities(scores: np.ndarray, count: int) -> npt.NDArray[np.float64] | None:
    """The scores output as class probabilities (softmaxed when its rows are not already
    distributions); None unless it is a float row of two or more classes per sample."""
    arr = np.asarray(scores)
    if not (arr.ndim == 2 and arr.dtype.kind == "f" and arr.shape[0] == count and arr.shape[1] > 1):
        return None
    probs = arr.astype(np.float64)
    if not (np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)):
        e = np.exp(probs - probs.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    return probs


def baselines_from_calibration(
    baselines: Baselines,
    registry: Calibrations,
    artifact_path: Callable[[str], Path],
    skipped: set[tuple[str, str]],
    memory_limit: int = PREDICTION_MEMORY_BYTES,
) -> list[tuple[str, str]]:
    """Give every version registered with a calibration set (its reference data) and no
    baseline yet a reference baseline: features of the input its signature says a source
    feeds, in the signature's layout (images per channel, raw audio per band), each sample
    taken along that input's batch axis;
    classes and confidence from the version's own predictions on the whole set (every
    input, a stateful model's state carried from sample to sample), read from the output its
    signature calls its scores (none: a baseline of inputs only)."""
    rows = baselines.store.query(
        "SELECT d.name, d.version, d.calibration_digest, v.digest FROM version_details d"
        " JOIN model_versions v ON v.name = d.name AND v.version = d.version"
        " LEFT JOIN drift_baselines b ON b.model_name = d.name AND b.model_version = d.version"
        " WHERE d.calibration_digest != '' AND b.model_name IS NULL"
    )
    done = []
    for r in rows:
        key = (r["name"], r["version"])
        if key in skipped:
            continue
        try:
            signature = registry.get(*key).signature
            reference = load_calibration(registry.calibration_path(r["calibration_digest"]), signature)
            inputs, layout = source_samples(reference, signature)
            order = [i.name for i in signature.inputs]
            probs = sample_probabilities(
                artifact_path(r["digest"]),
                reference.samples(order, reference.count),
                signature.scores(),
                feedback(signature),
                memory_limit,
            )
            baselines.set_reference(r["name"], r["version"], inputs, probs, layout=layout)
            done.append(key)
        except (OSError, ValueError, ControllerError) as exc:
            skipped.add(key)
            log.warning("no drift baseline from calibration model=%s version=%s reason=%s", *key, exc)
    return done


def source_samples(reference: CalibrationSet, signature: ModelSignature) -> tuple[npt.NDArray[Any], str]:
    """The samples of the input a source feeds, batch first, and the layout to sketch them in."""
    source = next((i for i in signature.inputs if i.role == "source"), None)
    if source is None:
        raise InvalidDriftInput("the signature names no source input: nothing a device sketches")
    axis = reference.batch_axes[source.name]
    if axis is None:
        raise InvalidDriftInput(f"input {source.name!r} has no batch axis: the set is a single sample")
    return np.moveaxis(reference.arrays[source.name], axis, 0), sketch_layout(signature)


def sketch_layout(signature: ModelSignature) -> str:
    """How the input a source feeds is sketched, from its layout in the signature: images per
    channel (``nhwc``/``nchw``), raw audio per band (``nt``); "" to tell by the shape."""
    source = next((i for i in signature.inputs if i.role == "source"), None)
    layout = source.layout if source is not None else ""
    return layout.lower() if layout in ("NHWC", "NCHW", "NT") else ""
