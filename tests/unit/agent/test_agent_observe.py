"""The per-inference hook of the closed loop: cheap when off, never raising into an inference."""

from __future__ import annotations

import numpy as np
from edgefleet_proto import fleet_pb2

from agent.observe import Observer


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
    observer.observe("t", "m", "1", np.array([[1.0, -1.0]], np.float32), {"scores": logits})
    observer.observe("other", "m", "1", np.array([[1.0, -1.0]], np.float32), {"scores": logits})
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
    observer.observe("t", "m", "1", np.ones((2, 2), np.float32), {"p": np.full((3, 2), 0.5, np.float32)})
    observer.observe("t", "m", "1", np.ones((1, 2, 2, 2, 2), np.float32), {})
    assert observer.failures == 2 and observer.drain_sketches() == []
    observer.configure(fleet_pb2.DesiredState())
    observer.observe("t", "m", "1", np.ones((1, 2), np.float32), {})
    assert observer.failures == 2 and observer.drain_sketches() == []
