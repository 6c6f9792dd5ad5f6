"""A clustered broker: a staged rollout over a three-node NATS JetStream cluster (MQTT 3.1.1 on
every node, JetStream replicas 3) survives a node killed mid-wave.

The real controller (MQTT 3.1.1) is on the node that leads JetStream, with the other two as
fallback brokers; six real agents, two per node, each with the other nodes as fallbacks. That
node, which also serves a device of the second wave, is SIGKILLed once that wave has started:
for several seconds the survivors elect new leaders, refuse subscriptions and drop clients
whose QoS 1 publishes they cannot store. Every agent must converge on the new version, and
the controller must hold every telemetry window each device produced (seqs 1..n, no gap):
the agent keeps a window in its outbox until the controller's TelemetryAck says it is stored.
"""

from __future__ import annotations

import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from controller.settings import CONTROLLER_USER
from tests.support.agent_process import AgentProcess
from tests.support.localfleet import Controller, register_agent
from tests.support.models import digits_classifier
from tests.support.nats_cluster import NatsCluster, NatsNode
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

DEVICES = 6
# Shorter than the agent's default (30 s), so a window whose acknowledgement went down with a
# node is sent again within the test's time.
ACK_TIMEOUT_S = 5.0


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats")
    try:
        yield cluster
    finally:
        cluster.stop()


def place_on(agent: AgentProcess, home: NatsNode, cluster: NatsCluster) -> str:
    """Point the agent's config at ``home``, with the other nodes as fallback brokers; return
    the device's broker password."""
    doc: dict[str, Any] = tomllib.loads(agent.config.read_text())
    mqtt = doc["mqtt"]
    assert mqtt["protocol"] == "v311", "NATS speaks MQTT 3.1.1 only"
    mqtt["host"], mqtt["port"] = "127.0.0.1", home.mqtt_port
    mqtt["fallback_brokers"] = [n.address for n in cluster.nodes if n is not home]
    doc["outbox"] = {"ack_timeout_s": ACK_TIMEOUT_S}
    agent.config.write_text(tomli_w.dumps(doc))
    return str(mqtt["password"])


def stored_seqs(controller: Controller, device_id: str) -> set[int]:
    rows = controller.api("GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 1000}).json()
    return {int(r["seq"]) for r in rows}


def rollout(controller: Controller, rollout_id: str) -> dict[str, Any]:
    body: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rollout_id}").json()
    return body


def events(controller: Controller, rollout_id: str) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = controller.api("GET", f"/v1/rollouts/{rollout_id}/events").json()
    return body


def start_controller(nats: NatsCluster, tmp_path: Path, qos1: bool = True) -> Controller:
    """The real controller (MQTT 3.1.1) on the cluster's JetStream leader, with the other nodes
    as fallback brokers; ``nats.nodes`` is reordered to put that node first. ``qos1=False``
    starts it with an account whose QoS 1 subscriptions the broker refuses."""
    c = Controller(tmp_path / "controller", nats.nodes[0].mqtt_port, protocol="v311")
    c.init()
    nats.add_controller(c.mqtt_password(), qos1=qos1)
    nats.start()
    leader = nats.meta_leader()
    nats.nodes = [leader, *(n for n in nats.nodes if n is not leader)]
    settings = c.data_dir / "controller.toml"
    doc = tomllib.loads(settings.read_text())
    doc["broker_port"] = leader.mqtt_port
    doc["mqtt_fallback_brokers"] = [n.address for n in nats.nodes[1:]]
    settings.write_text(tomli_w.dumps(doc))
    return c.start()


@contextmanager
def running(controller: Controller, nats: NatsCluster) -> Iterator[Controller]:
    try:
        yield controller
    finally:
        controller.stop()
        # Shown by pytest only when the test failed.
        print(f"--- controller log\n{controller_log(controller)[-6000:]}")
        print(nats.logs())


@pytest.fixture
def controller(nats: NatsCluster, tmp_path: Path) -> Iterator[Controller]:
    with running(start_controller(nats, tmp_path), nats) as c:
        yield c


def test_staged_rollout_over_a_nats_cluster_converges_and_keeps_every_window_when_a_node_dies(
    nats: NatsCluster, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    run(controller, nats, agents, tmp_path)


def run(controller: Controller, nats: NatsCluster, agents: list[AgentProcess], tmp_path: Path) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    version = controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    home: dict[str, NatsNode] = {}
    credentials = []
    for i in range(DEVICES):
        agent = register_agent(controller, tmp_path / "agents", f"dev-{i}")
        home[agent.device_id] = nats.nodes[i % len(nats.nodes)]
        credentials.append((agent.device_id, place_on(agent, home[agent.device_id], nats)))
        agents.append(agent)
    nats.add_devices(credentials)
    for agent in agents:
        agent.start()
    wait_until(
        lambda: all(d["online"] for d in controller.api("GET", "/v1/devices").json()), 90, "six agents online"
    )

    created = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", "1", "--all",
        "--wave", "2:3", "--wave", "2:3", "--wave", "100%:3", "--device-timeout", "90",
    )  # fmt: skip
    rid = str(created["id"])
    waves = {d["device_id"]: d["wave"] for d in created["devices"]}
    assert sorted(Counter(waves.values()).items()) == [(1, 2), (2, 2), (3, 2)], waves

    # The node to kill leads JetStream, serves the controller and a device of the second wave.
    victim = nats.nodes[0]
    assert any(home[d] is victim for d in waves if waves[d] == 2), (waves, home)
    moved = sorted(d for d, node in home.items() if node is victim)

    def in_second_wave() -> bool:
        r = rollout(controller, rid)
        assert r["state"] == "running", (r, events(controller, rid))
        return bool(r["wave"] >= 2)

    wait_until(in_second_wave, 90, "the second wave")
    victim.kill()
    killed_at_ms = int(time.time() * 1000)

    def finished() -> dict[str, Any] | None:
        r = rollout(controller, rid)
        return r if r["state"] not in ("running", "paused") else None

    final = wait_until(finished, 150, "the rollout to finish")
    assert (final["state"], final["status"]) == ("succeeded", "succeeded"), (final, events(controller, rid))
    log = events(controller, rid)
    assert [e["wave"] for e in log if e["kind"] == "start_wave"] == [1, 2, 3]
    sent = Counter(e["device_id"] for e in log if e["kind"] == "set_desired")
    assert sorted(sent) == sorted(waves) and set(sent.values()) == {1}, "each device set exactly once"

    for agent in agents:
        assert agent.infer({"X": digits.samples[:1]}).model_version == "1", agent.device_id
        device = controller.api("GET", f"/v1/devices/{agent.device_id}").json()
        active = [m["artifact_digest"] for m in device["reported"]["models"] if m["phase"] == "active"]
        assert active == [version["digest"]], (agent.device_id, device["reported"])
    survivors = [n.mqtt_port for n in nats.nodes if n is not victim]
    for device_id in moved:
        agent = next(a for a in agents if a.device_id == device_id)
        assert any(
            f"broker connected device={device_id} host=127.0.0.1 port={port}" in agent.log()
            for port in survivors
        ), f"{device_id} never reached a surviving node:\n{agent.log()[-3000:]}"

    # The controller continued its persistent session (its QoS 1 subscriptions, JetStream
    # consumers with 3 replicas) on a surviving node.
    controller_log = controller.log_file.read_text(errors="replace")
    assert any(
        f"mqtt connected broker=127.0.0.1:{port} protocol=v311 user={CONTROLLER_USER} session_present=True"
        in controller_log
        for port in survivors
    ), controller_log[-3000:]

    # Every window up to one sent well after the kill is stored: nothing fell into the gap.
    def reporting_since_the_kill(device_id: str) -> int | None:
        rows = controller.api("GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 5}).json()
        late = [int(r["seq"]) for r in rows if r["window_start_ms"] > killed_at_ms + 5000]
        return max(late) if late else None

    upto = {
        a.device_id: wait_until(
            lambda d=a.device_id: reporting_since_the_kill(d), 60, f"{a.device_id} reporting after the kill"
        )
        for a in agents
    }

    def missing() -> dict[str, list[int]]:
        gaps = {d: sorted(set(range(1, n + 1)) - stored_seqs(controller, d)) for d, n in upto.items()}
        return {d: g for d, g in gaps.items() if g}

    try:
        wait_until(lambda: not missing(), 60, "every telemetry window stored", interval=1.0)
    except TimeoutError:
        raise AssertionError(f"telemetry windows lost (device: missing seqs): {missing()}") from None


def test_an_agent_whose_subscriptions_the_broker_refused_subscribes_again_and_converges(
    nats: NatsCluster, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    """NATS refuses a QoS 1 SUBSCRIBE it cannot back with a JetStream consumer (as while it elects
    leaders); here the device's account lacks the delivery subjects until the broker reloads."""
    digits = digits_classifier(tmp_path / "digits.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    agent = register_agent(controller, tmp_path / "agents", "dev-r")
    password = place_on(agent, nats.nodes[1], nats)
    nats.add_devices([(agent.device_id, password)], qos1=False)
    agents.append(agent.start())
    wait_until(lambda: "subscription refused device=dev-r" in agent.log(), 60, "a refused subscription")

    nats.add_devices([(agent.device_id, password)])
    created = controller.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "dev-r")

    def finished() -> dict[str, Any] | None:
        r = rollout(controller, str(created["id"]))
        return r if r["state"] not in ("running", "paused") else None

    final = wait_until(finished, 90, "the rollout to finish")
    assert final["status"] == "succeeded", (final, agent.log()[-3000:])
    assert agent.infer({"X": digits.samples[:1]}).model_version == "1"
    assert "subscriptions complete device=dev-r" in agent.log()


def test_a_controller_whose_subscriptions_the_broker_refused_subscribes_again_and_hears_the_fleet(
    nats: NatsCluster, agents: list[AgentProcess], tmp_path: Path
) -> None:
    """The same refusal on the controller's side: until the broker reloads its account, no
    device's message reaches it; then it subscribes again and sees the device come online."""
    with running(start_controller(nats, tmp_path, qos1=False), nats) as controller:
        wait_until(
            lambda: (
                "mqtt subscription refused topic=edgefleet/v1/devices/+/status" in controller_log(controller)
            ),
            60,
            "the controller's subscriptions refused",
        )
        agent = register_agent(controller, tmp_path / "agents", "dev-c")
        nats.add_devices([(agent.device_id, place_on(agent, nats.nodes[1], nats))])
        nats.add_controller(controller.mqtt_password())
        agents.append(agent.start())
        wait_until(
            lambda: controller.api("GET", "/v1/devices/dev-c").json()["online"],
            90,
            "dev-c online at the controller",
        )
        wait_until(
            lambda: "mqtt subscriptions complete" in controller_log(controller),
            60,
            "every subscription granted",
        )


def controller_log(controller: Controller) -> str:
    return controller.log_file.read_text(errors="replace")
