"""Capture policy decisions, bounds and chunking; the chunks reassemble in the controller."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from agent.capture import Bounds, Capturer, Captures, capture_reason, chunk_upload
from tests.unit.controller.helpers import Parts


def policy(**fields: float) -> fleet_pb2.CapturePolicy:
    return fleet_pb2.CapturePolicy(tenant="default", model_name="digits", policy_id="p1", **fields)  # type: ignore[arg-type]


def spec(n: int = 4) -> fleet_pb2.DriftSpec:
    s = fleet_pb2.DriftSpec(model_name="digits", model_version="1")
    for i in range(n):
        s.features.add(name=f"f{i}", edges=[0.0, 0.5, 1.0])
    return s


BOUNDS = Bounds.from_spec(spec())
SURE, UNSURE = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]


@pytest.mark.parametrize(
    ("fields", "inputs", "probs", "draw", "reason"),
    [
        ({"random_fraction": 0.1}, [0.5] * 4, SURE, 0.05, "random"),
        ({"random_fraction": 0.1}, [0.5] * 4, SURE, 0.5, None),
        ({"low_confidence_below": 0.5}, [0.5] * 4, UNSURE, 0.9, "low_confidence"),
        ({"low_confidence_below": 0.5}, [0.5] * 4, SURE, 0.9, None),
        ({"low_confidence_below": 0.5}, [0.5] * 4, None, 0.9, None),
        ({"drifted_feature_share": 0.5}, [5, 5, 5, 0.5], SURE, 0.9, "drifted"),
        ({"drifted_feature_share": 0.5}, [5, 5, 0.5, 0.5], SURE, 0.9, None),  # exactly half: not more
        ({"drifted_feature_share": 0.5, "low_confidence_below": 0.5}, [5, 5, 5, 5], UNSURE, 0.0, "drifted"),
        ({}, [5, 5, 5, 5], UNSURE, 0.0, None),  # everything off
    ],
)
def test_capture_reason(
    fields: dict[str, float], inputs: list[float], probs: list[float] | None, draw: float, reason: str | None
) -> None:
    assert capture_reason(policy(**fields), inputs, probs, BOUNDS, draw) == reason


def test_bounds_only_for_tabular_specs() -> None:
    image = fleet_pb2.DriftSpec()
    image.features.add(name="ch0", edges=[0.0, 1.0])
    assert Bounds.from_spec(image) is None and Bounds.from_spec(None) is None
    assert BOUNDS is not None and BOUNDS.outside_share(np.zeros(3)) == 0.0  # another shape: not judged


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hourly_and_per_upload_bounds() -> None:
    clock = Clock()
    capturer = Capturer(
        policy(random_fraction=1.0, max_samples_per_hour=3, max_samples_per_upload=10),
        "1",
        rng=random.Random(0),
        clock=clock,
    )
    kept = [capturer.offer(np.ones(4), SURE) for _ in range(5)]
    assert kept == ["random"] * 3 + [None] * 2
    clock.now += 3600
    assert capturer.offer(np.ones(4), SURE) == "random"
    per_upload = Capturer(policy(random_fraction=1.0, max_samples_per_upload=2), "1", clock=clock)
    assert [per_upload.offer(np.ones(4)) for _ in range(3)] == ["random", "random", None]
    assert per_upload.ready()
    per_upload.take_upload()
    assert not per_upload.ready() and per_upload.offer(np.ones(4)) == "random"


def test_byte_bound_and_shape_changes() -> None:
    capturer = Capturer(policy(random_fraction=1.0, max_bytes_per_upload=40), "1")
    assert capturer.offer(np.ones(4)) == "random"  # 16 bytes
    assert capturer.offer(np.ones(8)) is None  # another shape starts another data set
    assert capturer.offer(np.ones(4)) == "random"
    assert capturer.offer(np.ones(4)) is None  # 48 > 40
    assert not capturer.ready()


def test_upload_reassembles_into_a_controller_data_set(tmp_path: Path) -> None:
    clock = Clock()
    capturer = Capturer(
        policy(random_fraction=0.5, low_confidence_below=0.5, max_samples_per_upload=50),
        "1",
        spec=spec(),
        rng=random.Random(3),
        clock=clock,
        chunk_size=512,
    )
    rng = np.random.default_rng(0)
    while not capturer.ready():
        clock.now += 1
        capturer.offer(rng.uniform(0, 1, 4), rng.dirichlet([1, 1, 1]))
    chunks = capturer.take_upload("up-1")
    assert len(chunks) > 2 and {c.count for c in chunks} == {len(chunks)}
    assert sum(chunks[0].reasons.values()) == chunks[0].samples == 50
    assert chunks[0].start_ms < chunks[0].end_ms
    assert capturer.take_upload() == []

    parts = Parts(tmp_path)
    parts.fleet.register("cam-1")
    from controller.datasets import Datasets, read_npz

    datasets = Datasets(parts.store, tmp_path / "datasets")
    results = [datasets.receive("cam-1", c, 0.0) for c in reversed(chunks)]
    stored = results[-1]
    assert results[:-1] == [None] * (len(chunks) - 1) and stored is not None
    assert stored.samples == 50 and stored.manifest.policy_id == "p1" and stored.manifest.device_id == "cam-1"
    contents = read_npz(datasets.read(stored.digest))
    assert contents.inputs.shape == (50, 4) and contents.probabilities is not None


def test_chunking_edges() -> None:
    chunks = chunk_upload(b"abcdef", policy(), "1", 0, 1, 1, {"random": 1}, "u", chunk_size=4)
    assert [c.data for c in chunks] == [b"abcd", b"ef"] and chunks[1].index == 1
    with pytest.raises(ValueError):
        chunk_upload(b"x", policy(), "1", 0, 1, 1, {}, "u", chunk_size=0)


def test_captures_follow_the_desired_state_and_the_served_version() -> None:
    clock = Clock()
    captures = Captures(rng=random.Random(0), clock=clock, max_age_s=60)
    rows, probs = np.full((3, 4), 0.5), np.tile(SURE, (3, 1))
    assert captures.offer("default", "digits", "1", rows, probs) == 0  # no policy yet
    captures.set_policies([policy(random_fraction=1.0, max_samples_per_upload=5)], [spec()])
    assert captures.wants("default", "digits") and not captures.wants("default", "other")
    assert not captures.wants("cam", "digits")
    assert captures.offer("default", "other", "1", rows, probs) == 0
    assert captures.offer("default", "digits", "1", rows, probs) == 3
    assert captures.uploads() == []  # neither full nor old
    assert captures.offer("default", "digits", "1", rows, probs) == 3  # the 6th starts the next upload
    (full,) = captures.uploads()
    assert full[0].samples == 5 and full[0].model_version == "1"
    captures.offer("default", "digits", "2", rows[:1], None)  # a new version: v1's rest goes up alone
    (rest,) = captures.uploads()
    assert (rest[0].model_version, rest[0].samples) == ("1", 1)
    clock.now += 61
    (old,) = captures.uploads()
    assert (old[0].model_version, old[0].samples) == ("2", 1)
    captures.offer("default", "digits", "2", rows, probs)
    captures.set_policies([])  # policy withdrawn: what was kept is still sent
    (last,) = captures.uploads()
    assert last[0].samples == 3 and not captures.wants("default", "digits")
