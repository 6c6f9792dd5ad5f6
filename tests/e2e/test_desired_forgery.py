"""The real controller signs every desired state and a real agent follows nothing else.

An unsigned state with the largest generation, published retained on the device's desired
topic with the controller's own broker account, is refused: the device keeps serving, keeps
its generation, and every later rollout reaches it, also after the agent restarts meeting
that forged state on the topic."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.agent_process import AgentProcess
from tests.support.broker import CONTROLLER_USER, Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

HUGE = 2**64 - 1


def forge(broker: Broker, controller: Controller, device_id: str) -> None:
    """What the issue's attacker did: no signature, no assignments, generation 2**64-1, retained."""
    forger = Peer(broker.port, CONTROLLER_USER, controller.mqtt_password())
    try:
        forged = fleet_pb2.DesiredState(device_id=device_id, generation=HUGE)
        reason = forger.publish(str(Topic(device_id, Kind.DESIRED)), encode(forged), retain=True)
        assert not reason.is_failure, reason
    finally:
        forger.close()


def roll(controller: Controller, version: str, device_id: str) -> dict[str, object]:
    rollout = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", version, "--device", device_id
    )
    final: dict[str, object] = wait_until(
        lambda: rollout_done(controller, rollout["id"]), 120, f"rollout of {version}"
    )
    return final


def full_log(agent: AgentProcess) -> str:
    return agent.log_file.read_text(errors="replace")


def refused_in_log(agent: AgentProcess, count: int) -> bool:
    return (
        full_log(agent).count(f"desired state generation {HUGE} refused: not signed by the controller")
        >= count
    )


@pytest.mark.slow
def test_a_forged_desired_state_neither_moves_the_device_nor_blocks_rollouts(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "v1.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    v2 = digits_classifier(tmp_path / "v2.onnx", max_iter=40)
    controller.cli("models", "upload", str(v2.path), "--name", "digits", "--version", "2")
    agent = register_agent(controller, tmp_path / "agents", "dev-c")
    agents.append(agent.start())
    assert roll(controller, "1", "dev-c")["status"] == "succeeded"
    generation = controller.api("GET", "/v1/devices/dev-c").json()["desired_generation"]

    # With the controller down, so that nothing it republishes races the forgery.
    controller.stop()
    forge(broker, controller, "dev-c")
    wait_until(lambda: refused_in_log(agent, 1), 30, "the forged state refused")
    assert agent.infer({"X": digits.samples[:2]}).model_version == "1"
    assert str(HUGE) not in (agent.data_dir / "state.json").read_text()
    controller.start()

    device = wait_until(
        lambda: (d := controller.api("GET", "/v1/devices/dev-c").json())["online"] and d, 30, "dev-c online"
    )
    assert device["reported"]["desired_generation"] == generation
    # (The agent's payload_rejected event is not looked for here: logging in with the controller's
    # account as client id edgefleet-controller discarded the controller's session, and the event
    # with it. The agent's own log above and the protocol tests show the event.)

    assert roll(controller, "2", "dev-c")["status"] == "succeeded"
    assert agent.infer({"X": digits.samples[:2]}).model_version == "2"

    # The agent restarts with the forged state retained on its topic, and still follows rollouts.
    agent.stop()
    controller.stop()
    forge(broker, controller, "dev-c")
    agent.start()
    wait_until(lambda: refused_in_log(agent, 2), 30, "the forged state refused after a restart")
    assert agent.infer({"X": digits.samples[:2]}).model_version == "2"
    controller.start()
    assert roll(controller, "1", "dev-c")["status"] == "succeeded"
    assert agent.infer({"X": digits.samples[:2]}).model_version == "1"
    assert f"applied={HUGE}" not in full_log(agent) and f"seen={HUGE}" not in full_log(agent)
    assert str(HUGE) not in (agent.data_dir / "state.json").read_text()
