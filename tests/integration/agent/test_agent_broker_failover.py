"""An agent with several brokers (the nodes of a cluster) keeps its fleet link when one dies:
real Mosquitto processes, a real agent process."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.waiting import wait_until


@pytest.fixture
def second_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "mosquitto-b")
    yield b
    b.stop()


def with_fallbacks(agent: AgentProcess, *ports: int) -> None:
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    text = agent.config.read_text().replace("[mqtt]\n", f"[mqtt]\nfallback_brokers = [{listed}]\n", 1)
    agent.config.write_text(text)


def online(peer: Peer) -> bool:
    return bool(peer.statuses) and peer.statuses[-1].online


@pytest.mark.slow
def test_the_agent_moves_to_the_next_broker_when_its_broker_dies(
    broker: Broker,
    second_broker: Broker,
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
) -> None:
    agent = make_agent(telemetry_interval_s=0.5)
    # The second node knows the same accounts, as a cluster's nodes do.
    second_broker.workdir.mkdir(parents=True)
    shutil.copy(broker.passwd_file, second_broker.passwd_file)
    second_broker.start()
    with_fallbacks(agent, second_broker.port)
    first = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: online(first), 20, "the agent online on the first broker")

    broker.stop()
    second = Peer(second_broker, agent.device_id)
    try:
        wait_until(lambda: online(second), 30, "the agent online on the second broker")
        seen = len(second.telemetry)
        wait_until(lambda: len(second.telemetry) > seen, 20, "telemetry through the second broker")
    finally:
        second.close()
    log = agent.output()
    assert f"trying the next broker device={agent.device_id} host=127.0.0.1 port={second_broker.port}" in log
    assert f"broker connected device={agent.device_id} host=127.0.0.1 port={second_broker.port}" in log


@pytest.mark.slow
def test_a_dead_first_broker_does_not_keep_the_agent_offline(
    broker: Broker, make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    dead = Broker(tmp_path / "never-started")  # a free port nobody listens on
    text = agent.config.read_text().replace(f"port = {broker.port}\n", f"port = {dead.port}\n", 1)
    agent.config.write_text(text)
    with_fallbacks(agent, broker.port)
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: online(peer), 20, "the agent online through its fallback broker")


def test_a_malformed_fallback_broker_is_refused_naming_it() -> None:
    text = (
        'device_id = "d"\ndata_dir = "/tmp/d"\n[security]\nallow_unsigned = true\n[mqtt]\npassword = "p"\n'
        'fallback_brokers = ["127.0.0.1:1883", "node-2"]\n'
    )
    with pytest.raises(ConfigError, match=r"mqtt\.fallback_brokers: 'node-2' is not host:port"):
        parse_config(text)
    ok = parse_config(text.replace('"node-2"', '"[::1]:8883"'))
    assert ok.mqtt.addresses() == [("127.0.0.1", 1883), ("127.0.0.1", 1883), ("::1", 8883)]
