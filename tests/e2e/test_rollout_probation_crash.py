"""An update that crashes the agent while it serves on probation, seen from the controller: real
controller, mosquitto and agent processes, the agent restarted after each death as systemd
would. Each rollout of the version is one attempt: the agent dies once on probation, comes back
on version 1 and reports the update rolled back, and the rollout's gate counts the device failed;
after three such rollouts the agent refuses the version at once, without dying again."""

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

REASON = "crashed the agent 3 times while on probation"


def test_each_rollout_that_crashes_the_agent_on_probation_fails_and_the_third_crash_ends_the_attempts(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for version in ("1", "2"):
        path = tmp_path / f"v{version}.onnx"
        path.write_bytes(linear_model(int(version) + 10, n_in=16, n_out=4))
        controller.cli("models", "upload", str(path), "--name", "lin", "--version", version)
    agent = register_agent(controller, tmp_path / "agents", "crashy-0")
    agents.append(agent.start())
    first = controller.cli("rollouts", "create", "--model", "lin", "--version", "1", "--all")
    done = wait_until(lambda: rollout_done(controller, first["id"]), 120, "version 1 on the device")
    assert done["status"] == "succeeded", done

    # From now on the agent is SIGKILLed right after it persisted "probation", at every start.
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", "probation")
    agent.stop()
    agent.start()
    restarts = 0

    def settled(rollout_id: str) -> dict[str, Any] | None:
        nonlocal restarts
        if agent.proc is not None and agent.proc.poll() is not None:
            assert agent.proc.returncode == -9, agent.log()[-3000:]
            restarts += 1
            agent.start()  # Restart=on-failure
        r: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rollout_id}").json()
        return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

    for attempt in (1, 2, 3, 4):
        rollout = controller.cli(
            "rollouts", "create", "--model", "lin", "--version", "2", "--all", "--wave", "100%:1",
            "--max-failure-fraction", "0", "--on-failure", "rollback", "--device-timeout", "300",
            "--probation", "60",
        )  # fmt: skip
        final = wait_until(
            lambda r=rollout: settled(r["id"]), 180, f"rollout {attempt} to settle", interval=0.05
        )
        assert final["state"] == "rolled_back", final
        assert "1 of 1 devices failed to update" in final["reason"], final["reason"]
        assert restarts == min(attempt, 3), "one death per attempt, none after the third"
    assert agent.alive()
    assert agent.infer({"x": np.ones((1, 16), np.float32)}).model_version == "1"

    def told_why() -> set[str]:
        events = controller.api("GET", "/v1/devices/crashy-0/events?limit=200").json()
        return {e["kind"] for e in events if REASON in e["message"]}

    assert "update_outcome" in wait_until(told_why, 30, "the device's update_outcome event with the reason")
