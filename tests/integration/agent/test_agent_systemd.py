"""The agent under a real notify socket, as systemd runs it (Type=notify, WatchdogSec)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.outbox import Outbox
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import REPO
from tests.support.waiting import wait_until

SYNTHETIC_TENANT = """
[[tenants]]
id = "vibration"
queue = 8
rate_hz = 200
[tenants.source]
kind = "synthetic"
shape = "4"
"""


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="efn-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def receive(sock: socket.socket, want: str, timeout: float, seen: list[str]) -> list[str]:
    """Datagrams until one carrying ``want``; all of them kept in ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if want in message.split("\n"):
            return seen
    raise AssertionError(f"no {want} within {timeout}s; got {seen}")


def test_ready_watchdog_status_and_clean_stop(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    notify_socket: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = notify_socket
    agent = make_agent(telemetry_interval_s=0.5)
    with agent.config.open("a") as f:
        f.write(SYNTHETIC_TENANT)
    peer = make_peer(agent.device_id)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # ping at least every 0.5 s
    agent.start()

    seen: list[str] = []
    receive(sock, "READY=1", 30, seen)
    ready = next(m for m in seen if "READY=1" in m.split("\n"))
    assert f"MAINPID={agent.proc.pid}" in ready.split("\n")  # type: ignore[union-attr]
    assert "agent ready" in agent.output()  # READY comes once the socket serves
    assert os.path.exists(agent.socket)
    receive(sock, "WATCHDOG=1", 5, seen)
    receive(sock, "WATCHDOG=1", 5, seen)
    wait_until(lambda: peer.telemetry, 20, "telemetry")
    receive(sock, "WATCHDOG=1", 5, seen)
    assert any(line.startswith("STATUS=serving") for m in seen for line in m.split("\n"))

    assert agent.terminate(timeout=20) == 0
    receive(sock, "STOPPING=1", 1, seen)
    out = agent.output()
    assert "agent stopped" in out and "Traceback" not in out
    outbox = Outbox(agent.data_dir / "outbox.db", 100)
    try:
        assert len(outbox) == 0  # flushed to the broker before exiting
    finally:
        outbox.close()


def test_unit_file_is_hardened_notify_service() -> None:
    unit = (REPO / "deploy" / "systemd" / "edgefleet-agent.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert int(settings["WatchdogSec"]) > 0 and settings["User"] == "edgefleet"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"].split() == ["/var/lib/edgefleet-agent", "/run/edgefleet-agent"]
    assert Path("/var/lib") / settings["StateDirectory"] == Path(settings["ReadWritePaths"].split()[0])
