"""The controller acknowledges each telemetry window it stored, to the device that sent it."""

from __future__ import annotations

from collections import Counter

import pytest
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_calls import acknowledged, window
from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until

# The API and its storage on both databases (tests/conftest.py's store_url, through the ctl fixture).
pytestmark = pytest.mark.both_backends


def test_each_stored_window_is_acknowledged_and_a_copy_is_stored_once_and_acknowledged_again(
    ctl: Ctl,
) -> None:
    peer = ctl.device_peer(ctl.register("cam-1"))
    other = ctl.device_peer(ctl.register("cam-2"))
    try:
        peer.subscribe(str(Topic("cam-1", Kind.TELEMETRY_ACK)))
        other.subscribe(str(Topic("cam-1", Kind.TELEMETRY_ACK)))
        for seq in (1, 2, 3):
            assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-1", seq)).is_failure
        wait_until(
            lambda: set(acknowledged(peer, "cam-1")) == {1, 2, 3} or None, 10, "windows 1-3 acknowledged"
        )

        # The agent did not hear the acknowledgement in time and sends window 2 again.
        assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-1", 2)).is_failure
        wait_until(lambda: acknowledged(peer, "cam-1")[2] == 2 or None, 10, "window 2 acknowledged again")
        rows = ctl.api("GET", "/v1/devices/cam-1/telemetry").json()
        assert sorted(r["seq"] for r in rows) == [1, 2, 3], "stored once"

        # A window that is not stored (it names another device) is not acknowledged.
        assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-9", 4)).is_failure
        assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-1", 5)).is_failure
        wait_until(lambda: acknowledged(peer, "cam-1")[5] or None, 10, "window 5 acknowledged")
        assert acknowledged(peer, "cam-1")[4] == 0
        # Only the device itself hears its acknowledgements (broker ACL).
        assert acknowledged(other, "cam-1") == Counter()
    finally:
        peer.close()
        other.close()
