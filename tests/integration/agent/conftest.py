from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.agent_peer import Peer, public_key
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker


@pytest.fixture
def controller_key() -> Ed25519PrivateKey:
    """The test's controller signing key: the agents pin it, the peers sign with it."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def make_agent(
    broker: Broker, tmp_path: Path, controller_key: Ed25519PrivateKey
) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []
    pinned = controller_key
    # sun_path is short; keep sockets in a short folder of their own.
    sockets = Path(tempfile.mkdtemp(prefix="efa-"))

    def make(
        device_id: str | None = None,
        telemetry_interval_s: float = 10.0,
        protocol: str = "v5",
        controller_key: str | None = None,
        unsigned: bool = False,
    ) -> AgentProcess:
        """An agent pinning ``controller_key`` (hex), by default the test's key; ``unsigned``: none."""
        key = "" if unsigned else controller_key or public_key(pinned).hex()
        device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        broker.add_user(device_id, password)
        data_dir = tmp_path / device_id
        data_dir.mkdir()
        config = data_dir.parent / f"{device_id}.toml"
        socket = sockets / f"{device_id}.sock"
        config.write_text(
            f'device_id = "{device_id}"\n'
            f'data_dir = "{data_dir}"\n'
            f'socket = "{socket}"\n'
            f"telemetry_interval_s = {telemetry_interval_s}\n"
            "[mqtt]\n"
            'host = "127.0.0.1"\n'
            f"port = {broker.port}\n"
            f'username = "{device_id}"\n'
            f'password = "{password}"\n'
            f'protocol = "{protocol}"\n'
            "[transfer]\nwindow = 4\nrequest_timeout_s = 2.0\n"
            + (
                f'[security]\ncontroller_public_key = "{key}"\n'
                if key
                else "[security]\nallow_unsigned = true\n"
            )
        )
        agent = AgentProcess(device_id, config, data_dir, socket, tmp_path / f"{device_id}.log")
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()
    shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
def make_peer(broker: Broker, controller_key: Ed25519PrivateKey) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def make(device_id: str, persistent: bool = False, key: Ed25519PrivateKey | None = None) -> Peer:
        peer = Peer(broker, device_id, persistent=persistent, key=key or controller_key)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
