"""A device that refuses the desired state a rollout sent it (it trusts another controller key,
say) goes on reporting its previous state; its payload_rejected event for that generation is
what fails it in the rollout, with the device's reason, instead of leaving it pending forever."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.device_events import DeviceEvents
from tests.support.models import small_conv
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

SENT_AT = 1_000.0
REASON = "desired state generation 1 refused: signed by key aaaa, this device trusts controller key bbbb"


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.registry.upload("conv", "1", io.BytesIO(small_conv(tmp_path / "c.onnx").read_bytes()), {})
    for device_id in ("dev-1", "dev-2"):
        p.fleet.register(device_id)
    p.rollouts.clock = lambda: SENT_AT
    return p


def refused(parts: Parts, device_id: str, generation: int, at: float, topic: str = "desired") -> None:
    event = fleet_pb2.Event(device_id=device_id, kind="payload_rejected", severity="warning", message=REASON)
    event.attributes.update({"topic": topic, "generation": str(generation)})
    DeviceEvents(parts.store, quota=100).ingest(device_id, event, received_at=at)


def statuses(parts: Parts, rollout_id: str) -> dict[str, tuple[str, str]]:
    return {d.device_id: (d.status, d.detail) for d in parts.rollouts.get(rollout_id).devices}


def test_a_refused_desired_state_fails_the_device_with_its_reason(parts: Parts) -> None:
    rollout = parts.rollouts.create("conv", "1", ["dev-1", "dev-2"])
    generation = parts.fleet.get("dev-1").desired_generation
    # Not about the state this rollout sent: before it was sent, another generation, another topic.
    refused(parts, "dev-1", generation, SENT_AT - 1)
    refused(parts, "dev-1", generation + 1, SENT_AT + 1)
    refused(parts, "dev-1", generation, SENT_AT + 1, topic="artifact/response")
    assert {s for s, _ in statuses(parts, rollout.id).values()} == {"pending"}

    refused(parts, "dev-1", generation, SENT_AT + 2)
    now = statuses(parts, rollout.id)
    assert now["dev-1"] == ("failed", f"the device refused its desired state: {REASON}")
    assert now["dev-2"][0] == "pending"
    # The engine counts it as failed, as it would a refused artifact: the wave ends without waiting.
    active = fleet_pb2.ReportedState(
        device_id="dev-2", desired_generation=generation, applied_generation=generation
    )
    active.models.add(tenant="default", artifact_digest=rollout.digest, phase=fleet_pb2.MODEL_PHASE_ACTIVE)
    parts.fleet.record_reported("dev-2", active, received_at=SENT_AT + 3)
    parts.rollouts.advance(rollout.id)
    done = parts.rollouts.get(rollout.id)
    assert (done.status, done.state) == ("failed", "failed")
    assert statuses(parts, rollout.id) == {
        "dev-1": ("failed", f"the device refused its desired state: {REASON}"),
        "dev-2": ("active", ""),
    }
