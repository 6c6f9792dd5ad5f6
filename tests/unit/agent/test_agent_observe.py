"""The per-inference hook of the closed loop: cheap when off, never raising into an inference."""

from __future__ import annotations

import numpy as np
from edgefleet_proto import fleet_pb2

from agent.observe import Observer
from agent.postprocess import ClassScore, Detection, Outcome


def desired() -> fleet_pb2.DesiredState:
    spec = fleet_pb2.DriftSpec(tenant="t", model_name="m", model_version="1", num_classes=2)
    spec.confidence_edges.extend([0.5, 0.75])
    spec.features.add(name="f0", edges=[0.0])
    spec.features.add(name="f1", edges=[0.0])
    policy = fleet_pb2.CapturePolicy(tenant="t", model_name="m", policy_id="p", random_fraction=1.0)
    return fleet_pb2.DesiredState(drift_specs=[spec], capture_policies=[policy])


def test_an_inference_is_sketched_and_offered_to_capture() -> None:
    observer = Observer("d")
    observer.configure(desired())
    logits = np.array([[0.0, 3.0]], np.float32)
    observer.observe("t", "m", "1", np.array([[1.0, -1.0]], np.float32), {"scores": logits}, scores="scores")
    observer.observe(
        "other", "m", "1", np.array([[1.0, -1.0]], np.float32), {"scores": logits}, scores="scores"
    )
    (sketch,) = observer.drain_sketches()
    assert sketch.samples == 1 and list(sketch.class_counts) == [0, 1]
    assert [list(h.counts) for h in sketch.features] == [[0, 1], [1, 0]]
    assert list(sketch.confidence.counts) == [0, 0, 1]  # softmax of the logits: 0.95
    assert observer.uploads() == []  # one sample does not fill an upload
    (upload,) = observer.uploads(final=True)
    assert upload[0].samples == 1 and upload[0].tenant == "t"


def test_a_batch_of_the_wrong_shape_is_skipped_not_raised() -> None:
    observer = Observer("d")
    observer.configure(desired())
    observer.observe(
        "t", "m", "1", np.ones((2, 2), np.float32), {"p": np.full((3, 2), 0.5, np.float32)}, scores="p"
    )
    observer.observe("t", "m", "1", np.ones((1, 2, 2, 2, 2), np.float32), {})
    assert observer.failures == 2 and observer.drain_sketches() == []
    observer.configure(fleet_pb2.DesiredState())
    observer.observe("t", "m", "1", np.ones((1, 2), np.float32), {})
    assert observer.failures == 2 and observer.drain_sketches() == []


def test_a_post_processed_inference_is_sketched_on_its_post_processed_scores() -> None:
    observer = Observer("d")
    observer.configure(desired())
    x = np.array([[1.0, -1.0]], np.float32)
    # The raw logits say class 0 at 0.99995; the tenant's post-processing (a sigmoid, say) says
    # class 1 at 0.6, and that is what its consumers get and what the confidence gate must read.
    raw = {"scores": np.array([[5.0, -5.0]], np.float32)}
    classes = Outcome(classes=(ClassScore(1, "dog", 0.6), ClassScore(0, "cat", 0.2)))
    observer.observe("t", "m", "1", x, raw, outcome=classes)
    # A detector: its best detection, of class 2 at 0.9.
    box = (0.1, 0.1, 0.5, 0.5)
    found = Outcome(detections=(Detection(0, "hand", 0.3, box), Detection(2, "face", 0.9, box)))
    observer.observe("t", "m", "1", x, raw, outcome=found)
    # Nothing detected: the inputs are sketched, no class and no confidence.
    observer.observe("t", "m", "1", x, raw, outcome=Outcome())
    (sketch,) = observer.drain_sketches()
    assert sketch.samples == 3 and observer.failures == 0
    assert list(sketch.class_counts) == [0, 1, 1]
    assert list(sketch.confidence.counts) == [0, 1, 1]  # 0.6 in [0.5, 0.75), 0.9 from 0.75 up


def test_classes_come_only_from_the_output_the_signature_calls_scores() -> None:
    observer = Observer("d")
    observer.configure(desired())
    x = np.array([[1.0, -1.0]], np.float32)
    outputs = {
        "probabilities": np.array([[0.1, 0.9]], np.float32),
        "logits": np.array([[4.0, 0.0]], np.float32),
    }
    observer.observe("t", "m", "1", x, outputs, scores="logits")
    # No output is taken for the scores by its name or shape: without one, no class is counted.
    observer.observe("t", "m", "1", x, outputs)
    (sketch,) = observer.drain_sketches()
    assert sketch.samples == 2 and list(sketch.class_counts) == [1, 0]
    assert sum(sketch.confidence.counts) == 1
