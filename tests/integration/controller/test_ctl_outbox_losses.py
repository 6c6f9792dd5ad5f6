"""What a device's agent could not deliver reaches the operator: the outbox's loss counts in each
telemetry window (dropped at its bound, dropped for disk space, not stored at all) are kept per
device by the controller and shown in the device API and on /metrics, on a real mosquitto and
real SQLite with a device client holding the device's own credentials."""

from __future__ import annotations

import time
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controller_process import Ctl
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

HOUR_MS = 3_600_000


def window(seq: int, bound: int, space: int, unwritable: int, end_ms: int = 0) -> bytes:
    end_ms = end_ms or 1_700_000_000_000 + seq * 10_000
    return encode(
        fleet_pb2.Telemetry(
            device_id="cam-1",
            seq=seq,
            window_start_ms=end_ms - 10_000,
            window_end_ms=end_ms,
            outbox_dropped=bound,
            outbox_dropped_for_space=space,
            outbox_unwritable=unwritable,
        )
    )


def lost(ctl: Ctl) -> dict[str, float]:
    text = ctl.api("GET", "/metrics").text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgefleet_device_outbox_lost_total" and s.labels["device"] == "cam-1"
    }


def send_and_wait(ctl: Ctl, peer: Peer, seq: int, payload: bytes) -> None:
    """Send a window (each one here starts at its own time, so each is stored anew) and wait for it."""

    def windows() -> int:
        return len(ctl.api("GET", "/v1/devices/cam-1/telemetry?limit=1000").json())

    before = windows()
    assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), payload).is_failure
    wait_until(lambda: windows() > before, 10, f"window {seq} stored")


def losses(ctl: Ctl) -> dict[str, Any]:
    device = ctl.api("GET", "/v1/devices/cam-1").json()
    listed = {d["device_id"]: d for d in ctl.api("GET", "/v1/devices").json()}
    assert listed["cam-1"]["outbox_losses"] == device["outbox_losses"]
    body: dict[str, Any] = device["outbox_losses"]
    return body


def test_the_telemetry_a_device_could_not_keep_is_counted_per_device_across_agent_restarts(ctl: Ctl) -> None:
    peer = ctl.device_peer(ctl.register("cam-1"))
    ctl.register("cam-2")
    try:
        send_and_wait(ctl, peer, 1, window(1, 0, 0, 0))
        assert ctl.api("GET", "/v1/devices/cam-1").json()["outbox_losses"] is None, "nothing lost yet"
        assert lost(ctl) == {}

        # The disk filled: windows dropped oldest first, records not stored at all.
        send_and_wait(ctl, peer, 2, window(2, 1, 5, 2))
        send_and_wait(ctl, peer, 3, window(3, 3, 7, 4))
        assert lost(ctl) == {"outbox_bound": 3, "disk_full": 7, "unwritable": 4}
        first = losses(ctl)
        assert (first["dropped_at_bound"], first["dropped_for_space"], first["unwritable"]) == (3, 7, 4)
        assert first["seq"] == 3

        # A late resend of an older window counts nothing again.
        send_and_wait(ctl, peer, 1, window(1, 0, 0, 0, end_ms=1_700_000_000_000 + 10_001))
        send_and_wait(ctl, peer, 2, window(2, 1, 5, 2, end_ms=1_700_000_000_000 + 20_001))
        assert lost(ctl) == {"outbox_bound": 3, "disk_full": 7, "unwritable": 4}

        # The agent restarted (its unwritable count is kept in memory only) and lost one more record.
        send_and_wait(ctl, peer, 4, window(4, 3, 7, 1))
        assert lost(ctl) == {"outbox_bound": 3, "disk_full": 7, "unwritable": 5}

        # Its data folder was made anew: numbering starts over, counts start over, totals go on.
        now_ms = int(time.time() * 1000)
        send_and_wait(ctl, peer, 1, window(1, 2, 0, 0, end_ms=now_ms))
        assert lost(ctl) == {"outbox_bound": 5, "disk_full": 7, "unwritable": 5}
        after = losses(ctl)
        assert (after["seq"], after["window_end_ms"]) == (1, now_ms)
        assert after["unwritable"] == 5
    finally:
        peer.close()
    assert ctl.api("GET", "/v1/devices/cam-2").json()["outbox_losses"] is None
