"""Rollouts delivered by wave broadcast: real mosquitto, the controller process and agent processes.

The controller reaches the broker through a relay (tests/support/mqtt_relay.py) that counts what it
sends and, in the last test, alters chunks on the wire; the agents and the test's own
clients connect to the broker directly.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import tomli_w
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.wave import WaveTopic, is_wave_topic

from agent.broadcast import open_chunk, open_manifest
from agent.errors import SealRejected
from controller.wave_broadcast import seal_chunk
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done, stop_all
from tests.support.models import dense_of_size
from tests.support.mqtt_peer import Peer
from tests.support.mqtt_relay import Relay, Tamper
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

CHUNK = 16384
VERIFIED = re.compile(
    r"artifact verified device=(?P<device>\S+) digest=(?P<digest>\w+) chunks=(?P<chunks>\d+) "
    r"broadcast=(?P<broadcast>\d+) requested=(?P<requested>\d+) resumed=(?P<resumed>\d+) "
    r"broadcast_refused=(?P<refused>\S+)"
)


def toml_edit(path: Path, changes: dict[str, Any], section: str = "") -> None:
    doc = tomllib.loads(path.read_text())
    (doc.setdefault(section, {}) if section else doc).update(changes)
    path.write_text(tomli_w.dumps(doc))


class Setup:
    """The broker, a relay in front of it for the controller, the controller, and its agents."""

    def __init__(self, broker: Broker, tmp_path: Path, tamper: Tamper | None = None, **settings: Any) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.relay = Relay(broker.port, tamper)
        self.controller = Controller(
            tmp_path / "controller",
            self.relay.port,
            passwd_file=broker.passwd_file,
            reload_command=broker.reload_command,
        )
        self.controller.init()
        toml_edit(self.controller.data_dir / "controller.toml", {"chunk_size": CHUNK, **settings})
        self.controller.start()
        self.agents: list[AgentProcess] = []

    def agent(self, device_id: str) -> AgentProcess:
        agent = register_agent(self.controller, self.tmp_path / "agents", device_id)
        # Straight to the broker: the relay counts and alters the controller's traffic only.
        toml_edit(agent.config, {"port": self.broker.port}, section="mqtt")
        self.agents.append(agent)
        return agent

    def upload(self, megabytes: float, seed: int = 0) -> dict[str, Any]:
        model = dense_of_size(self.tmp_path / f"dense-{seed}.onnx", megabytes, seed=seed)
        version: dict[str, Any] = self.controller.cli(
            "models", "upload", str(model), "--name", "dense", "--version", str(seed + 1)
        )
        version["bytes"] = model.read_bytes()
        return version

    def online(self, *agents: AgentProcess) -> None:
        ids = {a.device_id for a in agents}
        wait_until(
            lambda: all(d["online"] for d in self.controller.cli("devices", "list") if d["device_id"] in ids),
            90,
            "agents online",
        )

    def roll_out(self, version: dict[str, Any], *agents: AgentProcess) -> dict[str, Any]:
        devices = [arg for a in agents for arg in ("--device", a.device_id)]
        rollout: dict[str, Any] = self.controller.cli(
            "rollouts", "create", "--model", "dense", "--version", version["version"], *devices
        )
        return rollout

    def metrics(self) -> tuple[dict[str, int], int]:
        """Unicast artifact bytes per device, and the bytes broadcast, as /metrics counts them."""
        text = self.controller.api("GET", "/metrics").text
        served = {
            m.group(1): int(float(m.group(2)))
            for m in re.finditer(
                r'^edgefleet_artifact_bytes_served_total\{device="([^"]+)"\} (\S+)$', text, re.M
            )
        }
        broadcast = re.search(r"^edgefleet_artifact_bytes_broadcast_total (\S+)$", text, re.M)
        return served, int(float(broadcast.group(1))) if broadcast else 0

    def close(self) -> None:
        stop_all(self.agents)
        self.controller.stop()
        self.relay.close()


@pytest.fixture
def setups() -> Iterator[list[Setup]]:
    made: list[Setup] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


def verified(agent: AgentProcess, digest: str) -> dict[str, Any]:
    """What the agent logged when it verified ``digest``: chunks in all, and where each came from."""
    found = [m for m in VERIFIED.finditer(agent.log_file.read_text()) if digest.startswith(m["digest"])]
    assert found, f"{agent.device_id} never verified {digest[:12]}:\n{agent.log()}"
    m = found[-1]
    return {k: int(m[k]) if k not in ("device", "digest", "refused") else m[k] for k in m.groupdict()}


def active(setup: Setup, agent: AgentProcess, digest: str) -> bool:
    reported = setup.controller.api("GET", f"/v1/devices/{agent.device_id}").json().get("reported") or {}
    return any(m["phase"] == "active" and m["artifact_digest"] == digest for m in reported.get("models", []))


class Spy:
    """A client logged in as a registered device that no rollout assigned the artifact."""

    def __init__(self, port: int, device_id: str, password: str) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self.desired: list[bytes] = []
        self.peer = Peer(port, device_id, password, client_id=device_id)
        self.peer.on_message = self._on_message
        self.peer.subscribe(f"edgefleet/v1/devices/{device_id}/desired")
        # Every wave's every artifact: the ACL lets any device read wave topics.
        self.peer.subscribe("edgefleet/v1/waves/+/+")

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        if is_wave_topic(msg.topic) and msg.payload:
            self.frames.append((msg.topic, bytes(msg.payload)))
        elif msg.topic.endswith("/desired"):
            self.desired.append(bytes(msg.payload))


def test_a_rollout_goes_out_once_by_broadcast_and_a_device_not_assigned_it_cannot_read_it(
    broker: Broker, tmp_path: Path, setups: list[Setup]
) -> None:
    setup = Setup(broker, tmp_path)
    setups.append(setup)
    agents = [setup.agent(f"dev-{i}").start() for i in range(3)]
    spy_login = setup.controller.api("POST", "/v1/devices", json={"device_id": "outsider", "tags": []}).json()
    spy = Spy(broker.port, "outsider", spy_login["mqtt_password"])
    version = setup.upload(0.5)
    digest, size = version["digest"], len(version["bytes"])
    setup.online(*agents)
    setup.relay.take()

    rollout = setup.roll_out(version, *agents)
    final = wait_until(lambda: rollout_done(setup.controller, rollout["id"]), 120, "the rollout to finish")
    egress = setup.relay.take()
    assert final["status"] == "succeeded", final

    chunks = -(-size // CHUNK)
    for agent in agents:
        got = verified(agent, digest)
        assert (got["chunks"], got["broadcast"], got["requested"]) == (chunks, chunks, 0), got
    served, broadcast = wait_until(
        lambda: (m := setup.metrics())[1] >= size and m, 30, "the broadcast counted on /metrics"
    )
    # Once, for the three of them: every sealed chunk carries 16 bytes of tag and a few of framing.
    assert size < broadcast < 1.02 * size + 4096, (broadcast, size)
    assert not any(served.get(a.device_id, 0) for a in agents), served
    # All the controller sent in the rollout (desired states, announcements, chunks, acks): about
    # one model, where answering each device's requests sends one per device.
    assert egress < 1.2 * size, (egress, size)

    # The outsider received every sealed chunk of the broadcast, and not one byte of the model.
    topic = str(WaveTopic(f"{rollout['id']}-w1", digest))
    frames = [artifact_pb2.WaveFrame.FromString(p) for t, p in spy.frames if t == topic]
    sealed = {f.chunk.index: f.chunk for f in frames if f.WhichOneof("body") == "chunk"}
    assert sorted(sealed) == list(range(chunks))
    model = version["bytes"]
    for index, chunk in sealed.items():
        assert model[index * CHUNK : (index + 1) * CHUNK][:64] not in chunk.sealed
        with pytest.raises(SealRejected):
            open_chunk(hashlib.sha256(b"a guess").digest(), digest, CHUNK, chunk)
    announcement = next(f.announcement for f in frames if f.WhichOneof("body") == "announcement")
    with pytest.raises(SealRejected):
        open_manifest(b"\0" * 32, digest, announcement)
    # Its own desired state (if it has one) names no key: the key travels only to assigned devices.
    for payload in spy.desired:
        state = fleet_pb2.DesiredState.FromString(payload)
        assert all(m.artifact_digest != digest and not m.broadcast.artifact_key for m in state.models)
    # And no device may publish on a wave topic (the broker refuses it).
    forged = artifact_pb2.WaveFrame(digest=digest, chunk=artifact_pb2.SealedChunk(index=0, sealed=b"x" * 32))
    assert spy.peer.publish(topic, forged.SerializeToString()).is_failure
    spy.peer.close()


def test_devices_that_join_late_or_restart_mid_broadcast_ask_only_for_what_they_missed(
    broker: Broker, tmp_path: Path, setups: list[Setup]
) -> None:
    # Two chunks a second, so that the broadcast is still going while agents start.
    setup = Setup(broker, tmp_path, broadcast_bytes_per_s=2 * CHUNK, broadcast_grace_s=1.0)
    setups.append(setup)
    steady, restarted, late = setup.agent("dev-a"), setup.agent("dev-b"), setup.agent("dev-c")
    steady.start()
    restarted.start()
    version = setup.upload(0.4)
    digest, size = version["digest"], len(version["bytes"])
    chunks = -(-size // CHUNK)
    setup.online(steady, restarted)
    watcher = Peer(broker.port, "watcher", broker.add_tool_user("watcher"), client_id="watcher")
    heard: list[int] = []
    lock = threading.Lock()

    def on_frame(msg: mqtt.MQTTMessage) -> None:
        frame = artifact_pb2.WaveFrame.FromString(bytes(msg.payload))
        # The model's chunks (its sample inputs have a broadcast of their own).
        if frame.digest == digest and frame.HasField("chunk"):
            with lock:
                heard.append(frame.chunk.index)

    watcher.on_message = on_frame
    watcher.subscribe("edgefleet/v1/waves/+/+")

    # dev-c is offline when its desired state goes out; the broadcast starts without it.
    rollout = setup.roll_out(version, steady, restarted, late)
    wait_until(lambda: len(heard) >= 4, 60, "the broadcast under way")
    restarted.kill()
    late.start()
    time.sleep(1.0)
    restarted.start()
    assert len(heard) < chunks, "the broadcast ended before the agents came back: nothing was tested"
    final = wait_until(lambda: rollout_done(setup.controller, rollout["id"]), 180, "the rollout to finish")
    assert final["status"] == "succeeded", final
    watcher.close()

    assert sorted(heard) == list(range(chunks)), "each chunk is broadcast once"
    served, _ = wait_until(
        lambda: (m := setup.metrics())[0].keys() >= {late.device_id, restarted.device_id} and m,
        30,
        "requests counted on /metrics",
    )
    got = verified(steady, digest)
    assert (got["broadcast"], got["requested"]) == (chunks, 0), got
    assert served.get(steady.device_id, 0) == 0
    for agent in (restarted, late):
        got = verified(agent, digest)
        assert got["broadcast"] + got["requested"] + got["resumed"] == chunks, got
        assert got["requested"] >= 1 and got["broadcast"] >= 1, got
        # Each missing chunk asked for once, and nothing it had: the model's chunks it asked for,
        # and the sample inputs (one small chunk) if their broadcast was over before it listened.
        sample = verified(agent, version["sample_digest"])["requested"] * version["sample_size"]
        expected = served[agent.device_id] - sample
        assert (got["requested"] - 1) * CHUNK < expected <= got["requested"] * CHUNK, (
            agent.device_id,
            got,
            served,
        )
    assert verified(restarted, digest)["resumed"] >= 1


def test_a_corrupted_and_a_replayed_broadcast_chunk_are_refused_and_asked_for(
    broker: Broker, tmp_path: Path, setups: list[Setup]
) -> None:
    state: dict[str, Any] = {"sealed": {}}

    def tamper(topic: str, payload: bytes) -> bytes:
        """On the wire between the controller and the broker: chunk 2 corrupted, chunk 3 sent again
        as chunk 4, and chunk 5 sealed with the right key over the wrong bytes."""
        if not is_wave_topic(topic) or not payload:
            return payload
        frame = artifact_pb2.WaveFrame.FromString(payload)
        if not frame.HasField("chunk"):
            return payload
        index = frame.chunk.index
        state["sealed"][index] = frame.chunk.sealed
        if index == 2:
            frame.chunk.sealed = (
                frame.chunk.sealed[:40] + bytes([frame.chunk.sealed[40] ^ 1]) + frame.chunk.sealed[41:]
            )
        elif index == 4:
            frame.chunk.sealed = state["sealed"][3]
        elif index == 5:
            key = (setup.controller.data_dir / "artifacts" / f"{frame.digest}.wavekey").read_bytes()
            frame.chunk.sealed = seal_chunk(key, frame.digest, CHUNK, 5, b"\0" * CHUNK)
        return frame.SerializeToString()

    setup = Setup(broker, tmp_path, tamper)
    setups.append(setup)
    agent = setup.agent("dev-0").start()
    version = setup.upload(0.3)
    digest, size = version["digest"], len(version["bytes"])
    setup.online(agent)
    rollout = setup.roll_out(version, agent)
    final = wait_until(lambda: rollout_done(setup.controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    assert active(setup, agent, digest)

    chunks = -(-size // CHUNK)
    got = verified(agent, digest)
    assert (got["broadcast"], got["requested"], got["refused"]) == (chunks - 3, 3, "digest:1,sealed:2"), got
    served, _ = wait_until(
        lambda: (m := setup.metrics())[0].get(agent.device_id) and m, 30, "requests counted on /metrics"
    )
    assert served[agent.device_id] == 3 * CHUNK

    def rejections() -> list[dict[str, str]] | None:
        events = setup.controller.api("GET", f"/v1/devices/{agent.device_id}/events").json()
        found = [e["attributes"] for e in events if e["kind"] == "chunk_rejected"]
        return found if len(found) >= 3 else None

    found = wait_until(rejections, 30, "the rejections reported")
    assert sorted((e["index"], e["source"], e["reason"]) for e in found) == [
        ("2", "broadcast", "sealed"),
        ("4", "broadcast", "sealed"),
        ("5", "broadcast", "digest"),
    ]
