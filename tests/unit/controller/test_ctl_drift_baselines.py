"""Drift baselines and stored sketches over a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from controller import drift
from controller.baselines import Baselines
from controller.drift import Sketch, SketchSpec
from controller.errors import BaselineNotFound, InvalidDriftInput
from tests.support.models import dense_of_size
from tests.unit.controller.helpers import Parts

SPEC = SketchSpec({"f0": (0.0, 1.0), "f1": (0.0,)}, num_classes=2)


def telemetry(
    device: str, end_ms: int, f0: list[int], f1: list[int], f0_edges: tuple[float, ...] = (0.0, 1.0)
) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id=device, seq=end_ms, window_start_ms=end_ms - 10, window_end_ms=end_ms)
    sk = msg.drift.add(tenant="default", model_name="m", model_version="1", samples=sum(f0))
    sk.features.add(name="f0", edges=list(f0_edges), counts=f0)
    sk.features.add(name="f1", edges=[0.0], counts=f1)
    return msg


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Parts, Baselines]:
    parts = Parts(tmp_path)
    parts.fleet.register("cam-1")
    parts.fleet.register("cam-2")
    # Sketches are kept for registered versions only.
    with dense_of_size(tmp_path / "m.onnx", 0.01).open("rb") as f:
        parts.registry.upload("m", "1", f, {})
    baselines = Baselines(parts.store, 60, clock=lambda: 1.0)
    parts.telemetry.observers.append(baselines.observe)
    return parts, baselines


def test_production_baseline_is_fixed_from_the_first_windows(setup: tuple[Parts, Baselines]) -> None:
    parts, baselines = setup
    with pytest.raises(BaselineNotFound):
        baselines.get("m", "1")
    with pytest.raises(InvalidDriftInput):
        baselines.set_production("m", "1", 0, SPEC)
    assert not baselines.set_production("m", "1", 2, SPEC).ready
    parts.telemetry.ingest_telemetry("cam-1", telemetry("cam-1", 1000, [5, 5, 0], [5, 5]), 1.0)
    assert not baselines.get("m", "1").ready and baselines.fleet_scores("m", "1") == []
    parts.telemetry.ingest_telemetry("cam-2", telemetry("cam-2", 2000, [0, 5, 5], [5, 5]), 1.0)
    parts.telemetry.ingest_telemetry("cam-1", telemetry("cam-1", 3000, [0, 0, 10], [0, 10]), 1.0)
    baseline = baselines.get("m", "1")
    assert baseline.sketch == Sketch(20, {"f0": (5, 10, 5), "f1": (10, 10)})
    # Fixed: later windows are scored against it, not added to it.
    assert baselines.get("m", "1").sketch == baseline.sketch
    (window,) = baselines.fleet_scores("m", "1")
    assert window.devices == 2 and window.score.psi > 0


def test_malformed_sketches_are_not_stored_and_other_edges_are_not_compared(
    setup: tuple[Parts, Baselines],
) -> None:
    parts, baselines = setup
    baselines.set_production("m", "1", 1, SPEC)
    parts.telemetry.ingest_telemetry(
        "cam-1", telemetry("cam-1", 1000, [5, 5], [5, 5]), 1.0
    )  # 2 counts, 2 edges
    assert parts.store.query("SELECT * FROM drift_sketches") == []
    parts.telemetry.ingest_telemetry("cam-1", telemetry("cam-1", 2000, [5, 5, 0], [5, 5]), 1.0)
    parts.telemetry.ingest_telemetry(
        "cam-2", telemetry("cam-2", 3000, [10, 0, 0], [5, 5], f0_edges=(5.0, 6.0)), 1.0
    )
    scores = baselines.device_scores("m", "1", "cam-2")
    assert set(scores[0].score.features) == {"f1"}
    assert scores[0].score.psi == pytest.approx(0.0, abs=1e-12)
    latest = baselines.latest_by_device("m", "1")
    assert set(latest) == {"cam-1", "cam-2"}
    assert drift.score(
        baselines.get("m", "1").sketch or Sketch(0), Sketch(10, {"f0": (5, 5, 0)})
    ).psi == pytest.approx(0.0, abs=1e-12)


def test_reference_predictions_from_probabilities_or_logits(tmp_path: Path) -> None:
    from controller.baselines import model_probabilities
    from tests.support.models import digits_classifier, small_conv

    digits = digits_classifier(tmp_path / "digits.onnx")
    probs = model_probabilities(digits.path, digits.samples[:20], 1)  # label, probabilities
    assert probs is not None and probs.shape == (20, 10)
    assert np.mean(probs.argmax(axis=1) == digits.labels[:20]) > 0.8
    images = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    softmaxed = model_probabilities(small_conv(tmp_path / "conv.onnx"), images, 0)  # logits out
    assert softmaxed is not None and np.allclose(softmaxed.sum(axis=1), 1.0) and (softmaxed > 0).all()
    assert model_probabilities(tmp_path / "missing.onnx", images, 0) is None


def test_reference_predictions_read_the_output_the_signature_calls_scores(tmp_path: Path) -> None:
    import onnxruntime as ort

    from controller.baselines import model_probabilities
    from controller.inspection import inspect_onnx
    from controller.signature import infer_signature
    from tests.support.models import scores_beside_features

    model = scores_beside_features(tmp_path / "m.onnx")
    found = inspect_onnx(model)
    signature = infer_signature(found.inputs, found.outputs)
    assert signature.scores() == 0  # logits, not the later 8-column features
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    probs = model_probabilities(model, x, signature.scores())
    logits = ort.InferenceSession(str(model)).run(["logits"], {"x": x})[0]
    assert probs is not None and probs.shape == (12, 3)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert model_probabilities(model, x, None) is None  # no scores output: no classes
