"""A controller process's broker session across restarts with other roles (real mosquitto): the
persistent session of an ``--instance`` account keeps the subscriptions it had, so a process
that was an ingest process and comes back as a chunks process drops the ingest group's shared
subscription when it connects, and receives no telemetry from then on."""

from __future__ import annotations

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from controller.roles import ALL, Role, account, subscriptions
from controller.transport import Transport
from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until


def role_transport(ctl: Ctl, roles: frozenset[Role]) -> Transport:
    c = ctl.controller
    transport = Transport(
        ctl.settings,
        c.fleet,
        c.telemetry,
        c.artifacts,
        username=account(3),
        subscriptions=subscriptions(roles, shared=True),
        republish_on_connect=False,
    )
    transport.start()
    # Subscribed, not just connected: until the broker has answered its SUBSCRIBE and UNSUBSCRIBE,
    # windows sent meanwhile may miss the group it joins or still reach the groups it left.
    assert wait_until(lambda: transport.wait_subscribed(0.5) or None, 15, f"{account(3)} subscribed")
    return transport


def test_a_process_back_with_other_roles_leaves_the_groups_it_left(ctl: Ctl) -> None:
    peer = ctl.device_peer(ctl.register("cam-1"))
    main = ctl.controller.transport
    assert main is not None and ctl.controller.roles == ALL

    def send(seqs: range) -> None:
        for seq in seqs:
            window = fleet_pb2.Telemetry(device_id="cam-1", seq=seq, window_start_ms=seq * 1000)
            assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(window)).is_failure

    def stored() -> int:
        return len(ctl.api("GET", "/v1/devices/cam-1/telemetry?limit=1000").json())

    ingest = role_transport(ctl, frozenset({Role.INGEST}))
    try:
        # The all-roles controller takes every window (plain subscription); the ingest group's
        # one member takes each too, and finds most of them stored already.
        send(range(1, 21))
        wait_until(lambda: ingest.windows_acknowledged == 20 or None, 15, "the ingest process's windows")
    finally:
        ingest.stop()
    chunks = role_transport(ctl, frozenset({Role.CHUNKS}))
    try:
        send(range(21, 41))
        wait_until(lambda: stored() == 40 or None, 15, "every window stored by the controller")
        assert main.windows_acknowledged >= 40
        assert chunks.windows_acknowledged == 0
    finally:
        chunks.stop()
        peer.close()
