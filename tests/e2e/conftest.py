from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, stop_all


@pytest.fixture
def controller(broker: Broker, tmp_path: Path) -> Iterator[Controller]:
    """The real controller process, initialised against the test's mosquitto."""
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    c.init()
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test starts; all stopped at the end, whatever happened."""
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        stop_all(started)
