from __future__ import annotations

import io
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as

from controller.errors import InvalidInputError, RolloutNotFound, UnknownTargets
from controller.rollouts import (
    DeviceSnapshot,
    RolloutSpec,
    SetDesired,
    device_status,
    plan,
    rollout_status,
)
from tests.unit.controller.helpers import Parts, reported, state
from tests.unit.controller.test_ctl_registry import add_model

SPEC = RolloutSpec(id="r1", model="digits", version="2", tenant="default", digest="d" * 64, size=100)


def snapshot(device_id: str, generation: int = 0, *models: fleet_pb2.ModelAssignment) -> DeviceSnapshot:
    desired = (
        fleet_pb2.DesiredState(device_id=device_id, generation=generation, models=models) if models else None
    )
    return DeviceSnapshot(device_id, generation, desired)


def expect_steps(steps: list[SetDesired], *expected: tuple[str, int]) -> None:
    assert [(s.action, s.device_id, s.desired.generation) for s in steps] == [
        ("set_desired", d, g) for d, g in expected
    ]


def test_plan_bumps_each_devices_generation_with_one_assignment() -> None:
    steps = plan(SPEC, [snapshot("a"), snapshot("b", 4)], now_ms=99)
    expect_steps(steps, ("a", 1), ("b", 5))
    [assignment] = steps[1].desired.models
    assert (assignment.tenant, assignment.model_name, assignment.model_version) == ("default", "digits", "2")
    assert (assignment.artifact_digest, assignment.artifact_size) == ("d" * 64, 100)
    assert (assignment.format, assignment.runtime, assignment.rollout_id) == ("onnx", "onnxruntime", "r1")
    assert steps[1].desired.device_id == "b" and steps[1].desired.issued_at_ms == 99


def test_plan_replaces_only_the_rollouts_tenant_and_is_idempotent() -> None:
    other = fleet_pb2.ModelAssignment(tenant="audio", model_name="kws", artifact_digest="a" * 64)
    old = fleet_pb2.ModelAssignment(tenant="default", model_name="digits", artifact_digest="c" * 64)
    [step] = plan(SPEC, [snapshot("a", 3, other, old)], now_ms=1)
    assert [(m.tenant, m.model_name) for m in step.desired.models] == [
        ("audio", "kws"),
        ("default", "digits"),
    ]
    assert step.desired.models[1].artifact_digest == "d" * 64
    # Planning again against the result: converged, nothing to do.
    assert plan(SPEC, [DeviceSnapshot("a", 4, step.desired)], now_ms=2) == []


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ((), ("pending", "the device has not picked up this version yet")),
        ((state("d" * 64, "downloading", have=10, total=40),), ("downloading", "10/40 bytes")),
        ((state("d" * 64, "verifying"),), ("verifying", "")),
        ((state("d" * 64, "loading"),), ("loading", "")),
        ((state("c" * 64, "active"), state("d" * 64, "active")), ("active", "")),
        ((state("d" * 64, "failed", error="digest mismatch"),), ("failed", "digest mismatch")),
        ((state("d" * 64, "failed"),), ("failed", "the device reported a failure without a reason")),
        (
            (state("d" * 64, "active", tenant="audio"),),
            ("pending", "the device has not picked up this version yet"),
        ),
        ((state("d" * 64, "unspecified"),), ("pending", "reported phase unspecified")),
    ],
)
def test_device_status_matches_by_tenant_and_digest(models: tuple, expected: tuple[str, str]) -> None:  # type: ignore[type-arg]
    assert device_status("default", "d" * 64, reported(*models)) == expected


def test_device_that_never_reported_is_pending() -> None:
    assert device_status("default", "d" * 64, None)[0] == "pending"


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["active", "active"], "succeeded"),
        (["active", "failed"], "failed"),
        (["failed"], "failed"),
        (["active", "downloading"], "in_progress"),
        (["failed", "pending"], "in_progress"),
        ([], "in_progress"),
    ],
)
def test_rollout_status(statuses: list, expected: str) -> None:  # type: ignore[type-arg]
    assert rollout_status(statuses) == expected


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.sent.append((device_id, payload))


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    p = Parts(tmp_path)
    p.registry.upload("adder", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    p.fleet.register("dev-1")
    p.fleet.register("dev-2")
    return p


def test_create_persists_and_publishes_desired_states(parts: Parts) -> None:
    published = Published()
    parts.rollouts.publisher = published
    rollout = parts.rollouts.create("adder", "1", ["dev-1", "dev-2", "dev-1"])
    assert rollout.status == "in_progress"
    assert [(d.device_id, d.status) for d in rollout.devices] == [("dev-1", "pending"), ("dev-2", "pending")]
    assert [d for d, _ in published.sent] == ["dev-1", "dev-2"]
    desired = decode_as(fleet_pb2.DesiredState, published.sent[0][1])
    assert desired.generation == 1 and desired.models[0].rollout_id == rollout.id
    assert parts.fleet.desired_states()[0] == published.sent[0]
    second = parts.rollouts.create("adder", "1", ["dev-1"])
    assert parts.fleet.get("dev-1").desired_generation == 2
    assert "superseded by rollout " + second.id in parts.rollouts.get(rollout.id).devices[0].detail
    assert [r.id for r in parts.rollouts.all()] == [second.id, rollout.id]


def test_status_follows_reported_state(parts: Parts) -> None:
    rollout = parts.rollouts.create("adder", "1", ["dev-1", "dev-2"])
    for device_id in ("dev-1", "dev-2"):
        msg = fleet_pb2.ReportedState(device_id=device_id, reported_at_ms=5)
        msg.models.add(tenant="default", artifact_digest=rollout.digest, phase=fleet_pb2.MODEL_PHASE_ACTIVE)
        parts.fleet.record_reported(device_id, msg, received_at=123.0)
    done = parts.rollouts.get(rollout.id)
    assert done.status == "succeeded"
    assert {(d.status, d.updated_at) for d in done.devices} == {("active", 123.0)}


def test_bad_rollouts_name_the_problem_and_change_nothing(parts: Parts) -> None:
    with pytest.raises(UnknownTargets, match="unknown devices: ghost, ghoul"):
        parts.rollouts.create("adder", "1", ["dev-1", "ghost", "ghoul"])
    with pytest.raises(UnknownTargets, match="unknown model version adder 9"):
        parts.rollouts.create("adder", "9", ["dev-1"])
    with pytest.raises(InvalidInputError, match="at least one device"):
        parts.rollouts.create("adder", "1", [])
    with pytest.raises(InvalidInputError, match="tenant"):
        parts.rollouts.create("adder", "1", ["dev-1"], tenant="a/b")
    assert parts.rollouts.all() == []
    assert parts.fleet.desired_states() == []
    with pytest.raises(RolloutNotFound):
        parts.rollouts.get("nope")
