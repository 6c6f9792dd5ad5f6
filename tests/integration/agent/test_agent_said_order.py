"""The agent numbers what it says, so a controller whose ingest processes share its messages
(and so do not keep their order) stores the newest: reports count up within a run, a
connection's will outranks its online status and is outranked by the next connection's, and a
restarted agent outranks everything it said before. Real Mosquitto, a real agent process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from edgefleet_proto import fleet_pb2

from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def order(m: fleet_pb2.ReportedState | fleet_pb2.DeviceStatus) -> tuple[int, int]:
    return m.session, m.seq


def test_reports_and_status_are_numbered_in_the_order_they_were_said(
    broker: Broker, make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer]
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: peer.statuses and peer.statuses[-1].online, 20, "the agent online")
    peer.publish_desired(1)
    wait_until(lambda: any(r.desired_generation == 1 for r in peer.reported), 20, "a report of generation 1")
    first_run = list(peer.reported)
    assert first_run[0].session > 0
    assert [order(r) for r in first_run] == sorted({order(r) for r in first_run}), "reports count up"

    # The broker goes away and comes back: the same run, a second connection.
    broker.restart()
    wait_until(
        lambda: len([s for s in peer.statuses if s.online]) >= 2, 30, "online again after the broker restart"
    )
    online = [s for s in peer.statuses if s.online]
    assert online[1].session == online[0].session and online[1].seq > online[0].seq + 1

    said = len(peer.statuses)
    agent.kill()
    will = wait_until(
        lambda: next((s for s in peer.statuses[said:] if not s.online), None), 30, "the last will"
    )
    # The will of the second connection: above its online status, below nothing said before it.
    assert order(online[1]) < order(will) and will.seq == online[1].seq + 1

    agent.start()
    agent.wait_ready()
    wait_until(
        lambda: peer.statuses[-1].online and peer.statuses[-1].session > will.session, 30, "a new run online"
    )
    wait_until(lambda: peer.reported[-1].session > first_run[0].session, 30, "a report of the new run")
    assert order(peer.statuses[-1]) > order(will)
