"""An update that crashes the agent while staging, seen from the controller: real controller,
real mosquitto, a real agent process restarted after each death as systemd would restart it.

The agent dies (SIGKILL, fault injection) each time it stages version 2. After three
crashes it fails the update with the reason instead of dying a fourth time, keeps
serving version 1, and the rollout's gate counts the failed device and rolls back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.model_bytes import linear_model
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REASON = "crashed the agent 3 times while staging"


def test_an_update_that_crashes_the_agent_three_times_fails_the_device_and_the_rollout_rolls_back(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for version in ("1", "2"):
        path = tmp_path / f"v{version}.onnx"
        path.write_bytes(linear_model(int(version), n_in=16, n_out=4))
        controller.cli("models", "upload", str(path), "--name", "lin", "--version", version)
    agent = register_agent(controller, tmp_path / "agents", "crashy-0")
    agents.append(agent.start())
    first = controller.cli("rollouts", "create", "--model", "lin", "--version", "1", "--all")
    done = wait_until(lambda: rollout_done(controller, first["id"]), 120, "version 1 on the device")
    assert done["status"] == "succeeded", done

    # From now on the agent is SIGKILLed right after it persisted "stage", at every start.
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", "stage")
    agent.stop()
    agent.start()
    second = controller.cli(
        "rollouts", "create", "--model", "lin", "--version", "2", "--all", "--wave", "100%:1",
        "--max-failure-fraction", "0", "--on-failure", "rollback", "--device-timeout", "300",
    )  # fmt: skip
    restarts = 0

    def settled() -> dict[str, Any] | None:
        nonlocal restarts
        if agent.proc is not None and agent.proc.poll() is not None:
            assert agent.proc.returncode == -9, agent.log()[-3000:]
            restarts += 1
            agent.start()  # Restart=on-failure
        r: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{second['id']}").json()
        return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

    final = wait_until(settled, 180, "the rollout of version 2 to settle", interval=0.05)
    events = controller.api("GET", f"/v1/rollouts/{second['id']}/events").json()
    assert final["state"] == "rolled_back", (final, events)
    assert restarts == 3, "three crashes, then the agent stayed up"
    assert agent.alive()
    assert "1 of 1 devices failed to update" in final["reason"], final["reason"]

    # The device says why, in its events as the controller stored them.
    def told_why() -> set[str]:
        events = controller.api("GET", "/v1/devices/crashy-0/events").json()
        return {e["kind"] for e in events if REASON in e["message"]}

    assert "update_outcome" in wait_until(told_why, 30, "the device's update_outcome event with the reason")
    response = agent.infer({"x": np.ones((1, 16), np.float32)})
    assert response.model_version == "1"
