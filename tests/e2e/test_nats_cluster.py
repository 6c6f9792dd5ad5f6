"""A clustered broker: a staged rollout over a three-node NATS JetStream cluster (MQTT 3.1.1 on
every node, JetStream replicas 3) survives a node killed mid-wave.

The real controller (MQTT 3.1.1) is on the first node; six real agents, two per node, each
with the other nodes as fallback brokers. One node that serves agents of the wave under way
is SIGKILLed once that wave has started. Every agent must converge on the new version, and
the controller must hold every telemetry window each device produced (seqs 1..n, no gap):
the agent keeps a window in its outbox until the controller's TelemetryAck says it is stored.
"""

from __future__ import annotations

import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.localfleet import Agent, Controller, register_agent, wait_until
from tests.models import digits_classifier
from tests.nats_cluster import NatsCluster, NatsNode

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


def place_on(agent: Agent, home: NatsNode, cluster: NatsCluster) -> str:
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


def test_staged_rollout_over_a_nats_cluster_converges_and_keeps_every_window_when_a_node_dies(
    nats: NatsCluster, agents: list[Agent], tmp_path: Path
) -> None:
    controller_node = nats.nodes[0]
    controller = Controller(tmp_path / "controller", controller_node.mqtt_port, protocol="v311")
    controller.init()
    nats.add_controller(controller.mqtt_password())
    nats.start()
    controller.start()
    try:
        run(controller, nats, agents, tmp_path)
    except BaseException:
        print(f"--- controller log\n{controller.log_file.read_text(errors='replace')[-6000:]}")
        print(nats.logs())
        raise
    finally:
        controller.stop()


def run(controller: Controller, nats: NatsCluster, agents: list[Agent], tmp_path: Path) -> None:
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

    # The node to kill: one serving a device of the second wave (else of the third), never the
    # controller's, which has one broker address (docs/scaling.md).
    candidates = [d for w in (2, 3) for d in sorted(waves) if waves[d] == w]
    victim = next(home[d] for d in candidates if home[d] is not nats.nodes[0])
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
    for device_id in moved:
        agent = next(a for a in agents if a.device_id == device_id)
        survivors = [n.mqtt_port for n in nats.nodes if n is not victim]
        assert any(
            f"broker connected device={device_id} host=127.0.0.1 port={port}" in agent.log()
            for port in survivors
        ), f"{device_id} never reached a surviving node:\n{agent.log()[-3000:]}"

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
