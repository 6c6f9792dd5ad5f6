"""Malformed payloads on every topic, and telemetry across a broker outage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgefleet_proto.topics import Kind, Topic

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"not protobuf at all", b""]


def test_malformed_payloads_on_every_topic_are_ignored(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    controller.cli("models", "upload", str(digits.path), "--name", "digits2", "--version", "1")
    agent = register_agent(controller, tmp_path / "agents", "dev-m")
    agents.append(agent.start())
    first = controller.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "dev-m")
    assert (
        wait_until(lambda: rollout_done(controller, first["id"]), 60, "first rollout")["status"]
        == "succeeded"
    )

    # Garbage from the controller's side reaches the agent (desired is retained: the
    # controller's next publish replaces it), garbage from the device's side reaches
    # the controller, and traffic for a device nobody registered.
    as_controller = Peer(broker.port, "test-garbage", broker.add_tool_user("test-garbage"))
    for kind in Kind:
        for payload in GARBAGE:
            assert not as_controller.publish(str(Topic("dev-m", kind)), payload).is_failure
            assert not as_controller.publish(str(Topic("ghost-device", kind)), payload).is_failure
    as_controller.publish(str(Topic("dev-m", Kind.ARTIFACT_REQUEST)), b"\x0a\x03abc\x1a\x02\x01\x02")
    as_controller.close()

    def still_working() -> bool:
        return agent.alive() and agent.infer({"X": digits.samples[:1]}).model_name == "digits"

    assert wait_until(still_working, 10, "the agent still answering")
    second = controller.cli("rollouts", "create", "--model", "digits2", "--version", "1", "--device", "dev-m")
    assert (
        wait_until(lambda: rollout_done(controller, second["id"]), 60, "second rollout")["status"]
        == "succeeded"
    )
    assert agent.infer({"X": digits.samples[:1]}).model_name == "digits2"
    assert controller.proc is not None and controller.proc.poll() is None
    assert "malformed" in agent.log().lower()
    assert "malformed" in controller.log_file.read_text().lower()


def test_telemetry_produced_while_broker_is_down_arrives_after(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    agent = register_agent(controller, tmp_path / "agents", "dev-t", telemetry_interval=0.5)
    agents.append(agent.start())
    wait_until(lambda: controller.cli("telemetry", "dev-t", "--limit", "1"), 30, "first telemetry")

    broker.stop()
    down_from = time.time() * 1000
    time.sleep(3)
    down_until = time.time() * 1000
    broker.start()

    def outage_windows() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = controller.cli("telemetry", "dev-t", "--limit", "200")
        inside = [r for r in rows if down_from < r["window_end_ms"] < down_until]
        return rows if len(inside) >= 4 else None

    rows = wait_until(outage_windows, 60, "the windows produced during the outage")
    assert agent.alive()
    # Sent oldest first after reconnect: arrival order is production order.
    arrival = sorted(rows, key=lambda r: (r["received_at"], r["seq"]))
    seqs = [r["seq"] for r in arrival]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs), "nothing sent twice"
