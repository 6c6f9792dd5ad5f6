"""A device asks for its desired state and the controller answers from its database, so a
broker that lost its retained messages cannot leave a device behind. Real Mosquitto, real
controller; the device is a peer using the credentials the API handed out."""

from __future__ import annotations

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_calls import rollout
from tests.support.controller_process import Ctl, messages_on
from tests.support.waiting import wait_until


def answers(peer: object, device_id: str) -> list[fleet_pb2.DesiredState]:
    return [
        decode_as(fleet_pb2.DesiredState, m.payload)
        for m in messages_on(peer, str(Topic(device_id, Kind.DESIRED)))  # type: ignore[arg-type]
        if m.payload
    ]


def request(device_id: str) -> bytes:
    return encode(fleet_pb2.DesiredRequest(device_id=device_id, applied_generation=0))


def test_a_device_gets_its_desired_state_on_request_after_the_broker_lost_it(
    ctl: Ctl, digits_model: object
) -> None:
    ctl.upload(digits_model, "digits", "1")  # type: ignore[arg-type]
    creds = ctl.register("cam-1")
    rollout(ctl, "digits", "1", "cam-1")
    as_controller = ctl.controller_peer()
    # Wipe the retained copy, as a broker that lost its store (or a fresh cluster node) would have.
    assert not as_controller.publish(str(Topic("cam-1", Kind.DESIRED)), b"", retain=True).is_failure
    as_controller.close()
    peer = ctl.device_peer(creds)
    try:
        peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
        assert not answers(peer, "cam-1"), "nothing retained any more"
        assert not peer.publish(str(Topic("cam-1", Kind.DESIRED_REQUEST)), request("cam-1")).is_failure
        got = wait_until(lambda: answers(peer, "cam-1") or None, 10, "the desired state on request")
        assert got[-1].generation >= 1 and got[-1].state_signature, "answered signed, from the database"
        assert [m.model_name for m in got[-1].models] == ["digits"]
    finally:
        peer.close()


def test_a_device_may_ask_only_for_its_own_desired_state_and_not_flood(
    ctl: Ctl, digits_model: object
) -> None:
    ctl.upload(digits_model, "digits", "1")  # type: ignore[arg-type]
    a = ctl.register("cam-1")
    ctl.register("cam-2")
    rollout(ctl, "digits", "1", "cam-1", "cam-2")
    peer = ctl.device_peer(a)
    try:
        # The broker refuses a request on another device's topic.
        code = peer.publish(str(Topic("cam-2", Kind.DESIRED_REQUEST)), request("cam-2"))
        assert code.is_failure and str(code) == "Not authorized"
        peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
        wait_until(lambda: answers(peer, "cam-1") or None, 10, "the retained desired state")
        retained = len(answers(peer, "cam-1"))
        for _ in range(40):
            peer.publish(str(Topic("cam-1", Kind.DESIRED_REQUEST)), request("cam-1"))
        # The burst (5 by default) is answered; the rest is dropped and counted.
        wait_until(lambda: len(answers(peer, "cam-1")) >= retained + 5 or None, 10, "the burst answered")
        metrics = wait_until(
            lambda: (
                text
                if 'reason="rate_limited"' in (text := ctl.api("GET", "/metrics").text)
                and "desired/request" in text
                else None
            ),
            15,
            "rate-limited requests counted",
        )
        assert metrics
        assert len(answers(peer, "cam-1")) <= retained + 5 + 2  # the refill over a few seconds at most
    finally:
        peer.close()
