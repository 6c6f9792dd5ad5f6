from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import inference_pb2_grpc

from tests.broker import REPO, Broker
from tests.integration.agent.peer import Peer, public_key
from tests.support.waiting import wait_until


@dataclass
class AgentProcess:
    device_id: str
    config: Path
    data_dir: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    def start(self) -> AgentProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"agent exited:\n{self.output()}"
            return self.output().count("agent ready") > self.readies

        wait_until(ready, timeout, "agent ready")
        self.readies += 1

    readies: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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
