"""What several controller tests send and read: telemetry windows and their acknowledgements,
a rollout created over the API, the desired state a device saw."""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_process import Ctl, messages_on
from tests.support.mqtt_peer import Peer


def window(device_id: str, seq: int) -> bytes:
    return encode(
        fleet_pb2.Telemetry(
            device_id=device_id, seq=seq, window_start_ms=seq * 1000, window_end_ms=seq * 1000 + 1000
        )
    )


def acknowledged(peer: Peer, device_id: str) -> Counter[int]:
    topic = str(Topic(device_id, Kind.TELEMETRY_ACK))
    acks = [
        decode_as(fleet_pb2.TelemetryAck, bytes(m.payload)) for m in list(peer.messages) if m.topic == topic
    ]
    assert all(a.device_id == device_id for a in acks)
    return Counter(seq for a in acks for seq in a.seqs)


def rollout(ctl: Ctl, model: str, version: str, *devices: str) -> dict[str, Any]:
    response = ctl.api(
        "POST", "/v1/rollouts", json={"model": model, "version": version, "devices": list(devices)}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def desired_seen(peer: Peer, device_id: str, generation: int) -> fleet_pb2.DesiredState | None:
    for message in reversed(messages_on(peer, str(Topic(device_id, Kind.DESIRED)))):
        if message.payload:
            desired = decode_as(fleet_pb2.DesiredState, message.payload)
            if desired.generation == generation:
                return desired
    return None
