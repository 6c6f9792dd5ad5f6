"""A broker that lost its retained messages (restarted without its store, or a cluster node
that never had them) cannot leave a device behind: the real agent asks the real controller
for its desired state when it connects, and converges."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto.topics import Kind, Topic

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until


@pytest.mark.slow
def test_an_agent_converges_although_the_broker_lost_its_desired_state(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "v1.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    agent = register_agent(controller, tmp_path / "agents", "dev-r")
    rollout = controller.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "dev-r")
    wait_until(
        lambda: controller.api("GET", "/v1/devices/dev-r").json()["desired_generation"] or None,
        30,
        "the desired state stored",
    )
    # The broker loses the retained copy while the device is offline.
    tool = Peer(broker.port, "state-wiper", broker.add_tool_user("state-wiper"))
    try:
        assert not tool.publish(str(Topic("dev-r", Kind.DESIRED)), b"", retain=True).is_failure
    finally:
        tool.close()

    agents.append(agent.start())
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    assert agent.infer({"X": digits.samples[:2]}).model_version == "1"
    assert "desired state sent on request device=dev-r" in controller.log_file.read_text(errors="replace")
