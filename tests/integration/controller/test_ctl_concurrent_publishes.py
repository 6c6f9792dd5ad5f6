"""The controller's broker session while several of its threads publish large messages at once
(real mosquitto, plain TCP): chunk replies, desired states and acknowledgements come from
different worker threads, and every byte must reach the socket whole, one packet after another.
A session the broker closes for a malformed packet loses every reply in flight."""

from __future__ import annotations

import threading

from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until

THREADS = 8
EACH = 40
# A chunk reply's size: larger than what a socket takes in one write when the broker is busy.
PAYLOAD = 1024 * 1024


def test_large_messages_published_from_several_threads_reach_the_broker_whole(ctl: Ctl) -> None:
    transport = ctl.controller.transport
    assert transport is not None
    peer = ctl.device_peer(ctl.register("cam-1"))
    topic = Topic("cam-1", Kind.ARTIFACT_RESPONSE)
    try:
        peer.subscribe(str(topic))
        disconnects = transport.disconnects
        start = threading.Barrier(THREADS)

        def publish(n: int) -> None:
            payload = bytes([n]) * PAYLOAD
            start.wait()
            for _ in range(EACH):
                transport._publish(topic, payload, retain=False)

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wait_until(lambda: len(peer.messages) >= THREADS * EACH or None, 120, "every message at the device")
        assert transport.disconnects == disconnects, "the broker closed the controller's session"
        assert all(len(m.payload) == PAYLOAD and len(set(m.payload)) == 1 for m in peer.messages)
    finally:
        peer.close()
